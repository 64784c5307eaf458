"""Reading a JPEG for the device decoder without decoding a pixel: the whole file into a buffer, and its
header (size, EXIF orientation, coding), from which :func:`device_decodable` says whether the device may
decode it (:mod:`clipcli.images.gpu`) or the CPU path must."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

HEADER_BYTES = 1 << 17  # EXIF sits in the first 64 KiB segment; SOF follows it

# Start-of-frame markers the device decodes: baseline and extended sequential, Huffman-coded (nvJPEG's
# hardware decoder takes them in batches). Progressive JPEGs (0xC2) go to the CPU: nvJPEG decodes them one
# by one with its Huffman stage on the host, under torchvision's decoder lock, which would stall the
# device stage for every one, while Pillow on the reader threads decodes them in parallel at a reduced
# DCT scale. Lossless, hierarchical and arithmetic-coded JPEGs are rare and left to the CPU too.
_DEVICE_SOF = frozenset({0xC0, 0xC1})
_ALL_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True)
class JpegHeader:
    sof: int  # the start-of-frame marker byte
    precision: int  # bits per sample
    width: int
    height: int
    components: int  # 1 grey, 3 YCbCr (or RGB), 4 CMYK/YCCK
    orientation: int  # EXIF orientation, 1 when absent
    adobe_transform: int | None  # APP14 Adobe colour transform; 0 with 3 components means RGB, not YCbCr
    xmp_orientation: bool  # an XMP tiff:Orientation, which Pillow honours when EXIF has none


def _u16(data: bytes | bytearray, at: int, order: Literal["little", "big"] = "big") -> int:
    return int.from_bytes(data[at : at + 2], order)


def exif_orientation(tiff: bytes | bytearray) -> int:
    """The orientation tag of IFD0 of an EXIF (TIFF) block; 1 when absent or unreadable."""
    order: Literal["little", "big"]
    if tiff[:2] == b"II":
        order = "little"
    elif tiff[:2] == b"MM":
        order = "big"
    else:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    for k in range(_u16(tiff, ifd, order)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if _u16(tiff, entry, order) == _ORIENTATION:
            return _u16(tiff, entry + 8, order)
    return 1


def jpeg_header(data: bytes | bytearray) -> JpegHeader | None:
    """What the device decoder needs to know of a JPEG, from its markers up to the frame header; None
    for anything that is not a well-formed JPEG start (the CPU path then says what is wrong)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, orientation, adobe, xmp = 2, None, None, False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = _u16(data, pos + 2)
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) < length - 2:
            return None
        if marker == 0xE1 and segment[:6] == b"Exif\0\0" and orientation is None:
            orientation = exif_orientation(segment[6:])
        elif marker == 0xE1 and b"tiff:Orientation" in segment:
            xmp = True
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        elif marker in _ALL_SOF:
            if len(segment) < 6:
                return None
            return JpegHeader(
                marker,
                segment[0],
                _u16(segment, 3),
                _u16(segment, 1),
                segment[5],
                orientation or 1,
                adobe,
                xmp and orientation is None,
            )
        pos += 2 + length
    return None


def _ends_complete(data: bytes | bytearray) -> bool:
    """Whether the file ends with the end-of-image marker (after any zero padding): a truncated JPEG is
    left to the CPU path, which reports it; a decoder on the device might fill it in grey instead."""
    end = len(data)
    while end > 2 and data[end - 1] == 0:
        end -= 1
    return data[end - 2 : end] == b"\xff\xd9"


def device_decodable(header: JpegHeader | None, data: bytes | bytearray, max_pixels: int | None) -> bool:
    """The per-file choice of decoder: True for the JPEGs the device decodes as the CPU would."""
    return (
        header is not None
        and header.sof in _DEVICE_SOF
        and header.precision == 8
        and header.components in (1, 3)
        and not (header.components == 3 and header.adobe_transform == 0)
        and not header.xmp_orientation
        and header.width > 0
        and header.height > 0
        and (max_pixels is None or header.width * header.height <= max_pixels)
        and _ends_complete(data)
    )


@dataclass
class Read:
    """One file as the readers leave it: JPEG bytes for the device, or the CPU path's crop or reason."""

    index: int
    data: bytearray | None = None  # for the device decoder
    orientation: int = 1
    size: tuple[int, int] = (0, 0)  # full-resolution (width, height), upright
    pixels: np.ndarray | None = None  # size x size x 3 uint8 crop, decoded on the CPU
    error: str | None = None  # why the file is skipped


def read_jpeg(path: os.PathLike[str] | str) -> bytearray | None:
    """The whole file, into a writable buffer that torch wraps without a copy; None, after two bytes,
    for a file that is no JPEG (the CPU path reads those itself)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = f.readinto(view[got : 2 if got < 2 else size])  # the magic number first
            if not n:
                break
            got += n
            if got == 2 and buf[:2] != b"\xff\xd8":
                return None
    return buf[:got] if got < size else buf
