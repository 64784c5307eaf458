"""The model contract: what every family implements and every command holds (:class:`LoadedModel`).

Families (:mod:`clipcli.models.families`) implement it; :mod:`clipcli.models.loader` picks the family
that ``--model`` names. Commands never ask which family they hold: tokenising, encoding, preprocessing
geometry and the way scores become probabilities are all answered by the :class:`LoadedModel` they get.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from clipcli.errors import ModelError
from clipcli.images.decode import ImageSpec
from clipcli.models.precision import Precision

if TYPE_CHECKING:
    import torch
    from torch import nn

DownloadProgress = Callable[[int, "int | None"], None]
"""Called with (bytes just received, total bytes or None)."""

Scoring = Literal["softmax", "sigmoid"]


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

    def hold(self, name: str, model: Any, device: torch.device, precision: Precision) -> None:
        """Set what every family's model holds: its name, the family's own model object (whose learnt
        temperature gives :attr:`logit_scale`), its device and its precision."""
        self.name = name
        self.model = model
        self.device = device
        self.precision = precision
        self.logit_scale = float(model.logit_scale.exp())

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
        """Image features (N x D, not normalised) of model input made by
        :func:`~clipcli.images.decode.normalize_pixels`."""

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


def require_extra(module: str, extra: str, needed_by: str) -> Any:
    """Import an optional library, or say which extra installs it (exit 2). ``needed_by`` names what
    needs it, as the subject of the message: "open_clip models", "--where filters", "clipcli serve"."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        verb = "need" if needed_by.endswith("s") else "needs"
        raise ModelError(f"{needed_by} {verb} the {extra} extra: pip install 'clipcli[{extra}]' ({e})") from None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # openai, bundled, open_clip, hf
    path: Path | None
    available: bool
    size: int | None
