"""Outputs under faults, tested the way they break: two writers at once, SIGKILL and SIGTERM mid-run,
full and read-only filesystems, runs where every input is skipped, and names no format expected."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_image, write_checkpoint

from clipcli.store.npy import npy_sidecar, open_npy

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def clipcli(*args: str, cwd: Path | None = None, **popen: object) -> subprocess.Popen[bytes]:
    """The real console entry point in a child process (signals reach it as they would a user's run)."""
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "clipcli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out.decode(errors="surrogateescape"), err.decode(errors="replace")


def distinct(folder: Path, n: int) -> list[Path]:
    """``n`` different small images: embeddings that do not compress away."""
    return [make_image(folder / f"img-{i}.png", (24, 24), seed=i) for i in range(n)]


def copies(folder: Path, n: int, prefix: str = "img") -> list[Path]:
    """``n`` small JPEG files with distinct names (the same bytes: decoding cost is what matters)."""
    source = make_image(folder / f"{prefix}-0.jpg", (48, 48))
    data = source.read_bytes()
    paths = [source]
    for i in range(1, n):
        path = folder / f"{prefix}-{i}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the moment the test waited for")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run to reach the moment under test")
        time.sleep(0.01)


def reading_images(pid: int) -> bool:
    """Whether process ``pid`` has a file of an ``imgs`` folder open now (Linux's /proc)."""
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if "/imgs/" in os.readlink(fd):
                    return True
    return False


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith((".tmp", ".lock")))


@contextmanager
def tmpfs(where: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    """A small filesystem of its own, to fill up or to refuse writes (root only; else the test skips,
    and the simulated variants below cover the same code)."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the simulated-failure tests cover this path")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# 1. Two writers at once


@pytest.mark.slow
@pytest.mark.parametrize("output", ["o/", "f.parquet", "f.npy", "f.csv"])
def test_a_second_run_into_the_same_output_is_refused_at_once(tmp_path, output):
    copies(tmp_path / "A", 150, "a")
    copies(tmp_path / "B", 20, "b")
    common = ["-m", "tiny-shapes", "--batch-size", "1", "-o", output]
    first = clipcli("embed", "A", *common, cwd=tmp_path)
    lock = tmp_path / "o" / ".clipcli.lock" if output == "o/" else tmp_path / f".{output}.lock"
    wait_for(lock.exists, first)  # taken before the model loads, and held to the end
    second = clipcli("embed", "B", *common, cwd=tmp_path)
    code2, _, err2 = finish(second)
    code1, _, err1 = finish(first)
    assert code1 == 0, err1
    assert code2 == 2
    assert err2.strip() == (
        f"Error: {output.rstrip('/')}: another clipcli run (pid {first.pid}) is writing this output; "
        "wait for it to finish or choose another output"
    )
    assert embedded_names(tmp_path / output) == {f"a-{i}.jpg" for i in range(150)}
    assert temporaries(tmp_path) == []


def embedded_names(output: Path) -> set[str]:
    if output.suffix == ".npy":
        saved = open_npy(output)
        return {Path(saved.name(i)).name for i in range(saved.header.rows)}
    if output.suffix == ".csv":
        lines = output.read_text().splitlines()[1:]
        return {Path(line.split(",")[0]).name for line in lines}
    import pyarrow.dataset as ds

    paths = ds.dataset(output, format="parquet").to_table(columns=["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)), "one row per file"
    return {Path(p).name for p in paths}


@pytest.mark.slow
def test_identical_concurrent_runs_leave_one_row_per_file(tmp_path):
    copies(tmp_path / "A", 100, "a")
    runs = [clipcli("embed", "A", "-m", "tiny-shapes", "--batch-size", "1", "-o", "o/", cwd=tmp_path) for _ in "12"]
    codes = sorted(finish(run)[0] for run in runs)
    assert codes in ([0, 0], [0, 2])  # the second refused, or started after the first had finished
    assert embedded_names(tmp_path / "o") == {f"a-{i}.jpg" for i in range(100)}
    again = clipcli("embed", "A", "-m", "tiny-shapes", "-o", "o/", cwd=tmp_path)
    code, _, err = finish(again)
    assert code == 0 and "embedded 0, unchanged 100" in err


def test_a_lock_nests_within_a_process_and_excludes_other_processes(tmp_path):
    from clipcli.atomic import OutputLock

    target = str(tmp_path / "x.csv")
    script = f"from pathlib import Path; from clipcli.atomic import OutputLock; OutputLock(Path({target!r}), False)"
    probe = [sys.executable, "-c", script]
    with OutputLock(tmp_path / "x.csv", is_dir=False):
        with OutputLock(tmp_path / "x.csv", is_dir=False):  # the writer, inside the command's hold
            pass
        refused = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert f"another clipcli run (pid {os.getpid()}) is writing this output" in refused.stderr
    assert temporaries(tmp_path) == []
    assert subprocess.run(probe, capture_output=True, timeout=60).returncode == 0


# 2, 3, 7. NPY and its sidecar


@pytest.mark.slow
def test_npy_pair_is_kept_whole_when_the_sidecar_cannot_be_written(cli, tmp_path, monkeypatch):
    out = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(out)).exit_code == 0
    before = out.read_bytes(), npy_sidecar(out).read_bytes()

    import clipcli.store.npy

    def full_disk(value: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(clipcli.store.npy, "json_line", full_disk)
    ran = cli("embed", str(SAMPLES / "held-out"), "-m", "tiny-shapes", "-o", str(out))
    assert ran.exit_code == 2
    assert ran.stderr.strip() == (
        f"Error: {out}: cannot write (no space left on the device); the previous pair is left as it was"
    )
    assert (out.read_bytes(), npy_sidecar(out).read_bytes()) == before
    assert temporaries(tmp_path) == []


@pytest.mark.slow
def test_npy_pair_on_a_full_filesystem_keeps_the_previous_pair(tmp_path):
    with tmpfs(tmp_path / "small", "64k") as small:
        out = small / "emb.npy"
        code, _, err = finish(clipcli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(out)))
        assert code == 0, err
        before = out.read_bytes(), npy_sidecar(out).read_bytes()
        copies(tmp_path / "many", 400)
        code, _, err = finish(clipcli("embed", str(tmp_path / "many"), "-m", "tiny-shapes", "-o", str(out)))
        assert code == 2
        assert err.count("\n") == 1 and "no space left on the device" in err, err
        assert (out.read_bytes(), npy_sidecar(out).read_bytes()) == before
        assert temporaries(small) == []


@pytest.mark.slow
def test_a_sidecar_from_another_run_is_refused(cli, tmp_path):
    out = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "busy"), "-m", "tiny-shapes", "-o", str(out)).exit_code == 0
    old_sidecar = npy_sidecar(out).read_bytes()
    # Same number of rows, other images: only the fingerprint can tell the pair was mixed.
    six = sorted((SAMPLES / "seen").iterdir())[:6]
    assert cli("embed", *map(str, six), "-m", "tiny-shapes", "-o", str(out)).exit_code == 0
    npy_sidecar(out).write_bytes(old_sidecar)
    ran = cli("rank", "a photo of a red circle.", str(out), "-m", "tiny-shapes")
    assert ran.exit_code == 2
    assert "emb.rows.jsonl was written for another matrix" in ran.stderr


def test_every_legal_name_reads_back_from_an_npy_sidecar(cli, tmp_path):
    folder = tmp_path / "odd"
    names = ["new\nline.jpg", "tab\tand ü.jpg", 'quote".jpg', "back\\slash.jpg", "caf" + os.fsdecode(b"\xe9") + ".jpg"]
    for i, name in enumerate(names):
        make_image(folder / name, seed=i)
    out = tmp_path / "emb.npy"
    ran = cli("embed", str(folder), "-m", "tiny-shapes", "-o", str(out))
    assert ran.exit_code == 0, ran.stderr
    saved = open_npy(out)
    assert sorted(saved.name(i) for i in range(saved.header.rows)) == sorted(str(folder / n) for n in names)
    assert npy_sidecar(out).read_bytes().decode("utf-8")  # the sidecar itself stays UTF-8 text
    ranked = cli("rank", "a photo of a red circle.", str(out), "-m", "tiny-shapes", "-f", "jsonl")
    got = {json.loads(line)["path"] for line in ranked.stdout.splitlines()}
    assert got == {str(folder / n) for n in names}


def test_rank_refuses_an_npy_made_by_another_model_of_the_same_width(cli, tmp_path):
    first = write_checkpoint(tmp_path / "a.pt", "test-vit", seed=0)
    second = write_checkpoint(tmp_path / "b.pt", "test-vit", seed=1)
    out = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", str(first), "-o", str(out)).exit_code == 0
    ran = cli("rank", "a red circle", str(out), "-m", str(second))
    assert ran.exit_code == 2
    assert f"embeddings were made with {first}, not {second}" in ran.stderr
    assert cli("rank", "a red circle", str(out), "-m", str(first)).exit_code == 0


# 4, 5. Single-file outputs: killed runs, and runs where nothing is left to write


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_sigterm_inside_a_write_waits_until_the_rows_are_whole(tmp_path, monkeypatch, fmt):
    """SIGTERM arrives while a batch of rows is being written to the file (Python runs a signal's
    handler inside a file's write: after a partial write, or in a write through Python code, as
    pyarrow's writer makes): the batch is finished first, then the run stops as SIGTERM makes it,
    keeping every row. Before, a Parquet file could be left without its footer (seen in CI)."""
    from clipcli import atomic
    from clipcli.errors import Terminated
    from clipcli.store.formats import ROW_WRITERS, OutputFormat

    def terminate(signum: int, frame: object) -> None:  # as clipcli.cli's handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated

    class SignalMidWrite:
        """The real file; SIGTERM comes in the first write once armed."""

        armed = False

        def __init__(self, real: object) -> None:
            self.real = real

        def write(self, data: bytes) -> int:
            if SignalMidWrite.armed:
                SignalMidWrite.armed = False
                signal.raise_signal(signal.SIGTERM)
            return self.real.write(data)

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    opened = atomic.AtomicFile.__init__

    def open_wrapped(self: atomic.AtomicFile, *args: object, **kwargs: object) -> None:
        opened(self, *args, **kwargs)
        self.file = SignalMidWrite(self.file)

    monkeypatch.setattr(atomic.AtomicFile, "__init__", open_wrapped)
    out = tmp_path / f"out.{fmt}"
    rows = [{"path": f"{i}.jpg", "label": "a circle", "score": 0.5} for i in range(8192)]  # a Parquet row group
    create = ROW_WRITERS[OutputFormat(fmt)].create
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.raises(Terminated), create(str(out), columns=["path", "label", "score"]) as writer:
            SignalMidWrite.armed = True
            writer.write(rows)
            writer.write(rows)  # not reached: SIGTERM stops the run once the first batch is written
    finally:
        signal.signal(signal.SIGTERM, previous)
    if fmt == "parquet":
        written = pq.read_table(out).column("path").to_pylist()
    elif fmt == "csv":
        written = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    else:
        written = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert written == [r["path"] for r in rows]


@pytest.mark.parametrize("layout", ["one-file", "dataset", "clip-retrieval"])
def test_a_sigterm_inside_embeds_write_keeps_the_rows_it_was_writing(cli, tmp_path, monkeypatch, layout):
    """embed's Parquet outputs (a file, a dataset's part, clip-retrieval's pair of a matrix and its
    metadata) are written whole or not at all; SIGTERM during that write now waits until they are in
    place, then stops the run (exit 143). Before, the rows being written were dropped: the file or the
    part was discarded, to be embedded again by the next run."""
    from clipcli import atomic
    from clipcli import cli as entry

    armed = [True]

    class SignalMidWrite:
        def __init__(self, real: object) -> None:
            self.real = real

        def write(self, data: bytes) -> int:
            if armed[0]:
                armed[0] = False
                signal.raise_signal(signal.SIGTERM)
            return self.real.write(data)  # type: ignore[attr-defined,no-any-return]

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    opened = atomic.AtomicFile.__init__

    def open_wrapped(self: atomic.AtomicFile, path: Path, *args: object, **kwargs: object) -> None:
        opened(self, path, *args, **kwargs)
        if Path(path).suffix in (".parquet", ".npy"):
            self.file = SignalMidWrite(self.file)

    monkeypatch.setattr(atomic.AtomicFile, "__init__", open_wrapped)
    out = tmp_path / ("emb.parquet" if layout == "one-file" else "emb")
    target = str(out) if layout == "one-file" else f"{out}/"
    extra = ("--layout", "clip-retrieval") if layout == "clip-retrieval" else ()
    previous = signal.signal(signal.SIGTERM, entry._terminate)
    try:
        ran = cli("embed", str(SAMPLES), "-m", "tiny-shapes", "--precision", "fp32", "-o", target, *extra)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not armed[0]  # the signal came, inside the write
    assert ran.exit_code == 143, ran.stderr
    assert ran.stderr.strip().endswith("Terminated."), ran.stderr
    if layout == "clip-retrieval":
        metadata = sorted((out / "metadata").glob("*.parquet"))
        paths = [p for f in metadata for p in pq.read_table(f).column("image_path").to_pylist()]
        assert len(paths) == sum(len(np.load(f)) for f in (out / "img_emb").glob("*.npy"))
    else:
        paths = pq.read_table(out).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in SAMPLES.rglob("*.jpg"))  # every row, each once
    assert temporaries(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("output", ["out.parquet", "out.csv", "out.jsonl"])
def test_sigterm_keeps_the_rows_written_so_far_and_exits_143(tmp_path, output):
    copies(tmp_path / "imgs", 1500)
    # 64 rows an image, so that Parquet's row groups (8,192 rows) reach the disk after 128 images.
    labels = ["--labels-file", str(SAMPLES / "labels.txt"), "-k", "64"]
    run = clipcli("classify", "imgs", "-m", "tiny-shapes", *labels, "-b", "1", "-o", output, cwd=tmp_path)
    wait_for(lambda: any(p.stat().st_size > 4096 for p in tmp_path.glob(f".{output}.*.tmp")), run)
    run.send_signal(signal.SIGTERM)
    code, _, err = finish(run)
    assert code == 143, err
    assert err.strip().endswith("Terminated.")
    rows = read_rows(tmp_path / output)
    images = list(dict.fromkeys(rows))
    per_image = 1 if output.endswith(".jsonl") else 64  # JSONL holds an image's predictions in one record
    assert 0 < len(images) < 1500 and len(rows) == per_image * len(images)  # whole images only
    assert images == [f"imgs/img-{i}.jpg" for i in range(len(images))]  # in input order, none missing
    assert temporaries(tmp_path) == []


def classify_with_workers_under_way(tmp_path: Path) -> subprocess.Popen[bytes]:
    """A `classify --workers 2` run in a process group of its own, once its output has rows on disk."""
    copies(tmp_path / "imgs", 1500)
    args = ["classify", "imgs", "-m", "tiny-shapes", "-l", "a,b", "-k", "1", "-b", "1", "--workers", "2"]
    run = clipcli(*args, "-o", "out.csv", cwd=tmp_path, start_new_session=True)
    wait_for(lambda: any(p.stat().st_size > 4096 for p in tmp_path.glob(".out.csv.*.tmp")), run)
    return run


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_worker_processes(tmp_path):
    """Schedulers signal the whole group: the decoding processes must leave the stopping to the run."""
    run = classify_with_workers_under_way(tmp_path)
    os.killpg(run.pid, signal.SIGTERM)
    code, _, err = finish(run)
    assert code == 143, err
    assert err.strip() == "Terminated." or err.strip().endswith("\nTerminated."), err
    assert "Traceback" not in err and "Exception" not in err
    rows = read_rows(tmp_path / "out.csv")
    assert 0 < len(rows) < 1500 and rows == [f"imgs/img-{i}.jpg" for i in range(len(rows))]
    assert temporaries(tmp_path) == []


def read_rows(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return pq.read_table(path).column("path").to_pylist()
    if path.suffix == ".csv":
        lines = path.read_text().splitlines()
        assert lines[0] == "path,rank,label,score"
        return [line.split(",")[0] for line in lines[1:]]
    return [json.loads(line)["path"] for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("output", ["out.parquet", "out.csv"])
def test_sigkill_leaves_the_previous_file_and_the_next_run_cleans_up(tmp_path, output):
    copies(tmp_path / "imgs", 1500)
    previous = ["classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-l", "x,y", "-o", output]
    code, _, err = finish(clipcli(*previous, cwd=tmp_path))
    assert code == 0, err
    before = (tmp_path / output).read_bytes()
    # 64 rows an image, so that Parquet's row groups (8,192 rows) reach the disk after 128 images.
    labels = ["--labels-file", str(SAMPLES / "labels.txt"), "-k", "64"]
    run = clipcli("classify", "imgs", "-m", "tiny-shapes", *labels, "-b", "1", "-o", output, cwd=tmp_path)
    wait_for(lambda: any(p.stat().st_size > 4096 for p in tmp_path.glob(f".{output}.*.tmp")), run)
    run.kill()
    finish(run)
    assert (tmp_path / output).read_bytes() == before
    assert len(list(tmp_path.glob(f".{output}.*.tmp"))) == 1  # what the killed run left
    code, _, err = finish(clipcli(*previous, cwd=tmp_path))
    assert code == 0, err
    assert temporaries(tmp_path) == []
    assert len(read_rows(tmp_path / output)) == 16 * 2


@pytest.mark.slow
@pytest.mark.parametrize(("output", "before"), [("out.parquet", "nothing"), ("out.csv", "own")])
def test_a_file_put_at_the_outputs_name_mid_run_is_left_and_the_rows_set_aside(tmp_path, output, before):
    """Another program writes the output's name while a run is under way (a file appears there, or
    clipcli's own earlier file is edited): that file stays as it is, and the run's rows are kept beside
    it under a name the error gives."""
    copies(tmp_path / "imgs", 200)
    if before == "own":
        code, _, err = finish(
            clipcli("classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-l", "x,y", "-o", output, cwd=tmp_path)
        )
        assert code == 0, err
    labels = ["--labels-file", str(SAMPLES / "labels.txt"), "-k", "64"]
    run = clipcli("classify", "imgs", "-m", "tiny-shapes", *labels, "-b", "1", "-o", output, cwd=tmp_path)
    wait_for(lambda: any(tmp_path.glob(f".{output}.*.tmp")), run)  # the run has begun writing
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"a user's file, not clipcli's\n")
    os.replace(theirs, tmp_path / output)  # as an editor or a download saves it: whole, under the name
    code, _, err = finish(run)
    assert code == 2, err
    assert (tmp_path / output).read_bytes() == b"a user's file, not clipcli's\n"
    (aside,) = tmp_path.glob(f"out.*.new{Path(output).suffix}")
    what = "appeared" if before == "nothing" else "changed"
    assert (
        err.strip()
        == f"Error: {output}: {what} while this run wrote it, so it is left as it is; this run's output is in {aside}"
    )
    rows = read_rows(aside)
    assert len(rows) == 200 * 64 and len(set(rows)) == 200
    assert temporaries(tmp_path) == []


@pytest.mark.slow
def test_a_file_put_at_an_npy_outputs_name_mid_run_is_left_and_the_pair_set_aside(tmp_path):
    """NPY is written at the end of the run: what is replaced then is what the run checked at its start."""
    copies(tmp_path / "imgs", 600)
    run = clipcli("embed", "imgs", "-m", "tiny-shapes", "-b", "1", "-o", "emb.npy", cwd=tmp_path)
    wait_for(lambda: reading_images(run.pid), run)  # the output is checked before the first image is read
    (tmp_path / "emb.npy").write_bytes(b"a user's matrix")
    code, _, err = finish(run)
    assert code == 2, err
    assert (tmp_path / "emb.npy").read_bytes() == b"a user's matrix"
    (aside,) = tmp_path.glob("emb.*.new.npy")
    assert err.strip().endswith(
        f"emb.npy: appeared while this run wrote it, so it is left as it is; this run's output is in {aside}"
    )
    saved = open_npy(aside)
    names = [saved.name(i) for i in range(len(saved.matrix))]
    assert sorted(names) == sorted(f"imgs/img-{i}.jpg" for i in range(600))
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("output", ["out.parquet", "out.csv", "out.jsonl"])
@pytest.mark.slow
def test_an_output_holds_this_runs_result_even_when_every_input_is_skipped(cli, tmp_path, output):
    old = ["classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-l", "x,y", "-o", str(tmp_path / output)]
    assert cli(*old).exit_code == 0
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    ran = cli("classify", str(broken), "-m", "tiny-shapes", "-l", "x,y", "-o", str(tmp_path / output))
    assert ran.exit_code == 1
    path = tmp_path / output
    if output.endswith(".parquet"):
        table = pq.read_table(path)
        assert table.num_rows == 0 and table.column_names == ["path", "rank", "label", "score"]
    elif output.endswith(".csv"):
        assert path.read_text() == "path,rank,label,score\n"
    else:
        assert path.read_text() == ""


def test_a_failed_model_load_leaves_the_previous_output(cli, tmp_path):
    out = tmp_path / "out.csv"
    assert cli("classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-l", "x,y", "-o", str(out)).exit_code == 0
    before = out.read_bytes()
    ran = cli("classify", str(SAMPLES / "seen"), "-m", str(tmp_path / "missing.pt"), "-l", "x,y", "-o", str(out))
    assert ran.exit_code == 2
    assert out.read_bytes() == before
    assert temporaries(tmp_path) == []


# 6. The same file twice


def test_overlapping_inputs_are_embedded_once(cli, tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    shutil.copytree(SAMPLES / "seen", folder)
    monkeypatch.chdir(tmp_path)
    first = next(iter(sorted(folder.iterdir()))).name
    ran = cli("embed", f"folder/{first}", f"./folder/{first}", "folder/", "-m", "tiny-shapes", "-o", "dup/")
    assert ran.exit_code == 0, ran.stderr
    paths = pq.ParquetDataset("dup").read(columns=["path"]).column("path").to_pylist()
    assert len(paths) == 16 and len({os.path.normpath(p) for p in paths}) == 16


def test_duplicate_rows_left_by_an_earlier_version_are_dropped_on_the_next_run(cli, tmp_path, monkeypatch):
    import pyarrow as pa

    monkeypatch.chdir(tmp_path)
    shutil.copytree(SAMPLES / "seen", "seen")
    assert cli("embed", "seen", "-m", "tiny-shapes", "-o", "e.parquet").exit_code == 0
    table = pq.read_table("e.parquet")
    pq.write_table(pa.concat_tables([table, table.slice(0, 3)]), "e.parquet")
    ran = cli("embed", "seen", "-m", "tiny-shapes", "-o", "e.parquet")
    assert ran.exit_code == 0
    paths = pq.read_table("e.parquet").column("path").to_pylist()
    assert sorted(paths) == sorted(set(paths)) and len(paths) == 16


# 14. Names that are not UTF-8


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "npy", "dir"])
@pytest.mark.slow
def test_a_name_that_is_not_utf8_is_stored_losslessly_or_skipped(cli, tmp_path, monkeypatch, fmt):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(SAMPLES / "seen", "imgs")
    odd = "imgs/" + os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(SAMPLES / "busy" / "red-circle.jpg", odd)
    output = "emb/" if fmt == "dir" else f"emb.{fmt}"
    ran = cli("embed", "imgs", "-m", "tiny-shapes", "-o", output)
    if fmt in ("parquet", "dir"):
        assert ran.exit_code == 1
        assert "skipped imgs/caf\\xe9.jpg: file name is not UTF-8, which Parquet cannot store" in ran.stderr
        assert len(embedded_names(Path(output))) == 16
        return
    assert ran.exit_code == 0, ran.stderr
    if fmt == "npy":
        saved = open_npy(Path(output))
        assert odd in {saved.name(i) for i in range(saved.header.rows)}
    elif fmt == "csv":
        first_cells = [line.split(b",")[0] for line in Path(output).read_bytes().splitlines()]
        assert os.fsencode(odd) in first_cells  # the name's own bytes, as `find` prints them
    else:
        assert odd in {json.loads(line)["path"] for line in Path(output).read_text().splitlines()}


# 15, 16. Outputs that cannot be written


def test_an_output_under_a_read_only_filesystem_fails_before_the_first_image(tmp_path):
    broken = tmp_path / "in" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        for output in (f"{ro}/emb/", f"{ro}/emb.parquet", f"{ro}/emb.npy", f"{ro}/emb.csv"):
            code, _out, err = finish(clipcli("embed", str(broken.parent), "-m", "tiny-shapes", "-o", output))
            assert code == 2
            assert err.strip() == f"Error: {output.rstrip('/')}: cannot write (Read-only file system)"
            assert "broken.jpg" not in err  # refused before any image was read


def test_an_output_whose_folder_is_a_file_fails_before_the_first_image(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    ran = cli("embed", str(broken), "-m", "tiny-shapes", "-o", str(tmp_path / "afile" / "emb") + "/")
    assert ran.exit_code == 2
    assert ran.stderr.startswith(f"Error: {tmp_path / 'afile' / 'emb'}: cannot write (")
    assert "broken.jpg" not in ran.stderr


@pytest.mark.parametrize("command", ["classify", "embed"])
@pytest.mark.parametrize("output", ["out.csv", "out.jsonl", "out.parquet"])
@pytest.mark.slow
def test_a_full_disk_is_a_one_line_error_and_keeps_the_previous_file(tmp_path, command, output):
    distinct(tmp_path / "many", 1000)
    # classify: 8 scores an image, which no compression fits into the small filesystem
    extra = ["--labels-file", str(SAMPLES / "labels.txt"), "-k", "8"] if command == "classify" else []
    with tmpfs(tmp_path / "small", "64k") as small:
        target = small / output
        code, _, err = finish(clipcli(command, str(SAMPLES / "seen"), "-m", "tiny-shapes", *extra, "-o", str(target)))
        assert code == 0, err
        before = target.read_bytes()
        code, _, err = finish(clipcli(command, str(tmp_path / "many"), "-m", "tiny-shapes", *extra, "-o", str(target)))
        assert code == 2, err
        assert err.strip() == (
            f"Error: {target}: cannot write (no space left on the device); any previous file is left as it was"
        ), err
        assert target.read_bytes() == before
        assert temporaries(small) == []


@pytest.mark.slow
def test_a_full_disk_under_a_directory_output_keeps_every_part_written(tmp_path):
    import pyarrow.dataset as ds

    distinct(tmp_path / "many", 600)
    with tmpfs(tmp_path / "small", "64k") as small:
        run = clipcli("embed", str(tmp_path / "many"), "-m", "tiny-shapes", "--part-size", "20", "-o", f"{small}/emb/")
        code, _, err = finish(run)
        assert code == 2, err
        assert err.count("\n") == 1 and "the parts already written are kept: run again to resume" in err, err
        kept = ds.dataset(small / "emb", format="parquet").to_table()
        assert kept.num_rows >= 20 and kept.num_rows % 20 == 0  # whole parts, each readable
        assert temporaries(small) == []


@pytest.mark.slow
def test_a_failing_write_is_a_one_line_error_and_keeps_the_previous_file(cli, tmp_path, monkeypatch):
    out = tmp_path / "out.csv"
    assert cli("classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-l", "x,y", "-o", str(out)).exit_code == 0
    before = out.read_bytes()
    from clipcli.store import formats as io

    def full_disk(self: object, rows: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.CsvWriter, "_write", full_disk)
    ran = cli("classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-l", "a,b", "-o", str(out))
    assert ran.exit_code == 2
    assert ran.stderr.strip() == (
        f"Error: {out}: cannot write (no space left on the device); any previous file is left as it was"
    )
    assert out.read_bytes() == before
    assert temporaries(tmp_path) == []


# 18. A folder named like a file


def test_embed_into_an_existing_folder_named_csv_is_refused(cli, tmp_path):
    (tmp_path / "existing.csv").mkdir()
    ran = cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(tmp_path / "existing.csv"))
    assert ran.exit_code == 2
    assert ran.stderr.strip() == f"Error: {tmp_path / 'existing.csv'}: cannot write (is a directory)"
    assert list((tmp_path / "existing.csv").iterdir()) == []


def test_npy_needs_an_output_file(cli):
    ran = cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-f", "npy")
    assert ran.exit_code == 2
    assert ran.stderr.strip() == "Error: NPY is written to a file with its sidecar: pass -o FILE.npy"
    assert not Path("embeddings.npy").exists()


def test_embeddings_npy_reads_like_numpy(cli, tmp_path):
    out = tmp_path / "e.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(out)).exit_code == 0
    matrix = np.load(out)
    assert matrix.shape == (16, 64) and np.allclose(np.linalg.norm(matrix, axis=1), 1, atol=1e-5)
    header = json.loads(npy_sidecar(out).read_text().splitlines()[0])
    assert header["model"] == "tiny-shapes" and header["rows"] == 16 and header["key"] == "path"


# Found by attacking the first fixes: outputs that are not plain files, and outputs of eval and train


@pytest.mark.slow
def test_an_output_that_is_a_fifo_or_a_device_is_written_in_place(cli, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    ran = cli(
        "classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-l", "a,b", "-k", "1", "-f", "csv", "-o", str(fifo)
    )
    got = reader.communicate(timeout=60)[0].decode()
    assert ran.exit_code == 0, ran.stderr
    assert got.splitlines()[0] == "path,rank,label,score" and len(got.splitlines()) == 17
    assert fifo.is_fifo()  # still a FIFO, not replaced by a file
    ran = cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-f", "jsonl", "-o", "/dev/null")
    assert ran.exit_code == 0 and Path("/dev/null").is_char_device()
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.csv", b"my precious data\n"),
        ("people.csv", b"name,phone\nAda,123\n"),
        ("report.jsonl", b"my precious data\n"),
        ("log.jsonl", b'{"event": "login"}\n'),
        ("table.tsv", b"a\tb\tc\n"),
        ("pairs.tsv", b"12\tmy own\n"),
        ("mine.npy", None),
        ("emb.rows.jsonl", b"user sidecar\n"),
        ("picture.parquet", None),
        ("manifest.csv", b"path,label\nx.jpg,cat\n"),  # clipcli's own input formats, made by a user
        ("labels.jsonl", b'{"path": "x.jpg", "label": "cat"}\n'),
        ("texts.csv", b"text,label\nhello,greeting\n"),
        ("results.csv", b"model,dataset,score\nresnet50,imagenet,76.1\n"),  # a user's exports, found by attack
        ("grades.jsonl", b'{"id": 17, "name": "Alice", "score": 93}\n'),
        ("ratings.tsv", b"0.9500\tThe Godfather\n"),
        ("churn.parquet", None),
        ("bench.csv", b"model,score\nresnet50,76.1\n"),  # every column one clipcli uses, found by attack
        ("ratings.csv", b"id,label,score\n1,good,5\n"),
        ("human.csv", b"path,label,score\nx.jpg,cat,0.9\n"),
        ("reviews.jsonl", b'{"text": "fine", "label": "pos", "score": 5}\n'),
    ],
)
def test_an_output_clipcli_did_not_write_is_never_replaced(cli, tmp_path, name, content):
    """Found by attack: `-o notes.csv` over a user's file replaced it (CSV, JSONL, TSV, NPY and its
    sidecar). A file there is now replaced only if it is an output clipcli writes; else one line, exit 2,
    the file byte for byte as it was."""
    target = tmp_path / name
    if name.endswith(".npy"):
        np.save(target, np.arange(10))
    elif name.endswith(".parquet"):
        import pyarrow as pa

        columns = {"id": [1, 2], "score": [0.5, 0.7], "customer": ["a", "b"]} if name == "churn.parquet" else None
        pq.write_table(pa.table(columns or {"pixels": [1, 2]}), target)
    else:
        target.write_bytes(content)
    before = target.read_bytes()
    fmt = {"tsv": "tsv", "jsonl": "jsonl", "parquet": "parquet"}.get(name.rsplit(".", 1)[1], "csv")
    out = tmp_path / "emb.npy" if name == "emb.rows.jsonl" else target
    args = ("classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-l", "a,b", "-f", fmt, "-o", str(out))
    if fmt == "tsv":
        args = ("rank", "a red circle", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-f", fmt, "-o", str(out))
    if out.suffix == ".npy":
        args = ("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(out))
    ran = cli(*args)
    assert ran.exit_code == 2, ran.stderr
    assert ran.stderr.startswith(f"Error: {target}: exists and is not a") and ran.stderr.count("\n") == 1
    assert "clipcli replaces only its own outputs" in ran.stderr
    assert target.read_bytes() == before


def test_every_column_clipcli_writes_is_known_as_its_own():
    """A file whose columns are all clipcli's can be replaced; each writer's columns must be in that set, or
    a second run into its own output would be refused."""
    from clipcli.evaluation import run, text
    from clipcli.search import duplicates
    from clipcli.store import ownership, rows
    from clipcli.text.nli import prediction_columns
    from clipcli.zeroshot import classify, timeline

    tag = rows.ModelTag("m", "0" * 64, True)
    written = [
        classify.PREDICTION_COLUMNS,
        timeline.TIMELINE_COLUMNS,
        duplicates.COLUMNS,
        run.PREDICTION_COLUMNS,
        text.PREDICTION_COLUMNS,
        prediction_columns(True),
        ("query", "score", "path"),
        ("path", "t", "e0", "e511"),
        rows.schema(4, "float32", tag).names,
        rows.text_schema(4, "float32", tag).names,
        ("path", "predictions"),
    ]
    for columns in written:
        header = (",".join(columns) + "\n").encode()
        assert ownership.csv_is_own(header, columns[:1]) or not ownership.OWN_MARK_COLUMNS & set(columns), columns
        assert ownership.columns_are_own(columns), columns


def test_a_fifo_at_an_outputs_name_is_written_as_a_stream_or_refused_never_replaced(cli, tmp_path):
    """Found by attack: rank --html and eval --report renamed a file onto a FIFO (or a device) at their
    name, replacing it; a FIFO at an NPY's sidecar name hung the run. A page or a report is now written
    into the FIFO as a stream; an NPY output (two files) refuses one."""
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    page = tmp_path / "page.html"
    os.mkfifo(page)
    reader = subprocess.Popen(["cat", str(page)], stdout=subprocess.PIPE)
    ran = cli("rank", "a red circle", str(emb), "-m", "tiny-shapes", "--html", str(page), "-f", "csv")
    got = reader.communicate(timeout=60)[0]
    assert ran.exit_code == 0, ran.stderr
    assert page.is_fifo() and b"<title>clipcli rank: " in got
    sidecar = tmp_path / "other.rows.jsonl"
    os.mkfifo(sidecar)
    done = subprocess.run(
        [sys.executable, "-m", "clipcli", "embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o",
         str(tmp_path / "other.npy")], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and f"{sidecar}: is not a file" in done.stderr, done.stderr
    assert sidecar.is_fifo()


def test_clipclis_own_outputs_and_empty_files_are_replaced(cli, tmp_path):
    """What a rerun needs: an earlier output of any clipcli command, of the same format, is replaced; so
    is an empty file (nothing to lose)."""
    seen = str(SAMPLES / "seen")
    for fmt in ("csv", "jsonl", "parquet"):
        out = tmp_path / f"out.{fmt}"
        out.write_bytes(b"")
        classify = ("classify", seen, "-m", "tiny-shapes", "-l", "a,b", "-k", "1", "-f", fmt, "-o", str(out))
        assert cli(*classify).exit_code == 0
        assert cli(*classify).exit_code == 0  # its own earlier output
        ran = cli("rank", "a red circle", seen, "-m", "tiny-shapes", "-f", fmt, "-o", str(out))
        assert ran.exit_code == 0, ran.stderr  # another command's
    tsv = ("rank", "a red circle", seen, "-m", "tiny-shapes", "-f", "tsv", "-o", str(tmp_path / "out.tsv"))
    assert [cli(*tsv).exit_code for _ in range(2)] == [0, 0]  # no header: its own columns tell it
    npy = tmp_path / "emb.npy"
    for _ in range(2):
        assert cli("embed", seen, "-m", "tiny-shapes", "-o", str(npy)).exit_code == 0


def test_a_fifo_output_whose_reader_goes_away_is_an_error_not_a_quiet_end(tmp_path):
    """Found by attack: `-o FIFO` (or `-o >(gzip > x)`) whose reader stopped early ended like `| head`:
    exit 0, stderr closed, the rows it did not take lost without a word. Now one line and exit 2; a
    reader of stdout that goes away still ends the run quietly."""
    copies(tmp_path / "imgs", 200)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["head", "-c", "100", str(fifo)], stdout=subprocess.DEVNULL)
    args = ("embed", str(tmp_path / "imgs"), "-m", "tiny-shapes", "-f", "jsonl")  # ~1 KB a row: past a pipe's buffer
    code, _, err = finish(clipcli(*args, "-o", str(fifo)))
    reader.wait(timeout=60)
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith(f"Error: {fifo}: its reader went away (broken pipe)"), err
    piped = subprocess.run(
        f"{shlex.join([sys.executable, '-m', 'clipcli', *args])} | head -c 100 > /dev/null; echo ${{PIPESTATUS[0]}}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert piped.stdout.strip() == "0" and "Error" not in piped.stderr, piped.stderr


@pytest.mark.slow
def test_an_output_that_is_a_symlink_writes_and_locks_its_target(cli, tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("path,score\nold.jpg,0.5\n")  # an earlier output of clipcli's
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    from clipcli.atomic import OutputLock

    with OutputLock(real, is_dir=False):  # another run writing the real file blocks the link too
        probe = (
            f"from pathlib import Path; from clipcli.atomic import OutputLock; OutputLock(Path({str(link)!r}), False)"
        )
        refused = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "another clipcli run" in refused.stderr
    assert cli("classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-l", "a,b", "-o", str(link)).exit_code == 0
    assert link.is_symlink() and real.read_text().startswith("path,rank,label,score\n")


@pytest.mark.slow
def test_embed_writes_csv_to_a_name_without_an_extension(cli, tmp_path):
    ran = cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-f", "csv", "-o", str(tmp_path / "noext"))
    assert ran.exit_code == 0, ran.stderr
    assert (tmp_path / "noext").read_text().startswith("path,e0,")


@pytest.mark.slow
def test_an_existing_parquet_folder_is_a_dataset_as_spark_writes_them(cli, tmp_path):
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", f"{tmp_path}/s/").exit_code == 0
    (tmp_path / "s").rename(tmp_path / "s.parquet")
    ran = cli(
        "embed", str(SAMPLES / "seen"), str(SAMPLES / "busy"), "-m", "tiny-shapes", "-o", str(tmp_path / "s.parquet")
    )
    assert ran.exit_code == 0, ran.stderr
    assert "embedded 6, unchanged 16" in ran.stderr
    assert embedded_names(tmp_path / "s.parquet") == {p.name for p in (SAMPLES / "seen").iterdir()} | {
        p.name for p in (SAMPLES / "busy").iterdir()
    }


@pytest.mark.slow
def test_a_second_train_into_the_same_output_is_refused(tmp_path):
    make_pairs = ["make-shapes", str(tmp_path / "pairs"), "-n", "64", "--workers", "1"]
    assert finish(clipcli(*make_pairs))[0] == 0
    train = ["train", str(tmp_path / "pairs" / "pairs.csv"), "-o", "m.pt", "--arch", "test-vit", "--steps", "400"]
    first = clipcli(*train, "-b", "8", "--checkpoint-every", "50", cwd=tmp_path)
    wait_for((tmp_path / ".m.pt.lock").exists, first)
    code, _, err = finish(clipcli(*train, "--seed", "5", cwd=tmp_path))
    assert code == 2 and f"another clipcli run (pid {first.pid}) is writing this output" in err
    first.kill()
    finish(first)


def test_eval_outputs_are_checked_before_the_evaluation(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    for option, name in (("--report", "r.json"), ("--predictions", "p.csv")):
        ran = cli("eval", str(SAMPLES), "-m", "tiny-shapes", option, str(tmp_path / "afile" / name))
        assert ran.exit_code == 2 and ran.stderr.startswith(f"Error: {tmp_path / 'afile' / name}: cannot write (")
        assert "zero-shot evaluation" not in ran.stderr and "acc@1" not in ran.stderr  # nothing was evaluated


@pytest.mark.slow
def test_eval_report_removes_what_a_killed_run_left(cli, tmp_path):
    stale = tmp_path / ".r.json.99999999.tmp"
    stale.write_text("{")
    assert cli("eval", str(SAMPLES), "-m", "tiny-shapes", "--report", str(tmp_path / "r.json")).exit_code == 0
    assert not stale.exists() and json.loads((tmp_path / "r.json").read_text())["schema_version"] == 1
    assert temporaries(tmp_path) == []


@pytest.mark.slow
def test_csv_quotes_names_holding_a_carriage_return(cli, tmp_path):
    import pandas as pd

    folder = tmp_path / "odd"
    for i, name in enumerate(["c\rd.jpg", "plain.jpg", 'q"uote.jpg', "com,ma.jpg"]):
        make_image(folder / name, seed=i)
    for command in (["embed", str(folder)], ["classify", str(folder), "-l", "a,b", "-k", "1"]):
        out = tmp_path / f"{command[0]}.csv"
        assert cli(*command, "-m", "tiny-shapes", "-o", str(out)).exit_code == 0
        paths = pd.read_csv(out)["path"].tolist()
        assert sorted(paths) == sorted(str(p) for p in folder.iterdir())
        assert b"\r\n" not in out.read_bytes().replace(b"c\rd", b"")  # rows end in \n alone


def test_stdin_paths_separated_by_nul_bytes(cli, tmp_path):
    first = make_image(tmp_path / "new\nline.jpg")
    second = make_image(tmp_path / "plain.jpg", seed=1)
    ran = cli("embed", "-", "-m", "tiny-shapes", "-f", "jsonl", input=f"{first}\0{second}\0")
    assert ran.exit_code == 0, ran.stderr
    assert [json.loads(line)["path"] for line in ran.stdout.splitlines()] == [str(first), str(second)]


@pytest.mark.slow
def test_a_folder_named_twice_through_a_link_is_walked_once(cli, tmp_path):
    (tmp_path / "alias").symlink_to(SAMPLES / "seen")
    ran = cli("embed", str(SAMPLES / "seen"), str(tmp_path / "alias"), "-m", "tiny-shapes", "-f", "jsonl")
    assert ran.exit_code == 0 and len(ran.stdout.splitlines()) == 16


@pytest.mark.slow
def test_rank_ranks_an_image_folder_that_holds_a_parquet_file(cli, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(SAMPLES / "seen", folder)
    assert (
        cli("classify", str(folder), "-m", "tiny-shapes", "-l", "a,b", "-o", str(folder / "x.parquet")).exit_code == 0
    )
    ran = cli("rank", "a photo of a red cross.", str(folder), "-m", "tiny-shapes", "-k", "1")
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout.split("\t")[1].strip() == str(folder / "red-cross.jpg")


# A second pass of attacks: worker processes that outlive the run, streams, the NPY sidecar


def _group_gone(pgid: int, within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_workers_leaves_no_process_behind(tmp_path):
    run = classify_with_workers_under_way(tmp_path)
    os.killpg(run.pid, signal.SIGINT)
    code, _, err = finish(run)
    assert code == 130 and err.strip().endswith("Interrupted."), err
    try:
        assert _group_gone(run.pid), "decoding processes outlived the run"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert 0 < len(read_rows(tmp_path / "out.csv")) < 1500


@pytest.mark.slow
def test_kill_9_of_a_run_with_workers_frees_its_output_for_the_next_run(tmp_path):
    run = classify_with_workers_under_way(tmp_path)
    run.kill()  # the main process only: its workers must not live on holding the lock
    finish(run)
    try:
        assert _group_gone(run.pid), "decoding processes outlived the run"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    code, _, err = finish(
        clipcli("classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-l", "a,b", "-o", "out.csv", cwd=tmp_path)
    )
    assert code == 0, err
    assert temporaries(tmp_path) == []


@pytest.mark.slow
def test_outputs_to_dev_stdout_and_to_a_pipe(tmp_path):
    command = f"{sys.executable} -m clipcli embed {SAMPLES / 'seen'} -m tiny-shapes"
    piped = subprocess.run(
        ["bash", "-c", f"{command} -o /dev/stdout | wc -l"], capture_output=True, text=True, timeout=120
    )
    assert piped.stdout.strip() == "17", piped.stderr
    substituted = f"{command} -o >(cat > {tmp_path / 'out.csv'}); sleep 1"
    ran = subprocess.run(["bash", "-c", substituted], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "out.csv").read_text().startswith("path,e0,")
    assert not list(tmp_path.glob(".*"))


@pytest.mark.slow
def test_the_npy_sidecar_is_locked_with_the_matrix(cli, tmp_path):
    from clipcli.atomic import OutputLock

    with OutputLock(tmp_path / "p.rows.jsonl", is_dir=False):
        argv = ["clipcli", "embed", str(SAMPLES / "busy"), "-m", "tiny-shapes", "-o", str(tmp_path / "p.npy")]
        script = f"import sys; from clipcli.cli import main; sys.argv = {argv!r}; main()"
        ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2 and "p.rows.jsonl: another clipcli run" in ran.stderr, ran.stderr
    assert not (tmp_path / "p.npy").exists()


def test_a_file_named_through_a_linked_folder_is_processed_once(cli, tmp_path):
    (tmp_path / "alias").symlink_to(SAMPLES / "seen")
    image = "red-cross.jpg"
    ran = cli(
        "embed", str(SAMPLES / "seen" / image), str(tmp_path / "alias" / image), "-m", "tiny-shapes", "-f", "jsonl"
    )
    assert ran.exit_code == 0 and len(ran.stdout.splitlines()) == 1


def test_a_checkpoint_rewritten_under_its_name_is_refused_by_checksum(cli, tmp_path):
    """Same path, other weights (size and mtime put back): the digest, not the name, tells them apart."""
    import os

    live = write_checkpoint(tmp_path / "model.pt", "test-vit", seed=0)
    out = tmp_path / "emb"
    assert cli("embed", str(SAMPLES / "seen"), "-m", str(live), "-o", f"{out}/").exit_code == 0
    before = live.stat()
    write_checkpoint(tmp_path / "other.pt", "test-vit", seed=1).replace(live)
    os.utime(live, ns=(before.st_atime_ns, before.st_mtime_ns))
    ran = cli("embed", str(SAMPLES / "seen"), "-m", str(live), "-o", f"{out}/")
    assert ran.exit_code == 2 and len(ran.stderr.strip().splitlines()) == 1
    assert f"embeddings were made with {live} of checksum " in ran.stderr and ", not the loaded " in ran.stderr


def test_a_dataset_folder_holding_its_own_input_images_is_refused(cli, tmp_path, monkeypatch):
    """Found by a newcomer: `embed photos/busy -o photos/` put a dataset among the photos, and `rank q
    photos` then searched the dataset's rows only, without a word about the photos beside it."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(SAMPLES, "photos")
    ran = cli("embed", "photos/busy", "-m", "tiny-shapes", "-o", "photos/")
    assert ran.exit_code == 2, ran.stderr
    assert ran.stderr.startswith("Error: photos/: holds the input photos/busy;") and ran.stderr.count("\n") == 1
    assert not list(Path("photos").glob("*.parquet"))
    assert cli("embed", "photos", "-m", "tiny-shapes", "-o", "photos/emb/").exit_code == 0  # a folder of its own


def test_two_outputs_of_one_run_that_name_one_file_are_refused_before_any_work(cli, tmp_path, monkeypatch):
    """Found by attack: `rank -o same.csv --html link.csv` (a link to same.csv) wrote both under one
    temporary name, and same.csv ended as the rows cut into the page; `eval --report X --predictions X`
    was refused only after the whole evaluation, its predictions lost."""
    monkeypatch.chdir(tmp_path)
    os.symlink("same.csv", "link.csv")
    ran = cli(
        "rank", "a red circle", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", "same.csv", "--html", "link.csv"
    )
    assert ran.exit_code == 2 and ran.stderr.count("\n") == 1, ran.stderr
    assert "link.csv: given as both --output and --html (one file)" in ran.stderr
    assert not Path("same.csv").exists()
    manifest = Path("m.csv")
    manifest.write_text(
        "path,label\n" + "".join(f"{p},{p.stem}\n" for p in sorted((SAMPLES / "seen").glob("*.jpg"))[:3])
    )
    ran = cli("eval", "m.csv", "-m", "tiny-shapes", "--report", "r.json", "--predictions", "./r.json")
    assert ran.exit_code == 2 and "given as both --report and --predictions" in ran.stderr, ran.stderr
    assert "acc" not in ran.stderr  # refused before the evaluation


@pytest.mark.slow
def test_a_file_put_at_an_embed_parquet_files_name_mid_run_is_left_and_the_rows_set_aside(tmp_path):
    """Found by attack: embed's single Parquet file re-read whatever was at its name at the end: a user's
    file put there mid-run made an internal error (exit 3), and the run's rows were lost."""
    import pyarrow as pa

    copies(tmp_path / "imgs", 400)
    code, _, err = finish(
        clipcli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", "ep.parquet", cwd=tmp_path)
    )
    assert code == 0, err
    run = clipcli("embed", "imgs", "-m", "tiny-shapes", "-b", "1", "-o", "ep.parquet", cwd=tmp_path)
    wait_for(lambda: reading_images(run.pid), run)
    pq.write_table(pa.table({"id": [1], "name": ["Ada"], "score": [0.5]}), tmp_path / "theirs.parquet")
    before = (tmp_path / "theirs.parquet").read_bytes()
    os.replace(tmp_path / "theirs.parquet", tmp_path / "ep.parquet")
    code, _, err = finish(run)
    assert code == 2, err
    assert (tmp_path / "ep.parquet").read_bytes() == before
    (aside,) = tmp_path.glob("ep.*.new.parquet")
    assert err.strip().endswith(f"this run's output is in {aside.resolve()}") and err.count("Error:") == 1
    assert sorted(pq.read_table(aside).column("path").to_pylist()) == sorted(f"imgs/img-{i}.jpg" for i in range(400))
