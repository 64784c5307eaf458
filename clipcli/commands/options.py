"""Options shared by several commands, and the model loading they all do the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.io import OutputFormat

if TYPE_CHECKING:
    from clipcli.models import LoadedModel

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="OpenAI model name (ViT-B/32, RN50, ...), the bundled 'tiny-shapes', or a checkpoint file. "
        "Default: $CLIPCLI_MODEL or ViT-B/32.",
        show_default=False,
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu).")]
Precision = Annotated[
    str,
    typer.Option(help="auto, fp32, bf16 or fp16 (auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32)."),
]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
Workers = Annotated[
    int,
    typer.Option(min=0, help="Decoding processes (0: threads in this process, taking turns with a CPU model)."),
]
Exact = Annotated[
    bool,
    typer.Option(help="Decode JPEGs at full size, bit for bit OpenAI's preprocessing (slower on large photos)."),
]
MaxMegapixels = Annotated[
    float,
    typer.Option(
        "--max-megapixels",
        min=0.0,
        help="Skip images larger than this many megapixels, read from the header before any pixel is decoded: "
        "today's cameras fit (108 MP phones), decompression bombs do not.",
    ),
]
DEFAULT_MAX_MEGAPIXELS = 250.0


def max_pixels(megapixels: float) -> int:
    return int(megapixels * 1_000_000)


Output = Annotated[
    str | None, typer.Option("--output", "-o", help="Write to this file (format from its extension); '-' = stdout.")
]
Format = Annotated[
    OutputFormat | None,
    typer.Option(
        "--format",
        "-f",
        help="Output format (default: from --output, else table on a terminal, else csv).",
        case_sensitive=False,
        show_default=False,
    ),
]
Template = Annotated[
    list[str] | None,
    typer.Option("--template", "-t", help="Prompt template with {} for the label (repeatable).", show_default=False),
]
Templates = Annotated[
    str | None,
    typer.Option(
        help="Template set: simple, cifar, imagenet, or a file with one template per line.", show_default=False
    ),
]


def load(model: str | None, device: str, precision: str) -> LoadedModel:
    from clipcli.console import download_progress
    from clipcli.models import default_model, load_model

    with download_progress(model or default_model()) as on_chunk:
        return load_model(model, device, precision, on_download=on_chunk)
