"""Zero-shot classification: softmax over labels of ``logit_scale`` x cosine similarity."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from clipcli.images.decode import DEFAULT_MAX_PIXELS
from clipcli.images.sources import ImageRef, Skipped
from clipcli.models import LoadedModel, ModelOptions
from clipcli.zeroshot.encode import iter_image_embeddings
from clipcli.zeroshot.prompts import TemplateSet, zero_shot_classifier, zero_shot_probabilities
from clipcli.zeroshot.timeline import Segment, Timeline

if TYPE_CHECKING:
    import pyarrow as pa

    from clipcli.images.decode import ImageOptions


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


@dataclass(frozen=True)
class ClassifyHooks:
    """What a run of :func:`run_classify` tells its caller: ``load`` loads the model; ``on_skip`` hears of
    each image left out; ``storable`` splits off the images the output cannot name (none by default);
    ``prompts_progress(total)`` and ``images_progress(total)`` give callbacks counting prompts encoded and
    images done (read or skipped)."""

    load: Callable[[ModelOptions], LoadedModel]
    on_skip: Callable[[Skipped], None]
    prompts_progress: Callable[[int], AbstractContextManager[Callable[[int], None]]]
    images_progress: Callable[[int], AbstractContextManager[Callable[[int], None]]]
    storable: Callable[[list[ImageRef]], tuple[list[ImageRef], list[Skipped]]] | None = None
    stdin: IO[str] | None = None


@dataclass(frozen=True)
class ClassifyResult:
    classified: int
    scoring: str  # the model's: with one label, a softmax scores every image 1.0
    frames: int = 0  # of the images classified, how many were a video's frames


# Opens the output once the inputs are known: with True (a video among them) for a timeline's segments
# (:class:`clipcli.zeroshot.timeline.Segment`), else for predictions; gives the function that writes one.
OpenOutput = Callable[[bool], AbstractContextManager[Callable[["Prediction | Segment"], None]]]


def run_classify(
    inputs: Sequence[str],
    labels: Sequence[str],
    templates: TemplateSet,
    top_k: int,
    models: ModelOptions,
    images: ImageOptions,
    hooks: ClassifyHooks,
    output: OpenOutput,
) -> ClassifyResult:
    """Find the images, open the output, load the model, and write each prediction, in input order; with
    a video among the inputs, a timeline (:mod:`clipcli.zeroshot.timeline`): each video's segments, and
    each image as a segment of its own."""
    from clipcli.images.sources import discover, found_nothing, nothing_found
    from clipcli.images.video import has_frames

    refs, missing = discover(inputs, hooks.stdin, images.containers)
    if hooks.storable is not None:
        refs, unstorable = hooks.storable(refs)
        missing += unstorable
    if found_nothing(refs, missing):
        raise nothing_found(inputs, missing)
    for m in missing:
        hooks.on_skip(m)
    timeline = Timeline() if has_frames(refs) else None
    with output(timeline is not None) as write:
        lm = hooks.load(models)
        n_ok = n_frames = 0
        n_prompts = len(labels) * len(templates.templates)
        with hooks.prompts_progress(n_prompts) as on_prompts, hooks.images_progress(len(refs)) as on_batch:
            predictions = classify_images(
                lm,
                refs,
                labels,
                templates,
                top_k,
                images.batch_size,
                images.workers,
                images.exact,
                on_batch,
                on_prompts,
                max_pixels=images.max_pixels,
            )
            for item in predictions:
                if not isinstance(item, Prediction):
                    hooks.on_skip(item)
                    continue
                n_ok += 1
                if timeline is None:
                    write(item)
                    continue
                for segment in timeline.add(item.path, item.labels, item.scores):
                    n_frames += segment.frames if segment.start is not None else 0
                    write(segment)
            for segment in timeline.close() if timeline is not None else ():
                n_frames += segment.frames
                write(segment)
    return ClassifyResult(n_ok, lm.scoring, n_frames)
