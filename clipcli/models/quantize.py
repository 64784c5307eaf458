"""``--precision int8``: a loaded model's towers rewritten so their large matrix products run in int8.

Any family whose :meth:`~clipcli.models.contract.LoadedModel.towers` hands over its torch modules is served.
Three rewrites, in place, of an fp32 model on the CPU:

- ``nn.MultiheadAttention``, whose packed ``in_proj_weight`` is not an ``nn.Linear`` (so torch's
  ``quantize_dynamic`` leaves it fp32), becomes a :class:`SelfAttention` of two linear layers: queries,
  keys and values in one, then the output. CLIP's ResNet attention pool, which hands its linear layers'
  weights to ``multi_head_attention_forward`` itself, becomes a :class:`PooledAttention` the same way.
  The attention scores (activations times activations) stay fp32, in ``scaled_dot_product_attention``.
- a ViT's patch embedding (a convolution whose stride is its kernel: one matrix product over the
  image's patches) becomes a :class:`PatchEmbedding` over one linear layer.
- every ``nn.Linear`` then becomes an :class:`Int8Linear`: weights quantised once, per output channel,
  to int8; activations quantised per call at run time (dynamic quantisation), on torch's own int8
  kernels: oneDNN's where torch has them, else FBGEMM's (both use AVX2, AVX-512, VNNI and AMX where
  the CPU has them; on a ViT-B/32 oneDNN's measured 8-10% faster, AVX2 kernels and AVX-512 alike).

The int8 towers' QuickGELU (``x * sigmoid(1.702 x)``: three passes over the MLP's widest activations, and
three fresh tensors) becomes one in-place SiLU pass where it sits between two linear layers of an
``nn.Sequential`` (a transformer's MLP, in OpenAI's and open_clip's code): its two scalings by 1.702 go
into those layers' weights (:func:`_fold_quick_gelu`), equal to float rounding; elsewhere it becomes
:class:`FusedQuickGELU`. fp32, bf16 and fp16 keep the family's own module and its exact numerics.

Other convolutions (ResNet towers) stay fp32: dynamic quantisation has no int8 convolution, and static
int8 convolutions need calibration images and channels-last layouts. Layer norms, embeddings and the
final projections (one row per image or text) stay fp32 too.

Runtime: ``torch.ao.quantization.quantize_dynamic``, the public wrapper, is deprecated in favour of
torchao, whose int8 path is fast on the CPU only under ``torch.compile`` (eagerly it measured slower
than fp32 here); the kernels it wrapped, ATen's ``quantized::linear_prepack`` and
``quantized::linear_dynamic``, are called here directly. torch 2.14 also marks quantized tensors (the
packed weights' input) deprecated: when they go, this module moves to torchao or ONNX Runtime (which
measured faster still, at the cost of an export step and an extra; see the README's "Precision").
This module imports torch: it is imported only when int8 is asked for.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from clipcli.errors import ModelError

if TYPE_CHECKING:
    from clipcli.models.contract import LoadedModel


def check_int8_device(device: torch.device) -> None:
    """Refuse int8 where torch's int8 kernels do not run, before any weight is read (exit 2)."""
    if device.type != "cpu":
        raise ModelError(
            f"--precision int8 runs on the CPU only (torch's int8 kernels), not on {device}: "
            "use --device cpu, or --precision fp16 or bf16 there"
        )
    if torch.backends.quantized.engine == "none":
        raise ModelError("--precision int8: this torch build has no int8 engine; use --precision fp32 or bf16")


def quantize_model(lm: LoadedModel) -> None:
    """Rewrite ``lm``'s towers for int8 in place and mark it int8; ``lm`` must be fp32 on the CPU.

    The image tower is rewritten now, the text tower when it is first called: embedding images never
    calls it, and its share of the rewriting (about half a second for a ViT-B/32) is a start-up cost
    every such run would pay for nothing.
    """
    check_int8_device(lm.device)
    towers = lm.towers()  # a family without towers raises its own one-line ModelError
    for name, tower in towers.items():
        if name == "text":
            quantize_on_first_call(tower)
        else:
            quantize_module(tower)
    lm.precision = "int8"


def quantize_on_first_call(module: nn.Module) -> None:
    """Rewrite ``module`` for int8 just before its first forward pass."""

    def rewrite(target: nn.Module, args: object) -> None:
        handle.remove()
        with torch.inference_mode(False):  # the int8 weights must outlive the caller's inference mode
            quantize_module(target)

    handle = module.register_forward_pre_hook(rewrite)


def quantize_module(module: nn.Module) -> nn.Module:
    """``module`` with its attention, patch embeddings and linear layers rewritten for int8, in place."""
    _fold_quick_gelu(module)
    _replace_children(module, _attention_as_linears)
    _replace_children(module, _patch_embedding_as_linear)
    _replace_children(module, _int8_linear)
    _replace_children(module, _fused_quick_gelu)
    return module


def _replace_children(module: nn.Module, rewrite: Callable[[nn.Module], nn.Module | None]) -> None:
    """Depth first: each child that ``rewrite`` turns into a new module is swapped for it."""
    for name, child in module.named_children():
        new = rewrite(child)
        if new is not None:
            setattr(module, name, new)
        else:
            _replace_children(child, rewrite)


def _attention_as_linears(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.MultiheadAttention) and SelfAttention.can_replace(module):
        return SelfAttention(module)
    if PooledAttention.can_replace(module):
        return PooledAttention(module)
    return None


def _patch_embedding_as_linear(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.Conv2d) and PatchEmbedding.can_replace(module):
        return PatchEmbedding(module)
    return None


def _int8_linear(module: nn.Module) -> nn.Module | None:
    return Int8Linear(module) if type(module) is nn.Linear else None


def _fold_quick_gelu(module: nn.Module) -> None:
    """Each ``Linear, QuickGELU, Linear`` run in an ``nn.Sequential`` becomes ``Linear', SiLU, Linear''``:
    ``QuickGELU(y) = silu(1.702 y) / 1.702``, so the first layer's weights and bias are scaled by 1.702
    and the second's weights divided by it (new tensors: the caller's are left as they were). Per
    output channel int8 quantises scaled rows to the same integers; the SiLU runs in place on the first
    layer's output, which only it reads. Before malloc kept freed memory
    (:func:`~clipcli.models.precision.keep_freed_memory`), the three passes' fresh 20 MB tensors took a
    fifth of an int8 ViT-B/32's forward pass at batch 32; with it, the fold still saves a few percent."""
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, act, second in zip(names, names[1:], names[2:], strict=False):
            a, g, b = seq._modules[first], seq._modules[act], seq._modules[second]
            if type(a) is nn.Linear and type(g).__name__ == "QuickGELU" and type(b) is nn.Linear:
                a.weight = nn.Parameter(a.weight.detach() * 1.702, requires_grad=False)
                if a.bias is not None:
                    a.bias = nn.Parameter(a.bias.detach() * 1.702, requires_grad=False)
                b.weight = nn.Parameter(b.weight.detach() / 1.702, requires_grad=False)
                seq._modules[act] = nn.SiLU(inplace=True)


def _fused_quick_gelu(module: nn.Module) -> nn.Module | None:
    return FusedQuickGELU() if type(module).__name__ == "QuickGELU" else None


class FusedQuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, as ``silu(1.702 x) / 1.702``: one fused pass instead of three, ``x``
    left untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x * 1.702, inplace=True).div_(1.702)


def _int8(weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
    return Int8Linear.of(weight, bias)


@contextmanager
def _packing_engine() -> Iterator[None]:
    """oneDNN's int8 kernels where torch has them. The engine is chosen when weights are packed: each
    packed layer then runs on its own engine's kernels, whatever the global setting is later."""
    engines = torch.backends.quantized.supported_engines
    before = torch.backends.quantized.engine
    if "onednn" in engines and platform.machine().lower() in ("x86_64", "amd64"):
        torch.backends.quantized.engine = "onednn"
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


class _ReportsFloatWeights:
    """Families read a layer's ``weight.dtype`` to choose their input's type (``CLIP.dtype`` reads
    ``visual.conv1.weight``, open_clip's text tower ``c_fc.weight``); an int8 layer keeps its real weight
    packed, and answers fp32 through an empty tensor (any other use of it fails loudly, not silently)."""

    int8_original_dtype = torch.float32  # what open_clip asks of int8 layers, before .weight

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty(0)


class Int8Linear(_ReportsFloatWeights, nn.Module):
    """``nn.Linear`` with int8 weights (per output channel) and activations quantised per call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self._pack(linear.weight, linear.bias)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        """The int8 layer of these fp32 tensors (a packed attention projection, a patch convolution)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._pack(weight, bias)
        return layer

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        # symmetric per output channel: the largest weight of each row maps to 127
        scales = torch.linalg.vector_norm(weight, ord=float("inf"), dim=1).clamp(min=1e-12) / 127
        zeros = torch.zeros(len(scales), dtype=torch.long)
        with warnings.catch_warnings(), _packing_engine():
            # the deprecation of quantized tensors: see the module's docstring
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*", category=UserWarning)
            qweight = torch.quantize_per_channel(weight, scales.double(), zeros, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: activations in 7 bits, so that AVX2's 16-bit pairwise sums cannot saturate
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (same call, same results) whose two projections are int8 linear layers.

    Queries, keys and values of self-attention come from one fused projection; for cross-attention
    (query is not key) each comes from its third of the same layer.
    """

    @staticmethod
    def can_replace(mha: nn.MultiheadAttention) -> bool:
        return bool(mha._qkv_same_embed_dim) and mha.bias_k is None and not mha.add_zero_attn

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        self.in_proj = _int8(mha.in_proj_weight, mha.in_proj_bias)
        self.out_proj = _int8(mha.out_proj.weight, mha.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """As ``nn.MultiheadAttention.forward``, except that no attention weights are returned."""
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, dim = query.shape
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q = self.in_proj(query)[..., :dim]
            k = self.in_proj(key)[..., dim : 2 * dim]
            v = self.in_proj(value)[..., 2 * dim :]
        q, k, v = (self._heads(t, batch) for t in (q, k, v))
        mask = self._mask(attn_mask, key_padding_mask, batch, length, k.shape[2])
        causal = is_causal and mask is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, dim))
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _heads(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """(L, N, D) -> (N, heads, L, D / heads)."""
        return x.reshape(x.shape[0], batch, self.num_heads, -1).permute(1, 2, 0, 3)

    def _mask(
        self, attn_mask: torch.Tensor | None, padding: torch.Tensor | None, batch: int, length: int, source: int
    ) -> torch.Tensor | None:
        """One additive float mask (N or 1, heads or 1, L, S) from MultiheadAttention's two masks, where
        ``True`` means "may not attend" (the opposite of ``scaled_dot_product_attention``'s)."""
        masks = []
        if attn_mask is not None:
            mask = attn_mask.reshape(batch, self.num_heads, length, source) if attn_mask.dim() == 3 else attn_mask
            masks.append(_additive(mask))
        if padding is not None:
            masks.append(_additive(padding)[:, None, None, :])
        if not masks:
            return None
        return masks[0] if len(masks) == 1 else masks[0] + masks[1]


def _additive(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))
    return mask.float()


class PooledAttention(nn.Module):
    """CLIP's ``AttentionPool2d`` (ResNet towers, in OpenAI's and open_clip's code) calling its own
    linear layers as modules, so that they can be int8."""

    @staticmethod
    def can_replace(module: nn.Module) -> bool:
        layers = ("q_proj", "k_proj", "v_proj", "c_proj")
        return (
            type(module).__name__ == "AttentionPool2d"
            and all(type(getattr(module, name, None)) is nn.Linear for name in layers)
            and isinstance(getattr(module, "positional_embedding", None), torch.Tensor)
            and isinstance(getattr(module, "num_heads", None), int)
        )

    def __init__(self, pool: Any) -> None:
        super().__init__()
        self.positional_embedding = pool.positional_embedding
        self.num_heads: int = pool.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.c_proj = pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # the mean is the one query
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        batch, dim = x.shape[1], x.shape[2]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], batch, self.num_heads, -1).permute(1, 2, 0, 3)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x[:1])), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.c_proj(out.permute(2, 0, 1, 3).reshape(batch, dim))


class PatchEmbedding(_ReportsFloatWeights, nn.Module):
    """A ViT's patch convolution (stride = kernel, no padding) as one int8 linear layer over the patches."""

    @staticmethod
    def can_replace(conv: nn.Conv2d) -> bool:
        return (
            type(conv) is nn.Conv2d
            and conv.kernel_size == conv.stride
            and conv.kernel_size[0] > 1
            and conv.padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
        )

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.kernel = (conv.kernel_size[0], conv.kernel_size[1])
        self.out_channels = conv.out_channels
        self.linear = _int8(conv.weight.reshape(conv.out_channels, -1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        kh, kw = self.kernel
        rows, cols = h // kh, w // kw  # a convolution drops the pixels past the last whole patch
        patches = x[:, :, : rows * kh, : cols * kw].reshape(n, c, rows, kh, cols, kw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, c * kh * kw)
        return self.linear(patches).transpose(1, 2).reshape(n, self.out_channels, rows, cols)
