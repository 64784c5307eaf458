"""The Hugging Face hub cache, read the way huggingface_hub reads it but from the environment as it is
now (``HF_HUB_CACHE``, else ``$HF_HOME/hub``; ``HF_HUB_OFFLINE``), shared by every family that loads
from the hub: the library reads these once, at import, so a process that changes them later (a test, a
long-lived caller) would otherwise use stale ones."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

from clipcli.errors import ModelError


def hub_cache() -> Path:
    """The Hugging Face hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@cache
def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub's host takes a connection, asked once per process before anything is fetched.

    Without a network, huggingface_hub retries each file with back-off and logs every try: half a
    minute to two minutes of noise before the error. One connection attempt tells the same at once.
    Behind a proxy the host may not resolve here, so the library is left to find out.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_unavailable() -> str | None:
    """Why files not in the cache cannot be fetched now, or None when they can be tried."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return "the hub cannot be reached (no network?)"
    return None


class NotCached(ModelError):
    """A hub file that is not in the cache and cannot be fetched (offline, or no network)."""


def hub_download(repo: str, filename: str, spec: str) -> Path:
    """One file of a hub repo through huggingface_hub's cache (``$HF_HOME``, ``$HF_HUB_OFFLINE``).

    Raises FileNotFoundError when the repo has no such file, :class:`NotCached` when offline without it.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, cache_dir=hub_cache(), local_files_only=True))
    except LocalEntryNotFoundError:
        if hub_unavailable():
            raise NotCached(_offline_reason(spec, repo, filename)) from None
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=hub_cache()))
    except LocalEntryNotFoundError:
        raise NotCached(_offline_reason(spec, repo, filename)) from None
    except EntryNotFoundError:
        raise FileNotFoundError(filename) from None
    except RepositoryNotFoundError:
        raise ModelError(f"{spec}: no such Hugging Face repository {repo!r} (or it is private)") from None
    except OSError as e:
        raise ModelError(f"{spec}: cannot fetch {filename} from {repo} ({str(e).splitlines()[0]})") from None


def _offline_reason(spec: str, repo: str, filename: str) -> str:
    why = hub_unavailable() or "the hub cannot be reached"
    return f"{spec}: {filename} of {repo} is not in the Hugging Face cache ({hub_cache()}) and {why}"


def first_available(repo: str, names: Sequence[str], spec: str) -> Path:
    """The first of ``names`` the repo has (safetensors are listed first), from the cache or fetched."""
    offline: NotCached | None = None
    for name in names:
        try:
            return hub_download(repo, name, spec)
        except FileNotFoundError:
            continue
        except NotCached as e:  # offline, a later name may still be cached
            offline = offline or e
    raise offline or ModelError(f"{spec}: {repo} has none of {', '.join(names)}")
