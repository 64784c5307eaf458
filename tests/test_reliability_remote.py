"""Ray clusters and object stores that never answer: one error line in seconds, and signals obeyed.

Every server here is on this machine: a listening socket that accepts connections and never replies
(what a firewalled, stalled or wrong endpoint looks like), a closed port, or a name that cannot resolve.
``gs://`` and ``s3://`` are pointed at it through the URI's ``endpoint_override``, and Google's
credential lookup through ``GCE_METADATA_ROOT``, so nothing is sent beyond 127.0.0.1 (or this node's
own address, which Ray substitutes for 127.0.0.1). Each CLI run is a real process, bounded by a time
limit, so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_image

MODEL = ("-m", "tiny-shapes", "--precision", "fp32")
LIMIT_S = 90  # the longest a run may take before it counts as hung (the fault: it never ends)
QUICK_S = 45  # start-up (torch, the model) on two busy cores, plus the 2 s the tests allow the store
PROMPT_S = 10  # from a signal to the process's end


class Silent:
    """A TCP server that accepts every connection and never sends a byte."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.accepted = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent() -> Iterator[Silent]:
    server = Silent("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i in range(3):
        make_image(tmp_path / "imgs" / f"img{i}.jpg", (40, 30), seed=i)
    return tmp_path / "imgs"


@dataclass
class Ended:
    returncode: int
    stderr: str
    seconds: float  # from start, or from the signal when one was sent


def quiet_env(tmp_path: Path, silent: str, **extra: str) -> dict[str, str]:
    """The environment without any cloud settings of the machine's, and every lookup kept local."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "CLOUDSDK_"))}
    env.pop("CLOUD_STORAGE_EMULATOR_ENDPOINT", None)
    env.pop("RAY_ADDRESS", None)
    env.update(
        HOME=str(tmp_path),  # no ~/.config/gcloud, no ~/.aws
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_EC2_METADATA_DISABLED="true",
        GCE_METADATA_ROOT=silent,
        GCE_METADATA_HOST=silent,
        RAY_USAGE_STATS_ENABLED="0",
        COLUMNS="200",
    )
    env.update(extra)
    return env


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "clipcli", *args]
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen[str], since: float, limit: float = LIMIT_S) -> Ended:
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and anything it started
        _, err = proc.communicate()
        pytest.fail(f"still running after {limit} s: {err[-2000:]}")
    return Ended(proc.returncode, err, time.monotonic() - since)


def run(args: list[str], env: dict[str, str], cwd: Path) -> Ended:
    began = time.monotonic()
    return finish(start(args, env, cwd), began)


def signalled(args: list[str], env: dict[str, str], cwd: Path, server: Silent, signum: int) -> Ended:
    """Start a run, wait until it is blocked on ``server``, send ``signum``; time from the signal."""
    proc = start(args, env, cwd)
    if not server.accepted.wait(LIMIT_S):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run never reached the server: {proc.communicate()[1][-2000:]}")
    time.sleep(0.5)  # inside the blocking call
    assert proc.poll() is None, proc.communicate()[1]
    os.kill(proc.pid, signum)
    return finish(proc, time.monotonic(), PROMPT_S * 3)


def one_error_line(ended: Ended) -> str:
    lines = ended.stderr.strip().splitlines()
    assert len(lines) == 1, ended.stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in ended.stderr
    return lines[0]


# ---- Ray: --ray-address ------------------------------------------------------------------------------


def node_ip() -> str:
    """The address Ray connects to when given 127.0.0.1: this machine's own (a local connection)."""
    from ray._private.services import get_node_ip_address

    return str(get_node_ip_address())


def ray_embed(folder: Path, tmp_path: Path, address: str) -> list[str]:
    return ["embed", str(folder), *MODEL, "-o", f"{tmp_path / 'out'}/", "--engine", "ray", "--ray-address", address]


@pytest.mark.parametrize("kind", ["closed port", "unresolvable name", "silent server"])
@pytest.mark.slow
def test_an_unreachable_ray_address_is_one_error_line_within_seconds(kind, folder, silent, tmp_path):
    server = Silent(node_ip()) if kind == "silent server" else None
    try:
        address = {"closed port": "127.0.0.1:1", "unresolvable name": "nonexistent.invalid:6379"}.get(
            kind, server.address if server else ""
        )
        env = quiet_env(tmp_path, silent.address, CLIPCLI_RAY_CONNECT_TIMEOUT="2")
        ended = run(ray_embed(folder, tmp_path, address), env, tmp_path)
    finally:
        if server:
            server.close()
    assert ended.returncode == 2, ended.stderr
    line = one_error_line(ended)
    assert line.startswith(f"Error: --ray-address {address}: ")
    assert ended.seconds < QUICK_S
    if server:
        assert server.accepted.is_set() and "CLIPCLI_RAY_CONNECT_TIMEOUT" in line
    assert not list((tmp_path / "out").glob("part-*"))


@pytest.mark.parametrize("address", ["garbage", "ray://127.0.0.1:{port}", "127.0.0.1:99999"])
@pytest.mark.slow
def test_a_malformed_or_ray_client_address_is_one_error_line(address, folder, silent, tmp_path):
    with socket.socket() as s:  # a port nothing listens on (10001 in the report)
        s.bind(("127.0.0.1", 0))
        address = address.format(port=s.getsockname()[1])
    env = quiet_env(tmp_path, silent.address, CLIPCLI_RAY_CONNECT_TIMEOUT="2")
    ended = run(ray_embed(folder, tmp_path, address), env, tmp_path)
    assert ended.returncode == 2, ended.stderr
    assert one_error_line(ended).startswith(f"Error: --ray-address {address}: ")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.slow
def test_a_signal_while_connecting_to_ray_ends_the_run_at_once(signum, code, folder, silent, tmp_path):
    server = Silent(node_ip())
    try:
        env = quiet_env(tmp_path, silent.address, CLIPCLI_RAY_CONNECT_TIMEOUT="300")
        ended = signalled(ray_embed(folder, tmp_path, server.address), env, tmp_path, server, signum)
    finally:
        server.close()
    assert ended.returncode == code, ended.stderr
    assert ended.seconds < PROMPT_S
    assert ended.stderr.strip().splitlines()[-1] in ("Terminated.", "Interrupted.")


def test_the_ray_connect_timeout_must_be_a_number_of_seconds(folder, silent, tmp_path):
    env = quiet_env(tmp_path, silent.address, CLIPCLI_RAY_CONNECT_TIMEOUT="soon")
    ended = run(ray_embed(folder, tmp_path, "127.0.0.1:1"), env, tmp_path)
    assert ended.returncode == 2, ended.stderr
    assert one_error_line(ended) == "Error: CLIPCLI_RAY_CONNECT_TIMEOUT=soon: give a number of seconds above 0"


# ---- Object stores: -o s3://... and gs://... ---------------------------------------------------------


def store_uri(scheme: str, server: str) -> str:
    if scheme == "s3":
        return f"s3://bucket/emb/?endpoint_override={server}&scheme=http&region=us-east-1"
    return f"gs://bucket/emb/?endpoint_override={server}&scheme=http"


@pytest.mark.parametrize("scheme", ["s3", "gs"])
@pytest.mark.slow
def test_an_object_store_that_never_answers_is_one_error_line_within_seconds(scheme, folder, silent, tmp_path):
    env = quiet_env(tmp_path, silent.address, CLIPCLI_OBJECT_STORE_TIMEOUT="2")
    ended = run(["embed", str(folder), *MODEL, "-o", store_uri(scheme, silent.address)], env, tmp_path)
    assert ended.returncode == 2, ended.stderr
    line = one_error_line(ended)
    assert line.startswith(f"Error: {scheme}://bucket/emb/: the object store did not answer within 2 s")
    assert "CLIPCLI_OBJECT_STORE_TIMEOUT" in line and "?" not in line  # the URI's query is never shown
    assert silent.accepted.is_set()  # it was this server that did not answer
    assert ended.seconds < QUICK_S


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("scheme", ["s3", "gs"])
@pytest.mark.slow
def test_a_signal_during_an_object_store_call_ends_the_run_at_once(scheme, signum, code, folder, silent, tmp_path):
    env = quiet_env(tmp_path, silent.address, CLIPCLI_OBJECT_STORE_TIMEOUT="300")
    args = ["embed", str(folder), *MODEL, "-o", store_uri(scheme, silent.address)]
    ended = signalled(args, env, tmp_path, silent, signum)
    assert ended.returncode == code, ended.stderr
    assert ended.seconds < PROMPT_S
    assert ended.stderr.strip().splitlines()[-1] in ("Terminated.", "Interrupted.")


def test_every_object_store_call_is_bounded(monkeypatch):
    """In-process: a call that blocks is given up on after the timeout; one that fails raises its own
    error; one that answers returns its value."""
    from clipcli.errors import InputError, OutputError
    from clipcli.store.remote import bounded

    monkeypatch.setenv("CLIPCLI_OBJECT_STORE_TIMEOUT", "0.5")
    release = threading.Event()
    began = time.monotonic()
    with pytest.raises(OutputError, match=r"^s3://b/: the object store did not answer within 0\.5 s \(listing it\)"):
        bounded("s3://b/", "listing it", lambda: release.wait(60))
    assert time.monotonic() - began < 5
    release.set()
    with pytest.raises(FileNotFoundError):
        bounded("s3://b/", "reading", lambda: open("/nonexistent/part"))  # noqa: SIM115
    assert bounded("s3://b/", "reading", lambda: 42) == 42
    monkeypatch.setenv("CLIPCLI_OBJECT_STORE_TIMEOUT", "-1")
    with pytest.raises(InputError, match=r"CLIPCLI_OBJECT_STORE_TIMEOUT=-1: give a number of seconds above 0"):
        bounded("s3://b/", "reading", lambda: 42)
