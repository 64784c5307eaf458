"""Near-duplicate groups from embeddings: rows joined when their cosine similarity reaches a threshold.

Each row's nearest neighbours come from the source's index when it has a current one (the index's
k-NN graph), else from an exact blocked scan; pairs at or above the threshold are joined transitively
(union-find), so a chain of copies forms one group. A group's representative is its largest file
(more pixels or less compression: the copy worth keeping), ties going to the first path in natural
order; every member is reported with its exact similarity to the representative. Nothing is deleted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

# Nothing heavy at import: the CLI imports this module for DEFAULT_THRESHOLD while building --help.

if TYPE_CHECKING:
    import numpy as np

    from clipcli.index import OpenIndex

DEFAULT_THRESHOLD = 0.9
NEIGHBOURS = 10  # a row's candidates: enough for groups of up to ten copies in one step, more by chaining
QUERY_BLOCK = 256


@dataclass(frozen=True)
class Member:
    group: int  # 1, 2, ... in the order of the groups' representatives' paths
    path: str
    similarity: float  # to the group's representative (1.0 for the representative itself)
    bytes: int  # the file's size, -1 when it cannot be read


Rows = Callable[["np.ndarray"], "np.ndarray"]  # source rows -> their unit vectors


def neighbour_pairs(
    n: int,
    rows_of: Rows,
    threshold: float,
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    on_progress: Callable[[int], None] | None = None,
) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, whose similarity reaches ``threshold`` among each row's nearest neighbours."""
    import numpy as np

    pairs: set[tuple[int, int]] = set()
    for start in range(0, n, QUERY_BLOCK):
        block = np.arange(start, min(n, start + QUERY_BLOCK))
        scores, found = search(rows_of(block), NEIGHBOURS + 1)
        for i, row_scores, row_found in zip(block, scores, found, strict=True):
            for score, j in zip(row_scores, row_found, strict=True):
                if j >= 0 and j != i and score >= threshold:
                    pairs.add((int(min(i, j)), int(max(i, j))))
        if on_progress:
            on_progress(len(block))
    return sorted(pairs)


def _components(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in {i for pair in pairs for i in pair}:
        groups.setdefault(root(i), []).append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def group_members(
    components: list[list[int]], names: Callable[[list[int]], list[str]], rows_of: Rows
) -> list[list[Member]]:
    """Each group, representative first (largest file), then by similarity to it."""
    import numpy as np

    from clipcli.images import natural_key

    groups = []
    for rows in components:
        paths = names(rows)
        sizes = [file_size(p) for p in paths]
        rep = min(range(len(rows)), key=lambda i: (-sizes[i], natural_key(paths[i])))
        vectors = rows_of(np.array(rows, np.int64))
        sims = vectors @ vectors[rep]
        order = sorted(range(len(rows)), key=lambda i: (i != rep, -float(sims[i]), natural_key(paths[i])))
        groups.append([Member(0, paths[i], 1.0 if i == rep else float(sims[i]), sizes[i]) for i in order])
    groups.sort(key=lambda g: natural_key(g[0].path))
    return [[Member(number, m.path, m.similarity, m.bytes) for m in g] for number, g in enumerate(groups, 1)]


def find_duplicates(
    n: int,
    rows_of: Rows,
    names: Callable[[list[int]], list[str]],
    threshold: float = DEFAULT_THRESHOLD,
    index: OpenIndex | None = None,
    exact_search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[list[Member]]:
    """Groups of near-duplicates among ``n`` rows (see the module's docstring)."""
    search = index.search if index is not None else exact_search
    if search is None:
        raise ValueError("an index or an exact search is needed")
    pairs = neighbour_pairs(n, rows_of, threshold, search, on_progress)
    return group_members(_components(n, pairs), names, rows_of)


def deletable(groups: list[list[Member]], keep: str) -> list[str]:
    """The paths one could delete: all but one per group (the representative, or the first path in
    natural order with ``keep="first"``)."""
    from clipcli.images import natural_key

    out = []
    for group in groups:
        kept = min(group, key=lambda m: natural_key(m.path)) if keep == "first" else group[0]
        out += [m.path for m in group if m is not kept]
    return out


def matrix_search(matrix: np.ndarray) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """Exact k-NN over an in-memory matrix of unit rows."""

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        scores = queries @ matrix.T
        take = min(k, matrix.shape[0])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)

    return search
