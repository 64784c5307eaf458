"""Videos as containers of frames (PyAV, the ``video`` extra): a video is expanded into the frames it
is sampled at (``clip.mp4#t=12.000``: every ``--every`` seconds, or at each change of scene), and each
frame is decoded by the decoding threads like a photo, upright, under the same pixel limit.

Nothing is decoded that is thrown away. Discovery reads the video's packets once without decoding them
(:func:`probe`): where the keyframes are, where the frames really end (a damaged file, a header whose
duration lies). A frame is then decoded from the last keyframe before it, or, by an open reader already
past that keyframe, onward from where it stopped, so frames close together share the work; on the way
to it the frames no other frame refers to (B-frames, mostly) are not decoded at all. Either way the
frame found is the one a player shows at ``t``: the first whose time is ``t`` or later. The decoding
itself, and how the decoding threads share it, is :mod:`clipcli.images.video_decode`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipcli.images.decode import ImageTooLarge
from clipcli.images.limits import DEFAULT_MAX_PIXELS
from clipcli.images.refs import ContainerOptions, Decoded, FileStat, ImageRef, Skipped
from clipcli.images.video_decode import (
    PASSES,
    READERS,
    STALL_SECONDS,
    VideoError,
    VideoIndex,
    decoded_frames,
    limit_frames,
    load_av,
    open_video,
    reason,
    seconds,
    video_stream,
)

EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})
# --frames scene: a frame is kept when its 32x32 grey thumbnail differs from the last kept one's by more
# than --scene-threshold on average (ContainerOptions.scene_threshold, a fraction of the grey scale:
# 0.08 is 20 levels of 255), looking at one frame in every SCENE_PROBE seconds at most; the first frame
# is always kept.
SCENE_SIDE = 32
SCENE_PROBE = 0.25
NEEDS_EXTRA = "a video: reading videos needs the video extra (PyAV): pip install 'clipcli[video]'"


def probe(file: Path) -> VideoIndex:
    """Read a video's packets (not decoding them): its frames' times and keyframes, and where a damaged
    file stops. Raises :class:`VideoError` (or OSError) for a file that holds no readable video."""
    av = load_av()
    st = os.stat(file)
    frames: list[float] = []
    keys: list[float] = []
    damage = None
    try:
        with open_video(file) as container:
            stream = video_stream(container)
            width, height = stream.codec_context.width, stream.codec_context.height
            tb = stream.time_base
            stated = _stated_duration(container, stream)
            last_new, top, top_then = time.monotonic(), -math.inf, -math.inf
            try:
                for n, packet in enumerate(container.demux(stream)):
                    if n % 64 == 0:  # the clock is read once in 64 packets: progress is a later time
                        now = time.monotonic()
                        if top > top_then:
                            last_new, top_then = now, top
                        elif now - last_new > STALL_SECONDS:
                            raise VideoError(f"reading made no progress for {STALL_SECONDS:g} s")
                    t = seconds(packet, tb)
                    if t is None or packet.size == 0:
                        continue
                    frames.append(t)
                    if packet.is_keyframe:
                        keys.append(t)
                    top = max(top, t)
            except (av.error.FFmpegError, VideoError) as e:
                damage = reason(e)
    except av.error.FFmpegError as e:
        raise VideoError(f"not a readable video ({reason(e)})") from None
    if not frames:
        raise VideoError("no video frames" + (f" ({damage})" if damage else ""))
    frames.sort()
    origin = frames[0]
    index = VideoIndex(
        (st.st_size, st.st_mtime),
        width,
        height,
        [f - origin for f in frames],
        sorted(k - origin for k in keys),
        origin,
    )
    stop = f"{index.frames[-1]:.3f}"
    if damage:
        index.damage = f"damaged or truncated: reading stopped at {stop} s ({damage}); the frames before it are kept"
    elif stated is not None and stated > index.end + max(1.0, 2 * index.step):
        index.damage = (
            f"truncated, or its duration header is wrong: its frames stop at {stop} s of a stated {stated:.3f} s; "
            "the frames before are kept"
        )
    return index


def _stated_duration(container: Any, stream: Any) -> float | None:
    """The duration the video's header states (which a truncated file, or a lying header, outlasts)."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    return container.duration / 1_000_000 if container.duration else None


_INDEXES: OrderedDict[tuple[str, int, float], VideoIndex] = OrderedDict()
_INDEX_LOCK = threading.Lock()


def video_index(file: Path) -> VideoIndex:
    """:func:`probe`, remembered per file as it is now (the decoding threads ask for it once per frame)."""
    st = os.stat(file)
    key = (str(file), st.st_size, st.st_mtime)
    with _INDEX_LOCK:
        found = _INDEXES.get(key)
        if found is not None:
            _INDEXES.move_to_end(key)
            return found
    index = probe(file)
    with _INDEX_LOCK:
        _INDEXES[key] = index
        while len(_INDEXES) > 256:
            _INDEXES.popitem(last=False)
    return index


def every_times(index: VideoIndex, every: float) -> list[float]:
    """One time per ``every`` seconds that has a frame in it (from 0), the first frame's always."""
    steps = sorted({math.floor(f / every + 1e-9) for f in index.frames})  # by frame: a lying clock costs nothing
    return [round(k * every, 3) for k in steps]


def scene_times(file: Path, index: VideoIndex, threshold: float) -> tuple[list[float], str | None]:
    """The first frame, then each frame whose small grey picture differs from the last one kept by more
    than ``threshold`` on average, looked at no more often than every :data:`SCENE_PROBE` seconds; and,
    for a video whose decoding fails part way (a damaged frame), where and why it stopped (the scenes
    before are kept)."""
    import numpy as np

    if index.width * index.height > DEFAULT_MAX_PIXELS:
        raise ImageTooLarge(f"frames too large to look for scenes ({index.width}x{index.height})")
    kept: list[float] = []
    last: np.ndarray | None = None
    next_look, seen = -math.inf, 0.0
    with open_video(file) as container:
        stream = video_stream(container)
        stream.codec_context.thread_type = "AUTO"
        limit_frames(stream, DEFAULT_MAX_PIXELS, {})
        # the frames no other frame needs are not decoded where none is looked at (never drained: slack -1)
        try:
            for frame in decoded_frames(container, stream, lambda: next_look + index.origin, -1.0):  # noqa: B023
                when = seconds(frame, stream.time_base)
                seen = max(seen, when - index.origin) if when is not None else seen
                if when is None or when - index.origin < next_look:
                    continue
                t = when - index.origin
                next_look = t + SCENE_PROBE
                grey = frame.reformat(width=SCENE_SIDE, height=SCENE_SIDE, format="gray").to_ndarray()
                small = grey[:SCENE_SIDE, :SCENE_SIDE].astype(np.float32) / 255.0
                if last is None or float(np.abs(small - last).mean()) > threshold:
                    kept.append(round(max(t, 0.0), 3))
                    last = small
        except VideoError as e:
            if not kept:
                raise
            return kept, f"damaged: decoding stopped at {seen:.3f} s ({e}); the scenes before it are kept"
    return kept, None


def forget(file: Path) -> None:
    """Drop what is remembered of ``file`` (its packet index, its open readers): benchmarks start cold."""
    with _INDEX_LOCK:
        for key in [k for k in _INDEXES if k[0] == str(file)]:
            del _INDEXES[key]
    READERS.forget(file)
    PASSES.forget(file)


class Video:
    """The :class:`~clipcli.images.refs.Container` for videos."""

    def __init__(self) -> None:
        self.sampled: dict[tuple[str, FileStat], list[float]] = {}  # each video's times, as expanded
        self.listed: dict[str, FileStat] = {}  # each video's size and mtime when its frames were listed

    def expand(self, ref: ImageRef, options: ContainerOptions) -> tuple[list[ImageRef], list[Skipped]]:
        try:
            av = load_av()
        except ImportError:
            return [], [Skipped(ref.path, NEEDS_EXTRA)]
        try:
            index = video_index(ref.file)
            damage = index.damage
            if options.frames == "scene":
                times, damage = scene_times(ref.file, index, options.scene_threshold)
                damage = index.damage or damage
            else:
                times = every_times(index, options.every)
        except (OSError, ValueError, av.error.FFmpegError) as e:
            return [], [Skipped(ref.path, _expand_reason(e), read=True)]
        self.sampled[(str(ref.file), index.stat)] = times  # decoded ahead in passes (see FramePasses)
        self.listed[str(ref.file)] = index.stat
        members = [ImageRef(frame_path(ref.path, t), ref.file, f"t={t:.3f}") for t in times]
        return members, [Skipped(ref.path, damage, read=True)] if damage else []

    def decode(self, ref: ImageRef, draft_size: int | None, max_pixels: int | None) -> Decoded:
        av = load_av()
        want = _member_time(ref)
        try:
            index = video_index(ref.file)
            if self.listed.get(str(ref.file), index.stat) != index.stat:
                # another video now, whose frames are not at the times listed: none is taken from it (its
                # rows would carry its size and mtime, and every rerun would call them unchanged)
                raise VideoError("changed since its frames were listed; run again to embed it as it is now")
            if max_pixels is not None and index.width * index.height > max_pixels:
                raise ImageTooLarge(
                    f"frames too large ({index.width * index.height / 1e6:.4g} Mpx > limit "
                    f"{max_pixels / 1e6:.4g} Mpx; raise --max-megapixels)"
                )
            PASSES.expect(ref.file, index.stat, self.sampled.get((str(ref.file), index.stat), ()), draft_size)
            image, size = PASSES.picture(ref.file, index, want, draft_size, max_pixels)
        except av.error.FFmpegError as e:
            raise VideoError(f"cannot decode the frame at {want:.3f} s ({reason(e)})") from None
        return Decoded(image, size, index.stat, {"t": want})


def frame_path(video: str, t: float) -> str:
    """A video frame's row path, the inverse of :func:`split_frame`: ``("clip.mp4", 12.0)`` gives
    ``clip.mp4#t=12.000``."""
    return f"{video}#t={t:.3f}"


def split_frame(path: str) -> tuple[str, float] | None:
    """A video frame's row path as (the video's path, the frame's time): ``clip.mp4#t=12.000`` gives
    ``("clip.mp4", 12.0)``; None for any other path."""
    video, sep, when = path.rpartition("#t=")
    if not sep or os.path.splitext(video)[1].lower() not in EXTENSIONS:
        return None
    try:
        t = float(when)
    except ValueError:
        return None
    return (video, t) if math.isfinite(t) else None


def video_end(path: str) -> float | None:
    """Where the frames of the video at ``path`` end (seconds from its first frame), None if unknown."""
    try:
        return video_index(Path(path)).end
    except Exception:  # a video read before cannot be now: its timeline ends at its last frame
        return None


def has_frames(refs: Sequence[ImageRef]) -> bool:
    """Whether ``refs`` hold a video's frames (whose rows carry a time, ``t``)."""
    return any(ref.member is not None and ref.member.startswith("t=") for ref in refs)


def _expand_reason(e: BaseException) -> str:
    from clipcli.images.decode import describe_error

    return describe_error(e) if isinstance(e, OSError | ImageTooLarge) else reason(e)


def _member_time(ref: ImageRef) -> float:
    member = ref.member or ""
    try:
        if not member.startswith("t="):
            raise ValueError
        want = float(member[2:])
        if not math.isfinite(want) or want < 0:
            raise ValueError
    except ValueError:
        raise VideoError(f"not a time in the video: #{member} (expected #t=SECONDS)") from None
    return want


CONTAINER = Video()
