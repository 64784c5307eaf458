"""Tiny random-weight models of the open_clip and Hugging Face families, built offline.

Shared by the family tests and the families benchmark. open_clip models come from small model configs
registered with open_clip (a CLIP with a causal text tower, and a SigLIP-style one: bidirectional text
pooled at the last position, a logit bias, squashed 0.5-normalised input); Hugging Face models from
small ``CLIPConfig`` / ``SiglipConfig`` saved with ``save_pretrained`` (safetensors), with tokenizers that
need no download: OpenAI's BPE from the ``clip`` package for CLIP, a word-level ``tokenizer.json`` built
with the ``tokenizers`` library for SigLIP. A Hugging Face hub cache can be laid out around any folder,
so that ``hf:ORG/REPO`` and ``open_clip:hf-hub:ORG/REPO`` load offline.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

# Widths that keep each model a few megabytes (most of it the 49,408-token embedding of OpenAI's BPE).
OPEN_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "test-oc-vit": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    },
    # SigLIP's text tower: no causal mask, the last position pooled, a projection bias, fixed-length input.
    "test-oc-sl": {
        "embed_dim": 32,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 1,
            "no_causal_mask": True,
            "pool_type": "last",
            "proj_bias": True,
        },
    },
}
SIGLIP_PREPROCESS = {
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bilinear",
    "resize_mode": "squash",
}
WORDS = ["a", "photo", "of", "the", "this", "is", "an", "cat", "dog", "red", "green", "blue", "square", "circle"]


def register_open_clip_configs(folder: Path) -> None:
    """Make the test architectures known to open_clip in this process, as ``add_model_config`` does."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    for name, cfg in OPEN_CLIP_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    if name not in open_clip.list_models():
        open_clip.add_model_config(folder)


def _spread(model: Any, scale: float, bias: float | None) -> None:
    """Random init gives near-identical features at a temperature of 1/0.07: widen the weights and set the
    temperature (and bias) so that probabilities differ across labels and parity compares something."""
    import math

    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(3.0)
        model.logit_scale.fill_(math.log(scale))
        if bias is not None and getattr(model, "logit_bias", None) is not None:
            model.logit_bias.fill_(bias)


def open_clip_model(arch: str, seed: int = 0) -> Any:
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    _spread(model, 10.0 if "sl" in arch else 100.0, 0.5)
    return model.eval()


def open_clip_checkpoint(path: Path, arch: str, seed: int = 0) -> Path:
    """A random open_clip model of a registered architecture, saved as a plain state dict (.pt)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip_model(arch, seed).state_dict(), path)
    return path


def open_clip_hub_folder(folder: Path, arch: str, seed: int = 0, preprocess: dict[str, Any] | None = None) -> Path:
    """A folder laid out as an open_clip hub repo: open_clip_config.json and open_clip_model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": OPEN_CLIP_CONFIGS[arch], "preprocess_cfg": preprocess or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in open_clip_model(arch, seed).state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def to_hub_cache(folder: Path, hub_cache: Path, repo: str, revision: str = "0" * 40) -> Path:
    """Copy ``folder`` into a Hugging Face hub cache (``$HF_HOME/hub``) as the snapshot of ``repo``'s main."""
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot


def _openai_bpe() -> tuple[dict[str, int], list[str]]:
    """OpenAI's CLIP vocabulary and merges, derived from the BPE file shipped with the ``clip`` package
    exactly as its ``SimpleTokenizer`` derives them (so token ids match OpenAI's and open_clip's)."""
    import importlib.util

    spec = importlib.util.find_spec("clip")
    assert spec is not None and spec.submodule_search_locations
    bpe_path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe_path) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    order = sorted(range(256), key=lambda b: (b not in printable, printable.index(b) if b in printable else b))
    byte_symbols = [symbols[b] for b in order]
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


# HF CLIPConfig sizes of OpenAI's ViT-B/32, for benchmarks (compute does not depend on the weights' values).
VIT_B_32 = {
    "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "image_size": 224,
    "patch_size": 32,
    "projection_dim": 512,
}


def hf_clip_folder(folder: Path, seed: int = 0, full_size: bool = False) -> Path:
    """A 1-layer HF CLIPModel (32 px, shortest-edge resize then crop) with OpenAI's tokenizer; or, with
    ``full_size``, one of ViT-B/32's sizes."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab, merges = _openai_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = 77
    text = {"vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": vocab["<|startoftext|>"]}
    text |= {"eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 8}
    side, projection = 32, 32
    if full_size:
        text |= VIT_B_32["text"]
        vision = {**VIT_B_32["vision"], "image_size": VIT_B_32["image_size"], "patch_size": VIT_B_32["patch_size"]}
        side, projection = VIT_B_32["image_size"], VIT_B_32["projection_dim"]
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection, logit_scale_init_value=4.6)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    _spread(model, 100.0, None)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    crop = {"height": side, "width": side}
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size=crop).save_pretrained(folder)
    return folder


def _word_tokenizer() -> Any:
    """A word-level fast tokenizer (lower-cased words, an unknown token, an end token), as SigLIP 2's
    Gemma tokenizer is a ``tokenizer.json`` rather than a sentencepiece model; no download needed."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16
    )


def hf_siglip_folder(folder: Path, seed: int = 0) -> Path:
    """A 1-layer HF SiglipModel (32 px squashed, 0.5 mean/std) with a word-level tokenizer.json."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tokenizer = _word_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
    text |= {
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 1,
    }
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 8}
    config = SiglipConfig(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    _spread(model, 10.0, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
