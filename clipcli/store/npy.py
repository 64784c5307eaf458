"""NPY embedding files: the matrix, and its sidecar (``<stem>.rows.jsonl``) that names the rows and records
the model; written as a pair, read back checked against each other."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.atomic import AtomicFile, describe_os_error, real_path
from clipcli.errors import InputError, OutputError
from clipcli.store.formats import json_line
from clipcli.store.rows import ModelTag

if TYPE_CHECKING:
    import numpy as np


NPY_FORMAT = 1


def npy_sidecar(path: Path) -> Path:
    """The file that names the rows of an NPY output and records the model: ``<stem>.rows.jsonl``
    beside the matrix. Where ``path`` is a symbolic link, that is beside the file it links to (the one
    written and read), so the pair is found through the link and without it."""
    if os.path.islink(path):
        path = real_path(path)
    return path.with_name(path.stem + ".rows.jsonl")


def npy_fingerprint(matrix: np.ndarray) -> str:
    """A digest of an NPY matrix's shape, type and 64 evenly spaced rows, so that a sidecar can tell
    its own matrix from another (a run that died between the two renames) without reading it all."""
    import hashlib

    import numpy as np

    n = matrix.shape[0]
    digest = hashlib.sha256(f"{matrix.shape}:{matrix.dtype.str}".encode())
    for row in np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64)) if n else []:
        digest.update(np.ascontiguousarray(matrix[int(row)]).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class NpyHeader:
    """The first line of an NPY sidecar; one JSON string per matrix row follows it."""

    rows: int
    key: str  # "path" or "text"
    tag: ModelTag
    fingerprint: str
    base: str | None = None  # the folder relative paths are relative to (the working folder of the run)

    def line(self) -> str:
        return json.dumps(
            {
                "clipcli_npy": NPY_FORMAT,
                "rows": self.rows,
                "key": self.key,
                "model": self.tag.name,
                "model_sha256": self.tag.sha256,
                "normalized": self.tag.normalized,
                "fingerprint": self.fingerprint,
                **({"base": self.base} if self.base is not None else {}),
            }
        )

    @classmethod
    def parse(cls, text: str, where: Path) -> NpyHeader:
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("clipcli_npy") != NPY_FORMAT:
                raise ValueError("unknown format")
            tag = ModelTag(str(d["model"]), str(d["model_sha256"]), bool(d["normalized"]))
            base = d.get("base")
            return cls(
                int(d["rows"]), str(d["key"]), tag, str(d["fingerprint"]), base if isinstance(base, str) else None
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise InputError(f"{where}: not an NPY sidecar written by clipcli embed") from None


def write_npy(
    path: Path, embeddings: np.ndarray, names: Sequence[str | Mapping[str, Any]], tag: ModelTag, key: str = "path"
) -> Path:
    """``path`` (N x D) and its sidecar (the model, then each row's name as a JSON string, or, for a
    video's frame, an object with the name under ``key`` and the frame's time: ``{"path": ..., "t": 12.0}``).

    Both are written in full under temporary names before either is renamed, so a failure while
    writing (a full disk) leaves the previous pair as it was; the sidecar records the matrix's
    fingerprint, so a pair mixed by a crash between the two renames is refused, never misread.
    JSON strings represent every name, newlines and names that are not UTF-8 included.
    """
    import numpy as np

    sidecar = npy_sidecar(path)
    try:
        here: str | None = os.getcwd() if key == "path" else None
    except OSError:
        here = None  # the working folder was deleted: relative paths name nothing
    header = NpyHeader(len(names), key, tag, npy_fingerprint(embeddings), here)
    matrix_out = AtomicFile(path)
    try:
        sidecar_out = AtomicFile(sidecar)
    except BaseException:
        matrix_out.discard()
        raise
    try:
        np.save(matrix_out.file, embeddings)
        lines = [header.line(), *(json_line(n) for n in names)]
        sidecar_out.file.write("".join(line + "\n" for line in lines).encode())
    except BaseException as e:
        reason = describe_os_error(e, path) if isinstance(e, OSError) else ""  # before the space is freed
        matrix_out.discard()
        sidecar_out.discard()
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write ({reason}); the previous pair is left as it was") from e
        raise
    if not (matrix_out.replaceable() and sidecar_out.replaceable()):  # another program wrote there meanwhile
        try:
            aside = matrix_out.set_aside()
            sidecar_out.set_aside(npy_sidecar(aside))  # a pair of its own, as readable as the output
        except OSError as e:
            matrix_out.discard()
            sidecar_out.discard()
            raise OutputError(
                f"{path}: cannot write ({describe_os_error(e)}); the previous pair is left as it was"
            ) from e
        raise (matrix_out if not matrix_out.replaceable() else sidecar_out).moved(aside)
    try:
        matrix_out.commit()
    except BaseException:
        sidecar_out.discard()
        raise
    sidecar_out.commit()
    return sidecar


class Lines:
    """The lines of a text file by number, decoded only when asked for.

    A search needs the names of ten rows out of a million: finding the line breaks with numpy takes a
    tenth of the time of splitting the whole file into strings.
    """

    def __init__(self, path: Path) -> None:
        import numpy as np

        self.path = path
        self.data = path.read_bytes()
        breaks = np.flatnonzero(np.frombuffer(self.data, np.uint8) == ord("\n"))
        if not self.data or self.data.endswith(b"\n"):
            self.ends = breaks
        else:  # a last line without its line break
            self.ends = np.append(breaks, len(self.data))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, row: int) -> str:
        start = int(self.ends[row - 1]) + 1 if row else 0
        try:
            return self.data[start : int(self.ends[row])].decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: line {row + 1} is not UTF-8 text") from None


@dataclass
class SavedNpy:
    """An NPY output opened for reading: the memory-mapped matrix, its header, and its row names."""

    matrix: np.ndarray
    header: NpyHeader
    lines: Lines

    def name(self, row: int) -> str:
        value = self.entry(row)
        if isinstance(value, dict):
            value = value.get(self.header.key)
        if not isinstance(value, str):
            raise InputError(f"{self.lines.path}: line {row + 2} is not a JSON string")
        return value

    def time(self, row: int) -> float | None:
        """A video frame's time (``t``, seconds); None for an image."""
        value = self.entry(row)
        t = value.get("t") if isinstance(value, dict) else None
        return float(t) if isinstance(t, int | float) else None

    def entry(self, row: int) -> Any:
        try:
            return json.loads(self.lines[row + 1])
        except (ValueError, RecursionError):  # not JSON, or nested past Python's limit: no name
            return None


def open_npy(path: Path) -> SavedNpy:
    """Open an NPY output and its sidecar, refusing a pair that does not belong together."""
    import numpy as np

    sidecar = npy_sidecar(path)
    if not sidecar.is_file():
        old = path.with_name(path.stem + ".paths.txt")
        hint = f" ({old.name} is from an older clipcli: run embed again)" if old.exists() else ""
        raise InputError(f"{path}: no {sidecar.name} beside it (the model and the names of its rows){hint}")
    try:
        matrix = np.load(path, mmap_mode="r")
        lines = Lines(sidecar)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read embeddings ({e})") from e
    header = NpyHeader.parse(lines[0] if len(lines) else "", sidecar)
    if matrix.ndim != 2 or matrix.shape[0] != header.rows or len(lines) != header.rows + 1:
        raise InputError(
            f"{path}: {matrix.shape} embeddings but {sidecar.name} names {len(lines) - 1} rows; "
            "the pair is damaged: run embed again"
        )
    if npy_fingerprint(matrix) != header.fingerprint:
        raise InputError(
            f"{path}: {sidecar.name} was written for another matrix (a run interrupted between writing "
            "the two?); run embed again"
        )
    return SavedNpy(matrix, header, lines)
