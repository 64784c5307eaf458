"""What an ``embed`` run reads, and where it may write: the checks made before any image is read, and
the images found for a job (its shard's, with ``--shard``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from clipcli.errors import InputError
from clipcli.images.refs import ContainerOptions
from clipcli.images.sources import ImageRef, Skipped
from clipcli.store.output import Output, OutputKind


def check_scale_out(engine: str, shard: str | None, text: bool, out: Output, given: str | None) -> None:
    """--engine ray and --shard write parts into a dataset directory, from several processes."""
    wanted = [f for f, on in (("--engine ray", engine == "ray"), (f"--shard {shard}", shard)) if on]
    if not wanted:
        return
    if text:
        raise InputError(f"{' and '.join(wanted)}: texts are embedded in this process; drop the option")
    if not out.is_dataset:
        verb = "need" if len(wanted) > 1 else "needs"
        shown = out.target or given or "stdout"
        raise InputError(f"{' and '.join(wanted)} {verb} a Parquet dataset directory as output: -o DIR/ (not {shown})")


def check_text_output(out: Output) -> None:
    """``embed --text`` writes one file: a directory named as such is refused."""
    target = out.target
    if out.kind is OutputKind.DATASET and target and (target.endswith(("/", os.sep)) or Path(target).is_dir()):
        raise InputError(f"{target}: --text writes one file (.parquet, .npy, .csv or .jsonl), not a dataset directory")


def find_images(
    inputs: Sequence[str], out: Output, stdin: IO[str] | None = None, containers: ContainerOptions | None = None
) -> tuple[list[ImageRef], list[Skipped]]:
    """The images ``inputs`` name (those of ``out``'s shard; a video's frames as ``containers`` says),
    and the inputs found missing; call it under the output's lock. Refuses no images at all, and an
    output that is one of the images."""
    from clipcli.images.sources import discover, found_nothing, nothing_found
    from clipcli.store.refusals import refuse_output_over_inputs

    refs, missing = discover(inputs, stdin or sys.stdin, containers)
    if found_nothing(refs, missing):
        raise nothing_found(inputs, missing)
    if not out.is_dataset:  # an image found in a folder given as input (a folder output holds none)
        refuse_output_over_inputs(out.written_files(), (r.file for r in refs))
    if out.shard is not None:
        refs = out.shard.select(refs)
    return list(refs), list(missing)
