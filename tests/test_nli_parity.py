"""clipcli's NLI scores are Hugging Face's zero-shot-classification pipeline's, to 1e-5, on two
architectures whose label2id puts entailment in different places, single- and multi-label, with a text
longer than the model takes (cut as the pipeline cuts it) and batches that mix lengths (padding)."""

from __future__ import annotations

from pathlib import Path

import pytest
from nli_models import MAX_LENGTH, PARITY_TEXTS, bart_dir, bert_dir

from clipcli.models.nli import load_nli_model
from clipcli.text.nli import encode_pairs, iter_scores

__all__ = ["bart_dir", "bert_dir"]  # fixtures, used by name

LABELS = ["sports", "politics", "music", "cooking"]
TEMPLATE = "This text is about {}."


def pipeline_scores(folder: Path, multi_label: bool, labels: list[str]) -> list[dict[str, float]]:
    from transformers import pipeline

    classifier = pipeline("zero-shot-classification", model=str(folder), tokenizer=str(folder), device="cpu")
    out = classifier(PARITY_TEXTS, candidate_labels=labels, hypothesis_template=TEMPLATE, multi_label=multi_label)
    return [dict(zip(r["labels"], r["scores"], strict=True)) for r in out]


@pytest.fixture(params=["bart", "bert"])
def folder(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.mark.parametrize("multi_label", [False, True], ids=["single-label", "multi-label"])
@pytest.mark.parametrize("batch_size", [1, 7], ids=["one-pair-batches", "mixed-length-batches"])
@pytest.mark.slow
def test_scores_equal_the_pipelines(folder: Path, multi_label: bool, batch_size: int) -> None:
    nm = load_nli_model(str(folder), "cpu", "fp32")
    ours = list(iter_scores(nm, PARITY_TEXTS, LABELS, TEMPLATE, multi_label, batch_size=batch_size))
    theirs = pipeline_scores(folder, multi_label, LABELS)
    for text, row, expected in zip(PARITY_TEXTS, ours, theirs, strict=True):
        got = dict(zip(LABELS, row.tolist(), strict=True))
        assert got == pytest.approx(expected, abs=1e-5), text
        # The fixtures spread the scores: a match between near-uniform rows would prove little.
        assert max(got.values()) - min(got.values()) > 0.01
    if not multi_label:
        assert [sum(r) for r in ours] == pytest.approx([1.0] * len(PARITY_TEXTS), abs=1e-6)


def test_one_label_is_scored_against_contradiction_as_the_pipeline_does(folder: Path) -> None:
    nm = load_nli_model(str(folder), "cpu", "fp32")
    ours = [row[0] for row in iter_scores(nm, PARITY_TEXTS, ["sports"], TEMPLATE)]
    theirs = [r["sports"] for r in pipeline_scores(folder, False, ["sports"])]
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert not all(s == pytest.approx(1.0) for s in ours)  # not a softmax over one label


def test_a_long_text_is_cut_to_the_model_length_and_the_hypothesis_kept(folder: Path) -> None:
    nm = load_nli_model(str(folder), "cpu", "fp32")
    long_text = max(PARITY_TEXTS, key=len)
    whole = nm.tokenizer(long_text)["input_ids"]
    assert len(whole) > MAX_LENGTH  # the test text really is too long
    ids = encode_pairs(nm, [long_text], [TEMPLATE.format("sports")])["input_ids"][0]
    hypothesis = nm.tokenizer(TEMPLATE.format("sports"), add_special_tokens=False)["input_ids"]
    assert len(ids) == MAX_LENGTH
    assert ids[-len(hypothesis) - 1 : -1] == hypothesis
