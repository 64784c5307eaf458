"""Options shared by several commands, and the model loading they all do the same way."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clipcli.store.formats import OutputFormat

if TYPE_CHECKING:
    from clipcli.models import LoadedModel


class PrecisionChoice(str, Enum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"


Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="MODEL",
        help="OpenAI model name (ViT-B/32, RN50, ...), the bundled 'tiny-shapes', or a checkpoint file; "
        "open_clip:ARCH/TAG, open_clip:ARCH/FILE.pt or open_clip:hf-hub:ORG/REPO; hf:ORG/REPO or hf:DIR "
        "(CLIP, SigLIP). Default: $CLIPCLI_MODEL or ViT-B/32.",
        show_default=False,
    ),
]
Device = Annotated[
    str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu).")
]
Precision = Annotated[
    PrecisionChoice,
    typer.Option(
        case_sensitive=False,
        help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32 (never int8). "
        "int8: CPU only, weights quantised at load, faster where the CPU has no bf16; check its answers "
        "first with 'clipcli bench-precision'.",
        show_default=True,
    ),
]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, metavar="N", help="Images per forward pass.")]
Workers = Annotated[
    int,
    typer.Option(
        min=0, metavar="N", help="Decoding processes (0: threads in this process, taking turns with a CPU model)."
    ),
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
        metavar="MP",
        help="Skip images larger than this many megapixels, read from the header before any pixel is decoded: "
        "today's cameras fit (108 MP phones), decompression bombs do not. 0 or inf: no limit.",
    ),
]
DEFAULT_MAX_MEGAPIXELS = 250.0


class DecodeChoice(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"


Decode = Annotated[
    DecodeChoice,
    typer.Option(
        case_sensitive=False,
        help="Where JPEGs are decoded and resized. gpu: on the model's CUDA GPU (nvJPEG), with files it cannot "
        "take (PNG, WebP, progressive or CMYK JPEGs...) decoded on the CPU; cpu: Pillow on the CPU threads; "
        "auto: gpu when the model runs on CUDA.",
    ),
]


def check_decode(choice: DecodeChoice, lm: LoadedModel) -> None:
    """Refuse ``--decode gpu`` for a model off CUDA before any image is read (one line, exit 2)."""
    from clipcli.images.gpu import use_device_decoding

    use_device_decoding(choice.value, lm.device)


def max_pixels(megapixels: float) -> int | None:
    """The pixel limit for ``--max-megapixels``: None (no limit) for 0 or inf; at least one pixel for any
    other positive number, however small. NaN is refused (exit 2)."""
    import math

    if math.isnan(megapixels):
        from clipcli.errors import InputError

        raise InputError("--max-megapixels nan: give a number of megapixels (0 or inf: no limit)")
    if megapixels == 0 or math.isinf(megapixels):
        return None
    return max(1, int(megapixels * 1_000_000))


class Engine(str, Enum):
    LOCAL = "local"
    RAY = "ray"


RayAddress = Annotated[
    str | None,
    typer.Option(
        envvar="RAY_ADDRESS",
        metavar="HOST:PORT",
        help=(
            "With --engine ray: the cluster to join (default: $RAY_ADDRESS, else start Ray here); "
            "refused if it does not answer within $CLIPCLI_RAY_CONNECT_TIMEOUT seconds (default 15)."
        ),
        show_default=False,
    ),
]


def engine_option(help: str) -> Any:
    """``--engine local|ray``, with each command's own words for what runs on the cluster."""
    return typer.Option(case_sensitive=False, help=help)


Labels = Annotated[
    str | None,
    typer.Option(
        "--labels",
        "-l",
        metavar="A,B,...",
        help="Comma-separated labels; quote one that has a comma: --labels '\"New York, NY\",Paris'.",
    ),
]
LabelsFile = Annotated[str | None, typer.Option(metavar="FILE", help="File with one label per line.")]
Output = Annotated[
    str | None,
    typer.Option(
        "--output", "-o", metavar="FILE", help="Write to this file (format from its extension); '-' = stdout."
    ),
]
Template = Annotated[
    list[str] | None,
    typer.Option(
        "--template",
        "-t",
        metavar="TEMPLATE",
        help="Prompt template with {} for the label (repeatable: an ensemble).",
        show_default=False,
    ),
]
Templates = Annotated[
    list[str] | None,
    typer.Option(
        metavar="SET",
        help="Template set: simple, cifar, imagenet, or a file with one template per line (repeatable: the "
        "sets are pooled into one ensemble). Default: simple.",
        show_default=False,
    ),
]
Inputs = Annotated[
    list[str],
    typer.Argument(metavar="INPUTS...", help="Image files, folders, globs, or - to read paths from stdin."),
]


class ResultFormat(str, Enum):
    """What the commands that write one row per result write: classify, classify-text, dedup."""

    TABLE = "table"
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"


RESULT_FORMATS = tuple(OutputFormat(f.value) for f in ResultFormat)


def format_option(help: str) -> Any:
    """``--format/-f`` over a command's own enum of formats, so that its help lists exactly those."""
    return typer.Option("--format", "-f", case_sensitive=False, show_default=False, help=help)


def output_format(fmt: Enum | None) -> OutputFormat | None:
    """A command's own format choice (an enum of what it can write) as the shared OutputFormat."""
    return None if fmt is None else OutputFormat(fmt.value)


def load(model: str | None, device: str, precision: PrecisionChoice | str) -> LoadedModel:
    from clipcli.commands.console import download_progress
    from clipcli.models import default_model, load_model

    with download_progress(model or default_model()) as on_chunk:
        choice = precision.value if isinstance(precision, PrecisionChoice) else precision
        return load_model(model, device, choice, on_download=on_chunk)
