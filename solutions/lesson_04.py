"""Solutions to lesson 04's exercises: the same names as the notebook's stubs.

A test replaces each exercise cell by `from solutions.lesson_04 import *` and expects every check to pass.
"""

import torch
import torch.nn.functional as F
from torch import nn

from utils.attention import Attention

__all__ = ["my_swiglu_hidden_dim", "MyFeedForward", "MyRMSNorm", "MyBlock"]


def my_swiglu_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU width: int(2 * 4 * dim / 3), times ffn_dim_multiplier if given, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)                                      # three matrices cost what two of 4*dim do
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)                        # 70B: 1.3, before rounding
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)     # round *up*


class MyFeedForward(nn.Module):
    """SwiGLU: (..., dim) -> (..., dim) = w2(silu(w1 x) * w3 x); w1 the gate, w3 the value, w2 back down."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))                  # (..., hidden_dim) -> (..., dim)


class MyRMSNorm(nn.Module):
    """x / sqrt(mean(x^2 over the last dim) + eps) * weight: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))                      # the learned gain; no bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()                                                   # the statistics in float32, as Meta
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class MyBlock(nn.Module):
    """A pre-norm LLaMA block with Meta's names: (B, T, dim) -> (B, T, dim)."""

    def __init__(self, config):
        super().__init__()
        self.attention = Attention(config.dim, config.n_heads, config.n_kv_heads)
        self.feed_forward = MyFeedForward(config.dim, config.hidden_dim)
        self.attention_norm = MyRMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = MyRMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)  # each branch reads a normalised copy
        return h + self.feed_forward(self.ffn_norm(h))                       # and adds to the residual stream
