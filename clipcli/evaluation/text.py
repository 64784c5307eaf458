"""`eval` on texts: a CSV/Parquet manifest with ``text`` and ``label`` columns, scored by NLI models.

The metrics and the report are image classification's (acc1, acc5, mean per-class recall, per-class
precision and recall, the confusion matrix), so that hypothesis templates can be compared side by side
as image templates are. Each hypothesis is its own run: NLI models score one hypothesis per pair, and
there is no ensemble to average.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.errors import InputError
from clipcli.evaluation.run import EvalResult, classification_metrics, scored_predictions
from clipcli.models.nli import NliModel
from clipcli.text.nli import iter_scores

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class LabelledTexts:
    name: str  # "texts:PATH" in reports
    rows: list[int]  # 1-based data rows of the manifest
    texts: list[str]
    targets: list[int]
    classes: list[str]  # natural order, as image manifests order them

    def __len__(self) -> int:
        return len(self.texts)


def is_text_manifest(path: Path) -> bool:
    """A CSV/Parquet file with ``text`` and ``label`` columns and no image column (``path``/``image``)."""
    if not path.is_file() or path.suffix.lower() not in MANIFEST_SUFFIXES:
        return False
    try:
        columns = set(_columns(path))
    except Exception:  # unreadable: the image manifest reader reports it
        return False
    return {"text", "label"} <= columns and not ({"path", "image"} & columns)


def _columns(path: Path) -> list[str]:
    if path.suffix.lower() == ".csv":
        import pandas as pd

        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(path).schema_arrow.names)


def text_manifest(path: Path) -> LabelledTexts:
    """Every row's text and label; an empty cell is an error naming its row, as in image manifests."""
    import pandas as pd

    from clipcli.evaluation.datasets import manifest_cells
    from clipcli.images.sources import natural_key

    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=["text", "label"])
        else:
            frame = pd.read_parquet(path, columns=["text", "label"])
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read manifest ({str(e).splitlines()[0]})") from e
    if frame.empty:
        raise InputError(f"{path}: no rows")
    texts = [t.strip() for t in manifest_cells(path, frame["text"], "text")]
    labels = [label.strip() for label in manifest_cells(path, frame["label"], "label")]
    classes = sorted(set(labels), key=natural_key)
    if len(classes) < 2:
        raise InputError(f"{path}: every row has the label {classes[0]!r}; zero-shot accuracy needs two or more")
    index = {c: i for i, c in enumerate(classes)}
    return LabelledTexts(
        name=f"texts:{path}",
        rows=list(range(1, len(texts) + 1)),
        texts=texts,
        targets=[index[label] for label in labels],
        classes=classes,
    )


def limit_texts(data: LabelledTexts, n: int | None, seed: int) -> LabelledTexts:
    """A random subset of ``n`` rows (the same rows ``eval --limit`` picks for images), in manifest order."""
    if n is None or n >= len(data):
        return data
    keep = sorted(random.Random(seed).sample(range(len(data)), n))
    return replace(
        data,
        rows=[data.rows[i] for i in keep],
        texts=[data.texts[i] for i in keep],
        targets=[data.targets[i] for i in keep],
    )


def text_classification_result(
    nm: NliModel,
    data: LabelledTexts,
    hypothesis: str,
    batch_size: int,
    on_progress: Callable[[float], None] | None = None,
) -> EvalResult:
    """Metrics of one hypothesis template: each text's single-label scores over the classes."""
    start = time.perf_counter()
    rows = list(iter_scores(nm, data.texts, data.classes, hypothesis, batch_size=batch_size, on_progress=on_progress))
    scores = np.stack(rows) if rows else np.empty((0, len(data.classes)), np.float32)
    seconds = time.perf_counter() - start
    return classification_metrics(
        scores,
        np.array(data.targets, dtype=np.int64),
        data.classes,
        EvalResult(
            model=nm.name,
            model_sha256=nm.checksum,
            templates=hypothesis,
            n_templates=1,
            dataset=data.name,
            n=len(data),
            n_skipped=0,
            metrics={},
            device=str(nm.device),
            precision=nm.precision,
            timings={"text_scoring_s": seconds},
        ),
        ids=[str(r) for r in data.rows],
    )


PREDICTION_COLUMNS = ("model", "hypothesis", "row", "text", "true_label", "predicted_label", "score", "true_rank")


def prediction_rows(result: EvalResult, data: LabelledTexts) -> list[dict[str, Any]]:
    """One row per text: the manifest row and the text itself, where image predictions have a path."""
    return [
        {"model": result.model, "hypothesis": result.templates, "row": data.rows[i], "text": data.texts[i], **scored}
        for i, (_, scored) in enumerate(scored_predictions(result))
    ]
