"""`clipcli train` and `clipcli make-shapes`: contrastive training, and data to train on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypedDict

import typer

from clipcli.commands import options as opt

if TYPE_CHECKING:
    from rich.progress import Task

    from clipcli.training.loop import StepInfo, TrainResult

# synth.Split and synth.Background, spelt out so the CLI starts without importing PIL (mypy checks they fit).
Split = Literal["seen", "held-out", "all"]
Background = Literal["varied", "saturated", "grey"]


class StepFields(TypedDict):
    loss: str
    lr: str
    pairs_per_s: str


def step_fields(info: StepInfo | None) -> StepFields:
    """The training bar's fields, blank before the first step. Each has a column of its own, so nothing
    overwrites another, and the rate is the core's pairs/s, not rich's speed (which would count steps)."""
    if info is None:
        return StepFields(loss="", lr="", pairs_per_s="")
    return StepFields(
        loss=f"loss {info.loss:.3f}", lr=f"lr {info.lr:.2e}", pairs_per_s=f"{info.samples_per_s:,.0f} pairs/s"
    )


class TrainingBar:
    """Steps done of all, loss, learning rate, pairs/s and time left, on a terminal only.

    It appears with the first step (or resume), once the image-loading bar has gone: rich shows one live
    display at a time.
    """

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        from clipcli.commands.console import err

        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[lr]}"),
            TextColumn("{task.fields[pairs_per_s]}"),
            TimeRemainingColumn(),
            console=err,
            disable=not err.is_terminal,
            transient=True,
        )
        self._task = self._bar.add_task("training", total=None, **step_fields(None))
        self._shown = False

    @property
    def task(self) -> Task:
        return self._bar.tasks[0]

    def resume_at(self, step: int, total: int) -> None:
        """Start the count at ``step``: a reset, so the time left is estimated from this run's steps only."""
        self._bar.reset(self._task, total=total, completed=step)
        self._show()

    def on_step(self, info: StepInfo) -> None:
        self._bar.update(self._task, total=info.total, completed=info.step, **step_fields(info))
        self._show()

    def _show(self) -> None:
        if not self._shown:
            self._bar.start()
            self._shown = True

    def __enter__(self) -> TrainingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shown:
            self._bar.stop()


PairsFile = Annotated[
    Path,
    typer.Argument(metavar="PAIRS", help="CSV, Parquet or JSONL with 'image' (relative to the file) and 'text'."),
]
TrainOutput = Annotated[
    Path, typer.Option("--output", "-o", metavar="FILE", help="Where to write the trained state dict (.pt).")
]
FineTune = Annotated[
    str | None,
    typer.Option("--model", "-m", metavar="NAME|FILE", help="Fine-tune this model (name or checkpoint)."),
]
Arch = Annotated[
    str | None,
    typer.Option(
        metavar="ARCH",
        help="Train from scratch with this architecture: tiny-shapes (the default), ViT-B/32, ViT-B/16 or RN50.",
    ),
]
Epochs = Annotated[int, typer.Option(min=1, metavar="N", help="Passes over the training pairs (unless --steps).")]
Steps = Annotated[int | None, typer.Option(min=1, metavar="N", help="Optimiser steps (overrides --epochs).")]
PairsPerStep = Annotated[int, typer.Option("--batch-size", "-b", min=2, metavar="N", help="Pairs per step.")]
LearningRate = Annotated[float, typer.Option(metavar="LR", help="Peak learning rate (AdamW).")]
WeightDecay = Annotated[float, typer.Option(metavar="X", help="AdamW weight decay on weight matrices.")]
Warmup = Annotated[float, typer.Option(metavar="FRACTION", help="Fraction of steps for the linear warm-up.")]
Seed = Annotated[int, typer.Option(metavar="N", help="Seed for initialisation, split and data order.")]
ValFraction = Annotated[float, typer.Option(min=0.0, max=0.5, metavar="FRACTION", help="Pairs held out for recall@1.")]
CheckpointEvery = Annotated[int, typer.Option(min=1, metavar="N", help="Save a resumable checkpoint every N steps.")]
Resume = Annotated[bool, typer.Option(help="Continue from OUTPUT.ckpt if a previous run left one.")]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Start over even if OUTPUT.ckpt holds an interrupted run's progress (it is replaced)."
    ),
]
BadImages = Annotated[Literal["skip", "stop"], typer.Option(help="skip (report and train on the rest) or stop.")]
Fp16 = Annotated[bool, typer.Option("--fp16/--fp32", help="Save weights as fp16 (OpenAI's layout) or fp32.")]


def train(
    pairs: PairsFile,
    output: TrainOutput,
    model: FineTune = None,
    arch: Arch = None,
    epochs: Epochs = 10,
    steps: Steps = None,
    batch_size: PairsPerStep = 128,
    lr: LearningRate = 1e-3,
    weight_decay: WeightDecay = 0.1,
    warmup: Warmup = 0.05,
    seed: Seed = 0,
    val_fraction: ValFraction = 0.0,
    checkpoint_every: CheckpointEvery = 500,
    resume: Resume = False,
    overwrite: Overwrite = False,
    bad_images: BadImages = "skip",
    fp16: Fp16 = True,
    device: opt.Device = "auto",
    workers: opt.Workers = 0,
) -> None:
    """Train a CLIP model contrastively on image-caption pairs, from scratch or from a model."""
    from dataclasses import replace

    from clipcli.commands.console import say
    from clipcli.errors import EXIT_PARTIAL
    from clipcli.store.refusals import refuse_output_over_inputs
    from clipcli.training.checkpoints import checkpoint_path
    from clipcli.training.loop import TrainConfig
    from clipcli.training.loop import train as run_training

    refuse_output_over_inputs([output, checkpoint_path(output)], [pairs, model])
    config = TrainConfig(pairs, output, model, arch, epochs, steps, batch_size, lr, weight_decay, warmup)
    config = replace(config, seed=seed, val_fraction=val_fraction, checkpoint_every=checkpoint_every, resume=resume)
    config = replace(config, overwrite=overwrite, bad_images=bad_images, workers=workers, device=device, half=fp16)
    view = _TrainView(checkpoint_path(output))
    try:
        with view.preload, view.bar:
            result = run_training(
                config,
                on_step=view.on_step,
                on_preload=view.on_preload,
                on_skip=view.tally.on_skip,
                on_resume=view.on_resume,
                on_checkpoint=view.on_checkpoint,
                on_fresh_start=lambda path: say(f"no checkpoint at {path}: starting from scratch"),
            )
    except KeyboardInterrupt:  # Ctrl-C, and SIGTERM (Terminated): the CLI then says which and exits
        if view.progress.step is not None or view.progress.saved is not None:
            say(view.progress.stopped(view.ckpt, checkpoint_every))
        raise
    say(_summary(result, view.tally.skipped, output))
    if view.tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)  # the model is written, but not from every pair asked for


class _TrainView:
    """What a run shows: the image-loading bar, then the training bar; skipped images; and how far it
    got, for the message when it is interrupted."""

    def __init__(self, ckpt: Path) -> None:
        from clipcli.commands.console import Progress, Tally

        self.ckpt = ckpt
        self.preload = Progress("loading images", None)
        self.bar = TrainingBar()
        self.tally = Tally()
        self.progress = _Progress()
        self.loaded = 0

    def on_preload(self, n: int, total: int) -> None:
        self.loaded += n
        self.preload.update(total=total)
        self.preload.advance(n)
        if self.loaded >= total:
            self.preload.hide()  # rich shows one live display at a time: make way for the training bar

    def on_resume(self, step: int, total: int) -> None:
        from clipcli.commands.console import say

        say(f"resuming from step {step} of {total} ({self.ckpt})")
        self.progress.saved = step
        self.bar.resume_at(step, total)

    def on_step(self, info: StepInfo) -> None:
        self.progress.step, self.progress.total = info.step, info.total
        self.bar.on_step(info)

    def on_checkpoint(self, step: int) -> None:
        self.progress.saved = step


class _Progress:
    """How far a run got and the step its checkpoint holds, for the message when it is interrupted."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.total = 0
        self.saved: int | None = None

    def stopped(self, ckpt: Path, every: int) -> str:
        at = "stopped before the first step" if self.step is None else f"stopped at step {self.step} of {self.total}"
        if self.saved is None:
            return f"{at}, before the first checkpoint (every {every} steps): nothing to resume; rerun to start over"
        return (
            f"{at}; {ckpt} holds step {self.saved}: resume with --resume (same options), or start over with --overwrite"
        )


def _summary(result: TrainResult, skipped: int, output: Path) -> str:
    steps = f"{result.steps} step{'s' * (result.steps != 1)}"
    line = f"trained {steps} in {result.seconds:.0f} s, final loss {result.final_loss:.4f}"
    if result.val_image_to_text_r1 is not None:
        i2t, t2i = result.val_image_to_text_r1, result.val_text_to_image_r1
        line += f", val recall@1 image->text {i2t:.1%} text->image {t2i:.1%}"
    if skipped:
        line += f"; skipped {skipped} image(s)"
    return f"{line}; wrote {output}"


def make_shapes(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Folder to write images and pairs.csv into.")],
    count: Annotated[int, typer.Option("--count", "-n", min=1, metavar="N", help="Number of images.")] = 1000,
    seed: Annotated[int, typer.Option(metavar="N", help="Random seed (different seeds give different images).")] = 0,
    split: Annotated[
        Split, typer.Option(help="seen, held-out (the ~20% combinations kept out of training) or all.")
    ] = "seen",
    background: Annotated[Background, typer.Option(help="varied, saturated or grey.")] = "varied",
    workers: Annotated[int, typer.Option(min=1, metavar="N", help="Processes drawing images.")] = 2,
) -> None:
    """Draw captioned images of coloured shapes (8 shapes x 8 colours) for training and tests."""
    from clipcli.commands.console import Progress, say
    from clipcli.training.synth import generate

    with Progress("drawing", count) as bar:
        for _ in generate(folder, count, seed, split, background, workers):
            bar.advance(1)
    say(f"wrote {count} images and {folder / 'pairs.csv'}")
