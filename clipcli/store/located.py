"""Where a saved source's names open from the working folder.

A dataset stores relative paths relative to the folder it was first embedded from, which it records
(``clipcli.base`` in Parquet metadata, the clip-retrieval layout's metadata files, an NPY sidecar's
header). ``rank ../A/emb/`` run in B must name A's ``photos/x.jpg`` as ``../A/photos/x.jpg``, never as
B's own ``photos/x.jpg``. The recorded folder is trusted, with two exceptions, where the names open
as stored: a recorded folder that is gone, and a project moved with its files (``mv W/proj X/``), told
by the source no longer being inside its recorded folder, which holds none of a sample of its files
while the working folder does. A folder of Parquet files recorded from different folders is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from clipcli.errors import InputError
from clipcli.images.containers import container_of
from clipcli.store.npy import NpyHeader, npy_sidecar
from clipcli.store.parts import PART_NAME, dataset_base
from clipcli.store.saved import row_files

SAMPLE = 32  # names looked up both ways


def names_from_here(source: Path) -> Callable[[str], str] | None:
    """A function from a stored name to the name that opens it from here, or None where the names open
    as stored: this folder's own dataset, one that records no folder (texts, an older NPY or dataset),
    one whose recorded folder is gone, or one whose files moved along with it (see the module)."""
    try:
        base, names = _base_and_sample(source)
        if base is None or not os.path.isdir(base):
            return None
        here, there = os.path.realpath(os.getcwd()), os.path.realpath(base)
        if there == here:
            return None
        inside = os.path.realpath(source).startswith(there.rstrip(os.sep) + os.sep)
        relative = [n for n in names if not os.path.isabs(n)]
        moved = not inside and not any(_exists(os.path.join(base, n)) for n in relative)
        if moved and any(_exists(n) for n in relative):
            return None  # moved with its files: they are found from here, none in the old folder
    except (OSError, ValueError, RecursionError):
        return None  # what cannot be read is reported when it is read
    return lambda name: name if os.path.isabs(name) else os.path.relpath(os.path.join(base, name))


def _exists(name: str) -> bool:
    return os.path.lexists(container_of(name) or name)


def _base_and_sample(source: Path) -> tuple[str | None, list[str]]:
    """The folder ``source`` records and up to :data:`SAMPLE` of its stored paths."""
    import pyarrow.parquet as pq

    if source.suffix.lower() == ".npy":  # its sidecar's header, and the names that follow it
        sidecar = npy_sidecar(source)
        with open(sidecar, "rb") as f:
            header = NpyHeader.parse(f.readline(1 << 16).decode("utf-8", "replace"), sidecar)
            if header.key != "path" or header.base is None:
                return None, []
            entries = [json.loads(f.readline(1 << 16) or b"null") for _ in range(SAMPLE)]
        names = [e.get(header.key) if isinstance(e, dict) else e for e in entries]
        return header.base, [n for n in names if isinstance(n, str)]
    files, key = row_files(source)  # a Parquet file, a folder of them, or a layout's metadata files
    if not files or not files[0].is_file():
        return None, []
    with pq.ParquetFile(files[0]) as part:
        base = dataset_base(part.schema_arrow.metadata)
        if key not in part.schema_arrow.names or base is None:
            return None, []
        batch = next(part.iter_batches(batch_size=SAMPLE, columns=[key]), None)
    if key == "path" and not all(PART_NAME.match(f.name) for f in files):  # files of their own, no dataset's
        bases = {dataset_base(pq.read_schema(f).metadata) for f in files}
        if len(bases) > 1:
            raise InputError(
                f"{source}: its Parquet files were embedded from different folders, so their relative paths "
                "open from different places; rank each file, or embed them into one dataset"
            )
    names = batch.column(0).to_pylist() if batch is not None else []
    return base, [n for n in names if isinstance(n, str)]
