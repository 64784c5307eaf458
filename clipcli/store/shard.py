"""``--shard I/N``: a deterministic slice of the inputs, for job arrays (Slurm arrays, indexed Jobs).

Each path belongs to exactly one shard, chosen by a hash of the path as stored (the name the user gave;
for a member of a container, such as a WebDataset shard's sample, the container's path),
so N processes started with ``0/N`` .. ``N-1/N`` over the same inputs split them with no coordination,
and a file keeps its shard from one run to the next (an incremental rerun of shard I finds its rows).
The hash is SHA-1, not Python's ``hash()``, which is salted per process.

Shards write into one Parquet directory at once. Their locks (files inside the directory, never
removed, since a lock file that is unlinked while another process waits on it protects nothing):

- ``.clipcli.store.shard-I-of-N.lock``: exclusive, held for the run: the same shard cannot run twice at once.
- ``.clipcli.shards.lock``: shared by every shard run; an unsharded run into the directory takes it
  exclusively, so the two kinds of run refuse each other.
- ``.clipcli.compact.lock``: exclusive, waited for, while a shard reads the parts and while it drops
  its stale rows from them, so that no shard reads a part another is rewriting.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from clipcli.atomic import LOCK_NAME, describe_os_error, real_path
from clipcli.errors import InputError, OutputError
from clipcli.images.containers import container_of

SHARDS_LOCK = ".clipcli.shards.lock"
COMPACT_LOCK = ".clipcli.compact.lock"
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with 0 <= I < N (as Slurm's ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
        m = _SPEC.match(text)
        if not m:
            raise InputError(f"--shard {text}: expected I/N, such as 0/4 (shard I of N, counted from 0)")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or index >= count:
            raise InputError(f"--shard {text}: I must be from 0 to N-1 (N >= 1)")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """The part of a file name that marks this shard's files (``s2of8``)."""
        return f"s{self.index}of{self.count}"

    def owns(self, path: str) -> bool:
        return shard_of(path, self.count) == self.index

    def select(self, items: Sequence[T], key: str = "path") -> list[T]:
        """The items (with a ``path`` attribute) of this shard, in their order."""
        return [item for item in items if self.owns(getattr(item, key))]


def shard_of(path: str, count: int) -> int:
    """The shard of ``path`` among ``count``: the first 8 bytes of its SHA-1, modulo ``count``. A
    container's members (``shard.tar#KEY``) go with their container: a whole tar shard is one job's."""
    key = container_of(path) or path
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") % count


def _open_lock(path: Path, create: bool = True) -> int | None:
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        if create:
            raise
        return None


class ShardLocks:
    """The locks a run of ``shard`` into the directory ``output`` holds (see the module's docstring).

    Within one process they nest, as :class:`clipcli.atomic.OutputLock` does: the command takes them
    before the model loads, the store takes them again, and the outermost holder releases them.
    """

    _held: dict[Path, list[int]] = {}  # noqa: RUF012 (one registry per process) - shard lock -> [fds..., holders]

    def __init__(self, output: Path, shard: Shard) -> None:
        self.output = output
        self.shard = shard
        folder = real_path(output)
        self.key = folder / f".clipcli.store.shard-{shard.index}-of-{shard.count}.lock"
        self.held = False
        if self.key in self._held:
            self._held[self.key][-1] += 1
            self.held = True
            return
        try:
            if output.exists() and not output.is_dir():
                raise OutputError(f"{output}: exists and is not a directory")
            output.mkdir(parents=True, exist_ok=True)
            self._held[self.key] = [*self._acquire(folder), 1]
            self.held = True
        except OSError as e:
            raise OutputError(f"{output}: cannot write ({describe_os_error(e)})") from e

    def _acquire(self, folder: Path) -> list[int]:
        import fcntl

        fds: list[int] = []
        try:
            shared = _open_lock(folder / SHARDS_LOCK)
            assert shared is not None
            fds.append(shared)
            mine = _open_lock(self.key)
            assert mine is not None
            fds.append(mine)
            try:
                fcntl.flock(shared, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(
                    f"{self.output}: an unsharded clipcli run is writing this output; wait for it to finish"
                ) from None
            try:
                fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(
                    f"{self.output}: another clipcli run of shard {self.shard} is writing this output; "
                    "wait for it to finish"
                ) from None
            _refuse_unsharded_holder(folder, self.output)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = self._held[self.key]
        entry[-1] -= 1
        if entry[-1]:
            return
        del self._held[self.key]
        for fd in entry[:-1]:
            os.close(fd)

    def __enter__(self) -> ShardLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _refuse_unsharded_holder(folder: Path, output: Path) -> None:
    """An unsharded run takes ``.clipcli.lock`` before it looks for shard runs; one that got there first
    is seen here (the lock file of a run that was killed is unlocked, and passes)."""
    import fcntl

    fd = _open_lock(folder / LOCK_NAME, create=False)
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"{output}: an unsharded clipcli run is writing this output; wait for it to finish") from None
    finally:
        os.close(fd)


def refuse_shard_runs(folder: Path, output: Path) -> int | None:
    """For an unsharded run (already holding ``.clipcli.lock``): refuse while shard runs write into
    ``folder``; returns the descriptor to hold (closed by :func:`release_fd`), None if never sharded."""
    import fcntl

    fd = _open_lock(folder / SHARDS_LOCK, create=False)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{output}: shard runs (--shard) are writing this output; wait for them to finish") from None
    except OSError as e:
        os.close(fd)
        if e.errno == errno.ENOLCK:
            return None
        raise
    return fd


def release_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


@contextlib.contextmanager
def compaction(folder: Path, shard: Shard | None) -> Iterator[None]:
    """Held while a shard reads or rewrites parts; waits for another shard doing the same. An unsharded
    run holds the directory alone, and needs no such lock."""
    if shard is None:
        yield
        return
    import fcntl

    fd = _open_lock(real_path(folder) / COMPACT_LOCK)
    assert fd is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
