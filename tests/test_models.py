"""Model registry and loading: names, local checkpoints in both layouts, and clear errors."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from clipcli.errors import ModelError
from clipcli.models import load_model
from clipcli.models.families.openai import ARCHITECTURES, OPENAI_MODELS, Architecture, import_clip, read_state_dict
from clipcli.models.precision import keep_freed_memory, resolve_precision

ROOT = Path(__file__).resolve().parent.parent


def test_names_match_the_clip_package():
    clip = import_clip()
    assert list(OPENAI_MODELS) == clip.available_models()
    assert {n: u.split("/", 3)[-1] for n, u in clip.clip._MODELS.items()} == {
        n: f"clip/models/{p}" for n, p in OPENAI_MODELS.items()
    }


@pytest.mark.parametrize("name", ["ViT-B/32", "RN50", "test-vit", "test-rn", "tiny-shapes"])
def test_architecture_round_trips_through_a_state_dict(name):
    arch = ARCHITECTURES[name]
    if name in ("ViT-B/32", "RN50"):
        with torch.device("meta"):
            sd = arch.build().state_dict()
    else:
        sd = arch.build().state_dict()
    assert Architecture.from_state_dict(sd) == arch


def test_plain_state_dict_loads_as_fp32(vit_ckpt):
    lm = load_model(str(vit_ckpt), "cpu", "fp32")
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert lm.architecture == ARCHITECTURES["test-vit"]
    assert len(lm.checksum) == 64


def test_torchscript_archive_is_rebuilt_as_the_same_model(vit_ckpt, tmp_path):
    clip = import_clip()
    model, _ = clip.load(str(vit_ckpt), device="cpu", jit=False)
    model.eval()
    image = torch.randn(1, 3, 32, 32)
    text = clip.tokenize(["a dog"])
    traced = torch.jit.trace(model, (image, text), check_trace=False)
    archive = tmp_path / "traced.pt"
    torch.jit.save(traced, str(archive))
    sd = read_state_dict(archive)
    plain = read_state_dict(vit_ckpt)
    assert set(sd) == set(plain)
    lm = load_model(str(archive), "cpu", "fp32")
    with torch.no_grad():
        assert torch.allclose(lm.model.encode_image(image), model.encode_image(image), atol=1e-5)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello")
    with pytest.raises(ModelError, match=r"junk.pt: not a readable checkpoint"):
        load_model(str(junk), "cpu")
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ModelError, match=r"other.pt: not a CLIP checkpoint \(missing"):
        load_model(str(other), "cpu")
    with pytest.raises(ModelError, match="is a directory"):
        load_model(str(tmp_path), "cpu")
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)  # said to be missing before; never opened
    with pytest.raises(ModelError, match=r"fifo\.pt: is not a regular file"):
        load_model(str(fifo), "cpu")


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"text_projection": object()}, evil)
    with pytest.raises(ModelError, match=r"evil\.pt: contains code or objects clipcli will not load"):
        load_model(str(evil), "cpu")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ModelError) as info:
        load_model("ViT-Z/99", "cpu")
    assert "ViT-B/32" in str(info.value) and "tiny-shapes" in str(info.value)
    with pytest.raises(ModelError, match="no such checkpoint file"):
        load_model("/opt/models/nothing.pt", "cpu")


def test_offline_error_names_model_cache_and_local_option(cli, tmp_path, monkeypatch, images):
    # Point the downloader at a closed port on this machine: the same failure as having no network.
    env = {"CLIPCLI_CACHE": str(tmp_path / "cache"), "CLIPCLI_MIRROR": "http://127.0.0.1:9/clip"}
    ran = cli("classify", str(images[0]), "--labels", "a,b", "--model", "ViT-B/16", env=env)
    assert ran.exit_code == 2
    line = ran.stderr.strip()
    assert "\n" not in line
    assert "ViT-B/16" in line and str(tmp_path / "cache") in line and "--model /path/to/ViT-B-16.pt" in line
    assert not list((tmp_path / "cache").glob("*"))


def test_default_model_comes_from_the_environment(cli, images, vit_ckpt, tmp_path):
    ran = cli("classify", str(images[0]), "--labels", "a,b", "-f", "csv", env={"CLIPCLI_MODEL": str(vit_ckpt)})
    assert ran.exit_code == 0, ran.stderr


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(ModelError, match="unknown precision"):
        resolve_precision("fp8", cpu)


_PAGE_FAULTS = """
import resource, sys, torch
from clipcli.models import load_model

def faults():
    torch.ones(1 << 24).sum()  # 64 MiB, touched, freed: as a forward pass's activations are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(1 << 24).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults(), end=" ")
load_model("tiny-shapes", "cpu", sys.argv[1])
print(faults())
"""


@pytest.mark.parametrize("tunables", [None, "glibc.malloc.perturb=0"])
def test_a_cpu_model_keeps_freed_activations_for_the_next_batch(tunables):
    """Large blocks freed by one batch are reused by the next, not mapped and page-faulted in again;
    malloc tunables the user set are left alone."""
    if platform.libc_ver()[0] != "glibc":  # macOS, musl: malloc is left as it is
        assert not keep_freed_memory()
        return
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    done = subprocess.run(
        [sys.executable, "-c", _PAGE_FAULTS, "fp32"], capture_output=True, text=True, env=env, check=True
    )
    before, after = map(int, done.stdout.split())
    assert before > 5 * 32  # each 64 MiB block mapped afresh: at least one fault per 2 MiB page
    if tunables:
        assert after > 5 * 32
    else:
        assert after < 20


def test_bf16_embeddings_stay_close_to_fp32(vit_ckpt, images):
    from clipcli.images.sources import discover
    from clipcli.zeroshot.encode import iter_image_embeddings

    refs, _ = discover([str(images[0].parent)])
    a = torch.cat([b.embeddings for b in iter_image_embeddings(load_model(str(vit_ckpt), "cpu", "fp32"), refs)])
    b = torch.cat([b.embeddings for b in iter_image_embeddings(load_model(str(vit_ckpt), "cpu", "bf16"), refs)])
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99


def test_unknown_device_is_a_usage_error(cli, images, vit_ckpt):
    ran = cli("classify", str(images[0]), "--labels", "a,b", "-m", str(vit_ckpt), "--device", "tpu")
    assert ran.exit_code == 2 and "unknown device 'tpu'" in ran.stderr


def test_models_command_lists_names_and_cache(cli, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "RN50.pt").write_bytes(b"x" * 2048)
    ran = cli("models", env={"CLIPCLI_CACHE": str(cache)})
    assert ran.exit_code == 0
    for name in [*OPENAI_MODELS, "tiny-shapes"]:
        assert name in ran.stdout
    assert "cached" in ran.stdout and str(cache) in ran.stdout


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from clipcli.cli import app; sys.argv=['clipcli','--help']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "heavy = sorted({'torch', 'PIL', 'numpy', 'pandas', 'pyarrow'} & set(sys.modules))\n"
        "assert not heavy, f'{heavy} imported'\nprint('checked')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "classify" in done.stdout and done.stdout.endswith("checked\n")


@pytest.mark.parametrize("output", ["-f jsonl", "-o {tmp}/emb/"])
@pytest.mark.slow
def test_embedding_imports_neither_torchvision_nor_pandas(tmp_path, output):
    """clip's __init__ pulls in torchvision and torch's compiler stack, pa.array() pandas: ~330 MiB for nothing."""
    argv = ["clipcli", "embed", "samples/seen", "-m", "tiny-shapes", *output.format(tmp=tmp_path).split()]
    code = (
        f"import sys; from clipcli.cli import app\nsys.argv={argv!r}\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "leaked = [m for m in ('torchvision', 'clip', 'pkg_resources', 'sympy', 'pandas') if m in sys.modules]\n"
        "assert not leaked, leaked\nprint('checked')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("checked\n")
    if "jsonl" in output:
        assert done.stdout.count('"embedding"') == 16
    else:
        assert len(pd.read_parquet(tmp_path / "emb")) == 16


def test_tokenize_lays_out_tokens_as_clip_does():
    from clipcli.models.families.openai import tokenize

    texts = ["a dog", "a photo of a purple hexagon.", "", "ünïcödé & <html> punctuation!!"]
    assert torch.equal(tokenize(texts), import_clip().tokenize(texts))
    assert torch.equal(tokenize(texts, 16), import_clip().tokenize(texts, 16))


def test_python_dash_m_and_version():
    done = subprocess.run([sys.executable, "-m", "clipcli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("clipcli ")


@pytest.mark.slow
def test_the_console_entry_flushes_output_and_keeps_exit_codes(tmp_path):
    """main() leaves through os._exit, so what it printed and the exit status must survive that."""
    run = [sys.executable, "-m", "clipcli", "embed", "-m", "tiny-shapes", "-f", "jsonl"]
    done = subprocess.run([*run, "samples/seen", str(tmp_path / "gone.jpg")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1  # one input skipped
    assert len(done.stdout.splitlines()) == 16 and "gone.jpg" in done.stderr
    usage = subprocess.run([*run, "--no-such-option"], capture_output=True, text=True, cwd=ROOT)
    assert usage.returncode == 2 and "No such option" in usage.stderr


def test_building_for_a_state_dict_leaves_torch_init_as_it_was():
    """The no-op fills are only in place while the model is built (loading is checked by parity tests)."""
    from torch.nn import init

    from clipcli.models.families.openai import ARCHITECTURES

    before = {name: getattr(init, name) for name in ("normal_", "uniform_", "kaiming_uniform_", "zeros_")}
    model = ARCHITECTURES["test-vit"].build(initialize=False)
    assert {name: getattr(init, name) for name in before} == before
    weight = torch.zeros(4, 4)
    init.normal_(weight)
    assert weight.abs().sum() > 0
    assert model.transformer.resblocks[0].attn_mask.isinf().any()  # the causal mask is built, not skipped
