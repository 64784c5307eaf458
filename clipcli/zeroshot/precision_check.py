"""The quality guard of a cheaper precision: how far its embeddings and answers move from fp32's.

Both precisions embed the same images with the same model in one run; the per-image cosine between
the two embeddings, and (with labels) whether each image's top-1 zero-shot label stays the same, say
whether the cheaper one can stand in for fp32 on these images. ``clipcli bench-precision`` prints it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING

from clipcli.errors import InputError
from clipcli.images.sources import ImageRef, Skipped
from clipcli.models import ModelOptions, load_model
from clipcli.zeroshot.encode import iter_image_embeddings
from clipcli.zeroshot.prompts import TemplateSet, zero_shot_classifier

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PrecisionRun:
    precision: str
    names: list[str]  # the images embedded, in input order
    embeddings: torch.Tensor  # one normalised row per image
    seconds: float  # embedding the images (decoding included), after the model is loaded
    top1: list[str] | None  # each image's best label, when labels were given

    @property
    def images_per_second(self) -> float:
        return len(self.names) / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class Comparison:
    reference: PrecisionRun
    candidate: PrecisionRun
    skipped: list[Skipped]
    missing: list[Skipped] = field(default_factory=list)  # inputs never read (not found, not images)

    @property
    def cosines(self) -> torch.Tensor:
        return (self.reference.embeddings * self.candidate.embeddings).sum(dim=1)

    @property
    def changed(self) -> list[tuple[str, str, str]]:
        """(image, reference top-1, candidate top-1) for each image whose top-1 label differs."""
        ref, cand = self.reference.top1 or [], self.candidate.top1 or []
        return [(n, a, b) for n, a, b in zip(self.reference.names, ref, cand, strict=False) if a != b]

    @property
    def top1_agreement(self) -> float | None:
        if self.reference.top1 is None:
            return None
        return 1 - len(self.changed) / max(len(self.reference.names), 1)

    def table(self) -> list[str]:
        """Tab-separated lines, a header then one per precision: images per second, the lowest and
        median cosine to the reference, and (with labels) the share of unchanged top-1 labels."""
        cosines, agreement = self.cosines, self.top1_agreement
        lines = ["precision\timages\timages_per_s\tcosine_min\tcosine_median\ttop1_agreement"]
        for run, low, mid in (
            (self.reference, 1.0, 1.0),
            (self.candidate, float(cosines.min()), float(cosines.median())),
        ):
            same = "" if agreement is None else f"{1.0 if run is self.reference else agreement:.4f}"
            lines.append(
                f"{run.precision}\t{len(run.names)}\t{run.images_per_second:.1f}\t{low:.5f}\t{mid:.5f}\t{same}"
            )
        return lines

    def below(self, min_cosine: float) -> list[tuple[str, float]]:
        """(image, cosine) for each image whose candidate embedding is below ``min_cosine`` to the reference."""
        pairs = zip(self.reference.names, self.cosines.tolist(), strict=True)
        return [(name, float(c)) for name, c in pairs if c < min_cosine]


def run_at(
    spec: str | None,
    device: str,
    precision: str,
    refs: Sequence[ImageRef],
    labels: Sequence[str] | None,
    templates: TemplateSet,
    batch_size: int,
) -> tuple[PrecisionRun, list[Skipped]]:
    import torch

    lm = load_model(spec, device, precision)
    start = time.perf_counter()
    names: list[str] = []
    rows: list[torch.Tensor] = []
    skipped: list[Skipped] = []
    for batch in iter_image_embeddings(lm, refs, batch_size):
        names += batch.names
        rows.append(batch.embeddings)
        skipped += batch.skipped
    seconds = time.perf_counter() - start
    embeddings = torch.cat(rows) if rows else torch.empty(0, lm.embed_dim)
    top1 = None
    if labels:
        classifier = zero_shot_classifier(lm, labels, templates)
        top1 = [labels[i] for i in (embeddings @ classifier.T).argmax(dim=1).tolist()]
    return PrecisionRun(lm.precision, names, embeddings, seconds, top1), skipped


def compare_precisions(
    spec: str | None,
    refs: Sequence[ImageRef],
    precision: str = "int8",
    reference: str = "fp32",
    device: str = "cpu",
    labels: Sequence[str] | None = None,
    templates: TemplateSet | None = None,
    batch_size: int = 32,
) -> Comparison:
    """Embed (and classify) ``refs`` at ``reference`` and at ``precision``, one after the other."""
    templates = templates or TemplateSet("simple", ("a photo of a {}.",))
    base, skipped = run_at(spec, device, reference, refs, labels, templates, batch_size)
    if not base.names:
        raise InputError("no image could be read: nothing to compare")
    other, _ = run_at(spec, device, precision, refs, labels, templates, batch_size)
    return Comparison(base, other, skipped)


def check_precision(
    inputs: Sequence[str],
    models: ModelOptions,
    labels: Sequence[str] | None,
    templates: TemplateSet,
    batch_size: int = 32,
    stdin: IO[str] | None = None,
) -> Comparison:
    """``bench-precision``: find the images, then compare ``models.precision`` with fp32 on them."""
    from clipcli.images.sources import discover, nothing_found

    refs, missing = discover(inputs, stdin)
    if not refs:
        raise nothing_found(inputs, missing)
    result = compare_precisions(
        models.spec, refs, models.precision, "fp32", models.device, labels, templates, batch_size=batch_size
    )
    return replace(result, missing=missing)
