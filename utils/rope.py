"""Rotary position embeddings (RoPE), in Meta's and in Hugging Face's convention.

RoPE rotates each pair of dimensions of q and k by an angle proportional to the token's position,
so that q_m . k_n depends only on m - n. Meta pairs *adjacent* dimensions (0,1), (2,3), ... and
writes the rotation as complex multiplication; Hugging Face pairs the two *halves* (0, d/2),
(1, d/2+1), ... ("rotate_half") and stores wq/wk with their rows permuted to match. The model here
uses Meta's convention; `permute_hf_to_meta` converts HF weights onto it.

Llama 3.1 and later stretch the context 16x after training by slowing down RoPE's slowest rotations
(`RopeScaling`, `scale_frequencies`): the frequency ladder changes, nothing else does.
"""

import math
from dataclasses import dataclass

import torch


def rope_frequencies(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Rotation speed of each dimension pair: theta^(-2i/head_dim), shape (head_dim // 2,)."""
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim ({head_dim}) must be even: RoPE rotates pairs of dimensions")
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE scaling. The defaults are Meta's (params.json `use_scaled_rope: true`); Llama 3.2's
    Hugging Face configs use factor 32."""

    factor: float = 8.0                 # the slowest frequencies are divided by this
    low_freq_factor: float = 1.0        # wavelengths above original_max_seq_len / low_freq_factor: divided
    high_freq_factor: float = 4.0       # wavelengths below original_max_seq_len / high_freq_factor: untouched
    original_max_seq_len: int = 8192    # the context the model was first trained on

    def __post_init__(self):
        ok = self.factor >= 1 and 0 < self.low_freq_factor < self.high_freq_factor and self.original_max_seq_len > 0
        if not ok:
            raise ValueError(f"bad RoPE scaling {self}: need factor >= 1, 0 < low_freq_factor < high_freq_factor "
                             "and original_max_seq_len > 0 (Meta's: RopeScaling(8.0, 1.0, 4.0, 8192))")


def scale_frequencies(freqs: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency ladder (Meta's `apply_scaling`): freqs (hd/2,) -> scaled freqs (hd/2,).

    With wavelength λ_i = 2π / ω_i, L = original_max_seq_len, s = factor, α = low_freq_factor,
    β = high_freq_factor and γ_i = (L / λ_i - α) / (β - α):

        ω'_i = ω_i                          if λ_i < L / β   (fast pairs: untouched)
        ω'_i = ω_i / s                      if λ_i > L / α   (slow pairs: s times slower)
        ω'_i = (1 - γ_i) ω_i / s + γ_i ω_i  otherwise        (a straight blend of the two)

    A pair that turns many times within L already met every angle in training and keeps its speed; one
    that never finished a turn within L would meet angles it never saw past L, so it is slowed s times
    (position interpolation), which stretches the context s times for those pairs.
    """
    s = scaling
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * freqs / s.factor + smooth * freqs
    scaled = torch.where(wavelen > s.original_max_seq_len / s.low_freq_factor, freqs / s.factor, blended)
    return torch.where(wavelen < s.original_max_seq_len / s.high_freq_factor, freqs, scaled)


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float = 10000.0, device=None,
                 scaling: RopeScaling | None = None):
    """cos and sin of position * frequency, each (max_seq_len, head_dim // 2), float32; scaled as Llama 3.1 if asked."""
    freqs = rope_frequencies(head_dim, theta, device)
    if scaling is not None:
        freqs = scale_frequencies(freqs, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), freqs)  # (S, hd/2)
    return angles.cos().float(), angles.sin().float()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Meta's RoPE: rotate each adjacent pair (x[2i], x[2i+1]) by angle position * freq_i.

    x (B, T, H, hd), cos/sin (T, hd/2) -> (B, T, H, hd). Written out, the 2-D rotation is
    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos): complex multiplication, computed in float32.
    The model runs `fast_apply_rotary_emb` (end of this file), which gives the same numbers.
    """
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # even and odd dims, (B, T, H, hd/2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def precompute_freqs_cis(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> torch.Tensor:
    """Meta's table: e^(i * position * frequency) as complex64, shape (max_seq_len, head_dim // 2)."""
    cos, sin = rope_cos_sin(head_dim, max_seq_len, theta)
    return torch.complex(cos, sin)


def apply_rotary_emb_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Meta's form: view adjacent pairs as complex numbers and multiply. x (B, T, H, hd), freqs_cis (T, hd/2)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, hd/2)
    out = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(-2)
    return out.type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's helper: (x1, x2) -> (-x2, x1) where x1, x2 are the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb_hf(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's convention: pair dim i with dim i + hd/2. x (B, T, H, hd), cos/sin (T, hd/2)."""
    cos = torch.cat((cos, cos), dim=-1)[None, :, None, :]  # (1, T, 1, hd)
    sin = torch.cat((sin, sin), dim=-1)[None, :, None, :]
    return (x.float() * cos + rotate_half(x.float()) * sin).type_as(x)


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of wq or wk (n_heads * hd, dim) so rotate-half RoPE equals Meta's RoPE.

    Within each head, rows (0, 1, 2, 3, ...) become (0, 2, 4, ..., 1, 3, 5, ...): the even
    (real) parts go to the first half and the odd (imaginary) parts to the second. This is the
    `permute` of transformers' convert_llama_weights_to_hf.py.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_meta_to_hf`: HF's wq/wk rows back to Meta's adjacent-pair layout."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# ---- speed ------------------------------------------------------------------------------------------

def fast_apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary_emb` as one complex multiply (Meta's form): 4x faster on a CPU, forward plus
    backward, in eager mode. torch.compile generates no code for complex numbers and MPS supports
    them poorly, so there the plain form runs. Same numbers either way (tests/test_components.py).
    """
    if torch.compiler.is_compiling() or x.device.type == "mps":
        return apply_rotary_emb(x, cos, sin)
    return apply_rotary_emb_complex(x, torch.complex(cos, sin))
