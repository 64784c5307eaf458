"""The local engine: images (or texts) embedded in this process, into a file, a stream or a dataset
directory (see :mod:`clipcli.engines.base` for the contract and the bookkeeping it shares with Ray)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

from clipcli.engines.base import DatasetJob, EmbedJob, Engine, OnBatch, Run, Sink, model_tag
from clipcli.errors import InputError
from clipcli.images.decode import DEFAULT_MAX_PIXELS
from clipcli.images.sources import ImageRef, Skipped
from clipcli.images.video import has_frames
from clipcli.models import LoadedModel
from clipcli.store.formats import OutputFormat, ParquetWriter, RowWriter
from clipcli.store.output import Layout, NpyWriter, Output, open_writer
from clipcli.store.parts import Rows, Stat, stat_of
from clipcli.store.rows import text_schema
from clipcli.zeroshot.encode import EmbeddedBatch, encode_texts, iter_image_embeddings
from clipcli.zeroshot.prompts import TemplateSet

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from clipcli.evaluation.run import ImageEmbeddings


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
    meta = batch.meta
    if len(keep) == len(files):
        stats = [s or Stat(0, 0.0) for s in decoded]
        return Rows(batch.names, batch.embeddings.numpy(), batch.sizes, stats, meta), batch.skipped
    kept = set(keep)
    skipped = [*batch.skipped, *(Skipped(batch.names[i], CHANGED) for i in range(len(files)) if i not in kept)]
    rows = Rows(
        [batch.names[i] for i in keep],
        batch.embeddings.numpy()[keep],
        [batch.sizes[i] for i in keep],
        [decoded[i] or Stat(0, 0.0) for i in keep],
        None if meta is None else [meta[i] for i in keep],
    )
    return rows, skipped


def _flat_rows(
    key: str, names: Sequence[str], embeddings: np.ndarray, fmt: OutputFormat, times: Sequence[float | None] = ()
) -> list[dict[str, Any]]:
    """Rows of CSV (a column per dimension) or JSONL (an ``embedding`` list); with ``times``, each row's
    video time ``t`` after its name (None for an image: an empty cell, a JSON null)."""
    head: list[dict[str, Any]] = [{key: n} for n in names]
    if times:
        head = [{**h, "t": t} for h, t in zip(head, times, strict=True)]
    if fmt is OutputFormat.CSV:
        columns = [f"e{i}" for i in range(embeddings.shape[1])]
        return [{**h, **dict(zip(columns, map(float, e), strict=True))} for h, e in zip(head, embeddings, strict=True)]
    return [{**h, "embedding": [float(x) for x in e]} for h, e in zip(head, embeddings, strict=True)]


def row_times(rows: Rows) -> list[float | None]:
    """Each row's video time (``t``), None for an image."""
    return [m.get("t") for m in rows.meta] if rows.meta is not None else [None] * len(rows.paths)


class LocalEngine(Engine):
    """This process: decoding and the model side by side (see :func:`clipcli.zeroshot.encode.iter_image_embeddings`)."""

    name = "local"
    layouts = frozenset({Layout.CLIP_RETRIEVAL})

    def file_sink(self, lm: LoadedModel, job: EmbedJob, sch: pa.Schema) -> Sink:
        out = job.output
        frames = has_frames(job.refs)  # a video's frames: a `t` column beside the path
        columns = ["path", *(["t"] if frames else []), *(f"e{i}" for i in range(lm.embed_dim))]
        tag = model_tag(lm, job.normalize)
        writer = open_writer(out, schema=sch, columns=columns, tag=tag, dim=lm.embed_dim, dtype=job.dtype)
        return WriterSink(writer, sch, lm.name, job.dtype, out.format, frames)

    def run(self, lm: LoadedModel, job: EmbedJob, refs: Sequence[ImageRef], sink: Sink, run: Run) -> None:
        im = job.images
        for rows, skipped in iter_rows(
            lm, refs, im.batch_size, im.workers, im.exact, job.normalize, im.max_pixels, im.decode
        ):
            for s in skipped:
                run.skip(s)
            sink.add(rows)
            run.batch(len(rows.paths), len(rows.paths) + len(skipped))

    def embed_dataset(self, lm: LoadedModel, job: DatasetJob, on_batch: OnBatch = None) -> ImageEmbeddings:
        from clipcli.evaluation.run import embed_dataset

        im = job.images
        return embed_dataset(lm, job.source, im.batch_size, im.workers, im.exact, on_batch, im.max_pixels)


class WriterSink(Sink):
    """One file or stream, in any format (NPY's matrix gathered and written at the end). With ``frames``
    (a video among the inputs) CSV and JSONL rows carry ``t`` after the path, and NPY's sidecar names a
    frame as ``{"path": ..., "t": ...}``; without, they are as they always were."""

    def __init__(
        self, writer: RowWriter, sch: pa.Schema, model: str, dtype: str, fmt: OutputFormat, frames: bool = False
    ) -> None:
        self.writer, self.schema, self.model, self.dtype, self.fmt = writer, sch, model, dtype, fmt
        self.frames = frames

    def add(self, rows: Rows) -> None:
        import numpy as np

        if isinstance(self.writer, ParquetWriter):
            self.writer.write_table(rows.table(self.schema, self.model))
        elif isinstance(self.writer, NpyWriter):
            names: list[Any] = list(rows.paths)
            if self.frames:  # the sidecar takes JSON objects too (clipcli.store.npy.write_npy)
                names = [n if t is None else {"path": n, "t": t} for n, t in zip(names, row_times(rows), strict=True)]
            self.writer.write_matrix(names, rows.embeddings)
        else:
            embeddings = rows.embeddings.astype(np.float16) if self.dtype == "float16" else rows.embeddings
            times = row_times(rows) if self.frames else []
            self.writer.write(_flat_rows("path", rows.paths, embeddings, self.fmt, times))

    def finish(self, keep: bool) -> int:
        if keep:
            self.writer.close()
        else:
            self.writer.abort()
        return 0


def collect_texts(inputs: Sequence[str], texts_file: str | None, stdin: IO[str] | None = None) -> list[str]:
    """``embed --text``'s texts: the arguments (``-``: stdin's lines), then ``--texts-file``'s lines."""
    from clipcli.zeroshot.prompts import read_lines

    lines = stdin or sys.stdin
    texts = [t for arg in inputs for t in (lines.read().splitlines() if arg == "-" else [arg])]
    texts = [t.strip() for t in texts if t.strip()]
    if texts_file:
        texts += read_lines(texts_file, "texts")
    if not texts:
        raise InputError("no texts: pass them as arguments, with --texts-file, or on stdin with -")
    return texts


def embed_texts(
    lm: LoadedModel,
    texts: Sequence[str],
    templates: TemplateSet | None,
    out: Output,
    dtype: str = "float32",
    normalize: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Embed texts (through a template ensemble if given) into ``out``; one row per text, keyed ``text``.

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
    columns = ["text", *(f"e{i}" for i in range(matrix.shape[1]))]
    tag = model_tag(lm, normalize or templates is not None)
    sch = text_schema(matrix.shape[1], dtype, tag)
    with open_writer(out, columns=columns, tag=tag, dim=matrix.shape[1], dtype=dtype, key="text", schema=sch) as writer:
        if isinstance(writer, NpyWriter):
            writer.write_matrix(texts, matrix)
        elif isinstance(writer, ParquetWriter):
            flat = pa.array(matrix.astype(np.float32).reshape(-1)).cast(sch.field("embedding").type.value_type)
            emb = pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])
            writer.write_table(pa.table({"text": pa.array(list(texts), pa.string()), "embedding": emb}, schema=sch))
        else:
            writer.write(_flat_rows("text", texts, matrix, out.format))
    return len(texts)
