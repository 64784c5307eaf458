"""The model contract every command holds, and the loader that picks a family from ``--model``.

Grammar of ``--model`` (the same for every command):

- ``NAME`` or ``FILE``: one of OpenAI's nine names, a bundled model, or an OpenAI-layout checkpoint
  (:mod:`clipcli.families.openai`);
- ``open_clip:ARCH/TAG``, ``open_clip:ARCH/FILE.pt``, ``open_clip:hf-hub:ORG/REPO``
  (:mod:`clipcli.families.open_clip`, extra ``clipcli[open_clip]``);
- ``hf:ORG/REPO`` or ``hf:DIR``: a Hugging Face ``CLIPModel`` / ``SiglipModel`` family repo or saved folder
  (:mod:`clipcli.families.hf`, extra ``clipcli[hf]``).

Commands never ask which family they hold: tokenising, encoding, preprocessing geometry and the way
scores become probabilities are all answered by the :class:`LoadedModel` they get.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from clipcli.errors import ModelError
from clipcli.images import ImageSpec
from clipcli.precision import Precision, resolve_device, resolve_precision

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_MODEL = "ViT-B/32"
DownloadProgress = Callable[[int, "int | None"], None]
"""Called with (bytes just received, total bytes or None)."""

Scoring = Literal["softmax", "sigmoid"]
FAMILY_PREFIXES = {"open_clip:": "open_clip", "hf:": "hf"}


def default_model() -> str:
    return os.environ.get("CLIPCLI_MODEL") or DEFAULT_MODEL


class LoadedModel(ABC):
    """A ready-to-run image-text model of any family, on its device at its precision.

    Scores: ``logit_scale x cosine (+ logit_bias)``. ``softmax`` models (CLIP) turn a row of scores over
    the labels into probabilities that sum to 1; ``sigmoid`` models (SigLIP) score each label on its
    own, as the model was trained, so the probabilities of one image need not sum to 1.
    """

    name: str  # --model as given: it names the model in outputs, reports and saved embeddings
    family: str
    device: torch.device
    precision: Precision
    embed_dim: int
    image: ImageSpec
    scoring: Scoring = "softmax"
    logit_scale: float
    logit_bias: float | None = None

    @property
    @abstractmethod
    def checksum(self) -> str:
        """SHA-256 identifying the weights: saved embeddings and caches are keyed by it."""

    @property
    def input_resolution(self) -> int:
        return self.image.size

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids, one row per text, as the family's own tokenizer lays them out (N x L)."""

    def token_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens per text (N): texts of similar length are batched together where that saves work."""
        import torch

        return torch.full((tokens.shape[0],), tokens.shape[1])

    @abstractmethod
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text features (N x D, not normalised, any float type, on any device) of a token batch."""

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features (N x D, not normalised) of model input made by :func:`clipcli.images.normalize_pixels`."""

    def towers(self) -> dict[str, nn.Module]:
        """The torch modules that do the image and the text work (``image``, ``text``): what a precision
        change such as int8 quantisation rewrites. Families that cannot offer them say so."""
        raise ModelError(f"{self.name}: the {self.family} family does not expose its towers for this precision")

    def logits(self, image_embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """The model's own ``logits_per_image`` (N x L) for normalised embeddings."""
        scores = self.logit_scale * image_embeddings @ classifier.T
        return scores if self.logit_bias is None else scores + self.logit_bias

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    @property
    def runs_elsewhere(self) -> bool:
        """Whether the model runs off the CPU, so decoding can overlap it instead of taking turns."""
        return self.device.type != "cpu"


def family_of(spec: str) -> str:
    return next((family for prefix, family in FAMILY_PREFIXES.items() if spec.startswith(prefix)), "openai")


def load_model(
    spec: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    on_download: DownloadProgress | None = None,
) -> LoadedModel:
    """The model ``spec`` names (see the module's grammar), on ``device`` at ``precision``.

    int8 is a rewrite of an fp32 model's towers (:mod:`clipcli.quantize`): the family loads fp32, then
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
        return _load_family(spec, dev, prec, on_download)
    from clipcli.quantize import check_int8_device, quantize_model

    check_int8_device(dev)
    lm = _load_family(spec, dev, "fp32", on_download)
    quantize_model(lm)
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
        from clipcli.families import open_clip

        return open_clip.load(spec.removeprefix("open_clip:"), spec, dev, prec)
    if family == "hf":
        from clipcli.families import hf

        return hf.load(spec.removeprefix("hf:"), spec, dev, prec)
    from clipcli.families import openai

    return openai.load(spec, dev, prec, on_download)


def require_extra(module: str, extra: str, family: str) -> Any:
    """Import an optional family's library, or say which extra installs it (exit 2)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModelError(f"{family} models need the {extra} extra: pip install 'clipcli[{extra}]' ({e})") from None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # openai, bundled, open_clip, hf
    path: Path | None
    available: bool
    size: int | None


def list_models(families: bool = True) -> list[ModelEntry]:
    """OpenAI's and the bundled models, then what each installed optional family knows or has cached:
    open_clip's pretrained ``ARCH/TAG`` names, and the CLIP and SigLIP repos in the Hugging Face cache.
    A family whose extra is not installed is skipped quietly."""
    from clipcli.families import openai

    entries = openai.list_entries()
    if not families:
        return entries
    import importlib.util

    if importlib.util.find_spec("open_clip") is not None:
        from clipcli.families import open_clip

        entries += open_clip.list_entries()
    if importlib.util.find_spec("huggingface_hub") is not None and importlib.util.find_spec("transformers"):
        from clipcli.families import hf

        entries += hf.list_entries()
    return entries
