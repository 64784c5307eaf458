"""``serve`` as one call: a :class:`ServeRequest` in; the datasets opened, the model loaded once, and
the app served with uvicorn until SIGTERM or Ctrl-C, which end it cleanly (the call returns).

The socket is bound before the model loads, so a port in use is refused at once; ``--port 0`` takes a
free one (the address is told through :attr:`ServeHooks.on_ready`). Off the loopback address a token
is required: the one given, or a generated one told once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import InputError, ModelError
from clipcli.images.limits import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from clipcli.models import LoadedModel, ModelOptions


@dataclass(frozen=True)
class ServeRequest:
    """``serve``'s arguments: the embeddings sources, where to listen, and the limits kept."""

    sources: Sequence[str]
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    no_index: bool = False
    thumb_cache: str | None = None  # the thumbnails' folder (None: in clipcli's cache)
    thumb_cache_bytes: int = 512 << 20
    max_upload_bytes: int = 20 << 20
    max_pixels: int | None = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Ready:
    """What a person needs to open the page: its URL (with the token, when one is needed)."""

    url: str
    images: int
    datasets: int
    token: str | None
    token_generated: bool
    exposed: bool  # listening beyond the loopback address


@dataclass(frozen=True)
class ServeHooks:
    load: Callable[[ModelOptions], LoadedModel]
    on_ready: Callable[[Ready], None]
    on_note: Callable[[str], None]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_serve(request: ServeRequest, models: ModelOptions, hooks: ServeHooks) -> None:
    """Serve until stopped (see the module's docstring)."""
    from clipcli.models import require_extra

    uvicorn = require_extra("uvicorn", "serve", "serve")
    require_extra("fastapi", "serve", "serve")
    from clipcli.serve.app import Served, create_app
    from clipcli.serve.catalog import Catalog
    from clipcli.serve.thumbcache import ThumbCache
    from clipcli.store.saved import Expect, is_embedding_source

    r = request
    if not r.sources:
        raise InputError("no datasets: pass embeddings written by `clipcli embed` (a Parquet folder or file, an NPY)")
    for source in r.sources:
        if "://" not in source and not Path(source).exists():
            raise InputError(f"{source}: does not exist")
        if not is_embedding_source(source):
            raise InputError(f"{source}: not embeddings written by `clipcli embed` (serve shows saved datasets)")
    exposed = not is_loopback(r.host)
    token = r.token
    if token is not None and len(token) < 8:
        raise InputError("--token: use at least 8 characters")
    generated = exposed and token is None
    if generated:
        token = secrets.token_urlsafe(18)
    thumbs = ThumbCache(Path(r.thumb_cache) if r.thumb_cache else None, r.thumb_cache_bytes, r.max_pixels)
    thumbs.claim()  # before the model loads: a folder of the user's files is refused at once
    sock = _bind(r.host, r.port)
    try:
        lm = _load(models, Path(r.sources[0]), hooks.load)
        catalog = Catalog([Path(s) for s in r.sources], Expect.of(lm), use_index=not r.no_index)
        for dataset in catalog.datasets:
            if dataset.note:
                hooks.on_note(dataset.note)
        app = create_app(Served(lm, catalog, token, thumbs, r.max_upload_bytes, r.max_pixels))
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
        _quiet_cancelled_requests()
        server = _quiet_server(uvicorn)(config)
        port = sock.getsockname()[1]
        host = f"[{r.host}]" if ":" in r.host else r.host
        url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
        images = sum(d.size for d in catalog.datasets)
        hooks.on_ready(Ready(url, images, len(catalog.datasets), token, generated, exposed))
        server.run(sockets=[sock])
    finally:
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: not an address to listen on ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog from now on, until uvicorn accepts them
    except OSError as e:
        sock.close()
        raise InputError(f"{host}:{port}: cannot listen there ({e.strerror or e}); pass another --port") from None
    return sock


def _load(models: ModelOptions, source: Path, load: Callable[[ModelOptions], LoadedModel]) -> LoadedModel:
    """The model ``-m`` names; without it, the one the first dataset records (else the default)."""
    from clipcli.store.saved import saved_tag

    if models.spec is not None:
        return load(models)
    tag, _ = saved_tag(source)
    if not tag.sha256:
        return load(models)
    try:
        return load(replace(models, spec=tag.name))
    except ModelError as e:
        raise ModelError(f"{source}: made with {tag.name}, which cannot be loaded here ({e}); pass --model") from e


def _quiet_server(uvicorn: Any) -> Any:
    """uvicorn's server, stopping on SIGTERM and Ctrl-C without raising the signal again afterwards
    (uvicorn re-raises it once shut down, which would turn a clean stop into an interrupted run)."""

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            import signal
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


class _NoCancelledTracebacks(logging.Filter):
    """Drop uvicorn's traceback for a request cancelled at shutdown (still running when the graceful
    shutdown's time ran out): the server is stopping as asked; its one line says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, asyncio.CancelledError) and "timeout graceful shutdown" not in record.getMessage()


def _quiet_cancelled_requests() -> None:
    for name in ("uvicorn.error", "uvicorn"):
        logging.getLogger(name).addFilter(_NoCancelledTracebacks())
