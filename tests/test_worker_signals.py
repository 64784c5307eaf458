"""Ctrl-C and SIGTERM to the whole process group of a run with decoding worker processes.

A terminal sends Ctrl-C to every process of its foreground group, and schedulers signal the whole group,
so the workers get the signal as well as the main process. The run must still stop as it does alone:
exit 130 or 143, one line on stderr (no worker's traceback), the rows computed so far kept, and no
process left behind. The real console entry point runs in a process group of its own, as a user's would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from conftest import make_image

IMAGES = 1500  # batches of 8: the first rows reach the disk after a few percent of the run
RUN_SECONDS = 120  # a run takes seconds; only a hang comes near this

STOPS = [
    pytest.param(signal.SIGINT, 130, "Interrupted.", id="ctrl-c"),
    pytest.param(signal.SIGTERM, 143, "Terminated.", id="sigterm"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Many small JPEGs (the same bytes under distinct names: decoding cost is what matters)."""
    root = tmp_path_factory.mktemp("signals")
    data = make_image(root / "imgs" / "img-0.jpg", (48, 48)).read_bytes()
    for i in range(1, IMAGES):
        (root / "imgs" / f"img-{i}.jpg").write_bytes(data)
    return root


def start(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "clipcli", *args, "-m", "tiny-shapes", "-b", "8", "--workers", "2"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def finish(run: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        _, err = run.communicate(timeout=RUN_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        pytest.fail(f"still running {RUN_SECONDS} s after the signal")
    return run.returncode, err.decode(errors="replace")


def wait_until(run: subprocess.Popen[bytes], started: Callable[[], bool]) -> None:
    """Return once ``started`` holds, with the run's two decoding processes up."""
    deadline = time.monotonic() + RUN_SECONDS
    while not started():
        if run.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.returncode}) before it wrote its first rows")
        if time.monotonic() > deadline:
            os.killpg(run.pid, signal.SIGKILL)
            raise AssertionError("the run wrote no rows in time")
        time.sleep(0.01)
    children = Path(f"/proc/{run.pid}/task/{run.pid}/children")
    if children.exists():
        assert len(children.read_text().split()) == 2, "the run decodes in two worker processes"


def assert_stopped_quietly(code: int, err: str, expected_code: int, last_line: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err and "Process" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1] == last_line and len(lines) <= 3, err


def assert_group_gone(pgid: int, within: float = 15) -> None:
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise AssertionError("decoding processes outlived the run")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def embedded_paths(output: Path) -> list[str]:
    return ds.dataset(output, format="parquet").to_table(columns=["path"]).column("path").to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "expected_code", "last_line"), STOPS)
def test_embed_stopped_through_its_group_keeps_its_rows_and_says_one_line(
    folder, tmp_path, signum, expected_code, last_line
):
    output = tmp_path / "emb"
    args = ["embed", str(folder / "imgs"), "-o", f"{output}/", "--part-size", "50"]
    run = start(args, tmp_path)
    wait_until(run, lambda: any(output.glob("part-*.parquet")))
    os.killpg(run.pid, signum)
    code, err = finish(run)
    assert_stopped_quietly(code, err, expected_code, last_line)
    assert_group_gone(run.pid)

    kept = embedded_paths(output)
    assert 0 < len(kept) < IMAGES and len(kept) == len(set(kept))

    code, err = finish(start(args, tmp_path))  # the rerun embeds the rest
    assert code == 0, err
    assert err.strip().endswith(f"embedded {IMAGES - len(kept)}, unchanged {len(kept)}, removed 0, skipped 0"), err
    paths = embedded_paths(output)
    assert sorted(paths) == sorted(str(folder / "imgs" / f"img-{i}.jpg") for i in range(IMAGES))


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "expected_code", "last_line"), STOPS)
def test_classify_stopped_through_its_group_keeps_its_rows_and_says_one_line(
    folder, tmp_path, signum, expected_code, last_line
):
    args = ["classify", str(folder / "imgs"), "-l", "a,b", "-k", "1", "-o", "out.csv"]
    run = start(args, tmp_path)
    wait_until(run, lambda: any(p.stat().st_size > 4096 for p in tmp_path.glob(".out.csv.*.tmp")))
    os.killpg(run.pid, signum)
    code, err = finish(run)
    assert_stopped_quietly(code, err, expected_code, last_line)
    assert_group_gone(run.pid)

    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == "path,rank,label,score"
    rows = [line.split(",")[0] for line in lines[1:]]
    assert 0 < len(rows) < IMAGES
    assert rows == [str(folder / "imgs" / f"img-{i}.jpg") for i in range(len(rows))]  # in input order, none missing


@pytest.mark.slow
def test_a_signal_to_one_worker_alone_leaves_the_run_to_finish(folder, tmp_path):
    """``kill PID`` of a decoding process: a worker that left at once could cut a batch short in the
    pipe, and the main process would wait for the rest of it for ever."""
    output = tmp_path / "emb"
    run = start(["embed", str(folder / "imgs"), "-o", f"{output}/", "--part-size", "50"], tmp_path)
    children = Path(f"/proc/{run.pid}/task/{run.pid}/children")
    if not children.exists():
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        pytest.skip("finding the worker processes needs Linux's /proc")
    wait_until(run, lambda: any(output.glob("part-*.parquet")))
    os.kill(int(children.read_text().split()[0]), signal.SIGTERM)
    code, err = finish(run)
    assert code == 0, err
    assert sorted(embedded_paths(output)) == sorted(str(folder / "imgs" / f"img-{i}.jpg") for i in range(IMAGES))
