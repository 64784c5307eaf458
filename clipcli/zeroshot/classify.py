"""Zero-shot classification: softmax over labels of ``logit_scale`` x cosine similarity."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipcli.images.core import DEFAULT_MAX_PIXELS, ImageRef, Skipped
from clipcli.models import LoadedModel
from clipcli.zeroshot.encode import iter_image_embeddings
from clipcli.zeroshot.prompts import TemplateSet, zero_shot_classifier, zero_shot_probabilities

if TYPE_CHECKING:
    import pyarrow as pa


PREDICTION_COLUMNS = ("path", "rank", "label", "score")


def prediction_schema() -> pa.Schema:
    """The Parquet columns of :meth:`Prediction.rows`, so that a run with no rows still has them."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("rank", pa.int64()), ("label", pa.string()), ("score", pa.float64())])


@dataclass(frozen=True)
class Prediction:
    path: str
    labels: tuple[str, ...]  # best first
    scores: tuple[float, ...]

    def rows(self) -> list[dict[str, Any]]:
        """Tidy rows: one per rank (rank 1 = best)."""
        return [
            {"path": self.path, "rank": r, "label": label, "score": score}
            for r, (label, score) in enumerate(zip(self.labels, self.scores, strict=True), start=1)
        ]

    def record(self) -> dict[str, Any]:
        preds = [{"label": lab, "score": s} for lab, s in zip(self.labels, self.scores, strict=True)]
        return {"path": self.path, "predictions": preds}


def classify_images(
    lm: LoadedModel,
    refs: Sequence[ImageRef],
    labels: Sequence[str],
    templates: TemplateSet,
    top_k: int = 5,
    batch_size: int = 32,
    workers: int = 0,
    exact: bool = False,
    on_batch: Callable[[int], None] | None = None,
    on_prompts: Callable[[int], None] | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[Prediction | Skipped]:
    """Predictions in input order; unreadable images come back as :class:`Skipped`.

    ``on_prompts`` follows the encoding of the labels x templates prompts, before the first image.
    """
    import torch

    classifier = zero_shot_classifier(lm, labels, templates, on_progress=on_prompts)
    k = min(top_k, len(labels))
    for batch in iter_image_embeddings(lm, refs, batch_size, workers, exact, max_pixels=max_pixels):
        yield from batch.skipped
        if batch.names:
            probs = zero_shot_probabilities(lm, batch.embeddings, classifier)
            top = torch.topk(probs, k, dim=-1)
            for path, scores, idx in zip(batch.names, top.values.tolist(), top.indices.tolist(), strict=True):
                yield Prediction(path, tuple(labels[i] for i in idx), tuple(scores))
        if on_batch:
            on_batch(len(batch.names) + len(batch.skipped))
