"""The local engine vs ``--engine ray`` on one machine (issue: embed and eval on a Ray cluster).

    python benchmarks/ray_embed.py [--photos 200] [--device cpu|cuda] [--precision auto|fp16|bf16|fp32]

All figures come from one run, so compare the ratios:
  whole process: ``clipcli embed DIR -o OUT/`` vs the same with ``--engine ray`` (which starts a Ray
      instance, its workers and the model actors: start-up included);
  steady state: images per second once the model is loaded (local) or once Ray and the actors are up
      (ray), both timed from the first batch written to the last, in this process;
  start-up: ray.init, and the time from submitting the pipeline to its first batch, reported apart.
Target: steady-state ray >= 0.8x local on the same cores. With ``--device cuda`` the actors are GPU actors
(one per GPU, decoding in CPU tasks) and the local engine runs on the GPU; ``--no-ray`` measures only the
local engine (for a machine without Ray: its per-GPU throughput, for the README's capacity plan).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import clipcli, cpu_model, random_checkpoint
from photos import make_photos

from clipcli.images.sources import ImageRef
from clipcli.models import LoadedModel, load_model


class Clock:
    """Times a run from its first batch to its last: the steady state, start-up left out."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.first_rows = 0
        self.rows = 0
        self.last = self.start

    def on_batch(self, n: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first, self.first_rows = now, n
        self.rows += n
        self.last = now

    def steady(self) -> float:
        if self.first is None or self.last <= self.first:
            return float("nan")
        return (self.rows - self.first_rows) / (self.last - self.first)


def local_steady(lm: LoadedModel, refs: list[ImageRef], out: Path, batch: int, part: int) -> Clock:
    from clipcli.engines.base import EmbedEvents, EmbedJob
    from clipcli.engines.local import LocalEngine
    from clipcli.images.decode import ImageOptions
    from clipcli.store.output import dataset_output

    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    job = EmbedJob(refs, dataset_output(f"{out}/"), images=ImageOptions(batch_size=batch), part_size=part)
    LocalEngine().embed(lm, job, EmbedEvents(on_batch=clock.on_batch))
    return clock


def ray_steady(
    lm: LoadedModel, spec_args: tuple[str, str, str], refs: list[ImageRef], out: Path, batch: int, part: int
) -> tuple[Clock, float]:
    """Steady state on Ray, and seconds from submitting the pipeline to its first batch (actors start)."""
    from clipcli.engines.base import EmbedEvents, EmbedJob
    from clipcli.engines.ray import RayEngine
    from clipcli.images.decode import ImageOptions
    from clipcli.models import ModelOptions
    from clipcli.store.output import dataset_output

    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    ready: list[float] = []

    def on_ready() -> None:
        ready.append(time.perf_counter())

    options, images = ModelOptions(*spec_args), ImageOptions(batch_size=batch)
    job = EmbedJob(refs, dataset_output(f"{out}/"), options, images, part_size=part)
    RayEngine().embed(lm, job, EmbedEvents(on_batch=clock.on_batch, on_ready=on_ready))
    first = (clock.first or time.perf_counter()) - ready[0]
    return clock, first


def model_only(lm: LoadedModel, batch: int, rounds: int = 5) -> float:
    """Images per second of the model's forward pass alone, on ready tensors (what one GPU or node can
    embed when decoding keeps up: the capacity plan's per-device figure)."""
    import torch

    from clipcli.zeroshot.encode import encode_pixels

    size = lm.image.size
    pixels = torch.randn(batch, 3, size, size)
    encode_pixels(lm, pixels)  # warm-up (cuDNN autotuning, allocator)
    start = time.perf_counter()
    for _ in range(rounds):
        encode_pixels(lm, pixels)  # returns on the CPU: synchronised
    return batch * rounds / (time.perf_counter() - start)


def decode_ms(photos: list[Path], lm: LoadedModel) -> float:
    """CPU milliseconds per photo to decode and resize it as clipcli does, on one thread."""
    from clipcli.images.decode import decode, resize_and_crop

    start = time.perf_counter()
    for p in photos:
        resize_and_crop(decode(p, lm.image.size)[0], lm.image)
    return (time.perf_counter() - start) / len(photos) * 1e3


def whole(command: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return time.perf_counter() - start


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:6.1f} img/s ({seconds:5.1f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description="clipcli embed: local engine vs --engine ray")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--part-size", type=int, default=32, help="rows per part (and per Ray actor call)")
    parser.add_argument("--no-ray", action="store_true", help="measure the local engine only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    ckpt = random_checkpoint("ViT-B/32", args.out)
    photos = make_photos(args.out / "photos", args.photos)
    folder = photos[0].parent
    refs = [ImageRef(str(p), p) for p in photos]
    cores = len(os.sched_getaffinity(0))
    lm = load_model(str(ckpt), args.device, args.precision)
    print(
        f"{len(photos)} photos (640x480 to 4000x3000), ViT-B/32-size random checkpoint, {lm.device} {lm.precision}, "
        f"batch {args.batch_size}; CPU: {cpu_model()}, {cores} cores"
    )
    if lm.device.type == "cuda":
        import torch

        print(f"GPU: {torch.cuda.get_device_name(lm.device)}")

    print(f"decode + resize, one core:            {decode_ms(photos[:60], lm):6.1f} ms per photo")
    print(f"model forward pass alone (b={args.batch_size}):   {model_only(lm, args.batch_size):6.1f} img/s")
    options = ["-m", str(ckpt)]
    options += [f"--{k}={v}" for k, v in (("device", args.device), ("precision", args.precision)) if v != "auto"]
    options += ["-b", str(args.batch_size), "--part-size", str(args.part_size)]
    local_s = whole(
        [*clipcli(), "embed", str(folder), *options, "-o", f"{args.out}/ray-local/"], args.out / "ray-local"
    )
    print(f"local engine, whole process:          {rate(len(photos), local_s)}")
    # Steady state is the marginal rate: the extra seconds that N more photos cost, start-up cancelling out.
    # (A rate taken after the first batch arrives overstates a pipeline whose workers run ahead of it.)
    doubled = make_photos(args.out / "photos-2x", 2 * len(photos))
    refs2 = [ImageRef(str(p), p) for p in doubled]
    local_steady(lm, refs[: args.batch_size], args.out / "ray-warm", args.batch_size, args.part_size)  # warm-up
    local_n = timed(lambda: local_steady(lm, refs, args.out / "ray-local-steady", args.batch_size, args.part_size))
    local_2n = timed(lambda: local_steady(lm, refs2, args.out / "ray-local-steady", args.batch_size, args.part_size))
    local = len(photos) / (local_2n - local_n)
    print(f"local engine, steady state:           {local:6.1f} img/s (marginal: {len(photos)} more photos)")
    if args.no_ray:
        return

    ray_s = whole(
        [*clipcli(), "embed", str(folder), *options, "-o", f"{args.out}/ray-ray/", "--engine", "ray"],
        args.out / "ray-ray",
    )
    print(f"--engine ray, whole process:          {rate(len(photos), ray_s)}")
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    init_s = time.perf_counter() - start
    try:
        spec = (str(ckpt), args.device, args.precision)
        started = time.perf_counter()
        steady_out = args.out / "ray-ray-steady"
        _, first_s = ray_steady(lm, spec, refs, steady_out, args.batch_size, args.part_size)
        ray_n = time.perf_counter() - started
        ray_2n = timed(lambda: ray_steady(lm, spec, refs2, steady_out, args.batch_size, args.part_size))
    finally:
        ray.shutdown()
    steady = len(photos) / (ray_2n - ray_n)
    print(f"--engine ray, steady state:           {steady:6.1f} img/s (marginal: {len(photos)} more photos)")
    print(
        f"start-up: ray.init {init_s:.1f} s; pipeline submitted to first batch {first_s:.1f} s "
        f"(actors start, load the model, embed their first batch); whole process {ray_s - local_s:+.1f} s vs local"
    )
    print(f"ratio ray / local, whole process: {local_s / ray_s:.2f}x")
    print(f"ratio ray / local, steady state:  {steady / local:.2f}x (target >= 0.8)")


if __name__ == "__main__":
    main()
