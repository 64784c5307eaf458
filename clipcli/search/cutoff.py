"""A relevance cutoff that means something: a score is kept when it stands out from the same query's
scores over the dataset.

For each query, the scores of a fixed random sample of the dataset's rows (:func:`sample_rows`, 4,096
rows at most, seed 0, so the same dataset gives the same cutoff every time) give a mean and a standard
deviation; a result is kept when its z-score, ``(score - mean) / sd``, reaches Z. ``--cutoff Z`` gives Z;
``--cutoff auto`` takes the larger of :data:`AUTO_MIN_Z` and the z that one row in the whole dataset
would reach by chance were the scores normal (``NormalDist().inv_cdf(1 - 1/N)``: 1.9 for 32 rows, 3.7 for
10,000, 4.8 for a million), so that a query whose best rows are only the tail of the bulk gets nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from clipcli.models import LoadedModel

SAMPLE_ROWS = 4096
AUTO_MIN_Z = 2.6  # on the bundled model's samples/: no absent shape reaches it (the highest reaches 2.50)


def parse_cutoff(value: str | None) -> float | str | None:
    """``--cutoff``'s value: ``auto``, or a z-score (a number)."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise InputError(f"--cutoff {value!r}: give auto or a z-score (a number such as 2.5)") from None


def auto_z(rows: int) -> float:
    """The z-score ``--cutoff auto`` asks of a result in a dataset of ``rows`` rows."""
    from statistics import NormalDist

    if rows < 2:
        return AUTO_MIN_Z
    return max(AUTO_MIN_Z, NormalDist().inv_cdf(1 - 1 / rows))


def auto_cutoff(query: np.ndarray, sample: np.ndarray, z: float | None = None, rows: int | None = None) -> float:
    """The score threshold for ``--cutoff auto`` (or ``--cutoff z``): the mean of ``sample @ query`` plus
    ``z`` standard deviations; ``z`` defaults to :func:`auto_z` of ``rows`` (default: the sample's size).
    ``sample`` is (n, D) unit rows. An empty sample, or one whose scores are all equal, gives +inf when
    nothing could stand out."""
    import numpy as np

    scores = np.asarray(sample, np.float32) @ np.asarray(query, np.float32).reshape(-1)
    if len(scores) < 2:
        return float("inf")
    if z is None:
        z = auto_z(rows if rows is not None else len(scores))
    sd = float(scores.std())
    if sd <= 1e-6:  # all alike (float32 noise aside)
        return float("inf")
    return float(scores.mean()) + z * sd


def sample_rows(matrix_or_saved: Any, n: int = SAMPLE_ROWS, seed: int = 0) -> np.ndarray:
    """A fixed random sample (``n`` rows at most, the same for the same ``seed``) of a saved dataset's
    rows, as float32 unit vectors: ``matrix_or_saved`` is a :class:`clipcli.store.saved.SavedMatrix` (as
    :func:`clipcli.store.saved.open_matrix` gives) or an (N, D) array of unit rows."""
    import numpy as np

    if isinstance(matrix_or_saved, np.ndarray):
        return np.asarray(matrix_or_saved[_sample_indices(len(matrix_or_saved), n, seed)], np.float32)
    rows = _sample_indices(int(matrix_or_saved.matrix.shape[0]), n, seed)
    return np.asarray(matrix_or_saved.take(rows), np.float32)


def _sample_indices(total: int, n: int, seed: int) -> np.ndarray:
    import numpy as np

    if total <= n:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


def source_sample(
    source: Path, lm: LoadedModel, use_cache: bool = True, n: int = SAMPLE_ROWS
) -> tuple[np.ndarray, int]:
    """(sample, row count) of one saved source: through its memory-mapped matrix, or, without the
    cache, by one pass over its Parquet parts."""
    import numpy as np

    from clipcli.store.saved import Expect, iter_saved, open_matrix, pq_rows

    if use_cache or source.suffix.lower() == ".npy":
        saved = open_matrix(source, Expect.of(lm))
        return sample_rows(saved, n), int(saved.matrix.shape[0])
    files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    total = sum(pq_rows(f) for f in files)
    wanted = _sample_indices(total, n, 0)
    picked, start = [], 0
    for chunk, _ in iter_saved(source, lm, use_cache=False):
        stop = start + len(chunk)
        lo, hi = np.searchsorted(wanted, [start, stop])
        picked.append(chunk[wanted[lo:hi] - start])
        start = stop
    return (np.concatenate(picked) if picked else np.zeros((0, lm.embed_dim), np.float32)), total


class SampleOfScan:
    """Rows seen while scanning images (no saved matrix to sample): the first :data:`SAMPLE_ROWS` kept."""

    def __init__(self, n: int = SAMPLE_ROWS) -> None:
        self.n = n
        self.rows: list[np.ndarray] = []
        self.kept = 0
        self.total = 0

    def see(self, chunk: np.ndarray) -> None:
        self.total += len(chunk)
        if self.kept < self.n:
            self.rows.append(chunk[: self.n - self.kept])
            self.kept += len(self.rows[-1])


def combine(samples: Iterable[tuple[np.ndarray, int]], dim: int) -> tuple[np.ndarray, int]:
    """Samples of several sources as one (rows, total row count)."""
    import numpy as np

    parts = list(samples)
    rows = [s for s, _ in parts if len(s)]
    return (np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)), sum(t for _, t in parts)


__all__ = ["AUTO_MIN_Z", "SAMPLE_ROWS", "auto_cutoff", "auto_z", "parse_cutoff", "sample_rows", "source_sample"]
