"""Inputs that used to hang a run for ever: FIFOs named like images, and symlink loops.

Every test here bounds itself, so a regression fails the test instead of hanging the suite: the real
CLI runs in its own process group, killed whole at the time limit; direct calls run under an alarm.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import make_image

from clipcli.images.batches import iter_batches
from clipcli.images.decode import NotARegularFile, decode
from clipcli.images.sources import ImageRef, discover

CLI_SECONDS = 120  # a run takes seconds; only a hang comes near this, even on two busy cores


class Hung(Exception):
    """Not TimeoutError: that is an OSError, which os.walk and glob swallow and carry on."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`Hung` in this (the main) thread after ``seconds``, even inside a blocking open()."""

    def expire(signum: int, frame: Any) -> None:
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path, input: str | None = None) -> Ran:
    """``clipcli classify ARGS`` with the bundled model; the whole process group dies at the time limit
    (decoding workers blocked on a FIFO would outlive their parent otherwise)."""
    command = [sys.executable, "-m", "clipcli", "classify", *args, "--model", "tiny-shapes", "--labels", "a,b"]
    proc = subprocess.Popen(
        [*command, "-f", "csv"],
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(input or "", timeout=CLI_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"clipcli {' '.join(args)} still running after {CLI_SECONDS} s")
    return Ran(proc.returncode, stdout, stderr)


def paths_in(csv: str) -> list[str]:
    """The image paths of a classify CSV, once per image (rank 1)."""
    frame = pd.read_csv(io.StringIO(csv))
    return list(frame.loc[frame["rank"] == 1, "path"])


# --- FIFOs, sockets and devices -------------------------------------------------------------------


def test_a_fifo_is_refused_without_being_opened(tmp_path: Path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    try:
        with deadline(10), pytest.raises(NotARegularFile, match=r"^not a regular file \(a FIFO\)$"):
            decode(fifo)
    finally:
        # Had decode opened it (a regression), a writer lets that open return instead of blocking for ever.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_sockets_and_devices_are_skipped_with_their_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # a socket's path must be short
    server = socket.socket(socket.AF_UNIX)
    server.bind("s.jpg")
    good = make_image(tmp_path / "good.jpg")
    refs = [ImageRef(p, Path(p)) for p in ("s.jpg", "/dev/null", str(good))]
    try:
        with deadline(30):
            batches = list(iter_batches(refs, 32))
    finally:
        server.close()
    assert [i for b in batches for i in b.indices] == [2]
    assert [s for b in batches for s in b.skipped] == [
        (0, "not a regular file (a socket)"),
        (1, "not a regular file (a character device)"),
    ]


def _fifo_and_good_image(tmp_path: Path) -> None:
    make_image(tmp_path / "in" / "good.jpg")
    os.mkfifo(tmp_path / "in" / "x.jpg")


@pytest.mark.parametrize(
    ("way", "args", "stdin"),
    [
        ("in a folder", ["in"], None),
        ("as an argument", ["in/x.jpg", "in/good.jpg"], None),
        ("listed on stdin", ["-"], "in/x.jpg\nin/good.jpg\n"),
        ("with decoding workers", ["in", "--workers", "2"], None),
    ],
)
@pytest.mark.slow
def test_a_run_with_a_fifo_ends_and_writes_the_good_images(tmp_path, way, args, stdin):
    _fifo_and_good_image(tmp_path)
    ran = run_cli(*args, cwd=tmp_path, input=stdin)
    assert ran.returncode == 1, ran.stderr
    assert "skipped in/x.jpg: not a regular file (a FIFO)" in ran.stderr.splitlines()
    assert paths_in(ran.stdout) == ["in/good.jpg"]
    assert ran.stderr.splitlines()[-1] == "classified 1 image, skipped 1"


# --- symlink loops --------------------------------------------------------------------------------

LOOPS = {"self": ("self", "."), "up": ("sub/up", "..")}


def _tree_with_loops(root: Path, loops: list[str]) -> None:
    make_image(root / "a.jpg")
    make_image(root / "sub" / "b.jpg", seed=1)
    make_image(root / "sub" / "deeper" / "c.png", seed=2)
    for name in loops:
        link, target = LOOPS[name]
        (root / link).symlink_to(target, target_is_directory=True)


@pytest.mark.parametrize("loops", [["self"], ["up"], ["self", "up"]])
def test_a_folder_walk_lists_each_image_once_despite_symlink_loops(tmp_path, loops):
    _tree_with_loops(tmp_path / "tree", loops)
    with deadline(20):
        refs, missing = discover([str(tmp_path / "tree")])
    rel = [os.path.relpath(r.path, tmp_path / "tree") for r in refs]
    assert rel == ["a.jpg", "sub/b.jpg", "sub/deeper/c.png"]
    assert missing == []


@pytest.mark.parametrize("pattern", ["tree/**/*.jpg", "**/*.jpg", "tree/**"])
def test_a_recursive_glob_lists_each_image_once_despite_symlink_loops(tmp_path, monkeypatch, pattern):
    _tree_with_loops(tmp_path / "tree", ["self", "up"])
    monkeypatch.chdir(tmp_path)
    with deadline(20):
        refs, _ = discover([pattern])
    expected = ["tree/a.jpg", "tree/sub/b.jpg"] + (["tree/sub/deeper/c.png"] if pattern == "tree/**" else [])
    assert [r.path for r in refs] == expected


def test_a_link_to_a_folder_outside_the_tree_is_followed(tmp_path):
    make_image(tmp_path / "outside" / "c.jpg")
    (tmp_path / "outside" / "back").symlink_to(tmp_path / "tree", target_is_directory=True)
    make_image(tmp_path / "tree" / "a.jpg", seed=1)
    (tmp_path / "tree" / "elsewhere").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "tree" / "same-elsewhere").symlink_to(tmp_path / "outside", target_is_directory=True)
    with deadline(20):
        refs, _ = discover([str(tmp_path / "tree")])
    # the first link in natural order is walked; the second, and the link back, lead nowhere new
    assert [os.path.relpath(r.path, tmp_path / "tree") for r in refs] == ["a.jpg", "elsewhere/c.jpg"]


@pytest.mark.slow
def test_a_run_over_a_folder_with_symlink_loops_classifies_each_image_once(tmp_path):
    _tree_with_loops(tmp_path / "tree", ["self", "up"])
    ran = run_cli("tree", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert paths_in(ran.stdout) == ["tree/a.jpg", "tree/sub/b.jpg", "tree/sub/deeper/c.png"]


def test_a_named_file_that_is_a_symlink_loop_is_skipped_with_that_reason(cli, tmp_path):
    """A link to itself named as an input, image or video alike: one line saying it is a loop of
    symbolic links (not errno's text with the path again), and the other inputs embedded."""
    make_image(tmp_path / "good.png")
    for name in ("loop.jpg", "loop.mp4"):
        (tmp_path / name).symlink_to(name)
    ran = cli(
        "embed", "-m", "tiny-shapes", str(tmp_path / "loop.jpg"), str(tmp_path / "loop.mp4"), str(tmp_path / "good.png")
    )
    assert ran.exit_code == 1, ran.stderr
    skipped = sorted(ln for ln in ran.stderr.splitlines() if ln.startswith("skipped"))
    assert skipped == [f"skipped {tmp_path / n}: a loop of symbolic links" for n in ("loop.jpg", "loop.mp4")]
    assert "good.png" in ran.stdout
