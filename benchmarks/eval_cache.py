"""The zero-shot classifier cache of `clipcli eval`: 100 classes x 80 ImageNet templates, first run vs rerun.

    python benchmarks/eval_cache.py

Uses a ViT-B/32-size random checkpoint and a folder of 100 one-image classes, and runs the whole
`clipcli eval` process twice against an empty cache (target: the rerun's text stage >= 20x faster).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import clipcli, random_checkpoint


def main() -> None:
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    ckpt = random_checkpoint("ViT-B/32", out)
    data = out / "eval-100-classes"
    rng = np.random.default_rng(0)
    for i in range(100):
        (data / f"class_{i:03d}").mkdir(parents=True, exist_ok=True)
        target = data / f"class_{i:03d}" / "0.png"
        if not target.exists():
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(target)
    with tempfile.TemporaryDirectory() as cache:
        env = {**__import__("os").environ, "CLIPCLI_CACHE": cache}
        runs = []
        for label in ("first run (empty cache)", "rerun (cached)"):
            report = out / "eval-report.json"
            start = time.perf_counter()
            subprocess.run(
                [
                    *clipcli(),
                    "eval",
                    str(data),
                    "-m",
                    str(ckpt),
                    "--templates",
                    "imagenet",
                    "--report",
                    str(report),
                ],
                check=True,
                capture_output=True,
                env=env,
            )
            total = time.perf_counter() - start
            text = json.loads(report.read_text())["results"][0]["timings"]["text_embedding_s"]
            runs.append((label, total, text))
            print(f"{label:24s} whole process {total:6.2f} s, text stage {text:7.3f} s")
    print(
        f"text stage speed-up: {runs[0][2] / runs[1][2]:.0f}x (target >= 20x); "
        f"whole process: {runs[0][1] / runs[1][1]:.1f}x"
    )


if __name__ == "__main__":
    main()
