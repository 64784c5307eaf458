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


def thumbnail_jpeg(
    file: Path, size: int = THUMB_SIZE, max_pixels: int | None = DEFAULT_MAX_PIXELS, member: str | None = None
) -> bytes:
    """``file`` as a JPEG whose longer side is at most ``size`` pixels (never enlarged), EXIF-rotated;
    with ``member``, that member of the container ``file`` (a video's frame ``t=12.000``, or the first
    frame of a moment ``t=4.000,7.000``; a WebDataset sample's key).

    Raises OSError or ValueError (the reason from :func:`clipcli.images.decode.describe_error`) for a
    file that is not a readable image, or one of more than ``max_pixels`` pixels.
    """
    from PIL import Image

    from clipcli.images.containers import decode_member
    from clipcli.images.decode import decode
    from clipcli.images.refs import ImageRef

    if size < 1:
        raise ValueError(f"thumbnail size must be at least 1 pixel, not {size}")
    if member is None:
        image, _ = decode(file, draft_size=size, max_pixels=max_pixels)
    else:
        if member.startswith("t=") and "," in member:  # a moment: its first frame
            member = member.split(",", 1)[0]
        image = decode_member(ImageRef(f"{file}#{member}", file, member), size, max_pixels).image
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()
