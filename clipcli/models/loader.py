"""The loader that picks a family from ``--model`` and loads the model it names.

Grammar of ``--model`` (the same for every command):

- ``NAME`` or ``FILE``: one of OpenAI's nine names, a bundled model, or an OpenAI-layout checkpoint
  (:mod:`clipcli.models.families.openai`);
- ``open_clip:ARCH/TAG``, ``open_clip:ARCH/FILE.pt``, ``open_clip:hf-hub:ORG/REPO``
  (:mod:`clipcli.models.families.open_clip`, extra ``clipcli[open_clip]``);
- ``hf:ORG/REPO`` or ``hf:DIR``: a Hugging Face ``CLIPModel`` / ``SiglipModel`` family repo or saved folder
  (:mod:`clipcli.models.families.hf`, extra ``clipcli[hf]``).

What every family returns is the contract in :mod:`clipcli.models.contract`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clipcli.errors import ModelError
from clipcli.models.contract import DownloadProgress, LoadedModel, ModelEntry
from clipcli.models.precision import Precision, keep_freed_memory, resolve_device, resolve_precision

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "ViT-B/32"
FAMILY_PREFIXES = {"open_clip:": "open_clip", "hf:": "hf"}


@dataclass(frozen=True)
class ModelOptions:
    """``--model``, ``--device`` and ``--precision`` as one value: they travel together from a command to
    the core and to Ray's actors (None: ``$CLIPCLI_MODEL``, else :data:`DEFAULT_MODEL`)."""

    spec: str | None = None
    device: str = "auto"
    precision: str = "auto"


def default_model() -> str:
    return os.environ.get("CLIPCLI_MODEL") or DEFAULT_MODEL


def family_of(spec: str) -> str:
    return next((family for prefix, family in FAMILY_PREFIXES.items() if spec.startswith(prefix)), "openai")


def load_model(
    spec: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    on_download: DownloadProgress | None = None,
) -> LoadedModel:
    """The model ``spec`` names (see the module's grammar), on ``device`` at ``precision``.

    int8 is a rewrite of an fp32 model's towers (:mod:`clipcli.models.quantize`): the family loads fp32, then
    the towers are quantised; a device or family that cannot run it is refused (one line, exit 2).
    """
    if spec is None and os.environ.get("CLIPCLI_MODEL"):
        # The model was not named on the command line: an error about it must say where it came from.
        try:
            return load_model(os.environ["CLIPCLI_MODEL"], device, precision, on_download)
        except ModelError as e:
            raise type(e)(f"{e} (from the environment variable CLIPCLI_MODEL: change it, or pass --model)") from e
    spec = spec or default_model()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if prec != "int8":
        lm = _load_family(spec, dev, prec, on_download)
    else:
        from clipcli.models.quantize import check_int8_device, quantize_model

        check_int8_device(dev)
        lm = _load_family(spec, dev, "fp32", on_download)
        quantize_model(lm)
    if dev.type == "cpu":
        keep_freed_memory()  # from here on: the forward passes' activations (see its docstring)
    return lm


def _load_family(spec: str, dev: torch.device, prec: Precision, on_download: DownloadProgress | None) -> LoadedModel:
    lm = _load_weights(spec, dev, prec, on_download)
    # Taken now, from the files just read, not when a command first asks: a file replaced during a long
    # run must not lend its digest to the weights loaded before it (outputs and caches are keyed by it).
    lm.checksum  # noqa: B018
    return lm


def _load_weights(spec: str, dev: torch.device, prec: Precision, on_download: DownloadProgress | None) -> LoadedModel:
    family = family_of(spec)
    if family == "open_clip":
        from clipcli.models.families import open_clip

        return open_clip.load(spec.removeprefix("open_clip:"), spec, dev, prec)
    if family == "hf":
        from clipcli.models.families import hf

        return hf.load(spec.removeprefix("hf:"), spec, dev, prec)
    from clipcli.models.families import openai

    return openai.load(spec, dev, prec, on_download)


def list_models(families: bool = True) -> list[ModelEntry]:
    """OpenAI's and the bundled models, then what each installed optional family knows or has cached:
    open_clip's pretrained ``ARCH/TAG`` names, and the CLIP and SigLIP repos in the Hugging Face cache.
    A family whose extra is not installed is skipped quietly."""
    from clipcli.models.families import openai

    entries = openai.list_entries()
    if not families:
        return entries
    import importlib.util

    if importlib.util.find_spec("open_clip") is not None:
        from clipcli.models.families import open_clip

        entries += open_clip.list_entries()
    if importlib.util.find_spec("huggingface_hub") is not None and importlib.util.find_spec("transformers"):
        from clipcli.models.families import hf

        entries += hf.list_entries()
    return entries
