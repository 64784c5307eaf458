"""Thumbnails: a picture as a small JPEG, upright (EXIF orientation applied), decoded with the same
guards as every image (regular files only, the pixel limit) and at a reduced JPEG scale where possible.

Used by ``serve`` (cached on disk there) and by ``rank --html`` (inlined in the page).
"""

from __future__ import annotations

import io
from pathlib import Path

from clipcli.images.limits import DEFAULT_MAX_PIXELS

THUMB_SIZE = 256
JPEG_QUALITY = 82


def thumbnail_jpeg(file: Path, size: int = THUMB_SIZE, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bytes:
    """``file`` as a JPEG whose longer side is at most ``size`` pixels (never enlarged), EXIF-rotated.

    Raises OSError or ValueError (the reason from :func:`clipcli.images.decode.describe_error`) for a
    file that is not a readable image, or one of more than ``max_pixels`` pixels.
    """
    from PIL import Image

    from clipcli.images.decode import decode

    if size < 1:
        raise ValueError(f"thumbnail size must be at least 1 pixel, not {size}")
    image, _ = decode(file, draft_size=size, max_pixels=max_pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()
