"""Joining a Ray cluster for :mod:`clipcli.engines.ray`: Ray imported on demand, an address probed within
a bounded time (``ray.init`` would wait for ever), Ray's logs and handlers kept out of clipcli's way."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from clipcli.errors import InputError, ModelError


def require_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ModelError("--engine ray needs Ray: pip install 'clipcli[ray]'") from None
    return ray


CONNECT_TIMEOUT_VARIABLE = "CLIPCLI_RAY_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT_S = 15.0
# A gRPC server (Ray's GCS, and Ray Client's server) answers an HTTP/2 client preface with a SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS_FRAME = 4
_quieted = False  # whether Ray's once-per-process actor-restart log line was already spent (see _quiet_restart_warning)


def connect_timeout() -> float:
    """How long to wait for a Ray cluster to answer: ``$CLIPCLI_RAY_CONNECT_TIMEOUT`` seconds, else 15."""
    from clipcli.store.remote import seconds_setting

    return seconds_setting(CONNECT_TIMEOUT_VARIABLE, DEFAULT_CONNECT_TIMEOUT_S)


def _split(address: str, label: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{label}: not a Ray cluster's address (HOST:PORT, as `ray start --head` prints it)")
    return host, int(port)


def _target(address: str | None, label: str) -> tuple[str, int] | None:
    """The host and port Ray would connect to for ``address`` (``None``: Ray starts here), found as
    ``ray.init`` finds them (``$RAY_ADDRESS``, ``auto``, a cluster recorded on this machine)."""
    from ray._private import services

    given = address or os.environ.get("RAY_ADDRESS") or None
    if given is not None and given.startswith("ray://"):
        return _split(given[len("ray://") :], label)
    try:
        found = services.canonicalize_bootstrap_address(given)  # type: ignore[arg-type]  # None: look for one
    except ConnectionError as e:  # "auto" with no cluster running here
        raise InputError(f"{label}: {e}") from None
    except ValueError:
        found = given or ""
    return None if found is None else _split(found, label)


def _resolve(host: str, port: int, seconds: float, label: str) -> list[Any]:
    """``getaddrinfo`` in a daemon thread, so that a slow resolver neither outlasts ``seconds`` nor
    delays a signal to this thread."""
    import queue
    import threading

    answer: queue.Queue[Any] = queue.Queue()

    def lookup() -> None:
        try:
            answer.put(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            answer.put(e)

    threading.Thread(target=lookup, name="clipcli-ray-resolve", daemon=True).start()
    try:
        found = answer.get(timeout=seconds)
    except queue.Empty:
        raise InputError(f"{label}: cannot resolve {host} within {seconds:g} s ({CONNECT_TIMEOUT_VARIABLE})") from None
    if isinstance(found, OSError):
        reason = getattr(found, "strerror", None) or str(found)
        raise InputError(f"{label}: cannot resolve {host} ({reason})")
    return list(found)


def _probe(host: str, port: int, seconds: float, label: str) -> None:
    """Refuse, within ``seconds``, an address where no Ray cluster answers: ``ray.init`` itself retries
    such an address for ever, in native code that no signal interrupts."""
    import time

    deadline = time.monotonic() + seconds
    where = f"{host}:{port}"
    waited = f"within {seconds:g} s (set {CONNECT_TIMEOUT_VARIABLE} to wait longer)"
    reason = "no address"
    for family, kind, proto, _, sockaddr in _resolve(host, port, seconds, label):
        with socket.socket(family, kind, proto) as conn:
            try:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                conn.connect(sockaddr)
            except TimeoutError:
                raise InputError(f"{label}: no Ray cluster answered at {where} {waited}") from None
            except OSError as e:
                reason = e.strerror or str(e)
                continue
            try:
                conn.sendall(_HTTP2_PREFACE)
                header = b""
                while len(header) < 9:
                    conn.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = conn.recv(9 - len(header))
                    if not chunk:
                        break
                    header += chunk
            except TimeoutError:
                raise InputError(f"{label}: {where} accepts connections but did not answer {waited}") from None
            except OSError as e:
                header, reason = b"", e.strerror or str(e)
            else:
                reason = "not gRPC" if header else "it closed the connection"
            if len(header) == 9 and header[3] == _SETTINGS_FRAME:
                return
            raise InputError(f"{label}: {where} does not answer as a Ray cluster does ({reason})")
    raise InputError(
        f"{label}: no Ray cluster at {where} ({reason.lower()}); start one (`ray start --head`) or give its address"
    )


def _quiet_restart_warning(ray: Any) -> None:
    """Spend, with stderr pointed at /dev/null, the ERROR line Ray's core worker logs once per process
    when it creates a restartable actor whose constructor arguments are in the object store.

    Ray Data's actor pool passes every model actor its context and functions that way (by reference,
    ``max_restarts=-1``), so each run printed ``core_worker.cc: ... has constructor arguments in the
    object store and max_restarts > 0`` on success (ray-project/ray#53727). The warning does not apply:
    Ray Data holds those references until the run ends, and the restart it fears is the one that
    clipcli's tests see succeed. Ray writes that line from native code straight to file descriptor 2
    (and to the driver's log file, where it stays), so it is spent here on a throwaway actor.
    """
    global _quieted
    if _quieted:
        return

    class Throwaway:
        def __init__(self, argument: object) -> None:
            pass

    quiet_cls = ray.remote(num_cpus=0, max_restarts=1)(Throwaway)
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):
        return
    try:
        os.dup2(null, 2)
        try:
            actor = quiet_cls.remote(ray.put(None))
        finally:
            os.dup2(saved, 2)
    finally:
        os.close(saved)
        os.close(null)
    _quieted = True
    ray.kill(actor, no_restart=True)


@contextmanager
def connected(address: str | None) -> Iterator[Any]:
    """Ray, connected to ``address`` (else $RAY_ADDRESS, else a Ray instance started here, as
    ``ray.init`` does), quiet on stderr; disconnected afterwards if this call connected.

    An address where no Ray cluster answers within ``$CLIPCLI_RAY_CONNECT_TIMEOUT`` seconds (default
    15) is refused in one line: ``ray.init`` would retry it for ever. Ray's own SIGTERM handler, which
    ``ray.init`` installs, is replaced by the one that was there (clipcli's: exit 143, parts kept).
    """
    import logging
    import signal
    import threading

    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        given = address or os.environ.get("RAY_ADDRESS") or ""
        label = (
            f"--ray-address {given}" if address else f"RAY_ADDRESS={given}" if given else "the Ray cluster found here"
        )
        target = _target(address, label)
        if target is not None:
            _probe(*target, connect_timeout(), label)
        main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGTERM) if main else None
        logging.getLogger("ray").setLevel(logging.ERROR)
        try:
            ray.init(
                address=address or None,
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
        except (ConnectionError, ValueError, RuntimeError, ImportError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"{label}: cannot join the Ray cluster ({reason})") from None
        finally:
            if handler is not None:
                signal.signal(signal.SIGTERM, handler)
    logging.getLogger("ray").setLevel(logging.ERROR)
    # Ray Data logs a worker's error with its traceback before raising it here; clipcli reports it in one line.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        _quiet_restart_warning(ray)
        yield ray
    finally:
        if started:
            ray.shutdown()
