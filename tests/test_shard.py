"""``embed --shard I/N``: N runs into one directory make the dataset one run makes, safely at once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_image

from clipcli.store.shard import Shard, shard_of


def read_dataset(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder).sort_values("path").reset_index(drop=True)


def assert_same_dataset(a: Path, b: Path) -> None:
    x, y = read_dataset(a), read_dataset(b)
    assert list(x["path"]) == list(y["path"])
    assert x["path"].is_unique
    # Shards batch images differently: fp32 sums in another order differ in the last bits.
    assert np.abs(np.stack(x["embedding"]) - np.stack(y["embedding"])).max() <= 1e-6
    assert (x[["width", "height", "bytes", "mtime"]].values == y[["width", "height", "bytes", "mtime"]].values).all()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i in range(12):
        make_image(tmp_path / "imgs" / f"img{i}.{'png' if i % 3 else 'jpg'}", (40 + i, 30), seed=i)
    return tmp_path / "imgs"


def test_parse_and_reject():
    assert Shard.parse("2/8") == Shard(2, 8) and Shard.parse(" 0 / 1 ").tag == "s0of1"
    for bad in ("3/3", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(Exception, match="--shard"):
            Shard.parse(bad)


def test_shards_partition_paths_the_same_way_in_every_process():
    paths = [f"photos/{i:05d}.jpg" for i in range(3000)]
    owners = [shard_of(p, 7) for p in paths]
    assert all(sum(Shard(k, 7).owns(p) for k in range(7)) == 1 for p in paths[:200])
    counts = np.bincount(owners, minlength=7)
    assert counts.min() > 3000 / 7 * 0.8  # a hash, not a split by name or order
    code = "import sys; from clipcli.store.shard import shard_of; print([shard_of(p, 7) for p in sys.argv[1:]])"
    other = subprocess.run([sys.executable, "-c", code, *paths[:50]], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(owners[:50])  # Python's salted hash() would differ


@pytest.mark.slow
def test_three_shards_equal_one_run_and_stay_equal_incrementally(cli, folder, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    model = ("-m", "tiny-shapes", "--precision", "fp32")
    assert cli("embed", str(folder), *model, "-o", f"{whole}/").exit_code == 0
    embedded = 0
    for i in range(3):
        ran = cli("embed", str(folder), *model, "-o", f"{sharded}/", "--shard", f"{i}/3")
        assert ran.exit_code == 0, ran.stderr
        embedded += int(ran.stderr.split("embedded ")[1].split(",")[0])
    assert embedded == 12
    # Paths live in a temporary folder, so which shards own files varies: a shard with none writes no part.
    owners = {shard_of(p, 3) for p in pd.read_parquet(whole)["path"]}
    assert {p.name.split("-")[2][:5] for p in sharded.glob("part-*.parquet")} == {f"s{i}of3" for i in owners}
    assert_same_dataset(whole, sharded)
    assert not list(sharded.glob(".*.tmp"))

    # Change one file, remove one, add one: each shard handles its own, the whole stays equal.
    make_image(folder / "img1.png", (50, 50), seed=99)
    (folder / "img2.png").unlink()
    make_image(folder / "new.jpg", (33, 44), seed=7)
    assert cli("embed", str(folder), *model, "-o", f"{whole}/").exit_code == 0
    totals = np.zeros(3, int)
    for i in range(3):
        ran = cli("embed", str(folder), *model, "-o", f"{sharded}/", "--shard", f"{i}/3")
        line = ran.stderr.strip().splitlines()[-1]
        totals += [int(line.split(f"{word} ")[1].split(",")[0]) for word in ("embedded", "unchanged", "removed")]
    assert list(totals) == [2, 10, 1]
    assert_same_dataset(whole, sharded)


def test_a_shard_that_owns_no_file_leaves_no_part_once_another_shard_writes(cli, tmp_path):
    # One image, named so that shard 0 (which runs first) owns nothing: two of three shards own nothing.
    path = next(p for i in range(20) if shard_of(p := str(tmp_path / "imgs" / f"a{i}.png"), 3) != 0)
    make_image(Path(path), (20, 20), seed=1)
    owner = shard_of(path, 3)
    for order in ([0, 1, 2], [owner, *sorted({0, 1, 2} - {owner})]):
        out = tmp_path / f"out{order[0]}"
        for i in order:
            ran = cli("embed", str(tmp_path / "imgs"), "-m", "tiny-shapes", "-o", f"{out}/", "--shard", f"{i}/3")
            assert ran.exit_code == 0, ran.stderr
        assert [p.name.split("-")[2][:5] for p in out.glob("part-*.parquet")] == [f"s{owner}of3"]
        assert list(read_dataset(out)["path"]) == [path]


@pytest.mark.slow
def test_shards_after_an_unsharded_run_clean_only_their_own_rows(cli, folder, tmp_path):
    out = tmp_path / "out"
    model = ("-m", "tiny-shapes", "--precision", "fp32")
    cli("embed", str(folder), *model, "-o", f"{out}/")  # one part holding every shard's rows
    for name in ("img4.png", "img5.png", "img7.png"):
        (folder / name).unlink()
    removed = 0
    for i in range(3):
        ran = cli("embed", str(folder), *model, "-o", f"{out}/", "--shard", f"{i}/3")
        assert "embedded 0" in ran.stderr
        removed += int(ran.stderr.split("removed ")[1].split(",")[0])
        # Until every shard has run, the other shards' rows (stale or not) are left alone.
        gone = {str(folder / n) for n in ("img4.png", "img5.png", "img7.png")}
        left = gone & set(read_dataset(out)["path"])
        assert all(not Shard(i, 3).owns(p) for p in left)
    assert removed == 3
    fresh = tmp_path / "fresh"
    cli("embed", str(folder), *model, "-o", f"{fresh}/")
    assert_same_dataset(fresh, out)


def test_a_shard_whose_files_are_all_gone_drops_its_rows(cli, folder, tmp_path):
    """The dataset still has paths that exist (other shards'), so this is no run from the wrong folder."""
    out = tmp_path / "out"
    model = ("-m", "tiny-shapes", "--precision", "fp32")
    assert cli("embed", str(folder), *model, "-o", f"{out}/").exit_code == 0
    paths = sorted(folder.iterdir())
    shard = next(k for k in range(3) if any(shard_of(str(p), 3) == k for p in paths))
    mine = [p for p in paths if shard_of(str(p), 3) == shard]
    for p in mine:
        p.unlink()
    # --prune: how many files a shard owns depends on the paths' hashes, so on the folder's path; past a
    # few rows and a tenth of the shard, removal needs it (tests/test_reliability_outputs.py pins that).
    ran = cli("embed", str(folder), *model, "-o", f"{out}/", "--shard", f"{shard}/3", "--prune")
    assert ran.exit_code == 0, ran.stderr
    assert f"removed {len(mine)}" in ran.stderr
    assert sorted(read_dataset(out)["path"]) == sorted(str(p) for p in paths if p not in mine)

    # Every stored path gone is still refused: the rerun would otherwise empty the dataset.
    for p in folder.iterdir():
        p.unlink()
    make_image(folder / "new.png", (30, 30), seed=1)
    ran = cli("embed", str(folder), *model, "-o", f"{out}/")
    assert ran.exit_code == 2 and "paths exist from here" in ran.stderr
    assert len(read_dataset(out)) == len(paths) - len(mine)


@contextmanager
def held_elsewhere(lock: str) -> Iterator[None]:
    """``lock`` (Python code taking a lock on ``out``) held by another process until the block ends:
    within one process locks nest, as a command and its store take them twice."""
    code = f"import sys\nfrom pathlib import Path\n{lock}\nprint('held', flush=True)\nsys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield
    finally:
        proc.communicate("")


@pytest.mark.slow
def test_runs_that_would_collide_are_refused(cli, folder, tmp_path):
    out = tmp_path / "out"
    shard_lock = (
        f"from clipcli.store.shard import Shard, ShardLocks\nlock = ShardLocks(Path({str(out)!r}), Shard(1, 2))"
    )
    with held_elsewhere(shard_lock):
        same = cli("embed", str(folder), "-m", "tiny-shapes", "-o", f"{out}/", "--shard", "1/2")
        assert same.exit_code == 2 and "shard 1/2" in same.stderr
        unsharded = cli("embed", str(folder), "-m", "tiny-shapes", "-o", f"{out}/")
        assert unsharded.exit_code == 2 and "shard runs" in unsharded.stderr
        other = cli("embed", str(folder), "-m", "tiny-shapes", "-o", f"{out}/", "--shard", "0/2")
        assert other.exit_code == 0, other.stderr
    whole_lock = f"from clipcli.atomic import OutputLock\nlock = OutputLock(Path({str(out)!r}), is_dir=True)"
    with held_elsewhere(whole_lock):
        refused = cli("embed", str(folder), "-m", "tiny-shapes", "-o", f"{out}/", "--shard", "0/2")
        assert refused.exit_code == 2 and "unsharded" in refused.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-o", "{out}.parquet", "--shard", "0/2"), "directory"),
        (("-o", "{out}.csv", "--engine", "ray"), "directory"),
        (("-o", "{out}/", "--shard", "2/2"), "0 to N-1"),
        (("-o", "{out}/", "--shard", "1of2"), "expected I/N"),
        (("--text", "a dog", "-o", "{out}/", "--shard", "0/2"), "texts"),
    ],
)
def test_bad_scale_out_options_are_one_line_errors(cli, folder, tmp_path, args, message):
    ran = cli("embed", str(folder), "-m", "tiny-shapes", *(a.format(out=tmp_path / "out") for a in args))
    assert ran.exit_code == 2 and message in ran.stderr and "Traceback" not in ran.stderr


@pytest.mark.slow
def test_three_shard_processes_at_once_equal_one_run(folder, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    base = [sys.executable, "-m", "clipcli", "embed", str(folder), "-m", "tiny-shapes", "--precision", "fp32"]
    subprocess.run([*base, "-o", f"{whole}/"], check=True, capture_output=True)
    procs = [
        subprocess.Popen([*base, "-o", f"{sharded}/", "--shard", f"{i}/3", "--part-size", "2"], stderr=subprocess.PIPE)
        for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    assert_same_dataset(whole, sharded)
