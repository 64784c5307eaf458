"""Metrics against small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from clipcli.evaluation.metrics import (
    confusion_matrix,
    per_class,
    retrieval_recall,
    topk_accuracy,
    true_label_rank,
    worst_confusions,
)

SCORES = np.array(
    [
        [0.9, 0.05, 0.03, 0.02],  # true 0, predicted 0
        [0.1, 0.6, 0.2, 0.1],  # true 1, predicted 1
        [0.5, 0.3, 0.15, 0.05],  # true 1, predicted 0; true label second
        [0.2, 0.1, 0.3, 0.4],  # true 2, predicted 3; true label second
        [0.7, 0.1, 0.1, 0.1],  # true 2, predicted 0; true label tied for second (counts as rank 2)
    ]
)
TARGETS = np.array([0, 1, 1, 2, 2])


def test_topk_and_ranks() -> None:
    assert topk_accuracy(SCORES, TARGETS, 1) == pytest.approx(2 / 5)
    assert topk_accuracy(SCORES, TARGETS, 2) == pytest.approx(4 / 5)
    assert true_label_rank(SCORES, TARGETS).tolist() == [1, 1, 2, 2, 2]


def test_confusion_and_per_class_with_a_class_never_predicted_and_one_never_seen() -> None:
    predicted = SCORES.argmax(1)
    matrix = confusion_matrix(predicted, TARGETS, 4)
    assert matrix.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]]
    stats = per_class(matrix)
    # class 0: predicted 3 times, right once; class 2: never predicted (precision 0 by convention)
    assert stats.precision.tolist() == pytest.approx([1 / 3, 1.0, 0.0, 0.0])
    assert stats.recall[:3].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert np.isnan(stats.recall[3])  # class 3 has no images: excluded from the mean
    assert stats.mean_recall == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    # ties keep row-major order
    assert worst_confusions(matrix, ["a", "b", "c", "d"], 2) == [("b", "a", 1), ("c", "a", 1)]


def test_retrieval_recall_counts_any_caption_for_images() -> None:
    # 2 images, 3 captions: captions 0 and 1 belong to image 0, caption 2 to image 1
    sim = np.array([[0.1, 0.9, 0.3], [0.8, 0.2, 0.4]])
    owner = np.array([0, 0, 1])
    r = retrieval_recall(sim, owner, ks=(1, 2))
    assert r["image_to_text_recall@1"] == pytest.approx(0.5)  # image 0 finds caption 1; image 1 finds caption 0
    assert r["text_to_image_recall@1"] == pytest.approx(2 / 3)  # caption 0 -> image 1 (wrong), 1 -> 0, 2 -> 1
    assert r["image_to_text_recall@2"] == pytest.approx(1.0)
    assert r["text_to_image_recall@2"] == pytest.approx(1.0)
