"""``embed -o s3://bucket/emb/``: the dataset a local directory holds, in an object store.

A real S3-compatible server (moto's, a subprocess on 127.0.0.1) stands in for S3; pyarrow reaches it
through the URI's own options, as a user points it at MinIO or Ceph.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_image

from clipcli.store.shard import shard_of

MODEL = ("-m", "tiny-shapes", "--precision", "fp32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    server = Path(sys.executable).with_name("moto_server")
    # moto[server] is in the test extra: without it these tests fail, never skip
    assert server.exists(), "moto_server not installed: pip install -e '.[test]'"
    port = _free_port()
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; returns the query that points pyarrow at the server."""
    import pyarrow.fs as pafs

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    name = f"b{uuid.uuid4().hex[:12]}"
    query = f"?endpoint_override={s3_server}&scheme=http&allow_bucket_creation=true"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{name}/{query}")
    fs.create_dir(name)
    return f"s3://{name}/emb/{query}"


def open_dataset(where: str | Path) -> tuple[pd.DataFrame, set[tuple[tuple[bytes, bytes], ...]], list[str]]:
    """Rows (sorted by path), the set of part metadata, and part names, read with pyarrow and pandas."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if isinstance(where, Path):
        fs, root = pafs.LocalFileSystem(), str(where)
    else:
        fs, root = pafs.FileSystem.from_uri(where)
        root = root.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root))
    names = sorted(i.base_name for i in infos if i.base_name.startswith("part-"))
    metadata = {tuple(sorted(pq.read_schema(f"{root}/{n}", filesystem=fs).metadata.items())) for n in names}
    frame = pd.read_parquet(root, filesystem=fs)  # what a pandas user types, given the filesystem
    return frame.sort_values("path").reset_index(drop=True), metadata, names


def assert_same(a: str | Path, b: str | Path) -> None:
    x, meta_x, _ = open_dataset(a)
    y, meta_y, _ = open_dataset(b)
    assert list(x["path"]) == list(y["path"]) and x["path"].is_unique
    assert np.abs(np.stack(x["embedding"]) - np.stack(y["embedding"])).max() <= 1e-6
    columns = ["width", "height", "bytes", "mtime", "model"]
    assert (x[columns].values == y[columns].values).all()
    assert len(meta_x | meta_y) == 1  # the same schema metadata (model, checksum, normalised) everywhere


def counts(stderr: str) -> dict[str, int]:
    line = [ln for ln in stderr.splitlines() if ln.startswith("embedded ")][-1]
    return {k: int(v) for k, v in (part.strip().split(" ") for part in line.split(","))}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i in range(9):
        make_image(tmp_path / "imgs" / f"img{i}.{'png' if i % 3 else 'jpg'}", (40 + i, 30), seed=i)
    return tmp_path / "imgs"


def change_files(folder: Path) -> None:
    make_image(folder / "img1.png", (50, 50), seed=99)
    (folder / "img2.png").unlink()
    make_image(folder / "new.jpg", (33, 44), seed=7)


@pytest.mark.slow
def test_local_engine_into_a_uri_equals_a_directory_and_reruns_only_what_changed(cli, bucket, folder, tmp_path):
    local = tmp_path / "local"
    assert cli("embed", str(folder), *MODEL, "-o", f"{local}/").exit_code == 0
    ran = cli("embed", str(folder), *MODEL, "-o", bucket, "--part-size", "4")
    assert ran.exit_code == 0, ran.stderr
    assert counts(ran.stderr) == {"embedded": 9, "unchanged": 0, "removed": 0, "skipped": 0}
    assert_same(local, bucket)
    assert "?" not in ran.stderr  # the query (which may carry credentials) is never printed

    again = cli("embed", str(folder), *MODEL, "-o", bucket)
    assert counts(again.stderr) == {"embedded": 0, "unchanged": 9, "removed": 0, "skipped": 0}
    change_files(folder)
    again = cli("embed", str(folder), *MODEL, "-o", bucket, "--part-size", "4")
    assert counts(again.stderr) == {"embedded": 2, "unchanged": 7, "removed": 1, "skipped": 0}
    fresh = tmp_path / "fresh"
    assert cli("embed", str(folder), *MODEL, "-o", f"{fresh}/").exit_code == 0
    assert_same(fresh, bucket)


@pytest.mark.slow
def test_three_shards_into_one_uri_equal_one_run(cli, bucket, folder, tmp_path):
    whole = tmp_path / "whole"
    assert cli("embed", str(folder), *MODEL, "-o", f"{whole}/").exit_code == 0
    for i in range(3):
        ran = cli("embed", str(folder), *MODEL, "-o", bucket, "--shard", f"{i}/3")
        assert ran.exit_code == 0, ran.stderr
    _, _, names = open_dataset(bucket)
    # Paths live in a temporary folder, so which shards own files varies: a shard with none writes no part.
    owners = {shard_of(p, 3) for p in pd.read_parquet(whole)["path"]}
    assert {n.split("-")[2][:5] for n in names} == {f"s{i}of3" for i in owners}
    assert_same(whole, bucket)

    change_files(folder)
    totals = np.zeros(3, int)
    for i in range(3):
        c = counts(cli("embed", str(folder), *MODEL, "-o", bucket, "--shard", f"{i}/3").stderr)
        totals += [c["embedded"], c["unchanged"], c["removed"]]
    assert list(totals) == [2, 7, 1]
    fresh = tmp_path / "fresh"
    assert cli("embed", str(folder), *MODEL, "-o", f"{fresh}/").exit_code == 0
    assert_same(fresh, bucket)


@pytest.mark.slow
def test_three_shard_processes_at_once_into_one_uri_equal_one_run(cli, bucket, folder, tmp_path):
    whole = tmp_path / "whole"
    assert cli("embed", str(folder), *MODEL, "-o", f"{whole}/").exit_code == 0
    base = [sys.executable, "-m", "clipcli", "embed", str(folder), *MODEL, "-o", bucket, "--part-size", "1"]
    for second in range(2):  # a first run, then one that drops and replaces rows in every shard at once
        if second:
            change_files(folder)
            assert cli("embed", str(folder), *MODEL, "-o", f"{whole}/").exit_code == 0
        procs = [subprocess.Popen([*base, "--shard", f"{i}/3"], stderr=subprocess.PIPE) for i in range(3)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
        assert_same(whole, bucket)


@pytest.mark.slow
def test_a_shard_never_rewrites_parts_it_does_not_own(cli, bucket, folder):
    from clipcli.store.shard import shard_of

    assert cli("embed", str(folder), *MODEL, "-o", bucket).exit_code == 0
    _, _, before = open_dataset(bucket)
    changed = folder / "img4.png"
    make_image(changed, (61, 17), seed=42)
    owner = shard_of(str(changed), 3)
    ran = cli("embed", str(folder), *MODEL, "-o", bucket, "--shard", f"{owner}/3")
    assert ran.exit_code == 2
    assert "run once without --shard" in ran.stderr and "Traceback" not in ran.stderr
    assert open_dataset(bucket)[2] == before  # refused before anything was written
    assert cli("embed", str(folder), *MODEL, "-o", bucket, "--shard", f"{(owner + 1) % 3}/3").exit_code == 0
    assert cli("embed", str(folder), *MODEL, "-o", bucket).exit_code == 0  # an unsharded run compacts
    frame, _, _ = open_dataset(bucket)
    assert frame["path"].is_unique and len(frame) == 9


def test_a_missing_bucket_is_one_error_before_anything_is_embedded(cli, bucket, folder):
    missing = bucket.replace("s3://", "s3://missing-", 1).replace("&allow_bucket_creation=true", "")
    ran = cli("embed", str(folder), *MODEL, "-o", missing)
    assert ran.exit_code == 2
    assert ran.stderr.startswith("Error: s3://missing-") and "not found" in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_file_uris_are_local_directories(cli, folder, tmp_path):
    local, via_uri = tmp_path / "local", tmp_path / "via uri"
    assert cli("embed", str(folder), *MODEL, "-o", f"{local}/").exit_code == 0
    ran = cli("embed", str(folder), *MODEL, "-o", via_uri.as_uri() + "/", "--shard", "0/1")
    assert ran.exit_code == 0, ran.stderr
    assert (via_uri / ".clipcli.store.shard-0-of-1.lock").exists()  # the local store, with its locks
    assert_same(local, via_uri)


REFUSED = [("-o", "s3://bucket/emb.csv"), ("-o", "s3://bucket/emb/", "--format", "npy"), ("-o", "s3://b/e/", "--text")]


@pytest.mark.parametrize("args", REFUSED)
def test_uri_outputs_other_than_image_datasets_are_refused(cli, folder, args):
    ran = cli("embed", "a cat" if "--text" in args else str(folder), *MODEL, *args)
    assert ran.exit_code == 2
    assert "a URI output is a Parquet dataset directory" in ran.stderr
    assert not Path("s3:").exists()


@pytest.mark.slow
def test_ray_writes_the_same_dataset_into_a_uri(cli, bucket, folder, tmp_path):
    from ray.cluster_utils import Cluster  # ray is in the test extra: missing, it fails here

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    (folder / "broken.jpg").write_bytes(b"not a picture")
    local = tmp_path / "local"
    assert cli("embed", str(folder), *MODEL, "-o", f"{local}/").exit_code == 1
    # Started after the bucket fixture set the credentials: the workers inherit them, as nodes would.
    node = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        ran = cli("embed", str(folder), *MODEL, "-o", bucket, "--engine", "ray", "--ray-address", cluster.address)
        assert ran.exit_code == 1, ran.stderr
        assert f"skipped {folder / 'broken.jpg'}" in ran.stderr
        assert counts(ran.stderr) == {"embedded": 9, "unchanged": 0, "removed": 0, "skipped": 1}
        assert any("-r" in n for n in open_dataset(bucket)[2])  # parts the Ray workers wrote
        assert_same(local, bucket)
        change_files(folder)
        again = cli("embed", str(folder), *MODEL, "-o", bucket, "--engine", "ray", "--ray-address", cluster.address)
        assert counts(again.stderr) == {"embedded": 2, "unchanged": 7, "removed": 1, "skipped": 1}
    finally:
        cluster.shutdown()
    fresh = tmp_path / "fresh"
    cli("embed", str(folder), *MODEL, "-o", f"{fresh}/")
    assert_same(fresh, bucket)


@pytest.mark.slow
def test_a_shard_whose_files_are_all_gone_in_an_object_store_drops_its_rows(cli, bucket, folder):
    """The other shards' parts say whether the dataset's paths exist from here: a shard whose own files
    are all gone is no run from the wrong folder (it failed in CI for some temporary-folder paths)."""
    for i in range(3):
        assert cli("embed", str(folder), *MODEL, "-o", bucket, "--shard", f"{i}/3").exit_code == 0
    paths = sorted(folder.iterdir())
    shard = next(k for k in range(3) if any(shard_of(str(p), 3) == k for p in paths))
    mine = [p for p in paths if shard_of(str(p), 3) == shard]
    for p in mine:
        p.unlink()
    ran = cli("embed", str(folder), *MODEL, "-o", bucket, "--shard", f"{shard}/3", "--prune")
    assert ran.exit_code == 0, ran.stderr
    assert counts(ran.stderr)["removed"] == len(mine)
    _, _, names = open_dataset(bucket)
    assert names
