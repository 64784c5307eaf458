"""Containers of images, found by their file's extension: each kind is one module implementing
:class:`clipcli.images.refs.Container`, imported the first time a file of that kind is met (so a run
over photos never imports PyAV). A new kind of container is one module and one row of
:data:`CONTAINERS`; discovery (:mod:`clipcli.images.sources`) and decoding
(:mod:`clipcli.images.batches`) find it here, so every command that reads images reads it."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import cast

from clipcli.images.refs import Container, ContainerOptions, Decoded, ImageRef, Skipped

# module -> the extensions it claims (lower case, with the dot)
CONTAINERS: dict[str, frozenset[str]] = {
    "clipcli.images.webdataset": frozenset({".tar"}),
    "clipcli.images.video": frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}),
}


def _kind_of(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    return next((module for module, exts in CONTAINERS.items() if ext in exts), None)


def container_extensions() -> frozenset[str]:
    """Every extension a container claims (folders are searched for these beside images)."""
    return frozenset().union(*CONTAINERS.values())


def is_container(path: str) -> bool:
    return _kind_of(path) is not None


def container_of(path: str) -> str | None:
    """The container part of a member's row path (``shard.tar`` of ``shard.tar#000042``): the text
    before the first ``#`` that follows a container's extension; None for a path that names no member."""
    at = path.find("#")
    while at != -1:
        if is_container(path[:at]):
            return path[:at]
        at = path.find("#", at + 1)
    return None


def _module(name: str) -> Container:
    return cast(Container, importlib.import_module(name).CONTAINER)


def expand(refs: Sequence[ImageRef], options: ContainerOptions | None = None) -> tuple[list[ImageRef], list[Skipped]]:
    """``refs`` with each container replaced by its members, in order; containers that hold none (or
    cannot be read, or need an extra that is not installed) come back as skipped, with the reason."""
    options = options or ContainerOptions()
    if not CONTAINERS:
        return list(refs), []
    out: list[ImageRef] = []
    skipped: list[Skipped] = []
    for ref in refs:
        kind = None if ref.member is not None else _kind_of(ref.path)
        if kind is None:
            out.append(ref)
            continue
        members, bad = _module(kind).expand(ref, options)
        out.extend(members)
        skipped.extend(bad)
    return out, skipped


def decode_member(ref: ImageRef, draft_size: int | None, max_pixels: int | None) -> Decoded:
    """Decode one member of a container (a ref with a ``member``)."""
    kind = _kind_of(str(ref.file))
    if kind is None:
        raise ValueError(f"not a container clipcli reads ({ref.file})")
    return _module(kind).decode(ref, draft_size, max_pixels)
