"""Embedding from WebDataset shards against the same images as loose files (issue 25).

    python benchmarks/webdataset.py [--images 1000] [--repeat 3] [--vit [--no-tiny]] [--int8] [--clip-retrieval PYTHON]
    python benchmarks/webdataset.py --in-process [--vit]

Web-size JPEGs (256-512 px a side, about 50 KB, as in LAION) are written twice: as loose files in a
folder, and as WebDataset shards (``webdataset.ShardWriter``, one ``.jpg`` and one ``.txt`` a sample).
Whole ``clipcli embed`` processes then read each, in turns (loose, shards, loose, shards...), with the
same model and settings, the page cache warm for both; the figure is the ratio of their throughputs
(target: shards >= 0.95x loose). Models: the bundled ``tiny-shapes`` (decoding dominates) and, with
``--vit``, a random-weight ViT-B/32 at full size (the model dominates; the cost does not depend on the
weights). ``--clip-retrieval PYTHON`` also times ``clip-retrieval inference --input_format webdataset``
on the same shards and the same ViT-B/32 checkpoint, run by the interpreter PYTHON of an environment
where clip-retrieval is installed (its pins, numpy<2 and pyarrow<16, keep it out of clipcli's).

On a busy machine whole processes give noisy wall times (the best run of each is reported) and inflated
CPU times (idle OpenMP threads spin); ``--in-process`` measures instead the CPU time of clipcli's whole
embedding path (discovery, reading, decoding, the model) over each input in one process on one thread,
in turns, which isolates what reading shards adds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import clipcli, cpu_model, random_checkpoint  # noqa: E402

# This file's own name would hide the webdataset package from `import webdataset`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def web_images(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(key, JPEG bytes) of ``count`` photo-like images 256-512 px a side, about 50 KB each."""
    import io

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = (int(x) for x in rng.integers(256, 513, 2))
        coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        image = Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        grain = Image.fromarray(rng.integers(0, 110, (h // 2, w // 2, 3), dtype=np.uint8), "RGB").resize((w, h))
        image = Image.blend(image, grain, 0.38).filter(ImageFilter.DETAIL)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=91)
        out.append((f"{i:08d}", buf.getvalue()))
    return out


def write_inputs(folder: Path, images: list[tuple[str, bytes]], per_shard: int) -> tuple[Path, str, int]:
    """The loose folder, the shards' brace pattern, and the number of shards."""
    import webdataset as wds

    loose, shards = folder / "loose", folder / "shards"
    for path in (loose, shards):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    for key, data in images:
        (loose / f"{key}.jpg").write_bytes(data)
    with wds.ShardWriter(str(shards / "%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for key, data in images:
            sink.write({"__key__": key, "jpg": data, "txt": f"image {key}"})
    count = len(list(shards.glob("*.tar")))
    for path in [*loose.iterdir(), *shards.iterdir()]:  # warm the page cache for both
        path.read_bytes()
    return loose, str(shards / f"{{000000..{count - 1:06d}}}.tar"), count


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall-clock seconds, and CPU seconds (user + system, the process and its children)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def side_by_side(runs: dict[str, list[str]], cwd: Path, repeat: int) -> dict[str, list[tuple[float, float]]]:
    """Each command ``repeat`` times, in turns, so that a slower spell of a shared machine hits all."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, cmd in runs.items():
            times[name].append(timed(cmd, cwd))
    return times


def in_process(model: str, loose: Path, pattern: str, repeat: int) -> dict[str, list[float]]:
    """CPU seconds of clipcli's embedding path (discovery, reading, decoding, the model) over each input,
    in one process on one thread, in turns: the cost each input kind adds, without the scheduler noise
    of a shared machine (whose idle threads spin and bill CPU time)."""
    import torch

    from clipcli.images.sources import discover
    from clipcli.models import load_model
    from clipcli.zeroshot.encode import iter_image_embeddings

    torch.set_num_threads(1)
    lm = load_model(model, "cpu")
    cpu: dict[str, list[float]] = {"loose": [], "shards": []}
    for _ in range(repeat):
        for name, source in (("loose", str(loose)), ("shards", pattern)):
            start = time.process_time()
            refs, _ = discover([source])
            rows = sum(len(b.indices) for b in iter_image_embeddings(lm, refs, 32, 0))
            cpu[name].append(time.process_time() - start)
            assert rows == len(refs)
    return cpu


def clip_retrieval_command(python: str, pattern: str, checkpoint: Path, out: Path, batch: int) -> list[str]:
    return [
        python,
        "-m",
        "clip_retrieval.cli",
        "inference",
        f"--input_dataset={pattern}",
        "--input_format=webdataset",
        f"--output_folder={out}",
        f"--clip_model={checkpoint}",
        "--enable_text=False",
        "--enable_metadata=False",
        f"--batch_size={batch}",
        "--num_prepro_workers=2",
        "--use_jit=False",
        "--write_batch_size=1000000",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vit", action="store_true", help="also a random full-size ViT-B/32")
    parser.add_argument("--clip-retrieval", metavar="PYTHON", help="an interpreter with clip-retrieval installed")
    parser.add_argument("--no-tiny", action="store_true", help="skip the bundled model (with --vit)")
    parser.add_argument("--int8", action="store_true", help="also clipcli on the shards at --precision int8")
    parser.add_argument("--in-process", action="store_true", help="CPU time in one process, one thread, instead")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "out" / "webdataset")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    images = web_images(args.images)
    sizes = [len(data) for _, data in images]
    loose, pattern, n_shards = write_inputs(args.work, images, args.per_shard)
    print(f"CPU: {cpu_model()}, {len(__import__('os').sched_getaffinity(0))} cores")
    print(f"{len(images)} JPEGs, mean {statistics.mean(sizes) / 1000:.0f} KB; {n_shards} shards of {args.per_shard}")
    models = {} if args.no_tiny else {"tiny-shapes": "tiny-shapes"}
    if args.vit or args.clip_retrieval:
        models["ViT-B/32 (random)"] = str(random_checkpoint("ViT-B/32", args.work))
    for label, model in models.items():
        base = [*clipcli(), "embed", "-m", model]
        runs = {
            "loose": [*base, str(loose), "-o", str(args.work / "loose.npy")],
            "shards": [*base, pattern, "-o", str(args.work / "shards.npy")],
        }
        if args.int8:
            runs["shards, int8"] = [*base, pattern, "--precision", "int8", "-o", str(args.work / "int8.npy")]
        if args.clip_retrieval and model != "tiny-shapes":
            out = args.work / "clip-retrieval"
            shutil.rmtree(out, ignore_errors=True)
            runs["clip-retrieval"] = clip_retrieval_command(args.clip_retrieval, pattern, Path(model), out, 32)
        if args.in_process:
            cpu = in_process(model, loose, pattern, args.repeat)
            best = {name: len(images) / min(t) for name, t in cpu.items()}
            print(f"\n{label}, in one process on one thread, CPU time, best of {args.repeat}:")
            for name, t in cpu.items():
                print(f"  {name:15s} {best[name]:7.1f} img/CPU-s   ({', '.join(f'{x:.2f}' for x in t)} s)")
            print(f"  shards / loose: {best['shards'] / best['loose']:.3f}x (target >= 0.95x)")
            continue
        times = side_by_side(runs, args.work, args.repeat)
        # The fastest run is the one a busy machine disturbed least; CPU seconds are disturbed less still.
        rate = {name: len(images) / min(wall for wall, _ in t) for name, t in times.items()}
        median = {name: len(images) / statistics.median(wall for wall, _ in t) for name, t in times.items()}
        cpu = {name: len(images) / statistics.median(c for _, c in t) for name, t in times.items()}
        print(f"\n{label}, whole processes, {args.repeat} runs each in turns:")
        for name, t in times.items():
            walls = ", ".join(f"{w:.2f}" for w, _ in t)
            print(f"  {name:15s} {rate[name]:7.1f} img/s (best wall)  {cpu[name]:7.1f} img/CPU-s   (wall {walls} s)")
        for what, figures in (("best wall", rate), ("median wall", median), ("CPU time", cpu)):
            print(f"  shards / loose ({what}): {figures['shards'] / figures['loose']:.3f}x (target >= 0.95x)")
            for ours in [name for name in ("shards", "shards, int8") if name in figures]:
                if "clip-retrieval" in figures:
                    ratio = figures[ours] / figures["clip-retrieval"]
                    print(f"  clipcli {ours} / clip-retrieval ({what}): {ratio:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
