"""Hugging Face's family: ``CLIPModel`` and ``SiglipModel`` repos (SigLIP 2's fixed-resolution checkpoints
are ``SiglipModel`` too) and folders saved with ``save_pretrained``.

``--model hf:ORG/REPO`` fetches through huggingface_hub's cache (``$HF_HOME``, ``$HF_HUB_OFFLINE`` apply);
``hf:DIR`` reads a local folder. Loading is data-only: the config must name a model type clipcli knows
(one that needs custom code, ``auto_map``, is refused), code is never trusted (``trust_remote_code`` is
never set), weights are read from safetensors where the source has them, else with ``weights_only``.
Preprocessing is taken from the repo's image processor config and tokenisation from its tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from clipcli.errors import InputError, ModelError
from clipcli.images.decode import ImageSpec
from clipcli.models.contract import LoadedModel, ModelEntry, require_extra
from clipcli.models.hf_files import WEIGHT_FILES, index_shards, read_json_object, weight_files
from clipcli.models.precision import Precision
from clipcli.models.weights import files_checksum

if TYPE_CHECKING:
    import torch
    from torch import nn

# model_type in config.json -> transformers class: the types whose text and image towers clipcli can drive.
MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
_UNSUPPORTED = {
    "siglip2": "SigLIP 2 NaFlex models resize each image to its own patch grid, which clipcli's fixed-size "
    "batches cannot express; use a fixed-resolution SigLIP 2 checkpoint (a SiglipModel, e.g. "
    "google/siglip2-base-patch16-224)",
}
CONFIG_FILES = (
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
)
_RESAMPLE: dict[int, Literal["bicubic", "bilinear"]] = {3: "bicubic", 2: "bilinear"}


def _transformers() -> Any:
    return require_extra("transformers", "hf", "Hugging Face models")


class HFModel(LoadedModel):
    """A transformers ``CLIPModel`` / ``SiglipModel`` driven through its ``get_*_features``."""

    family = "hf"

    def __init__(
        self,
        name: str,
        files: list[Path],
        model: Any,
        tokenizer: Any,
        image: ImageSpec,
        device: torch.device,
        precision: Precision,
    ) -> None:
        self.hold(name, model, device, precision)
        self.files, self.tokenizer, self.image = files, tokenizer, image
        self.siglip = model.config.model_type == "siglip"
        self.embed_dim = _embed_dim(model)
        self.logit_bias = float(model.logit_bias) if self.siglip else None
        self.scoring = "sigmoid" if self.siglip else "softmax"
        text = model.config.text_config
        self.context_length = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if not 0 < self.context_length <= text.max_position_embeddings:
            self.context_length = int(text.max_position_embeddings)
        self.eos_id = _eos_id(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # SigLIP tokenizers whose processor returns an attention mask (Gemma's, for SigLIP 2) mask padding.
        self.masks_padding = self.siglip and "attention_mask" in getattr(tokenizer, "model_input_names", ())
        self.pixel_dtype = next(p.dtype for p in model.vision_model.parameters() if p.ndim >= 2)

    @cached_property
    def checksum(self) -> str:
        return files_checksum(self.files)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        import torch

        # The reference usage of both families pads every text to the full length ("max_length").
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.context_length)["input_ids"]
        for text, row in zip(texts, ids, strict=True):
            if len(row) > self.context_length:
                raise InputError(f"text is longer than the model's {self.context_length}-token context: {text!r}")
        return torch.tensor(ids, dtype=torch.long)

    def token_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.siglip:  # bidirectional, last position pooled: every position counts
            return super().token_lengths(tokens)
        return _first_eos(tokens, self.eos_id) + 1

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.siglip:
            mask = (tokens != self.pad_id).long().to(self.device) if self.masks_padding else None
            out = self.model.get_text_features(input_ids=tokens.to(self.device), attention_mask=mask)
        else:
            # CLIP's causal text tower pools at the first end token: what follows it changes nothing.
            length = int(_first_eos(tokens, self.eos_id).max()) + 1
            out = self.model.get_text_features(input_ids=tokens[:, :length].to(self.device))
        return _features(out)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.pixel_dtype, non_blocking=True))
        return _features(out)

    def towers(self) -> dict[str, nn.Module]:
        return {"image": self.model.vision_model, "text": self.model.text_model}


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is the projected feature; 4.x a tensor."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _embed_dim(model: Any) -> int:
    projection = getattr(model, "visual_projection", None)
    if projection is not None:
        return int(projection.out_features)
    return int(model.config.vision_config.hidden_size)


def _eos_id(model: Any, tokenizer: Any) -> int:
    """The end token HF CLIP pools at: the config's, or (legacy configs say 2) the highest id, as HF does."""
    configured = model.config.text_config.eos_token_id
    if configured == 2 or configured is None:
        return int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else len(tokenizer) - 1)
    return int(configured)


def _first_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    return (tokens == eos_id).int().argmax(dim=-1)


def image_spec(processor: Any, model_type: str, spec: str) -> ImageSpec:
    """The image processor's geometry as an ImageSpec: shortest edge then a centre crop of the same size
    (CLIP), or the whole image squashed to height x width (SigLIP)."""
    size = dict(processor.size)
    crop = dict(getattr(processor, "crop_size", None) or {})
    do_crop = bool(getattr(processor, "do_center_crop", False))
    if "shortest_edge" in size:
        side = int(size["shortest_edge"])
        if not do_crop or (crop.get("height"), crop.get("width")) != (side, side):
            raise ModelError(f"{spec}: a resize to {side} then a {crop} crop is not supported (needs equal sizes)")
        resize: Literal["shortest", "squash"] = "shortest"
    elif "height" in size and size["height"] == size.get("width") and not do_crop:
        side, resize = int(size["height"]), "squash"
    else:
        raise ModelError(f"{spec}: image processor size {size} is not supported (shortest_edge, or a square)")
    resample = int(getattr(processor, "resample", 3))
    if resample not in _RESAMPLE:
        raise ModelError(f"{spec}: image resampling {resample} is not supported (bicubic or bilinear)")
    if getattr(processor, "do_rescale", True) and abs(float(processor.rescale_factor) - 1 / 255) > 1e-9:
        raise ModelError(f"{spec}: a rescale factor of {processor.rescale_factor} is not supported (1/255)")
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if getattr(processor, "do_normalize", True):
        mean = cast(tuple[float, float, float], tuple(float(v) for v in processor.image_mean))
        std = cast(tuple[float, float, float], tuple(float(v) for v in processor.image_std))
    return ImageSpec(side, resize, mean, std, _RESAMPLE[resample], crop_offset="floor")


# --- resolving ORG/REPO and DIR ---------------------------------------------------------------------------


def _is_folder(rest: str) -> bool:
    return os.path.isdir(os.path.expanduser(rest)) or rest.startswith((".", "/", "~")) or rest.count("/") != 1


def _fetch(repo: str, filename: str, spec: str) -> Path | None:
    """An optional file of the repo, or None when it has none (or, offline, none was cached)."""
    from clipcli.models.hub import NotCached, hub_download

    try:
        return hub_download(repo, filename, spec)
    except (FileNotFoundError, NotCached):
        return None


def _check_config(config_path: Path, spec: str) -> dict[str, Any]:
    """The repo's config.json, refused unless it describes a model clipcli can build without custom code."""
    config = read_json_object(
        config_path,
        lambda e: f"{spec}: cannot read {config_path} ({e})",
        f"{spec}: {config_path} is not a model config",
    )
    if config.get("auto_map"):
        raise ModelError(f"{spec}: the model needs custom code (auto_map in config.json), which clipcli never runs")
    model_type = config.get("model_type")
    if model_type in _UNSUPPORTED:
        raise ModelError(f"{spec}: {_UNSUPPORTED[model_type]}")
    if model_type not in MODEL_TYPES:
        raise ModelError(
            f"{spec}: model_type {model_type!r} is not an image-text model clipcli can load "
            f"(supported: {', '.join(MODEL_TYPES)}); clipcli never runs a repo's own code"
        )
    return config


def _weight_files_in(folder: Path, spec: str) -> list[Path]:
    files = weight_files(folder)
    if not files:
        raise ModelError(f"{spec}: no model.safetensors or pytorch_model.bin in {folder}")
    return files


def _hub_files(repo: str, spec: str) -> Path:
    """Fetch what loading needs from a hub repo, safetensors before pickles; returns the snapshot folder."""
    from clipcli.models.hub import first_available, hub_download

    config = first_available(repo, ["config.json"], spec)
    _check_config(config, spec)
    for name in CONFIG_FILES:
        _fetch(repo, name, spec)
    weights = first_available(repo, list(WEIGHT_FILES[:3]), spec)  # sharded pickles: not from the hub
    if weights.name.endswith(".index.json"):
        for shard in index_shards(weights):
            hub_download(repo, shard, spec)
    return config.parent


@contextmanager
def _quiet(tf: Any) -> Iterator[None]:
    """No "Loading weights" bars or advice on stderr while loading: clipcli reports in one line."""
    verbosity = tf.utils.logging.get_verbosity()
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        tf.utils.logging.set_verbosity(verbosity)
        if bars:
            tf.utils.logging.enable_progress_bar()


def _load_parts(folder: Path, model_type: str, spec: str) -> tuple[Any, Any, Any]:
    tf = _transformers()
    with _quiet(tf):
        return _load_quietly(tf, folder, model_type, spec)


def _load_quietly(tf: Any, folder: Path, model_type: str, spec: str) -> tuple[Any, Any, Any]:
    from clipcli.models.checkpoint import plain_reason, refuse_incomplete

    local = {"local_files_only": True, "trust_remote_code": False}
    try:
        model, info = getattr(tf, MODEL_TYPES[model_type]).from_pretrained(
            folder, weights_only=True, dtype="float32", output_loading_info=True, **local
        )
    except Exception as e:  # a malformed or mismatched checkpoint; transformers raises many kinds
        raise ModelError(f"{spec}: cannot load the model ({plain_reason(e)})") from None
    refuse_incomplete(info, f"{spec}: {folder}" if str(folder) not in spec else spec)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, **local)
    except Exception as e:  # sentencepiece missing for SigLIP's spiece.model, no tokenizer files, ...
        raise ModelError(f"{spec}: cannot load the tokenizer ({plain_reason(e)})") from None
    try:
        processor = tf.AutoImageProcessor.from_pretrained(folder, **local)
    except Exception as e:
        raise ModelError(f"{spec}: cannot load the image processor config ({plain_reason(e)})") from None
    return model, tokenizer, processor


def load(rest: str, spec: str, device: torch.device, precision: Precision) -> HFModel:
    _transformers()
    if not rest:
        raise ModelError(f"{spec}: expected hf:ORG/REPO or hf:DIR")
    if _is_folder(rest):
        folder = Path(rest).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(f"{spec}: {folder} is not a saved model folder (no config.json)")
        config = _check_config(folder / "config.json", spec)
    else:
        folder = _hub_files(rest, spec)
        config = _check_config(folder / "config.json", spec)
    files = _weight_files_in(folder, spec)
    model, tokenizer, processor = _load_parts(folder, config["model_type"], spec)
    image = image_spec(processor, config["model_type"], spec)
    model.requires_grad_(False)
    if precision != "fp32":
        # The whole model, as transformers' own dtype= does: its embeddings add position tables to patch
        # features, so casting only the matrices (as for OpenAI's CLIP) would mix dtypes inside the tower.
        import torch

        model = model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    return HFModel(spec, files, model.to(device).eval(), tokenizer, image, device, precision)


def list_entries() -> list[ModelEntry]:
    """The CLIP and SigLIP repos in the Hugging Face cache (``$HF_HOME``), with their size on disk."""
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        from clipcli.models.hub import hub_cache
    except ImportError:
        return []
    try:
        cache = scan_cache_dir(hub_cache())
    except (CacheNotFound, OSError):
        return []
    entries = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            config = next((f.file_path for f in revision.files if f.file_name == "config.json"), None)
            if config is not None and _model_type(config) in MODEL_TYPES:
                entries.append(ModelEntry(f"hf:{repo.repo_id}", "hf", revision.snapshot_path, True, repo.size_on_disk))
                break
    return entries


def _model_type(config: Path) -> str | None:
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("auto_map"):
        return None
    model_type = data.get("model_type")
    return model_type if isinstance(model_type, str) else None
