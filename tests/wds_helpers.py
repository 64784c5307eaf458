"""WebDataset shards for the tests, written with the real ``webdataset`` package from the bundled
model's samples (``samples/``) and from :mod:`clipcli.training.synth`'s shapes."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipcli.training.synth import COLOURS, SHAPES, render

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@dataclass(frozen=True)
class Item:
    key: str
    image: bytes  # encoded
    ext: str  # jpg, png, webp
    caption: str
    label: str  # "red circle"


def sample_items() -> list[Item]:
    """The bundled samples (seen and held-out), as items keyed by their file name."""
    items = []
    for split in ("seen", "held-out"):
        for path in sorted((SAMPLES / split).glob("*.jpg")):
            label = path.stem.replace("-", " ")
            items.append(Item(f"{split}-{path.stem}", path.read_bytes(), "jpg", f"a {label}", label))
    return items


def shape_items(count: int, seed: int = 0) -> list[Item]:
    """``count`` synthetic shapes, as jpg, png and webp in turn."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        sample = render(rng, colour, shape)
        ext = ("jpg", "png", "webp")[i % 3]
        buf = io.BytesIO()
        sample.image.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
        items.append(Item(f"{i:06d}", buf.getvalue(), ext, sample.caption, f"{colour} {shape}"))
    return items


def write_shard(path: Path, items: list[Item], caption: str = "txt", cls: dict[str, int] | None = None) -> Path:
    """One shard in WebDataset's layout (``KEY.jpg`` + ``KEY.txt`` or ``KEY.json`` [+ ``KEY.cls``])."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for item in items:
            sample: dict[str, object] = {"__key__": item.key, item.ext: item.image}
            if caption == "txt":
                sample["txt"] = item.caption
            elif caption == "json":
                sample["json"] = json.dumps({"caption": item.caption, "url": f"http://example.com/{item.key}"})
            if cls is not None:
                sample["cls"] = cls[item.label]
            sink.write(sample)
    return path


def write_shards(pattern: Path, items: list[Item], per_shard: int, **kwargs: object) -> list[Path]:
    """Shards of ``per_shard`` items written by ``wds.ShardWriter`` (``pattern``: ``.../%06d.tar``)."""
    import webdataset as wds

    pattern.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with wds.ShardWriter(str(pattern), maxcount=per_shard, verbose=0, **kwargs) as sink:
        for item in items:
            sink.write({"__key__": item.key, item.ext: item.image, "txt": item.caption})
    for i in range(len(items) // per_shard + (len(items) % per_shard > 0)):
        written.append(Path(str(pattern) % i))
    return written


def images_folder(folder: Path, items: list[Item]) -> list[Path]:
    """The same items as loose files (``KEY.EXT``)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for item in items:
        path = folder / f"{item.key}.{item.ext}"
        path.write_bytes(item.image)
        out.append(path)
    return out


def corrupt_item(key: str) -> Item:
    """A sample whose jpg member is not an image."""
    return Item(key, b"\xff\xd8\xff\xe0 this is no jpeg" * 4, "jpg", "a broken picture", "red circle")


def truncate(path: Path, keep: float = 0.6) -> Path:
    """Cut ``path`` to a share of its bytes, in the middle of a member, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def png_bytes(size: tuple[int, int] = (32, 32), colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()
