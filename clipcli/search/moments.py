"""Moments, not frames: ``rank``'s hits among a video's sampled frames merged into moments, so that
the top k are k different moments, not k frames of one scene.

Around each best frame not yet taken, a moment grows to the frames next to it in time (no further apart
than 1.5 sampling steps: the video's smallest gap between frames among the hits) that score within
:data:`MARGIN` of that best frame. A moment is named as a W3C media fragment of its span,
``clip.mp4#t=4.000,8.000`` (a player opens it there), and scored by its best frame, whose time it keeps.
Images pass through as they are. Ranking asks for :func:`candidates` frames for ``k`` moments.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from clipcli.images.video import frame_path, split_frame
from clipcli.search.rank import Hit

MARGIN = 0.05  # cosine similarity: a frame this much below a moment's best still belongs to it
ADJACENT = 1.5  # frames at most this many sampling steps apart are next to each other


@dataclass(frozen=True)
class Moment:
    path: str  # the video (or the image)
    score: float  # the best frame's
    start: float | None = None  # seconds; None for an image
    end: float | None = None
    t: float | None = None  # the best frame's time
    frames: int = 1

    @property
    def name(self) -> str:
        """The video with the moment's span as a media fragment (``clip.mp4#t=4.000,8.000``); an image's path."""
        if self.start is None or self.end is None:
            return self.path
        return f"{self.path}#t={self.start:.3f},{self.end:.3f}"

    @property
    def row(self) -> str:
        """The row of its best frame (``clip.mp4#t=6.000``); an image's path."""
        return self.path if self.t is None else frame_path(self.path, self.t)

    def record(self) -> dict[str, object]:
        return {"path": self.path, "start": self.start, "end": self.end, "score": self.score, "t": self.t}


def holds(moment: Moment, row: str) -> bool:
    """Whether ``row`` (an image's path, or a frame's ``clip.mp4#t=5.000``) is within ``moment``."""
    frame = split_frame(row)
    if frame is None or moment.start is None or moment.end is None:
        return moment.start is None and moment.path == row
    return moment.path == frame[0] and moment.start <= frame[1] <= moment.end


def candidates(k: int, raw_frames: bool = False) -> int:
    """How many frames to rank for ``k`` moments (a scene's frames crowd the top of the frame ranking);
    ``k`` with ``raw_frames``."""
    return k if raw_frames else k * 10 + 50


def moment_hits(hits: Sequence[Hit], k: int) -> list[Hit]:
    """The ``k`` best moments of ranked hits, as hits named by their span (``clip.mp4#t=4.000,8.000``);
    hits that hold no video frame come back as they were, the first ``k``."""
    if not any(split_frame(h.name) for h in hits):
        return list(hits[:k])
    return [Hit(m.score, m.name) for m in moments([(h.name, h.score) for h in hits])[:k]]


def moments(hits: Sequence[tuple[str, float]], margin: float = MARGIN) -> list[Moment]:
    """Ranked hits (``(path, score)``, frames named ``clip.mp4#t=12.000``) as moments, best first; an
    image's hit is a moment of its own."""
    out: list[Moment] = []
    videos: dict[str, list[tuple[float, float]]] = {}
    for path, score in hits:
        frame = split_frame(path)
        if frame is None:
            out.append(Moment(path, score))
        else:
            videos.setdefault(frame[0], []).append((frame[1], score))
    for video, frames in videos.items():
        out.extend(_video_moments(video, sorted(frames), margin))
    out.sort(key=lambda m: (-m.score, m.path, m.start or 0.0))
    return out


def _video_moments(video: str, frames: list[tuple[float, float]], margin: float) -> list[Moment]:
    """One video's frames (``(t, score)``, in time order) grown into moments around their best frames."""
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(frames) if b[0] > a[0]]
    reach = min(gaps) * ADJACENT if gaps else 0.0
    taken = [False] * len(frames)
    found: list[Moment] = []
    for best in sorted(range(len(frames)), key=lambda i: -frames[i][1]):
        if taken[best]:
            continue
        t, score = frames[best]
        lo = hi = best
        while lo > 0 and _joins(frames, taken, lo - 1, lo, score - margin, reach):
            lo -= 1
        while hi + 1 < len(frames) and _joins(frames, taken, hi + 1, hi, score - margin, reach):
            hi += 1
        for i in range(lo, hi + 1):
            taken[i] = True
        found.append(Moment(video, score, frames[lo][0], frames[hi][0], t, hi - lo + 1))
    return found


def _joins(frames: list[tuple[float, float]], taken: list[bool], i: int, near: int, floor: float, reach: float) -> bool:
    return not taken[i] and frames[i][1] >= floor and abs(frames[i][0] - frames[near][0]) <= reach + 1e-9
