"""Small test videos written with PyAV from the bundled model's synthetic shapes (clipcli.training.synth):
by default a 20 s clip at 5 fps, 128x128, showing a green square, with a red circle from 4 s to 8 s and
a blue star from 12 s to 16 s. Encoders: libx264 (H.264) and libvpx-vp9 (VP9), both in PyAV's wheels;
MJPEG in AVI for the files the bad-video tests damage."""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from clipcli.training.synth import render

SCENES = ((4.0, 8.0, "red", "circle"), (12.0, 16.0, "blue", "star"))
FILLER = ("green", "square")
LABELS = ("a red circle", "a blue star", "a green square")

_CACHE: dict[tuple[str, str, int], Image.Image] = {}


def shape_picture(colour: str, shape: str, side: int) -> Image.Image:
    """One rendering of a shape, square, the same every time."""
    key = (colour, shape, side)
    if key not in _CACHE:
        rng = random.Random(f"{colour} {shape}")
        sample = render(rng, colour, shape, "grey")
        while min(sample.image.size) < 96:
            sample = render(rng, colour, shape, "grey")
        _CACHE[key] = sample.image.resize((side, side), Image.Resampling.BICUBIC)
    return _CACHE[key]


def picture_at(
    t: float, size: tuple[int, int], scenes: tuple[tuple[float, float, str, str], ...] = SCENES
) -> Image.Image:
    colour, shape = next(((c, s) for a, b, c, s in scenes if a <= t < b), FILLER)
    w, h = size
    side = min(w, h)
    canvas = Image.new("RGB", size, (128, 128, 128))
    canvas.paste(shape_picture(colour, shape, side), ((w - side) // 2, (h - side) // 2))
    return canvas


ENCODERS = {
    "h264": ("libx264", {"preset": "ultrafast", "tune": "zerolatency"}, "yuv420p"),
    "h264-b": ("libx264", {"preset": "veryfast", "bf": "3", "g": "25"}, "yuv420p"),
    "vp9": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "g": "20"}, "yuv420p"),
    "mjpeg": ("mjpeg", {}, "yuvj420p"),
}


def write_video(
    path: Path,
    codec: str = "h264",
    duration: float = 20.0,
    fps: int = 5,
    size: tuple[int, int] = (128, 128),
    rotation: int | None = None,
    times: list[float] | None = None,
    picture: object = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """A video of ``duration`` seconds; ``times`` (seconds) gives each frame's time for a variable frame
    rate; ``rotation`` sets the display matrix (counter-clockwise degrees); ``picture(t, size)`` draws
    each frame (default :func:`picture_at`)."""
    import av

    name, options, pix_fmt = ENCODERS[codec]
    draw = picture or picture_at
    frame_times = times if times is not None else [i / fps for i in range(round(duration * fps))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", container_options=container_options or {}) as out:
        stream = out.add_stream(name, rate=fps, options=options)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for t in frame_times:
            image = draw(t, size)  # type: ignore[operator]
            frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
            frame.pts = round(t * 1000)
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        samples = int(8000 * seconds)
        for start in range(0, samples, 1024):
            n = min(1024, samples - start)
            data = (np.sin(np.arange(start, start + n) / 10.0) * 0.1).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(data, format="fltp", layout="mono")
            frame.sample_rate = 8000
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path
