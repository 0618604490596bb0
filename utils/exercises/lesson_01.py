"""Lesson 01 (RoPE): the checkers of its exercises.

    check_rope_cos_sin        the cos/sin tables, `rope_cos_sin(head_dim, max_seq_len, theta)`
    check_rope                Meta's rotation of adjacent pairs, `apply_rotary_emb(x, cos, sin)`
    check_permute_hf_to_meta  HF's q/k rows back in Meta's pair order, `permute_hf_to_meta(w, n_heads)`
    check_rope_frequencies    the frequencies alone, `rope_frequencies(head_dim, theta)` (no exercise cell uses it:
                              check_rope_cos_sin names the same frequency mistakes in the tables)
"""

from collections.abc import Callable
from functools import partial

import torch

from ..rope import (
    apply_rotary_emb,
    apply_rotary_emb_complex,
    permute_hf_to_meta,
    permute_meta_to_hf,
    rope_cos_sin,
    rope_frequencies,
)
from .checking import _call, _compare, _describe, _seeded

ROTATE_HALF = ("looks like the rotate-half (Hugging Face) layout: you paired dim i with dim i + head_dim/2; "
               "Meta pairs adjacent dims 2i and 2i+1 (x[..., 0::2], x[..., 1::2])")
ROPE_HINT = ("Rotate each adjacent pair: (x[2i], x[2i+1]) -> (x0 cos - x1 sin, x0 sin + x1 cos), "
             "with cos/sin broadcast as cos[None, :, None, :] (positions on dim 1 of x)")


def _rope(x, c, s, pairs="adjacent", write="interleaved"):
    """Textbook RoPE with knobs for the usual mistakes; c, s broadcast against (B, T, H, hd/2)."""
    a, b = (x[..., 0::2], x[..., 1::2]) if pairs == "adjacent" else x.chunk(2, dim=-1)
    ra, rb = a * c - b * s, a * s + b * c
    return torch.stack((ra, rb), dim=-1).flatten(-2) if write == "interleaved" else torch.cat((ra, rb), dim=-1)


def _rope_mistakes(x, cos, sin) -> dict:
    c, s = cos[None, :, None], sin[None, :, None]  # (1, T, 1, hd/2)
    return {
        ROTATE_HALF: lambda: _rope(x, c, s, "halves", "halves"),
        ROTATE_HALF + ", and the sin terms have the wrong sign": lambda: _rope(x, c, -s, "halves", "halves"),
        "rotates the wrong way (sign of the sin terms): (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)":
            lambda: _rope(x, c, -s),
        "cos and sin swapped": lambda: _rope(x, s, c),
        "right pairs, but the results are written back as two halves (torch.cat): interleave them, "
        "torch.stack((out0, out1), dim=-1).flatten(-2)": lambda: _rope(x, c, s, write="halves"),
        "cos/sin broadcast against the heads: (T, hd/2) lines up with (H, hd/2) of x (B, T, H, hd/2); "
        "use cos[None, :, None, :]": lambda: _rope(x, cos, sin),
        "returned x unchanged: no rotation applied": lambda: x,
    }


@_seeded
def check_rope(fn: Callable) -> None:
    """fn(x (B, T, H, hd), cos (T, hd/2), sin (T, hd/2)) -> (B, T, H, hd): Meta's RoPE on adjacent pairs."""
    for B, T, H, hd in [(2, 4, 4, 8), (1, 5, 2, 16), (3, 1, 3, 4)]:
        x = torch.randn(B, T, H, hd)
        cos, sin = (t[3:] for t in rope_cos_sin(hd, 3 + T))  # positions 3.. so that no row is the identity
        inputs = dict(x=x, cos=cos, sin=sin)
        got = _call(fn, inputs, ROPE_HINT)
        _compare(got, apply_rotary_emb(x, cos, sin), _describe(inputs), _rope_mistakes(x, cos, sin), ROPE_HINT,
                 also=apply_rotary_emb_complex(x, torch.complex(cos, sin)))


def _frequency_mistakes(hd: int, theta: float) -> dict:
    i = torch.arange(hd // 2, dtype=torch.float64)
    return {
        "exponent -i/head_dim: step i by 2, torch.arange(0, head_dim, 2) / head_dim": lambda: theta ** (-i / hd),
        "frequencies grow with i: it is 1 / theta ** (2i / head_dim), not theta ** (2i / head_dim)":
            lambda: theta ** (2 * i / hd),
        "off by one: i starts at 0, so the first pair has frequency 1": lambda: theta ** (-2 * (i + 1) / hd),
        "the last exponent is 1 (linspace): it is (head_dim - 2) / head_dim, torch.arange(0, head_dim, 2) / "
        "head_dim": lambda: theta ** -torch.linspace(0, 1, hd // 2, dtype=torch.float64),
        "theta ignored (always 10000): use the argument (Llama 3 uses 500000)": lambda: 10000.0 ** (-2 * i / hd),
    }


@_seeded
def check_rope_frequencies(fn: Callable) -> None:
    """fn(head_dim, theta) -> (head_dim // 2,): theta ** (-2i / head_dim) for i = 0 .. head_dim/2 - 1."""
    for hd, theta in [(8, 10000.0), (16, 500000.0), (6, 100.0)]:
        inputs = dict(head_dim=hd, theta=theta)
        _compare(_call(fn, inputs), rope_frequencies(hd, theta), _describe(inputs), _frequency_mistakes(hd, theta),
                 "freqs[i] = 1 / theta ** (2i / head_dim), one per pair of dims: head_dim // 2 values")


def _tables(freqs, positions) -> tuple:
    angles = torch.outer(positions.double(), freqs.double())  # (S, hd/2)
    return angles.cos(), angles.sin()


def _cos_sin_mistakes(hd: int, S: int, theta: float, cos, sin) -> dict:
    positions = torch.arange(S)
    wrong_freqs = {f"the frequency ladder is wrong ({what}): {how}; or call rope_frequencies(head_dim, theta)":
                   lambda f=f: _tables(f(), positions)
                   for (what, how), f in ((m.split(": ", 1), f) for m, f in _frequency_mistakes(hd, theta).items())}
    return {
        "off by one: positions start at 0 (angle 0: cos 1, sin 0), torch.arange(max_seq_len)":
            lambda: _tables(rope_frequencies(hd, theta), positions + 1),
        "returned (sin, cos): return (cos, sin)": lambda: (sin, cos),
        "tables are (head_dim/2, max_seq_len): angles = torch.outer(positions, freqs)": lambda: (cos.T, sin.T),
        "Hugging Face's (max_seq_len, head_dim) tables (frequencies repeated for rotate-half): Meta's layout "
        "wants (max_seq_len, head_dim // 2)": lambda: (torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)),
        **wrong_freqs,
    }


@_seeded
def check_rope_cos_sin(fn: Callable) -> None:
    """fn(head_dim, max_seq_len, theta) -> (cos, sin), each (max_seq_len, head_dim // 2): of position * freq."""
    for hd, S, theta in [(8, 6, 10000.0), (6, 4, 100.0)]:  # 6, 100: theta ignored differs from linspace
        inputs = dict(head_dim=hd, max_seq_len=S, theta=theta)
        got = _call(fn, inputs)
        cos, sin = rope_cos_sin(hd, S, theta)
        _compare(got, (cos, sin), _describe(inputs), _cos_sin_mistakes(hd, S, theta, cos, sin),
                 "angles = torch.outer(torch.arange(max_seq_len), rope_frequencies(head_dim, theta))",
                 labels=("cos", "sin"))


def _permute_mistakes(w, n_heads: int) -> dict:
    return {
        "the other direction (Meta -> HF, permute_meta_to_hf): HF stores each head as its even rows, then "
        "its odd rows; interleave the two halves back": partial(permute_meta_to_hf, w, n_heads),
        "permuted the whole matrix as one head: permute within each head, w.view(n_heads, 2, head_dim // 2, "
        "dim)": partial(permute_hf_to_meta, w, 1),
        "returned w unchanged (a view and a reshape without the transpose move no row): w.view(n_heads, 2, "
        "head_dim // 2, dim).transpose(1, 2).reshape(-1, dim)": partial(torch.clone, w),
    }


@_seeded
def check_permute_hf_to_meta(fn: Callable) -> None:
    """fn(w (n_heads * head_dim, dim), n_heads) -> w with each head's rows in Meta's adjacent-pair order."""
    hint = "within each head, HF's row j goes to row 2j and row j + head_dim/2 to row 2j + 1"
    for n_heads, hd, dim in [(2, 8, 6), (3, 4, 5), (1, 12, 3)]:
        w = torch.randn(n_heads * hd, dim)
        inputs = dict(w=w, n_heads=n_heads)
        got = _call(fn, inputs, hint)
        order = torch.arange(hd).view(2, hd // 2).T.flatten()  # 0, hd/2, 1, hd/2 + 1, ...
        _compare(got, permute_hf_to_meta(w, n_heads), _describe(inputs), _permute_mistakes(w, n_heads), hint,
                 also=w.view(n_heads, hd, dim)[:, order].reshape(-1, dim))
