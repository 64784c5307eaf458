"""Embedding images or texts into files: the work behind ``clipcli embed``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.atomic import OutputLock, is_stream, real_path, remove_temporaries
from clipcli.images.core import DEFAULT_MAX_PIXELS, ImageRef, Skipped
from clipcli.models import LoadedModel
from clipcli.store.dataset import ModelTag, ParquetStore, Rows, Stat, npy_sidecar, schema, stat_of, write_npy
from clipcli.store.formats import OutputFormat, ParquetWriter, RowWriter, keep_partial, open_writer, parquet_storable
from clipcli.store.remote import RemoteStore, parquet_store
from clipcli.zeroshot.encode import EmbeddedBatch, encode_texts, iter_image_embeddings
from clipcli.zeroshot.prompts import TemplateSet

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from clipcli.store.shard import Shard


@dataclass
class EmbedSummary:
    embedded: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0


def model_tag(lm: LoadedModel, normalized: bool) -> ModelTag:
    return ModelTag(lm.name, lm.checksum, normalized)


def iter_rows(
    lm: LoadedModel,
    refs: Sequence[ImageRef],
    batch_size: int,
    workers: int,
    exact: bool,
    normalize: bool,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decode: str = "auto",
) -> Iterator[tuple[Rows, list[Skipped]]]:
    embedded = iter_image_embeddings(
        lm, refs, batch_size, workers, exact, normalize, max_pixels=max_pixels, decode=decode
    )
    for batch in embedded:
        yield fresh_rows(batch, refs)


CHANGED = "changed while it was embedded; run again to embed it as it is now"


def fresh_rows(batch: EmbeddedBatch, refs: Sequence[ImageRef]) -> tuple[Rows, list[Skipped]]:
    """The rows of an embedded batch whose file is still the one decoded, with its stat as decoded.

    Each row's size and mtime were taken from the open file before decoding (``fstat``); a file whose
    stat has changed since was rewritten meanwhile, and storing the old picture's embedding under it
    would make every rerun call it unchanged. Such files are reported (skipped) and not stored, so the
    next run embeds them. Batches decoded on the GPU carry no stat: theirs is read now."""
    files = [refs[i].file for i in batch.indices]
    now = [stat_of(str(f)) for f in files]
    decoded = [Stat(*s) for s in batch.stats] if batch.stats is not None else now
    keep = [
        i for i, (then, current) in enumerate(zip(decoded, now, strict=True)) if then is not None and then == current
    ]
    if len(keep) == len(files):
        stats = [s or Stat(0, 0.0) for s in decoded]
        return Rows(batch.names, batch.embeddings.numpy(), batch.sizes, stats), batch.skipped
    kept = set(keep)
    skipped = [*batch.skipped, *(Skipped(batch.names[i], CHANGED) for i in range(len(files)) if i not in kept)]
    rows = Rows(
        [batch.names[i] for i in keep],
        batch.embeddings.numpy()[keep],
        [batch.sizes[i] for i in keep],
        [decoded[i] or Stat(0, 0.0) for i in keep],
    )
    return rows, skipped


def _flat_rows(key: str, names: Sequence[str], embeddings: np.ndarray, fmt: OutputFormat) -> list[dict[str, Any]]:
    if fmt is OutputFormat.CSV:
        columns = [f"e{i}" for i in range(embeddings.shape[1])]
        return [
            {key: n, **dict(zip(columns, map(float, e), strict=True))} for n, e in zip(names, embeddings, strict=True)
        ]
    return [{key: n, "embedding": [float(x) for x in e]} for n, e in zip(names, embeddings, strict=True)]


def embed_images(
    lm: LoadedModel,
    refs: Sequence[ImageRef],
    fmt: OutputFormat,
    output: str | None,
    *,
    dtype: str = "float32",
    normalize: bool = True,
    batch_size: int = 32,
    workers: int = 0,
    exact: bool = False,
    part_size: int = 4096,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_skip: Callable[[Skipped], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    shard: Shard | None = None,
    decode: str = "auto",
    prune: bool = False,
) -> EmbedSummary:
    """Embed images into ``output``; Parquet outputs are incremental (see :mod:`clipcli.store.dataset`).

    ``prune`` lets an incremental run remove more than :data:`clipcli.store.dataset.PRUNE_SHARE` of the rows
    (of files gone or changed); without it such a run is refused before the first image.

    The output is locked and checked writable before the first image; whatever happens after that,
    the rows embedded so far are written (see :class:`clipcli.store.formats.RowWriter` for single files).
    """
    summary = EmbedSummary()
    tag = model_tag(lm, normalize)
    sch = schema(lm.embed_dim, dtype, tag)
    if fmt is OutputFormat.PARQUET:
        refs, unstorable = parquet_storable(refs)
        for s in unstorable:
            summary.skipped += 1
            if on_skip:
                on_skip(s)
    sink: _Sink
    if fmt is OutputFormat.PARQUET and output not in (None, "-") and not is_stream(Path(output or "")):
        store = parquet_store(output, sch, lm.name, part_rows=part_size, shard=shard)
        store.prune = prune
        store.open()
        try:
            plan = store.plan(refs)
        except BaseException:
            store.release()
            raise
        refs, summary.unchanged = plan.to_embed, plan.unchanged
        sink = _StoreSink(store)
    elif fmt is OutputFormat.NPY:
        sink = _NpySink(Path(output or ""), tag, dtype, lm.embed_dim)
    elif fmt is OutputFormat.PARQUET:
        sink = _WriterSink(open_writer(fmt, output, schema=sch), sch, lm.name, dtype, fmt)
    else:
        columns = ["path", *(f"e{i}" for i in range(lm.embed_dim))]
        sink = _WriterSink(open_writer(fmt, output, columns=columns), sch, lm.name, dtype, fmt)
    if on_plan:
        on_plan(len(refs))

    try:
        for rows, skipped in iter_rows(lm, refs, batch_size, workers, exact, normalize, max_pixels, decode):
            for s in skipped:
                summary.skipped += 1
                if on_skip:
                    on_skip(s)
            sink.add(rows)
            summary.embedded += len(rows.paths)
            if on_batch:
                on_batch(len(rows.paths) + len(skipped))
    except BaseException as e:
        # Errors, Ctrl-C and SIGTERM alike: everything embedded so far is kept, unless writing failed.
        sink.finish(keep_partial(e, summary.embedded))
        raise
    summary.removed = sink.finish(True)
    return summary


class _Sink:
    """Where embedded rows go; ``finish(keep)`` ends the run, writing what it has when ``keep``."""

    def add(self, rows: Rows) -> None:
        raise NotImplementedError

    def finish(self, keep: bool) -> int:
        raise NotImplementedError


class _StoreSink(_Sink):
    def __init__(self, store: ParquetStore | RemoteStore) -> None:
        self.store = store

    def add(self, rows: Rows) -> None:
        self.store.add(rows)

    def finish(self, keep: bool) -> int:
        if not keep:
            self.store.release()
            return 0
        return self.store.finish()


class _NpySink(_Sink):
    """Rows gathered in memory and written once, as a matrix and its sidecar, under the output's lock."""

    def __init__(self, path: Path, tag: ModelTag, dtype: str, dim: int) -> None:
        self.path, self.tag, self.dtype, self.dim = path, tag, dtype, dim
        self.lock = OutputLock(path, is_dir=False)
        self.sidecar_lock = OutputLock(npy_sidecar(path), is_dir=False)  # written too: no one else may
        remove_temporaries(real_path(path))
        remove_temporaries(real_path(npy_sidecar(path)))
        self.parts: list[np.ndarray] = []
        self.names: list[str] = []

    def add(self, rows: Rows) -> None:
        import numpy as np

        self.parts.append(rows.embeddings.astype(np.float16) if self.dtype == "float16" else rows.embeddings)
        self.names.extend(rows.paths)

    def finish(self, keep: bool) -> int:
        import numpy as np

        try:
            if keep:
                empty = np.empty((0, self.dim), np.dtype(self.dtype))
                matrix = np.concatenate(self.parts) if self.parts else empty
                write_npy(self.path, matrix, self.names, self.tag)
        finally:
            self.sidecar_lock.release()
            self.lock.release()
        return 0


class _WriterSink(_Sink):
    def __init__(self, writer: RowWriter, sch: pa.Schema, model: str, dtype: str, fmt: OutputFormat) -> None:
        self.writer, self.schema, self.model, self.dtype, self.fmt = writer, sch, model, dtype, fmt

    def add(self, rows: Rows) -> None:
        import numpy as np

        if isinstance(self.writer, ParquetWriter):
            self.writer.write_table(rows.table(self.schema, self.model))
        else:
            embeddings = rows.embeddings.astype(np.float16) if self.dtype == "float16" else rows.embeddings
            self.writer.write(_flat_rows("path", rows.paths, embeddings, self.fmt))

    def finish(self, keep: bool) -> int:
        if keep:
            self.writer.close()
        else:
            self.writer.abort()
        return 0


def embed_text_list(
    lm: LoadedModel,
    texts: Sequence[str],
    templates: TemplateSet | None,
    fmt: OutputFormat,
    output: str | None,
    dtype: str = "float32",
    normalize: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Embed texts (through a template ensemble if given); one row per text, keyed ``text``.

    ``on_progress`` gets the number of prompts encoded after each batch (texts x templates in all).
    """
    import numpy as np
    import pyarrow as pa

    from clipcli.zeroshot.prompts import zero_shot_classifier

    if templates is not None:
        matrix = zero_shot_classifier(lm, texts, templates, on_progress=on_progress).numpy()
    else:
        matrix = encode_texts(lm, texts, normalize=normalize, on_progress=on_progress).numpy()
    if dtype == "float16":
        matrix = matrix.astype(np.float16)
    if fmt is OutputFormat.NPY:
        path = Path(output or "")
        with OutputLock(path, is_dir=False), OutputLock(npy_sidecar(path), is_dir=False):
            write_npy(path, matrix, texts, model_tag(lm, normalize or templates is not None), key="text")
        return len(texts)
    columns = ["text", *(f"e{i}" for i in range(matrix.shape[1]))]
    with open_writer(fmt, output, columns=columns) as writer:
        if isinstance(writer, ParquetWriter):
            value = pa.float16() if dtype == "float16" else pa.float32()
            flat = pa.array(matrix.astype(np.float32).reshape(-1)).cast(value)
            emb = pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])
            writer.write_table(pa.table({"text": pa.array(list(texts), pa.string()), "embedding": emb}))
        else:
            writer.write(_flat_rows("text", texts, matrix, fmt))
    return len(texts)
