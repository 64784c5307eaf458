"""Decoding a video's frames (PyAV): what discovery learns of a video (:class:`VideoIndex`), readers
that decode forward from a keyframe without decoding what no kept frame needs, and :class:`FramePasses`,
which lets the decoding threads share that work.

A video whose keyframes are far apart (x264's default is one every 250 frames) makes every frame a long
way from its keyframe: two threads asked for two frames of one stretch would each decode it. Instead a
thread asked for a frame decodes the frames the video is sampled at from there to the next keyframe in
one pass, for the threads that will ask for them; a thread asked for a frame another thread is decoding
takes the next stretch no one has claimed, then collects its own frame. The stretches of a video are
so decoded side by side, each once.

A decode that makes no progress for :data:`STALL_SECONDS` is abandoned with a reason, as is an open or
a read that waits as long for data.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.images.decode import require_regular_file
from clipcli.images.refs import FileStat

if TYPE_CHECKING:
    from PIL import Image

STALL_SECONDS = 30.0  # a decode (or a read) that yields nothing new for this long is abandoned
PREFETCH = 16  # frames of a video a thread decodes ahead for others, at most (a stretch taken over)


def load_av() -> Any:
    """PyAV, imported the first time a video is met (a run over photos never imports it)."""
    import importlib

    return importlib.import_module("av")


@dataclass
class VideoIndex:
    """What discovery learns of a video from its packets: times in seconds from its first frame."""

    stat: FileStat
    width: int
    height: int
    frames: list[float]  # presentation times of its frames, sorted
    keys: list[float]  # the keyframes' times, sorted
    origin: float  # the first frame's time in the stream's own clock
    damage: str | None = None  # where and why reading stopped before the end, for a damaged file

    @cached_property
    def step(self) -> float:
        """The usual time between frames (a 25 fps guess for a video of one frame)."""
        gaps = sorted(b - a for a, b in zip(self.frames, self.frames[1:], strict=False) if b > a)
        return gaps[len(gaps) // 2] if gaps else 0.04

    @property
    def end(self) -> float:
        return (self.frames[-1] + self.step) if self.frames else 0.0

    @property
    def slack(self) -> float:
        """How far before a sampled time its frame may be: a sampled time is rounded to the millisecond
        (``12.000``), so a frame half a millisecond before it is the one at that time, and no earlier
        one is (half a step before, as this once was, took the frame before the time wanted, seconds
        before it where a variable frame rate leaves gaps)."""
        return min(self.step / 2, 0.0006)

    @cached_property
    def _keyset(self) -> frozenset[float]:
        return frozenset(self.keys)

    def keyframe_at(self, want: float) -> float | None:
        """The time of the frame given for ``want`` seconds (the first at ``want - slack`` or later, see
        :meth:`_Reader.frame_at`) when that frame is a keyframe, else None."""
        i = bisect.bisect_left(self.frames, want - self.slack)
        return self.frames[i] if i < len(self.frames) and self.frames[i] in self._keyset else None


class VideoError(ValueError):
    """A video that cannot be read, with the reason."""


def video_stream(container: Any) -> Any:
    av = load_av()
    attached = av.stream.Disposition.attached_pic
    streams = [s for s in container.streams.video if not (s.disposition & attached)]
    if not streams:
        raise VideoError("no video stream (audio only?)")
    stream = streams[0]
    if stream.codec_context is None:
        name = getattr(stream.codec, "name", None) if hasattr(stream, "codec") else None
        raise VideoError(f"unknown video codec{f' ({name})' if name else ''}: FFmpeg has no decoder for it")
    return stream


def open_video(file: Path) -> Any:
    require_regular_file(file)
    if os.stat(file).st_size == 0:
        raise VideoError("empty file (0 bytes)")
    return load_av().open(str(file), timeout=STALL_SECONDS)


def seconds(packet_or_frame: Any, time_base: Any) -> float | None:
    """A packet's or frame's time in seconds: ``when * time_base`` rounded once, as ``float(Fraction)``
    would (integer true division is correctly rounded), without a Fraction per packet."""
    when = packet_or_frame.pts if packet_or_frame.pts is not None else packet_or_frame.dts
    return None if when is None else when * time_base.numerator / time_base.denominator


def reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return str(text).split("\n")[0].strip() or type(e).__name__


def decoded_frames(container: Any, stream: Any, target: Callable[[], float] | None = None, slack: float = 0.0) -> Any:
    """Decoded frames of ``stream`` from where ``container`` stands; frames no other frame needs are not
    decoded while their time (in the stream's clock) is well before ``target()``, the frame wanted now
    (a packet's time is known before it is decoded; "well": more than the decoder's reordering delay).
    When the frame wanted is a keyframe, the decoder gives it up at once (it is drained, not fed the
    frames after it first); should more frames be asked for, decoding starts again at that keyframe.
    Stops with a reason when nothing new comes for :data:`STALL_SECONDS`."""
    av = load_av()
    ctx = stream.codec_context
    tb = stream.time_base
    last = time.monotonic()
    frame_time = _frame_time(stream)
    drained = None  # the keyframe last drained at: started again from it, decoding goes on past it
    try:
        for packet in container.demux(stream):
            t = seconds(packet, tb)
            if target is not None:
                near = t is None or t >= target() - ((ctx.has_b_frames or 0) + 2) * frame_time
                ctx.skip_frame = "DEFAULT" if near else "NONREF"
            for frame in ctx.decode(packet):
                last = time.monotonic()
                yield frame
            wanted = target is not None and packet.is_keyframe and t is not None and abs(t - target()) <= slack
            if wanted and packet.pts != drained:
                # (a keyframe the container marks discarded, as a cut's edit list does, gives no frame when
                # drained: were it drained each time it came again, this would go round for ever)
                drained = packet.pts
                yield from ctx.decode(None)
                ctx.flush_buffers()  # asked for more: from this keyframe again
                container.seek(packet.pts, stream=stream, backward=True, any_frame=False)
                continue
            if time.monotonic() - last > STALL_SECONDS:
                raise VideoError(f"decoding made no progress for {STALL_SECONDS:g} s")
    except av.error.FFmpegError as e:
        raise VideoError(reason(e)) from None


def limit_frames(stream: Any, max_pixels: int | None, options: dict[str, str]) -> None:
    """Open ``stream``'s decoder with ``options``, and with FFmpeg's own bound on a frame's pixels: a
    stream whose frames grow past its header's size mid-way (each MJPEG frame declares its own) is
    refused by the decoder before a frame is allocated, as the header is before any frame."""
    bound = {"max_pixels": str(max_pixels)} if max_pixels is not None and max_pixels < 2**31 - 1 else {}
    stream.codec_context.options = {**options, **bound}


def _frame_time(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return float(1 / rate) if rate else 0.1


@dataclass
class _Reader:
    """One open video and where its decoding stands (the time of the last frame it gave)."""

    container: Any
    stream: Any
    stat: FileStat
    max_pixels: int | None = None  # the bound its decoder was opened with (see limit_frames)
    at: float = -math.inf  # the time of the last frame given (from the video's first frame)
    frames: Any = None  # the decoded frames from here on (see decoded_frames)
    target: float = 0.0  # the time wanted now, in the stream's clock

    def frame_at(self, index: VideoIndex, want: float) -> Any:
        """The first frame at ``want`` seconds or later, from the last keyframe before it (or onward from
        here, when this reader already stands past that keyframe)."""
        k = bisect.bisect_right(index.keys, want + 1e-6) - 1
        key = index.keys[k] if k >= 0 else 0.0
        if not (key <= self.at < want) or self.frames is None:
            target = round((key + index.origin) / self.stream.time_base)  # the keyframe's own timestamp
            self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
            self.stream.codec_context.flush_buffers()
            self.frames = decoded_frames(self.container, self.stream, lambda: self.target, index.slack)
            self.at = -math.inf
        self.target = want + index.origin
        slack = index.slack
        for frame in self.frames:
            when = seconds(frame, self.stream.time_base)  # a drained frame has no time base of its own
            if when is None:
                continue
            t = when - index.origin
            self.at = t
            if t >= want - slack:
                return frame
        self.frames = None
        raise VideoError(f"no frame at {want:.3f} s: decoding stopped at {max(self.at, 0.0):.3f} s")


class _Readers:
    """Open readers, shared by the decoding threads: a thread takes the one that can decode forward to
    its frame (else opens one), and gives it back; at most :data:`LIMIT` stay open.

    A frame that is itself a keyframe is decoded by a reader of its own kind, one that skips the
    deblocking filter (as ``ffmpeg -skip_frame nokey -skip_loop_filter all`` makes thumbnails): about a
    sixth of an H.264 keyframe's decoding, for pixels within a grey level or so of the full decode once
    scaled to the model's input. Such a reader gives that one frame and decodes nothing from it, so no
    later frame is decoded from an unfiltered picture; the other frames are decoded exactly."""

    LIMIT = 8

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[tuple[str, bool, _Reader]] = []  # (file, keyframes only, reader)

    def take(
        self, file: Path, stat: FileStat, index: VideoIndex, want: float, keyframe: bool, max_pixels: int | None
    ) -> _Reader:
        k = bisect.bisect_right(index.keys, want + 1e-6) - 1
        key = index.keys[k] if k >= 0 else 0.0
        with self.lock:
            mine = [
                (i, r)
                for i, (f, kf, r) in enumerate(self.idle)
                if (f, kf, r.stat, r.max_pixels) == (str(file), keyframe, stat, max_pixels)
            ]
            ahead = [(i, r) for i, r in mine if key <= r.at < want]
            pick = max(ahead, key=lambda ir: ir[1].at) if ahead else (mine[0] if mine else None)
            if pick is not None:
                del self.idle[pick[0]]
                return pick[1]
        container = open_video(file)
        try:
            stream = video_stream(container)
            stream.codec_context.thread_count = 1  # the decoding threads share the cores among frames
            limit_frames(stream, max_pixels, {"skip_loop_filter": "all"} if keyframe else {})
        except BaseException:
            container.close()
            raise
        return _Reader(container, stream, stat, max_pixels)

    def forget(self, file: Path) -> None:
        with self.lock:
            for _, _, reader in [item for item in self.idle if item[0] == str(file)]:
                reader.container.close()
            self.idle = [item for item in self.idle if item[0] != str(file)]

    def give(self, file: Path, keyframe: bool, reader: _Reader) -> None:
        with self.lock:
            self.idle.append((str(file), keyframe, reader))
            while len(self.idle) > self.LIMIT:
                _, _, old = self.idle.pop(0)
                old.container.close()


READERS = _Readers()


def upright(image: Image.Image, rotation: int) -> Image.Image:
    """The frame as a player shows it: turned by its display matrix's angle (counter-clockwise)."""
    from PIL import Image

    turns = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, -180: Image.Transpose.ROTATE_180}
    turns[-90] = turns[270] = Image.Transpose.ROTATE_270
    turn = turns.get(rotation)
    return image.transpose(turn) if turn is not None else image


def frame_image(frame: Any, draft_size: int | None) -> Image.Image:
    """The frame in RGB; with ``draft_size``, scaled down as a JPEG photo is drafted (by 1/2, 1/4 or 1/8,
    the most that leaves ``draft_size`` pixels on the shorter side), by FFmpeg as it converts, averaging."""
    w, h = frame.width, frame.height
    scale = 1
    while draft_size and scale < 8 and min(w, h) // (scale * 2) >= draft_size:
        scale *= 2
    from PIL import Image

    small = {} if scale == 1 else {"width": w // scale, "height": h // scale, "interpolation": "AREA"}
    plane = frame.reformat(format="rgb24", **small).planes[0]
    if plane.line_size < 0:  # a bottom-up picture (raw RGB in an AVI): PyAV turns it the right way up
        return frame.to_image(**small)
    # one copy, rows read at the plane's stride (PyAV's to_image copies it three times, a row at a time)
    return Image.frombytes("RGB", (plane.width, plane.height), plane, "raw", "RGB", plane.line_size, 1)


Picture = tuple["Image.Image", tuple[int, int]]  # a frame upright in RGB, and its size as shown


@dataclass
class _Video:
    """One video's frames between the decoding threads."""

    wanted: list[float] = field(default_factory=list)  # sampled times no pass has claimed, sorted
    busy: set[float] = field(default_factory=set)  # times a pass is decoding
    ready: dict[float, Picture | BaseException] = field(default_factory=dict)  # decoded, not yet collected
    told: bool = False  # whether ``wanted`` was filled (once: a time collected is not wanted again)


class FramePasses:
    """The frames of the videos being decoded, shared by the decoding threads (see the module's text)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.videos: dict[tuple[str, FileStat, int | None], _Video] = {}

    def expect(self, file: Path, stat: FileStat, times: Sequence[float], draft_size: int | None) -> None:
        """The times ``file`` is sampled at (as discovery found them), for passes to decode ahead; the
        first telling counts."""
        with self.changed:
            video = self.videos.setdefault((str(file), stat, draft_size), _Video())
            if not video.told:
                video.wanted, video.told = sorted(set(times) - video.busy - set(video.ready)), True

    def forget(self, file: Path) -> None:
        with self.changed:
            for key in [k for k in self.videos if k[0] == str(file)]:
                del self.videos[key]

    def picture(
        self, file: Path, index: VideoIndex, want: float, draft_size: int | None, max_pixels: int | None = None
    ) -> Picture:
        """The frame at ``want`` seconds: decoded by this thread's pass (with the sampled frames after it
        up to the next keyframe), or by another's while this one decodes a stretch no pass has claimed."""
        with self.changed:
            video = self.videos.setdefault((str(file), index.stat, draft_size), _Video())
            if want in video.ready:
                return _collect(video.ready.pop(want))
            if want in video.busy:
                ahead = [t for t in video.wanted if _key(index, t) != _key(index, want)]
                claim = self._claim(video, index, ahead[0]) if ahead and len(video.ready) < PREFETCH else []
            else:
                claim = self._claim(video, index, want)
        if claim:
            self._decode(file, index, video, claim, draft_size, max_pixels)
        with self.changed:
            while want not in video.ready:  # a pass publishes each time it claimed, picture or error
                self.changed.wait()
            return _collect(video.ready.pop(want))

    def _claim(self, video: _Video, index: VideoIndex, first: float) -> list[float]:
        """``first`` and the sampled times after it before the next keyframe, now this thread's to decode."""
        nxt = bisect.bisect_right(index.keys, first + 1e-6)
        end = index.keys[nxt] if nxt < len(index.keys) else math.inf
        at = bisect.bisect_left(video.wanted, first)
        claim = [first, *(t for t in video.wanted[at : at + PREFETCH] if first < t < end)]
        video.wanted = [t for t in video.wanted if t not in claim]
        video.busy.update(claim)
        return claim

    def _decode(
        self, file: Path, index: VideoIndex, video: _Video, claim: list[float], draft: int | None, limit: int | None
    ) -> None:
        done = 0
        readers: dict[bool, _Reader] = {}  # by kind: keyframes only (see _Readers), or any frame
        try:
            for t in claim:
                key = index.keyframe_at(t)
                kind = key is not None
                if kind not in readers:
                    readers[kind] = READERS.take(file, index.stat, index, t, kind, limit)
                frame = readers[kind].frame_at(index, t if key is None else key)
                rotation = int(frame.rotation or 0)
                turned = rotation % 180 == 90  # as upright turns it: an angle not of quarter turns is not turned
                size = (frame.height, frame.width) if turned else (frame.width, frame.height)
                self._publish(video, t, (upright(frame_image(frame, draft), rotation), size))
                done += 1
        except Exception as e:
            if (
                isinstance(e, VideoError)
                and limit is not None
                and str(e) in ("Invalid argument", "Cannot allocate memory")
            ):
                e = VideoError(  # what FFmpeg answers for a frame over max_pixels (see limit_frames)
                    f"the decoder refused a frame ({e}): larger than the limit of {limit / 1e6:.4g} "
                    "Mpx (raise --max-megapixels), or damaged"
                )
            for reader in readers.values():
                reader.container.close()
            readers.clear()
            for t in claim[done:]:
                self._publish(video, t, e)
        finally:
            for kind, reader in readers.items():
                READERS.give(file, kind, reader)
            for t in claim[done:]:  # an interruption (KeyboardInterrupt) leaves no thread waiting
                if t in video.busy:
                    self._publish(video, t, VideoError("interrupted"))

    def _publish(self, video: _Video, t: float, got: Picture | BaseException) -> None:
        with self.changed:
            video.busy.discard(t)
            video.ready[t] = got
            self.changed.notify_all()


def _key(index: VideoIndex, t: float) -> int:
    return bisect.bisect_right(index.keys, t + 1e-6)


def _collect(got: Picture | BaseException) -> Picture:
    if isinstance(got, VideoError | OSError):
        raise type(got)(*got.args)
    if isinstance(got, BaseException):
        raise VideoError(reason(got))
    return got


PASSES = FramePasses()
