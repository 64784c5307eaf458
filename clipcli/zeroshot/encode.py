"""Batched, L2-normalised image and text embeddings under ``inference_mode``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipcli.images.batches import Batch, iter_batches
from clipcli.images.decode import DEFAULT_MAX_PIXELS, normalize_pixels
from clipcli.images.gpu import DeviceBatch, iter_device_batches, use_device_decoding
from clipcli.images.sources import ImageRef, Skipped
from clipcli.models import LoadedModel

if TYPE_CHECKING:
    import torch

TEXT_BATCH = 256


def encode_tokens(lm: LoadedModel, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Text features (N x D float32 on the CPU) for a token batch of ``lm.tokenize``."""
    import torch

    with torch.inference_mode():
        features = lm.encode_tokens(tokens).float()
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
    tokens = lm.tokenize(texts)
    # Batching texts of similar length together keeps the batches short where the family trims padding.
    order = torch.argsort(lm.token_lengths(tokens), stable=True)
    out = torch.empty(len(texts), lm.embed_dim)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = encode_tokens(lm, tokens[idx], normalize)
        if on_progress:
            on_progress(len(idx))
    return out


def runs_elsewhere(lm: LoadedModel) -> bool:
    return lm.runs_elsewhere


def encode_pixels(lm: LoadedModel, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Embeddings of preprocessed images (N x 3 x R x R) -> N x D float32 on the CPU."""
    import torch

    with torch.inference_mode():
        features = lm.encode_pixels(pixels).float()
    return (torch.nn.functional.normalize(features, dim=-1) if normalize else features).cpu()


@dataclass
class EmbeddedBatch:
    indices: list[int]  # input positions of the images embedded, in input order
    names: list[str]  # their paths as given (or dataset ids)
    embeddings: torch.Tensor  # one row per image embedded
    sizes: list[tuple[int, int]]  # full-resolution (width, height) per image embedded
    skipped: list[Skipped]
    stats: list[tuple[int, float]] | None = None  # (bytes, mtime) per image from the open file, where known
    meta: list[dict[str, Any]] | None = None  # per image: its metadata columns (clipcli.images.refs.Decoded)


def embed_batches(
    lm: LoadedModel, batches: Iterable[Batch | DeviceBatch], names: Sequence[str], normalize: bool = True
) -> Iterator[EmbeddedBatch]:
    """Embed decoded batches (uint8 from the CPU, or model input already on the device); failures come
    back as skipped, named by ``names``."""
    import torch

    for batch in batches:
        skipped = [Skipped(names[i], reason) for i, reason in batch.skipped]
        pixels = _model_input(lm, batch)
        embeddings = torch.empty(0, lm.embed_dim) if pixels is None else encode_pixels(lm, pixels, normalize)
        stats = batch.stats if isinstance(batch, Batch) else None
        meta = batch.meta if isinstance(batch, Batch) else None
        names_of = [names[i] for i in batch.indices]
        yield EmbeddedBatch(batch.indices, names_of, embeddings, batch.sizes, skipped, stats, meta)


def _model_input(lm: LoadedModel, batch: Batch | DeviceBatch) -> torch.Tensor | None:
    if isinstance(batch, Batch):
        return None if batch.images is None else normalize_pixels(batch.images, lm.image)
    batch.wait()
    return batch.pixels


def iter_image_embeddings(
    lm: LoadedModel,
    refs: Sequence[ImageRef],
    batch_size: int = 32,
    workers: int = 0,
    exact: bool = False,
    normalize: bool = True,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decode: str = "auto",
) -> Iterator[EmbeddedBatch]:
    """Embed image files batch by batch, in input order; unreadable images (and images of more than
    ``max_pixels`` pixels) come back as skipped.

    ``decode`` (see :func:`clipcli.images.gpu.use_device_decoding`): ``auto`` decodes JPEGs on the
    model's GPU when it runs on CUDA, ``gpu`` insists on it, ``cpu`` decodes with Pillow on the CPU.
    """
    batches: Iterable[Batch | DeviceBatch]
    if use_device_decoding(decode, lm.device):
        batches = iter_device_batches(refs, lm.image, lm.device, batch_size, exact, max_pixels)
    else:
        batches = iter_batches(refs, lm.image, batch_size, workers, exact, runs_elsewhere(lm), max_pixels)
    return embed_batches(lm, batches, [r.path for r in refs], normalize)
