"""Start-up cost: `clipcli --help`, and classifying one image vs a bare `clip.load` of the same model.

    python benchmarks/startup.py [--repeat 5]

Uses a ViT-B/32-size random checkpoint (made once in benchmarks/out/). Targets: `--help` <= 0.5 s;
`classify` of one image <= 1.2x the bare `import clip; clip.load(...)` measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import clipcli, python, random_checkpoint, summary, time_command
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    ckpt = random_checkpoint("ViT-B/32", args.out)
    image = args.out / "one.jpg"
    Image.radial_gradient("L").convert("RGB").resize((640, 480)).save(image)

    help_times = time_command([*clipcli(), "--help"], args.repeat)
    bare = time_command(
        [python(), "-c", f"import clip; clip.load({str(ckpt)!r}, device='cpu', jit=False)"], args.repeat
    )
    classify = time_command(
        [*clipcli(), "classify", str(image), "--labels", "a diagram,a dog,a cat", "-m", str(ckpt), "-f", "csv"],
        args.repeat,
    )
    ratio = statistics.median(classify) / statistics.median(bare)
    print(f"clipcli --help:                 {summary(help_times)}  (target <= 0.5 s)")
    print(f"python -c 'clip.load(ViT-B/32)': {summary(bare)}")
    print(f"clipcli classify one image:     {summary(classify)}")
    print(f"classify / bare load:           {ratio:.2f}x  (target <= 1.2x)")


if __name__ == "__main__":
    main()
