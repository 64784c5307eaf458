"""GPU throughput with GPU decoding (issue 16): one short run on one GPU machine.

    PYTHONPATH=. python benchmarks/gpu.py                # on a CUDA machine: a few minutes
    PYTHONPATH=. python benchmarks/gpu.py --smoke        # tiny sizes on the CPU: checks the script itself

It writes 2,000 photo-like JPEGs (VGA to 12 MP, a tenth of them EXIF-rotated and a few progressive) on
local disk, builds random-weight ViT-B/32 and ViT-L/14 checkpoints in OpenAI's fp16 layout (compute cost
does not depend on the weights' values), and for each model and batch size reports images per second:

  (a) the forward pass alone on ready tensors on the GPU (fp16);
  (b) clipcli's embed (library API: decode, model, Parquet writes) with CPU decoding (Pillow threads);
  (c) the same with GPU decoding (nvJPEG, resize and normalise on the GPU);
  (d) the GPU decoding pipeline alone, no model (what bounds (c) when it falls short);
and once per model a whole `clipcli embed --decode gpu` process (start-up and model load included), plus
parity: the cosine between each photo's GPU-decoded and CPU-decoded embedding (min, 1st percentile,
median). Targets on one H200: (c) >= 5,000 img/s for ViT-B/32, (c) >= 0.85 x (a) for ViT-L/14, parity
min >= 0.999. The JSON summary goes to stdout, and to $OUT/gpu.json when OUT is set; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).parent))
from common import clipcli, random_checkpoint

from clipcli.models.families.openai import ARCHITECTURES, Architecture

# VGA to 12 MP, as benchmarks/photos.py: phones, compacts and web-sized copies.
SIZES = [(640, 480), (1280, 960), (1920, 1080), (2048, 1536), (3264, 2448), (4000, 3000)]
SMOKE_SIZES = [(640, 480), (480, 640), (800, 600)]
ROTATED_EVERY = 10  # EXIF orientation 6 (a portrait shot held sideways)
PROGRESSIVE_EVERY = 33
# OpenAI's ViT-L/14 shape (clip.model.build_model on ViT-L-14.pt).
ARCHITECTURES.setdefault(
    "ViT-L/14",
    Architecture(768, 224, 24, 1024, 14, transformer_width=768, transformer_heads=12, transformer_layers=12),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- photos ---------------------------------------------------------------------------------------


_BASES: dict[tuple[int, int], list[Image.Image]] = {}


def _bases(size: tuple[int, int]) -> list[Image.Image]:
    """Two smooth, textured colour fields per size, made once per worker process and varied per photo."""
    if size not in _BASES:
        rng = np.random.default_rng(size[0] * 7 + size[1])
        w, h = size
        made = []
        for _ in range(2):
            coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            field = Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC)
            grain = Image.fromarray(rng.integers(0, 40, (h // 4, w // 4, 3), dtype=np.uint8), "RGB").resize((w, h))
            made.append(Image.blend(field, grain, 0.25).filter(ImageFilter.DETAIL))
        _BASES[size] = made
    return _BASES[size]


def _write_photo(job: tuple[int, str, tuple[int, int]]) -> int:
    """One unique photo: a base shifted and re-toned per index, so no two files share their pixels."""
    from PIL import ImageChops

    i, path, size = job
    rng = np.random.default_rng(i)
    base = _bases(size)[i % 2]
    image = ImageChops.offset(base, int(rng.integers(0, size[0])), int(rng.integers(0, size[1])))
    gains = rng.uniform(0.7, 1.2, 3)
    lut = [min(255, int(v * g)) for g in gains for v in range(256)]
    image = image.point(lut)
    save: dict[str, Any] = {"quality": 90}
    if i % ROTATED_EVERY == 3:
        exif = Image.Exif()
        exif[0x0112] = 6
        save["exif"] = exif.tobytes()
    if i % PROGRESSIVE_EVERY == 5:
        save["progressive"] = True
    image.save(path, "JPEG", **save)
    return os.path.getsize(path)


def make_photos(folder: Path, count: int, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, str(folder / f"photo{i:05d}.jpg"), sizes[i % len(sizes)]) for i in range(count)]
    todo = [job for job in jobs if not os.path.exists(job[1])]
    start = time.perf_counter()
    if todo:
        with Pool(os.cpu_count() or 1) as pool:
            pool.map(_write_photo, todo, chunksize=8)
    nbytes = [os.path.getsize(path) for _, path, _ in jobs]
    return {
        "count": count,
        "folder": str(folder),
        "written_s": round(time.perf_counter() - start, 1),
        "megapixels_mean": round(statistics.mean(w * h for _, _, (w, h) in jobs) / 1e6, 2),
        "megabytes_mean": round(statistics.mean(nbytes) / 1e6, 2),
        "rotated": sum(1 for i, _, _ in jobs if i % ROTATED_EVERY == 3),
        "progressive": sum(1 for i, _, _ in jobs if i % PROGRESSIVE_EVERY == 5),
    }


# -- measurements ---------------------------------------------------------------------------------


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(lm: Any, batch_size: int, seconds: float) -> float:
    """(a): encode_pixels on a ready batch on the device, as many times as fit in ``seconds``."""
    import torch

    from clipcli.zeroshot.encode import encode_pixels

    pixels = torch.randn(batch_size, 3, lm.input_resolution, lm.input_resolution, device=lm.device)
    for _ in range(2):
        encode_pixels(lm, pixels)
    sync(lm.device)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 3 * batch_size:
        encode_pixels(lm, pixels)
        done += batch_size
    sync(lm.device)
    return done / (time.perf_counter() - start)


@contextmanager
def device_decoding_on_cpu(lm: Any) -> Iterator[None]:
    """--smoke only: let the GPU pipeline run on the CPU (``--decode gpu`` refuses a CPU model), so the
    smoke run goes through the same embed_images code as the GPU run."""
    if lm.device.type == "cuda":
        yield
        return
    import clipcli.zeroshot.encode as encode

    saved = encode.use_device_decoding
    encode.use_device_decoding = lambda choice, device: choice == "gpu"  # type: ignore[assignment]
    try:
        yield
    finally:
        encode.use_device_decoding = saved


def embed_rate(lm: Any, photos: list[Path], out: Path, batch_size: int, decode: str) -> float:
    """(b) or (c): clipcli's embed_images into a Parquet directory, as `clipcli embed -o DIR/` runs it."""
    from clipcli.engines.base import EmbedJob
    from clipcli.engines.local import LocalEngine
    from clipcli.images.decode import ImageOptions
    from clipcli.images.sources import ImageRef
    from clipcli.store.output import dataset_output

    refs = [ImageRef(str(p), p) for p in photos]
    shutil.rmtree(out, ignore_errors=True)
    with device_decoding_on_cpu(lm):
        start = time.perf_counter()
        job = EmbedJob(refs, dataset_output(f"{out}/"), images=ImageOptions(batch_size=batch_size, decode=decode))
        summary = LocalEngine().embed(lm, job)
        seconds = time.perf_counter() - start
    if summary.embedded != len(photos):
        raise SystemExit(f"embed ({decode}) embedded {summary.embedded} of {len(photos)} photos")
    return len(photos) / seconds


def decode_only_rate(lm: Any, photos: list[Path], batch_size: int) -> float:
    """(d): the GPU decoding pipeline (read, nvJPEG, orient, resize, crop, normalise) with no model."""
    from clipcli.images.gpu import iter_device_batches
    from clipcli.images.sources import ImageRef

    refs = [ImageRef(str(p), p) for p in photos]
    start = time.perf_counter()
    n = 0
    for batch in iter_device_batches(refs, lm.image, lm.device, batch_size):
        batch.wait()
        n += len(batch.indices)
    sync(lm.device)
    return n / (time.perf_counter() - start)


def parity(cpu_out: Path, gpu_out: Path) -> dict[str, float]:
    """Cosine per photo between the two runs' (normalised) embeddings."""
    import pandas as pd

    a = pd.read_parquet(cpu_out, columns=["path", "embedding"]).set_index("path").sort_index()
    b = pd.read_parquet(gpu_out, columns=["path", "embedding"]).set_index("path").sort_index()
    if list(a.index) != list(b.index):
        raise SystemExit("CPU and GPU decoding embedded different files")
    x, y = np.stack(a["embedding"].to_numpy()), np.stack(b["embedding"].to_numpy())
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return {
        "n": len(cos),
        "min": round(float(cos.min()), 6),
        "p01": round(float(np.percentile(cos, 1)), 6),
        "median": round(float(np.median(cos)), 6),
    }


def whole_process(ckpt: Path, folder: Path, out: Path, batch_size: int, device: str, decode: str) -> float:
    """A whole `clipcli embed` process over the folder (start-up, imports and model load included)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*clipcli(), "embed", str(folder), "-m", str(ckpt), "-o", str(out) + "/", "-b", str(batch_size)]
    cmd += ["--device", device, "--decode", decode]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return len(list(folder.glob("*.jpg"))) / seconds


def best(rates: dict[int, float]) -> tuple[int, float]:
    size = max(rates, key=lambda b: rates[b])
    return size, rates[size]


def bench_model(arch: str, args: argparse.Namespace, photos: list[Path], work: Path) -> dict[str, Any]:
    from clipcli.models import load_model

    log(f"{arch}: checkpoint")
    ckpt = random_checkpoint(arch, work)
    lm = load_model(str(ckpt), args.device, args.precision)
    out = work / "out"
    result: dict[str, Any] = {"precision": lm.precision, "device": str(lm.device)}

    log(f"{arch}: (a) forward pass")
    result["forward"] = {b: round(forward_rate(lm, b, args.seconds)) for b in args.batch_sizes}
    warm = photos[: min(len(photos), 2 * max(args.batch_sizes))]
    for decode, key in (("cpu", "cpu_decode"), ("gpu", "gpu_decode")):
        log(f"{arch}: {key}")
        embed_rate(lm, warm, work / "warm", args.batch_sizes[0], decode)  # warm-up: imports, nvJPEG, cuBLAS
        result[key] = {b: round(embed_rate(lm, photos, out / f"{decode}{b}", b, decode)) for b in args.batch_sizes}
    if lm.device.type == "cuda" or args.smoke:
        with device_decoding_on_cpu(lm):
            result["gpu_decode_only"] = {b: round(decode_only_rate(lm, photos, b)) for b in args.batch_sizes}
    b_a, a = best(result["forward"])
    b_c, c = best(result["gpu_decode"])
    result["parity"] = parity(out / f"cpu{b_c}", out / f"gpu{b_c}")
    folder = photos[0].parent
    cli_decode = "gpu" if lm.device.type == "cuda" else "auto"  # --decode gpu refuses a CPU model
    log(f"{arch}: whole `clipcli embed --decode {cli_decode}` process")
    result["cli_process"] = {
        "decode": cli_decode,
        "batch_size": b_c,
        "img_s": round(whole_process(ckpt, folder, out / "cli", b_c, args.device, cli_decode)),
    }
    result["best"] = {
        "forward": {"batch_size": b_a, "img_s": round(a)},
        "cpu_decode": dict(zip(("batch_size", "img_s"), best(result["cpu_decode"]), strict=True)),
        "gpu_decode": {"batch_size": b_c, "img_s": round(c)},
        "gpu_over_forward": round(c / a, 3),
        "gpu_over_cpu_decode": round(c / best(result["cpu_decode"])[1], 2),
    }
    shutil.rmtree(out, ignore_errors=True)
    del lm
    return result


def targets(models: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if "ViT-B/32" in models:
        c = models["ViT-B/32"]["best"]["gpu_decode"]["img_s"]
        found["vit_b32_gpu_decode_ge_5000"] = {"value": c, "met": c >= 5000}
    if "ViT-L/14" in models:
        r = models["ViT-L/14"]["best"]["gpu_over_forward"]
        found["vit_l14_gpu_decode_over_forward_ge_0.85"] = {"value": r, "met": r >= 0.85}
    worst = min((m["parity"]["min"] for m in models.values()), default=1.0)
    found["parity_min_cosine_ge_0.999"] = {"value": worst, "met": worst >= 0.999}
    return found


def environment(device: str) -> dict[str, Any]:
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    with suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny photos and model on the CPU: checks the script")
    parser.add_argument("--photos", type=int, default=None, help="default 2000 (24 with --smoke)")
    parser.add_argument("--models", default=None, help="default ViT-B/32,ViT-L/14 (test-vit with --smoke)")
    parser.add_argument("--batch-sizes", default=None, help="default 256,512,1024 (8,16 with --smoke)")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    parser.add_argument("--precision", default=None, help="default fp16 (auto with --smoke)")
    parser.add_argument("--seconds", type=float, default=None, help="time per forward-pass measurement")
    parser.add_argument("--folder", type=Path, default=None, help="where the photos go (default: a temp folder)")
    args = parser.parse_args()
    smoke = args.smoke
    args.photos = args.photos or (24 if smoke else 2000)
    args.models = (args.models or ("test-vit" if smoke else "ViT-B/32,ViT-L/14")).split(",")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("8,16" if smoke else "256,512,1024")).split(",")]
    args.device = args.device or ("cpu" if smoke else "cuda")
    args.precision = args.precision or ("auto" if smoke else "fp16")
    args.seconds = args.seconds or (0.5 if smoke else 3.0)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --smoke on a CPU machine")
    work = Path(tempfile.mkdtemp(prefix="clipcli-gpu-bench-"))
    try:
        folder = args.folder or work / "photos"
        log(f"writing {args.photos} photos into {folder}")
        photo_info = make_photos(folder, args.photos, SMOKE_SIZES if smoke else SIZES)
        photos = sorted(folder.glob("photo*.jpg"))[: args.photos]
        log(json.dumps(photo_info))
        models: dict[str, Any] = {}
        for arch in args.models:
            models[arch] = bench_model(arch, args, photos, work)
            log(json.dumps({arch: models[arch]}))  # each model's figures survive a run cut short
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], "gpu-partial.json").write_text(json.dumps(models, indent=2) + "\n")
        summary = {
            "benchmark": "gpu",
            "smoke": smoke,
            "environment": environment(args.device),
            "photos": photo_info,
            "models": models,
            "targets": targets(models),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
