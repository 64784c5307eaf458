"""Draws the images in samples/ (run from the repository root): python scripts/make_samples.py

seen/       combinations the bundled model was trained on
held-out/   combinations it never saw in training (zero-shot composition)
busy/       larger images on saturated, gradient or noisy backgrounds
"""

from __future__ import annotations

import random
from pathlib import Path

from clipcli.training.synth import COLOURS, HELD_OUT, SHAPES, render

ROOT = Path("samples")


def main() -> None:
    rng = random.Random(2026)
    seen = [(c, s) for s in SHAPES for c in COLOURS if (c, s) not in HELD_OUT]
    picks = {
        "seen": rng.sample(seen, 16),
        "held-out": sorted(HELD_OUT)[:10],
        "busy": [
            ("red", "circle"),
            ("blue", "star"),
            ("yellow", "heart"),
            ("green", "arrow"),
            ("purple", "cross"),
            ("orange", "hexagon"),
        ],
    }
    for folder, combos in picks.items():
        (ROOT / folder).mkdir(parents=True, exist_ok=True)
        for colour, shape in combos:
            for _ in range(50):  # busy: keep drawing until the picture is large
                sample = render(rng, colour, shape, "saturated" if folder == "busy" else "varied")
                if folder != "busy" or min(sample.image.size) >= 224:
                    break
            sample.image.save(ROOT / folder / f"{colour}-{shape}.jpg", quality=92)
    labels = "".join(f"{c} {s}\n" for s in SHAPES for c in COLOURS)
    (ROOT / "labels.txt").write_text(labels)


if __name__ == "__main__":
    main()
