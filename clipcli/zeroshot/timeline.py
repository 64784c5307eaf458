"""A video's timeline from its frames' predictions: adjacent frames of one top label merged into a
segment (``path, start, end, label, score``), what ``classify VIDEO`` writes in place of a row per frame.

A segment runs from its first frame's time to the time of the first frame of the next segment (the
last one to where the video's frames end), so the segments of a video tile it; its score is the mean
probability of its label over its frames. An image among the inputs of such a run is a segment of its
own with no times.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clipcli.images.video import split_frame, video_end

if TYPE_CHECKING:
    import pyarrow as pa

TIMELINE_COLUMNS = ("path", "start", "end", "label", "score")


def timeline_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("start", pa.float64()),
            ("end", pa.float64()),
            ("label", pa.string()),
            ("score", pa.float64()),
        ]
    )


@dataclass(frozen=True)
class Segment:
    path: str  # the video's path (an image's, for an image)
    start: float | None  # seconds; None for an image
    end: float | None
    label: str
    score: float
    frames: int = 1

    def row(self) -> dict[str, Any]:
        return {"path": self.path, "start": self.start, "end": self.end, "label": self.label, "score": self.score}


@dataclass
class Timeline:
    """Each image's top label in input order in (:meth:`add`), segments out as each video's frames end."""

    video: str | None = None
    frames: list[tuple[float, str, float]] = field(default_factory=list)  # (t, top label, its score)

    def add(self, path: str, labels: Sequence[str], scores: Sequence[float]) -> Iterator[Segment]:
        """The segments that ``path`` (a frame, ``clip.mp4#t=4.000``, or an image) closes, given its labels
        best first: a frame counts with its top label; an image is a segment of its own for each label
        (as many as ``--top-k`` asked for, as a run without videos gives)."""
        frame = split_frame(path)
        if frame is None or frame[0] != self.video:
            yield from self.close()
        if frame is None:
            yield from (Segment(path, None, None, label, score) for label, score in zip(labels, scores, strict=True))
            return
        self.video = frame[0]
        self.frames.append((frame[1], labels[0], scores[0]))

    def close(self) -> Iterator[Segment]:
        """The segments of the video in hand."""
        if self.video is not None and self.frames:
            yield from segments(self.video, self.frames, video_end(self.video))
        self.video, self.frames = None, []


def segments(video: str, frames: list[tuple[float, str, float]], end: float | None = None) -> list[Segment]:
    """Adjacent frames (``(t, label, score)``, in time order) of one label as one segment each; the last
    ends at ``end`` (the video's), else a usual step after its last frame."""
    frames = sorted(frames)
    gaps = sorted(b[0] - a[0] for a, b in itertools.pairwise(frames) if b[0] > a[0])
    step = gaps[len(gaps) // 2] if gaps else 0.0
    out: list[Segment] = []
    run: list[tuple[float, str, float]] = []
    for frame in [*frames, None]:
        if run and (frame is None or frame[1] != run[0][1]):
            last = run[-1][0] + step if end is None or end <= run[-1][0] else end
            stop = frame[0] if frame is not None else last
            score = sum(s for _, _, s in run) / len(run)
            out.append(Segment(video, run[0][0], round(stop, 3), run[0][1], score, len(run)))
            run = []
        if frame is not None:
            run.append(frame)
    return out
