"""Rows of embeddings as Parquet sees them: the model tag a dataset's metadata records, the schema
(every row's columns and the metadata columns a row may leave empty), rows column-wise, file stats,
and numpy-to-Arrow conversions that never import pandas."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import ModelError
from clipcli.images.containers import container_of

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

META_MODEL = b"clipcli.model"
META_SHA = b"clipcli.model_sha256"
META_NORMALIZED = b"clipcli.normalized"
META_BASE = b"clipcli.base"  # the folder that the dataset's relative paths are relative to


@dataclass(frozen=True)
class ModelTag:
    """What a set of embeddings was made with; mixing two is refused."""

    name: str
    sha256: str
    normalized: bool

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> ModelTag:
        """The tag in a Parquet file's metadata (unknown parts empty; unmarked files count as normalised)."""
        meta = metadata or {}
        return cls(
            meta.get(META_MODEL, b"an unknown model").decode(),
            meta.get(META_SHA, b"").decode(),
            meta.get(META_NORMALIZED, b"true") == b"true",
        )

    def metadata(self) -> dict[bytes, str]:
        """The tag as a Parquet file's metadata records it (read back by :meth:`from_metadata`)."""
        return {META_MODEL: self.name, META_SHA: self.sha256, META_NORMALIZED: str(self.normalized).lower()}

    def require_model(self, name: str, sha256: str, where: Path) -> None:
        """Refuse embeddings made with another model than the one loaded (``name``, ``sha256``)."""
        if self.sha256 != sha256:
            made_with = self.name if self.name != name else f"{self.name} of checksum {self.sha256[:12]}"
            loaded = name if self.name != name else f"the loaded {sha256[:12]}"
            raise ModelError(
                f"{where}: embeddings were made with {made_with}, not {loaded}; "
                "write to another output, delete it, or pass the --model it was made with"
            )


@dataclass(frozen=True, slots=True)
class Stat:
    bytes: int
    mtime: float


def stat_of(path: str) -> Stat | None:
    """The (bytes, mtime) of the file ``path`` names; a container member's (``shard.tar#KEY``) has its
    container's, as its rows record it (see :class:`clipcli.images.refs.Decoded`)."""
    try:
        st = os.stat(path)
    except OSError:
        container = container_of(path)
        if container is None:
            return None
        try:
            st = os.stat(container)
        except OSError:
            return None
    return Stat(st.st_size, st.st_mtime)


# Columns a row may fill or leave empty (null), after the ones every row has: what people filter on
# (``rank --where``, the search page), read from the file as it is decoded (see Decoded.meta).
# folder: the folder of the row's file (of its container, for a member); taken: the capture time
# (EXIF DateTimeOriginal, else mtime); t: a video frame's time in seconds; caption: a WebDataset
# sample's text. Datasets written before these columns existed keep their own columns (adopt_columns).
META_COLUMNS = ("folder", "taken", "camera_make", "camera_model", "gps_lat", "gps_lon", "t", "caption")


def _meta_type(name: str) -> pa.DataType:
    import pyarrow as pa

    if name == "taken":
        return pa.timestamp("ms")
    return pa.float64() if name in ("gps_lat", "gps_lon", "t") else pa.string()


def schema(dim: int, dtype: str, tag: ModelTag) -> pa.Schema:
    import pyarrow as pa

    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("path", pa.string()),
            ("embedding", pa.list_(value, dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("bytes", pa.int64()),
            ("mtime", pa.float64()),
            ("model", pa.string()),
            *((name, _meta_type(name)) for name in META_COLUMNS),
        ],
        metadata=tag.metadata(),
    )


def text_schema(dim: int, dtype: str, tag: ModelTag) -> pa.Schema:
    """``embed --text``'s rows: each text and its vector, with the model that made them, as images' rows."""
    import pyarrow as pa

    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([("text", pa.string()), ("embedding", pa.list_(value, dim))], metadata=tag.metadata())


def columns_as_found(wanted: pa.Schema, found: pa.Schema | None) -> pa.Schema:
    """``wanted`` without the metadata columns a dataset written before them lacks (``found``: the
    schema of one of its parts): new parts match the old ones."""
    if found is None:
        return wanted
    drop = [i for i, f in enumerate(wanted) if f.name in META_COLUMNS and f.name not in found.names]
    for i in reversed(drop):
        wanted = wanted.remove(i)
    return wanted


@dataclass
class Rows:
    """A batch of embedded images, column-wise."""

    paths: list[str]
    embeddings: np.ndarray  # N x D
    sizes: list[tuple[int, int]]
    stats: list[Stat]
    meta: list[dict[str, Any]] | None = None  # per row: values of META_COLUMNS (None: all empty)

    def table(self, sch: pa.Schema, model: str) -> pa.Table:
        import numpy as np
        import pyarrow as pa

        value_type = sch.field("embedding").type.value_type
        dim = sch.field("embedding").type.list_size
        flat = arrow_array(np.ascontiguousarray(self.embeddings, np.float32).reshape(-1)).cast(value_type)
        return pa.table(
            {
                "path": arrow_strings(self.paths),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
                "width": arrow_array(np.array([w for w, _ in self.sizes], np.int32)),
                "height": arrow_array(np.array([h for _, h in self.sizes], np.int32)),
                "bytes": arrow_array(np.array([s.bytes for s in self.stats], np.int64)),
                "mtime": arrow_array(np.array([s.mtime for s in self.stats], np.float64)),
                "model": arrow_strings([model] * len(self.paths)),
                **{f.name: self.meta_column(f.name, f.type) for f in sch if f.name in META_COLUMNS},
            },
            schema=sch,
        )

    def meta_column(self, name: str, kind: pa.DataType) -> pa.Array:
        meta = self.meta or [{}] * len(self.paths)
        if name == "folder":
            values = [m.get("folder", os.path.dirname(p)) for m, p in zip(meta, self.paths, strict=True)]
        else:
            values = [m.get(name) for m in meta]
        return arrow_nullable(values, kind)


# Arrays are built from their buffers because pa.array() imports pandas on first use (to recognise
# pandas inputs): peak memory and start-up time that an embedding run never needs.
def arrow_array(values: np.ndarray) -> pa.Array:
    """A 1-d numeric numpy array as an Arrow array, sharing its memory."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def arrow_strings(values: Sequence[str]) -> pa.Array:
    """Python strings as an Arrow string array (UTF-8 bytes and their offsets)."""
    import numpy as np
    import pyarrow as pa

    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return pa.StringArray.from_buffers(len(encoded), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded)))


def arrow_nullable(values: Sequence[Any], kind: pa.DataType) -> pa.Array:
    """Strings, floats or naive datetimes (None: null) as an Arrow array of ``kind``, without pa.array."""
    import datetime

    import numpy as np
    import pyarrow as pa

    valid = np.array([v is not None for v in values], bool)
    bits = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    nulls = len(values) - int(valid.sum())
    if pa.types.is_string(kind):
        strings = arrow_strings(["" if v is None else str(v) for v in values])
        return pa.StringArray.from_buffers(len(values), strings.buffers()[1], strings.buffers()[2], bits, nulls)
    if pa.types.is_timestamp(kind):
        epoch = datetime.datetime(1970, 1, 1)
        ms = [0 if v is None else round((v - epoch).total_seconds() * 1000) for v in values]
        data = np.array(ms, np.int64)
    else:
        data = np.array([0.0 if v is None else float(v) for v in values], np.float64)
    return pa.Array.from_buffers(kind, len(values), [bits, pa.py_buffer(data)], nulls)
