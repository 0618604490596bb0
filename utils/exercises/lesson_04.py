"""Lesson 04 (SwiGLU, RMSNorm, the block): the checkers of its exercises.

    check_feed_forward       `MyFeedForward`: w2(silu(w1(x)) * w3(x))
    check_swiglu_hidden_dim  Meta's hidden-size rule, `my_swiglu_hidden_dim(dim, multiple_of, ffn_dim_multiplier)`
    check_rmsnorm            `MyRMSNorm`
    check_block              `MyBlock`: the pre-norm transformer block with its two residuals
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import KVCache
from ..feedforward import FeedForward, swiglu_hidden_dim
from ..model import LlamaConfig, TransformerBlock
from ..norm import RMSNorm, rms_norm
from ..rope import rope_cos_sin
from .checking import _call, _compare, _describe, _module, _name, _seeded

# ---- SwiGLU ----------------------------------------------------------------------------------------

def _swiglu_rule(dim, multiple_of, mult, base="8/3", rounding="up", multiplier="before") -> int:
    """Meta's hidden size, with knobs for the usual mistakes."""
    h = {"8/3": int(2 * (4 * dim) / 3), "4": 4 * dim, "2/3": int(2 * dim / 3)}[base]
    rnd = {"up": lambda n: multiple_of * ((n + multiple_of - 1) // multiple_of), "none": lambda n: n,
           "down": lambda n: multiple_of * (n // multiple_of),
           "nearest": lambda n: multiple_of * round(n / multiple_of)}[rounding]
    if mult is None or multiplier == "ignored":
        return rnd(h)
    if multiplier == "before":
        return rnd(int(mult * h))
    return int(mult * rnd(h)) if multiplier == "after" else rnd(int(mult * rnd(h)))


def _swiglu_mistakes(cases: list) -> dict:
    rule = lambda **knobs: tuple(_swiglu_rule(*c, **knobs) for c in cases)
    return {
        "not rounded: round up to a multiple of multiple_of": partial(rule, rounding="none"),
        "rounded down: round *up* to the next multiple of multiple_of": partial(rule, rounding="down"),
        "rounded to the nearest multiple: round *up*": partial(rule, rounding="nearest"),
        "ffn_dim_multiplier ignored: scale the width by it before rounding": partial(rule, multiplier="ignored"),
        "ffn_dim_multiplier applied after rounding: scale first, then round up": partial(rule, multiplier="after"),
        "ffn_dim_multiplier applied after rounding (then rounded again): scale first, then round up once":
            partial(rule, multiplier="after, rounded"),
        "4 * dim without the 2/3: SwiGLU has three matrices, so it keeps 2/3 of 4 * dim to cost the same as two":
            partial(rule, base="4"),
        "2/3 of dim: it is 2/3 of 4 * dim": partial(rule, base="2/3"),
    }


@_seeded
def check_swiglu_hidden_dim(fn: Callable) -> None:
    """fn(dim, multiple_of, ffn_dim_multiplier) -> int: int(2 * 4 * dim / 3), times the multiplier, rounded up."""
    cases = [(4096, 256, None), (100, 64, None), (8192, 4096, 1.3), (40, 32, 1.5), (5120, 256, None)]
    got = []
    for case in cases:  # all cases first: rounding down and to the nearest differ only across cases
        inputs = dict(zip(("dim", "multiple_of", "ffn_dim_multiplier"), case))
        got.append(_call(fn, inputs, "ffn_dim_multiplier may be None: scale by it only when it is given"))
        if not isinstance(got[-1], int):
            raise AssertionError(f"returned {got[-1]!r} ({type(got[-1]).__name__}): return an int, nn.Linear needs "
                                 f"one (use // or int()) (input: {_describe(inputs)})")
    _compare(tuple(got), tuple(swiglu_hidden_dim(*c) for c in cases),
             f"(dim, multiple_of, ffn_dim_multiplier) = {', '.join(map(str, cases))}", _swiglu_mistakes(cases),
             "int(2 * (4 * dim) / 3), times ffn_dim_multiplier if given, rounded up to a multiple of multiple_of",
             labels=[str(c) for c in cases])


def _feed_forward_mistakes(m: FeedForward, x) -> dict:
    gate, value = m.w1(x), m.w3(x)
    return {
        "GELU instead of SiLU: the gate is silu(w1(x)) = w1(x) * sigmoid(w1(x))": lambda: m.w2(F.gelu(gate) * value),
        "ReLU instead of SiLU: the gate is silu(w1(x))": lambda: m.w2(F.relu(gate) * value),
        "sigmoid instead of SiLU: silu(z) = z * sigmoid(z)": lambda: m.w2(torch.sigmoid(gate) * value),
        "gate and value swapped: silu goes on w1(x), w3(x) is the linear value": lambda: m.w2(F.silu(value) * gate),
        "w3 not used: SwiGLU multiplies silu(w1(x)) by w3(x)": lambda: m.w2(F.silu(gate)),
        "silu applied to the product: it is silu(w1(x)) * w3(x)": lambda: m.w2(F.silu(gate * value)),
        "added instead of multiplied: silu(w1(x)) * w3(x)": lambda: m.w2(F.silu(gate) + value),
        "w2 not applied: project back to dim with w2": lambda: F.silu(gate) * value,
    }


@_seeded
def check_feed_forward(cls: type) -> None:
    """cls(dim, hidden_dim); forward(x (..., dim)) -> (..., dim) = w2(silu(w1(x)) * w3(x))."""
    for dim, hidden_dim, shape in [(16, 24, (2, 3, 16)), (8, 32, (5, 8))]:
        args, inputs = dict(dim=dim, hidden_dim=hidden_dim), dict(x=torch.randn(shape))
        ref = FeedForward(dim, hidden_dim).eval()
        got = _call(_module(cls, args, ref, inputs), inputs)
        x, (w1, w2, w3) = inputs["x"], (ref.w1.weight, ref.w2.weight, ref.w3.weight)
        _compare(got, ref(x), _describe(args | inputs), _feed_forward_mistakes(ref, x), "w2(silu(w1(x)) * w3(x))",
                 also=(F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T)


# ---- RMSNorm ---------------------------------------------------------------------------------------

def _rmsnorm_mistakes(x, w, eps: float) -> dict:
    ms = x.pow(2).mean(-1, keepdim=True)
    return {
        "LayerNorm, not RMSNorm: don't subtract the mean": lambda: F.layer_norm(x, w.shape, w, None, eps),
        "x.var() subtracts the mean: RMSNorm uses the mean of x², x.pow(2).mean(-1, keepdim=True)":
            lambda: x * torch.rsqrt(x.var(-1, keepdim=True) + eps) * w,
        "eps added outside the square root: x / sqrt(mean(x²) + eps)": lambda: x / (ms.sqrt() + eps) * w,
        "the eps argument ignored (the default 1e-5 used instead): store self.eps = eps in __init__ and use it":
            lambda: x * torch.rsqrt(ms + 1e-5) * w,
        "eps missing (or a tiny constant in its place): x / sqrt(mean(x²) + self.eps)": lambda: x / ms.sqrt() * w,
        "weight not applied: multiply by self.weight (the learned gain)": lambda: x * torch.rsqrt(ms + eps),
        "divided by the L2 norm, not the RMS: take the mean of x², not the sum":
            lambda: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w,
        "multiplied by the RMS instead of dividing by it: x * rsqrt(mean(x²) + eps)":
            lambda: x * (ms + eps).sqrt() * w,
        "mean over all elements, not per token: .mean(-1, keepdim=True)":
            lambda: x * torch.rsqrt(x.pow(2).mean() + eps) * w,
        "normalised over the wrong dim: the mean of x² runs over the last dim (the features)":
            lambda: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * w,
    }


@_seeded
def check_rmsnorm(cls: type) -> None:
    """cls(dim, eps); forward(x (..., dim)) -> x / sqrt(mean(x^2 over the last dim) + eps) * weight."""
    for dim, eps, shape, scale in [(8, 1e-5, (2, 3, 8), 3.0), (16, 0.1, (4, 16), 0.2)]:
        ref, torch_ref = RMSNorm(dim, eps), nn.RMSNorm(dim, eps)
        ref.weight.copy_(torch.randn(dim))
        torch_ref.weight.copy_(ref.weight)
        x = torch.randn(shape) * scale + 0.5 * scale  # a non-zero mean, so that LayerNorm differs
        args, inputs = dict(dim=dim, eps=eps), dict(x=x)
        got = _call(_module(cls, args, ref, inputs), inputs, "mean(-1, keepdim=True) keeps the mean broadcastable")
        _compare(got, ref(x), _describe(args | inputs), _rmsnorm_mistakes(x, ref.weight, eps),
                 "x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight", also=torch_ref(x))


# ---- the transformer block -------------------------------------------------------------------------

BLOCK_HINT = "h = x + attention(attention_norm(x), cos, sin, start_pos); out = h + feed_forward(ffn_norm(h))"
BLOCK_CHUNKS = [(0, 3), (3, 1), (4, 2)]  # (start_pos, T) with a KV cache: a prompt, a decode step, a chunk


def _block_mistakes(m: TransformerBlock, x, cos, sin) -> dict:
    """What the usual wrong blocks compute, with the reference's sub-layers."""
    attn = lambda h: m.attention(h, cos, sin, 0)
    ff, n1, n2, none = m.feed_forward, m.attention_norm, m.ffn_norm, nn.Identity()
    default_eps = (partial(rms_norm, weight=n.weight) for n in (n1, n2))  # RMSNorm(dim): eps 1e-5

    def pre(norm1=n1, norm2=n2, res1=True, res2=True):
        h = attn(norm1(x)) + (x if res1 else 0)
        return ff(norm2(h)) + (h if res2 else 0)

    def post():
        h = n1(x + attn(x))
        return n2(h + ff(h))

    def normed_residual():
        h = n1(x) + attn(n1(x))
        return n2(h) + ff(n2(h))

    return {
        "post-norm (the norm after the residual add, as in the original Transformer): LLaMA normalises each "
        "sub-layer's input, h = x + attention(attention_norm(x))": post,
        "missing residual around attention: h = x + attention(attention_norm(x))": partial(pre, res1=False),
        "missing residual around the feed-forward: out = h + feed_forward(ffn_norm(h))": partial(pre, res2=False),
        "no residual connections: add each sub-layer's output to its input": partial(pre, res1=False, res2=False),
        "one shared norm: attention_norm before the feed-forward too; ffn_norm has its own weights":
            partial(pre, norm2=n1),
        "one shared norm: ffn_norm before attention too; attention_norm has its own weights": partial(pre, norm1=n2),
        "norms swapped: attention_norm goes before attention, ffn_norm before the feed-forward": partial(pre, n2, n1),
        "residual added to the normalised input: add to x itself, h = x + attention(attention_norm(x))":
            normed_residual,
        "parallel block: the feed-forward must read h = x + attention(...), not x": lambda: x + attn(n1(x)) + ff(n2(x)),
        "no norms: normalise each sub-layer's input, attention(attention_norm(x))": partial(pre, none, none),
        "the norms ignore config.norm_eps (RMSNorm's default eps 1e-5 used instead): RMSNorm(config.dim, "
        "config.norm_eps)": partial(pre, *default_eps),
    }


def _block_chunks(ref: TransformerBlock, x, cos, sin, start_pos=True) -> list:
    """The outputs of ref on each chunk of BLOCK_CHUNKS through a fresh KV cache; start_pos=False passes 0."""
    c = ref.attention
    ref.attention.cache = KVCache(x.shape[0], c.n_kv_heads, x.shape[1], c.head_dim)
    try:
        return [ref(x[:, s:s + T], cos[s:s + T], sin[s:s + T], s if start_pos else 0) for s, T in BLOCK_CHUNKS]
    finally:
        ref.attention.cache = None


def _check_block_cached(mine: nn.Module, ref: TransformerBlock, config: LlamaConfig) -> None:
    """mine fed a prompt, a decode step and a chunk through a KV cache on mine.attention, as the model does."""
    if not hasattr(getattr(mine, "attention", None), "cache"):
        raise AssertionError(f"{_name(type(mine))}.attention must be utils.attention.Attention(config.dim, "
                             "config.n_heads, config.n_kv_heads): it is where the model attaches a KV cache")
    S = sum(BLOCK_CHUNKS[-1])
    x, (cos, sin) = torch.randn(2, S, config.dim), rope_cos_sin(config.head_dim, S)
    expected, whole = _block_chunks(ref, x, cos, sin), ref(x, cos, sin)  # whole: every position at once
    dropped = _block_chunks(ref, x, cos, sin, start_pos=False)
    mine.attention.cache = KVCache(2, config.n_kv_heads, S, config.head_dim)
    try:
        for i, (s, T) in enumerate(BLOCK_CHUNKS):
            inputs = dict(x=x[:, s:s + T], cos=cos[s:s + T], sin=sin[s:s + T], start_pos=s)
            held = f", a KV cache holding positions 0 .. {s - 1}" if s else ", an empty KV cache"
            mistakes = {"start_pos not passed on: with a KV cache the attention must write the new keys at start_pos, "
                        "self.attention(self.attention_norm(x), cos, sin, start_pos)": partial(dropped.__getitem__, i)}
            _compare(_call(mine, inputs), expected[i], _describe(inputs) + held, mistakes, BLOCK_HINT,
                     also=whole[:, s:s + T])
    finally:
        mine.attention.cache = None


@_seeded
def check_block(cls: type) -> None:
    """cls(config); forward(x (B, T, dim), cos, sin, start_pos=0) -> (B, T, dim), pre-norm with residuals; then
    with a KV cache on its attention: a prompt, a decode step and a chunk at start_pos 0, 3, 4."""
    config = LlamaConfig(vocab_size=32, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=16,
                         norm_eps=1e-2)
    ref = TransformerBlock(config).eval()
    for norm in (ref.attention_norm, ref.ffn_norm):
        norm.weight.copy_(torch.rand(config.dim) + 0.5)  # different gains, so that a shared norm shows
    cases = [dict(zip(("x", "cos", "sin", "start_pos"), (x, *rope_cos_sin(config.head_dim, x.shape[1]), 0)))
             for x in (torch.randn(2, 5, 32), torch.randn(1, 3, 32))]
    mine = _module(cls, dict(config=config), ref, cases[0])
    for inputs in cases:
        x, cos, sin, _ = inputs.values()
        _compare(_call(mine, inputs), ref(x, cos, sin), f"{_describe(inputs)}, norm_eps {config.norm_eps:g}",
                 _block_mistakes(ref, x, cos, sin), BLOCK_HINT)
    _check_block_cached(mine, ref, config)
