"""Video frames against decoding every frame, and against photos: what `--every` sampling costs.

Writes an H.264 video (moving pictures, x264 ``veryfast``, a keyframe every ``--keyint`` frames: 250 is
x264's default, 60 a streaming encoder's 2 s), then measures, in one run, side by side:

1. decoding cost (CPU seconds of this process, one thread) per sampled frame: clipcli's sampling every
   ``--every`` seconds (the packet scan included) against decoding every frame and keeping one in
   ``fps * every`` (60 at 30 fps, every 2 s), the same frames converted the same way in both;
2. runs through the embedding pipeline in this process (the decoding threads, the model, the default
   precision; no start-up): frames per second from the video against images per second from the same
   frames saved as JPEG photos of the same size, with the same model;
3. whole ``clipcli embed`` processes, as a user runs them (start-up, the model's loading and the Parquet
   output included): ``clipcli embed clip.mp4`` against ``clipcli embed photos/``, rows per second of wall
   time.

    python benchmarks/video.py --seconds 600 --height 1080 --keyint 60 250
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from common import clipcli, cpu_model, random_checkpoint


def make_video(path: Path, seconds: float, width: int, height: int, fps: int, keyint: int) -> Path:
    """Moving pictures (a textured background panning, a new one every 10 s) that x264 cannot skip."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "g": str(keyint)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        base = None
        for i in range(round(seconds * fps)):
            if i % (10 * fps) == 0:
                small = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
                base = np.kron(small, np.ones((16, 16, 1), np.uint8))
            assert base is not None
            shift = (i % (10 * fps)) * 2
            picture = np.ascontiguousarray(base[shift % 16 : shift % 16 + height, :width])
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def every_frame(path: Path, keep: int, draft: int) -> tuple[int, float]:
    """Decode every frame, keep one in ``keep`` (converted as clipcli converts): (kept, CPU seconds)."""
    import av

    from clipcli.images.video_decode import frame_image

    start = time.process_time()
    kept = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i % keep == 0:
                frame_image(frame, draft)
                kept += 1
    return kept, time.process_time() - start


def sampled(path: Path, every: float, draft: int) -> tuple[int, float]:
    """clipcli's sampling: discovery (the packet scan) and each frame decoded: (frames, CPU seconds)."""
    from clipcli.images import video
    from clipcli.images.refs import ContainerOptions
    from clipcli.images.sources import discover

    video.forget(path)
    start = time.process_time()
    refs, _ = discover([str(path)], containers=ContainerOptions(every=every))
    for ref in refs:
        video.CONTAINER.decode(ref, draft, None)
    return len(refs), time.process_time() - start


def whole_run(lm: object, inputs: list[str], every: float) -> tuple[int, float]:
    """Rows per second of the embedding pipeline (decoding threads and the model, as ``embed`` runs them)."""
    from clipcli.images import video
    from clipcli.images.refs import ContainerOptions
    from clipcli.images.sources import discover
    from clipcli.zeroshot.encode import iter_image_embeddings

    for name in inputs:
        video.forget(Path(name))
    start = time.perf_counter()
    refs, _ = discover(inputs, containers=ContainerOptions(every=every))
    n = sum(len(b.names) for b in iter_image_embeddings(lm, refs, 32, 0, False, True))  # type: ignore[arg-type]
    return n, time.perf_counter() - start


def whole_process(checkpoint: Path, inputs: list[str], every: float, out: Path, precision: str) -> float:
    """Wall seconds of one ``clipcli embed`` process over ``inputs`` into a new Parquet file."""
    out.unlink(missing_ok=True)  # a rerun into it would embed nothing (incremental)
    cmd = [*clipcli(), "embed", *inputs, "-m", str(checkpoint), "--precision", precision]
    start = time.perf_counter()
    subprocess.run([*cmd, "--every", f"{every:g}", "-o", str(out)], check=True, capture_output=True)
    return time.perf_counter() - start


def save_photos(path: Path, every: float, folder: Path) -> list[str]:
    """The sampled frames at full size as JPEG photos (quality 90)."""
    from clipcli.images import video
    from clipcli.images.refs import ContainerOptions
    from clipcli.images.sources import discover

    refs, _ = discover([str(path)], containers=ContainerOptions(every=every))
    names = []
    for i, ref in enumerate(refs):
        name = folder / f"frame{i:05d}.jpg"
        video.CONTAINER.decode(ref, None, None).image.save(name, quality=90)
        names.append(str(name))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--every", type=float, default=2.0)
    parser.add_argument("--keyint", type=int, nargs="+", default=[250, 60])
    parser.add_argument("--model", default="ViT-B/32", help="architecture of the random-weight checkpoint")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="whole runs of each, in turns")
    parser.add_argument("--skip-whole-run", action="store_true", help="decoding cost only")
    parser.add_argument("--skip-processes", action="store_true", help="no whole clipcli processes")
    parser.add_argument("--videos", type=Path, help="a folder to keep the videos in, and reuse them from")
    args = parser.parse_args()

    from clipcli.models import load_model

    width = args.height * 16 // 9
    keep = round(args.fps * args.every)
    print(f"CPU: {cpu_model()}; {args.seconds:g} s of {width}x{args.height} at {args.fps} fps, every {args.every:g} s")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = None if args.skip_whole_run else random_checkpoint(args.model, folder)
        lm = None if checkpoint is None else load_model(str(checkpoint), "cpu", args.precision)
        for keyint in args.keyint:
            clip = (args.videos or folder) / f"clip-{args.seconds:g}s-{args.height}p-g{keyint}.mp4"
            start = time.perf_counter()
            if not clip.exists():
                make_video(clip, args.seconds, width, args.height, args.fps, keyint)
            print(f"\nkeyframe every {keyint} frames (written in {time.perf_counter() - start:.0f} s)")
            n_all, cpu_all = every_frame(clip, keep, 224)
            n_s, cpu_s = sampled(clip, args.every, 224)
            per_all, per_s = cpu_all / n_all * 1000, cpu_s / n_s * 1000
            print(f"  every frame, one in {keep} kept: {n_all} frames, {per_all:.1f} ms of CPU per kept frame")
            print(f"  clipcli --every {args.every:g}:      {n_s} frames, {per_s:.1f} ms of CPU per frame")
            print(f"  decoding cost per sampled frame: {per_all / per_s:.1f}x lower")
            if lm is None:
                continue
            photos = folder / f"photos-g{keyint}"
            photos.mkdir()
            names = save_photos(clip, args.every, photos)
            video_rates, photo_rates, video_walls, photo_walls = [], [], [], []
            for _ in range(args.rounds):  # in turns, so that both see the same load
                n_v, t_v = whole_run(lm, [str(clip)], args.every)
                n_p, t_p = whole_run(lm, names, args.every)
                video_rates.append(n_v / t_v)
                photo_rates.append(n_p / t_p)
            for _ in range(0 if args.skip_processes else args.rounds):
                out = folder / "rows.parquet"
                video_walls.append(whole_process(checkpoint, [str(clip)], args.every, out, args.precision))
                photo_walls.append(whole_process(checkpoint, [str(photos)], args.every, out, args.precision))
            v, p = statistics.median(video_rates), statistics.median(photo_rates)
            rates = f"video {v:.1f} frames/s, photos {p:.1f} images/s (medians of {args.rounds})"
            print(f"  pipeline in this process, {args.model} at {lm.precision}: {rates}")
            print(f"    frames/s over images/s: {v / p:.3f} (each round: {_ratios(video_rates, photo_rates)})")
            if video_walls:
                v, p = n_v / statistics.median(video_walls), n_p / statistics.median(photo_walls)
                rates = f"video {v:.1f} frames/s, photos {p:.1f} images/s (medians of {args.rounds})"
                print(f"  whole clipcli embed processes: {rates}")
                each = _ratios([n_v / w for w in video_walls], [n_p / w for w in photo_walls])
                print(f"    frames/s over images/s: {v / p:.3f} (each round: {each})")


def _ratios(video: list[float], photos: list[float]) -> str:
    return " ".join(f"{a / b:.3f}" for a, b in zip(video, photos, strict=True))


if __name__ == "__main__":
    main()
