"""``embed``/``eval --engine ray`` on a real two-node Ray cluster on 127.0.0.1, CPU actors, the bundled model.

One cluster (a head and a second node process, one CPU each, a small object store) serves the module;
it is shut down, every process it started with it, when the module ends. Drivers run in subprocesses
where a test kills one, in this process otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray  # noqa: F401  # in the test extra: a missing or broken ray fails here, never skips
from conftest import make_image

pytestmark = pytest.mark.slow

MODEL = ("-m", "tiny-shapes", "--precision", "fp32")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    node = {"num_cpus": 1, "object_store_memory": 200 * 2**20, "include_dashboard": False}
    started = Cluster(initialize_head=True, head_node_args=node)
    try:
        started.add_node(**node)
        started.wait_for_nodes()
        yield started.address
    finally:
        started.shutdown()


def read_dataset(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder).sort_values("path").reset_index(drop=True)


def assert_same_dataset(a: Path, b: Path) -> None:
    """Same paths (each once), embeddings within 1e-6, and the same bookkeeping columns and metadata."""
    import pyarrow.parquet as pq

    x, y = read_dataset(a), read_dataset(b)
    assert list(x["path"]) == list(y["path"]) and x["path"].is_unique
    assert np.abs(np.stack(x["embedding"]) - np.stack(y["embedding"])).max() <= 1e-6
    columns = ["width", "height", "bytes", "mtime", "model"]
    assert (x[columns].values == y[columns].values).all()
    metadata = {
        tuple(sorted(pq.read_schema(p).metadata.items())) for folder in (a, b) for p in folder.glob("part-*.parquet")
    }
    assert len(metadata) == 1


def counts(stderr: str) -> dict[str, int]:
    line = [ln for ln in stderr.splitlines() if ln.startswith("embedded ")][-1]
    return {k: int(v) for k, v in (part.strip().split(" ") for part in line.split(","))}


def photos(folder: Path, n: int, size: tuple[int, int] = (64, 48)) -> Path:
    for i in range(n):
        make_image(folder / f"img{i}.{'png' if i % 4 == 0 else 'jpg'}", size, seed=i)
    return folder


def driver(folder: Path, out: Path, address: str, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "clipcli", "embed", str(folder), *MODEL, "-o", f"{out}/"]
    return [*command, "--engine", "ray", "--ray-address", address, *extra]


def test_ray_equals_local_and_reruns_embed_only_what_changed(cli, cluster, tmp_path):
    folder = photos(tmp_path / "imgs", 10)
    (folder / "broken.jpg").write_bytes(b"not a picture")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert cli("embed", str(folder), *MODEL, "-o", f"{local}/").exit_code == 1
    ran = cli("embed", str(folder), *MODEL, "-o", f"{on_ray}/", "--engine", "ray", "--ray-address", cluster)
    assert ran.exit_code == 1, ran.stderr
    assert f"skipped {folder / 'broken.jpg'}: not an image" in ran.stderr  # named in the driver's summary
    assert counts(ran.stderr) == {"embedded": 10, "unchanged": 0, "removed": 0, "skipped": 1}
    assert_same_dataset(local, on_ray)

    # Add, change and remove a file; rerun Ray into its own output and into the local engine's.
    make_image(folder / "added.jpg", (50, 70), seed=50)
    make_image(folder / "img3.jpg", (90, 30), seed=51)
    (folder / "img5.jpg").unlink()
    before = {p.name for p in on_ray.glob("part-*.parquet")}
    for out in (on_ray, local):
        again = cli("embed", str(folder), *MODEL, "-o", f"{out}/", "--engine", "ray", "--ray-address", cluster)
        assert counts(again.stderr) == {"embedded": 2, "unchanged": 8, "removed": 1, "skipped": 1}
    new_parts = [p for p in on_ray.glob("part-*-r*.parquet") if p.name not in before]
    assert sorted(read_dataset_parts(new_parts)) == sorted([str(folder / "added.jpg"), str(folder / "img3.jpg")])
    fresh = tmp_path / "fresh"
    cli("embed", str(folder), *MODEL, "-o", f"{fresh}/")
    assert_same_dataset(fresh, on_ray)
    assert_same_dataset(fresh, local)


def read_dataset_parts(parts: list[Path]) -> list[str]:
    return [p for part in parts for p in pd.read_parquet(part)["path"]]


def worker_pids(name: str) -> list[int]:
    """Processes of this test's cluster (descendants of this process) whose title names ``name``."""
    mine = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().decode(errors="replace")
            pid = int(entry.name)
            parent = pid
            for _ in range(8):
                parent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent in (mine, 0, 1):
                    break
        except (OSError, ValueError, IndexError):
            continue
        if name in title and parent == mine:
            found.append(pid)
    return found


def wait_for_parts(out: Path, n: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < n and proc.poll() is None:
        time.sleep(0.05)


def test_a_worker_killed_mid_run_is_retried_and_every_file_lands_once(cluster, tmp_path):
    folder = photos(tmp_path / "imgs", 48, (160, 120))
    out = tmp_path / "out"
    proc = subprocess.Popen(driver(folder, out, cluster, "-b", "2", "--part-size", "4"), stderr=subprocess.PIPE)
    wait_for_parts(out, 1, proc)
    actors = worker_pids("MapBatches(Embedder)")
    assert actors and proc.poll() is None, "the run should still be going"
    os.kill(actors[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert counts(err.decode())["embedded"] == 48
    local = tmp_path / "local"
    subprocess.run([sys.executable, "-m", "clipcli", "embed", str(folder), *MODEL, "-o", f"{local}/"], check=True)
    assert_same_dataset(local, out)
    assert actors[0] not in worker_pids("MapBatches(Embedder)")


def test_a_killed_driver_then_rerun_equals_one_uninterrupted_run(cluster, tmp_path):
    folder = photos(tmp_path / "imgs", 48, (160, 120))
    out = tmp_path / "out"
    proc = subprocess.Popen(driver(folder, out, cluster, "-b", "2", "--part-size", "4"), stderr=subprocess.DEVNULL)
    wait_for_parts(out, 2, proc)
    assert proc.poll() is None, "the run should have been killed part-way"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # the cluster ends the dead driver's actors
    kept = set(read_dataset_parts(list(out.glob("part-*.parquet"))))
    assert 0 < len(kept) < 48
    rerun = subprocess.run(driver(folder, out, cluster), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    done = counts(rerun.stderr)
    # Nothing in a complete part is embedded again.
    assert done["embedded"] + done["unchanged"] == 48 and done["unchanged"] >= len(kept)
    local = tmp_path / "local"
    subprocess.run([sys.executable, "-m", "clipcli", "embed", str(folder), *MODEL, "-o", f"{local}/"], check=True)
    assert_same_dataset(local, out)
    assert not list(out.glob(".part-*.tmp"))


def test_a_model_that_fails_to_load_on_a_worker_is_one_clear_error(cluster, tmp_path):
    from clipcli.engines.ray import ModelSpec, embed_dataset_on_ray
    from clipcli.errors import ModelError
    from clipcli.images.sources import ImageRef
    from clipcli.models import load_model

    lm = load_model("tiny-shapes", "cpu", "fp32")
    refs = [ImageRef(str(p), p) for p in sorted(photos(tmp_path / "imgs", 4).iterdir())]
    # As on a node where the checkpoint is not on a shared filesystem: the driver has it, workers do not.
    missing = ModelSpec(str(tmp_path / "only-on-the-driver.pt"), "cpu", "fp32", lm.checksum)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"failed to load on Ray node .*only-on-the-driver\.pt"):
        embed_dataset_on_ray(lm, missing, refs, address=cluster)
    assert time.perf_counter() - start < 120


def test_eval_on_ray_reports_what_eval_reports_locally(cli, cluster, tmp_path):
    import shutil

    data = tmp_path / "shapes"  # a folder per shape: the bundled samples, sorted by what they show
    for image in sorted((ROOT / "samples" / "seen").glob("*.jpg")):
        (data / image.stem.split("-")[1]).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, data / image.stem.split("-")[1] / image.name)
    reports = []
    for engine in ("local", "ray"):
        report = tmp_path / f"{engine}.json"
        ran = cli(
            "eval", str(data), *MODEL, "--report", str(report), "--engine", engine,
            "--ray-address", cluster,
        )  # fmt: skip
        assert ran.exit_code == 0, ran.stderr
        reports.append(json.loads(report.read_text()))
    same = ("model_sha256", "n", "n_skipped", "metrics", "per_class", "classes", "confusion_matrix")
    local, on_ray = ([{k: r[k] for k in same} for r in report["results"]] for report in reports)
    assert local == on_ray and local[0]["n"] == 16


def test_a_successful_run_prints_only_its_summary_on_stderr(cluster, tmp_path):
    """Ray's core worker logged ``core_worker.cc: ... has constructor arguments in the object store``
    at ERROR on every run (Ray Data's actors are built that way); a run that succeeds says only what
    clipcli says."""
    folder = photos(tmp_path / "imgs", 6)
    ran = subprocess.run(driver(folder, tmp_path / "out", cluster), capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert "core_worker" not in ran.stderr
    assert ran.stderr.strip().splitlines() == ["embedded 6, unchanged 0, removed 0, skipped 0"]


def test_sigterm_mid_run_ends_the_driver_as_clipcli_does(cluster, tmp_path):
    """``ray.init`` installs its own SIGTERM handler (``sys.exit(15)``); clipcli's is put back: exit 143
    within seconds, the parts written kept whole for the next run."""
    folder = photos(tmp_path / "imgs", 48, (160, 120))
    out = tmp_path / "out"
    proc = subprocess.Popen(driver(folder, out, cluster, "-b", "2", "--part-size", "4"), stderr=subprocess.PIPE)
    wait_for_parts(out, 1, proc)
    assert proc.poll() is None, "the run should still be going"
    os.kill(proc.pid, signal.SIGTERM)
    began = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    assert time.monotonic() - began < 30
    assert err.decode().strip().splitlines()[-1] == "Terminated."
    rerun = subprocess.run(driver(folder, out, cluster), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and counts(rerun.stderr)["unchanged"] >= 1, rerun.stderr
