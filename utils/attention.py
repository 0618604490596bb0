"""Grouped-query attention (GQA) with a preallocated KV cache.

`n_heads` query heads share `n_kv_heads` key/value heads: n_kv_heads == n_heads is ordinary
multi-head attention (MHA), n_kv_heads == 1 is multi-query attention (MQA), anything between is
GQA (Ainslie et al., 2023). Fewer K/V heads mean fewer parameters and, above all, a smaller cache.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .rope import fast_apply_rotary_emb


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv_heads, S, hd) -> (B, n_kv_heads * n_rep, S, hd): each K/V head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, n_kv, S, hd = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, S, hd).reshape(B, n_kv * n_rep, S, hd)


def causal_mask(q_len: int, kv_len: int, device=None, start_pos: int | torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (q_len, kv_len) mask, True where attention is allowed, aligned bottom-right.

    The last query sits at position kv_len - 1, so query i may see keys 0 .. kv_len - q_len + i.
    SDPA's is_causal=True aligns top-left instead (query i sees keys 0..i), which is only right
    when q_len == kv_len: with a non-empty cache it would hide the new chunk's own past.
    start_pos places query 0 elsewhere (a (1,) tensor for a fixed-size cache whose end is not written yet).
    """
    offset = kv_len - q_len if start_pos is None else start_pos
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    return cols <= rows + offset


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA, the textbook way: q (B, n_heads, T, hd), k/v (B, n_kv_heads, S, hd) -> (B, n_heads, T, hd).

    softmax(q k^T / sqrt(hd), where `mask` allows, default causal_mask(T, S)) v, each K/V head serving
    n_heads / n_kv_heads query heads. `Attention` runs `fused_attention`, which gives the same numbers.
    """
    T, S = q.shape[2], k.shape[2]
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, n_heads, S, hd)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, n_heads, T, S)
    allowed = causal_mask(T, S, q.device) if mask is None else mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, n_heads, T, hd)


class KVCache(nn.Module):
    """Keys and values of past tokens, preallocated as (B, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by this cache: 2 (k and v) * B * n_kv_heads * max_seq_len * head_dim * itemsize."""
        return self.k.nbytes + self.v.nbytes

    def update(self, start_pos: int | torch.Tensor, xk: torch.Tensor, xv: torch.Tensor):
        """Write xk, xv (B, n_kv_heads, T, hd) at start_pos; return all keys/values so far (views)."""
        if isinstance(start_pos, torch.Tensor):  # the compiled decode step (utils/decode.py)
            return update_in_place(self, start_pos, xk, xv)
        B, _, T, _ = xk.shape
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions but start_pos ({start_pos}) + "
                             f"new tokens ({T}) = {end}: reset the cache or allocate a longer one")
        if B > self.k.shape[0]:
            raise ValueError(f"batch of {B} but the cache was allocated for {self.k.shape[0]}: "
                             "call model.setup_cache with a larger batch_size")
        self.k[:B, :, start_pos:end] = xk
        self.v[:B, :, start_pos:end] = xv
        return self.k[:B, :, :end], self.v[:B, :, :end]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE: (B, T, dim) -> (B, T, dim)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = fast_apply_rotary_emb(q, cos, sin), fast_apply_rotary_emb(k, cos, sin)  # = apply_rotary_emb
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, n_kv_heads, start_pos + T, hd)
        # attention(q, k, v) in one fused kernel (the speed section below): (B, n_heads, T, hd)
        y = fused_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, start_pos=start_pos)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))


# ---- speed ------------------------------------------------------------------------------------------

def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    start_pos: int | torch.Tensor = 0) -> torch.Tensor:
    """`attention` in one fused kernel: q (B, H, T, hd), k/v (B, H_kv, S, hd) -> (B, H, T, hd).

    The same numbers (tests/test_components.py), without building the (T, S) scores or repeating K/V in
    memory. A tensor start_pos means a fixed-size cache (`update_in_place`): keys after the queries are hidden.
    """
    T, S = q.shape[2], k.shape[2]
    mask = None
    if isinstance(start_pos, torch.Tensor):
        mask = causal_mask(T, S, q.device, start_pos)  # key j visible to query i when j <= start_pos + i
    elif T > 1 and S > T:
        mask = causal_mask(T, S, device=q.device)  # a chunk after cached tokens: bottom-right aligned
    # One new token sees every key (no mask); T == S is plain causal, where SDPA's top-left is_causal is right.
    kwargs = dict(attn_mask=mask, is_causal=mask is None and T > 1, dropout_p=dropout_p,
                  enable_gqa=q.shape[1] != k.shape[1])
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU bf16 autocast: attend in fp32, since PyTorch's CPU attention backward is ~7x slower in
        # bf16; the projections around it still run in bf16 (AMX)
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def update_in_place(cache: KVCache, start_pos: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor):
    """`KVCache.update` with start_pos a (1,) tensor, so that no shape depends on it (torch.compile, CUDA graphs):
    writes with index_copy_ and returns the whole cache, (B, n_kv_heads, max_seq_len, hd); `fused_attention`
    hides the positions after the queries, so whatever they hold never counts."""
    B, _, T, _ = xk.shape
    positions = start_pos + torch.arange(T, device=xk.device)  # (T,)
    cache.k[:B].index_copy_(2, positions, xk)
    cache.v[:B].index_copy_(2, positions, xv)
    return cache.k[:B], cache.v[:B]
