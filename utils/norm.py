"""RMSNorm: LayerNorm without the mean and the bias (Zhang & Sennrich, 2019)."""

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Meta's RMSNorm: x / sqrt(mean(x^2) + eps) over the last dim, in float32, then times weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    """Normalise each vector by its root-mean-square, then scale by a learned weight. (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: the same numbers, with a hand-written backward (below)
            return fast_rms_norm(x, self.weight, self.eps)
        if x.is_cuda and x.dtype == self.weight.dtype and not torch.compiler.is_compiling():
            return fused_rms_norm(x, self.weight, self.eps)  # eager on a GPU: one kernel instead of eight (below)
        return rms_norm(x, self.weight, self.eps)


# ---- speed ------------------------------------------------------------------------------------------

def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """`rms_norm` as torch's F.rms_norm: one CUDA kernel where `rms_norm` launches eight (float, pow, mean, add,
    rsqrt, mul, cast, mul), and decoding one token runs 2 * n_layers + 1 norms. Batch-1 eager decoding on a GPU
    waits on those launches: on an H200 (SmolLM2-135M's shape, bf16, benchmarks/gpu.md) it went from 39.1 and
    29.7 tok/s to 43.7 and 52.9 in two runs, against Hugging Face's 42.2 and 40.8.

    Bit for bit `rms_norm` in float32; in bf16 and fp16 it multiplies by the weight before rounding to x's dtype,
    where Meta rounds first: the two differ by at most one rounding step. Used for inference only.
    """
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def fast_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """`rms_norm` (bit for bit) with its gradient written out by hand instead of derived op by op."""
    return _RMSNormFunction.apply(x, weight, eps)


class _RMSNormFunction(torch.autograd.Function):
    """Autograd would differentiate the forward op by op (pow, mean, rsqrt, two multiplies). On the
    project's 2-core CPU, forward plus backward of a (32, 128, 128) input took 4.2 ms that way and
    1.7 ms this way (benchmarks/train_shakespeare.md, round 5). With x_hat = x * rstd and
    rstd = 1 / sqrt(mean(x^2) + eps):

        dL/dw = sum over tokens of g * x_hat
        dL/dx = rstd * (g*w - x_hat * mean(g*w * x_hat))
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision -> float32
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        x_hat = xf * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.x_dtype = x.dtype
        return x_hat.type_as(x) * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x_hat, rstd, weight = ctx.saved_tensors
        g = grad.to(x_hat.dtype)
        gw = g * weight                                              # (..., dim)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dot = torch.linalg.vecdot(gw, x_hat).unsqueeze(-1) / x_hat.shape[-1]  # (..., 1)
            dx = torch.addcmul(gw, x_hat, dot, value=-1).mul_(rstd).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.linalg.vecdot(g.flatten(0, -2).t(), x_hat.flatten(0, -2).t()).to(weight.dtype)
        return dx, dw, None
