"""Batched, L2-normalised image and text embeddings under ``inference_mode``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from clipcli.errors import InputError
from clipcli.images import DEFAULT_MAX_PIXELS, Batch, ImageRef, Skipped, iter_batches, normalize_pixels
from clipcli.models import LoadedModel, clip_module

if TYPE_CHECKING:
    import torch

TEXT_BATCH = 256


@cache
def _bpe() -> Any:
    return clip_module("simple_tokenizer").SimpleTokenizer()


def tokenize(texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """Token ids as ``clip.tokenize`` lays them out (start, BPE, end, zero padding), one row per text.

    A text that does not fit is an error naming it, where ``clip.tokenize`` would raise for the batch.
    """
    import torch

    bpe = _bpe()
    start, end = bpe.encoder["<|startoftext|>"], bpe.encoder["<|endoftext|>"]
    tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [start, *bpe.encode(text), end]
        if len(ids) > context_length:
            raise InputError(f"text is longer than the model's {context_length}-token context: {text!r}")
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """A token batch cut after its longest text's end token: the padding no text reaches is dropped.

    The causal mask means no position after a text's end token can change that token's feature, so
    encoding the trimmed batch gives the same features for a fraction of the work.
    """
    length = int(tokens.argmax(dim=-1).max()) + 1  # the end token has the highest id
    return tokens[:, :length]


def encode_tokens(lm: LoadedModel, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Text features for a token batch, cut to its longest text (see :func:`trim_padding`)."""
    import torch

    with torch.inference_mode():
        features = lm.model.encode_text(trim_padding(tokens).to(lm.device)).float()
    return (torch.nn.functional.normalize(features, dim=-1) if normalize else features).cpu()


def encode_texts(
    lm: LoadedModel,
    texts: Sequence[str],
    batch_size: int = TEXT_BATCH,
    normalize: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Embeddings of ``texts`` (N x D, float32, in input order), L2-normalised unless asked not to.

    ``on_progress`` gets the number of texts encoded after each batch (the counts add up to N), so a
    caller can move a bar through a long run of prompts.
    """
    import torch

    if not texts:
        return torch.empty(0, lm.embed_dim)
    tokens = tokenize(texts, lm.architecture.context_length)
    # Batching texts of similar length together keeps the trimmed batches short.
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)
    out = torch.empty(len(texts), lm.embed_dim)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = encode_tokens(lm, tokens[idx], normalize)
        if on_progress:
            on_progress(len(idx))
    return out


def runs_elsewhere(lm: LoadedModel) -> bool:
    """Whether the model runs off the CPU, so decoding can overlap it instead of taking turns."""
    return lm.device.type != "cpu"


def encode_pixels(lm: LoadedModel, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Embeddings of preprocessed images (N x 3 x R x R) -> N x D float32 on the CPU."""
    import torch

    with torch.inference_mode():
        features = lm.model.encode_image(pixels.to(lm.device, non_blocking=True)).float()
    return (torch.nn.functional.normalize(features, dim=-1) if normalize else features).cpu()


@dataclass
class EmbeddedBatch:
    indices: list[int]  # input positions of the images embedded, in input order
    names: list[str]  # their paths as given (or dataset ids)
    embeddings: torch.Tensor  # one row per image embedded
    sizes: list[tuple[int, int]]  # full-resolution (width, height) per image embedded
    skipped: list[Skipped]


def embed_batches(
    lm: LoadedModel, batches: Iterable[Batch], names: Sequence[str], normalize: bool = True
) -> Iterator[EmbeddedBatch]:
    """Embed decoded batches; failures come back as skipped, named by ``names``."""
    import torch

    for batch in batches:
        skipped = [Skipped(names[i], reason) for i, reason in batch.skipped]
        if batch.images is None:
            embeddings = torch.empty(0, lm.embed_dim)
        else:
            embeddings = encode_pixels(lm, normalize_pixels(batch.images), normalize)
        yield EmbeddedBatch(batch.indices, [names[i] for i in batch.indices], embeddings, batch.sizes, skipped)


def iter_image_embeddings(
    lm: LoadedModel,
    refs: Sequence[ImageRef],
    batch_size: int = 32,
    workers: int = 0,
    exact: bool = False,
    normalize: bool = True,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[EmbeddedBatch]:
    """Embed image files batch by batch, in input order; unreadable images (and images of more than
    ``max_pixels`` pixels) come back as skipped."""
    overlap = runs_elsewhere(lm)
    batches = iter_batches(refs, lm.input_resolution, batch_size, workers, exact, overlap, max_pixels)
    return embed_batches(lm, batches, [r.path for r in refs], normalize)
