"""Classification and retrieval metrics, as plain functions of score matrices and label indices."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def topk_accuracy(scores: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows whose target is among the ``k`` highest scores (N x C scores)."""
    if len(targets) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


def true_label_rank(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target among its scores (1 = predicted)."""
    true = scores[np.arange(len(targets)), targets]
    return (scores > true[:, None]).sum(axis=1) + 1


def confusion_matrix(predicted: np.ndarray, targets: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (targets, predicted), 1)
    return matrix


@dataclass(frozen=True)
class PerClass:
    support: np.ndarray  # images per true class
    predicted: np.ndarray  # predictions per class
    precision: np.ndarray  # 0 where a class was never predicted
    recall: np.ndarray  # NaN where a class has no images

    @property
    def mean_recall(self) -> float:
        """Mean per-class recall over the classes that have images (balanced accuracy)."""
        present = ~np.isnan(self.recall)
        return float(self.recall[present].mean()) if present.any() else float("nan")


def per_class(confusion: np.ndarray) -> PerClass:
    correct = np.diag(confusion).astype(float)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, correct / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, correct / np.maximum(support, 1), np.nan)
    return PerClass(support, predicted, precision, recall)


def worst_confusions(confusion: np.ndarray, names: Sequence[str], n: int = 10) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted) mistakes, largest first."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = [np.unravel_index(i, off.shape) for i in order]
    return [(names[t], names[p], int(off[t, p])) for t, p in pairs if off[t, p] > 0]


def retrieval_recall(
    similarity: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways, counted as in the CLIP paper.

    ``similarity`` is images x texts; ``text_to_image[j]`` is the image caption ``j`` belongs to. An
    image counts as found for image->text when any of its captions is in its top k; a caption counts
    for text->image when its own image is in its top k.
    """
    n_images, n_texts = similarity.shape
    out: dict[str, float] = {}
    text_ranks = np.argsort(-similarity, axis=1)  # per image, texts best first
    image_ranks = np.argsort(-similarity.T, axis=1)  # per text, images best first
    for k in ks:
        if k > n_texts and k > n_images:
            continue
        hit_i2t = [(text_to_image[text_ranks[i, :k]] == i).any() for i in range(n_images)]
        hit_t2i = [(image_ranks[j, :k] == text_to_image[j]).any() for j in range(n_texts)]
        out[f"image_to_text_recall@{k}"] = float(np.mean(hit_i2t))
        out[f"text_to_image_recall@{k}"] = float(np.mean(hit_t2i))
    return out
