"""WebDataset shards as inputs (``SHARD.tar#KEY`` rows, captions, skipped members named, incremental and
resumable per shard, whole shards per job) and CLIP_benchmark's WebDataset layout for ``eval``. The
shards are written by the real ``webdataset`` package (``tests/wds_helpers.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from wds_helpers import (
    Item,
    corrupt_item,
    images_folder,
    png_bytes,
    sample_items,
    shape_items,
    truncate,
    write_shard,
    write_shards,
)

MODEL = ("-m", "tiny-shapes", "--precision", "fp32")


def read_rows(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder).sort_values("path").reset_index(drop=True)


def summary(stderr: str) -> dict[str, int]:
    line = [ln for ln in stderr.splitlines() if ln.startswith("embedded ")][-1]
    return {k: int(v) for k, v in (part.strip().split(" ") for part in line.split(","))}


@pytest.mark.slow
def test_shard_samples_embed_as_their_loose_files_with_captions_and_member_paths(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items = sample_items()
    write_shard(Path("shards/a.tar"), items[:12])
    write_shard(Path("shards/b.tar"), items[12:], caption="json")
    images_folder(Path("loose"), items)
    ran = cli("embed", "shards/a.tar", "shards/b.tar", *MODEL, "-o", "emb/")
    assert ran.exit_code == 0, ran.stderr
    rows = read_rows(Path("emb"))
    assert sorted(rows["path"]) == sorted(
        [f"shards/a.tar#{i.key}" for i in items[:12]] + [f"shards/b.tar#{i.key}" for i in items[12:]]
    )
    captions = dict(zip(rows["path"], rows["caption"], strict=True))
    assert all(captions[f"shards/{'a' if n < 12 else 'b'}.tar#{i.key}"] == i.caption for n, i in enumerate(items))
    assert set(rows["folder"]) == {"shards"}
    assert set(rows["bytes"]) == {os.path.getsize("shards/a.tar"), os.path.getsize("shards/b.tar")}
    ran = cli("embed", "loose", *MODEL, "-o", "loose.parquet")
    assert ran.exit_code == 0, ran.stderr
    loose = pd.read_parquet("loose.parquet")
    by_key = {Path(p).stem: e for p, e in zip(loose["path"], loose["embedding"], strict=True)}
    for path, emb in zip(rows["path"], rows["embedding"], strict=True):
        assert np.abs(np.asarray(emb) - by_key[path.split("#")[1]]).max() < 1e-6


def test_a_brace_pattern_a_folder_and_the_shards_themselves_name_the_same_rows(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shards(Path("shards/%06d.tar"), shape_items(9), per_shard=4)  # 3 shards: 4 + 4 + 1
    outputs = {}
    for name, args in {
        "braces": ["shards/{000000..000002}.tar"],
        "folder": ["shards"],
        "files": ["shards/000000.tar", "shards/000001.tar", "shards/000002.tar"],
    }.items():
        ran = cli("embed", *args, *MODEL, "-f", "csv")
        assert ran.exit_code == 0, ran.stderr
        outputs[name] = [line.split(",")[0] for line in ran.stdout.splitlines()[1:]]
    assert outputs["braces"] == outputs["folder"] == outputs["files"]
    assert outputs["files"][:5] == [f"shards/000000.tar#{i:06d}" for i in range(4)] + ["shards/000001.tar#000004"]
    ran = cli("embed", "shards/{000000..000003}.tar", *MODEL, "-f", "csv")
    assert ran.exit_code == 1 and "shards/000003.tar: no such file or directory" in ran.stderr


def test_bad_members_and_a_truncated_shard_are_named_and_the_rest_is_used(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items = shape_items(8)
    write_shard(Path("good.tar"), [*items[:3], corrupt_item("bad"), *items[3:6]])
    no_image = Item("textonly", b"", "txt", "only a caption", "red circle")
    write_shard(Path("mixed.tar"), [items[6]])
    import webdataset as wds

    with wds.TarWriter("noimage.tar") as sink:
        sink.write({"__key__": "textonly", "txt": no_image.caption})
        sink.write({"__key__": "fine", "png": png_bytes()})
    write_shard(Path("cut.tar"), items)
    truncate(Path("cut.tar"), 0.5)
    ran = cli("embed", "good.tar", "noimage.tar", "cut.tar", *MODEL, "-f", "csv")
    assert ran.exit_code == 1
    paths = [line.split(",")[0] for line in ran.stdout.splitlines()[1:]]
    assert "good.tar#bad" not in paths and [p for p in paths if p.startswith("good.tar")] == [
        f"good.tar#{i.key}" for i in items[:6]
    ]
    assert "noimage.tar#fine" in paths
    cut = [p for p in paths if p.startswith("cut.tar#")]
    assert 1 <= len(cut) < len(items) and cut == [f"cut.tar#{i.key}" for i in items[: len(cut)]]
    lines = ran.stderr.splitlines()
    assert any("good.tar#bad" in ln for ln in lines)
    assert any("noimage.tar#textonly" in ln and "no image" in ln for ln in lines)
    assert any(ln.startswith("skipped cut.tar") and "truncated shard" in ln for ln in lines)
    ran = cli("embed", "notatar.tar", *MODEL, "-f", "csv")
    assert ran.exit_code == 2


def _damage(shard: Path, how: str) -> int:
    """Damage ``shard`` (six samples of two members) at its fourth sample, as tarfile alone would not
    notice, or would loop on; returns how many samples come before the damage."""
    import tarfile

    with tarfile.open(shard) as tar:
        headers = [m.offset for m in tar.getmembers()]
    data = bytearray(shard.read_bytes())
    at = headers[6]  # the fourth sample's first header
    if how == "first-header-negative":
        at = 0
    if how in ("negative-size", "first-header-negative"):
        block = data[at : at + 512]
        block[124:136] = b"\xff" + (256**11 - 512).to_bytes(11, "big")  # base-256: -512
        block[148:156] = b" " * 8
        block[148:156] = (f"{sum(block):06o}\0 ").encode()
        data[at : at + 512] = block
    elif how == "zeroed-header":
        data[at : at + 512] = bytes(512)
    elif how == "bad-checksum":
        data[at + 148 : at + 150] = b"99"
    elif how == "zero-tail":
        data[at:] = bytes(len(data) - at + 100 * 1024)  # a preallocated download that stopped
    elif how in ("huge-pax", "small-then-huge-pax", "huge-solaris-X", "pax-chain-of-600"):
        sizes = {"huge-pax": [200_000], "small-then-huge-pax": [100, 200_000], "huge-solaris-X": [200_000]}
        kind = b"X" if how == "huge-solaris-X" else tarfile.XHDTYPE
        chain = b""
        for size in sizes.get(how, [20] * 600):
            pax = tarfile.TarInfo("././@PaxHeader")
            pax.type, pax.size = kind, size
            chain += pax.tobuf(format=tarfile.USTAR_FORMAT) + b"1" * size + bytes((-size) % 512)
        data[at:at] = chain
    shard.write_bytes(bytes(data))
    return 0 if how == "first-header-negative" else 3


@pytest.mark.parametrize(
    "how",
    [
        "negative-size",
        "first-header-negative",
        "zeroed-header",
        "bad-checksum",
        "zero-tail",
        "huge-pax",
        "small-then-huge-pax",
        "huge-solaris-X",
        "pax-chain-of-600",
    ],
)
def test_a_damaged_shard_is_reported_and_its_samples_before_the_damage_used(tmp_path, how):
    """Found by attack: a negative member size made tarfile read the same header for ever (the run hung);
    a damaged or zeroed header, or a download's zero tail, read as the archive's end, so the samples
    after it were lost with exit 0 and no word; a 200 KB pax header took 43 s to parse. Each is now one
    line naming the shard and the byte, the samples before it embedded, exit 1, within seconds."""
    items = shape_items(6)
    shard = write_shard(tmp_path / "s.tar", items)
    before = _damage(shard, how)
    started = time.monotonic()
    ran = subprocess.run(
        [sys.executable, "-m", "clipcli", "embed", str(shard), *MODEL, "-f", "jsonl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - started < 60, how
    assert ran.returncode == 1, ran.stderr
    rows = [json.loads(line)["path"] for line in ran.stdout.splitlines()]
    assert rows == [f"{shard}#{i.key}" for i in items[:before]], ran.stdout
    skipped = [line for line in ran.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {shard}: damaged shard ("), ran.stderr
    assert "Traceback" not in ran.stderr


@pytest.mark.parametrize("content", [b"this is not a tar archive" * 40, b"notatar\n", b""], ids=["1000", "8", "0"])
def test_a_file_that_is_no_tar_is_skipped_naming_it(cli, tmp_path, monkeypatch, content):
    """As a file that is no picture: skipped with the reason, the run's (empty) output written, exit 1."""
    monkeypatch.chdir(tmp_path)
    Path("fake.tar").write_bytes(content)
    ran = cli("embed", "fake.tar", *MODEL, "-f", "csv")
    assert ran.exit_code == 1 and ran.stdout.startswith("path,")
    assert ran.stderr.startswith("skipped fake.tar: not a tar file (") and "Traceback" not in ran.stderr


def test_a_rerun_skips_unchanged_shards_and_reembeds_a_changed_one(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items = shape_items(12)
    write_shard(Path("a.tar"), items[:6])
    write_shard(Path("b.tar"), items[6:])
    assert cli("embed", ".", *MODEL, "-o", "emb/").exit_code == 0
    again = cli("embed", ".", *MODEL, "-o", "emb/")
    assert summary(again.stderr) == {"embedded": 0, "unchanged": 12, "removed": 0, "skipped": 0}
    Path("sub").mkdir()
    monkeypatch.chdir("sub")  # the same shards named from another folder are the same rows
    elsewhere = cli("embed", "../a.tar", "../b.tar", *MODEL, "-o", "../emb/")
    assert summary(elsewhere.stderr) == {"embedded": 0, "unchanged": 12, "removed": 0, "skipped": 0}
    monkeypatch.chdir(tmp_path)
    write_shard(Path("b.tar"), items[6:10])  # b.tar rewritten with two samples fewer
    changed = cli("embed", ".", *MODEL, "-o", "emb/")
    assert summary(changed.stderr) == {"embedded": 4, "unchanged": 6, "removed": 2, "skipped": 0}
    rows = read_rows(Path("emb"))
    assert list(rows["path"]) == sorted([f"a.tar#{i.key}" for i in items[:6]] + [f"b.tar#{i.key}" for i in items[6:10]])


def test_a_part_never_splits_a_shard(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shards(Path("shards/%06d.tar"), shape_items(14), per_shard=5)  # 5 + 5 + 4
    ran = cli("embed", "shards", *MODEL, "-o", "emb/", "--part-size", "3", "--batch-size", "2")
    assert ran.exit_code == 0, ran.stderr
    owners = [
        sorted({p.split("#")[0] for p in pd.read_parquet(part)["path"]}) for part in sorted(Path("emb").glob("*"))
    ]
    seen = [shard for shards in owners for shard in shards]
    assert len(seen) == len(set(seen)) == 3  # each shard's rows in one part


@pytest.mark.slow
def test_kill_9_mid_run_leaves_whole_shards_and_the_rerun_completes_them_once(tmp_path):
    shards = write_shards(tmp_path / "shards" / "%06d.tar", shape_items(60), per_shard=6)  # 10 shards
    out = tmp_path / "emb"
    command = [sys.executable, "-m", "clipcli", "embed", "shards", *MODEL, "-o", "emb/", "--part-size", "4"]
    proc = subprocess.Popen([*command, "--batch-size", "2"], cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.glob("part-*.parquet"))) < 2 and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()
    parts = list(out.glob("part-*.parquet"))
    assert parts
    found = pd.concat([pd.read_parquet(p) for p in parts])
    per_shard = found["path"].str.split("#").str[0].value_counts()
    assert (per_shard == 6).all() and len(per_shard) < len(shards)  # whole shards only, and not all of them
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert summary(rerun.stderr)["unchanged"] == 6 * len(per_shard)
    rows = read_rows(out)
    assert rows["path"].is_unique and len(rows) == 60


@pytest.mark.slow
def test_classify_rank_and_dedup_read_shards(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items = sample_items()
    write_shard(Path("s.tar"), [*items[:6], Item("copy", items[2].image, "jpg", "again", items[2].label)])
    labels = str(Path(__file__).resolve().parent.parent / "samples" / "labels.txt")
    ran = cli("classify", "s.tar", *MODEL, "--labels-file", labels, "-k", "1", "-f", "csv")
    assert ran.exit_code == 0, ran.stderr
    predicted = {line.split(",")[0]: line.split(",")[2] for line in ran.stdout.splitlines()[1:]}
    assert predicted["s.tar#copy"] == items[2].label
    assert sum(predicted[f"s.tar#{i.key}"] == i.label for i in items[:6]) >= 5
    ran = cli("rank", f"a {items[4].label}", "s.tar", *MODEL, "-f", "csv")
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout.splitlines()[1].split(",")[0] == f"s.tar#{items[4].key}"
    ran = cli("dedup", "s.tar", *MODEL, "-f", "csv")
    assert ran.exit_code == 0, ran.stderr
    assert {"s.tar#copy", f"s.tar#{items[2].key}"} <= set(ran.stdout.replace(",", " ").split())  # one group
    # A sample is no file of its own: `dedup --keep` (paths one could delete) never lists one.
    ran = cli("dedup", "s.tar", *MODEL, "--keep", "first")
    assert ran.exit_code == 0 and ran.stdout == "", (ran.stdout, ran.stderr)
    assert "found 0 groups" in ran.stderr, ran.stderr  # --keep groups files of their own only


@pytest.mark.slow
def test_sharded_jobs_take_whole_tar_shards(cli, tmp_path, monkeypatch):
    from clipcli.store.shard import shard_of

    monkeypatch.chdir(tmp_path)
    write_shards(Path("shards/%06d.tar"), shape_items(24), per_shard=3)  # 8 shards
    jobs: dict[str, set[int]] = {}
    for job in range(3):
        ran = cli("embed", "shards", *MODEL, "-o", "emb/", "--shard", f"{job}/3")
        assert ran.exit_code == 0, ran.stderr
        for part in Path("emb").glob(f"part-*-s{job}of3.parquet"):
            for path in pd.read_parquet(part)["path"]:
                jobs.setdefault(path.split("#")[0], set()).add(job)
    rows = read_rows(Path("emb"))
    assert rows["path"].is_unique and len(rows) == 24
    assert len(jobs) == 8 and all(len(owners) == 1 for owners in jobs.values())  # each tar in one job's parts
    assert len({job for owners in jobs.values() for job in owners}) > 1  # and the tars spread over jobs
    assert all(jobs[shard] == {shard_of(shard, 3)} for shard in jobs)


@pytest.mark.slow
def test_ray_takes_whole_tar_shards_and_keeps_their_captions(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    items = shape_items(15)
    write_shards(Path("shards/%06d.tar"), items, per_shard=5)
    ran = cli("embed", "shards", *MODEL, "-o", "local/")
    assert ran.exit_code == 0, ran.stderr
    ran = cli("embed", "shards", *MODEL, "-o", "ray/", "--engine", "ray", "--batch-size", "2")
    assert ran.exit_code == 0, ran.stderr
    for part in Path("ray").glob("part-*.parquet"):
        assert len(set(pd.read_parquet(part)["path"].str.split("#").str[0])) == 1
    local, ray = read_rows(Path("local")), read_rows(Path("ray"))
    assert list(local["path"]) == list(ray["path"]) and list(local["caption"]) == list(ray["caption"])
    assert ray["caption"].notna().all()
    assert np.abs(np.stack(local["embedding"]) - np.stack(ray["embedding"])).max() < 1e-6


def test_without_the_webdataset_extra_a_shard_is_one_line_naming_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shard(Path("a.tar"), shape_items(2))
    from clipcli.images import webdataset

    monkeypatch.setattr(webdataset.INDEXES, "cache", OrderedDict())  # no index made while it was installed
    monkeypatch.setitem(sys.modules, "webdataset.tariterators", None)
    ran = cli("embed", "a.tar", *MODEL, "-f", "csv")
    assert ran.exit_code == 2
    assert "webdataset extra" in ran.stderr and "pip install 'clipcli[webdataset]'" in ran.stderr


# -- eval on CLIP_benchmark's WebDataset layout ------------------------------------------------------


def benchmark(root: Path, items: list[Item], classes: list[str], per_shard: int = 5) -> Path:
    """``root`` in CLIP_benchmark's layout: classnames, templates ({c}), test/nshards.txt and shards."""
    index = {name: i for i, name in enumerate(classes)}
    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    chunks = [items[i : i + per_shard] for i in range(0, len(items), per_shard)]
    for n, chunk in enumerate(chunks):
        write_shard(root / "test" / f"{n}.tar", chunk, caption="none", cls=index)
    (root / "test" / "nshards.txt").write_text(f"{len(chunks)}\n")
    return root


@pytest.mark.slow
def test_eval_on_a_clip_benchmark_webdataset_equals_eval_on_the_same_images_as_folders(cli, tmp_path):
    items = [*sample_items(), *shape_items(30, seed=3)]
    classes = sorted({i.label for i in items})
    # three labelled wrong, as benchmarks have some (in classes that keep other images): both sides count them
    # wrong, and the other class names stay the same
    common = [n for n, i in enumerate(items) if sum(j.label == i.label for j in items) > 1][:3]
    wrong = next(c for c in classes if c not in {items[n].label for n in common})
    for n in common:
        items[n] = Item(items[n].key, items[n].image, items[n].ext, "", wrong)
    root = benchmark(tmp_path / "wds_shapes", items, classes, per_shard=16)
    folder = tmp_path / "folders"
    for item in items:
        images_folder(folder / f"c{classes.index(item.label):03d}", [item])
    in_shards = tmp_path / "folders-of-shards"  # class folders holding a shard each: a sample's class is its folder's
    for n, label in enumerate(classes):
        write_shard(in_shards / f"c{n:03d}" / "samples.tar", [i for i in items if i.label == label], caption="none")
    names = tmp_path / "names.tsv"
    names.write_text("".join(f"c{i:03d}\t{c}\n" for i, c in enumerate(classes)))
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na drawing of a {}.\n")
    runs, predictions = [], []
    for name, args in {
        "wds": [str(root)],
        "folders": [str(folder), "--classnames", str(names), "--templates", str(templates)],
        "shards": [str(in_shards), "--classnames", str(names), "--templates", str(templates)],
    }.items():
        report, predicted = tmp_path / f"{name}.json", tmp_path / f"{name}.csv"
        ran = cli("eval", *args, *MODEL, "--report", str(report), "--predictions", str(predicted))
        assert ran.exit_code == 0, ran.stderr
        runs.append(json.loads(report.read_text())["results"][0])
        table = pd.read_csv(predicted)
        table["key"] = [p.split("#")[1] if "#" in p else Path(p).stem for p in table["path"]]
        predictions.append(table.sort_values("key").reset_index(drop=True))
    wds_run, folder_run, shards_run = runs
    assert wds_run["n"] == folder_run["n"] == shards_run["n"] == len(items) and wds_run["n_templates"] == 2
    assert 0.5 < wds_run["metrics"]["acc1"] < 1.0
    for other, table in ((folder_run, predictions[1]), (shards_run, predictions[2])):
        assert wds_run["metrics"] == pytest.approx(other["metrics"])
        assert wds_run["per_class"] == other["per_class"]
        assert list(predictions[0]["key"]) == list(table["key"])
        for column in ("true_label", "predicted_label", "true_rank"):
            assert list(predictions[0][column]) == list(table[column])
        assert np.abs(predictions[0]["score"] - table["score"]).max() < 1e-5


def test_eval_retrieval_on_a_clip_benchmark_webdataset_equals_the_manifest(cli, tmp_path):
    items = sample_items()[:10]
    root = tmp_path / "wds_captions"
    (root / "test").mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    captioned = [Item(i.key, i.image, i.ext, f"a {i.label}\n{i.label} on a background", i.label) for i in items]
    write_shard(root / "test" / "0.tar", captioned[:6])
    write_shard(root / "test" / "1.tar", captioned[6:])
    (root / "test" / "nshards.txt").write_text("2\n")
    images_folder(tmp_path / "loose", items)
    manifest = tmp_path / "pairs.csv"
    pd.DataFrame([{"path": f"loose/{i.key}.jpg", "text": t} for i in captioned for t in i.caption.splitlines()]).to_csv(
        manifest, index=False
    )
    reports = []
    for data in (root, manifest):
        report = tmp_path / f"{data.name}.json"
        ran = cli("eval", str(data), *MODEL, "--report", str(report))
        assert ran.exit_code == 0, ran.stderr
        reports.append(json.loads(report.read_text())["results"][0])
    wds_run, manifest_run = reports
    assert wds_run["n"] == manifest_run["n"] == len(items)
    assert {k for k in wds_run["metrics"] if "recall" in k} >= {"image_to_text_recall@1", "text_to_image_recall@1"}
    assert wds_run["metrics"] == pytest.approx(manifest_run["metrics"])


def test_a_benchmark_sample_without_a_class_is_an_error_naming_it(cli, tmp_path):
    items = sample_items()[:6]
    classes = sorted({i.label for i in items})
    root = benchmark(tmp_path / "wds", items, classes)
    write_shard(root / "test" / "1.tar", items[:2])  # no cls
    (root / "test" / "nshards.txt").write_text("2\n")
    ran = cli("eval", str(root), *MODEL)
    assert ran.exit_code == 2
    assert "1.tar#" in ran.stderr and "the sample has no class (a .cls member)" in ran.stderr


@pytest.mark.parametrize("count", ["5", "99999999999999", "9" * 5000])
def test_a_shard_count_beyond_the_shards_there_is_one_line_at_once(cli, tmp_path, count):
    """Found by attack: nshards.txt of 99999999999999 built a list of that many names, for ever."""
    items = sample_items()[:6]
    root = benchmark(tmp_path / "wds", items, sorted({i.label for i in items}))
    (root / "test" / "nshards.txt").write_text(count + "\n")
    ran = cli("eval", str(root), *MODEL)
    assert ran.exit_code == 2 and ran.stderr.count("\n") == 1, ran.stderr
    if count == "5":
        assert f"counts 5 shards, but {root / 'test' / '2.tar'} is missing" in ran.stderr  # 0.tar, 1.tar are there
    else:
        assert "expected a number of shards" in ran.stderr


def test_dedup_keeps_the_sample_with_more_pixels(cli, tmp_path, monkeypatch):
    """Samples share their shard's size and mtime: among them "largest" is the most pixels, from the
    shard directly and from a dataset alike (natural order would pick the small copy, stored first)."""
    import tarfile

    samples = Path(__file__).resolve().parent.parent / "samples"
    monkeypatch.chdir(tmp_path)
    with tarfile.open("s.tar", "w") as tar:
        tar.add(samples / "held-out" / "red-circle.jpg", arcname="000001.jpg")  # 224 x 183
        tar.add(samples / "busy" / "red-circle.jpg", arcname="000002.jpg")  # 336 x 400
    assert cli("embed", "s.tar", *MODEL, "-o", "emb/").exit_code == 0
    for source in ("s.tar", "emb"):
        ran = cli("dedup", source, *MODEL, "--threshold", "0.9", "-f", "csv")
        assert ran.exit_code == 0, ran.stderr
        kept, copy = ran.stdout.splitlines()[1:]
        assert kept == "1,s.tar#000002,1.0" and copy.startswith("1,s.tar#000001,"), ran.stdout
