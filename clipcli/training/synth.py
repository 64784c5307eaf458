"""Captioned synthetic images: 8 shapes x 8 colours on varied backgrounds, for training and testing.

About 20% of colour+shape combinations are held out (never drawn for the ``seen`` split), so a model
trained on the rest can be tested on compositions it never saw.
"""

from __future__ import annotations

import csv
import math
import os
import random
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "hexagon", "arrow")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (35, 165, 55),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 35),
    "purple": (130, 45, 180),
    "orange": (250, 135, 20),
    "pink": (250, 135, 195),
    "cyan": (35, 215, 225),
}
# 13 of the 64 combinations (~20%), picked by hand: each colour misses at most two shapes, each shape
# at most two colours, similar colours (red/orange/pink, blue/purple/cyan, green/yellow) never miss the
# same shape, and no colour misses two shapes that look alike (circle/hexagon, square/heart).
HELD_OUT = frozenset(
    [
        ("red", "circle"),
        ("red", "star"),
        ("orange", "heart"),
        ("orange", "hexagon"),
        ("yellow", "triangle"),
        ("yellow", "circle"),
        ("green", "cross"),
        ("green", "hexagon"),
        ("cyan", "heart"),
        ("blue", "square"),
        ("blue", "triangle"),
        ("purple", "star"),
        ("pink", "arrow"),
    ]
)
CAPTIONS = (
    "a photo of a {c} {s}.",
    "a {c} {s}.",
    "a {c} {s}",
    "{c} {s}",
    "a picture of a {c} {s}.",
    "an image of a {c} {s}.",
    "a drawing of a {c} {s}.",
    "a {size} {c} {s}.",
    "the {s} is {c}.",
    "a {c} {s} shape.",
)
Split = Literal["seen", "held-out", "all"]
Background = Literal["varied", "saturated", "grey"]


def combinations(split: Split) -> list[tuple[str, str]]:
    every = [(c, s) for s in SHAPES for c in COLOURS]
    if split == "all":
        return every
    return [p for p in every if (p in HELD_OUT) == (split == "held-out")]


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Unit outline (radius about 1) of ``shape``, centred on the origin."""
    if shape == "circle":
        return [(math.cos(t), math.sin(t)) for t in (2 * math.pi * i / 48 for i in range(48))]
    if shape in ("square", "triangle", "hexagon"):
        n = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        return [(math.cos(t), math.sin(t)) for t in (2 * math.pi * i / n + math.pi / n for i in range(n))]
    if shape == "star":
        return [
            (r * math.cos(t), r * math.sin(t))
            for i in range(10)
            for r, t in [(1.0 if i % 2 == 0 else 0.42, math.pi * i / 5 - math.pi / 2)]
        ]
    if shape == "heart":
        points = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((x / 17, -y / 17))
        return points
    if shape == "cross":
        a, b = 0.32, 1.0
        return [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    if shape == "arrow":
        return [(-1.0, -0.22), (0.15, -0.22), (0.15, -0.6), (1.0, 0.0), (0.15, 0.6), (0.15, 0.22), (-1.0, 0.22)]
    raise ValueError(f"unknown shape {shape!r}")


def _colour_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """'Redmean' distance: a cheap approximation of how different two colours look."""
    rmean = (a[0] + b[0]) / 2
    dr, dg, db = (a[i] - b[i] for i in range(3))
    return math.sqrt((2 + rmean / 256) * dr * dr + 4 * dg * dg + (2 + (255 - rmean) / 256) * db * db)


def _hsv(rng: random.Random, s: tuple[float, float], v: tuple[float, float]) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*s), rng.uniform(*v))
    return int(r * 255), int(g * 255), int(b * 255)


def _background_colour(rng: random.Random, fg: tuple[int, int, int], kind: Background) -> tuple[int, int, int]:
    for _ in range(200):
        if kind == "grey" or (kind == "varied" and rng.random() < 0.3):
            grey = rng.randint(20, 235)
            tint = [rng.randint(-15, 15) for _ in range(3)]
            colour = tuple(min(255, max(0, grey + t)) for t in tint)
        elif kind == "saturated":
            colour = _hsv(rng, (0.6, 1.0), (0.5, 1.0))
        else:
            colour = _hsv(rng, (0.0, 1.0), (0.1, 1.0))
        if _colour_distance(colour, fg) > 200:  # type: ignore[arg-type]
            return colour  # type: ignore[return-value]
    return (128, 128, 128) if _colour_distance((128, 128, 128), fg) > 200 else (20, 20, 20)


def _background(rng: random.Random, size: tuple[int, int], fg: tuple[int, int, int], kind: Background) -> Image.Image:
    a = _background_colour(rng, fg, kind)
    if rng.random() < 0.45:
        return Image.new("RGB", size, a)
    b = _background_colour(rng, fg, kind)
    # A linear gradient, at a random angle, between two colours that both stand apart from the shape.
    import numpy as np

    w, h = size
    t = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = x * math.cos(t) + y * math.sin(t)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    mixed = np.asarray(a, np.float32) * (1 - ramp[..., None]) + np.asarray(b, np.float32) * ramp[..., None]
    return Image.fromarray(mixed.astype(np.uint8), "RGB")


def _noise(rng: random.Random, im: Image.Image) -> Image.Image:
    sigma = rng.choice((0, 0, 4, 8, 14, 22))
    if sigma == 0:
        return im
    from PIL import ImageChops

    noise = Image.merge("RGB", [Image.effect_noise(im.size, sigma) for _ in range(3)])
    # effect_noise is centred on 128: shift it to zero and add it to the image.
    centred = ImageChops.subtract(noise, Image.new("RGB", im.size, (128, 128, 128)), offset=128)
    return ImageChops.add(im, centred, offset=-128)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    colour: str
    shape: str
    caption: str


def render(rng: random.Random, colour: str, shape: str, background: Background = "varied") -> Sample:
    """One image of a ``colour`` ``shape`` at a random size, place, angle and resolution."""
    side = rng.choice((64, 96, 128, 160, 224, 256, 320, 400))
    aspect = rng.uniform(0.8, 1.25)
    w, h = (side, int(side / aspect)) if aspect >= 1 else (int(side * aspect), side)
    m = min(w, h)  # the centre square survives CLIP's centre crop: keep the shape inside it
    fg = tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in COLOURS[colour])
    canvas = _background(rng, (w, h), fg, background)  # type: ignore[arg-type]
    scale = 2  # draw at twice the size, then downsample: cheap anti-aliasing
    big = canvas.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    radius_frac = rng.uniform(0.14, 0.46)
    r = radius_frac * m * scale
    x0, y0 = (w - m) / 2 * scale, (h - m) / 2 * scale
    cx = rng.uniform(x0 + r, x0 + m * scale - r)
    cy = rng.uniform(y0 + r, y0 + m * scale - r)
    angle = rng.uniform(0, 2 * math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    points = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in _polygon(shape)]
    ImageDraw.Draw(big).polygon(points, fill=fg)
    image = big.resize((w, h), Image.Resampling.BOX)
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    image = _noise(rng, image)
    size_word = "small" if radius_frac < 0.25 else ("large" if radius_frac > 0.36 else "medium")
    caption = rng.choice(CAPTIONS).format(c=colour, s=shape, size=size_word)
    return Sample(image, colour, shape, caption)


PAIRS_COLUMNS = ("image", "text", "label", "colour", "shape", "held_out")
_OWN_IMAGE = re.compile(rf"^\d{{6}}_({'|'.join(COLOURS)})_({'|'.join(SHAPES)})\.(jpg|png)$")


def refuse_foreign_folder(folder: Path) -> None:
    """Refuse a folder holding anything ``generate`` does not write (its images, named ``000123_red_star.jpg``,
    and a ``pairs.csv`` with its header): its files would be replaced. Raises OutputError."""
    from clipcli.errors import OutputError
    from clipcli.store.ownership import first_line, read_head

    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder; name a new or empty folder")
    try:
        names = sorted(os.listdir(folder)) if folder.is_dir() else []
    except OSError as e:
        raise OutputError(f"{folder}: cannot be listed ({e.strerror})") from None
    own = [n for n in names if _OWN_IMAGE.match(n) or n == "pairs.csv" or n.startswith(".pairs.csv.")]
    # A link by one of its names is no file it wrote: drawing into it would write through it.
    foreign = [n for n in names if n not in own or os.path.islink(folder / n) or not os.path.isfile(folder / n)]
    if "pairs.csv" in names and not foreign:
        try:
            header = first_line(read_head(folder / "pairs.csv") or b"")
        except OutputError:  # it cannot be read
            header = None
        if header != ",".join(PAIRS_COLUMNS):
            foreign = ["pairs.csv"]
    if foreign:
        raise OutputError(
            f"{folder}: holds {foreign[0]}, which make-shapes did not write; draw into a new or empty folder "
            "(or one make-shapes wrote)"
        )


def _write_one(args: tuple[Path, int, int, str, str, Background]) -> dict[str, str]:
    folder, seed, index, colour, shape, background = args
    rng = random.Random(seed * 1_000_003 + index)
    sample = render(rng, colour, shape, background)
    name = f"{index:06d}_{colour}_{shape}.jpg" if rng.random() < 0.8 else f"{index:06d}_{colour}_{shape}.png"
    if name.endswith(".jpg"):
        sample.image.save(folder / name, quality=rng.randint(80, 95))
    else:
        sample.image.save(folder / name)
    return {
        "image": name,
        "text": sample.caption,
        "label": f"{colour} {shape}",
        "colour": colour,
        "shape": shape,
        "held_out": str((colour, shape) in HELD_OUT).lower(),
    }


def generate(
    folder: Path,
    count: int,
    seed: int,
    split: Split = "seen",
    background: Background = "varied",
    workers: int = 2,
) -> Iterator[dict[str, str]]:
    """Write ``count`` images and ``folder/pairs.csv`` (image, text, label, colour, shape, held_out) into
    a new or empty folder, or one this wrote (:func:`refuse_foreign_folder`)."""
    from clipcli.atomic import atomic_write

    refuse_foreign_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    combos = combinations(split)
    picker = random.Random(seed)
    jobs = [(folder, seed, i, *picker.choice(combos), background) for i in range(count)]
    rows: list[dict[str, str]] = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for row in pool.map(_write_one, jobs, chunksize=64):
                rows.append(row)
                yield row
    else:
        for job in jobs:
            rows.append(_write_one(job))
            yield rows[-1]
    with atomic_write(folder / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PAIRS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
