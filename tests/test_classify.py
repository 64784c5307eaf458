"""`clipcli classify` against OpenAI's reference code, every input kind and every output format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipcli.models.families.openai import import_clip


def reference_probs(ckpt: Path, image: Path, texts: list[str]) -> list[float]:
    """The seed's own code: clip.load, its preprocess, model(image, text).softmax."""
    clip = import_clip()
    model, preprocess = clip.load(str(ckpt), device="cpu", jit=False)
    pixels = preprocess(Image.open(image)).unsqueeze(0)
    with torch.no_grad():
        logits_per_image, _ = model(pixels, clip.tokenize(texts))
    return logits_per_image.softmax(dim=-1)[0].tolist()


@pytest.mark.parametrize("ckpt_name", ["vit_ckpt", "rn_ckpt"])
def test_probabilities_match_reference(cli, images, request, ckpt_name):
    ckpt = request.getfixturevalue(ckpt_name)
    labels = ["a diagram", "a dog", "a cat"]
    ran = cli(
        "classify",
        str(images[2]),
        "--labels",
        ",".join(labels),
        "--template",
        "{}",
        "--model",
        str(ckpt),
        "--exact",
        "--precision",
        "fp32",
        "-f",
        "csv",
    )
    assert ran.exit_code == 0, ran.stderr
    got = pd.read_csv(io.StringIO(ran.stdout))
    expected = dict(zip(labels, reference_probs(ckpt, images[2], labels), strict=True))
    assert sorted(got["label"]) == sorted(labels)
    assert max(expected.values()) - min(expected.values()) > 1e-3  # the comparison is not trivially flat
    for label, score in zip(got["label"], got["score"], strict=True):
        assert score == pytest.approx(expected[label], abs=1e-5)
    assert list(got["rank"]) == [1, 2, 3]
    assert list(got["score"]) == sorted(got["score"], reverse=True)


def test_default_decoding_stays_close_to_exact(cli, tmp_path, vit_ckpt):
    from conftest import make_image

    big = make_image(tmp_path / "big.jpg", (1600, 1200), seed=3, quality=90)
    args = ["classify", str(big), "--labels", "a,b,c", "-m", str(vit_ckpt), "--precision", "fp32", "-f", "csv"]
    fast = pd.read_csv(io.StringIO(cli(*args).stdout)).set_index("label")["score"]
    exact = pd.read_csv(io.StringIO(cli(*args, "--exact").stdout)).set_index("label")["score"]
    assert (fast - exact[fast.index]).abs().max() < 0.02


def test_folder_glob_file_and_stdin_inputs_keep_order(cli, images, vit_ckpt, tmp_path):
    folder = images[0].parent
    common = ["--labels", "x,y", "-m", str(vit_ckpt), "-k", "1", "-f", "csv"]
    by_folder = pd.read_csv(io.StringIO(cli("classify", str(folder), *common).stdout))
    assert list(by_folder["path"]) == [
        str(folder / n) for n in ["img1.jpg", "img2.png", "img10.jpg", "sub/img3.JPG", "sub/img20.jpeg"]
    ]
    by_glob = pd.read_csv(io.StringIO(cli("classify", str(folder / "*.jpg"), *common).stdout))
    assert list(by_glob["path"]) == [str(folder / "img1.jpg"), str(folder / "img10.jpg")]
    stdin = "\n".join(str(p) for p in reversed(images)) + "\n"
    by_stdin = pd.read_csv(io.StringIO(cli("classify", "-", *common, input=stdin).stdout))
    assert list(by_stdin["path"]) == [str(p) for p in reversed(images)]
    one = pd.read_csv(io.StringIO(cli("classify", str(images[1]), *common).stdout))
    assert list(one["path"]) == [str(images[1])]
    # the same image gives the same scores whichever way it was named
    assert by_folder.set_index("path").loc[str(images[1]), "score"] == pytest.approx(one["score"][0], abs=1e-6)


def test_every_output_format_reads_back(cli, images, vit_ckpt, tmp_path):
    common = ["classify", str(images[0].parent), "--labels", "a,b,c,d", "-m", str(vit_ckpt), "-k", "3"]
    for ext in ("csv", "parquet", "jsonl"):
        out = tmp_path / f"out.{ext}"
        ran = cli(*common, "-o", str(out))
        assert ran.exit_code == 0, ran.stderr
        assert ran.stdout == ""
        if ext == "jsonl":
            records = [json.loads(line) for line in out.read_text().splitlines()]
            assert len(records) == 5
            assert all(len(r["predictions"]) == 3 for r in records)
            assert all(abs(sum(p["score"] for p in r["predictions"])) <= 1 + 1e-6 for r in records)
        else:
            frame = pd.read_csv(out) if ext == "csv" else pq.read_table(out).to_pandas()
            assert list(frame.columns) == ["path", "rank", "label", "score"]
            assert len(frame) == 15
            assert frame.groupby("path")["rank"].apply(list).map(lambda r: r == [1, 2, 3]).all()
    table = cli(*common, "-f", "table")
    assert "%" in table.stdout and "img10.jpg" in table.stdout


def test_probabilities_sum_to_one_over_all_labels(cli, images, vit_ckpt):
    ran = cli("classify", str(images[0]), "--labels", "a,b,c,d,e,f", "-m", str(vit_ckpt), "-k", "6", "-f", "jsonl")
    scores = [p["score"] for p in json.loads(ran.stdout)["predictions"]]
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    capped = cli("classify", str(images[0]), "--labels", "a,b", "-m", str(vit_ckpt), "-k", "5", "-f", "jsonl")
    assert len(json.loads(capped.stdout)["predictions"]) == 2


def test_labels_file_and_template_sets(cli, images, vit_ckpt, tmp_path):
    labels = tmp_path / "classes.txt"
    labels.write_text("apple\n\naquarium fish\nbaby\nbear\nbeaver\nbed\n")
    ran = cli(
        "classify",
        str(images[0]),
        "--labels-file",
        str(labels),
        "--template",
        "a photo of a {}",
        "--top-k",
        "5",
        "-m",
        str(vit_ckpt),
        "-f",
        "table",
    )
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout.count("%") == 5
    from clipcli.zeroshot.prompts import builtin_templates

    def scores(*prompts: str) -> dict[str, float]:
        common = ["classify", str(images[0]), "--labels", "a,b", "-k", "2", "-m", str(vit_ckpt), "-f", "jsonl"]
        ran = cli(*common, *prompts)
        assert ran.exit_code == 0, ran.stderr
        return {p["label"]: p["score"] for p in json.loads(ran.stdout)["predictions"]}

    default = scores()
    for name in ("cifar", "imagenet"):
        # a set is its templates as an ensemble, exactly, and gives other scores than the default set
        named = scores("--templates", name)
        spelled_out = [arg for t in builtin_templates(name).templates for arg in ("--template", t)]
        assert named == pytest.approx(scores(*spelled_out), abs=1e-6)
        assert named != pytest.approx(default, abs=1e-4)


def test_prompt_ensemble_is_renormalised_mean(vit_ckpt):
    from clipcli.models import load_model
    from clipcli.zeroshot.encode import encode_texts
    from clipcli.zeroshot.prompts import TemplateSet, zero_shot_classifier

    lm = load_model(str(vit_ckpt), "cpu", "fp32")
    templates = TemplateSet("two", ("a photo of a {}.", "a drawing of the {}."))
    got = zero_shot_classifier(lm, ["dog", "cat"], templates)
    each = encode_texts(
        lm, ["a photo of a dog.", "a drawing of the dog.", "a photo of a cat.", "a drawing of the cat."]
    )
    mean = torch.nn.functional.normalize(each.view(2, 2, -1).mean(1), dim=-1)
    assert torch.allclose(got, mean, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_trimmed_text_batches_equal_full_context(vit_ckpt):
    from clipcli.models import load_model
    from clipcli.models.families.openai import tokenize
    from clipcli.zeroshot.encode import encode_texts

    lm = load_model(str(vit_ckpt), "cpu", "fp32")
    texts = ["a dog", "a photo of a very small and rather blurry cat on a sofa.", "x"]
    with torch.no_grad():
        full = torch.nn.functional.normalize(lm.model.encode_text(tokenize(texts)), dim=-1)
    assert torch.allclose(encode_texts(lm, texts, batch_size=2), full, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--labels", "a,b", "--template", "a photo"], "has no {}"),
        (["--labels", "a,a"], "appears twice"),
        (["--labels", "a,b", "--templates", "nope"], "unknown template set 'nope'"),
        (["--labels", "a,b", "--templates", "nofile.txt"], "nofile.txt: no such templates file"),
        (
            ["--labels", "red", "circle,blue", "star"],
            "circle,blue: no such file, and it looks like a piece of --labels",
        ),
        (["--labels", "word " * 80], "longer than the model's 77-token context"),
        ([], "no labels"),
        (["--labels", "a,b", "-o", "out.xlsx"], "cannot tell the format"),
        (["--labels", "a,b", "--labels-file", "x.txt"], "not both"),
        (["--labels-file", "/nonexistent/labels.txt"], "/nonexistent/labels.txt: cannot read labels file"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(cli, images, vit_ckpt, args, message):
    ran = cli("classify", str(images[0]), "-m", str(vit_ckpt), *args)
    assert ran.exit_code == 2
    assert message in ran.stderr
    assert ran.stderr.startswith("Error: ")
    assert "Traceback" not in ran.stderr
    assert ran.stdout == ""
