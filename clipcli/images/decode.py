"""Decoding one image robustly, with its guards (regular files only, a pixel limit, readable reasons
for every failure), and turning it into model input: :class:`ImageSpec`, resize and crop, normalisation.

Bad files never stop a run: :func:`describe_error` gives the reason a batch records as skipped.
"""

from __future__ import annotations

import errno
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image, ImageOps

from clipcli.images.limits import DEFAULT_MAX_PIXELS
from clipcli.images.refs import ContainerOptions, Decoded, FileStat

if TYPE_CHECKING:
    import numpy as np
    import torch

_ORIENTATION = 0x0112  # EXIF tag; values 5-8 mean the picture is shown rotated by 90 degrees

# clipcli checks sizes itself in decode(), against a limit the caller chooses; Pillow's own global check
# would refuse (or warn about) big photos first, with a reason that names no way round it.
Image.MAX_IMAGE_PIXELS = None


class NotARegularFile(OSError):
    """A FIFO, socket or device: opening one can block forever (a FIFO with no writer) or act on hardware."""


class ImageTooLarge(ValueError):
    """More pixels than the caller's limit; raised before any pixel is decoded."""


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


# The formats of sources.IMAGE_EXTENSIONS, whatever a file's name says: Pillow tries no other reader. Among
# the others, EPS hands the file to Ghostscript to run as a PostScript program.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


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
    got = decode_file(file, draft_size, max_pixels)
    return got.image, got.size


def decode_file(file: Path, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Decoded:
    """:func:`decode`, with the size and mtime of the file that was decoded, taken from the open file
    (``fstat``) once its header is read and before its pixels are: a file replaced while it is decoded
    then shows a stat that no longer matches its path, and the embedding of the old picture is never
    stored as the new one's. The photo's metadata columns come from the same open file (see
    :func:`photo_metadata`): nothing is read twice."""
    require_regular_file(file)
    with Image.open(file, formats=FORMATS) as im:
        st = _open_file_stat(im, file)
        return decode_opened(im, (st.st_size, st.st_mtime), draft_size, max_pixels)


def decode_opened(
    im: Image.Image, st: FileStat, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Decoded:
    """An image Pillow has opened (from a file, or a container member's bytes), decoded with the guards
    of :func:`decode`; ``st`` is the (bytes, mtime) of the file it came from."""
    width, height = im.size
    _require_at_most(width * height, max_pixels)
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    exif = im.getexif()
    orientation = exif.get(_ORIENTATION, 1)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if draft_size and im.format == "JPEG":
        im.draft("RGB", (draft_size, draft_size))
    im.load()
    # exif_transpose copies even an upright image; most photos are upright.
    oriented = ImageOps.exif_transpose(im) if orientation != 1 else im
    meta = photo_metadata(exif, st[1])
    return Decoded(_to_rgb(oriented), (width, height), st, meta)


_DATETIME_ORIGINAL, _EXIF_IFD, _GPS_IFD, _MAKE, _MODEL = 0x9003, 0x8769, 0x8825, 0x010F, 0x0110


def photo_metadata(exif: Image.Exif, mtime: float) -> dict[str, Any]:
    """The columns people filter photos on: ``taken`` (EXIF DateTimeOriginal, else the file's mtime,
    as a naive local time, as cameras write it), ``camera_make``, ``camera_model``, and ``gps_lat`` /
    ``gps_lon`` in degrees (south and west negative) when the photo has them. A field that is missing
    or malformed is left out: metadata never costs a row."""
    import datetime

    meta: dict[str, Any] = {}
    try:
        stamp = str(exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL, "")).strip("\0 ")
        meta["taken"] = datetime.datetime.strptime(stamp[:19], "%Y:%m:%d %H:%M:%S")
    except (ValueError, TypeError, KeyError, OSError, SyntaxError):
        pass
    if "taken" not in meta:
        meta["taken"] = datetime.datetime.fromtimestamp(mtime).replace(microsecond=0)
    for tag, column in ((_MAKE, "camera_make"), (_MODEL, "camera_model")):
        value = exif.get(tag)
        if isinstance(value, str) and value.strip("\0 "):
            meta[column] = value.strip("\0 ")[:200]
    try:
        gps = exif.get_ifd(_GPS_IFD)
        for ref_tag, tag, column, negative in ((1, 2, "gps_lat", "S"), (3, 4, "gps_lon", "W")):
            if tag in gps:
                d, m, sec = (float(x) for x in gps[tag])
                degrees = d + m / 60 + sec / 3600
                if not math.isfinite(degrees) or degrees > 180:
                    continue
                meta[column] = -degrees if str(gps.get(ref_tag, "")).upper().startswith(negative) else degrees
    except (ValueError, TypeError, KeyError, OSError, SyntaxError, ZeroDivisionError):
        pass
    return meta


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


def require_regular_file(file: Path) -> None:
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
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "a loop of symbolic links"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (or an unsupported format)"
    message = str(exc).split("\n")[0]
    if "truncated" in message:
        return "truncated image"
    return message or type(exc).__name__


@dataclass(frozen=True)
class ImageOptions:
    """How images become model input, as one value (``--batch-size``, ``--workers``, ``--exact``,
    ``--max-megapixels`` as a pixel limit, ``--decode``, and ``--every``/``--frames`` as how videos and
    other containers open into images): every command that reads images takes it."""

    batch_size: int = 32
    workers: int = 0
    exact: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode: str = "auto"
    containers: ContainerOptions = field(default_factory=ContainerOptions)


# OpenAI's normalisation constants (clip/clip.py), per RGB channel.
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
