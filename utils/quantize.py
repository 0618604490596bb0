"""Int8 weight-only quantization: every weight matrix kept as int8, one scale per output channel.

Decoding one token at batch 1 reads every weight once and does two flops per weight it reads, so its speed
is set by the bytes read, not by arithmetic. Stored in 1 byte instead of 2 (bf16), the weights cost half
the reading. Only the weights change ("weight-only"): activations, norms and the KV cache stay in bf16.

    s_i = max_j |W_ij| / 127                  one scale per output row i (symmetric: no zero point)
    Q_ij = round(W_ij / s_i), in [-127, 127]   stored as int8; W_ij - Q_ij s_i is at most s_i / 2
    y_i = sum_j x_j W_ij ~= s_i * sum_j x_j Q_ij  the row's scale factors out of the dot product

    quantize_int8(model)           # in place: the blocks' projections and `output` become Int8Linear
    generate(model, prompt, n)     # unchanged, eager or compile=True

One scale per row, not one per matrix: a single large weight then coarsens only its own row's grid.
`python -m utils generate|chat --quantize int8` runs it; benchmarks/llamacpp.py measures it against
llama.cpp's q8_0 (int8 with one scale per 32 weights) and gives both perplexities.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .weights import as_dtype


def quantize_per_channel(w: torch.Tensor, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (q (out, in) int8, scales (out,) in dtype) with |w - q * scales[:, None]| <= scales / 2.

    The scale is rounded up to `dtype` before w is divided by it: the forward multiplies by that rounded scale,
    and rounding up keeps the row's largest weight within 127 steps, so no value is clipped.
    """
    w = w.detach().float()
    exact = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(dtype).tiny)  # (out,); an all-zero row gets q = 0
    scales = exact.to(dtype)
    scales = torch.where(scales.float() < exact, torch.nextafter(scales, torch.full_like(scales, float("inf"))),
                         scales)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q (out, in) int8, scales (out,) -> the float weight they stand for, (out, in) in the scales' dtype."""
    return q.to(scales.dtype) * scales[:, None]


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ (weight (out, in) int8 as x's dtype)^T, times scales (out,): (..., out).

    Equal to F.linear(x, dequantize(weight, scales)) up to rounding. This exact form is what inductor's freezing
    recognises on a CPU (torch/_inductor/fx_passes/quantization.py, `_register_woq_mm_int8_pattern*`: bf16 x and
    scales, int8 weight) and lowers to `fast_int8_linear`'s kernel, or, autotuned as utils/decode.py compiles it,
    to inductor's own C++ matrix kernel that reads the int8 weight: either way the compiled step reads int8.
    """
    return F.linear(x, weight.to(x.dtype)) * scales


class Int8Linear(nn.Module):
    """A bias-free nn.Linear stored as int8: weight (out, in) int8, scales (out,). (..., in) -> (..., out).

    The same state-dict name (`weight`) as the nn.Linear it replaces, and `scales` beside it. Both are Parameters
    without gradients, so model.to(dtype) casts the scales and leaves the int8 weight alone.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scales.shape != weight.shape[:1]:
            raise ValueError(f"Int8Linear needs an int8 (out, in) weight and (out,) scales, got {weight.dtype} "
                             f"{tuple(weight.shape)} and {tuple(scales.shape)}: use Int8Linear.from_linear")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype=torch.bfloat16) -> "Int8Linear":
        if linear.bias is not None:
            raise ValueError("Int8Linear replaces bias-free projections (every Llama matrix is one)")
        return cls(*quantize_per_channel(linear.weight, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_int8_kernel(x, self.weight):  # eager decoding on a CPU (the speed section below)
            return fast_int8_linear(x, self.weight, self.scales)
        return int8_linear(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in={in_features}, out={out_features}, scales={str(self.scales.dtype).removeprefix('torch.')}"


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) of every nn.Linear: wq, wk, wv, wo, w1, w2, w3 of each block, and output."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]


@torch.no_grad()
def quantize_int8(model: nn.Module, dtype=torch.bfloat16) -> nn.Module:
    """Replace, in place, every nn.Linear by an Int8Linear (scales in `dtype`) and cast the rest to `dtype`.

    The embedding is a lookup that reads one row per token, not a matrix product: it stays as it is (in `dtype`).
    With tied embeddings the output projection gets its own int8 copy. Quantize a float32 model for the
    closest int8 weights; `dtype` is the activations' (and the KV cache's) dtype from then on.
    """
    from .lora import LoRALinear

    dtype = as_dtype(dtype)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model has LoRA adapters: merge them first (utils.lora.merge_lora), then quantize")
    found = _linears(model)
    if not found:
        raise ValueError("the model has no nn.Linear left to quantize (was it quantized already?)")
    check_kernel_widths([linear for _, _, linear in found], dtype)
    for parent, name, linear in found:
        setattr(parent, name, Int8Linear.from_linear(linear, dtype))
    return model.to(dtype)


# ---- speed ------------------------------------------------------------------------------------------
# On the project's CPU (2 cores, AVX512-BF16 and AMX), one (1, 576) x (576, 1536) product took 27 us through
# `_weight_int8pack_mm` in bf16, 78 us through F.linear on bf16 weights, 36 us on fp32 weights, and 160 us in the
# plain form above, which converts the whole matrix to bf16 first. The kernel reads one row of x at a time:
# with 64 rows it is already slower than the plain form, so a prompt (prefill) keeps the plain form.
# In float32 the kernel has no fast path (284 us): int8 runs with bf16 activations.

KERNEL_MAX_ROWS = 16  # rows of x up to which `fast_int8_linear` beats the plain form (16 did, 64 did not)


def fast_int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`int8_linear` in one kernel that reads the int8 weight as it multiplies: x (..., in) -> (..., out).

    torch's `aten._weight_int8pack_mm`: x (rows, in) and scales (out,) of one float dtype, weight (out, in) int8.
    """
    out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scales)  # (rows, out)
    return out.view(*x.shape[:-1], weight.shape[0])


def uses_int8_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `fast_int8_linear` runs: eager, on a CPU, bf16, few rows, a width the kernel reads right.

    Under torch.compile the plain form runs: inductor turns it into the same kernel (`int8_linear`).
    """
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1] and weight.shape[1] % KERNEL_WIDTH_MULTIPLE == 0)


# torch 2.13's CPU kernel in bf16 returns garbage (inf, nan) or crashes when `in` is not a multiple of 16 (it read
# 40 and 24 wrong, 16, 48 and 80 right); float16 and float32 had no such limit. Compiled, inductor calls it anyway.
KERNEL_WIDTH_MULTIPLE = 16


def check_kernel_widths(linears: list[nn.Linear], dtype: torch.dtype) -> None:
    """Raise ValueError if bf16 activations would send a width the CPU kernel misreads to it (compiled, they would)."""
    bad = sorted({m.in_features for m in linears if m.in_features % KERNEL_WIDTH_MULTIPLE})
    if dtype == torch.bfloat16 and bad and any(m.weight.device.type == "cpu" for m in linears):
        raise ValueError(f"int8 with bfloat16 activations needs every input width to be a multiple of "
                         f"{KERNEL_WIDTH_MULTIPLE} on a CPU (torch's int8 kernel misreads others), and this model has "
                         f"{bad}: quantize with float32 activations (--dtype float32), or skip --quantize")
