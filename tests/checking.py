"""Helpers shared by the exercise-checker tests: the learner's versions more than one lesson's tests use, and
the candidates that replay one of a checker's own listed mistakes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils import exercises as ex
from utils.attention import repeat_kv
from utils.rope import apply_rotary_emb


def rejection(checker, candidate) -> str:
    """The checker's message for a wrong candidate (which must not be reported as unattempted)."""
    with pytest.raises(AssertionError) as e:
        checker(candidate)
    assert not isinstance(e.value, ex.NotAttempted), str(e.value)
    return str(e.value)


def stub(*args, **kwargs):
    """What the notebook's exercise cells hold until the learner fills them in."""
    raise NotImplementedError


def rope_pairs(x, cos, sin, sign=1.0, halves=False, write_halves=False, unsqueeze=True):
    """A learner's real-arithmetic RoPE; the flags are the mistakes."""
    x0, x1 = x.chunk(2, dim=-1) if halves else (x[..., 0::2], x[..., 1::2])
    c, s = (cos[None, :, None, :], sin[None, :, None, :]) if unsqueeze else (cos, sin)
    out0, out1 = x0 * c - sign * x1 * s, sign * x0 * s + x1 * c
    return torch.cat((out0, out1), -1) if halves or write_halves else torch.stack((out0, out1), -1).flatten(-2)


def learner_attention(mistake=None, bias=False):
    """A learner's GQA with an explicit softmax (utils uses SDPA); `mistake` picks one bug."""
    class MyAttention(nn.Module):
        def __init__(self, dim, n_heads, n_kv_heads):
            super().__init__()
            self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
            self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
            self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
            self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
            self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=bias)

        def forward(self, x, cos, sin, start_pos=0):
            B, T, _ = x.shape
            q = apply_rotary_emb(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
            k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
            v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
            if mistake != "no rope on k":
                k = apply_rotary_emb(k, cos, sin)
            if mistake == "rope on v":
                v = apply_rotary_emb(v, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            n_rep = self.n_heads // self.n_kv_heads
            if mistake == "tiled":
                k, v = k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)
            else:
                k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            scores = q @ k.transpose(-2, -1)
            if mistake != "no scale":
                scores = scores / math.sqrt(self.head_dim)
            if mistake != "no mask":
                scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            y = F.softmax(scores, dim=-2 if mistake == "softmax over queries" else -1) @ v
            return self.wo(y.transpose(1, 2).reshape(B, T, -1))
    return MyAttention


def function_like(builder):
    """A function candidate that returns what builder(*its inputs)[message] returns: one listed mistake."""
    return lambda message: lambda *args: builder(*args)[message]()


def module_like(base, builder):
    """A subclass of base whose forward returns builder(self, *inputs)[message](): one listed mistake."""
    def make(message):
        class OneMistake(base):
            def forward(self, *args):
                return builder(self, *args)[message]()
        return OneMistake
    return make
