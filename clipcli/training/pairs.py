"""Training data: the image-text pairs of a CSV, Parquet or JSONL file, and their preprocessed images,
held in memory when they fit (:data:`PRELOAD_LIMIT_BYTES`) or decoded when a step asks for them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clipcli.errors import InputError
from clipcli.images.decode import describe_error, load_image, preprocess

if TYPE_CHECKING:
    import pandas as pd
    import torch

# Preprocessed images are kept in memory (fp16) up to this size; beyond it, decoded every step.
PRELOAD_LIMIT_BYTES = 6 * 2**30


@dataclass
class Pairs:
    files: list[Path]
    texts: list[str]
    rows: list[int]  # the 1-based data row each pair came from, for messages


def read_pairs(path: Path) -> Pairs:
    """Read CSV/Parquet/JSONL with ``image`` (relative to the file's folder) and ``text`` columns."""
    import pandas as pd

    readers: dict[str, Callable[[Path], pd.DataFrame]] = {
        ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),
        ".parquet": pd.read_parquet,
        ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise InputError(f"{path}: pairs must be .csv, .parquet or .jsonl")
    try:
        frame = reader(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read pairs ({str(e).splitlines()[0]})") from e
    missing = [c for c in ("image", "text") if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (need image and text)")
    if frame.empty:
        raise InputError(f"{path}: no pairs")
    from clipcli.models.families.openai import tokenize

    files, texts, rows = [], [], []
    for i, (image, text) in enumerate(zip(frame["image"], frame["text"], strict=True), start=1):
        text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text).strip()
        if not text:
            raise InputError(f"{path}: row {i}: empty caption")
        try:
            tokenize([text])
        except InputError as e:
            raise InputError(f"{path}: row {i}: {e}") from None
        files.append(path.parent / str(image))
        texts.append(text)
        rows.append(i)
    return Pairs(files, texts, rows)


class PixelSource:
    """Preprocessed images by pair index: from a uint8 cache in memory, or decoded when asked."""

    def __init__(self, files: Sequence[Path], n_px: int, workers: int, on_progress: Callable[[int], None] | None):
        import torch

        self.files = files
        self.n_px = n_px
        self.ok = torch.ones(len(files), dtype=torch.bool)
        self.reasons: dict[int, str] = {}
        self.cache: torch.Tensor | None = None
        if len(files) * 3 * n_px * n_px * 2 <= PRELOAD_LIMIT_BYTES:
            self.cache = self._preload(workers, on_progress)
        else:
            # Without a cache, every file is checked once up front so bad rows are known before training.
            self._check_all()

    def _decode(self, i: int) -> torch.Tensor | str:
        try:
            return preprocess(load_image(self.files[i], self.n_px), self.n_px)
        except (OSError, ValueError, SyntaxError) as e:
            return describe_error(e)

    def _check_all(self) -> None:
        for i in range(len(self.files)):
            got = self._decode(i)
            if isinstance(got, str):
                self.ok[i] = False
                self.reasons[i] = got

    def _preload(self, workers: int, on_progress: Callable[[int], None] | None) -> torch.Tensor:
        import torch

        from clipcli.images.batches import iter_batches
        from clipcli.images.decode import normalize_pixels
        from clipcli.images.sources import ImageRef

        cache = torch.empty(len(self.files), 3, self.n_px, self.n_px, dtype=torch.float16)
        refs = [ImageRef(str(f), f) for f in self.files]
        for batch in iter_batches(refs, self.n_px, batch_size=256, workers=workers):
            if batch.images is not None:
                cache[batch.indices] = normalize_pixels(batch.images).half()
            for i, reason in batch.skipped:
                self.ok[i] = False
                self.reasons[i] = reason
            if on_progress:
                on_progress(len(batch.indices) + len(batch.skipped))
        return cache

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        import torch

        if self.cache is not None:
            return self.cache[list(indices)].float()
        return torch.stack([t for t in (self._decode(i) for i in indices) if not isinstance(t, str)])
