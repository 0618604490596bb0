"""Lesson 01 (RoPE): solutions to the exercises, one function per exercise cell."""

import torch

__all__ = ["rope_cos_sin", "apply_rotary_emb", "permute_hf_to_meta"]


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position m * frequency theta_i, each (max_seq_len, head_dim // 2), float32."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,): theta_i
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)      # (S, hd/2): m * theta_i
    return angles.cos().float(), angles.sin().float()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]): x (B, T, H, hd), cos/sin (T, hd/2) -> (B, T, H, hd)."""
    x0, x1 = x[..., 0::2].float(), x[..., 1::2].float()   # even and odd dims, (B, T, H, hd/2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, hd/2): positions on dim 1
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(-2).type_as(x)                      # interleaved back: (B, T, H, hd)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's wq/wk rows (n_heads * hd, dim) back to Meta's order: per head, row j -> 2j, row j + hd/2 -> 2j + 1."""
    out_dim, dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(out_dim, dim)
