"""open_clip's family: LAION, DataComp, DFN, MetaCLIP, SigLIP... weights through ``open_clip``.

``--model open_clip:ARCH/TAG`` (a pretrained tag open_clip knows, fetched from the Hugging Face hub into
its cache: ``$HF_HOME``, ``$HF_HUB_OFFLINE`` apply), ``open_clip:ARCH/FILE`` (a fine-tuned state dict of
that architecture) or ``open_clip:hf-hub:ORG/REPO`` (a hub repo with ``open_clip_config.json``).

Loading is data-only: safetensors where the source has them, anything else through clipcli's
tensors-only reader (``torch.load(weights_only=True)``); the model is built by open_clip from its
config and filled with those tensors, the way open_clip's ``load_checkpoint`` massages them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import ModelError
from clipcli.images.decode import ImageSpec
from clipcli.models.contract import LoadedModel, ModelEntry, require_extra
from clipcli.models.hub import first_available, hub_cache, hub_download
from clipcli.models.precision import Precision, cast_weights
from clipcli.models.weights import files_checksum, skipping_init

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_HUB_PREFIX = "hf-hub:"
_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _open_clip() -> Any:
    return require_extra("open_clip", "open_clip", "open_clip models")


class OpenClipModel(LoadedModel):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` with the preprocessing and tokenizer it was made with."""

    family = "open_clip"

    def __init__(
        self, name: str, files: list[Path], model: Any, tokenizer: Any, device: torch.device, precision: Precision
    ) -> None:
        self.hold(name, model, device, precision)
        self.files, self.tokenizer = files, tokenizer
        self.image = image_spec(model.visual)
        self.embed_dim = _embed_dim(model)
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias)
        self.scoring = "sigmoid" if bias is not None else "softmax"
        self.text = _text_tower(model)
        self.trims = _causal_eos_pooled(self.text)
        self.pixel_dtype = _input_dtype(model.visual)

    @cached_property
    def checksum(self) -> str:
        return files_checksum(self.files)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def token_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.trims:
            return super().token_lengths(tokens)
        return _end_positions(tokens, self.text) + 1

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        if not self.trims:
            return self.model.encode_text(tokens)
        return _encode_trimmed(self.text, tokens[:, : int(_end_positions(tokens, self.text).max()) + 1])

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device, self.pixel_dtype, non_blocking=True))

    def towers(self) -> dict[str, nn.Module]:
        text = self.model.text if hasattr(self.model, "text") else self.model.transformer
        return {"image": self.model.visual, "text": text}


def image_spec(visual: Any) -> ImageSpec:
    """The preprocessing open_clip attached to the model (``visual.preprocess_cfg``), as an ImageSpec."""
    cfg = dict(getattr(visual, "preprocess_cfg", {}))
    size = cfg.get("size", getattr(visual, "image_size", 224))
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ModelError(f"open_clip model with a non-square input ({size[0]}x{size[1]}) is not supported")
        size = size[0]
    resize = cfg.get("resize_mode", "shortest")
    interpolation = cfg.get("interpolation", "bicubic")
    if resize not in ("shortest", "squash") or interpolation not in ("bicubic", "bilinear"):
        raise ModelError(f"open_clip preprocessing {resize}/{interpolation} is not supported (shortest or squash)")
    mean = tuple(float(v) for v in cfg.get("mean", visual.image_mean))
    std = tuple(float(v) for v in cfg.get("std", visual.image_std))
    return ImageSpec(int(size), resize, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]), interpolation)


def _embed_dim(model: Any) -> int:
    output = getattr(model.visual, "output_dim", None)
    if output is None:
        output = model.text_projection.shape[-1]
    return int(output)


def _text_tower(model: Any) -> Any:
    """The module holding the text transformer: the model itself (``CLIP``) or ``model.text``."""
    return getattr(model, "text", model)


def _causal_eos_pooled(text: Any) -> bool:
    """Whether padding after the last end token can be dropped without changing any feature: a causal
    mask (no position sees a later one), pooling at the end token, no padding mask and no appended
    class token. SigLIP-style towers (bidirectional, last position pooled) are not."""
    pool = getattr(text, "text_pool_type", getattr(text, "pool_type", None))
    return (
        pool in ("argmax", "eos")
        and getattr(text, "attn_mask", None) is not None
        and hasattr(text, "token_embedding")
        and getattr(text, "cls_emb", None) is None
        and not getattr(text, "use_pad_mask", False)
    )


def _pool_type(text: Any) -> str:
    return str(getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax")))


def _eos_id(text: Any) -> int | None:
    return getattr(text, "text_eos_id", getattr(text, "eos_id", None))


def _end_positions(tokens: torch.Tensor, text: Any) -> torch.Tensor:
    """Where each text's end token is, as open_clip's pooling finds it."""
    if _pool_type(text) == "eos":
        return tokens.eq(int(_eos_id(text) or 0)).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def _encode_trimmed(text: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` for a batch cut after its longest text's end token: the positional
    embedding and causal mask sliced to the batch's length, which open_clip's own forward does not do."""
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = text.transformer.get_cast_dtype()
    x = text.token_embedding(tokens).to(cast_dtype) + text.positional_embedding[:length].to(cast_dtype)
    x = text.transformer(x, attn_mask=text.attn_mask[:length, :length])
    x = text.ln_final(x)
    x = text_global_pool(x, tokens, _pool_type(text), eos_token_id=_eos_id(text))
    projection = text.text_projection
    if projection is None:
        return x
    return projection(x) if hasattr(projection, "weight") else x @ projection


def _input_dtype(visual: Any) -> torch.dtype:
    """The dtype open_clip's image tower expects its input in: that of its first convolution or linear
    layer (open_clip casts those at bf16/fp16, and its forward does not cast the input itself)."""
    import torch
    from torch import nn

    for layer in visual.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            return layer.weight.dtype
    return torch.float32


# --- resolving ARCH/TAG, ARCH/FILE and hf-hub:ORG/REPO ------------------------------------------------


def _did_you_mean(name: str, names: Sequence[str]) -> str:
    import difflib

    close = [n for n in names if n.lower() == name.lower()] or difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


_COMMON = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-SO400M-14-SigLIP")


def _split(rest: str, spec: str) -> tuple[str, str]:
    arch, sep, source = rest.partition("/")
    if not arch or not sep or not source:
        raise ModelError(
            f"{spec}: expected open_clip:ARCH/TAG, open_clip:ARCH/FILE or open_clip:hf-hub:ORG/REPO "
            "(e.g. open_clip:ViT-B-32/laion2b_s34b_b79k)"
        )
    return arch, source


def _require_arch(oc: Any, arch: str, spec: str) -> None:
    import difflib

    names = oc.list_models()
    if arch not in names:
        # Some 150 names on one line help nobody: the closest few, and where to see them all.
        same_case = [n for n in names if n.lower() == arch.lower()]
        closest = list(dict.fromkeys(same_case + difflib.get_close_matches(arch, names, n=6, cutoff=0.5)))[:6]
        nearest = f"closest: {', '.join(closest)}" if closest else f"e.g. {', '.join(n for n in _COMMON if n in names)}"
        raise ModelError(
            f"{spec}: unknown open_clip architecture {arch!r}{_did_you_mean(arch, names)}; {nearest} "
            f"(of {len(names)}; clipcli models lists the pretrained ones)"
        )


def _is_file_source(source: str) -> bool:
    return source.endswith(WEIGHT_SUFFIXES) or os.sep in source or Path(source).expanduser().exists()


def _tag_weights(oc: Any, arch: str, tag: str, spec: str) -> tuple[Path, dict[str, Any]]:
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(arch)
        valid = f"valid tags for {arch}: {', '.join(tags)}" if tags else f"{arch} has no pretrained tags"
        raise ModelError(f"{spec}: unknown open_clip tag {tag!r}{_did_you_mean(tag, tags)}; {valid}; or ARCH/FILE.pt")
    hub = cfg.get("hf_hub", "")
    if not hub:
        raise ModelError(
            f"{spec}: this tag has no Hugging Face hub source; download {cfg.get('url')} and pass the file"
        )
    repo, names = _hub_source(hub)
    return first_available(repo, names, spec), cfg


def _hub_source(hub: str) -> tuple[str, list[str]]:
    """The repo of a tag's ``hf_hub`` entry (``ORG/REPO/FILE`` or ``ORG/REPO/``) and the weight files to
    try in order: the safetensors twin of a pickle first, as open_clip does."""
    repo, filename = os.path.split(hub)
    if not filename:
        return repo, list(_HUB_WEIGHTS)
    if filename.endswith((".bin", ".pth")):
        return repo, [filename[: filename.rindex(".")] + ".safetensors", filename]
    return repo, [filename]


def read_weights(path: Path) -> dict[str, Any]:
    """Tensors of a weight file: safetensors, or a torch file read by clipcli's tensors-only reader."""
    from clipcli.models.checkpoint import load_tensors

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    sd = load_tensors(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # open_clip's training checkpoints
    if not isinstance(sd, dict) or not sd:
        raise ModelError(f"{path}: not an open_clip checkpoint (holds no state dict)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _fill(model: Any, sd: dict[str, Any], source: Path, spec: str) -> None:
    """open_clip's ``load_checkpoint`` on tensors already read: conversions, then a strict load."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    from clipcli.models.checkpoint import plain_reason

    try:
        sd = convert_state_dict(model, sd)
        if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
            sd = convert_to_custom_text_state_dict(sd)
        for key in ("logit_scale", "logit_bias"):
            if key in sd and getattr(model, key, None) is not None and model.get_parameter(key).ndim != sd[key].ndim:
                sd[key] = sd[key].reshape(model.get_parameter(key).shape)
        if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None:
            sd["logit_bias"] = sd["logit_scale"].new_zeros(model.logit_bias.shape)
        sd.pop("text.transformer.embeddings.position_ids", None)
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # torch's multi-line mismatch report, or a key the conversions needed
        raise ModelError(f"{spec}: {source} does not fit this architecture ({plain_reason(e)})") from None


def _build(oc: Any, arch: str, overrides: dict[str, Any], spec: str) -> Any:
    try:
        with skipping_init(), _quiet():
            return oc.create_model(arch, pretrained=None, **overrides)
    except ModelError:
        raise
    except Exception as e:  # a config open_clip cannot build here (a timm tower without timm, ...)
        from clipcli.models.checkpoint import plain_reason

        raise ModelError(f"{spec}: open_clip cannot build {arch} ({plain_reason(e)})") from None


class _quiet:
    """Silence open_clip's logging warnings (``No pretrained weights loaded``: clipcli loads them next)."""

    def __enter__(self) -> None:
        import logging

        self.logger = logging.getLogger()
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


def _preprocess_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = ("mean", "std", "interpolation", "resize_mode")
    return {k: cfg[k] for k in keys if k in cfg}


def _hub_config(oc: Any, repo: str, spec: str) -> tuple[str, dict[str, Any]]:
    """Register the repo's ``open_clip_config.json`` model config with open_clip (``add_model_config``),
    under a name of its own, so that ``create_model`` and ``get_tokenizer`` treat it as a built-in."""
    import tempfile

    path = hub_download(repo, "open_clip_config.json", spec)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        model_cfg = config["model_cfg"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{spec}: {path} is not an open_clip config (no model_cfg)") from None
    if _asks_for_code(config):
        raise ModelError(
            f"{spec}: {path} asks for the repository's own code to be run (trust_remote_code); "
            "clipcli never runs code from a model's files"
        )
    name = "hf-hub-" + repo.replace("/", "--")
    with tempfile.TemporaryDirectory() as folder:  # open_clip keeps the configs it has read
        (Path(folder) / f"{name}.json").write_text(json.dumps(model_cfg))
        oc.add_model_config(folder)
    if name not in oc.list_models():
        raise ModelError(
            f"{spec}: {path} is not an open_clip config (model_cfg lacks embed_dim, vision_cfg or text_cfg)"
        )
    return name, dict(config.get("preprocess_cfg") or {})


def _asks_for_code(config: Any) -> bool:
    """Whether a config sets ``trust_remote_code`` anywhere: open_clip hands ``text_cfg.tokenizer_kwargs``
    to ``AutoTokenizer.from_pretrained``, which would then import the tokenizer repository's Python. Without
    it, transformers refuses a tokenizer that needs its own code."""
    if isinstance(config, dict):
        return "trust_remote_code" in config or any(_asks_for_code(v) for v in config.values())
    return isinstance(config, list) and any(_asks_for_code(v) for v in config)


def _tokenizer(oc: Any, name: str, spec: str) -> Any:
    try:
        with _quiet():
            return oc.get_tokenizer(name)
    except Exception as e:  # HF tokenizers are fetched from the hub: offline, missing, ...
        from clipcli.models.checkpoint import plain_reason

        raise ModelError(f"{spec}: cannot load the tokenizer of {name} ({plain_reason(e)})") from None


def load(rest: str, spec: str, device: torch.device, precision: Precision) -> OpenClipModel:
    oc = _open_clip()
    overrides: dict[str, Any] = {}
    if rest.startswith(_HUB_PREFIX):
        repo = rest.removeprefix(_HUB_PREFIX)
        if repo.count("/") != 1:
            raise ModelError(f"{spec}: expected open_clip:hf-hub:ORG/REPO")
        arch, preprocess = _hub_config(oc, repo, spec)
        weights = first_available(repo, _HUB_WEIGHTS, spec)
        overrides["force_preprocess_cfg"] = _preprocess_overrides(preprocess)
    else:
        arch, source = _split(rest, spec)
        _require_arch(oc, arch, spec)
        if _is_file_source(source):
            weights = Path(source).expanduser()
            if not weights.is_file():
                raise ModelError(f"{spec}: no such checkpoint file {source!r}")
        else:
            weights, cfg = _tag_weights(oc, arch, source, spec)
            overrides["force_preprocess_cfg"] = _preprocess_overrides(cfg)
            if cfg.get("quick_gelu"):  # the tag was trained with QuickGELU: open_clip only warns
                overrides["force_quick_gelu"] = True
    # A hub repo's tokenizer as open_clip picks it for that repo (its own name would trip the "siglip" rule).
    tokenizer = _tokenizer(oc, rest if rest.startswith(_HUB_PREFIX) else arch, spec)
    sd = read_weights(weights)
    model = _build(oc, arch, overrides, spec)
    _fill(model, sd, weights, spec)
    model.requires_grad_(False)
    if precision != "fp32":
        # clipcli's cast, not open_clip's convert_weights_to_lp, which fails on a Linear text projection
        # (SigLIP's); its forward casts text to the weights' dtype, and encode_pixels casts images.
        cast_weights(model, precision)
    return OpenClipModel(spec, [weights], model.to(device).eval(), tokenizer, device, precision)


def list_entries() -> list[ModelEntry]:
    """Every pretrained ``ARCH/TAG`` open_clip knows, marked available when its weights are cached."""
    try:
        from open_clip.pretrained import get_pretrained_cfg, list_pretrained
    except ImportError:
        return []
    entries = []
    for arch, tag in list_pretrained():
        cached = _cached_tag(get_pretrained_cfg(arch, tag).get("hf_hub", ""))
        size = cached.stat().st_size if cached else None
        entries.append(ModelEntry(f"open_clip:{arch}/{tag}", "open_clip", cached, cached is not None, size))
    return entries


def _cached_tag(hub: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    if not hub:
        return None
    repo, names = _hub_source(hub)
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=hub_cache())
        if isinstance(found, str):
            return Path(found)
    return None
