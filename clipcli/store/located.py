"""Where a saved source's names open from the working folder.

A dataset stores relative paths relative to the folder it was first embedded from, which it records
(``clipcli.base`` in Parquet metadata, the clip-retrieval layout's metadata files, an NPY sidecar's
header). ``rank ../A/emb/`` run in B must name A's ``photos/x.jpg`` as ``../A/photos/x.jpg``, never as
B's own ``photos/x.jpg``; but a project moved as a whole (``mv W/proj X/``) carries its files along,
and its names open as stored. Which of the two a source is, is told by its rows: a sample of its names
is looked up both ways, and the way that finds more of them wins (ties: the recorded folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from clipcli.images.containers import container_of
from clipcli.store.npy import npy_sidecar
from clipcli.store.parts import dataset_base

SAMPLE = 32  # names looked up both ways


def names_from_here(source: Path) -> Callable[[str], str] | None:
    """A function from a stored name to the name that opens it from here, or None where the names open
    as stored: this folder's own dataset, one that records no folder (texts, an older NPY or dataset),
    one whose recorded folder is gone, or one whose files moved along with it."""
    try:
        base, names = _base_and_sample(source)
        here = os.path.realpath(os.getcwd())
    except (OSError, ValueError):
        return None  # what cannot be read is reported when it is read
    if base is None or os.path.realpath(base) == here or not os.path.isdir(base):
        return None
    relative = [n for n in names if not os.path.isabs(n)]
    found_there = sum(_exists(os.path.join(base, n)) for n in relative)
    found_here = sum(_exists(n) for n in relative)
    if found_here > found_there:
        return None
    return lambda name: name if os.path.isabs(name) else os.path.relpath(os.path.join(base, name))


def _exists(name: str) -> bool:
    return os.path.lexists(container_of(name) or name)


def _base_and_sample(source: Path) -> tuple[str | None, list[str]]:
    """The folder ``source`` records and up to :data:`SAMPLE` of its stored paths."""
    import pyarrow.parquet as pq

    if source.suffix.lower() == ".npy":
        with open(npy_sidecar(source), "rb") as f:
            header = json.loads(f.readline(1 << 16))
            if not (isinstance(header, dict) and header.get("key") == "path" and isinstance(header.get("base"), str)):
                return None, []
            entries = [json.loads(f.readline(1 << 16) or b"null") for _ in range(SAMPLE)]
        names = [e.get("path") if isinstance(e, dict) else e for e in entries]
        return header["base"], [n for n in names if isinstance(n, str)]
    layout = (source / "img_emb").is_dir() and (source / "metadata").is_dir()  # clip-retrieval's
    folder = source / "metadata" if layout else source
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else [source]
    if not files or files[0].suffix.lower() not in (".parquet", ".pq") or not files[0].is_file():
        return None, []
    with pq.ParquetFile(files[0]) as part:
        key = "image_path" if layout else "path"
        base = dataset_base(part.schema_arrow.metadata)
        if key not in part.schema_arrow.names or base is None:
            return None, []
        batch = next(part.iter_batches(batch_size=SAMPLE, columns=[key]), None)
    names = batch.column(0).to_pylist() if batch is not None else []
    return base, [n for n in names if isinstance(n, str)]
