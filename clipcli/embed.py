"""Embedding images or texts into files: the work behind ``clipcli embed``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.encode import encode_texts, iter_image_embeddings
from clipcli.images import ImageRef, Skipped
from clipcli.io import OutputFormat, open_writer
from clipcli.models import LoadedModel
from clipcli.prompts import TemplateSet
from clipcli.store import ModelTag, ParquetStore, Rows, Stat, schema, stat_of, write_npy

if TYPE_CHECKING:
    import numpy as np


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
) -> Iterator[tuple[Rows, list[Skipped]]]:
    for batch in iter_image_embeddings(lm, refs, batch_size, workers, exact, normalize):
        stats = [stat_of(path) or Stat(0, 0.0) for path in batch.names]
        rows = Rows(batch.names, batch.embeddings.numpy(), batch.sizes, stats)
        yield rows, batch.skipped


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
    on_skip: Callable[[Skipped], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> EmbedSummary:
    """Embed images into ``output``; Parquet outputs are incremental (see :mod:`clipcli.store`)."""
    import numpy as np

    summary = EmbedSummary()
    store = None
    if fmt is OutputFormat.PARQUET and output not in (None, "-"):
        sch = schema(lm.architecture.embed_dim, dtype, model_tag(lm, normalize))
        store = ParquetStore(Path(output), sch, lm.name, part_rows=part_size)
        store.open()
        plan = store.plan(refs)
        refs, summary.unchanged = plan.to_embed, plan.unchanged
    if on_plan:
        on_plan(len(refs))

    npy_parts: list[np.ndarray] = []
    npy_paths: list[str] = []
    writer = None if store or fmt is OutputFormat.NPY else open_writer(fmt, output)
    try:
        for rows, skipped in iter_rows(lm, refs, batch_size, workers, exact, normalize):
            for s in skipped:
                summary.skipped += 1
                if on_skip:
                    on_skip(s)
            embeddings = rows.embeddings.astype(np.float16) if dtype == "float16" else rows.embeddings
            if store:
                store.add(rows)
            elif fmt is OutputFormat.NPY:
                npy_parts.append(embeddings)
                npy_paths.extend(rows.paths)
            elif fmt is OutputFormat.PARQUET:
                sch = schema(lm.architecture.embed_dim, dtype, model_tag(lm, normalize))
                writer.write_table(rows.table(sch, lm.name))  # type: ignore[union-attr]
            else:
                writer.write(_flat_rows("path", rows.paths, embeddings, fmt))  # type: ignore[union-attr]
            summary.embedded += len(rows.paths)
            if on_batch:
                on_batch(len(rows.paths) + len(skipped))
    finally:
        # Also on errors and Ctrl-C: everything embedded so far is kept.
        if store:
            summary.removed = store.finish()
        elif fmt is OutputFormat.NPY:
            dim = lm.architecture.embed_dim
            matrix = np.concatenate(npy_parts) if npy_parts else np.empty((0, dim), np.dtype(dtype))
            write_npy(Path(output or "embeddings.npy"), matrix, npy_paths)
        elif writer is not None:
            writer.close()
    return summary


def embed_text_list(
    lm: LoadedModel,
    texts: Sequence[str],
    templates: TemplateSet | None,
    fmt: OutputFormat,
    output: str | None,
    dtype: str = "float32",
    normalize: bool = True,
) -> int:
    """Embed texts (through a template ensemble if given); one row per text, keyed ``text``."""
    import numpy as np
    import pyarrow as pa

    from clipcli.prompts import zero_shot_classifier

    if templates is not None:
        matrix = zero_shot_classifier(lm, texts, templates).numpy()
    else:
        matrix = encode_texts(lm, texts, normalize=normalize).numpy()
    if dtype == "float16":
        matrix = matrix.astype(np.float16)
    if fmt is OutputFormat.NPY:
        write_npy(Path(output or "texts.npy"), matrix, texts)
        return len(texts)
    with open_writer(fmt, output) as writer:
        if fmt is OutputFormat.PARQUET:
            value = pa.float16() if dtype == "float16" else pa.float32()
            flat = pa.array(matrix.astype(np.float32).reshape(-1)).cast(value)
            emb = pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])
            writer.write_table(pa.table({"text": pa.array(list(texts), pa.string()), "embedding": emb}))  # type: ignore[attr-defined]
        else:
            writer.write(_flat_rows("text", texts, matrix, fmt))
    return len(texts)
