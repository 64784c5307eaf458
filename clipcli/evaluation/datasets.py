"""Evaluation data: image folders, CSV/Parquet manifests, WebDataset benchmarks in CLIP_benchmark's
layout, and torchvision's CIFAR-10/100."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import InputError
from clipcli.zeroshot.prompts import read_lines

if TYPE_CHECKING:
    import numpy as np

    from clipcli.images.sources import ImageRef  # images imports PIL, which `clipcli --help` does without


class Benchmark(str, Enum):
    """The datasets torchvision downloads and reads for us (their test split)."""

    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"


@dataclass(frozen=True)
class LabelledImages:
    """Images with one class each: from files (``refs``) or in memory (``arrays``)."""

    name: str
    ids: list[str]  # the path (or a stable id for in-memory images), for predictions files
    targets: list[int]
    classes: list[str]  # the names used in prompts
    refs: list[ImageRef] | None = None
    arrays: np.ndarray | None = None  # N x H x W x 3 uint8, as torchvision's CIFAR holds them
    # Folders under an image folder that hold no image, so no class: the CLI tells the user, since a
    # class silently missing from the report reads as a class that was evaluated.
    empty_folders: list[str] = field(default_factory=list)
    templates: tuple[str, ...] | None = None  # the dataset's own prompt templates ("{}" for the class)

    def __len__(self) -> int:
        """The number of images."""
        return len(self.targets)

    def subset(self, keep: list[int]) -> LabelledImages:
        return replace(
            self,
            ids=[self.ids[i] for i in keep],
            targets=[self.targets[i] for i in keep],
            refs=[self.refs[i] for i in keep] if self.refs is not None else None,
            arrays=self.arrays[keep] if self.arrays is not None else None,
        )


@dataclass(frozen=True)
class CaptionPairs:
    """Images with one or more captions each, for retrieval recall."""

    name: str
    refs: list[ImageRef]  # unique images
    texts: list[str]
    text_to_image: list[int]  # the image each caption belongs to

    def __len__(self) -> int:
        """The number of images (not of captions)."""
        return len(self.refs)


EvalData = LabelledImages | CaptionPairs


def load_dataset(
    data: Path | None,
    dataset: Benchmark | None = None,
    data_root: Path = Path("data"),
    download: bool = False,
    classnames: str | None = None,
) -> EvalData:
    """What ``eval`` evaluates: a benchmark (``dataset``), or ``data``, an image folder or a manifest.

    ``classnames`` names the classes of a folder or a labelled manifest in prompts (see
    :func:`image_folder`); a benchmark brings its own names.
    """
    if dataset is not None and data is None:
        return cifar(dataset, data_root, download)
    if data is not None and dataset is None:
        if is_wds_benchmark(data):
            return wds_benchmark(data, classnames)
        if data.is_dir():
            return image_folder(data, classnames)
        if data.is_file():
            return manifest(data, classnames)
        raise InputError(f"{data}: no such folder or manifest")
    raise InputError("give a folder or manifest, or --dataset cifar10|cifar100 (one of them)")


def _class_names(folder_names: list[str], classnames: str | None) -> list[str]:
    """Prompt names for folder names: a file of 'folder<TAB>name' (or 'folder,name') lines, or one name per
    line in the folders' sorted order."""
    if classnames is None:
        return [n.replace("_", " ") for n in folder_names]
    lines = read_lines(classnames, "class names")
    if all(("\t" in ln or "," in ln) for ln in lines):
        mapping = dict(ln.split("\t" if "\t" in ln else ",", 1) for ln in lines)
        missing = [f for f in folder_names if f not in mapping]
        if missing:
            raise InputError(f"{classnames}: no name for folder(s) {', '.join(missing[:5])}")
        return [mapping[f].strip() for f in folder_names]
    if len(lines) != len(folder_names):
        raise InputError(f"{classnames}: {len(lines)} names for {len(folder_names)} classes")
    return lines


def image_folder(root: Path, classnames: str | None = None) -> LabelledImages:
    """Every image under ``root``; its class is the name of the folder it sits in (for a sample of a
    WebDataset shard, or another container, the folder of its container)."""
    from clipcli.images.containers import container_of, expand
    from clipcli.images.sources import natural_key, walk_folder

    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    refs, skipped = expand(walk_folder(str(root)))
    if skipped:  # labelled data is evaluated whole: a container that cannot be read is named, not dropped
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise InputError(f"{skipped[0].path}: {skipped[0].reason}{more}")
    if not refs:
        raise InputError(f"{root}: no images found")
    folders = [os.path.dirname(container_of(r.path) or r.path) for r in refs]
    leaf = [os.path.basename(folder) for folder in folders]
    folder_names = sorted(set(leaf), key=natural_key)
    if len(folder_names) < 2:
        raise InputError(
            f"{root}: its images are all in one class folder ({folder_names[0]!r}); zero-shot accuracy needs "
            "a folder per class, two or more"
        )
    index = {n: i for i, n in enumerate(folder_names)}
    return LabelledImages(
        name=f"folder:{root}",
        ids=[r.path for r in refs],
        targets=[index[n] for n in leaf],
        classes=_class_names(folder_names, classnames),
        refs=refs,
        empty_folders=_empty_folders(str(root), folders),
    )


def _empty_folders(root: str, image_dirs: Iterable[str]) -> list[str]:
    """The top-most folders under ``root`` with no image anywhere below them, in natural order.

    Only the top-most is named: its empty sub-folders are the same missing class, said once.
    """
    from clipcli.images.sources import natural_key

    holding = {root}  # every folder with an image somewhere below it
    for folder in image_dirs:
        while folder not in holding and len(folder) > len(root):
            holding.add(folder)
            folder = os.path.dirname(folder)
    empty = []
    for parent, dirs, _ in os.walk(root, followlinks=True):
        dirs.sort(key=natural_key)
        for name in list(dirs):
            path = os.path.join(parent, name)
            if path not in holding:
                empty.append(path)
                dirs.remove(name)  # do not descend: its sub-folders are empty too
    return sorted(empty, key=natural_key)


def manifest(path: Path, classnames: str | None = None) -> EvalData:
    """A CSV or Parquet file with ``path`` (or ``image``) and ``label`` (classification) or ``text``
    (image-caption retrieval) columns; relative paths are relative to the manifest's folder."""
    import pandas as pd

    from clipcli.images.sources import ImageRef, natural_key

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            raise InputError(f"{path}: a manifest must be .csv or .parquet")
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read manifest ({str(e).splitlines()[0]})") from e
    column = "path" if "path" in frame.columns else "image" if "image" in frame.columns else None
    if column is None or not ({"label", "text"} & set(frame.columns)):
        raise InputError(f"{path}: a manifest needs a path (or image) column and a label or text column")
    if frame.empty:
        raise InputError(f"{path}: no rows")
    cells = manifest_cells(path, frame[column], "path")
    files = [str(path.parent / p) if not os.path.isabs(p) else p for p in cells]
    if "label" in frame.columns:
        labels = manifest_cells(path, frame["label"], "label")
        names = sorted(set(labels), key=natural_key)
        index = {n: i for i, n in enumerate(names)}
        return LabelledImages(
            name=f"manifest:{path}",
            ids=files,
            targets=[index[v] for v in labels],
            classes=_class_names(names, classnames),
            refs=[ImageRef(f, Path(f)) for f in files],
        )
    unique: dict[str, int] = {}
    owner = [unique.setdefault(f, len(unique)) for f in files]
    return CaptionPairs(
        name=f"manifest:{path}",
        refs=[ImageRef(f, Path(f)) for f in unique],
        texts=manifest_cells(path, frame["text"], "text"),
        text_to_image=owner,
    )


def manifest_cells(manifest: Path, column: Iterable[Any], what: str) -> list[str]:
    """A column's values as strings; an empty (or blank) cell is an error naming its row.

    Empty is an error because it would otherwise pass for a value: an empty path is the manifest's own
    folder, an empty label a class named ''. Parquet gives None, NaN or NA where a CSV gives ''.
    """
    import pandas as pd

    values = []
    for row, value in enumerate(column, start=1):  # 1-based data rows, as `train` numbers them
        missing = pd.isna(value)  # None, NaN or pd.NA; an array for a list cell, which is no scalar
        text = "" if isinstance(missing, bool) and missing else str(value)
        if not text.strip():
            raise InputError(f"{manifest}: row {row}: empty {what}")
        values.append(text)
    return values


WDS_CLASSNAMES = "classnames.txt"
WDS_TEMPLATES = "zeroshot_classification_templates.txt"
WDS_TYPE = "dataset_type.txt"


def is_wds_benchmark(root: Path) -> bool:
    """A folder in CLIP_benchmark's WebDataset layout: ``classnames.txt`` (or ``dataset_type.txt``) beside
    ``test/`` (``nshards.txt`` and ``0.tar`` .. ``N-1.tar``), or beside the shards themselves."""
    if not root.is_dir() or not any((root / name).is_file() for name in (WDS_CLASSNAMES, WDS_TYPE)):
        return False
    folder = root / "test" if (root / "test").is_dir() else root
    return (folder / "nshards.txt").is_file() or any(folder.glob("*.tar"))


def wds_shards(root: Path) -> list[str]:
    """The test split's shards: ``{0..N-1}.tar`` as ``nshards.txt`` counts them, else every ``.tar``."""
    from clipcli.images.sources import natural_key

    folder = root / "test" if (root / "test").is_dir() else root
    count = folder / "nshards.txt"
    if count.is_file():
        text = " ".join(read_lines(count, "shard count"))
        if not text.isdigit() or len(text) > 9 or int(text) < 1:
            raise InputError(f"{count}: expected a number of shards, got {text[:40]!r}")
        n, present = int(text), sum(1 for _ in folder.glob("*.tar"))
        if n > present:  # named before a list of n names is made: n may be anything
            missing = next(i for i in range(present + 1) if not (folder / f"{i}.tar").is_file())
            raise InputError(f"{count}: counts {n} shards, but {folder / f'{missing}.tar'} is missing")
        return [str(folder / f"{i}.tar") for i in range(n)]
    return sorted((str(p) for p in folder.glob("*.tar")), key=natural_key)


def wds_benchmark(root: Path, classnames: str | None = None) -> EvalData:
    """A CLIP_benchmark WebDataset benchmark: samples with a ``cls`` (an index into ``classnames.txt``)
    and the benchmark's prompt templates (``{c}`` for the class); or, where ``dataset_type.txt`` says
    ``retrieval``, samples with captions, one per line of their ``txt``. A sample the shards cannot give
    (no image, no class, a truncated shard) is an error naming it: a benchmark is evaluated whole."""
    from clipcli.images.sources import discover
    from clipcli.images.webdataset import sample_fields

    refs, skipped = discover(wds_shards(root))
    if skipped:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise InputError(f"{skipped[0].path}: {skipped[0].reason}{more}")
    if not refs:
        raise InputError(f"{root}: no samples in its shards")
    try:
        fields = sample_fields(refs)
    except OSError as e:
        raise InputError(f"{root}: cannot read its shards ({e})") from e
    kind = " ".join(read_lines(root / WDS_TYPE, "dataset type")).lower() if (root / WDS_TYPE).is_file() else ""
    if kind == "retrieval":
        texts: list[str] = []
        owner: list[int] = []
        for i, (ref, got) in enumerate(zip(refs, fields, strict=True)):
            lines = [ln.strip() for ln in str(got.get("txt") or got.get("caption") or "").splitlines() if ln.strip()]
            if not lines:
                raise InputError(f"{ref.path}: the sample has no caption (txt)")
            texts += lines
            owner += [i] * len(lines)
        return CaptionPairs(name=f"wds:{root}", refs=refs, texts=texts, text_to_image=owner)
    names = read_lines(classnames or root / WDS_CLASSNAMES, "class names")
    targets = []
    for ref, got in zip(refs, fields, strict=True):
        label = got.get("cls")
        if label is None:
            raise InputError(f"{ref.path}: the sample has no class (a .cls member)")
        if not 0 <= label < len(names):
            raise InputError(f"{ref.path}: class {label} is not one of the {len(names)} in {WDS_CLASSNAMES}")
        targets.append(label)
    own = root / WDS_TEMPLATES
    templates = tuple(t.replace("{c}", "{}") for t in read_lines(own, "templates")) if own.is_file() else None
    return LabelledImages(
        name=f"wds:{root}", ids=[r.path for r in refs], targets=targets, classes=names, refs=refs, templates=templates
    )


def cifar(benchmark: Benchmark, root: Path, download: bool = False) -> LabelledImages:
    """The test split of CIFAR-10 or CIFAR-100, through torchvision's own loader and file layout."""
    from torchvision import datasets

    name = benchmark.value
    factory = {Benchmark.CIFAR10: datasets.CIFAR10, Benchmark.CIFAR100: datasets.CIFAR100}[benchmark]
    try:
        data = factory(root=str(root), train=False, download=download)
    except RuntimeError as e:
        hint = "" if download else "; pass --download to fetch it (needs a network)"
        raise InputError(f"{name} not found under {root} ({e}){hint}") from e
    except OSError as e:
        raise InputError(f"{name}: cannot download to {root} ({e})") from e
    return LabelledImages(
        name=name,
        ids=[f"{name}/test/{i:05d}" for i in range(len(data.targets))],
        targets=[int(t) for t in data.targets],
        classes=[c.replace("_", " ") for c in data.classes],
        arrays=data.data,
    )


def limit(data: LabelledImages, n: int | None, seed: int) -> LabelledImages:
    """A random subset of ``n`` images (all of them when ``n`` is None), kept in their original order."""
    if n is None or n >= len(data.targets):
        return data
    keep = sorted(random.Random(seed).sample(range(len(data.targets)), n))
    return data.subset(keep)
