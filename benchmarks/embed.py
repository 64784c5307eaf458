"""Embedding throughput, memory and search speed (issue: embed and rank).

    python benchmarks/embed.py [--photos 200] [--small 20000] [--rows 1000000]

All figures come from one run on one machine, so compare the ratios:
  (a) the tutorial loop: per image open, preprocess, encode_image, one at a time (fp32);
  (b) the model's forward pass alone on ready tensors, at clipcli's precision and batch size;
  (c) clipcli's embedding path with default settings over the same photos, after the model is
      loaded; and a whole `clipcli embed` process, start-up and load included.
Targets: (c) >= 3x (a); (c) >= 0.85x (b); whole process >= 3x clip-retrieval's 5 img/s (measured
elsewhere on the same machine class; not installed here). Then peak memory of `clipcli embed` into a
directory over many small images (flat, <= model + 1 GiB), and `rank` over 1M saved 512-d embeddings
(target <= 0.3 s per text query once the model is loaded).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import clipcli, random_checkpoint
from photos import make_photos

from clipcli.models import import_clip, load_model


def tutorial_loop(ckpt: Path, photos: list[Path]) -> float:
    clip = import_clip()
    model, preprocess = clip.load(str(ckpt), device="cpu", jit=False)
    start = time.perf_counter()
    with torch.no_grad():
        for p in photos:
            model.encode_image(preprocess(Image.open(p)).unsqueeze(0))
    return len(photos) / (time.perf_counter() - start)


def forward_only(ckpt: Path, n: int, batch: int) -> tuple[float, str]:
    lm = load_model(str(ckpt), "cpu", "auto")
    pixels = torch.randn(batch, 3, 224, 224)
    from clipcli.encode import encode_pixels

    encode_pixels(lm, pixels)  # warm-up
    start = time.perf_counter()
    done = 0
    while done < n:
        encode_pixels(lm, pixels)
        done += batch
    return done / (time.perf_counter() - start), lm.precision


def embed_in_process(ckpt: Path, photos: list[Path], out: Path) -> float:
    """clipcli's own embedding path with default settings, timed after the model is loaded."""
    from clipcli.embed import embed_images
    from clipcli.images import ImageRef
    from clipcli.io import OutputFormat

    lm = load_model(str(ckpt), "cpu", "auto")
    refs = [ImageRef(str(p), p) for p in photos]
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    embed_images(lm, refs, OutputFormat.PARQUET, str(out) + "/")
    return len(photos) / (time.perf_counter() - start)


def whole_embed(ckpt: Path, folder: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [*clipcli(), "embed", str(folder), "-m", str(ckpt), "-o", str(out) + "/"], check=True, capture_output=True
    )
    return time.perf_counter() - start


def peak_rss_mib(args: list[str]) -> float:
    """Peak resident memory of one child process, via GNU time's %M (KiB)."""
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *args], check=True, capture_output=True, text=True)
    return int(done.stderr.strip().splitlines()[-1]) / 1024


def small_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        path = folder / f"s{i:05d}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)


def rank_speed(ckpt: Path, out: Path, rows: int) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipcli.encode import encode_texts
    from clipcli.rank import rank_sources
    from clipcli.store import ModelTag, schema

    lm = load_model(str(ckpt), "cpu", "auto")
    dim = lm.architecture.embed_dim
    folder = out / f"rank-{rows}"
    npy = out / f"rank-{rows}.npy"
    if not folder.exists():
        rng = np.random.default_rng(0)
        sch = schema(dim, "float32", ModelTag(lm.name, lm.checksum, True))
        folder.mkdir(parents=True)
        paths_file = []
        matrices = []
        for part, start in enumerate(range(0, rows, 100_000)):
            n = min(100_000, rows - start)
            m = rng.standard_normal((n, dim), dtype=np.float32)
            m /= np.linalg.norm(m, axis=1, keepdims=True)
            matrices.append(m)
            names = [f"img/{start + i:07d}.jpg" for i in range(n)]
            paths_file.extend(names)
            flat = pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), dim)
            table = pa.table(
                {
                    "path": names,
                    "embedding": flat,
                    "width": pa.array([0] * n, pa.int32()),
                    "height": pa.array([0] * n, pa.int32()),
                    "bytes": pa.array([0] * n, pa.int64()),
                    "mtime": pa.array([0.0] * n),
                    "model": [lm.name] * n,
                },
                schema=sch,
            )
            pq.write_table(table, folder / f"part-{part:06d}.parquet")
        np.save(npy, np.concatenate(matrices))
        npy.with_name(npy.stem + ".paths.txt").write_text("\n".join(paths_file) + "\n")
    results = {}
    for label, source in (("parquet dir", folder), ("npy (mmap)", npy)):
        times = []
        for q in ["a dog on the beach", "a red car", "a bowl of soup", "a mountain at dusk", "two cats"]:
            start = time.perf_counter()
            query = encode_texts(lm, [q])[0].numpy()
            rank_sources(lm, query, [str(source)], 10)
            times.append(time.perf_counter() - start)
        results[label] = float(np.median(times))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="clipcli embed / rank benchmark")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--small", type=int, default=20000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    ckpt = random_checkpoint("ViT-B/32", args.out)
    photos = make_photos(args.out / "photos", args.photos)
    folder = photos[0].parent
    print(f"{len(photos)} photos from 640x480 to 4000x3000, ViT-B/32-size random checkpoint, {os.cpu_count()} cores")

    a = tutorial_loop(ckpt, photos[: min(len(photos), 60)])
    print(f"(a) tutorial loop:                 {a:6.1f} img/s")
    b, precision = forward_only(ckpt, 256, 32)
    print(f"(b) forward pass only ({precision}, b=32): {b:6.1f} img/s")
    c = embed_in_process(ckpt, photos, args.out / "emb-in-process")
    print(f"(c) clipcli embed, after load:     {c:6.1f} img/s (decode + preprocess + model + Parquet writes)")
    seconds = whole_embed(ckpt, folder, args.out / "emb")
    whole = len(photos) / seconds
    print(f"    clipcli embed, whole process:  {whole:6.1f} img/s ({seconds:.1f} s incl. start-up and model load)")
    print(f"    (c)/(a) = {c / a:.2f}x (target >= 3)   (c)/(b) = {c / b:.2f}x (target >= 0.85)")
    print(f"    whole process vs clip-retrieval's 5 img/s (measured elsewhere): {whole / 5:.1f}x (target >= 3)")

    if args.small:
        small = args.out / f"small-{args.small}"
        small_images(small, args.small)
        for n_label, source in ((f"{args.small // 10}", None), (f"{args.small}", small)):
            if source is None:
                sub = args.out / f"small-{args.small // 10}"
                small_images(sub, args.small // 10)
                source = sub
            out = args.out / f"emb-small-{n_label}"
            shutil.rmtree(out, ignore_errors=True)
            rss = peak_rss_mib([*clipcli(), "embed", str(source), "-m", "tiny-shapes", "-o", str(out) + "/"])
            print(f"peak RSS embedding {n_label:>6} small images into a directory: {rss:7.0f} MiB")
        print(f"    model checkpoint: {ckpt.stat().st_size / 2**20:.0f} MiB (ViT-B/32) / 9 MiB (tiny-shapes)")

    if args.rows:
        for label, seconds in rank_speed(ckpt, args.out, args.rows).items():
            print(
                f"rank over {args.rows:,} saved 512-d embeddings ({label}): {seconds:.3f} s per text query "
                "(target <= 0.3 s)"
            )


if __name__ == "__main__":
    main()
