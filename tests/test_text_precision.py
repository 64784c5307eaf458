"""`classify-text --precision`, `eval` and `bench-precision --texts-file` at bf16 and int8, on tiny random NLI
models of the four architectures int8 is offered for (BART, BERT, RoBERTa, DeBERTa-v2/v3; nli_models.py).

How far bf16 and int8 move the answers is measured on a few hundred varied texts, single- and
multi-label. On these random models the issue's bar (top label kept for >= 99% of texts, no probability
moved by more than 0.02) is not reached, and cannot be, by any rounding of the weights: see
``test_the_issues_bar_is_out_of_reach_of_random_weights`` and docs/precision.md#texts. What is held here
is the figures measured (so that a regression shows) and that the precision is what runs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import Ran
from nli_models import bart_dir, bert_dir, deberta_v2_dir, distilbert_folder, roberta_dir

from clipcli.models.nli import load_nli_model
from clipcli.text.nli import StageSeconds, encode_pairs, encode_pairs_jointly, hypotheses, iter_scores, pair_logits

__all__ = ["bart_dir", "bert_dir", "deberta_v2_dir", "roberta_dir"]  # fixtures, used by name

ARCHITECTURES = ["bart", "bert", "roberta", "deberta_v2"]
LABELS = ["sports", "politics", "music", "science", "business"]
TEMPLATE = "This text is about {}."
_WORDS = (  # noqa: SIM905  (a sentence of words reads better than 54 quoted ones)
    "the of and to in is was for on that with as by at from they this have had not are but game team season "
    "player coach score match league win government election vote minister law policy court song album band "
    "concert music singer study research data results market company shares profit bank price"
).split()


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """Texts of 1 to 60 words (some past the fixtures' 64 tokens), with and without punctuation."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.choice([1, 3, 6, 10, 20, 40, 60])))
        texts.append(words.capitalize() + rng.choice([".", "!", "?", ""]))
    return texts


@pytest.fixture(params=ARCHITECTURES)
def folder(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")


def both_scores(folder: Path, precision: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Single- and multi-label scores of ``texts`` x LABELS from one pass over the pairs."""
    from clipcli.text.nli import scores_from_logits

    nm = load_nli_model(str(folder), "cpu", precision)
    assert nm.precision == precision
    logits = pair_logits(nm, texts, hypotheses(TEMPLATE, LABELS))
    return scores_from_logits(logits, nm, False), scores_from_logits(logits, nm, True)


def figures(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(share of texts whose top label is unchanged, largest absolute change of a probability)."""
    return float((reference.argmax(1) == other.argmax(1)).mean()), float(np.abs(reference - other).max())


# --- pre-tokenisation ----------------------------------------------------------------------------


def test_pairs_built_from_texts_tokenised_once_are_the_tokenizers_own_pairs(folder: Path) -> None:
    """Every architecture's post-processor (special tokens, token types), texts cut to the model's length,
    hypotheses longer than the room left, strings that look like special tokens."""
    nm = load_nli_model(str(folder), "cpu", "fp32")
    texts = [*varied_texts(60, seed=3), "", "Hello </s> world [SEP] [CLS]", "ünïcödé\ttext\nwith breaks", "x" * 300]
    filled = hypotheses(TEMPLATE, ["sports", "a label far too long for the room a pair has left " * 3])
    ours = encode_pairs(nm, texts, filled)
    whole = encode_pairs_jointly(nm, [t for t in texts for _ in filled], [h for _ in texts for h in filled])
    assert ours == whole
    assert max(len(ids) for ids in ours["input_ids"]) > nm.max_length  # the pipeline leaves those whole
    assert any(len(ids) == nm.max_length for ids in ours["input_ids"])  # and cuts these


def test_stage_seconds_say_where_the_time_went(bart_dir: Path) -> None:
    nm = load_nli_model(str(bart_dir), "cpu", "fp32")
    stages = StageSeconds()
    rows = list(iter_scores(nm, varied_texts(20), LABELS, TEMPLATE, seconds=stages))
    assert len(rows) == 20
    assert stages.tokenize > 0 and stages.model > 0 and stages.scores > 0
    assert sum(stages.shares().values()) == pytest.approx(1.0)


# --- int8 and bf16 -------------------------------------------------------------------------------


def test_int8_rewrites_the_bodys_linear_layers_and_keeps_the_head(folder: Path) -> None:
    from torch import nn

    from clipcli.models.quantize import Int8Linear

    model = load_nli_model(str(folder), "cpu", "int8").model
    body = [m for name, m in model.base_model.named_modules() if "pooler" not in name]
    assert sum(isinstance(m, Int8Linear) for m in body) >= 12  # 2 layers x (q, k, v, out, 2 feed-forward)
    assert not any(type(m) is nn.Linear for m in body)
    head = [m for name, m in model.named_modules() if not name.startswith(model.base_model_prefix)]
    assert any(type(m) is nn.Linear for m in head) and not any(isinstance(m, Int8Linear) for m in head)


# Measured on these fixtures (300 texts x 5 labels; the worse of single- and multi-label; Zen 4, oneDNN):
# top label kept / largest probability change. Regression bounds sit a little outside them.
MEASURED = {
    "bf16": {"bart": (0.963, 0.040), "bert": (0.967, 0.032), "roberta": (0.980, 0.019), "deberta_v2": (0.963, 0.086)},
    "int8": {"bart": (0.840, 0.269), "bert": (0.857, 0.157), "roberta": (0.893, 0.056), "deberta_v2": (0.880, 0.182)},
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_and_int8_against_fp32_on_varied_texts(arch: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(f"{arch}_dir")
    texts = varied_texts(300)
    single, multi = both_scores(folder, "fp32", texts)
    found = {}
    for precision in ("bf16", "int8"):
        other_single, other_multi = both_scores(folder, precision, texts)
        (kept_single, moved_single), (kept_multi, moved_multi) = (
            figures(single, other_single),
            figures(multi, other_multi),
        )
        print(
            f"{arch} {precision}: top label kept {kept_single:.3f} / {kept_multi:.3f}, "
            f"largest probability change {moved_single:.3f} / {moved_multi:.3f} (single / multi-label)"
        )
        found[precision] = (min(kept_single, kept_multi), max(moved_single, moved_multi))
    for precision, (kept, moved) in found.items():
        floor, ceiling = MEASURED[precision][arch]
        assert kept >= floor - 0.05, (precision, kept)  # a broken rewrite keeps a third or so
        assert 0 < moved <= ceiling + 0.1, (precision, moved)  # a largest change is a tail: looser


@pytest.mark.xfail(strict=True, reason="random weights: labels nearly tie, see docs/precision.md#texts")
def test_the_issues_bar_is_out_of_reach_of_random_weights(bert_dir: Path) -> None:
    """Rounding the weights alone to int8, per output channel, with fp32 activations, already changes
    the top label of several percent of texts: these random models' labels are separated by less than
    any rounding moves them (median margin between the two best labels 0.03-0.09; at the usual
    initialisation, 0.02, all labels tie). A trained NLI model's are not; the bar is for those."""
    import torch
    from torch import nn

    texts = varied_texts(300)
    single, _ = both_scores(bert_dir, "fp32", texts)
    nm = load_nli_model(str(bert_dir), "cpu", "fp32")
    with torch.no_grad():
        for m in nm.model.base_model.modules():
            if type(m) is nn.Linear:
                scale = m.weight.abs().amax(dim=1, keepdim=True) / 127
                m.weight.copy_((m.weight / scale).round() * scale)
    rounded = np.stack(list(iter_scores(nm, texts, LABELS, TEMPLATE)))
    kept, moved = figures(single, rounded)
    assert kept >= 0.99 and moved <= 0.02


# --- commands ------------------------------------------------------------------------------------


@pytest.mark.parametrize("multi_label", [False, True], ids=["single-label", "multi-label"])
def test_classify_text_at_int8_gives_the_int8_cores_scores(
    cli: Callable[..., Ran], roberta_dir: Path, multi_label: bool
) -> None:
    texts = varied_texts(6, seed=9)
    flags = ["--multi-label"] if multi_label else []
    args = ["-l", ",".join(LABELS), "-m", str(roberta_dir), "-k", "5", "-f", "csv", "--precision", "int8"]
    ran = cli("classify-text", *texts, *args, *flags)
    assert ran.exit_code == 0, ran.stderr
    from io import StringIO

    rows = pd.read_csv(StringIO(ran.stdout))
    nm = load_nli_model(str(roberta_dir), "cpu", "int8")
    want = list(iter_scores(nm, texts, LABELS, TEMPLATE, multi_label))
    got = rows.pivot(index="text", columns="label", values="score").loc[texts, LABELS].to_numpy()
    assert got == pytest.approx(np.stack(want), abs=1e-6)
    fp32 = np.stack(
        list(iter_scores(load_nli_model(str(roberta_dir), "cpu", "fp32"), texts, LABELS, TEMPLATE, multi_label))
    )
    assert 0 < np.abs(got - fp32).max() < 0.2  # int8 ran (not fp32), and near it


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_eval_on_texts_runs_at_the_precision_and_records_it(
    cli: Callable[..., Ran], bert_dir: Path, tmp_path: Path, precision: str
) -> None:
    manifest, report = tmp_path / "texts.csv", tmp_path / "run.json"
    pd.DataFrame({"text": varied_texts(6, seed=2), "label": ["sports", "music", "politics"] * 2}).to_csv(manifest)
    ran = cli(
        "eval", str(manifest), "-m", str(bert_dir), "--device", "cpu", "--precision", precision, "--report", str(report)
    )
    assert ran.exit_code == 0, ran.stderr
    assert json.loads(report.read_text())["results"][0]["precision"] == precision


def test_int8_on_cuda_is_refused_in_one_line_before_loading(
    cli: Callable[..., Ran], bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import clipcli.models.nli as nli

    monkeypatch.setattr(nli, "resolve_device", lambda spec: torch.device("cuda"))
    monkeypatch.setattr(nli, "_load_weights", lambda *a: pytest.fail("weights read before the refusal"))
    ran = cli("classify-text", "a text", "-l", "a,b", "-m", str(bert_dir), "--device", "cuda", "--precision", "int8")
    assert ran.exit_code == 2
    assert ran.stderr.startswith("Error: --precision int8 runs on the CPU only") and ran.stderr.count("\n") == 1


def test_int8_for_a_model_type_it_is_not_offered_for_is_one_line(cli: Callable[..., Ran], tmp_path: Path) -> None:
    folder = distilbert_folder(tmp_path / "tiny-distilbert-nli")
    ran = cli("classify-text", "a text", "-l", "a,b", "-m", str(folder), "--precision", "int8")
    assert ran.exit_code == 2
    assert "int8 is offered for bart, bert, roberta, deberta-v2 NLI models, not distilbert" in ran.stderr
    assert ran.stderr.count("\n") == 1
    assert cli("classify-text", "a text", "-l", "a,b", "-m", str(folder), "--precision", "fp32").exit_code == 0


def test_bench_precision_on_texts_prints_speed_agreement_and_the_largest_change(
    cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path
) -> None:
    texts = varied_texts(30, seed=4)
    file = tmp_path / "texts.txt"
    file.write_text("\n".join(texts) + "\n")
    args = ["bench-precision", "--texts-file", str(file), "-l", ",".join(LABELS), "-m", str(bart_dir)]
    ran = cli(*args, "--min-agreement", "0.99")
    assert ran.exit_code == 1, ran.stderr  # the gate: these random weights change more than 1% (see above)
    lines = [line.split("\t") for line in ran.stdout.splitlines() if not line.startswith("#")]
    table = pd.DataFrame(lines[1:], columns=lines[0])
    assert list(table["precision"]) == ["fp32", "int8"] and list(table["texts"]) == ["30", "30"]
    single, _ = both_scores(bart_dir, "fp32", texts)
    int8 = np.stack(list(iter_scores(load_nli_model(str(bart_dir), "cpu", "int8"), texts, LABELS, TEMPLATE)))
    kept, moved = figures(single, int8)
    assert float(table["top1_agreement"][1]) == pytest.approx(kept, abs=1e-4)
    assert float(table["max_abs_change"][1]) == pytest.approx(moved, abs=1e-4)
    changed = [i + 1 for i in np.flatnonzero(single.argmax(1) != int8.argmax(1))]  # line numbers
    assert changed, "the fixture's int8 changes some labels (see the module docstring)"
    assert [
        int(line.split(": ")[1].split(" ")[0]) for line in ran.stdout.splitlines() if line.startswith("#")
    ] == changed
    gate = next(line for line in ran.stderr.splitlines() if line.startswith("below --min-agreement 0.99"))
    assert all(f"{n} (" in gate for n in changed)
    assert cli(*args, "--min-agreement", f"{kept - 0.01:.4f}").exit_code == 0  # met: no exit 1


def test_bench_precision_texts_usage_errors(cli: Callable[..., Ran], tmp_path: Path) -> None:
    file = tmp_path / "texts.txt"
    file.write_text("a text\n")
    no_labels = cli("bench-precision", "--texts-file", str(file))
    assert no_labels.exit_code == 2 and "give --labels" in no_labels.stderr
    both = cli("bench-precision", "photo.jpg", "--texts-file", str(file), "-l", "a,b")
    assert both.exit_code == 2 and "no image inputs" in both.stderr
