"""Zero-shot evaluation: models x template sets over one dataset, with a cached text classifier.

Image embeddings are computed once per model and reused for every template set; the zero-shot
classifier (one averaged text embedding per class) is cached on disk, keyed by the model file's
checksum, the templates and the class names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli import __version__
from clipcli.atomic import atomic_write
from clipcli.cache import cache_dir
from clipcli.errors import OutputError
from clipcli.evaluation.datasets import CaptionPairs, LabelledImages
from clipcli.evaluation.metrics import confusion_matrix, per_class, retrieval_recall, topk_accuracy, true_label_rank
from clipcli.images.batches import iter_array_batches, iter_batches
from clipcli.images.decode import DEFAULT_MAX_PIXELS
from clipcli.images.sources import Skipped
from clipcli.models import LoadedModel
from clipcli.zeroshot.prompts import TemplateSet, zero_shot_classifier, zero_shot_logits, zero_shot_probabilities

if TYPE_CHECKING:
    import torch

REPORT_SCHEMA_VERSION = 1


def classifier_cache_dir() -> Path:
    return cache_dir() / "clipcli-classifiers"


def cached_classifier(
    lm: LoadedModel,
    classes: Sequence[str],
    templates: TemplateSet,
    use_cache: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, bool]:
    """The zero-shot classifier and whether it came from the cache.

    ``on_progress`` gets the number of prompts encoded after each text batch; a cache hit encodes
    none, so it is never called then.
    """
    import torch

    # Precision is part of the key: a bf16 or int8 classifier differs from fp32's in the last digits,
    # and a report states the precision its numbers were computed at.
    identity = [lm.checksum, lm.precision, list(templates.templates), list(classes)]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    path = classifier_cache_dir() / f"{key}.pt"
    if use_cache and path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if isinstance(cached, torch.Tensor) and cached.shape == (len(classes), lm.embed_dim):
                return cached, True
        except Exception:  # damaged, or not what clipcli wrote, however torch fails on it
            pass
        path.unlink(missing_ok=True)  # recomputed, not fatal
    classifier = zero_shot_classifier(lm, classes, templates, on_progress=on_progress)
    if use_cache:
        # A cache that cannot be written (a read-only home) is skipped, as every cache of clipcli's is.
        with contextlib.suppress(OutputError), atomic_write(path) as f:
            torch.save(classifier, f)
    return classifier, False


@dataclass
class ImageEmbeddings:
    embeddings: np.ndarray  # for the images that decoded, in dataset order
    kept: list[int]  # their dataset indices
    skipped: list[Skipped]
    seconds: float


def embed_dataset(
    lm: LoadedModel,
    data: LabelledImages | CaptionPairs,
    batch_size: int = 32,
    workers: int = 0,
    exact: bool = False,
    on_batch: Callable[[int], None] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ImageEmbeddings:
    from clipcli.zeroshot.encode import embed_batches, runs_elsewhere

    start = time.perf_counter()
    if data.refs is not None:
        overlap = runs_elsewhere(lm)
        batches = iter_batches(data.refs, lm.image, batch_size, workers, exact, overlap, max_pixels)
        names = [r.path for r in data.refs]
    else:
        batches = iter_array_batches(data.arrays, lm.image, batch_size, runs_elsewhere(lm))
        names = data.ids
    chunks: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[Skipped] = []
    for batch in embed_batches(lm, batches, names):
        chunks.append(batch.embeddings.numpy())
        kept.extend(batch.indices)
        skipped.extend(batch.skipped)
        if on_batch:
            on_batch(len(batch.indices) + len(batch.skipped))
    dim = lm.embed_dim
    matrix = np.concatenate(chunks) if chunks else np.empty((0, dim), np.float32)
    return ImageEmbeddings(matrix, kept, skipped, time.perf_counter() - start)


@dataclass
class Predictions:
    ids: list[str]
    true: list[str]
    predicted: list[str]
    score: np.ndarray  # probability of the predicted label
    true_rank: np.ndarray


@dataclass
class EvalResult:
    model: str
    model_sha256: str
    templates: str
    n_templates: int
    dataset: str
    n: int
    n_skipped: int
    metrics: dict[str, float]
    classes: list[str] = field(default_factory=list)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    timings: dict[str, float] = field(default_factory=dict)
    text_cache: str = "off"
    predictions: Predictions | None = None

    def record(self) -> dict[str, Any]:
        """The JSON report record, as clipcli/report.schema.json describes it."""
        import torch

        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "templates": self.templates,
            "n_templates": self.n_templates,
            "dataset": self.dataset,
            "n": self.n,
            "n_skipped": self.n_skipped,
            "metrics": self.metrics,
            "per_class": self.per_class,
            "classes": self.classes,
            "confusion_matrix": self.confusion_matrix,
            "clipcli_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "device": self.device,
            "precision": self.precision,
            "timings": self.timings,
            "text_cache": self.text_cache,
        }


def gate_score(result: EvalResult) -> tuple[str, float]:
    """The figure ``--min-acc1`` holds a result to, and its name: top-1 accuracy when classifying; for
    caption retrieval, the smaller of image->text and text->image recall@1, so that a model passes only
    when it finds captions from images and images from captions. NaN when nothing was measured."""
    if "acc1" in result.metrics:
        return "acc1", result.metrics["acc1"]
    both = [result.metrics.get(f"{way}_recall@1", float("nan")) for way in ("image_to_text", "text_to_image")]
    return "recall@1", float("nan") if any(v != v for v in both) else min(both)


def gate_failures(results: Sequence[EvalResult], min_acc1: float | None) -> list[str]:
    """One line for each result below ``--min-acc1`` (a result with nothing measured is below it)."""
    if min_acc1 is None:
        return []
    lines = []
    for r in results:
        name, value = gate_score(r)
        if not value >= min_acc1:
            lines.append(f"{name} {value:.4f} of {run_name(r)} is below --min-acc1 {min_acc1}")
    return lines


def run_name(result: EvalResult) -> str:
    """The model, and the template set where there is one (retrieval has none)."""
    return f"{result.model} / {result.templates}" if result.n_templates else result.model


def classification_result(
    lm: LoadedModel,
    data: LabelledImages,
    images: ImageEmbeddings,
    templates: TemplateSet,
    use_cache: bool,
    on_progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Metrics of one template set; ``on_progress`` as for :func:`cached_classifier`."""
    import torch

    start = time.perf_counter()
    classifier, hit = cached_classifier(lm, data.classes, templates, use_cache, on_progress)
    text_seconds = time.perf_counter() - start
    embeddings = torch.from_numpy(images.embeddings)
    logits = zero_shot_logits(lm, embeddings, classifier).numpy()
    targets = np.array([data.targets[i] for i in images.kept], dtype=np.int64)
    probs = zero_shot_probabilities(lm, embeddings, classifier).numpy()  # the scores `classify` gives
    base = EvalResult(
        model=lm.name,
        model_sha256=lm.checksum,
        templates=templates.name,
        n_templates=len(templates.templates),
        dataset=data.name,
        n=len(targets),
        n_skipped=len(images.skipped),
        metrics={},
        device=str(lm.device),
        precision=lm.precision,
        timings={"image_embedding_s": images.seconds, "text_embedding_s": text_seconds},
        text_cache=("hit" if hit else "miss") if use_cache else "off",
    )
    return classification_metrics(logits, targets, data.classes, base, [data.ids[i] for i in images.kept], probs)


def classification_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    base: EvalResult,
    ids: list[str],
    reported: np.ndarray | None = None,
) -> EvalResult:
    """``base`` with the metrics of items x classes ``scores`` against ``targets`` filled in; each prediction's
    score is read from ``reported`` (the probabilities ``classify`` gives, for images), else from ``scores``."""
    n_classes = len(classes)
    predicted = scores.argmax(axis=1) if len(targets) else np.empty(0, np.int64)
    confusion = confusion_matrix(predicted, targets, n_classes)
    stats = per_class(confusion)
    metrics = {"acc1": topk_accuracy(scores, targets, 1)}
    if n_classes >= 5:
        metrics["acc5"] = topk_accuracy(scores, targets, 5)
    metrics["mean_per_class_recall"] = stats.mean_recall
    per: list[dict[str, Any]] = [
        {
            "class": name,
            "n": int(stats.support[i]),
            "predicted": int(stats.predicted[i]),
            "precision": float(stats.precision[i]),
            "recall": None if np.isnan(stats.recall[i]) else float(stats.recall[i]),
        }
        for i, name in enumerate(classes)
    ]
    predictions = Predictions(
        ids=ids,
        true=[classes[t] for t in targets],
        predicted=[classes[p] for p in predicted],
        score=(scores if reported is None else reported)[np.arange(len(predicted)), predicted]
        if len(predicted)
        else np.empty(0),
        true_rank=true_label_rank(scores, targets) if len(targets) else np.empty(0, np.int64),
    )
    return replace(
        base,
        metrics=metrics,
        classes=list(classes),
        per_class=per,
        confusion_matrix=confusion.tolist(),
        predictions=predictions,
    )


def retrieval_result(lm: LoadedModel, data: CaptionPairs, images: ImageEmbeddings) -> EvalResult:
    from clipcli.zeroshot.encode import encode_texts

    start = time.perf_counter()
    texts = encode_texts(lm, data.texts).numpy()
    text_seconds = time.perf_counter() - start
    # Captions of images that could not be read stay in the pool but can never be found.
    position = {idx: row for row, idx in enumerate(images.kept)}
    owner = np.array([position.get(i, -1) for i in data.text_to_image])
    metrics = retrieval_recall(images.embeddings @ texts.T, owner)
    return EvalResult(
        model=lm.name,
        model_sha256=lm.checksum,
        templates="none",
        n_templates=0,
        dataset=data.name,
        n=len(images.kept),
        n_skipped=len(images.skipped),
        metrics=metrics,
        device=str(lm.device),
        precision=lm.precision,
        timings={"image_embedding_s": images.seconds, "text_embedding_s": text_seconds},
    )


def write_report(results: Sequence[EvalResult], path: Path) -> None:
    report = {"schema_version": REPORT_SCHEMA_VERSION, "results": [r.record() for r in results]}
    text = json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n"
    # atomic_write names the file and the reason on failure, and refuses a directory before it
    # creates the temporary, so a failed write leaves nothing behind.
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def _json_safe(value: Any) -> Any:
    """NaN (an undefined metric, such as recall of a class with no images) becomes null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.integer | np.floating):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


PREDICTION_COLUMNS = ("model", "templates", "path", "true_label", "predicted_label", "score", "true_rank")


def prediction_rows(result: EvalResult) -> list[dict[str, Any]]:
    return [
        {"model": result.model, "templates": result.templates, "path": item, **scored}
        for item, scored in scored_predictions(result)
    ]


def scored_predictions(result: EvalResult) -> list[tuple[Any, dict[str, Any]]]:
    """Each prediction's id (an image's path, a text's index) with its true and predicted label, the
    predicted label's score and the true label's rank: the part of a prediction row every kind shares."""
    p = result.predictions
    if p is None:
        return []
    return [
        (
            p.ids[i],
            {
                "true_label": p.true[i],
                "predicted_label": p.predicted[i],
                "score": float(p.score[i]),
                "true_rank": int(p.true_rank[i]),
            },
        )
        for i in range(len(p.ids))
    ]
