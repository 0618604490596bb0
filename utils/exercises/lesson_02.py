"""Lesson 02 (grouped-query attention): the checkers of its exercises.

    check_repeat_kv    each K/V head repeated n_rep times in a row, `repeat_kv(x, n_rep)`
    check_causal_mask  the bottom-right causal mask, `causal_mask(q_len, kv_len)` (lesson 03 grades it again)
    check_attention    the `Attention` module's forward without a cache
"""

from collections.abc import Callable
from functools import partial

import torch

from ..attention import Attention, causal_mask, repeat_kv
from ..rope import apply_rotary_emb, apply_rotary_emb_hf, rope_cos_sin
from .checking import _call, _compare, _describe, _module, _seeded
from .lesson_01 import ROTATE_HALF

TILED = ("looks like K/V heads tiled instead of grouped: query head h must read K/V head h // n_rep "
         "(x.repeat(1, n_rep, 1, 1) gives h % n_kv_heads); use x[:, :, None].expand(...) or repeat_interleave")


def _repeat_kv_mistakes(x, n_rep: int) -> dict:
    return {
        TILED: partial(x.repeat, 1, n_rep, 1, 1),
        "repeated along the sequence (dim 2): repeat the heads, dim 1": partial(x.repeat_interleave, n_rep, 2),
        "repeated along the batch (dim 0): repeat the heads, dim 1": partial(x.repeat_interleave, n_rep, 0),
        "repeated along head_dim (dim 3): repeat the heads, dim 1": partial(x.repeat_interleave, n_rep, 3),
        "returned x unchanged: n_rep ignored": partial(torch.clone, x),
    }


@_seeded
def check_repeat_kv(fn: Callable) -> None:
    """fn(x (B, n_kv_heads, S, hd), n_rep) -> (B, n_kv_heads * n_rep, S, hd), each K/V head n_rep times in a row."""
    for shape, n_rep in [((2, 2, 3, 4), 3), ((1, 3, 2, 2), 2), ((2, 4, 5, 8), 1)]:
        x = torch.randn(shape)
        inputs = dict(x=x, n_rep=n_rep)
        _compare(_call(fn, inputs), repeat_kv(x, n_rep), _describe(inputs), _repeat_kv_mistakes(x, n_rep),
                 "query heads h * n_rep .. h * n_rep + n_rep - 1 all read K/V head h",
                 also=x.repeat_interleave(n_rep, 1))


def _mask_mistakes(q_len: int, kv_len: int) -> dict:
    ones = torch.ones(q_len, kv_len, dtype=torch.bool)
    return {
        "aligned top-left (query i sees keys 0..i), like SDPA's is_causal=True: the last query sits at position "
        "kv_len - 1 and sees every key, so query i sees keys 0 .. i + kv_len - q_len": lambda: ones.tril(),
        "True marks the blocked positions: this mask is True where attention is allowed (invert it)":
            lambda: ~causal_mask(q_len, kv_len),
        "True marks the blocked positions, and it is aligned top-left: True where allowed, and query i sees "
        "keys 0 .. i + kv_len - q_len": lambda: ~ones.tril(),
        "the diagonal is masked: a token may attend to itself (<=, not <)": lambda: ones.tril(kv_len - q_len - 1),
    }


@_seeded
def check_causal_mask(fn: Callable) -> None:
    """fn(q_len, kv_len) -> bool (q_len, kv_len), True where query i may attend to key j: j <= i + kv_len - q_len."""
    for q_len, kv_len in [(2, 5), (4, 4), (1, 6), (3, 7)]:  # q_len < kv_len first: the alignments differ
        inputs = dict(q_len=q_len, kv_len=kv_len)
        got = _call(fn, inputs)
        if torch.is_tensor(got) and got.dtype != torch.bool and got.shape == (q_len, kv_len):
            kind = "an additive mask (0 / -inf)" if got.is_floating_point() and got.isinf().any() else got.dtype
            raise AssertionError(f"returned {kind}: return a boolean mask, True where attention is allowed "
                                 f"(input: {_describe(inputs)})")
        _compare(got, causal_mask(q_len, kv_len), _describe(inputs), _mask_mistakes(q_len, kv_len),
                 "mask[i, j] = j <= i + kv_len - q_len", also=torch.ones(q_len, kv_len).tril(kv_len - q_len).bool())


def _attention(m, x, cos, sin, rope="qk", rope_fn=apply_rotary_emb, heads="grouped", scale=None,
               mask="causal", softmax_dim=-1, merge="transpose", wo=True):
    """Textbook GQA with the weights of m (a utils Attention), with knobs for the usual mistakes."""
    B, T, _ = x.shape
    hd, n_rep = m.head_dim, m.n_heads // m.n_kv_heads
    q, k, v = (w(x).view(B, T, -1, hd) for w in (m.wq, m.wk, m.wv))
    q, k, v = (rope_fn(t, cos, sin) if name in rope else t for name, t in zip("qkv", (q, k, v)))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
    k, v = (t.repeat_interleave(n_rep, 1) if heads == "grouped" else t.repeat(1, n_rep, 1, 1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) * (hd ** -0.5 if scale is None else scale)  # (B, H, T, T)
    past = torch.ones(T, T, dtype=torch.bool).tril()
    if mask != "none":
        scores = scores.masked_fill(~(past.T if mask == "flipped" else past), 0.0 if mask == "zero" else float("-inf"))
    y = scores.softmax(softmax_dim) @ v  # (B, H, T, hd)
    y = (y.transpose(1, 2) if merge == "transpose" else y).reshape(B, T, -1)
    return m.wo(y) if wo else y


def _attention_mistakes(m: Attention, x, cos, sin) -> dict:
    v = partial(_attention, m, x, cos, sin)
    return {
        "no causal mask: tokens also attend to later tokens; fill the scores above the diagonal with -inf "
        "before the softmax (or is_causal=True)": partial(v, mask="none"),
        "masked scores set to 0, not -inf: exp(0) = 1, so later tokens still get weight": partial(v, mask="zero"),
        "mask flipped: tokens attend to later tokens instead of earlier ones (tril keeps the past)":
            partial(v, mask="flipped"),
        "scores not scaled: divide q @ k^T by sqrt(head_dim)": partial(v, scale=1.0),
        "scores scaled by 1/sqrt(dim), the model width: the scale is 1/sqrt(head_dim)":
            partial(v, scale=x.shape[-1] ** -0.5),
        "scores scaled by 1/head_dim: the scale is 1/sqrt(head_dim)": partial(v, scale=1 / m.head_dim),
        "RoPE applied to v as well: rotate only q and k (positions enter through the scores)": partial(v, rope="qkv"),
        "RoPE not applied to k: rotate both q and k": partial(v, rope="q"),
        "RoPE not applied to q: rotate both q and k": partial(v, rope="k"),
        "no RoPE: rotate q and k with apply_rotary_emb(t, cos, sin) while they are (B, T, heads, head_dim)":
            partial(v, rope=""),
        ROTATE_HALF: partial(v, rope_fn=apply_rotary_emb_hf),
        TILED: partial(v, heads="tiled"),
        "softmax over the queries (dim -2): each query's weights sum to 1 over the keys, softmax(dim=-1)":
            partial(v, softmax_dim=-2),
        "heads merged without transposing back: y.transpose(1, 2).reshape(B, T, n_heads * head_dim)":
            partial(v, merge="reshape"),
        "output projection wo missing": partial(v, wo=False),
    }


ATTENTION_HINT = ("check the steps: view as (B, T, heads, head_dim), RoPE on q and k, transpose to (B, heads, T, "
                  "head_dim), repeat K/V, scores / sqrt(head_dim), causal mask, softmax over keys, transpose back, wo")


@_seeded
def check_attention(cls: type) -> None:
    """cls(dim, n_heads, n_kv_heads); forward(x (B, T, dim), cos, sin, start_pos=0) -> (B, T, dim), no cache."""
    for dim, n_heads, n_kv_heads, B, T in [(32, 4, 2, 2, 5), (24, 3, 1, 1, 4), (16, 2, 2, 2, 3)]:
        args = dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
        ref = Attention(dim, n_heads, n_kv_heads).eval()
        x = torch.randn(B, T, dim)
        cos, sin = rope_cos_sin(dim // n_heads, T)
        inputs = dict(x=x, cos=cos, sin=sin, start_pos=0)
        got = _call(_module(cls, args, ref, inputs), inputs, ATTENTION_HINT)
        _compare(got, ref(x, cos, sin), _describe(args | inputs), _attention_mistakes(ref, x, cos, sin),
                 ATTENTION_HINT, also=_attention(ref, x, cos, sin))
