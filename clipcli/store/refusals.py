"""Outputs that would overwrite what a run reads, refused before any work: an output that is one of the
inputs (through links, relative paths, hard links, globs and brace patterns, an image inside an input
folder, the file behind a row of saved embeddings), a Parquet file inside an input dataset, two outputs
of one run naming one file, and a dataset folder written among its own input images.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from clipcli.atomic import is_stream, real_path
from clipcli.errors import InputError, OutputError

PathArg = str | Path | None


def refuse_output_over_inputs(
    outputs: Iterable[PathArg], inputs: Iterable[PathArg], datasets: Iterable[PathArg] = ()
) -> None:
    """Refuse, before any work, an output that is one of the inputs: the same file (or folder) through
    symbolic links, relative paths or hard links; or a Parquet file inside one of ``datasets`` (inputs
    whose Parquet files are all read: embeddings written by ``embed -o DIR/``).

    Writing it would replace the data being read (``rank q src.parquet -o src.parquet``). Stdout, ``-``,
    object-store URIs and streams (FIFOs, devices) are never inputs; an output that does not exist yet
    cannot be one either, so only an existing output costs a ``stat`` per input. Raises OutputError.
    """
    folders = [d for d in datasets if _is_local_path(d)]
    inputs = [i for i in (*inputs, *folders) if _is_local_path(i)]
    for output in outputs:
        if not _is_local_path(output):
            continue
        out = Path(output or "")
        if out.suffix.lower() in (".parquet", ".pq"):
            _refuse_inside_datasets(out, folders)
        out_stat = _stat(out)
        if out_stat is None or not (stat.S_ISREG(out_stat.st_mode) or stat.S_ISDIR(out_stat.st_mode)):
            continue  # not there yet, or a FIFO or a device, written as a stream and never replaced
        for given in inputs:
            in_stat = _stat(Path(given or ""))
            if in_stat is not None and (in_stat.st_dev, in_stat.st_ino) == (out_stat.st_dev, out_stat.st_ino):
                same = "" if str(given) == str(output) else f" ({given})"
                raise OutputError(f"{output}: is also an input{same}; write the output to another file")
            if in_stat is not None and stat.S_ISDIR(in_stat.st_mode) and stat.S_ISREG(out_stat.st_mode):
                _refuse_image_inside(output, out, Path(given or ""))
            elif in_stat is None and _GLOB_CHARS.search(str(given)):
                _refuse_glob_match(output, out_stat, str(given))
            elif in_stat is None and "{" in str(given):
                _refuse_brace_match(output, out_stat, str(given))
        if stat.S_ISREG(out_stat.st_mode):
            for source in folders:
                _refuse_row_file(output, out, out_stat, Path(source or ""))


def refuse_one_file_twice(outputs: dict[str, PathArg]) -> None:
    """Refuse, before any work, two outputs of one run (``{"--html": ..., "--output": ...}``) that name one
    file, through links or relative paths too: each would be written under one temporary name, and the
    second would cut into the first. A FIFO or a device is a stream, and may be named twice."""
    seen: dict[Path, str] = {}
    for option, value in outputs.items():
        if not _is_local_path(value) or is_stream(Path(str(value))):
            continue
        real = real_path(Path(str(value)))
        if real in seen:
            raise OutputError(f"{value}: given as both {seen[real]} and {option} (one file); write them to two files")
        seen[real] = option


def refuse_dataset_among_inputs(output: PathArg, inputs: Iterable[PathArg]) -> None:
    """Refuse a dataset folder (``embed -o DIR/``) that holds one of its inputs: ``rank`` and ``serve`` read
    a folder holding Parquet parts as embeddings, in place of the images beside them. Raises OutputError."""
    out = Path(output or "")
    if not _is_local_path(output) or not out.is_dir():
        return
    for given in inputs:
        inside = _is_local_path(given) and os.path.exists(str(given))
        if inside and real_path(out) in real_path(Path(str(given))).parents:
            raise OutputError(
                f"{output}: holds the input {given}; a dataset written among the images it was made from "
                "would be read as embeddings instead of them (by rank, serve): write it to another folder"
            )


_GLOB_CHARS = re.compile(r"[*?\[]")


def _refuse_image_inside(output: PathArg, out: Path, folder: Path) -> None:
    """An image file inside an input folder (through links too) is one of the inputs that folder yields."""
    from clipcli.images.containers import container_extensions
    from clipcli.images.sources import IMAGE_EXTENSIONS

    target = real_path(out)
    readable = IMAGE_EXTENSIONS | container_extensions()  # a video or a shard in the folder is read too
    if target.suffix.lower() in readable and real_path(folder) in target.parents:
        raise OutputError(
            f"{output}: is also an input (an image inside the input folder {folder}); write the output to another file"
        )


def _refuse_brace_match(output: PathArg, out_stat: os.stat_result, pattern: str) -> None:
    from clipcli.images.sources import expand_braces

    for match in expand_braces([pattern]):
        found = _stat(Path(match))
        if found is not None and (found.st_dev, found.st_ino) == (out_stat.st_dev, out_stat.st_ino):
            raise OutputError(f"{output}: is also an input ({match}, from {pattern}); write the output to another file")


def _refuse_row_file(output: PathArg, out: Path, out_stat: os.stat_result, source: Path) -> None:
    """The file behind a row of saved embeddings (an image, or a video or shard holding the row) is an
    input too: ``rank q emb/ --html photo.jpg`` would replace the photo. Rows are matched by file name
    first, so only the few that could be the output cost a ``stat``."""
    from clipcli.store.saved import is_embedding_source, stored_files

    if not is_embedding_source(str(source)):
        return
    try:
        for stored, base in stored_files(source):
            if os.path.basename(stored) != out.name:
                continue
            for where in {stored, os.path.join(base, stored) if base else stored}:
                found = _stat(Path(where))
                if found is not None and (found.st_dev, found.st_ino) == (out_stat.st_dev, out_stat.st_ino):
                    raise OutputError(
                        f"{output}: is also an input (the file of a row of {source}); write the output to another file"
                    )
    except (InputError, OSError, ValueError):
        return  # a source that cannot be read is reported by the run, which reads it next


def _refuse_glob_match(output: PathArg, out_stat: os.stat_result, pattern: str) -> None:
    import glob

    for match in glob.iglob(pattern, recursive=True):
        found = _stat(Path(match))
        if found is not None and (found.st_dev, found.st_ino) == (out_stat.st_dev, out_stat.st_ino):
            raise OutputError(f"{output}: is also an input ({match}, from {pattern}); write the output to another file")


def _refuse_inside_datasets(out: Path, folders: Sequence[PathArg]) -> None:
    """A Parquet output inside an input dataset folder would become one of the parts read from there."""
    where = real_path(out).parent
    for given in folders:
        folder = Path(given or "")
        inside = folder.is_dir() and (where == real_path(folder) or real_path(folder) in where.parents)
        if inside and any(folder.glob("*.parquet")):  # a dataset, not a folder of images
            raise OutputError(
                f"{out}: is inside the input dataset {given}, whose Parquet files are read; write elsewhere"
            )


def _is_local_path(value: PathArg) -> bool:
    return value is not None and str(value) not in ("", "-") and "://" not in str(value)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None
