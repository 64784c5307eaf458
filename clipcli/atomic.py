"""Files that change all at once or not at all, and outputs that one run at a time may write.

Every file clipcli writes goes to a temporary sibling (``.NAME.PID.tmp``) and is renamed onto its name
once complete, so a reader (or a run killed half-way) never sees half a file and a failed write leaves
the previous file as it was. A file that another program puts at the name, or changes there, while the
run writes is left as it is: the run's file is set aside beside it (:meth:`AtomicFile.commit`).
An output that a run writes is held under an advisory lock for the whole
run, so a second run into the same place refuses at once instead of silently replacing the first
run's rows; the lock also lets the next run remove temporaries that a killed run left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, ClassVar

from clipcli.errors import OutputError

LOCK_NAME = ".clipcli.lock"  # inside a directory output


def is_stream(path: Path) -> bool:
    """Whether ``path`` is a FIFO, a device or a pipe (``-o /dev/stdout``, ``-o >(gzip > x)``): written
    in place as a stream, since renaming a file onto it would replace it rather than write to it."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def real_path(path: Path) -> Path:
    """``path`` with symbolic links resolved: the file a link names is the one written (and locked)."""
    return Path(os.path.realpath(path))


def temporary_sibling(path: Path, suffix: str = "tmp") -> Path:
    """Where ``path`` is written before it is renamed: same folder, so the rename is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.{suffix}")


def remove_temporaries(path: Path, suffix: str = "tmp") -> None:
    """Remove temporaries of ``path`` left by other runs; call only while holding its lock."""
    with contextlib.suppress(OSError):
        for tmp in path.parent.glob(f".{_glob_escape(path.name)}.*.{suffix}"):
            pid = tmp.name[len(path.name) + 2 : -len(suffix) - 1]
            if pid.isdigit() and int(pid) != os.getpid():
                tmp.unlink(missing_ok=True)


def _glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def describe_os_error(e: OSError, path: Path | None = None) -> str:
    """The reason for a failed write, in words. Some writers (numpy's) report a short write without an
    errno; when the filesystem of ``path`` is then full, that is the reason given."""
    if e.errno == errno.ENOSPC or (e.errno is None and path is not None and _is_full(path)):
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e)


def _is_full(path: Path) -> bool:
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def replace_file(tmp: Path, path: Path) -> None:
    """Put a complete temporary file in place: flushed to disk first, so that after a power cut the
    name holds the old file or the new one, never a truncated one. Raises OSError."""
    flush_to_disk(tmp)
    os.replace(tmp, path)


def flush_to_disk(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """What tells a file from its replacement or its rewrite: device, inode, size, modification time
    (None where nothing is there)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # nothing there, or nothing that can be reached: the write says which
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_CHECKED: dict[Path, tuple[int, int, int, int] | None] = {}  # real path -> what was there when checked


def note_checked(path: Path) -> None:
    """Remember what is at ``path`` now, as a run checks an output before any work (whether clipcli wrote
    it: :mod:`clipcli.store.ownership`): the :class:`AtomicFile` that writes ``path`` later in the run
    replaces only that (nothing, or this very file unchanged), however long the run."""
    real = real_path(path)
    _CHECKED[real] = file_identity(real)


def checked_identity(path: Path) -> tuple[int, int, int, int] | None:
    """What :func:`note_checked` saw at ``path`` (what is there now, where it was not checked)."""
    real = real_path(path)
    return _CHECKED[real] if real in _CHECKED else file_identity(real)


def place_new(tmp: Path, path: Path) -> bool:
    """Give the complete file ``tmp`` the name ``path`` only if nothing has that name (a hard link, which
    never replaces, then ``tmp`` removed); False, ``tmp`` kept, where something has. On a file system
    without hard links, a check then a rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if os.path.lexists(path):
            return False
        os.rename(tmp, path)
        return True
    os.unlink(tmp)
    return True


class AtomicFile:
    """A file written under a temporary name; :meth:`commit` puts it in place, :meth:`discard` drops it."""

    def __init__(self, path: Path, mode: str = "wb", **open_args: Any) -> None:
        self.named = path  # as the user wrote it, for messages
        self.path = real_path(path)
        self.tmp = temporary_sibling(self.path)
        # what the run may replace: what its check saw (note_checked), else what is there now
        self.found = _CHECKED.pop(self.path) if self.path in _CHECKED else file_identity(self.path)
        if is_stream(self.path):  # renaming a file onto a FIFO or a device would replace it
            raise OutputError(f"{path}: is a FIFO or a device; this output is a file, written whole and renamed")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            self.file: IO[Any] = open(self.tmp, mode, **open_args)  # noqa: SIM115 (closed by commit/discard)
        except OSError as e:
            raise OutputError(f"{path}: cannot write ({describe_os_error(e)})") from e

    def commit(self) -> None:
        """Flush to disk and rename onto the final name; on failure the previous file stays.

        Only what was at the name when the run began is replaced (that very file unchanged), or nothing
        (the name free, whatever it held then): a file another program put there, or rewrote, meanwhile
        is left as it is, and this run's file is set aside beside it as ``STEM.PID.new.SUFFIX``, with an
        error that says so (no row is lost)."""
        try:
            self.file.close()
            flush_to_disk(self.tmp)
            now = file_identity(self.path)
            if now is None and place_new(self.tmp, self.path):
                return
            if now is not None and now == self.found:
                os.replace(self.tmp, self.path)
                return
            aside = self.set_aside()
        except OSError as e:
            self.discard()
            raise OutputError(
                f"{self.named}: cannot write ({describe_os_error(e)}); any previous file is left as it was"
            ) from e
        raise self.moved(aside)

    def replaceable(self) -> bool:
        """Whether :meth:`commit` would put this run's file at the name: the name is free, or still holds
        the very file it held when the run began."""
        now = file_identity(self.path)
        return now is None or now == self.found

    def moved(self, aside: Path) -> OutputError:
        what = "appeared" if self.found is None else "changed"
        return OutputError(
            f"{self.named}: {what} while this run wrote it, so it is left as it is; this run's output is in {aside}"
        )

    def set_aside(self, name: Path | None = None) -> Path:
        """Close this run's file and keep it beside the output: as ``name`` when that is free, else as the
        first free ``STEM.PID[.N].new.SUFFIX``. Raises OSError."""
        self.file.close()
        flush_to_disk(self.tmp)
        if name is not None and place_new(self.tmp, name):
            return name
        stem, suffix = (self.path.stem, self.path.suffix) if self.path.stem else (self.path.name, "")
        for n in range(1000):
            aside = self.path.with_name(f"{stem}.{os.getpid()}{f'.{n}' if n else ''}.new{suffix}")
            if place_new(self.tmp, aside):
                return aside
        raise OSError(errno.EEXIST, "no free name to set this run's output aside")

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", **open_args: Any) -> Iterator[IO[Any]]:
    """Write ``path`` whole or not at all: any error inside the block leaves the previous file. The file
    is locked meanwhile, and temporaries of runs killed while writing it are removed. A FIFO or a device
    (``--report /dev/stdout``, ``--html >(gzip > x)``) is written in place, as a stream."""
    if is_stream(path):
        try:
            with open(path, mode, **open_args) as stream:
                yield stream
        except OSError as e:
            raise OutputError(f"{path}: cannot write ({describe_os_error(e)})") from e
        return
    with OutputLock(path, is_dir=False):
        remove_temporaries(real_path(path))
        out = AtomicFile(path, mode, **open_args)
        try:
            yield out.file
        except OSError as e:
            out.discard()
            raise OutputError(
                f"{path}: cannot write ({describe_os_error(e)}); any previous file is left as it was"
            ) from e
        except BaseException:
            out.discard()
            raise
        out.commit()


def lock_path(output: Path, is_dir: bool) -> Path:
    return output / LOCK_NAME if is_dir else output.with_name(f".{output.name}.lock")


class OutputLock:
    """An exclusive advisory lock (``flock``) on an output, held for a whole run.

    The lock file holds the holder's pid for the message a second run prints. It is removed on
    release; a run that finds the file it locked already unlinked (released by the holder between its
    open and its lock) starts over, so two runs can never both hold the lock. Within one process the
    lock nests: a command may take it before loading a model (so that a second run is refused at once)
    and the code that writes the output takes it again; it is released when the outermost holder lets go.
    """

    _held: ClassVar[dict[Path, list[int]]] = {}  # lock file -> [fd, holders] in this process

    def __init__(self, output: Path, is_dir: bool) -> None:
        self.output = output
        self.path = lock_path(real_path(output), is_dir)
        self.created_dir = False
        self.held = False
        if self.path in self._held:
            self._held[self.path][1] += 1
            self.held = True
            return
        try:
            if is_dir:
                if output.exists() and not output.is_dir():
                    raise OutputError(f"{output}: exists and is not a directory")
                self.created_dir = not output.exists()
                output.mkdir(parents=True, exist_ok=True)
            else:
                output.parent.mkdir(parents=True, exist_ok=True)
            self._held[self.path] = [self._acquire(), 1]
            self.held = True
        except OSError as e:
            raise OutputError(f"{output}: cannot write ({describe_os_error(e)})") from e

    def _acquire(self) -> int:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(
                    f"{self.output}: another clipcli run (pid {holder}) is writing this output; "
                    "wait for it to finish or choose another output"
                ) from None
            except OSError:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)  # the holder released and removed it between our open and our lock

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = self._held[self.path]
        entry[1] -= 1
        if entry[1]:
            return
        del self._held[self.path]
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(entry[0])
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.output.rmdir()  # a folder this run made and left empty (it failed before any row)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then act as they would have.

    Python runs a signal's handler inside a file's write (after a partial write, or in a write through
    Python code), so the exception it raises can cut a write in two: ``torch.save`` turns it into an
    internal error, pyarrow's Parquet writer is left without its footer. Inside this block a checkpoint,
    or a batch of rows, is written whole; then the run stops with the usual message and exit. Only the
    main thread runs signal handlers: elsewhere this holds nothing back.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in stops}
    for s in stops:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])
