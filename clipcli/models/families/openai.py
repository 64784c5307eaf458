"""OpenAI's CLIP family: the nine 2021 checkpoints, the bundled models, and checkpoints of their layout.

A model is named by one of OpenAI's nine names (downloaded into a cache shared with the ``clip``
package), by the name of a model bundled with clipcli, or by the path of a local checkpoint (an OpenAI
TorchScript archive or a plain state dict). Whatever the source, the weights are rebuilt as a non-JIT
fp32 ``clip.model.CLIP``, then cast to the chosen precision (see :func:`cast_weights`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from clipcli.cache import cache_dir
from clipcli.errors import DownloadError, InputError, ModelError
from clipcli.images.decode import ImageSpec
from clipcli.models.contract import DownloadProgress, LoadedModel, ModelEntry
from clipcli.models.digest import file_sha256
from clipcli.models.precision import Precision, cast_weights
from clipcli.models.weights import skipping_init

if TYPE_CHECKING:
    import torch
    from clip.model import CLIP
    from torch import nn

_OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"
# The sha256 in each path is what the download is checked against (as in OpenAI's own loader).
OPENAI_MODELS: dict[str, str] = {
    "RN50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
# Models that ship inside the package, loadable offline by name.
BUNDLED_MODELS: dict[str, str] = {"tiny-shapes": "tiny-shapes.pt"}


def import_clip() -> Any:
    """Import OpenAI's whole ``clip`` package, without the pkg_resources deprecation warning it triggers.

    Only reference code needs this (parity tests, benchmarks); clipcli itself uses :func:`clip_module`.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import clip

    return clip


def clip_module(name: str) -> ModuleType:
    """One module of OpenAI's ``clip`` package (``model`` or ``simple_tokenizer``), loaded on its own.

    ``import clip`` runs the package's ``__init__``, which imports torchvision, and through it torch's
    compiler stack (dynamo, sympy, triton): seconds and hundreds of megabytes on a CUDA build, for a
    preprocessing pipeline and downloader clipcli does not use. These two modules import only torch, numpy, ftfy and
    regex, so they load alone. If the package is already imported in full, its modules are reused.
    """
    if "clip" in sys.modules:
        return importlib.import_module(f"clip.{name}")
    key = f"clipcli._clip_{name}"
    if key in sys.modules:
        return sys.modules[key]
    package = importlib.util.find_spec("clip")  # finding a package does not run its __init__
    if package is None or not package.submodule_search_locations:
        raise ModelError("OpenAI's clip package is not installed (pip install clip-anytorch)")
    location = Path(next(iter(package.submodule_search_locations))) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(key, location)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("clipcli") / "data" / BUNDLED_MODELS[name]))


def openai_url(name: str) -> str:
    # A mirror serves the same files under the same <sha256>/<file> paths (useful behind firewalls).
    base = os.environ.get("CLIPCLI_MIRROR", _OPENAI_BASE).rstrip("/")
    return f"{base}/{OPENAI_MODELS[name]}"


def openai_cache_path(name: str) -> Path:
    return cache_dir() / OPENAI_MODELS[name].split("/")[-1]


TOKENIZER_VOCAB = 49408  # the ids OpenAI's BPE tokenizer gives: 256 bytes x 2, 48,894 merges, 2 specials


@dataclass(frozen=True)
class Architecture:
    """The hyper-parameters of ``clip.model.CLIP``, as ``clip.model.build_model`` infers them."""

    embed_dim: int
    image_resolution: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None
    context_length: int = 77
    vocab_size: int = TOKENIZER_VOCAB
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12

    @property
    def is_vit(self) -> bool:
        return self.vision_patch_size is not None

    def build(self, initialize: bool = True) -> CLIP:
        """A CLIP of this shape; ``initialize=False`` leaves the weights for a state dict to fill."""
        shape = astuple(self)  # the fields in the order of CLIP's parameters
        if initialize:
            return clip_module("model").CLIP(*shape)
        with skipping_init():
            return clip_module("model").CLIP(*shape)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> Architecture:
        """Infer the architecture exactly as ``clip.model.build_model`` does."""
        width = sd["ln_final.weight"].shape[0]
        text = {
            "embed_dim": sd["text_projection"].shape[1],
            "context_length": sd["positional_embedding"].shape[0],
            "vocab_size": sd["token_embedding.weight"].shape[0],
            "transformer_width": width,
            "transformer_heads": width // 64,
            "transformer_layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")}),
        }
        if "visual.proj" in sd:
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            layers = sum(1 for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight"))
            return cls(
                image_resolution=patch * grid,
                vision_layers=layers,
                vision_width=sd["visual.conv1.weight"].shape[0],
                vision_patch_size=patch,
                **text,
            )
        counts = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}")}) for b in (1, 2, 3, 4)]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        return cls(
            image_resolution=grid * 32,
            vision_layers=(counts[0], counts[1], counts[2], counts[3]),
            vision_width=sd["visual.layer1.0.conv1.weight"].shape[0],
            vision_patch_size=None,
            **text,
        )


# Named architectures for `train --arch` and for random-weight benchmarks and tests.
ARCHITECTURES: dict[str, Architecture] = {
    "RN50": Architecture(1024, 224, (3, 4, 6, 3), 64, None),
    "ViT-B/32": Architecture(512, 224, 12, 768, 32),
    "ViT-B/16": Architecture(512, 224, 12, 768, 16),
    # The bundled model: a ResNet tower learned shapes in the CPU budget where small ViTs did not.
    "tiny-shapes": Architecture(
        64, 64, (1, 1, 1, 1), 16, None, transformer_width=64, transformer_heads=1, transformer_layers=3
    ),
    # Smallest shapes that still satisfy CLIP's head-width rules: for fast tests.
    "test-vit": Architecture(64, 32, 1, 64, 16, transformer_width=64, transformer_heads=1, transformer_layers=1),
    "test-rn": Architecture(
        64, 32, (1, 1, 1, 1), 8, None, transformer_width=64, transformer_heads=1, transformer_layers=1
    ),
}


class OpenAIModel(LoadedModel):
    """A ``clip.model.CLIP`` rebuilt from an OpenAI-layout checkpoint."""

    family = "openai"

    def __init__(
        self, name: str, path: Path, model: CLIP, architecture: Architecture, device: torch.device, precision: Precision
    ) -> None:
        self.hold(name, model, device, precision)
        self.path, self.architecture = path, architecture
        self.embed_dim = architecture.embed_dim
        self.image = ImageSpec(architecture.image_resolution)

    @cached_property
    def checksum(self) -> str:
        """SHA-256 of the checkpoint file: identifies the weights in caches and reports."""
        return file_sha256(self.path)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return tokenize(texts, self.architecture.context_length)

    def token_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.argmax(dim=-1) + 1  # the end token has the highest id

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(trim_padding(tokens).to(self.device))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device, non_blocking=True))

    def towers(self) -> dict[str, nn.Module]:
        return {"image": self.model.visual, "text": self.model.transformer}


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


def _offline_hint(name: str) -> str:
    file = OPENAI_MODELS[name].split("/")[-1]
    bundled = " or ".join(BUNDLED_MODELS)
    return (
        f"pass a local checkpoint with --model /path/to/{file}, or place {file} in {cache_dir()}; "
        f"--model {bundled} works offline"
    )


def _did_you_mean(spec: str) -> str:
    """`` (did you mean ViT-B/32?)`` for a name that differs from a known one in case or a typo or two."""
    import difflib

    names = [*OPENAI_MODELS, *BUNDLED_MODELS]
    same_case = [n for n in names if n.lower() == spec.lower()]
    close = same_case or difflib.get_close_matches(spec, names, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def resolve_checkpoint(spec: str, on_download: DownloadProgress | None = None) -> Path:
    """Turn a model name or path into a local checkpoint file, downloading if needed."""
    from clipcli.models.download import fetch

    if spec in BUNDLED_MODELS:
        path = bundled_path(spec)
        if not path.is_file():
            raise ModelError(f"bundled model {spec!r} is missing from the installation ({path})")
        return path
    if spec in OPENAI_MODELS:
        target = openai_cache_path(spec)
        if target.is_file():
            return target
        url = openai_url(spec)
        try:
            return fetch(url, target, sha256=OPENAI_MODELS[spec].split("/")[0], progress=on_download)
        except DownloadError as e:
            raise ModelError(
                f"model {spec} is not in the cache ({cache_dir()}) and could not be downloaded: {e}; "
                f"{_offline_hint(spec)}"
            ) from e
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ModelError(f"{spec}: is a directory, not a checkpoint file")
    if path.is_file():
        return path
    if path.exists():  # a FIFO, a device, a socket: never opened (reading one could wait for ever)
        raise ModelError(f"{spec}: is not a regular file, so not a checkpoint")
    names = ", ".join([*OPENAI_MODELS, *BUNDLED_MODELS])
    hint = _did_you_mean(spec)
    if hint:
        raise ModelError(f"unknown model {spec!r}{hint}")
    if "/" in spec or os.sep in spec or spec.endswith((".pt", ".pth")):
        raise ModelError(f"{spec}: no such checkpoint file (or use a model name: {names})")
    raise ModelError(f"unknown model {spec!r}; valid names: {names}; or pass a checkpoint file path")


def read_state_dict(path: Path) -> dict[str, Any]:
    """Read an OpenAI TorchScript archive or a plain state dict as a plain state dict.

    Nothing in the file is run: see :mod:`clipcli.models.checkpoint` and :mod:`clipcli.models.torchscript`.
    """
    from clipcli.models.checkpoint import is_torchscript, load_tensors
    from clipcli.models.torchscript import read_torchscript_state_dict

    sd = read_torchscript_state_dict(path) if is_torchscript(path) else load_tensors(path)
    if not isinstance(sd, Mapping):
        raise ModelError(f"{path}: not a CLIP checkpoint (holds a {type(sd).__name__}, not a state dict)")
    missing = [k for k in ("text_projection", "token_embedding.weight", "ln_final.weight") if k not in sd]
    if missing or not any(str(k).startswith("visual.") for k in sd):
        raise ModelError(f"{path}: not a CLIP checkpoint (missing {', '.join(missing) or 'visual.*'})")
    _check_all_tensors(path, sd)
    # TorchScript archives carry these as attributes; they are not parameters.
    return {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}


def _check_all_tensors(path: Path, sd: Mapping[Any, Any]) -> None:
    import torch

    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelError(f"{path}: not a CLIP checkpoint ({key!r} holds {type(value).__name__!r}, not a tensor)")


def build_from_state_dict(sd: Mapping[str, Any], source: Path | str = "checkpoint") -> tuple[CLIP, Architecture]:
    """Build an fp32 CLIP (unlike ``build_model``, which leaves slow-on-CPU fp16 weights).

    Any failure to infer, build or fill the model is the checkpoint's fault (a tensor of the wrong
    shape, a width with no whole number of heads), so it is reported as one ModelError line.
    """
    from clipcli.models.checkpoint import plain_reason

    try:
        _check_dimensions(sd)
        arch = Architecture.from_state_dict(sd)
        _check_architecture(arch)
        model = arch.build(initialize=False)
        _check_shapes(model, sd)
        model.load_state_dict(sd)
    except _Mismatch as e:
        raise ModelError(f"{source}: not a CLIP checkpoint this version understands ({e})") from None
    except KeyError as e:  # a tensor the architecture is inferred from
        raise ModelError(f"{source}: not a CLIP checkpoint this version understands (no {e.args[0]})") from None
    except Exception as e:  # whatever torch raises on odd shapes, it is about this file
        reason = plain_reason(e).rstrip(":")
        raise ModelError(f"{source}: not a CLIP checkpoint this version understands ({reason})") from e
    return model.float().eval(), arch


class _Mismatch(Exception):
    """The state dict does not describe a CLIP that can be built; the message says how."""


# The dimensions of the tensors Architecture.from_state_dict reads shapes from.
_INFERRED_FROM = {
    "text_projection": 2,
    "positional_embedding": 2,
    "token_embedding.weight": 2,
    "ln_final.weight": 1,
    "visual.conv1.weight": 4,
    "visual.positional_embedding": 2,
    "visual.attnpool.positional_embedding": 2,
    "visual.layer1.0.conv1.weight": 4,
}


def _check_dimensions(sd: Mapping[str, Any]) -> None:
    for key, ndim in _INFERRED_FROM.items():
        if key in sd and sd[key].ndim != ndim:
            raise _Mismatch(f"{key} has {sd[key].ndim} dimension(s), CLIP's has {ndim}")


def _check_architecture(arch: Architecture) -> None:
    """The sizes ``clip.model.CLIP`` cannot be built with, named before torch fails on them."""
    sizes = ("embed_dim", "image_resolution", "vision_width", "vision_patch_size", "context_length", "vocab_size")
    for name in sizes:
        value = getattr(arch, name)
        if value is not None and value <= 0:
            raise _Mismatch(f"{name} would be {value}")
    # Every model of this family reads OpenAI's BPE tokens: a smaller table cannot embed the higher ids.
    if arch.vocab_size < TOKENIZER_VOCAB:
        raise _Mismatch(
            f"token_embedding.weight has {arch.vocab_size} rows; CLIP's tokenizer needs {TOKENIZER_VOCAB}, "
            "one per token id"
        )
    # CLIP gives each tower width // 64 attention heads, which must divide the width.
    towers = [("text transformer", arch.transformer_width)]
    towers.append(
        ("vision transformer", arch.vision_width) if arch.is_vit else ("attention pool", arch.vision_width * 32)
    )
    for tower, width in towers:
        heads = width // 64
        if heads <= 0 or width % heads:
            raise _Mismatch(f"{tower} width {width} cannot be split into width // 64 = {heads} attention heads")


def _check_shapes(model: CLIP, sd: Mapping[str, Any]) -> None:
    """Name the first tensor missing, extra or of the wrong shape, instead of torch's multi-line list."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise _Mismatch(f"no {missing[0]}" + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    extra = [k for k in sd if k not in expected]
    if extra:
        raise _Mismatch(f"unexpected {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for key, tensor in expected.items():
        if tuple(sd[key].shape) != tuple(tensor.shape):
            raise _Mismatch(f"{key} has shape {list(sd[key].shape)}, expected {list(tensor.shape)}")


def load(spec: str, device: torch.device, precision: Precision, on_download: DownloadProgress | None) -> OpenAIModel:
    path = resolve_checkpoint(spec, on_download)
    model, arch = build_from_state_dict(read_state_dict(path), path)
    model.requires_grad_(False)
    if precision != "fp32":
        cast_weights(model, precision)
    return OpenAIModel(spec, path, model.to(device), arch, device, precision)


def list_entries() -> list[ModelEntry]:
    entries = []
    for name in OPENAI_MODELS:
        path = openai_cache_path(name)
        ok = path.is_file()
        entries.append(ModelEntry(name, "openai", path, ok, path.stat().st_size if ok else None))
    for name in BUNDLED_MODELS:
        path = bundled_path(name)
        ok = path.is_file()
        entries.append(ModelEntry(name, "bundled", path, ok, path.stat().st_size if ok else None))
    return entries
