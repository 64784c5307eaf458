"""Embedding throughput of each model family, on ViT-B/32-size random models (issue: model families).

    python benchmarks/families.py [--photos 200] [--reference 40] [--rounds 2]

One run, one machine, all families in turns, so the figures compare:
  - OpenAI: the random full-size checkpoint of benchmarks/common.py (clipcli's OpenAI path);
  - open_clip: ``ViT-B-32`` from open_clip's config, random weights saved as a state dict
    (``open_clip:ViT-B-32/FILE.pt``);
  - hf: a ``CLIPModel`` of ViT-B/32's sizes saved with ``save_pretrained`` (``hf:DIR``).
For each: the model's forward pass alone on a ready batch of 32 at fp32 and at clipcli's precision
(whether the cast pays, measured per family); ``clipcli embed`` after load over the photos (in-process,
default settings); a whole ``clipcli embed`` process (start-up and load included); and the family's own
reference loop, one image at a time at fp32 (open_clip: ``preprocess`` + ``encode_image``; HF: the
default image processor + ``get_image_features``; OpenAI: the ``clip`` package's tutorial loop).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import clipcli, random_checkpoint
from embed import embed_in_process, tutorial_loop
from family_models import hf_clip_folder
from photos import make_photos

from clipcli.models import load_model


def open_clip_checkpoint(folder: Path) -> Path:
    import open_clip

    path = folder / "random-open_clip-ViT-B-32.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), path)
    return path


def hf_folder(folder: Path) -> Path:
    path = folder / "random-hf-clip-ViT-B-32"
    if not (path / "model.safetensors").exists():
        hf_clip_folder(path, full_size=True)
    return path


def open_clip_reference(ckpt: Path, photos: list[Path]) -> float:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(ckpt))
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for p in photos:
            model.encode_image(preprocess(Image.open(p)).unsqueeze(0))
    return len(photos) / (time.perf_counter() - start)


def hf_reference(folder: Path, photos: list[Path]) -> float:
    from transformers import AutoImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    start = time.perf_counter()
    with torch.no_grad():
        for p in photos:
            model.get_image_features(**processor(images=Image.open(p).convert("RGB"), return_tensors="pt"))
    return len(photos) / (time.perf_counter() - start)


def forward_rate(spec: str, precision: str, batches: int = 3) -> float:
    """Images per second through the model alone (after one warm-up batch of 32)."""
    from clipcli.zeroshot.encode import encode_pixels

    lm = load_model(spec, "cpu", precision)
    pixels = torch.randn(32, 3, lm.input_resolution, lm.input_resolution)
    encode_pixels(lm, pixels)
    start = time.perf_counter()
    for _ in range(batches):
        encode_pixels(lm, pixels)
    return 32 * batches / (time.perf_counter() - start)


def whole_embed(spec: str, folder: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [*clipcli(), "embed", str(folder), "-m", spec, "-o", str(out) + "/"], check=True, capture_output=True
    )
    return time.perf_counter() - start


def cpu_class() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    bf16 = "AVX512-BF16" if "avx512_bf16" in text else "no native bf16"
    return f"{name}, {os.cpu_count()} cores, {bf16}"


def main() -> None:
    parser = argparse.ArgumentParser(description="clipcli embed throughput per model family")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--reference", type=int, default=40, help="photos for the one-at-a-time reference loops")
    parser.add_argument("--rounds", type=int, default=2, help="embed runs per family, in turns")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    photos = make_photos(args.out / "photos", args.photos)
    specs = {
        "openai": str(random_checkpoint("ViT-B/32", args.out)),
        "open_clip": f"open_clip:ViT-B-32/{open_clip_checkpoint(args.out)}",
        "hf": f"hf:{hf_folder(args.out)}",
    }
    references: dict[str, Callable[[list[Path]], float]] = {
        "openai": lambda ps: tutorial_loop(Path(specs["openai"]), ps),
        "open_clip": lambda ps: open_clip_reference(open_clip_checkpoint(args.out), ps),
        "hf": lambda ps: hf_reference(hf_folder(args.out), ps),
    }
    print(f"{cpu_class()}; {len(photos)} photos from 640x480 to 4000x3000; ViT-B/32-size random models")
    precision = load_model("tiny-shapes", "cpu", "auto").precision
    print(f"clipcli's precision here: {precision}\n")

    lms = {family: load_model(spec, "cpu", "auto") for family, spec in specs.items()}
    after_load: dict[str, list[float]] = {family: [] for family in specs}
    whole: dict[str, list[float]] = {family: [] for family in specs}
    for _ in range(args.rounds):
        for family, lm in lms.items():  # in turns, so that drift in the machine's speed hits all alike
            after_load[family].append(embed_in_process(lm, photos, args.out / f"emb-{family}"))
            whole[family].append(len(photos) / whole_embed(specs[family], photos[0].parent, args.out / f"emb-{family}"))
            print(
                f"  {family}: embed {after_load[family][-1]:.1f} img/s, whole {whole[family][-1]:.1f} img/s", flush=True
            )
    del lms
    print(f"{'family':10} {'fwd fp32':>9} {'fwd ' + precision:>9} {'embed':>7} {'whole':>7} {'reference':>9}  img/s")
    for family, spec in specs.items():
        fp32 = forward_rate(spec, "fp32")
        low = forward_rate(spec, precision) if precision != "fp32" else fp32
        reference = references[family](photos[: args.reference])
        embed, process = statistics.median(after_load[family]), statistics.median(whole[family])
        print(
            f"{family:10} {fp32:9.1f} {low:9.1f} {embed:7.1f} {process:7.1f} {reference:9.1f}"
            f"  (embed runs {', '.join(f'{v:.1f}' for v in after_load[family])})",
            flush=True,
        )
    print(
        "\nfwd: model alone, batch 32; embed: clipcli embed after load (decode+model+Parquet); whole: a whole\n"
        "`clipcli embed` process incl. start-up and load; reference: the family's own loop, 1 image at a time, fp32."
    )


if __name__ == "__main__":
    main()
