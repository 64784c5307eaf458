"""Finding images (files, folders, globs, stdin), decoding them robustly, and batching them.

Bad files never stop a run: decoding failures travel through the batches as :class:`Skipped` records
so the caller can report them by path and carry on.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import stat
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from PIL import Image, ImageOps

from clipcli.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import torch

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_GLOB_CHARS = re.compile(r"[*?\[]")
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 mean the picture is shown rotated by 90 degrees

# A 108 MP phone photo is ordinary, so Pillow's 89.5 Mpx bomb limit is too low; the limit is a guard
# against files that would need gigabytes to decode, and one that the user can raise.
DEFAULT_MAX_PIXELS = 250_000_000
# clipcli checks sizes itself in decode(), against a limit the caller chooses; Pillow's own global check
# would refuse (or warn about) big photos first, with a reason that names no way round it.
Image.MAX_IMAGE_PIXELS = None


class NotARegularFile(OSError):
    """A FIFO, socket or device: opening one can block forever (a FIFO with no writer) or act on hardware."""


class ImageTooLarge(ValueError):
    """More pixels than the caller's limit; raised before any pixel is decoded."""


@dataclass(frozen=True, slots=True)  # one per input: slots keep a million of them small
class ImageRef:
    """One input image: ``path`` as the user wrote it (or folder + relative path), ``file`` to open."""

    path: str
    file: Path


@dataclass(frozen=True, slots=True)
class Skipped:
    path: str
    reason: str


def natural_key(text: str) -> list[Any]:
    """Sort "img9" before "img10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _directory_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk_once(
    top: str, hidden: bool = True, visited: set[tuple[int, int] | None] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) for ``top`` and every folder under it, following directory symlinks.

    Each real directory is entered once: a link back up the tree (``self -> .``, ``sub/up -> ..``)
    would otherwise be walked again at every level until the path is too long, and two such links
    make that exponential. Of two paths to one directory, the first one walked is kept; ``visited``
    carries that memory across walks (``A/ Alink/`` lists A's images once).
    """
    visited = set() if visited is None else visited
    if _directory_id(top) in visited:
        return
    visited.add(_directory_id(top))
    for root, dirs, files in os.walk(top, followlinks=True):
        names = sorted((name for name in dirs if hidden or not name.startswith(".")), key=natural_key)
        unvisited = set()
        # A directory keeps its own name over a link to it from the same folder (a stable sort).
        for name in sorted(names, key=lambda name: os.path.islink(os.path.join(root, name))):
            ident = _directory_id(os.path.join(root, name))
            if ident is not None and ident not in visited:
                visited.add(ident)
                unvisited.add(name)
        dirs[:] = [name for name in names if name in unvisited]
        yield root, files


def walk_folder(folder: str, visited: set[tuple[int, int] | None] | None = None) -> list[ImageRef]:
    """Every image under ``folder`` (natural order), each real directory once; see :func:`_walk_once`."""
    found = []
    for root, files in _walk_once(folder, visited=visited):
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                full = os.path.join(root, name)
                found.append(ImageRef(full, Path(full)))
    found.sort(key=lambda ref: natural_key(os.path.relpath(ref.path, folder)))
    return found


def _glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, but a ``**`` enters each real directory once.

    glob's own ``**`` follows directory symlinks with no memory of where it has been, so one link back
    up the tree lists every file 40 times over and two never finish (see :func:`_walk_once`).
    """
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)
    at = parts.index("**")
    head, tail = os.sep.join(parts[:at]) or (os.sep if at else ""), parts[at + 1 :]
    bases = glob.glob(head) if _GLOB_CHARS.search(head) else [head]
    found: list[str] = []
    for base in bases:
        if base and not os.path.isdir(base):
            continue
        for root, files in _walk_once(base or os.curdir, hidden=False):
            # For a pattern that starts with **, glob writes "sub/x.jpg", not "./sub/x.jpg".
            folder = root if base else os.path.relpath(root)
            prefix = "" if folder == os.curdir and not base else folder
            if tail:
                found.extend(_glob(os.path.join(glob.escape(prefix), *tail)))
            else:  # a trailing ** matches every file below (and folders, which are no images)
                found.extend(os.path.join(prefix, name) for name in files if not name.startswith("."))
    return found


def _stdin_paths(text: str) -> list[str]:
    """One path per line, exactly as written but for the line ending; or, when the text holds NUL
    bytes (``find -print0``), one path per NUL-terminated record, newlines and all.

    Spaces, and the other characters ``str.splitlines`` breaks at (``\\x0b``, ``\\x1c``, ``\\u2028``...),
    are legal in file names, so only ``\\n`` (or ``\\r\\n``) ends a line.
    """
    if "\0" in text:
        return [path for path in text.split("\0") if path]
    lines = (line[:-1] if line.endswith("\r") else line for line in text.split("\n"))
    return [line for line in lines if line]


def _drop_repeats(refs: list[ImageRef]) -> list[ImageRef]:
    """Each file once, named in normal form: ``x.jpg ./x.jpg folder/`` classifies x.jpg once, as
    ``x.jpg``, so that the names stored by one run match those of the next however the file was named.
    The file itself is opened by the path given."""
    cwd = os.getcwd()  # once, where os.path.abspath would ask again for every path
    real_dirs: dict[str, str] = {}  # a folder's real path, asked once per folder, not once per file
    seen: set[str] = set()
    unique = []
    for ref in refs:
        name = os.path.normpath(ref.path)
        folder, base = os.path.split(os.path.join(cwd, name))
        if folder not in real_dirs:
            real_dirs[folder] = os.path.realpath(folder)
        key = os.path.join(real_dirs[folder], base)  # x.jpg and alias/x.jpg, alias -> ., are one file
        if key not in seen:
            seen.add(key)
            unique.append(ref if name == ref.path else ImageRef(name, ref.file))
    return unique


def nothing_found(arguments: Sequence[str], missing: Sequence[Skipped]) -> InputError:
    """The error for a run with no image to work on, with the reasons its arguments gave none."""
    reasons = "; ".join(f"{m.path}: {m.reason}" for m in missing[:3]) + ("; ..." if len(missing) > 3 else "")
    return InputError(f"no images found in {', '.join(arguments)}" + (f" ({reasons})" if reasons else ""))


def discover(arguments: Sequence[str], stdin: IO[str] | None = None) -> tuple[list[ImageRef], list[Skipped]]:
    """Expand files, folders, globs and ``-`` (paths on stdin) into images, in input order.

    Arguments that name nothing are returned as skipped, not raised: one typo must not cost a batch.
    A file named twice (directly, by a folder or a glob) is listed once, where it was first named.
    """
    refs: list[ImageRef] = []
    missing: list[Skipped] = []
    walked: set[tuple[int, int] | None] = set()  # real directories, across folder arguments
    for arg in arguments:
        if arg == "-":
            # Lines from `find` name files one by one: a directory here is a mistake, not a folder to walk.
            refs.extend(ImageRef(line, Path(line)) for line in _stdin_paths(stdin.read() if stdin else ""))
        elif os.path.isdir(arg):
            refs.extend(walk_folder(arg, walked))
        elif os.path.lexists(arg):
            refs.append(ImageRef(arg, Path(arg)))
        elif _GLOB_CHARS.search(arg):
            matches = sorted(_glob(arg), key=natural_key)
            files = [m for m in matches if not os.path.isdir(m)]
            if not files:
                missing.append(Skipped(arg, "no file matches this pattern"))
            refs.extend(ImageRef(m, Path(m)) for m in files)
        else:
            missing.append(Skipped(arg, "no such file or directory"))
    return _drop_repeats(refs), missing


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way a viewer would show it."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit and float greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I") and arr.max() > 255 else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        # Transparent pixels hold arbitrary colour (often black); show them on white, as viewers do.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(file: Path, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as RGB: first frame, EXIF orientation applied (see :func:`decode`)."""
    return decode(file, draft_size, max_pixels)[0]


def decode(
    file: Path, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, tuple[int, int]]:
    """Open an image as RGB, with its full-resolution (width, height) as shown upright.

    ``draft_size`` lets JPEGs decode at a reduced DCT scale that still covers that many pixels on each
    side, several times faster for large photos with no visible change after resizing to the model.
    An image of more than ``max_pixels`` pixels (None: no limit) is refused from its header alone.
    Raises OSError or ValueError (with PIL's reason) for anything unreadable.
    """
    image, size, _ = decode_file(file, draft_size, max_pixels)
    return image, size


FileStat = tuple[int, float]  # (bytes, mtime) of a file as it was read


def decode_file(
    file: Path, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, tuple[int, int], FileStat]:
    """:func:`decode`, and the size and mtime of the file that was decoded, taken from the open file
    (``fstat``) once its header is read and before its pixels are: a file replaced while it is decoded
    then shows a stat that no longer matches its path, and the embedding of the old picture is never
    stored as the new one's."""
    _require_regular_file(file)
    with Image.open(file) as im:
        st = _open_file_stat(im, file)
        width, height = im.size
        _require_at_most(width * height, max_pixels)
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        orientation = im.getexif().get(_ORIENTATION, 1)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        im.load()
        # exif_transpose copies even an upright image; most photos are upright.
        oriented = ImageOps.exif_transpose(im) if orientation != 1 else im
        return _to_rgb(oriented), (width, height), (st.st_size, st.st_mtime)


def _open_file_stat(im: Image.Image, file: Path) -> os.stat_result:
    """The stat of the file Pillow holds open for ``im`` (of the path, for a plugin that holds none)."""
    held: Any = getattr(im, "fp", None)
    try:
        return os.fstat(held.fileno())
    except (AttributeError, OSError, ValueError):
        return os.stat(file)


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _require_regular_file(file: Path) -> None:
    """Refuse anything but a file (or a link to one) before opening it.

    Opening a FIFO blocks until something writes to it, in a call that Ctrl-C cannot interrupt, and
    opening a device can act on the hardware; ``stat`` does neither.
    """
    mode = os.stat(file).st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError("is a directory")
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "a special file")
    raise NotARegularFile(f"not a regular file ({kind})")


def _require_at_most(pixels: int, max_pixels: int | None) -> None:
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLarge(
            f"image too large ({_megapixels(pixels)} Mpx > limit {_megapixels(max_pixels)} Mpx; raise --max-megapixels)"
        )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.4g}"


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, NotARegularFile | ImageTooLarge):
        return str(exc)
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "image too large (possible decompression bomb)"
    if isinstance(exc, FileNotFoundError):
        return "no such file (or a broken link)"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (or an unsupported format)"
    message = str(exc).split("\n")[0]
    if "truncated" in message:
        return "truncated image"
    return message or type(exc).__name__


# OpenAI's normalisation constants (clip/clip.py), per RGB channel.
@dataclass(frozen=True)
class ImageOptions:
    """How images become model input, as one value (``--batch-size``, ``--workers``, ``--exact``,
    ``--max-megapixels`` as a pixel limit, ``--decode``): every command that reads images takes it."""

    batch_size: int = 32
    workers: int = 0
    exact: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode: str = "auto"


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSpec:
    """The input a model was trained on: a ``size`` x ``size`` square made by ``resize``, scaled to 0..1
    and normalised per channel by ``mean`` and ``std``.

    ``shortest``: the shorter side to ``size`` then a centre crop (OpenAI's CLIP, most open_clip and HF
    CLIP models); ``squash``: the whole picture to ``size`` x ``size``, aspect ratio not kept (SigLIP).
    """

    size: int
    resize: Literal["shortest", "squash"] = "shortest"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    # How an odd number of spare pixels is split by the centre crop: torchvision rounds the offset
    # (OpenAI, open_clip); Hugging Face's image processors floor it.
    crop_offset: Literal["round", "floor"] = "round"


CLIP_IMAGE = ImageSpec(224)


def image_spec(geometry: int | ImageSpec) -> ImageSpec:
    """A bare size means OpenAI's preprocessing at that size."""
    return geometry if isinstance(geometry, ImageSpec) else ImageSpec(geometry)


_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resize_and_crop(image: Image.Image, geometry: int | ImageSpec) -> np.ndarray:
    """The model's resize (and centre crop) of ``image``, as a size x size x 3 uint8 array.

    For ``shortest``, equal to torchvision's ``Resize`` then ``CenterCrop`` as the ``clip`` package composes
    them, with the same output size and crop offsets, but one PIL resample of just the crop box: PIL's
    filter still reads the pixels around the box up to the image edge, so the result is the same up to
    rounding for less work, and torchvision (whose import pulls in torch's compiler stack) is not needed.
    """
    import numpy as np

    spec = image_spec(geometry)
    n_px, resample = spec.size, _RESAMPLING[spec.interpolation]
    if spec.resize == "squash":
        return np.asarray(image.resize((n_px, n_px), resample))
    w, h = image.size
    if w <= h:
        new_w, new_h = n_px, int(n_px * h / w)
    else:
        new_w, new_h = int(n_px * w / h), n_px
    offset = round if spec.crop_offset == "round" else int
    left, top = offset((new_w - n_px) / 2.0), offset((new_h - n_px) / 2.0)
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + n_px) * sx, (top + n_px) * sy)
    return np.asarray(image.resize((n_px, n_px), resample, box=box))


def normalize_pixels(images: np.ndarray, geometry: int | ImageSpec = CLIP_IMAGE) -> torch.Tensor:
    """uint8 N x H x W x 3 images -> the model's N x 3 x H x W float input (ToTensor then Normalize).

    One copy into channel-first float and one fused scale-and-shift: a third of the passes over the
    batch that dividing by 255, subtracting the mean and dividing by the std one at a time take.
    """
    import torch

    spec = image_spec(geometry)
    channels_last = torch.from_numpy(images).permute(0, 3, 1, 2)
    pixels = torch.empty(channels_last.shape, dtype=torch.float32).copy_(channels_last)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return pixels.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def preprocess(image: Image.Image, geometry: int | ImageSpec) -> torch.Tensor:
    """One RGB image -> its 3 x size x size model input, as the model's own preprocessing makes it."""
    import numpy as np

    return normalize_pixels(np.stack([resize_and_crop(image, geometry)]), geometry)[0]


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


class _ImageDataset:
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
        try:
            image, size, st = decode_file(self.refs[i].file, self.draft, self.max_pixels)
            return i, (resize_and_crop(image, self.spec), size, st)
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
    # (pixels, size, stat) from a file; (pixels, size) or a None stat from an array, which has none
    stats: list[FileStat | None] = [t[2] if len(t) > 2 else None for _, t in good]
    known = [st for st in stats if st is not None]
    return Batch([i for i, _ in good], images, sizes, bad, known if len(known) == len(stats) else None)


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

    With ``workers`` 0, threads in this process decode (see :func:`_decoded_batches` for ``overlap``);
    otherwise that many worker processes do, ahead of the caller. Images of more than ``max_pixels``
    pixels (None: no limit) are skipped unread.
    """
    return _batches(_ImageDataset(refs, geometry, exact, max_pixels), batch_size, workers, overlap)


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
        return _decoded_batches(dataset, batch_size, overlap)
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


def _decoded_batches(
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
