"""Lesson 02 (grouped-query attention): solutions to the exercises, one name per exercise cell."""

import torch
from torch import nn

from utils.rope import apply_rotary_emb

__all__ = ["repeat_kv", "causal_mask", "Attention"]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv_heads, S, hd) -> (B, n_kv_heads * n_rep, S, hd), each K/V head n_rep times in a row."""
    B, n_kv_heads, S, hd = x.shape
    return x[:, :, None].expand(B, n_kv_heads, n_rep, S, hd).reshape(B, n_kv_heads * n_rep, S, hd)


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Bool (q_len, kv_len), True where query i (at position kv_len - q_len + i) may see key j: j <= that position."""
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (q_len, 1)
    key_pos = torch.arange(kv_len, device=device)[None, :]                  # (1, kv_len)
    return key_pos <= query_pos


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE, the textbook way (no fused kernel): (B, T, dim) -> (B, T, dim)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)          # (B, T, n_heads, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)       # (B, T, n_kv_heads, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)                   # (B, n_heads, T, hd)
        scores = q @ k.transpose(-2, -1) / self.head_dim**0.5             # (B, n_heads, T, T)
        scores = scores.masked_fill(~causal_mask(T, T, x.device), float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v                             # (B, n_heads, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
