"""Batching decoded images, in input order: threads in this process, or worker processes that never
outlive nor outshout the run (stop signals held while they fork, ignored in them, killed with their parent).

Decoding failures travel through the batches as ``(index, reason)`` pairs so the caller reports them by path.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from clipcli.images.containers import decode_member
from clipcli.images.decode import (
    DEFAULT_MAX_PIXELS,
    ImageSpec,
    decode_file,
    describe_error,
    image_spec,
    resize_and_crop,
)
from clipcli.images.refs import FileStat

if TYPE_CHECKING:
    import numpy as np

    from clipcli.images.refs import ImageRef


@dataclass
class Batch:
    """Decoded images, still uint8: a quarter of the bytes of model input to pass between processes,
    and no torch work in the decoding thread, whose own OpenMP team would compete with the model's.
    :func:`normalize_pixels` makes model input of ``images`` where it is consumed."""

    indices: list[int]
    images: np.ndarray | None  # N x H x W x 3 uint8, one per index
    sizes: list[tuple[int, int]]  # full-resolution (width, height) of each decoded image
    skipped: list[tuple[int, str]]
    stats: list[FileStat] | None = None  # (bytes, mtime) of each file as it was opened, from fstat
    meta: list[dict[str, Any]] | None = None  # each image's metadata columns (see clipcli.images.refs.Decoded)


class ImageDataset:
    def __init__(
        self,
        refs: Sequence[ImageRef],
        geometry: int | ImageSpec,
        exact: bool,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.refs = refs
        self.spec = image_spec(geometry)
        self.draft = None if exact else self.spec.size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        ref = self.refs[i]
        try:
            got = (
                decode_member(ref, self.draft, self.max_pixels)
                if ref.member is not None
                else decode_file(ref.file, self.draft, self.max_pixels)
            )
            return i, (resize_and_crop(got.image, self.spec), got.size, got.stat, got.meta)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return i, describe_error(e)
        except Exception as e:
            return i, f"cannot decode ({type(e).__name__}: {e})"

    def decode_order(self, indices: range) -> Sequence[int]:
        """Largest files first (file size stands in for decoding time)."""

        def size(i: int) -> int:
            try:
                return os.stat(self.refs[i].file).st_size
            except OSError:
                return 0  # reported when decoded

        return sorted(indices, key=size, reverse=True)


def _collate(items: list[tuple[int, Any]]) -> Batch:
    import numpy as np

    good = [(i, t) for i, t in items if not isinstance(t, str)]
    bad = [(i, t) for i, t in items if isinstance(t, str)]
    images = np.stack([t[0] for _, t in good]) if good else None
    sizes = [t[1] for _, t in good]
    # (pixels, size, stat, meta) from a file; (pixels, size) from an array, which has neither
    stats: list[FileStat | None] = [t[2] if len(t) > 2 else None for _, t in good]
    known = [st for st in stats if st is not None]
    meta = [t[3] for _, t in good] if all(len(t) > 3 for _, t in good) else None
    return Batch([i for i, _ in good], images, sizes, bad, known if len(known) == len(stats) else None, meta)


def iter_batches(
    refs: Sequence[ImageRef],
    geometry: int | ImageSpec,
    batch_size: int = 32,
    workers: int = 0,
    exact: bool = False,
    overlap: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[Batch]:
    """Decode and preprocess ``refs`` in input order, ``batch_size`` at a time.

    With ``workers`` 0, threads in this process decode (see :func:`decoded_batches` for ``overlap``);
    otherwise that many worker processes do, ahead of the caller. Images of more than ``max_pixels``
    pixels (None: no limit) are skipped unread.
    """
    return _batches(ImageDataset(refs, geometry, exact, max_pixels), batch_size, workers, overlap)


class _ArrayDataset:
    """In-memory uint8 images (N x H x W x 3), as torchvision's CIFAR datasets hold them."""

    def __init__(self, arrays: Any, geometry: int | ImageSpec) -> None:
        self.arrays = arrays
        self.spec = image_spec(geometry)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        image = Image.fromarray(self.arrays[i], "RGB")
        return i, (resize_and_crop(image, self.spec), image.size)

    def decode_order(self, indices: range) -> Sequence[int]:
        return indices


def iter_array_batches(
    arrays: Any, geometry: int | ImageSpec, batch_size: int = 32, overlap: bool = False
) -> Iterator[Batch]:
    return _batches(_ArrayDataset(arrays, geometry), batch_size, 0, overlap)


def _batches(dataset: Any, batch_size: int, workers: int, overlap: bool) -> Iterator[Batch]:
    if not workers:
        return decoded_batches(dataset, batch_size, overlap)
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate, worker_init_fn=_start_worker
    )
    with _stop_signals_held():
        return iter(loader)


_STOP_SIGNALS = ("SIGINT", "SIGTERM")  # Ctrl-C, and a scheduler's or ``kill``'s request to stop


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM from this thread while it forks the decoding processes.

    A forked process starts with this process's handlers, under which either signal prints a traceback
    in it, until :func:`_start_worker` ignores them. Forked with the signals blocked, a worker keeps any
    that reach it pending until then, when they are discarded. Here they are acted on when the block ends.
    """
    import signal

    stop = {getattr(signal, name) for name in _STOP_SIGNALS}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _start_worker(worker_id: int) -> None:
    """Set up a decoding process so that it never outlives, nor outshouts, the run it serves.

    Ctrl-C and SIGTERM are ignored here. They reach the main process too (a terminal or a scheduler
    signals the whole process group), which does the stopping: it writes what it has, says so in one
    line, and ends its workers through torch's shutdown, where they leave in silence. A worker acting on
    the signal itself does worse. Raising KeyboardInterrupt (as this once did) surfaced wherever the worker
    was: in multiprocessing's exit handlers, joining a queue feeder that waited for a main process no longer
    reading, it printed a traceback per worker and held up the run's exit by torch's 5 s join timeout each.
    Exiting at once with status 0 leaves a batch half-written in the pipe when the worker alone is
    signalled (``kill PID``), and the main process waits for the rest of it for ever; with any other
    status, torch reports a worker crash in place of the run's own one-line report. Torch's own SIGTERM,
    to a worker that has not left 5 s after the shutdown, is ignored too: the worker dies with the run.

    And the kernel kills the worker when the main process dies (``kill -9``, or the immediate exit after
    an interruption), so no orphan keeps decoding, blocks on a pipe, or holds the output's lock file open.
    """
    import signal
    import sys

    stop = [getattr(signal, name) for name in _STOP_SIGNALS]
    for signum in stop:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)  # held since the fork (see _stop_signals_held)
    if sys.platform == "linux":
        import ctypes
        import multiprocessing

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:  # it died before the line above
            os._exit(0)


PREFETCH_BATCHES = 2  # decoded ahead of the caller with ``overlap``: enough to ride out one slow batch


def decode_threads() -> int:
    """One decoding thread per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decoded_batches(
    dataset: Any, batch_size: int, overlap: bool, collate: Callable[[list[tuple[int, Any]]], Any] = _collate
) -> Generator[Any, None, None]:
    """Batches decoded by a pool of threads (PIL releases the GIL while it decodes and resizes).

    Without ``overlap`` the caller and the pool take turns: each batch is decoded on every core
    once the caller asks for it, then the caller has the cores to itself. When the caller's model
    runs on the same CPU cores this beats decoding alongside it, where a decoding thread that holds a
    core stalls torch's threads at every barrier of every operator (measured in the README's benchmark
    section). With ``overlap`` (the model runs on a GPU), the next
    :data:`PREFETCH_BATCHES` batches are decoded while the caller works. Within a batch the largest
    files start first, so no core waits at the end for one big photo.
    ``collate`` makes each batch of the (index, item) pairs, in input order (a :class:`Batch` by default).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    n = len(dataset)
    starts = iter(range(0, n, batch_size))
    queued: deque[list[Future[tuple[int, Any]]]] = deque()
    pool = ThreadPoolExecutor(decode_threads(), thread_name_prefix="clipcli-decode")

    def submit_next() -> None:
        start = next(starts, None)
        if start is not None:
            order = dataset.decode_order(range(start, min(n, start + batch_size)))
            queued.append([pool.submit(dataset.__getitem__, i) for i in order])

    try:
        submit_next()
        while queued:
            items = sorted((f.result() for f in queued.popleft()), key=lambda item: item[0])
            for _ in range(PREFETCH_BATCHES - len(queued) if overlap else 0):
                submit_next()
            yield collate(items)
            if not queued:
                submit_next()
    finally:
        # On an error or an early close: drop the batches not started, finish the images in hand.
        pool.shutdown(wait=True, cancel_futures=True)
