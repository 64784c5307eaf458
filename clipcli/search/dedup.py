"""Near-duplicate groups from embeddings: every member at or above a threshold to the group's representative.

Each row's nearest neighbours come from the source's index when it has a current one (the index's
k-NN graph), else from an exact blocked scan; pairs at or above the threshold are joined transitively
(union-find) into candidate sets. A chain of near matches (A~B, B~C) can join two images that are not
copies of each other (A and C), so each candidate set is then split around representatives: the
preferred member (the largest file: more pixels or less compression, the copy worth keeping; or the
first path in natural order) takes every member at or above the threshold to it, exactly compared,
and the rest form groups of their own the same way. Every member is therefore reported with its exact
similarity to the representative, never below the threshold. Nothing is deleted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

# Nothing heavy at import: the CLI imports this module for DEFAULT_THRESHOLD while building --help.

if TYPE_CHECKING:
    import numpy as np

    from clipcli.store.index import OpenIndex

DEFAULT_THRESHOLD = 0.9
NEIGHBOURS = 10  # a row's candidates: enough for groups of up to ten copies in one step, more by chaining
QUERY_BLOCK = 256
Prefer = Literal["largest", "first"]  # which member of a group represents it: the file kept


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
    components: list[list[int]],
    names: Callable[[list[int]], list[str]],
    rows_of: Rows,
    threshold: float,
    prefer: Prefer = "largest",
    size_of: Callable[[str], int] = file_size,
    pixels_of: Callable[[str], int] | None = None,
    files_only: Callable[[str], str] | None = None,
) -> list[list[Member]]:
    """Each candidate set split into groups around representatives (see the module's docstring): each
    group's representative first, then its members by similarity to it, none below ``threshold``.
    "largest" is the most bytes, then the most pixels (``pixels_of``): a video's frames and a shard's
    samples share their file's size, so pixels choose among them. ``files_only`` (for ``--keep``: where
    a row's file is from here) leaves out what is no file of its own (see :func:`own_files`)."""
    import numpy as np

    from clipcli.images.sources import natural_key

    groups = []
    for rows in components:
        paths = names(rows)
        if files_only is not None:
            own = own_files(paths, files_only)
            rows, paths = [rows[i] for i in own], [paths[i] for i in own]
        sizes = [size_of(p) for p in paths]
        if prefer == "first":
            left = sorted(range(len(rows)), key=lambda i: natural_key(paths[i]))
        else:
            pixels = [pixels_of(p) if pixels_of is not None else 0 for p in paths]
            left = sorted(range(len(rows)), key=lambda i: (-sizes[i], -pixels[i], natural_key(paths[i])))
        vectors = rows_of(np.array(rows, np.int64))
        while len(left) > 1:
            rep = left[0]
            sims = dict(zip(left, (vectors[left] @ vectors[rep]).astype(float).tolist(), strict=True))
            taken = [i for i in left if i == rep or sims[i] >= threshold]
            left = [i for i in left if i != rep and sims[i] < threshold]
            if len(taken) > 1:
                taken.sort(key=lambda i: (i != rep, -sims[i], natural_key(paths[i])))
                groups.append([Member(0, paths[i], 1.0 if i == rep else sims[i], sizes[i]) for i in taken])
    groups.sort(key=lambda g: natural_key(g[0].path))
    return [[Member(number, m.path, m.similarity, m.bytes) for m in g] for number, g in enumerate(groups, 1)]


def own_files(paths: Sequence[str], locate: Callable[[str], str]) -> list[int]:
    """The indices of ``paths`` that are files of their own, each file once: not a video's frame or a
    shard's sample (a frame resembling a photo must not make the photo deletable), not a symbolic link
    (keeping the link and listing its target would delete the only copy), and not a second name of a
    file already in (a hard link, a path through a linked folder: deleting it frees nothing, and the
    first name may be the one listed)."""
    from clipcli.images.containers import container_of

    own, seen = [], set()
    for i, path in enumerate(paths):
        if container_of(path) is not None:
            continue
        where = locate(path)
        try:
            if os.path.islink(where):
                continue
            st = os.stat(where)
        except (OSError, ValueError):
            own.append(i)  # gone or unreadable: listed by no one (listable checks every file)
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            own.append(i)
    return own


def find_duplicates(
    n: int,
    rows_of: Rows,
    names: Callable[[list[int]], list[str]],
    threshold: float = DEFAULT_THRESHOLD,
    index: OpenIndex | None = None,
    exact_search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
    on_progress: Callable[[int], None] | None = None,
    prefer: Prefer = "largest",
    size_of: Callable[[str], int] = file_size,
    pixels_of: Callable[[str], int] | None = None,
    files_only: Callable[[str], str] | None = None,
) -> list[list[Member]]:
    """Groups of near-duplicates among ``n`` rows (see the module's docstring); ``prefer`` chooses each
    group's representative (the largest file, or the first path in natural order), the file one keeps;
    ``files_only``: see :func:`group_members`."""
    search = index.search if index is not None else exact_search
    if search is None:
        raise ValueError("an index or an exact search is needed")
    pairs = neighbour_pairs(n, rows_of, threshold, search, on_progress)
    components = _components(n, pairs)
    return group_members(components, names, rows_of, threshold, prefer, size_of, pixels_of, files_only)


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


@dataclass
class StoredFiles:
    """What ``embed`` recorded of the files behind a saved Parquet source: each path's size and mtime
    (read on first use, for the paths asked about), and the folder its relative paths are relative to
    (``base``; None: the current folder, where ``embed`` resolved them)."""

    parts: list[str]
    base: str | None = None
    key: str = "path"  # the path column's name (clip-retrieval's layout: image_path)
    _stats: dict[str, tuple[int, float]] | None = None
    _pixels: dict[str, int] = field(default_factory=dict)
    _base_is_here: bool | None = None

    def stats(self) -> dict[str, tuple[int, float]]:
        if self._stats is None:
            from pathlib import Path

            from clipcli.store.parts import read_parquet

            self._stats = {}
            for part in self.parts:
                table = read_parquet(Path(part))
                if not {self.key, "bytes", "mtime"} <= set(table.column_names):
                    continue  # texts, or not written by embed: nothing to check against
                columns = (table.column(c).to_pylist() for c in (self.key, "bytes", "mtime"))
                self._stats.update((p, (int(b), float(m))) for p, b, m in zip(*columns, strict=True))
                if {"width", "height"} <= set(table.column_names):
                    sides = (table.column(c).to_pylist() for c in (self.key, "width", "height"))
                    self._pixels.update((p, (w or 0) * (h or 0)) for p, w, h in zip(*sides, strict=True))
        return self._stats

    def pixels(self, path: str) -> int:
        """The width times the height embed recorded (0 where it recorded none)."""
        self.stats()
        return self._pixels.get(path, 0)

    def locate(self, path: str) -> str:
        """Where a stored path is from here: a relative one against the recorded base (kept as stored
        when the base is the working folder)."""
        if not self.base or os.path.isabs(path):
            return path
        if self._base_is_here is None:
            self._base_is_here = _is_working_folder(self.base)
        return path if self._base_is_here else os.path.join(self.base, path)

    def size(self, path: str) -> int:
        """The size embed recorded (the files listed are checked to still have it), else the file's own."""
        stored = self.stats().get(path)
        return stored[0] if stored is not None else file_size(self.locate(path))

    def problem(self, path: str) -> str | None:
        """Why ``path`` cannot be taken for the file embedded: None when its size and mtime are as stored."""
        from clipcli.images.containers import container_of

        stored = self.stats().get(path)
        if stored is None:
            return "has no size and mtime recorded to check it against"
        container = container_of(path)  # a video's frame or a shard's sample: its file's size and mtime
        try:
            st = os.stat(self.locate(container or path))
        except FileNotFoundError:
            return f"is missing ({container} is gone)" if container else "is missing"
        except OSError as e:
            return f"cannot be checked ({e.strerror or e})"
        if (st.st_size, st.st_mtime) != stored:
            return "has changed since it was embedded (its size or mtime differs)"
        return None


def _is_working_folder(folder: str) -> bool:
    try:
        return os.path.samefile(folder, os.curdir)
    except OSError:
        return False


def listable(groups: list[list[Member]], stored: StoredFiles | None) -> tuple[list[str], list[tuple[str, str]]]:
    """The paths one could delete: of all but each group's representative, the file kept (groups made with
    the ``prefer`` of the ``--keep`` asked for, each member at or above the threshold to it), those that
    are verified copies of it, named as one reaches them from here; and (path, reason) for each path not
    listed. Verified: the picture is the
    kept file's, pixel by pixel (:mod:`clipcli.search.pictures`), and, for saved rows (``stored``),
    both files are still those embedded. A group whose kept file is missing or changed lists nothing:
    its copies may be the only ones left."""
    from clipcli.search.pictures import Pictures

    def here(path: str) -> str:
        return stored.locate(path) if stored is not None else path

    def problem(path: str) -> str | None:
        return stored.problem(path) if stored is not None else None

    pictures = Pictures()
    out: list[str] = []
    refused: list[tuple[str, str]] = []
    for kept, *copies in groups:
        kept_problem = problem(kept.path)
        if kept_problem is not None:
            refused.append((kept.path, f"kept, but it {kept_problem}: its copies are not listed"))
            refused += [(m.path, f"not listed: the file kept, {kept.path}, {kept_problem}") for m in copies]
            continue
        for m in copies:
            reason = problem(m.path)
            why = f"it {reason}" if reason is not None else pictures.differs(here(kept.path), here(m.path))
            if why is None:
                out.append(here(m.path))
            else:
                refused.append((m.path, f"not listed: {why}"))
    return out, refused
