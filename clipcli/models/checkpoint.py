"""Reading checkpoints without running anything they contain.

A checkpoint is a pickle, and unpickling can call any function the file names. clipcli reads two
kinds of files and runs nothing from either:

* plain ``torch.save`` files, through ``torch.load(weights_only=True)``, which rebuilds only tensors
  and plain containers;
* TorchScript archives (OpenAI's nine models are traced modules saved this way), whose code
  ``torch.jit.load`` would run: :mod:`clipcli.models.torchscript` reads their weights without it.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clipcli.errors import ModelError

REFUSED = "contains code or objects clipcli will not load (only tensors are read from checkpoints)"
RESAVE = "re-save a model you trust as its weights alone: torch.save(model.state_dict(), path)"


def refusal(path: Path, what: str | None = None, remedy: str = RESAVE) -> ModelError:
    """The one message for a checkpoint that holds more than tensors (malicious or a pickled object)."""
    named = f"; it refers to {what}" if what else ""
    return ModelError(f"{path}: {REFUSED}{named}; {remedy}")


# Keys a Hugging Face checkpoint may hold that its model has no use for, and that change no result: old
# saves' ``position_ids`` buffers (an arange), and the pooler of a base model whose classification head
# does not use one (roberta-large-mnli's). Anything else unexpected means a model other than the config's.
_UNUSED_KEYS = re.compile(r"(^|\.)(position_ids|pooler\.[\w.]+)$")
_KEYS_SHOWN = 4


def refuse_incomplete(info: Mapping[str, Any], where: str) -> None:
    """Refuse a Hugging Face model whose weights file did not fill it (transformers' loading info).

    A missing tensor would be left at its random initialisation, so two runs would give different
    answers with exit 0; an unexpected one is a weight the model never reads. Both are refused, as the
    OpenAI and open_clip families refuse a state dict that does not match the architecture.
    """
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    unexpected = sorted(str(k) for k in info.get("unexpected_keys") or () if not _UNUSED_KEYS.search(str(k)))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    problems = [
        f"{what} {_some(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        if keys
    ]
    if problems:
        raise ModelError(
            f"{where}: the weights do not match the model's config ({'; '.join(problems)}); "
            "clipcli never runs a model with randomly initialised weights"
        )


def _some(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return shown + (f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else "")


def plain_reason(e: BaseException) -> str:
    """The gist of a loading error for a one-line message: its first sentence, whole, no torch advice."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    first = text.splitlines()[0].strip()
    # torch appends advice after the first sentence ("This is an internal miniz error. If you...").
    sentence = re.split(r"(?<=[a-z0-9)\]])\. ", first, maxsplit=1)[0]
    return sentence.rstrip(".") or type(e).__name__


def load_tensors(path: Path, remedy: str = RESAVE) -> Any:
    """``torch.load`` restricted to tensors and plain containers; any failure is a one-line ModelError.

    ``remedy`` ends the message for a file that holds more than that.
    """
    import torch

    if is_torchscript(path):  # torch.load would only say weights_only=False is needed: code, refused here
        raise refusal(path, "TorchScript code", remedy)
    if not _looks_like_torch_save(path):
        raise ModelError(f"{path}: not a readable checkpoint (not a PyTorch file: neither a zip nor a pickle)")
    try:
        with warnings.catch_warnings():
            # torch warns on stderr about pickle protocols and deprecations; the CLI prints one line.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise refusal(path, _refused_global(str(e)), remedy) from None
        raise ModelError(f"{path}: not a readable checkpoint ({plain_reason(e)})") from e
    except Exception as e:  # on garbage input torch.load raises almost anything, even KeyError
        raise ModelError(f"{path}: not a readable checkpoint ({_load_failure(e)})") from e


def _load_failure(e: Exception) -> str:
    if isinstance(e, EOFError):
        return "the file is empty or ends early"
    if isinstance(e, KeyError):  # torch.load's legacy reader, on a file that is no pickle at all
        return "not a PyTorch file"
    return plain_reason(e)


def _refused_global(message: str) -> str | None:
    """The function or class torch's weights-only reader refused, as its message names it."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if not found:
        return None
    return found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"  # torch drops "builtins."


def _looks_like_torch_save(path: Path) -> bool:
    """A zip (torch.save's format since 1.6) or a pickle of protocol 2 or later (the legacy format)."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return True  # let torch.load report the reason it cannot read it
    return head.startswith((b"PK\x03\x04", b"\x80")) or not head


def is_torchscript(path: Path) -> bool:
    """A zip with TorchScript code or constants (``torch.save`` zips have neither)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
