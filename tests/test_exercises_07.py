"""Lesson 07's exercise checkers (LoRA): each accepts the utils version and names the mistakes learners make;
lesson 07's solutions pass them.

The wrong versions below are written the way a learner would write them, independently of the
checker's own list of mistakes, so a test passes only if the diagnosis reaches code it has not seen.
"""

import math

import pytest
import torch
from torch import nn

from solutions import lesson_07
from tests.checking import rejection, stub
from utils import exercises as ex
from utils.lora import LoRALinear, lora_params


@pytest.mark.parametrize("checker, name", [
    (ex.check_lora_linear, "MyLoRALinear"), (ex.check_merge_lora, "my_merge_lora"),
    (ex.check_lora_params, "my_lora_params"),
])
def test_the_lesson_07_solutions_pass(checker, name):
    assert name in lesson_07.__all__
    assert checker(getattr(lesson_07, name)) is None


def test_the_utils_versions_pass():
    assert ex.check_lora_linear(LoRALinear) is None
    assert ex.check_lora_params(lora_params) is None


def test_stubs_are_not_attempted():
    for checker in (ex.check_lora_linear, ex.check_merge_lora, ex.check_lora_params):
        assert ex.run_check(checker, stub) == "⏳ not attempted yet"


# ---- LoRALinear, as learners get it wrong -------------------------------------------------------------------

def learner_lora(scale="alpha/r", b_init="zeros", a_init="kaiming", freeze=True, base_term=True, a_shape="r,in"):
    class MyLoRALinear(nn.Module):
        def __init__(self, base, rank, alpha):
            super().__init__()
            self.base = base
            if freeze:
                for p in self.base.parameters():
                    p.requires_grad = False
            out_f, in_f = base.weight.shape
            self.lora_A = nn.Parameter(torch.zeros(rank, in_f) if a_shape == "r,in" else torch.zeros(in_f, rank))
            if a_init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(out_f, rank) if b_init == "zeros" else torch.randn(out_f, rank))
            self.scale = {"alpha/r": alpha / rank, "alpha": alpha, "1": 1.0}[scale]

        def forward(self, x):
            update = self.scale * (x @ self.lora_A.T @ self.lora_B.T)
            return self.base(x) + update if base_term else update
    return MyLoRALinear


def test_a_learner_lora_holding_the_base_layer_passes():
    assert ex.check_lora_linear(learner_lora()) is None


@pytest.mark.parametrize("kw, expected", [
    (dict(scale="alpha"), "scaled by alpha, not alpha / rank"),
    (dict(scale="1"), "the update is not scaled: multiply B(A x) by alpha / rank"),
    (dict(b_init="randn"), "lora_B does not start at zero"),
    (dict(a_init="zeros"), "lora_A starts at zero too"),
    (dict(freeze=False), "base.weight still has requires_grad=True: freeze the base layer"),
    (dict(base_term=False), "the frozen W x is missing"),
    (dict(a_shape="in,r"), "lora_A has shape (12, 2), expected (2, 12): it is stored as (out, in)"),
])
def test_lora_linear_mistakes_are_named(kw, expected):
    assert expected in rejection(ex.check_lora_linear, learner_lora(**kw))


# ---- merging and counting -------------------------------------------------------------------------------

def test_merge_mistakes_are_named():
    unscaled = lambda weight, lora_A, lora_B, alpha: weight + lora_B @ lora_A
    by_alpha = lambda weight, lora_A, lora_B, alpha: weight + alpha * torch.matmul(lora_B, lora_A)
    swapped = lambda weight, lora_A, lora_B, alpha: weight + alpha / lora_A.shape[0] * (lora_A.T @ lora_B.T).T
    assert "not scaled" in rejection(ex.check_merge_lora, unscaled)
    assert "scaled by alpha, not alpha / rank" in rejection(ex.check_merge_lora, by_alpha)
    assert ex.check_merge_lora(swapped) is None  # (A^T B^T)^T = B A: a correct merge written differently
    shapes = rejection(ex.check_merge_lora, lambda weight, lora_A, lora_B, alpha: weight + lora_A.T @ lora_B.T)
    assert "lora_A (2, 12)" in shapes or "raised" in shapes or "shape" in shapes


def count(config, rank, targets, kv_as_q=False, per_layer=False, full=False):
    c = config
    total = 0
    for t in targets:
        if t in ("wq", "wo"):
            i, o = c.dim, c.dim
        elif t in ("wk", "wv"):
            i, o = c.dim, (c.n_heads if kv_as_q else c.n_kv_heads) * (c.dim // c.n_heads)
        else:
            i, o = (c.hidden_dim, c.dim) if t == "w2" else (c.dim, c.hidden_dim)
        total += i * o if full else rank * (i + o)
    return total if per_layer else total * c.n_layers


@pytest.mark.parametrize("kw, expected", [
    (dict(kv_as_q=True), "wk and wv as (dim, dim): with grouped-query attention"),
    (dict(per_layer=True), "one layer only"),
    (dict(full=True), "counts in * out per matrix"),
])
def test_lora_count_mistakes_are_named(kw, expected):
    assert ex.check_lora_params(lambda config, rank, targets: count(config, rank, targets)) is None
    assert expected in rejection(ex.check_lora_params, lambda config, rank, targets: count(config, rank, targets, **kw))
