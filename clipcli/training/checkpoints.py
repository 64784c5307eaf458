"""A training run's resumable checkpoint (``OUTPUT.ckpt``): written whole under held stop signals, read back
without running anything in it and checked against the run's settings, and the exported weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import InputError, ModelError

if TYPE_CHECKING:
    import torch
    from clip.model import CLIP


def checkpoint_path(output: Path) -> Path:
    """Where a run writing ``output`` keeps its resumable checkpoint."""
    return output.with_name(output.name + ".ckpt")


def atomic_save(obj: dict[str, Any], path: Path, kind: str = "checkpoint") -> None:
    """``obj`` as ``torch.save`` writes it (``clip.load`` reads a model as before), whole or not at all,
    marked as clipcli's ``kind`` (:func:`~clipcli.store.ownership.training_file_is_own`): a later run may
    replace this file, and no other."""
    import zipfile

    import torch

    from clipcli.atomic import atomic_write
    from clipcli.store.ownership import training_mark

    with atomic_write(path, "w+b") as f:
        torch.save(obj, f)
        f.seek(0)
        with zipfile.ZipFile(f, "a") as archive:
            folder = archive.namelist()[0].split("/", 1)[0]
            archive.writestr(*training_mark(folder, kind))


def save_model(state_dict: dict[str, Any], path: Path) -> None:
    """The trained weights, marked as clipcli's model (see :func:`atomic_save`)."""
    atomic_save(state_dict, path, "model")


def checkpoint_state(
    model: CLIP, optimizer: torch.optim.Optimizer, step: int, signature: dict[str, str]
) -> dict[str, Any]:
    """What resume needs, in types ``torch.load(weights_only=True)`` reads: tensors, numbers, strings."""
    import torch

    return {
        "signature": signature,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "step": step,
    }


START_OVER = "delete it to start the run over"


@dataclass
class ResumeState:
    model: dict[str, Any]
    optimizer: dict[str, Any]
    rng: torch.Tensor
    step: int


def read_checkpoint(ckpt: Path, signature: dict[str, str]) -> ResumeState:
    """Read OUTPUT.ckpt without running anything in it, and check it belongs to this run."""
    import torch

    from clipcli.models.checkpoint import load_tensors

    # A pickle could run code: only tensors and plain values are read.
    state = load_tensors(ckpt, remedy=START_OVER)
    kinds = {"signature": dict, "model": dict, "optimizer": dict, "rng": torch.Tensor, "step": int}
    wrong = [k for k, kind in kinds.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if wrong:
        raise ModelError(f"{ckpt}: not a clipcli training checkpoint (no valid {', '.join(wrong)}); {START_OVER}")
    if state["signature"] != signature:
        changed = sorted(k for k in signature if state["signature"].get(k) != signature[k])
        raise InputError(f"{ckpt}: checkpoint was made with different settings ({', '.join(changed)})")
    if state["rng"].dtype != torch.uint8 or state["step"] < 0:
        raise ModelError(f"{ckpt}: not a clipcli training checkpoint (bad random state or step); {START_OVER}")
    return ResumeState(state["model"], state["optimizer"], state["rng"], state["step"])


def resume(ckpt: Path, signature: dict[str, str], model: CLIP, optimizer: torch.optim.Optimizer) -> int:
    """Restore model, optimiser and random state from ``ckpt``; the step to continue from."""
    import torch

    state = read_checkpoint(ckpt, signature)
    try:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        torch.set_rng_state(state.rng)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        from clipcli.models.checkpoint import plain_reason

        raise ModelError(f"{ckpt}: does not fit this run ({plain_reason(e)}); {START_OVER}") from e
    return state.step


def export_state_dict(model: CLIP, half: bool) -> dict[str, Any]:
    """OpenAI's layout: the keys ``clip.model.build_model`` reads (fp16 floats when ``half``)."""
    return {
        k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().clone()
        for k, v in model.state_dict().items()
    }
