"""Helpers the model families share for the weights they load: building a model without random
initialisation, and identifying weights held in several files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from clipcli.models.digest import file_sha256


@contextmanager
def skipping_init() -> Iterator[None]:
    """Turn torch.nn.init's random fills into no-ops while a model that will load a state dict is built.

    Drawing random weights only to overwrite them is most of a command's start-up for a full-size
    model on a CPU. (The same trick as transformers' ``no_init_weights``; building on the meta
    device instead costs as much the first time, importing torch's symbolic-shape machinery.)
    """
    from torch.nn import init

    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_")]
    saved = {name: getattr(init, name) for name in names}
    try:
        for name in names:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fill in saved.items():
            setattr(init, name, fill)


def files_checksum(files: Sequence[Path]) -> str:
    """SHA-256 over the weight file(s); several files are hashed in order, with names."""
    if len(files) == 1:
        return file_sha256(files[0])
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
