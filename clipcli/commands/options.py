"""Options shared by several commands, and the model loading they all do the same way."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer

from clipcli.images.limits import DEFAULT_MAX_MEGAPIXELS
from clipcli.images.refs import DEFAULT_SCENE_THRESHOLD
from clipcli.store.formats import OutputFormat, format_choices

if TYPE_CHECKING:
    from clipcli.images.decode import ImageOptions
    from clipcli.models import LoadedModel, ModelOptions

F = TypeVar("F", bound=Callable[..., Any])


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


Every = Annotated[
    float,
    typer.Option(
        "--every",
        min=0.001,
        metavar="SECONDS",
        help="Videos: embed one frame every SECONDS (from the first frame; --frames every).",
    ),
]


SceneThreshold = Annotated[
    float,
    typer.Option(
        "--scene-threshold",
        min=0.0,
        max=1.0,
        metavar="FRACTION",
        help="Videos, --frames scene: how much the picture must change for a new row, as the mean grey "
        "difference of 32x32 thumbnails (a fraction of the grey scale; 0.08 is 20 levels of 255). Lower "
        "catches smaller changes.",
    ),
]


class FramesChoice(str, Enum):
    EVERY = "every"
    SCENE = "scene"


Frames = Annotated[
    FramesChoice,
    typer.Option(
        "--frames",
        case_sensitive=False,
        help="Videos: which frames become rows. every: one per --every seconds; scene: the first frame, then "
        "each frame whose picture changed (small grey frames compared; see the video page of the manual).",
    ),
]


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


# What the commands that write one row per result write: classify, classify-text, dedup.
RESULT_FORMATS = (OutputFormat.TABLE, OutputFormat.CSV, OutputFormat.JSONL, OutputFormat.PARQUET)
if TYPE_CHECKING:
    ResultFormat = OutputFormat
else:
    ResultFormat = format_choices("ResultFormat", RESULT_FORMATS)  # --format's choices
ResultFormatOption = Annotated[
    ResultFormat | None,
    typer.Option(
        "--format",
        "-f",
        case_sensitive=False,
        show_default=False,
        help="Default: from --output's extension, else a table on a terminal, else csv.",
    ),
]


def repeatable(*names: str, metavar: str, help: str) -> Any:
    """An option given any number of times (``--model A --model B``), whose default goes unsaid."""
    return typer.Option(*names, metavar=metavar, help=help, show_default=False)


def file_option(help: str) -> Any:
    """An option naming a file (``--texts-file FILE``), with each command's own words for what it holds."""
    return typer.Option(metavar="FILE", help=help)


def format_option(help: str) -> Any:
    """``--format/-f`` over a command's own enum of formats, so that its help lists exactly those."""
    return typer.Option("--format", "-f", case_sensitive=False, show_default=False, help=help)


def output_format(fmt: Enum | None) -> OutputFormat | None:
    """A command's own format choice (an enum of what it can write) as the shared OutputFormat."""
    return None if fmt is None else OutputFormat(fmt.value)


def precision_value(precision: PrecisionChoice | str) -> str:
    """``--precision`` as the core takes it: the choice's name (a plain string passes through)."""
    return precision.value if isinstance(precision, PrecisionChoice) else str(precision)


def model_options(model: str | None, device: str, precision: PrecisionChoice | str) -> ModelOptions:
    """``--model``, ``--device`` and ``--precision`` as the one value the core takes."""
    from clipcli.models import ModelOptions

    return ModelOptions(model, device, precision_value(precision))


def image_options(
    batch_size: int = 32,
    workers: int = 0,
    exact: bool = False,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    decode: DecodeChoice | str = "auto",
    every: float = 2.0,
    frames: FramesChoice | str = "every",
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD,
) -> ImageOptions:
    """``--batch-size``, ``--workers``, ``--exact``, ``--max-megapixels`` (refused if NaN), ``--decode``,
    ``--every``, ``--frames`` and ``--scene-threshold`` as the one value the core takes."""
    from clipcli.images.decode import ImageOptions
    from clipcli.images.refs import ContainerOptions

    choice = decode.value if isinstance(decode, DecodeChoice) else decode
    if not math.isfinite(every):  # typer's min= lets inf through (and nan, which compares false)
        raise typer.BadParameter(f"{every} is not a number of seconds", param_hint="'--every'")
    if not math.isfinite(scene_threshold):
        raise typer.BadParameter(f"{scene_threshold} is not a fraction", param_hint="'--scene-threshold'")
    sampling = ContainerOptions(every, frames.value if isinstance(frames, FramesChoice) else frames, scene_threshold)
    return ImageOptions(batch_size, workers, exact, max_pixels(max_megapixels), choice, sampling)


def load(
    model: ModelOptions | str | None, device: str = "auto", precision: PrecisionChoice | str = "auto"
) -> LoadedModel:
    """Load the model (with a download bar where it is fetched): from :class:`ModelOptions`, or from
    ``--model``, ``--device`` and ``--precision`` as given."""
    from clipcli.commands.console import download_progress
    from clipcli.models import ModelOptions, default_model, load_model

    options = model if isinstance(model, ModelOptions) else model_options(model, device, precision)
    with download_progress(options.spec or default_model()) as on_chunk:
        return load_model(options.spec, options.device, options.precision, on_download=on_chunk)


@dataclass(frozen=True)
class OptionGroup:
    """Options that travel together, declared once: the parameters Typer shows (in this order, in the
    place of the command's parameter that takes them) and ``build``, which makes the one value the
    command receives from them (a :class:`ModelOptions`, an :class:`ImageOptions`)."""

    params: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]

    def without(self, *names: str) -> OptionGroup:
        """The group less some of its options (their builder's defaults apply)."""
        return OptionGroup(tuple(p for p in self.params if p.name not in names), self.build)


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


MODEL_OPTIONS = OptionGroup(
    (
        _option("model", Model, None),
        _option("device", Device, "auto"),
        _option("precision", Precision, PrecisionChoice.AUTO),
    ),
    model_options,
)
IMAGE_OPTIONS = OptionGroup(
    (
        _option("batch_size", BatchSize, 32),
        _option("workers", Workers, 0),
        _option("exact", Exact, False),
        _option("max_megapixels", MaxMegapixels, DEFAULT_MAX_MEGAPIXELS),
        _option("every", Every, 2.0),
        _option("frames", Frames, FramesChoice.EVERY),
        _option("scene_threshold", SceneThreshold, DEFAULT_SCENE_THRESHOLD),
    ),
    image_options,
)
DECODED_IMAGE_OPTIONS = OptionGroup(
    (*IMAGE_OPTIONS.params, _option("decode", Decode, DecodeChoice.AUTO)), image_options
)
"""The image options with ``--decode``, for the commands that decode on a GPU where asked."""


def grouped(**groups: OptionGroup) -> Callable[[F], F]:
    """Show each group's options in the place of the command's parameter of that name, and call the
    command with the group's one value built from them: ``--model``, ``--device`` and ``--precision``
    arrive as one :class:`ModelOptions`."""

    def wrap(command: F) -> F:
        signature = inspect.signature(command)
        params: list[inspect.Parameter] = []
        for p in signature.parameters.values():
            if p.name in groups:
                params += groups[p.name].params
            else:  # annotations are strings (PEP 563): Typer needs what they name
                shown = eval(p.annotation, command.__globals__) if isinstance(p.annotation, str) else p.annotation
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=shown))

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for name, group in groups.items():
                values[name] = group.build(**{p.name: values.pop(p.name) for p in group.params})
            return command(**values)

        run.__dict__["__signature__"] = signature.replace(parameters=params, return_annotation=None)
        run.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return cast(F, run)

    return wrap
