"""`clipcli embed`: reference parity, every format, stdin, incremental reruns, and kill -9 safety."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_image
from PIL import Image

from clipcli.models.families.openai import import_clip
from clipcli.store.npy import open_npy


def reference_embeddings(ckpt: Path, files: list[Path]) -> np.ndarray:
    clip = import_clip()
    model, preprocess = clip.load(str(ckpt), device="cpu", jit=False)
    with torch.no_grad():
        feats = model.encode_image(torch.stack([preprocess(Image.open(f)) for f in files]))
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


def read_dataset(folder: Path) -> pd.DataFrame:
    return ds.dataset(folder, format="parquet").to_table().to_pandas().sort_values("path").reset_index(drop=True)


@pytest.mark.parametrize("ckpt_name", ["vit_ckpt", "rn_ckpt"])
def test_embeddings_equal_the_reference(cli, images, tmp_path, request, ckpt_name):
    ckpt = request.getfixturevalue(ckpt_name)
    out = tmp_path / "emb.npy"
    ran = cli("embed", str(images[0].parent), "-m", str(ckpt), "--exact", "--precision", "fp32", "-o", str(out))
    assert ran.exit_code == 0, ran.stderr
    got = np.load(out)
    saved = open_npy(out)
    order = [saved.name(i) for i in range(len(got))]
    ref = reference_embeddings(ckpt, [Path(p) for p in order])
    cosine = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_every_format_reads_back(cli, images, tmp_path, vit_ckpt):
    folder = str(images[0].parent)
    base = ["embed", folder, "-m", str(vit_ckpt), "--precision", "fp32"]
    assert cli(*base, "-o", str(tmp_path / "e.parquet")).exit_code == 0
    frame = pq.read_table(tmp_path / "e.parquet").to_pandas()
    columns = ["path", "embedding", "width", "height", "bytes", "mtime", "model"]
    metadata = ["folder", "taken", "camera_make", "camera_model", "gps_lat", "gps_lon", "t", "caption"]
    assert list(frame.columns) == columns + metadata
    assert len(frame) == 5 and len(frame["embedding"][0]) == 64
    assert frame["width"].tolist()[0] == 64 and frame["bytes"][0] == images[0].stat().st_size
    assert frame["model"][0] == str(vit_ckpt)
    matrix = np.stack(frame["embedding"])
    csv = pd.read_csv(io.StringIO(cli(*base).stdout))
    assert list(csv["path"]) == list(frame["path"])
    assert np.allclose(csv.drop(columns="path").to_numpy(), matrix, atol=1e-6)
    lines = cli(*base, "-f", "jsonl").stdout.splitlines()
    assert np.allclose(np.array([json.loads(x)["embedding"] for x in lines]), matrix, atol=1e-6)
    assert cli(*base, "--dtype", "float16", "--no-normalize", "-o", str(tmp_path / "h.parquet")).exit_code == 0
    half = pq.read_table(tmp_path / "h.parquet")
    assert str(half.schema.field("embedding").type.value_type) == "halffloat"
    raw = np.stack(half.to_pandas()["embedding"]).astype(np.float32)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-3)
    assert cli(*base, "-o", str(tmp_path / "d/")).exit_code == 0
    assert np.allclose(
        np.stack(read_dataset(tmp_path / "d")["embedding"]), matrix[np.argsort(frame["path"])], atol=1e-6
    )
    assert pd.read_parquet(tmp_path / "d").shape[0] == 5


def test_paths_from_stdin(cli, images, vit_ckpt):
    stdin = "".join(f"{p}\n" for p in images[:2])
    ran = cli("embed", "-", "-m", str(vit_ckpt), "-f", "jsonl", input=stdin)
    assert [json.loads(x)["path"] for x in ran.stdout.splitlines()] == [str(p) for p in images[:2]]


def test_text_embeddings(cli, vit_ckpt, tmp_path):
    ran = cli("embed", "--text", "a dog", "a cat", "-m", str(vit_ckpt), "-f", "jsonl")
    rows = [json.loads(x) for x in ran.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["a dog", "a cat"]
    from clipcli.models import load_model
    from clipcli.zeroshot.encode import encode_texts

    lm = load_model(str(vit_ckpt), "auto", "auto")
    assert np.allclose(
        np.array([r["embedding"] for r in rows]), encode_texts(lm, ["a dog", "a cat"]).numpy(), atol=1e-5
    )
    ran = cli(
        "embed",
        "--text",
        "-",
        "-m",
        str(vit_ckpt),
        "--template",
        "a photo of a {}.",
        "-o",
        str(tmp_path / "t.npy"),
        input="dog\ncat\n",
    )
    assert ran.exit_code == 0 and np.load(tmp_path / "t.npy").shape == (2, 64)


def test_rerun_embeds_only_new_and_changed_files_and_drops_removed(cli, images, tmp_path, vit_ckpt):
    folder = images[0].parent
    out = tmp_path / "emb"
    first = cli("embed", str(folder), "-m", str(vit_ckpt), "-o", str(out) + "/")
    assert first.exit_code == 0 and "embedded 5, unchanged 0, removed 0" in first.stderr
    before = read_dataset(out)
    make_image(folder / "new.png", seed=40)
    make_image(images[1], (70, 50), seed=41)  # changed content and size
    os.utime(images[1], (time.time() + 5, time.time() + 5))
    images[2].unlink()
    second = cli("embed", str(folder), "-m", str(vit_ckpt), "-o", str(out))
    assert second.exit_code == 0
    assert "embedded 2, unchanged 3, removed 1, skipped 0" in second.stderr
    after = read_dataset(out)
    assert sorted(after["path"]) == sorted(str(p) for p in [*images[:2], *images[3:], folder / "new.png"])
    kept = before.set_index("path").loc[[str(images[0]), str(images[3])], "embedding"]
    for path, emb in kept.items():
        assert np.array_equal(after.set_index("path").loc[path, "embedding"], emb)
    assert not np.array_equal(
        after.set_index("path").loc[str(images[1]), "embedding"],
        before.set_index("path").loc[str(images[1]), "embedding"],
    )
    third = cli("embed", str(folder), "-m", str(vit_ckpt), "-o", str(out))
    assert "embedded 0, unchanged 5, removed 0" in third.stderr
    # a single Parquet file is incremental too
    single = tmp_path / "one.parquet"
    cli("embed", str(folder), "-m", str(vit_ckpt), "-o", str(single))
    (folder / "new.png").unlink()
    again = cli("embed", str(folder), "-m", str(vit_ckpt), "-o", str(single))
    assert "embedded 0, unchanged 4, removed 1" in again.stderr
    assert len(pq.read_table(single)) == 4


def test_another_model_is_refused(cli, images, tmp_path, vit_ckpt, rn_ckpt):
    out = tmp_path / "emb"
    cli("embed", str(images[0].parent), "-m", str(vit_ckpt), "-o", str(out) + "/")
    ran = cli("embed", str(images[0].parent), "-m", str(rn_ckpt), "-o", str(out) + "/")
    assert ran.exit_code == 2 and "made with" in ran.stderr and str(vit_ckpt) in ran.stderr


@pytest.mark.slow
def test_killed_run_then_rerun_equals_an_uninterrupted_run(tmp_path, vit_ckpt):
    folder = tmp_path / "many"
    for i in range(160):
        make_image(folder / f"img{i}.jpg", (200, 150), seed=i)
    clipcli = [
        sys.executable,
        "-m",
        "clipcli",
        "embed",
        str(folder),
        "-m",
        str(vit_ckpt),
        "--precision",
        "fp32",
        "-b",
        "4",
        "--part-size",
        "8",
    ]
    subprocess.run([*clipcli, "-o", str(tmp_path / "whole")], check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*clipcli, "-o", str(killed)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("part-*.parquet"))) < 4:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    parts = list(killed.glob("part-*.parquet"))
    assert 4 <= len(parts) < 20, "the run should have been killed part-way"
    for part in killed.iterdir():  # only whole parts are visible under their final names
        if part.name.startswith("part-"):
            pq.read_table(part)
    rerun = subprocess.run([*clipcli, "-o", str(killed)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "unchanged 0" not in rerun.stderr
    a, b = read_dataset(tmp_path / "whole"), read_dataset(killed)
    assert list(a["path"]) == list(b["path"]) and len(b) == 160
    assert all(np.array_equal(x, y) for x, y in zip(a["embedding"], b["embedding"], strict=True))
    assert not [p for p in killed.iterdir() if not p.name.startswith("part-")]
    shutil.rmtree(folder)


def test_text_embeddings_into_a_directory_name_the_reason(cli, tmp_path):
    ran = cli("embed", "--text", "a dog", "-m", "tiny-shapes", "-o", f"{tmp_path / 'tdir'}/")
    assert ran.exit_code == 2
    assert ran.stderr.strip() == (
        f"Error: {tmp_path / 'tdir'}/: --text writes one file (.parquet, .npy, .csv or .jsonl), not a dataset directory"
    )
    assert not (tmp_path / "tdir").exists()
