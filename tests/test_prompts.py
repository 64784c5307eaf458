"""Labels from --labels (CSV quoting) and progress while prompts are encoded."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import Ran

from clipcli.errors import InputError
from clipcli.models import LoadedModel
from clipcli.zeroshot.prompts import TemplateSet, builtin_templates, resolve_labels, zero_shot_classifier


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ('"New York, NY",Paris', ["New York, NY", "Paris"]),
        ('Paris, "New York, NY"', ["Paris", "New York, NY"]),  # a space before the quote is allowed
        ("a, b,,c ", ["a", "b", "c"]),  # unquoted labels read as before
        ('5" screw,nut', ['5" screw', "nut"]),  # a quote inside a label is kept
    ],
)
def test_labels_follow_csv_quoting(given: str, expected: list[str]) -> None:
    assert resolve_labels(given) == expected


def test_quoted_labels_are_still_checked_for_repeats() -> None:
    with pytest.raises(InputError, match="'a, b' appears twice"):
        resolve_labels('"a, b","a, b"')


@pytest.fixture(scope="module")
def tiny_shapes() -> LoadedModel:
    from clipcli.models import load_model

    return load_model("tiny-shapes", "cpu", "fp32")


def test_classify_takes_a_quoted_label_with_a_comma(cli: Callable[..., Ran], tmp_path: Path) -> None:
    from clipcli.training.synth import render

    image = tmp_path / "shape.png"
    render(random.Random(1), "red", "circle").image.save(image)
    ran = cli("classify", str(image), "--labels", '"red, round circle",blue star', "-m", "tiny-shapes", "-f", "csv")
    assert ran.exit_code == 0, ran.stderr
    rows = pd.read_csv(io.StringIO(ran.stdout))
    assert sorted(rows["label"]) == ["blue star", "red, round circle"]


def test_encode_texts_reports_progress_per_batch(tiny_shapes: LoadedModel) -> None:
    from clipcli.zeroshot.encode import encode_texts

    calls: list[int] = []
    texts = [f"a photo of shape number {i}" for i in range(7)]
    with_progress = encode_texts(tiny_shapes, texts, batch_size=3, on_progress=calls.append)
    assert calls == [3, 3, 1]
    assert torch.equal(with_progress, encode_texts(tiny_shapes, texts, batch_size=3))


@pytest.mark.slow
def test_zero_shot_classifier_reports_every_prompt(tiny_shapes: LoadedModel) -> None:
    from clipcli.zeroshot.encode import TEXT_BATCH

    labels = [f"{colour} {shape}" for colour in ("red", "blue", "green", "yellow") for shape in ("circle", "star")]
    templates = builtin_templates("imagenet")
    n_prompts = len(labels) * len(templates.templates)
    assert n_prompts > TEXT_BATCH  # so it takes more than one text batch
    calls: list[int] = []
    classifier = zero_shot_classifier(tiny_shapes, labels, templates, on_progress=calls.append)
    assert len(calls) > 1 and sum(calls) == n_prompts
    assert torch.allclose(classifier, zero_shot_classifier(tiny_shapes, labels, templates))


def test_cached_classifier_reports_progress_only_when_it_encodes(
    tiny_shapes: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipcli.evaluation.run import cached_classifier

    monkeypatch.setenv("CLIPCLI_CACHE", str(tmp_path / "cache"))
    templates = TemplateSet("two", ("a {}.", "a photo of a {}."))
    calls: list[int] = []
    _, hit = cached_classifier(tiny_shapes, ["red circle", "blue star", "green cross"], templates, True, calls.append)
    assert not hit and sum(calls) == 6
    calls.clear()
    _, hit = cached_classifier(tiny_shapes, ["red circle", "blue star", "green cross"], templates, True, calls.append)
    assert hit and calls == []
    assert not list((tmp_path / "cache").rglob(".*.tmp"))


@pytest.mark.slow
def test_classify_reports_prompt_encoding_before_the_first_image(tiny_shapes: LoadedModel) -> None:
    from clipcli.images.sources import ImageRef
    from clipcli.zeroshot.classify import classify_images

    lm = tiny_shapes
    labels = [f"label {i}" for i in range(40)]
    templates = builtin_templates("imagenet")  # 40 x 80 prompts: several text batches
    image = str(Path(__file__).resolve().parent.parent / "samples" / "seen" / "red-cross.jpg")
    events: list[tuple[str, int]] = []
    predictions = classify_images(
        lm,
        [ImageRef(image, Path(image))],
        labels,
        templates,
        on_batch=lambda n: events.append(("images", n)),
        on_prompts=lambda n: events.append(("prompts", n)),
    )
    assert len(list(predictions)) == 1
    prompts = [n for kind, n in events if kind == "prompts"]
    assert sum(prompts) == 40 * 80 and len(prompts) > 1
    assert events[-1] == ("images", 1)  # the text stage is reported first, while it runs


def test_zero_shot_probabilities_are_softmax_of_scaled_cosine(tiny_shapes: LoadedModel) -> None:
    from clipcli.zeroshot.prompts import zero_shot_logits, zero_shot_probabilities

    classifier = zero_shot_classifier(
        tiny_shapes, ["red circle", "blue star", "green cross"], builtin_templates("simple")
    )
    embeddings = torch.nn.functional.normalize(
        torch.randn(4, classifier.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1
    )
    scale = float(tiny_shapes.model.logit_scale.exp())
    expected_logits = scale * embeddings @ classifier.T
    assert torch.allclose(zero_shot_logits(tiny_shapes, embeddings, classifier), expected_logits, atol=1e-5)
    probs = zero_shot_probabilities(tiny_shapes, embeddings, classifier)
    assert probs.shape == (4, 3)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(4), atol=1e-6)
    assert torch.allclose(probs, torch.softmax(expected_logits, dim=-1), atol=1e-6)
    assert probs.max() - probs.min() > 1e-3  # the comparison is not trivially flat
