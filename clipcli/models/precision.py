"""Where a model runs and in what number format, for every family.

``auto`` means fp16 on CUDA, bf16 on CPUs that compute it natively (AVX512-BF16, AMX), else fp32.
Weights are cast once at load (:func:`cast_weights`), not under autocast on every call.

``int8`` (CPU only, :mod:`clipcli.models.quantize`) is never chosen by ``auto``: it is measured to keep
embeddings within cosine 0.999 of fp32 on random and small trained models, but no real CLIP checkpoint
can be checked offline, and published int8 CLIPs lose a point or two of ImageNet zero-shot top-1, so
it would change answers silently. ``clipcli bench-precision`` measures it on a model and photos of
the user's before they opt in.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from clipcli.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

Precision = Literal["fp32", "bf16", "fp16", "int8"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


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


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_class() -> str:
    """The features that set CPU inference speed, for benchmark and report lines: e.g.
    ``avx2 avx512 avx512_vnni avx512_bf16`` (a Zen 4) or ``avx2`` (a Zen 3)."""
    flags = cpu_flags()
    named = {"avx512f": "avx512"}
    wanted = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimd", "sve")
    return " ".join(named.get(f, f) for f in wanted if f in flags) or "no AVX2"


def resolve_precision(spec: str, device: torch.device) -> Precision:
    if spec not in PRECISIONS:
        raise ModelError(f"unknown precision {spec!r}: use one of {', '.join(PRECISIONS)}")
    if spec != "auto":
        return cast(Precision, spec)  # checked against PRECISIONS above
    # never int8: see the module's docstring
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

    if precision not in ("bf16", "fp16"):
        raise ValueError(f"cast_weights casts to bf16 or fp16, not {precision}")
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's <malloc.h>
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the large blocks a CPU forward pass frees, for the next batch to reuse.

    A forward pass allocates activations of tens of megabytes (a ViT-B/32's MLP at batch 32: 20 MB
    each), above glibc's mmap threshold, so each is mapped fresh and unmapped when freed, and every
    batch page-faults its activations in again, in the kernel's time: with the int8 fold of QuickGELU,
    an int8 ViT-B/32's forward pass went 1.24x faster (bf16: within the rounds' spread; the numbers are
    on the Precision page of the manual). PyTorch's CPU performance guide
    answers this with jemalloc or tcmalloc preloaded; glibc's own ``mallopt`` does the same without a
    preload: blocks of up to :data:`KEEP_FREED_BYTES` come from the heap, and freed memory stays in
    the process for reuse (its resident size stays at the run's peak, as with either allocator).

    Called once a CPU model is loaded, so that the weights loading frees (fp32 tensors cast to bf16,
    say) still go back to the system. Leaves malloc alone where the user set its tunables
    (``GLIBC_TUNABLES``, ``MALLOC_*_``), and off glibc. Returns whether it applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
        return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):
        return False
