"""Contrastive pre-training and fine-tuning with CLIP's symmetric loss.

Runs are deterministic on the CPU for a fixed seed: the data order of every epoch is derived from
(seed, epoch), and checkpoints hold the model, optimiser and schedule, so ``resume`` continues an
interrupted run to the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from clipcli.atomic import signals_held
from clipcli.errors import InputError, ModelError, OutputError
from clipcli.images.sources import Skipped
from clipcli.training.checkpoints import (
    atomic_save,
    checkpoint_path,
    checkpoint_state,
    export_state_dict,
    resume,
    save_model,
)
from clipcli.training.pairs import Pairs, PixelSource, read_pairs

if TYPE_CHECKING:
    import torch
    from clip.model import CLIP

MAX_LOGIT_SCALE = math.log(100.0)
# The architectures `--arch` offers. families.openai.ARCHITECTURES also holds tiny shapes for the test suite
# (test-vit, test-rn): still accepted, but not offered.
PUBLIC_ARCHITECTURES = ("tiny-shapes", "ViT-B/32", "ViT-B/16", "RN50")


@dataclass
class TrainConfig:
    pairs: Path
    output: Path
    model: str | None = None
    arch: str | None = None
    epochs: int = 10
    steps: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.05  # fraction of all steps
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.0
    checkpoint_every: int = 500
    resume: bool = False
    overwrite: bool = False  # start over, replacing OUTPUT.ckpt if an interrupted run left one
    bad_images: Literal["skip", "stop"] = "skip"
    workers: int = 0
    device: str = "auto"  # as models.resolve_device reads it
    half: bool = True

    def check(self) -> None:
        """Refuse settings that cannot train, before anything is read or built."""
        import math

        from clipcli.models import family_of

        if self.model and family_of(self.model) != "openai":  # the loop trains OpenAI's CLIP class only
            family = family_of(self.model)
            raise ModelError(f"train fine-tunes OpenAI-layout models only; {self.model} is of the {family} family")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be a positive number, not {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"--weight-decay must be 0 or more, not {self.weight_decay}")
        if not 0 <= self.warmup < 1:
            raise InputError(f"--warmup is a fraction of the steps, from 0 up to 1, not {self.warmup}")
        if self.resume and self.overwrite:
            raise InputError("give --resume (continue OUTPUT.ckpt) or --overwrite (start over), not both")


@dataclass
class StepInfo:
    step: int  # steps done, counting those before a resume
    total: int
    loss: float
    lr: float
    samples_per_s: float  # image-text pairs per second since this run (or resume) started training


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    val_image_to_text_r1: float | None = None
    val_text_to_image_r1: float | None = None


def _initial_model(config: TrainConfig) -> CLIP:
    from clipcli.models.families.openai import ARCHITECTURES, build_from_state_dict, read_state_dict, resolve_checkpoint

    if config.model and config.arch:
        raise InputError("give --model (fine-tune) or --arch (from scratch), not both")
    if config.model:
        path = resolve_checkpoint(config.model)
        model, _ = build_from_state_dict(read_state_dict(path), path)
        return model
    name = config.arch or "tiny-shapes"
    if name not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {name!r}; valid: {', '.join(PUBLIC_ARCHITECTURES)}")
    return ARCHITECTURES[name].build().float()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: gains, biases, embeddings and the temperature are left alone."""
    no_decay_names = ("token_embedding", "positional_embedding", "class_embedding", "logit_scale")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(n in name for n in no_decay_names):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, base: float, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over image->text rows and text->image columns."""
    import torch
    import torch.nn.functional as F

    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.T
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction)
    return sorted(order[n_val:]), sorted(order[:n_val])


def _epoch_order(train_idx: Sequence[int], seed: int, epoch: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed * 7919 + epoch + 1)
    return [train_idx[i] for i in torch.randperm(len(train_idx), generator=g).tolist()]


def _batch_at(train_idx: Sequence[int], seed: int, step: int, batch_size: int) -> list[int]:
    """The pairs of global ``step``: whole batches only, each epoch in its own shuffled order."""
    per_epoch = len(train_idx) // batch_size
    epoch, k = divmod(step, per_epoch)
    order = _epoch_order(train_idx, seed, epoch)
    return order[k * batch_size : (k + 1) * batch_size]


@dataclass
class _Recall:
    image_to_text: float
    text_to_image: float


def recall_at_1(model: CLIP, pixels: torch.Tensor, tokens: torch.Tensor, texts: Sequence[str]) -> _Recall:
    """Recall@1 both ways; identical captions count as the same answer (they cannot be told apart)."""
    import torch
    import torch.nn.functional as F

    from clipcli.models.families.openai import trim_padding

    model.eval()
    with torch.inference_mode():
        img = torch.cat(
            [F.normalize(model.encode_image(pixels[i : i + 256]), dim=-1) for i in range(0, len(pixels), 256)]
        )
        txt = torch.cat(
            [
                F.normalize(model.encode_text(trim_padding(tokens[i : i + 256])), dim=-1)
                for i in range(0, len(tokens), 256)
            ]
        )
    sim = img @ txt.T
    best_text = sim.argmax(dim=1).tolist()
    best_image = sim.argmax(dim=0).tolist()
    i2t = sum(texts[j] == texts[i] for i, j in enumerate(best_text)) / len(texts)
    t2i = sum(texts[j] == texts[i] for i, j in enumerate(best_image)) / len(texts)
    return _Recall(i2t, t2i)


class _Throughput:
    """Pairs per second since training began: what a step rate means to someone sizing a run."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.pairs = 0

    def add(self, pairs: int) -> float:
        self.pairs += pairs
        elapsed = time.perf_counter() - self.started
        return self.pairs / elapsed if elapsed > 0 else 0.0


def _report_bad_images(
    config: TrainConfig, pairs: Pairs, pixels: PixelSource, on_skip: Callable[[Skipped], None] | None
) -> None:
    """Stop at the first unreadable image, or report each one that will be left out."""
    for i, reason in sorted(pixels.reasons.items()):
        if config.bad_images == "stop":
            raise InputError(f"{config.pairs}: row {pairs.rows[i]}: {pairs.files[i]}: {reason}")
        if on_skip:
            on_skip(Skipped(str(pairs.files[i]), f"row {pairs.rows[i]}: {reason}"))


def _train_step(
    model: CLIP, optimizer: torch.optim.Optimizer, images: torch.Tensor, tokens: torch.Tensor, grad_clip: float
) -> float:
    """One optimiser step on one batch; the batch's loss before the step."""
    import torch

    from clipcli.models.families.openai import trim_padding

    # Trimmed like encode's batches, but through encode_text itself: training needs the gradients.
    loss = contrastive_loss(model.encode_image(images), model.encode_text(trim_padding(tokens)), model.logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return float(loss.detach())


def train(
    config: TrainConfig,
    on_step: Callable[[StepInfo], None] | None = None,
    on_preload: Callable[[int, int], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
    on_resume: Callable[[int, int], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    on_fresh_start: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train and write ``config.output`` (atomically); checkpoints go to ``OUTPUT.ckpt``.

    Callbacks: ``on_preload(images done, total)`` while images are read, ``on_skip`` for each image left
    out, ``on_resume(step, total steps)`` when a checkpoint is continued, ``on_step`` after each step,
    ``on_checkpoint(step)`` after each checkpoint is written, ``on_fresh_start(checkpoint)`` when ``resume``
    was asked for but there is no checkpoint to continue (the run starts from scratch).
    The output is locked for the whole run: a second run into it is refused before it starts. A checkpoint
    left by an interrupted run is the progress of that run: without ``resume`` or ``overwrite`` it is
    refused, never replaced.
    """
    from clipcli.atomic import OutputLock, is_stream
    from clipcli.store.ownership import refuse_unless_own, training_file_is_own

    config.check()
    if is_stream(config.output):
        raise OutputError(f"{config.output}: is a FIFO or a device; a model is a file (a zip archive): name one")
    ckpt = checkpoint_path(config.output)
    with OutputLock(config.output, is_dir=False), OutputLock(ckpt, is_dir=False):
        refuse_unless_own(config.output, lambda _head: training_file_is_own(config.output, "model"), "model")
        if (ckpt.exists() or ckpt.is_symlink()) and not ckpt.is_file():  # never opened, never removed
            raise OutputError(f"{ckpt}: is not a file (a FIFO, a folder or a link to nothing), so no checkpoint")
        if not config.resume:  # --resume reads it first, and refuses what is not a checkpoint of this run
            refuse_unless_own(ckpt, lambda _head: training_file_is_own(ckpt, "checkpoint"), "training checkpoint")
        if not (config.resume or config.overwrite) and (ckpt.exists() or ckpt.is_symlink()):
            raise OutputError(
                f"{ckpt}: holds the progress of an interrupted run; continue it with --resume, "
                "or pass --overwrite to start over"
            )
        return _train(config, on_step, on_preload, on_skip, on_resume, on_checkpoint, on_fresh_start)


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """What is at ``path`` (device, inode, size, mtime), not following a link; None where nothing is."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _train(
    config: TrainConfig,
    on_step: Callable[[StepInfo], None] | None,
    on_preload: Callable[[int, int], None] | None,
    on_skip: Callable[[Skipped], None] | None,
    on_resume: Callable[[int, int], None] | None,
    on_checkpoint: Callable[[int], None] | None,
    on_fresh_start: Callable[[Path], None] | None,
) -> TrainResult:
    import torch

    from clipcli.models.families.openai import tokenize
    from clipcli.models.precision import resolve_device

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    pairs = read_pairs(config.pairs)
    model = _initial_model(config)
    device = resolve_device(config.device)
    n_px = model.visual.input_resolution
    tokens = tokenize(pairs.texts, model.context_length)

    total_pairs = len(pairs.files)
    pixels = PixelSource(
        pairs.files, n_px, config.workers, (lambda n: on_preload(n, total_pairs)) if on_preload else None
    )
    _report_bad_images(config, pairs, pixels, on_skip)

    usable = [i for i in range(total_pairs) if pixels.ok[i]]
    train_idx, val_idx = _split(len(usable), config.val_fraction, config.seed)
    train_idx = [usable[i] for i in train_idx]
    val_idx = [usable[i] for i in val_idx]
    batch_size = min(config.batch_size, len(train_idx))
    if batch_size < 2:
        raise InputError(f"{config.pairs}: need at least 2 usable training pairs, found {len(train_idx)}")
    per_epoch = len(train_idx) // batch_size
    total_steps = config.steps or config.epochs * per_epoch
    warmup_steps = max(1, int(total_steps * config.warmup))

    model = model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    step = 0
    ckpt = checkpoint_path(config.output)
    run_only = ("resume", "overwrite", "workers", "checkpoint_every")
    signature = {k: str(v) for k, v in asdict(config).items() if k not in run_only}
    ours = None  # what is at the checkpoint's name as this run left it: only that is replaced or removed
    if config.resume and ckpt.exists():
        step = resume(ckpt, signature, model, optimizer)
        ours = _identity(ckpt)
        if on_resume:
            on_resume(step, total_steps)
    elif config.resume and on_fresh_start:
        on_fresh_start(ckpt)
    elif config.overwrite:
        # Asked for: the earlier run's progress goes now, so an interruption before this run's first
        # checkpoint leaves no checkpoint of another run to be mistaken for this one's. Only the one
        # checked as train's at the start: a file put there since is left as it is.
        from clipcli.atomic import checked_identity, file_identity, real_path

        if file_identity(real_path(ckpt)) != checked_identity(ckpt):
            raise OutputError(f"{ckpt}: changed since this run checked it; it is left as it is: remove it, or rerun")
        ckpt.unlink(missing_ok=True)

    loss = float("nan")
    throughput = _Throughput()
    while step < total_steps:
        idx = _batch_at(train_idx, config.seed, step, batch_size)
        lr = lr_at(step, total_steps, config.lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = _train_step(model, optimizer, pixels.get(idx).to(device), tokens[idx].to(device), config.grad_clip)
        step += 1
        pairs_per_s = throughput.add(len(idx))
        if on_step:
            on_step(StepInfo(step, total_steps, loss, lr, pairs_per_s))
        if step % config.checkpoint_every == 0 and step < total_steps:
            if _identity(ckpt) != ours:
                raise OutputError(
                    f"{ckpt}: appeared or changed during the run, not written by it; left as it is, and the run "
                    "stops: move it away and run again"
                )
            with signals_held():
                atomic_save(checkpoint_state(model, optimizer, step, signature), ckpt)
                ours = _identity(ckpt)
                if on_checkpoint:
                    on_checkpoint(step)

    result = TrainResult(step, loss, 0.0)
    if val_idx:
        recall = recall_at_1(
            model, pixels.get(val_idx).to(device), tokens[val_idx].to(device), [pairs.texts[i] for i in val_idx]
        )
        result.val_image_to_text_r1 = recall.image_to_text
        result.val_text_to_image_r1 = recall.text_to_image
    model.eval()
    with signals_held():
        save_model(export_state_dict(model, config.half), config.output)
        if _identity(ckpt) == ours:  # this run's progress, now in the model; anything else stays
            ckpt.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - started
    return result
