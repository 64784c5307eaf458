"""Finding images: files, folders (each real directory once), globs and paths on stdin, in input order.

Arguments that name nothing come back as :class:`Skipped` records, not errors, so a typo never costs a batch;
:class:`Skipped` also carries the decoding failures of :mod:`clipcli.images.batches`.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from clipcli.errors import InputError
from clipcli.images.containers import container_extensions, expand
from clipcli.images.refs import ContainerOptions, ImageRef, Skipped

__all__ = ["IMAGE_EXTENSIONS", "ImageRef", "Skipped", "discover", "natural_key", "nothing_found", "walk_folder"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_GLOB_CHARS = re.compile(r"[*?\[]")


def natural_key(text: str) -> list[Any]:
    """Sort "img9" before "img10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _directory_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk_once(
    top: str, hidden: bool = True, visited: set[tuple[int, int] | None] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) for ``top`` and every folder under it, following directory symlinks.

    Each real directory is entered once: a link back up the tree (``self -> .``, ``sub/up -> ..``)
    would otherwise be walked again at every level until the path is too long, and two such links
    make that exponential. Of two paths to one directory, the first one walked is kept; ``visited``
    carries that memory across walks (``A/ Alink/`` lists A's images once).
    """
    visited = set() if visited is None else visited
    if _directory_id(top) in visited:
        return
    visited.add(_directory_id(top))
    for root, dirs, files in os.walk(top, followlinks=True):
        names = sorted((name for name in dirs if hidden or not name.startswith(".")), key=natural_key)
        unvisited = set()
        # A directory keeps its own name over a link to it from the same folder (a stable sort).
        for name in sorted(names, key=lambda name: os.path.islink(os.path.join(root, name))):
            ident = _directory_id(os.path.join(root, name))
            if ident is not None and ident not in visited:
                visited.add(ident)
                unvisited.add(name)
        dirs[:] = [name for name in names if name in unvisited]
        yield root, files


def walk_folder(folder: str, visited: set[tuple[int, int] | None] | None = None) -> list[ImageRef]:
    """Every image under ``folder`` (natural order), each real directory once; see :func:`_walk_once`."""
    found = []
    wanted = IMAGE_EXTENSIONS | container_extensions()
    for root, files in _walk_once(folder, visited=visited):
        for name in files:
            if Path(name).suffix.lower() in wanted:
                full = os.path.join(root, name)
                found.append(ImageRef(full, Path(full)))
    found.sort(key=lambda ref: natural_key(os.path.relpath(ref.path, folder)))
    return found


def _glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, but a ``**`` enters each real directory once.

    glob's own ``**`` follows directory symlinks with no memory of where it has been, so one link back
    up the tree lists every file 40 times over and two never finish (see :func:`_walk_once`).
    """
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)
    at = parts.index("**")
    head, tail = os.sep.join(parts[:at]) or (os.sep if at else ""), parts[at + 1 :]
    bases = glob.glob(head) if _GLOB_CHARS.search(head) else [head]
    found: list[str] = []
    for base in bases:
        if base and not os.path.isdir(base):
            continue
        for root, files in _walk_once(base or os.curdir, hidden=False):
            # For a pattern that starts with **, glob writes "sub/x.jpg", not "./sub/x.jpg".
            folder = root if base else os.path.relpath(root)
            prefix = "" if folder == os.curdir and not base else folder
            if tail:
                found.extend(_glob(os.path.join(glob.escape(prefix), *tail)))
            else:  # a trailing ** matches every file below (and folders, which are no images)
                found.extend(os.path.join(prefix, name) for name in files if not name.startswith("."))
    return found


def _stdin_paths(text: str) -> list[str]:
    """One path per line, exactly as written but for the line ending; or, when the text holds NUL
    bytes (``find -print0``), one path per NUL-terminated record, newlines and all.

    Spaces, and the other characters ``str.splitlines`` breaks at (``\\x0b``, ``\\x1c``, ``\\u2028``...),
    are legal in file names, so only ``\\n`` (or ``\\r\\n``) ends a line.
    """
    if "\0" in text:
        return [path for path in text.split("\0") if path]
    lines = (line[:-1] if line.endswith("\r") else line for line in text.split("\n"))
    return [line for line in lines if line]


def _drop_repeats(refs: list[ImageRef]) -> list[ImageRef]:
    """Each file once, named in normal form: ``x.jpg ./x.jpg folder/`` classifies x.jpg once, as
    ``x.jpg``, so that the names stored by one run match those of the next however the file was named.
    The file itself is opened by the path given."""
    cwd = os.getcwd()  # once, where os.path.abspath would ask again for every path
    real_dirs: dict[str, str] = {}  # a folder's real path, asked once per folder, not once per file
    seen: set[str] = set()
    unique = []
    for ref in refs:
        name = os.path.normpath(ref.path)
        folder, base = os.path.split(os.path.join(cwd, name))
        if folder not in real_dirs:
            real_dirs[folder] = os.path.realpath(folder)
        key = os.path.join(real_dirs[folder], base)  # x.jpg and alias/x.jpg, alias -> ., are one file
        if key not in seen:
            seen.add(key)
            unique.append(ref if name == ref.path else ImageRef(name, ref.file))
    return unique


def found_nothing(refs: Sequence[ImageRef], missing: Sequence[Skipped]) -> bool:
    """Whether a run has nothing to work on and should stop with :func:`nothing_found`: no image, and
    no input that was read (a run over damaged videos or shards alone goes on, writes its empty output
    and ends with exit 1, as one over damaged photos alone does)."""
    return not refs and not any(m.read for m in missing)


def nothing_found(arguments: Sequence[str], missing: Sequence[Skipped]) -> InputError:
    """The error for a run with no image to work on, with the reasons its arguments gave none."""
    reasons = "; ".join(f"{m.path}: {m.reason}" for m in missing[:3]) + ("; ..." if len(missing) > 3 else "")
    named = ", ".join("the list on standard input" if a == "-" else a for a in arguments)
    return InputError(f"no images found in {named}" + (f" ({reasons})" if reasons else ""))


_BRACES = re.compile(r"\{[^{}]*(?:,|\.\.)[^{}]*\}")


_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")


def _range_product(pattern: str) -> int:
    """How many names the numeric ranges of ``pattern`` make together (braceexpand builds each range
    whole before yielding a name: ``{0..99999999999999999999}`` would fill the memory)."""
    total = 1
    for start, stop, step in _RANGE.findall(pattern):
        total *= abs(int(stop) - int(start)) // max(abs(int(step or 1)), 1) + 1
    return total


MAX_BRACE_NAMES = 100_000  # a pattern naming more (a typo like {0..99999999}) is refused, not expanded for minutes


def expand_braces(arguments: Sequence[str], missing: list[Skipped] | None = None) -> list[str]:
    """Arguments with WebDataset's brace patterns (``shards/{000000..000099}.tar``, ``{a,b}.tar``)
    expanded by ``braceexpand``, the package WebDataset itself expands them with; an argument that
    names a file as written is kept as it is."""
    out: list[str] = []
    for arg in arguments:
        if arg == "-" or os.path.lexists(arg) or not _BRACES.search(arg):
            out.append(arg)
            continue
        try:
            from braceexpand import braceexpand
        except ImportError:
            (missing if missing is not None else []).append(
                Skipped(arg, "brace patterns need the webdataset extra: pip install 'clipcli[webdataset]'")
            )
            continue
        names = (
            []
            if _range_product(arg) > MAX_BRACE_NAMES
            else list(itertools.islice(braceexpand(arg), MAX_BRACE_NAMES + 1))
        )
        if not names or len(names) > MAX_BRACE_NAMES:
            raise InputError(
                f"{arg}: the pattern names more than {MAX_BRACE_NAMES:,} files; split it, or name a folder of shards"
            )
        out.extend(names)
    return out


def discover(
    arguments: Sequence[str], stdin: IO[str] | None = None, containers: ContainerOptions | None = None
) -> tuple[list[ImageRef], list[Skipped]]:
    """Expand files, folders, globs and ``-`` (paths on stdin) into images, in input order; a container
    of images (a video, a WebDataset shard: see :mod:`clipcli.images.containers`) into its members, as
    ``containers`` says.

    A brace pattern (``shards/{000000..000099}.tar``) names each file it expands to (see :func:`expand_braces`).
    Arguments that name nothing are returned as skipped, not raised: one typo must not cost a batch.
    A file named twice (directly, by a folder or a glob) is listed once, where it was first named.
    """
    refs: list[ImageRef] = []
    missing: list[Skipped] = []
    walked: set[tuple[int, int] | None] = set()  # real directories, across folder arguments
    for arg in expand_braces(arguments, missing):
        if arg == "-":
            # Lines from `find` name files one by one: a directory here is a mistake, not a folder to walk.
            refs.extend(ImageRef(line, Path(line)) for line in _stdin_paths(stdin.read() if stdin else ""))
        elif os.path.isdir(arg):
            refs.extend(walk_folder(arg, walked))
        elif os.path.lexists(arg):
            refs.append(ImageRef(arg, Path(arg)))
        elif _GLOB_CHARS.search(arg):
            matches = sorted(_glob(arg), key=natural_key)
            files = [m for m in matches if not os.path.isdir(m)]
            if not files:
                missing.append(Skipped(arg, "no file matches this pattern"))
            refs.extend(ImageRef(m, Path(m)) for m in files)
        else:
            missing.append(Skipped(arg, "no such file or directory"))
    members, empty = expand(_drop_repeats(refs), containers)
    return members, missing + empty
