"""Whole `clipcli embed` processes of this checkout against an earlier one, in turns, in one run.

A refactor must not cost speed: this runs the same command (random-weight ViT-B/32, the benchmark photos,
NPY output, the default precision) with ``PYTHONPATH`` pointing at this tree and at a baseline tree, round
after round, so that both see the same machine load. Make the baseline with
``git worktree add /tmp/clipcli-base COMMIT`` (or ``git archive COMMIT | tar -x -C DIR``).

    python benchmarks/baseline.py /tmp/clipcli-base --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import random_checkpoint
from photos import make_photos

ROOT = Path(__file__).resolve().parent.parent


def run_embed(tree: Path, photos: Path, checkpoint: Path, output: Path, precision: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "clipcli", "embed", str(photos), "-m", str(checkpoint), "-o", str(output)]
    start = time.perf_counter()
    subprocess.run([*cmd, "--precision", precision], check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path, help="an earlier checkout of clipcli (its root folder)")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.out / "photos"
    count = len(make_photos(folder, args.photos))
    checkpoint = random_checkpoint("ViT-B/32", args.out)
    trees = {"this checkout": ROOT, "baseline": args.baseline.resolve()}
    times: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(args.rounds + 1):  # the first round warms the page cache and is not counted
        for name, tree in trees.items():
            times[name].append(run_embed(tree, folder, checkpoint, args.out / f"{name[:4]}.npy", args.precision))
    print(f"{count} photos, random ViT-B/32, --precision {args.precision}, {args.rounds} rounds after a warm-up")
    for name, seconds in times.items():
        median = statistics.median(seconds[1:])
        print(f"{name:14s} whole process median {median:6.2f} s = {count / median:5.1f} img/s  {seconds[1:]}")
    ratio = statistics.median(times["this checkout"][1:]) / statistics.median(times["baseline"][1:])
    print(f"this checkout / baseline time: {ratio:.3f}")


if __name__ == "__main__":
    main()
