"""`clipcli train` and `clipcli make-shapes`: contrastive training, and data to train on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipcli.commands import options as opt


def train(
    pairs: Annotated[
        Path, typer.Argument(help="CSV, Parquet or JSONL with 'image' (relative to the file) and 'text'.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the trained state dict (.pt).")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Fine-tune this model (name or checkpoint).")
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="Train from scratch with this architecture (default tiny-shapes).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training pairs (unless --steps).")] = 10,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps (overrides --epochs).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2, help="Pairs per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on weight matrices.")] = 0.1,
    warmup: Annotated[float, typer.Option(help="Fraction of steps for the linear warm-up.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, split and data order.")] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="Pairs held out for recall@1.")] = 0.0,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Save a resumable checkpoint every N steps.")] = 500,
    resume: Annotated[bool, typer.Option(help="Continue from OUTPUT.ckpt if a previous run left one.")] = False,
    bad_images: Annotated[str, typer.Option(help="skip (report and train on the rest) or stop.")] = "skip",
    fp16: Annotated[bool, typer.Option("--fp16/--fp32", help="Save weights as fp16 (OpenAI's layout) or fp32.")] = True,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    workers: opt.Workers = 0,
) -> None:
    """Train a CLIP model contrastively on image-caption pairs, from scratch or from a model."""
    from clipcli.console import Progress, say, skipped
    from clipcli.errors import EXIT_PARTIAL, InputError
    from clipcli.train import StepInfo, TrainConfig
    from clipcli.train import train as run_training

    if bad_images not in ("skip", "stop"):
        raise InputError(f"--bad-images must be skip or stop, not {bad_images!r}")
    config = TrainConfig(
        pairs=pairs,
        output=output,
        model=model,
        arch=arch,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        seed=seed,
        val_fraction=val_fraction,
        checkpoint_every=checkpoint_every,
        resume=resume,
        bad_images=bad_images,
        workers=workers,
        device=device,
        half=fp16,
    )
    preload = Progress("loading images", None)
    bar = Progress("training", None, unit="pairs")

    def on_preload(n: int, total: int) -> None:
        preload.update(total=total)
        preload.advance(n)

    def on_step(info: StepInfo) -> None:
        bar.update(total=info.total, rate=f"loss {info.loss:.3f}  lr {info.lr:.2e}  {info.samples_per_s:,.0f} pairs/s")
        bar.advance(1)

    with preload, bar:
        result = run_training(config, on_step=on_step, on_preload=on_preload, on_skip=skipped)
    line = f"trained {result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.4f}"
    if result.val_image_to_text_r1 is not None:
        i2t, t2i = result.val_image_to_text_r1, result.val_text_to_image_r1
        line += f", val recall@1 image->text {i2t:.1%} text->image {t2i:.1%}"
    if result.skipped:
        line += f"; skipped {len(result.skipped)} image(s)"
    say(f"{line}; wrote {output}")
    if result.skipped:
        raise typer.Exit(EXIT_PARTIAL)  # the model is written, but not from every pair asked for


def make_shapes(
    folder: Annotated[Path, typer.Argument(help="Folder to write images and pairs.csv into.")],
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Number of images.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed (different seeds give different images).")] = 0,
    split: Annotated[
        str, typer.Option(help="seen, held-out (the ~20% combinations kept out of training) or all.")
    ] = "seen",
    background: Annotated[str, typer.Option(help="varied, saturated or grey.")] = "varied",
    workers: Annotated[int, typer.Option(min=1, help="Processes drawing images.")] = 2,
) -> None:
    """Draw captioned images of coloured shapes (8 shapes x 8 colours) for training and tests."""
    from clipcli.console import Progress, say
    from clipcli.errors import InputError
    from clipcli.synth import generate

    if split not in ("seen", "held-out", "all"):
        raise InputError(f"--split must be seen, held-out or all, not {split!r}")
    if background not in ("varied", "saturated", "grey"):
        raise InputError(f"--background must be varied, saturated or grey, not {background!r}")
    with Progress("drawing", count) as bar:
        for _ in generate(folder, count, seed, split, background, workers):  # type: ignore[arg-type]
            bar.advance(1)
    say(f"wrote {count} images and {folder / 'pairs.csv'}")
