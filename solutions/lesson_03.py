"""Solutions to lesson 03's exercises: the same names as the notebook's stubs.

A test replaces each exercise cell by `from solutions.lesson_03 import *` and expects every check to pass.
"""

import torch
from torch import nn

from utils.attention import KVCache, attention
from utils.rope import apply_rotary_emb

__all__ = ["MyKVCache", "my_causal_mask", "MyAttention"]


class MyKVCache(nn.Module):
    """Keys and values of past tokens, preallocated as (batch_size, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int):
        super().__init__()
        self.k = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)
        self.v = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor):
        """Write xk, xv (B, n_kv, T, hd) at start_pos; return all keys, values so far (B, n_kv, start_pos + T, hd)."""
        B, _, T, _ = xk.shape
        self.k[:B, :, start_pos:start_pos + T] = xk                      # in place: nothing is reallocated
        self.v[:B, :, start_pos:start_pos + T] = xv
        return self.k[:B, :, :start_pos + T], self.v[:B, :, :start_pos + T]  # views, no copy


def my_causal_mask(q_len: int, kv_len: int) -> torch.Tensor:
    """Bool (q_len, kv_len), True where allowed: query i sits at kv_len - q_len + i and sees keys up to there."""
    rows = torch.arange(q_len)[:, None]                                  # new token i
    cols = torch.arange(kv_len)[None, :]                                 # key j
    return cols <= rows + (kv_len - q_len)


class MyAttention(nn.Module):
    """Grouped-query attention with RoPE that reads and writes self.cache when one is installed."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """x (B, T, dim), cos/sin (T, head_dim/2) of positions start_pos .. start_pos + T - 1 -> (B, T, dim)."""
        B, T, _ = x.shape
        q = apply_rotary_emb(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary_emb(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)                    # (B, n_kv_heads, S, head_dim)
        S = k.shape[2]                                                   # start_pos + T with a cache, else T
        y = attention(q, k, v, my_causal_mask(T, S))                    # (B, n_heads, T, head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
