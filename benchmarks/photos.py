"""Photo-like JPEGs at real camera sizes (VGA to 12 MP), for decoding and embedding benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZES = [(640, 480), (1280, 960), (1920, 1080), (2048, 1536), (3264, 2448), (4000, 3000)]


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Smooth colour fields with texture and noise, so JPEG sizes and decode costs resemble photos."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"photo{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        w, h = SIZES[i % len(SIZES)]
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        grain = Image.fromarray(rng.integers(0, 40, (h // 4, w // 4, 3), dtype=np.uint8), "RGB").resize((w, h))
        image = Image.blend(image, grain, 0.25).filter(ImageFilter.DETAIL)
        image.save(path, quality=88)
    return paths
