"""Solutions to lesson 07's exercises: the same names as the notebook's stubs.

A test replaces each exercise cell by `from solutions.lesson_07 import *` and expects every check to pass.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class MyLoRALinear(nn.Module):
    """base(x) + (alpha / rank) * B(A x): the base layer frozen, A (rank, in) random, B (out, rank) zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight = base.weight                                   # W (out, in), shared with the base layer
        self.weight.requires_grad_(False)                           # frozen
        out_features, in_features = self.weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))       # as nn.Linear initialises its weight
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # zero: the layer starts as the base layer
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


def my_merge_lora(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float) -> torch.Tensor:
    """W (out, in) + (alpha / rank) * B (out, rank) @ A (rank, in)."""
    rank = lora_A.shape[0]
    return weight + (alpha / rank) * lora_B @ lora_A


def my_lora_params(config, rank: int, targets) -> int:
    """n_layers * sum over the target projections of rank * (in_features + out_features)."""
    c = config
    kv = c.n_kv_heads * c.head_dim
    sizes = {"wq": (c.dim, c.n_heads * c.head_dim), "wk": (c.dim, kv), "wv": (c.dim, kv),
             "wo": (c.n_heads * c.head_dim, c.dim), "w1": (c.dim, c.hidden_dim), "w2": (c.hidden_dim, c.dim),
             "w3": (c.dim, c.hidden_dim)}
    return c.n_layers * sum(rank * (i + o) for i, o in (sizes[t] for t in targets))


__all__ = ["MyLoRALinear", "my_merge_lora", "my_lora_params"]
