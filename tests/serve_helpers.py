"""Starting `clipcli serve` as a real process for the API and browser tests, and stopping it for sure.

:func:`running_server` starts ``python -m clipcli serve ... --port 0`` (the server takes a free port and
prints its URL), waits for that line, and on the way out stops the process (SIGTERM, then SIGKILL) and
waits for it, so no test leaves a server behind. Its stderr is collected for the tests to read.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
URL = re.compile(r" at (http://\S+) \(Ctrl-C to stop\)")
OLD_MTIME = 1559390400.0  # 2019-06-01T12:00:00Z: the "old" photos of the date filter tests
OLD_FILES = ("seen/blue-star.jpg", "seen/green-square.jpg")


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)  # stderr so far

    @property
    def base(self) -> str:
        return self.url.split("?", 1)[0].rstrip("/")

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the exit status (killed, and failing the test, past ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server did not stop within {timeout} s of signal {sig}") from None


@contextmanager
def running_server(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 90.0
) -> Iterator[Server]:
    command = [sys.executable, "-m", "clipcli", "serve", *args]
    if "--port" not in args:
        command += ["--port", "0"]
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = Server(process)
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            server.lines.append(line)
            found = URL.search(line)
            if found:
                server.url = found.group(1)
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not start within {timeout} s: {server.stderr()}")
        if not server.url:
            raise AssertionError(f"the server ended before serving (exit {process.wait()}): {server.stderr()}")
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(10)


def photo_tree(root: Path) -> Path:
    """A copy of samples/ under ``root/photos`` (images only), two of them last modified in 2019."""
    photos = root / "photos"
    for folder in ("seen", "held-out", "busy"):
        shutil.copytree(SAMPLES / folder, photos / folder)
    for name in OLD_FILES:
        os.utime(photos / name, (OLD_MTIME, OLD_MTIME))
    return photos


def embed(root: Path, inputs: Sequence[str], output: str, env: dict[str, str] | None = None) -> None:
    """``clipcli embed INPUTS -m tiny-shapes -o OUTPUT`` run in ``root``, as a user runs it."""
    subprocess.run(
        [sys.executable, "-m", "clipcli", "embed", *inputs, "-m", "tiny-shapes", "-o", output],
        cwd=root,
        env={**os.environ, **(env or {})},
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=120,
    )


def no_traceback(text: str) -> bool:
    return "Traceback" not in text and "Error:" not in text
