"""Where clipcli keeps what it can make again: downloaded models, zero-shot classifiers, search copies."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CLIPCLI_CACHE``, else ``~/.cache/clip``: the `clip` package's own cache, so that the models it
    downloaded are reused (clipcli's own entries live in ``clipcli-*`` folders inside it)."""
    return Path(os.environ.get("CLIPCLI_CACHE") or Path.home() / ".cache" / "clip")
