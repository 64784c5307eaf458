"""Where a model runs and in what number format, for every family.

``auto`` means fp16 on CUDA, bf16 on CPUs that compute it natively (AVX512-BF16, AMX), else fp32.
Weights are cast once at load (:func:`cast_weights`), not under autocast on every call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from clipcli.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str) -> torch.device:
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ModelError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {spec!r} requested but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {spec!r} requested but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"unsupported device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(spec: str, device: torch.device) -> Precision:
    if spec not in PRECISIONS:
        raise ModelError(f"unknown precision {spec!r}: use one of {', '.join(PRECISIONS)}")
    if spec != "auto":
        return cast(Precision, spec)  # checked against PRECISIONS above
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def cast_weights(model: nn.Module, precision: Precision) -> None:
    """Store the matrix weights in ``precision``, as OpenAI's ``convert_weights`` does for fp16.

    The same tensors (convolutions, linear and attention projections), for bf16 as well: layer norms,
    batch norms and embeddings stay fp32, and CLIP's own forward casts its inputs to the weights' type
    and computes layer norms in fp32. Casting once at load beats autocast, which casts every weight
    again on each call: short text queries encode about twice as fast, image batches as fast, and the
    weights take half the memory.
    """
    import torch
    from torch import nn

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    for layer in model.modules():
        tensors: list[torch.Tensor | None] = []
        if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Linear):
            tensors += [layer.weight, layer.bias]
        if isinstance(layer, nn.MultiheadAttention):
            tensors += [getattr(layer, f"{s}_proj_weight") for s in ("in", "q", "k", "v")]
            tensors += [layer.in_proj_bias, layer.bias_k, layer.bias_v]
        tensors += [getattr(layer, name, None) for name in ("text_projection", "proj")]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                tensor.data = tensor.data.to(dtype)
