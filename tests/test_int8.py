"""--precision int8: embeddings close to fp32, the same answers, and clean refusals where it cannot run."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from clipcli.errors import ModelError
from clipcli.images.decode import ImageSpec, preprocess
from clipcli.models import LoadedModel, load_model
from clipcli.models.precision import resolve_precision
from clipcli.models.quantize import (
    FusedQuickGELU,
    Int8Linear,
    PatchEmbedding,
    SelfAttention,
    check_int8_device,
    quantize_model,
)
from clipcli.training.synth import COLOURS, SHAPES, combinations, render
from clipcli.zeroshot.encode import encode_pixels, encode_texts
from clipcli.zeroshot.prompts import TemplateSet, zero_shot_classifier

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "samples").rglob("*.jpg"))
LABELS = [f"{c} {s}" for s in SHAPES for c in COLOURS]


def sample_pixels(size: int) -> torch.Tensor:
    from PIL import Image

    return torch.stack([preprocess(Image.open(p).convert("RGB"), size) for p in SAMPLES])


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)  # both L2-normalised


@pytest.fixture(scope="module")
def bundled() -> tuple[LoadedModel, LoadedModel]:
    return load_model("tiny-shapes", "cpu", "fp32"), load_model("tiny-shapes", "cpu", "int8")


@pytest.mark.slow
def test_bundled_int8_embeddings_within_cosine_099_of_fp32(bundled):
    fp32, int8 = bundled
    assert int8.precision == "int8"
    pixels = sample_pixels(fp32.input_resolution)
    assert cosines(encode_pixels(fp32, pixels), encode_pixels(int8, pixels)).min() >= 0.99
    texts = [f"a photo of a {label}." for label in LABELS]
    assert cosines(encode_texts(fp32, texts), encode_texts(int8, texts)).min() >= 0.99
    # the ResNet's attention pool and the text transformer are int8; its convolutions stay fp32
    layers = [type(m) for m in int8.towers()["image"].modules()] + [type(m) for m in int8.towers()["text"].modules()]
    assert Int8Linear in layers and nn.Linear not in layers and nn.MultiheadAttention not in layers


def test_vit_int8_embeddings_within_cosine_099_of_fp32(vit_ckpt):
    fp32, int8 = load_model(str(vit_ckpt), "cpu", "fp32"), load_model(str(vit_ckpt), "cpu", "int8")
    pixels = sample_pixels(fp32.input_resolution)
    assert cosines(encode_pixels(fp32, pixels), encode_pixels(int8, pixels)).min() >= 0.99
    texts = ["a red circle", "a photo of a dog on the beach.", "x"]
    assert cosines(encode_texts(fp32, texts), encode_texts(int8, texts)).min() >= 0.99
    visual = int8.towers()["image"]
    assert isinstance(visual.conv1, PatchEmbedding)  # the patch convolution is a matrix product too
    assert not any(isinstance(m, nn.MultiheadAttention | nn.Linear) for m in visual.modules())
    assert not any(type(m).__name__ == "QuickGELU" for m in visual.modules())
    assert any(isinstance(m, nn.SiLU) for m in visual.modules())  # folded into the MLPs' linear layers


def test_the_text_tower_is_rewritten_on_its_first_call_only(vit_ckpt):
    """Embedding images never pays for the text tower's rewrite; the first text does, once."""
    int8 = load_model(str(vit_ckpt), "cpu", "int8")
    text = int8.towers()["text"]
    encode_pixels(int8, sample_pixels(int8.input_resolution))
    assert nn.MultiheadAttention in {type(m) for m in text.modules()}
    first = encode_texts(int8, ["a red circle"])
    assert nn.MultiheadAttention not in {type(m) for m in text.modules()}
    assert SelfAttention in {type(m) for m in text.modules()}
    assert torch.allclose(encode_texts(int8, ["a red circle"]), first)


@pytest.mark.slow
def test_held_out_top1_unchanged_at_int8(bundled):
    """Top-1 of the bundled model's held-out samples, and of freshly drawn held-out images, as at fp32."""
    fp32, int8 = bundled
    rng = random.Random(9102)
    drawn = [render(rng, *rng.choice(combinations("held-out")), "varied").image for _ in range(64)]  # type: ignore[arg-type]
    held_out = sorted((ROOT / "samples" / "held-out").glob("*.jpg"))
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in held_out] + drawn
    pixels = torch.stack([preprocess(im, fp32.input_resolution) for im in images])

    def top1(lm: LoadedModel) -> list[int]:
        classifier = zero_shot_classifier(lm, LABELS, TemplateSet("t", ("a photo of a {}.",)))
        return (encode_pixels(lm, pixels) @ classifier.T).argmax(dim=1).tolist()

    expected = top1(fp32)
    assert [LABELS[i].replace(" ", "-") for i in expected[: len(held_out)]] == [p.stem for p in held_out]
    assert top1(int8) == expected


@pytest.mark.slow
def test_classify_cli_answers_the_same_at_int8(cli):
    base = ["classify", str(ROOT / "samples" / "held-out"), "-m", "tiny-shapes", "-k", "1", "-f", "csv"]
    base += ["--labels-file", str(ROOT / "samples" / "labels.txt")]
    fp32, int8 = cli(*base, "--precision", "fp32"), cli(*base, "--precision", "INT8")
    assert fp32.exit_code == 0 and int8.exit_code == 0, int8.stderr
    labels = [line.split(",")[2] for line in int8.stdout.splitlines()[1:]]
    assert labels == [line.split(",")[2] for line in fp32.stdout.splitlines()[1:]] and len(labels) == 10


def test_bench_precision_reports_cosine_and_agreement(cli):
    samples = str(ROOT / "samples")
    ran = cli("bench-precision", samples, "-m", "tiny-shapes", "--labels-file", f"{samples}/labels.txt")
    assert ran.exit_code == 0, ran.stderr
    header, fp32, int8 = (line.split("\t") for line in ran.stdout.splitlines()[:3])
    row = dict(zip(header, int8, strict=True))
    assert fp32[0] == "fp32" and row["precision"] == "int8" and int(row["images"]) == len(SAMPLES)
    assert 0.99 <= float(row["cosine_min"]) <= float(row["cosine_median"]) <= 1.0
    assert float(row["top1_agreement"]) == 1.0
    assert "CPU: " in ran.stderr

    # The gate names each image below it, so that exit 1 is never silent.
    strict = cli("bench-precision", samples, "-m", "tiny-shapes", "--min-cosine", row["cosine_median"])
    below = [line for line in strict.stderr.splitlines() if "below --min-cosine" in line]
    assert strict.exit_code == 1 and 1 <= len(below) < len(SAMPLES)
    assert all(Path(line.split(": ")[1].split(" (")[0]).name in {p.name for p in SAMPLES} for line in below)
    assert cli("bench-precision", samples, "-m", "tiny-shapes", "--min-cosine", "0.99").exit_code == 0


class Towerless(LoadedModel):
    """A family that cannot hand over its torch modules (the base class's towers() refuses)."""

    name, family = "towerless", "test"
    device = torch.device("cpu")
    precision = "fp32"
    embed_dim = 4
    image = ImageSpec(32)
    logit_scale = 100.0

    @property
    def checksum(self) -> str:
        return "0" * 64

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.zeros(len(texts), 4, dtype=torch.long)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(tokens), 4)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(pixels), 4)


def test_int8_refuses_a_family_without_towers(cli, images, monkeypatch):
    with pytest.raises(ModelError, match="does not expose its towers"):
        quantize_model(Towerless())
    import clipcli.models.loader

    monkeypatch.setattr(clipcli.models.loader, "_load_family", lambda *args: Towerless())
    ran = cli("embed", str(images[0].parent), "--precision", "int8", "--device", "cpu", "-f", "csv")
    assert ran.exit_code == 2
    assert ran.stderr.count("\n") == 1 and ran.stderr.startswith("Error: ") and "towers" in ran.stderr


def test_int8_refuses_a_device_other_than_the_cpu(cli, images):
    for device in ("cuda", "cuda:1", "mps", "meta"):
        with pytest.raises(ModelError, match="runs on the CPU only"):
            check_int8_device(torch.device(device))
    on_gpu = Towerless()
    on_gpu.device = torch.device("cuda")
    with pytest.raises(ModelError, match="CPU only"):
        quantize_model(on_gpu)
    ran = cli("embed", str(images[0]), "-m", "tiny-shapes", "--device", "cuda", "--precision", "int8", "-f", "csv")
    if not torch.cuda.is_available():
        assert ran.exit_code == 2 and ran.stderr.startswith("Error: ") and ran.stderr.count("\n") == 1


def test_auto_never_picks_int8():
    assert resolve_precision("int8", torch.device("cpu")) == "int8"
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_matches_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    x = torch.randn(5, 3, 64).transpose(0, 1) if batch_first else torch.randn(5, 3, 64)
    y = torch.randn(*x.shape)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    padding = torch.tensor([[False] * 4 + [True]] * 3)
    ours = SelfAttention(mha)
    cases = [
        dict(query=x, key=x, value=x, attn_mask=causal),
        dict(query=x, key=x, value=x, attn_mask=causal.isinf()),  # bool: True may not attend
        dict(query=x, key=x, value=x, key_padding_mask=padding),
        dict(query=x, key=y, value=y),  # cross-attention
    ]
    with torch.inference_mode():
        for kwargs in cases:
            expected = mha(**kwargs, need_weights=False)[0]
            got = ours(**kwargs, need_weights=False)[0]
            assert got.shape == expected.shape
            assert nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.999


def test_patch_embedding_matches_the_convolution_on_any_size():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 32, kernel_size=8, stride=8, bias=False)
    assert PatchEmbedding.can_replace(conv) and not PatchEmbedding.can_replace(nn.Conv2d(3, 8, 3, stride=2))
    for size in ((32, 32), (35, 41)):  # the pixels past the last whole patch are dropped, as conv2d does
        x = torch.randn(2, 3, *size)
        with torch.inference_mode():
            expected, got = conv(x), PatchEmbedding(conv)(x)
        assert got.shape == expected.shape
        assert nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.999


@pytest.mark.parametrize("family", ["clip.model", "open_clip.transformer"])
def test_quick_gelu_folded_into_an_mlp_gives_the_same_outputs(family):
    """Linear, QuickGELU, Linear in a Sequential: the 1.702 scalings move into the weights, and the MLP's
    output is the same to float rounding; the caller's weights are left as they were."""
    import importlib
    from collections import OrderedDict

    from clipcli.models.quantize import _fold_quick_gelu

    torch.manual_seed(0)
    act = importlib.import_module(family).QuickGELU
    parts = [("c_fc", nn.Linear(64, 256)), ("gelu", act()), ("c_proj", nn.Linear(256, 64))]
    mlp = nn.Sequential(OrderedDict(parts))
    tensors = (mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight)
    original = [t.clone() for t in tensors]
    x = torch.randn(10, 64) * 3
    with torch.inference_mode():
        want = mlp(x)
    _fold_quick_gelu(mlp)
    assert isinstance(mlp.gelu, nn.SiLU) and mlp.gelu.inplace
    with torch.inference_mode():
        assert torch.allclose(mlp(x), want, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(original, tensors, strict=True))  # scaled copies, not these
    assert not torch.equal(mlp.c_fc.weight, original[0])
    loose = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), act(), nn.Linear(4, 4))  # not between two linears
    _fold_quick_gelu(loose)
    assert type(loose[2]) is act


@pytest.mark.parametrize("family", ["clip.model", "open_clip.transformer"])
def test_fused_quick_gelu_equals_each_familys_own(family):
    import importlib

    theirs = importlib.import_module(family).QuickGELU()
    x = torch.randn(64, 300) * 6
    kept = x.clone()
    with torch.inference_mode():
        assert torch.allclose(FusedQuickGELU()(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(x, kept)  # the input is left as it was: a residual may still read it
