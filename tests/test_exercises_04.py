"""Lesson 04's exercise checkers (SwiGLU, RMSNorm, the block): each accepts the utils version and names the
mistakes learners make; lesson 04's solutions pass them.

The wrong versions below are written the way a learner would write them, independently of the
checker's own list of mistakes, so a test passes only if the diagnosis reaches code it has not seen.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from solutions import lesson_04
from tests.checking import module_like, rejection
from utils import exercises as ex
from utils.attention import Attention
from utils.feedforward import FeedForward, swiglu_hidden_dim
from utils.model import TransformerBlock, get_config
from utils.norm import RMSNorm


@pytest.mark.parametrize("checker, name", [
    (ex.check_swiglu_hidden_dim, "my_swiglu_hidden_dim"), (ex.check_feed_forward, "MyFeedForward"),
    (ex.check_rmsnorm, "MyRMSNorm"), (ex.check_block, "MyBlock"),
])
def test_the_lesson_04_solutions_pass(checker, name):
    assert name in lesson_04.__all__
    assert checker(getattr(lesson_04, name)) is None


# ---- SwiGLU, as learners get it wrong --------------------------------------------------------------

def hidden_not_rounded(dim, multiple_of=256, ffn_dim_multiplier=None):
    hidden = int(2 * 4 * dim / 3)
    return int(ffn_dim_multiplier * hidden) if ffn_dim_multiplier else hidden


def hidden_rounded_down(dim, multiple_of=256, ffn_dim_multiplier=None):
    return multiple_of * (hidden_not_rounded(dim, multiple_of, ffn_dim_multiplier) // multiple_of)


def hidden_rounded_to_nearest(dim, multiple_of=256, ffn_dim_multiplier=None):
    return multiple_of * round(hidden_not_rounded(dim, multiple_of, ffn_dim_multiplier) / multiple_of)


def hidden_ignores_multiplier(dim, multiple_of=256, ffn_dim_multiplier=None):
    return multiple_of * math.ceil(int(2 * 4 * dim / 3) / multiple_of)


def hidden_multiplier_after_rounding(dim, multiple_of=256, ffn_dim_multiplier=None):
    hidden = multiple_of * math.ceil(int(2 * 4 * dim / 3) / multiple_of)
    return int(ffn_dim_multiplier * hidden) if ffn_dim_multiplier else hidden


def hidden_without_two_thirds(dim, multiple_of=256, ffn_dim_multiplier=None):
    hidden = 4 * dim
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def hidden_multiplier_always(dim, multiple_of=256, ffn_dim_multiplier=None):
    hidden = int(ffn_dim_multiplier * int(2 * 4 * dim / 3))  # TypeError when ffn_dim_multiplier is None
    return multiple_of * math.ceil(hidden / multiple_of)


def hidden_as_float(dim, multiple_of=256, ffn_dim_multiplier=None):
    hidden = 2 * 4 * dim / 3 * (ffn_dim_multiplier or 1)
    return -(-hidden // multiple_of) * multiple_of  # float floor division: 11008.0


def learner_ffn(activation=F.silu, swap=False, use_w3=True, define_w3=True):
    class MyFeedForward(nn.Module):
        def __init__(self, dim, hidden_dim):
            super().__init__()
            self.w1 = nn.Linear(dim, hidden_dim, bias=False)
            self.w2 = nn.Linear(hidden_dim, dim, bias=False)
            if define_w3:
                self.w3 = nn.Linear(dim, hidden_dim, bias=False)

        def forward(self, x):
            if swap:
                return self.w2(activation(self.w3(x)) * self.w1(x))
            return self.w2(activation(self.w1(x)) * (self.w3(x) if use_w3 else 1))
    return MyFeedForward


# ---- RMSNorm, as learners get it wrong -------------------------------------------------------------

def learner_rmsnorm(mistake=None):
    class MyRMSNorm(nn.Module):
        def __init__(self, dim, eps=1e-5):
            super().__init__()
            self.eps = eps
            if mistake != "no weight parameter":
                self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            if mistake == "constant eps":
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight
            if mistake == "no keepdim":
                return x * torch.rsqrt(x.pow(2).mean(-1) + self.eps) * self.weight
            if mistake == "layernorm":
                x = x - x.mean(-1, keepdim=True)
            if mistake == "eps outside":
                return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps) * self.weight
            if mistake == "norm":
                return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + self.eps) * self.weight
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return y if mistake in ("no weight", "no weight parameter") else y * self.weight
    return MyRMSNorm


class PlainTensorNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, torch.ones(dim)  # not an nn.Parameter: never learned, never saved

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class NotAModuleNorm:
    def __init__(self, dim, eps=1e-5):
        self.weight, self.eps = torch.ones(dim), eps


class TransposedFeedForward(learner_ffn()):
    def __init__(self, dim, hidden_dim):
        super().__init__(dim, hidden_dim)
        self.w1 = nn.Linear(hidden_dim, dim, bias=False)  # in and out swapped


# ---- the block, as learners get it wrong -----------------------------------------------------------

def learner_block(mistake=None, feed_forward=FeedForward):
    class MyBlock(nn.Module):
        def __init__(self, config):
            super().__init__()
            eps = () if mistake == "default eps" else (config.norm_eps,)
            self.attention = Attention(config.dim, config.n_heads, config.n_kv_heads)
            self.feed_forward = feed_forward(config.dim, config.hidden_dim)
            self.attention_norm = RMSNorm(config.dim, *eps)
            if mistake != "one norm defined":
                self.ffn_norm = RMSNorm(config.dim, *eps)

        def forward(self, x, cos, sin, start_pos=0):
            if mistake == "post-norm":
                h = self.attention_norm(x + self.attention(x, cos, sin, start_pos))
                return self.ffn_norm(h + self.feed_forward(h))
            if mistake == "start_pos dropped":
                start_pos = 0  # as if the attention were called as self.attention(h, cos, sin)
            ffn_norm = self.attention_norm if mistake == "shared norm" else self.ffn_norm
            h = self.attention(self.attention_norm(x), cos, sin, start_pos)
            h = h if mistake == "no residual" else x + h
            return h + self.feed_forward(ffn_norm(h))
    return MyBlock


def _swiglu_like(message):
    knobs = ex._swiglu_mistakes([(64, 32, None)])[message].keywords
    return lambda dim, multiple_of, mult: ex._swiglu_rule(dim, multiple_of, mult, **knobs)


REFERENCES = {
    ex.check_swiglu_hidden_dim: swiglu_hidden_dim, ex.check_feed_forward: FeedForward, ex.check_rmsnorm: RMSNorm,
    ex.check_block: TransformerBlock,
}

MISTAKES = [  # every wrong version and the words its message must contain
    (ex.check_swiglu_hidden_dim, hidden_not_rounded, "not rounded"),
    (ex.check_swiglu_hidden_dim, hidden_rounded_down, "rounded down"),
    (ex.check_swiglu_hidden_dim, hidden_rounded_to_nearest, "nearest multiple"),
    (ex.check_swiglu_hidden_dim, hidden_ignores_multiplier, "ffn_dim_multiplier ignored"),
    (ex.check_swiglu_hidden_dim, hidden_multiplier_after_rounding, "applied after rounding"),
    (ex.check_swiglu_hidden_dim, hidden_without_two_thirds, "without the 2/3"),
    (ex.check_swiglu_hidden_dim, hidden_multiplier_always, "ffn_dim_multiplier may be None"),
    (ex.check_swiglu_hidden_dim, hidden_as_float, "return an int"),
    (ex.check_feed_forward, learner_ffn(activation=F.gelu), "GELU instead of SiLU"),
    (ex.check_feed_forward, learner_ffn(activation=F.relu), "ReLU instead of SiLU"),
    (ex.check_feed_forward, learner_ffn(swap=True), "gate and value swapped"),
    (ex.check_feed_forward, learner_ffn(use_w3=False), "w3 not used"),
    (ex.check_feed_forward, learner_ffn(use_w3=False, define_w3=False), "missing w3.weight"),
    (ex.check_feed_forward, TransposedFeedForward, "stores its weight as (out, in)"),
    # RMSNorm
    (ex.check_rmsnorm, learner_rmsnorm("layernorm"), "LayerNorm, not RMSNorm"),
    (ex.check_rmsnorm, learner_rmsnorm("eps outside"), "eps added outside the square root"),
    (ex.check_rmsnorm, learner_rmsnorm("no weight"), "weight not applied"),
    (ex.check_rmsnorm, learner_rmsnorm("no weight parameter"), "missing weight"),
    (ex.check_rmsnorm, learner_rmsnorm("norm"), "L2 norm, not the RMS"),
    (ex.check_rmsnorm, learner_rmsnorm("constant eps"), "the eps argument ignored"),
    (ex.check_rmsnorm, learner_rmsnorm("no keepdim"), "mean(-1, keepdim=True) keeps the mean broadcastable"),
    (ex.check_rmsnorm, PlainTensorNorm, "weight as a plain tensor: wrap it in nn.Parameter"),
    (ex.check_rmsnorm, NotAModuleNorm, "must subclass nn.Module"),
    # the block
    (ex.check_block, learner_block("post-norm"), "post-norm"),
    (ex.check_block, learner_block("no residual"), "missing residual around attention"),
    (ex.check_block, learner_block("shared norm"), "one shared norm"),
    (ex.check_block, learner_block("one norm defined"), "missing ffn_norm.weight"),
    (ex.check_block, learner_block("default eps"), "the norms ignore config.norm_eps"),
]


def test_a_block_that_drops_start_pos_is_caught_at_the_decode_step_after_the_prompt():
    message = rejection(ex.check_block, learner_block("start_pos dropped"))
    assert message == ("start_pos not passed on: with a KV cache the attention must write the new keys at "
                       "start_pos, self.attention(self.attention_norm(x), cos, sin, start_pos) (input: x (2, 1, 32), "
                       "cos (1, 4), sin (1, 4), start_pos=3, a KV cache holding positions 0 .. 2)"), message


def stub_feed_forward(weights_written=False):
    """Exercise 1 as the notebook hands it out, or with its weights written and its forward still a stub."""
    class MyFeedForward(learner_ffn() if weights_written else nn.Module):
        def __init__(self, dim, hidden_dim):
            if weights_written:
                super().__init__(dim, hidden_dim)
            else:
                super().__init__()
                ...  # your code here: self.w1, self.w2, self.w3

        def forward(self, x):
            raise NotImplementedError  # your code here
    return MyFeedForward


@pytest.mark.parametrize("weights_written", [False, True])
def test_a_right_block_on_an_unwritten_feed_forward_says_which_exercise_comes_first(weights_written):
    result = ex.run_check(ex.check_block, learner_block(feed_forward=stub_feed_forward(weights_written)))
    assert result == "⏳ MyBlock calls MyFeedForward, which is not attempted yet: do exercise 1 (MyFeedForward) first"


@pytest.mark.parametrize("checker", REFERENCES, ids=lambda c: c.__name__)
def test_every_checker_accepts_the_utils_reference(checker):
    assert checker(REFERENCES[checker]) is None


@pytest.mark.parametrize("checker, candidate, words", MISTAKES, ids=[f"{c.__name__}: {w}" for c, _, w in MISTAKES])
def test_checker_names_the_mistake(checker, candidate, words):
    message = rejection(checker, candidate)
    assert words in message, message


@pytest.mark.parametrize("checker, candidate", [
    (ex.check_feed_forward, learner_ffn()), (ex.check_rmsnorm, learner_rmsnorm()), (ex.check_block, learner_block()),
    (ex.check_rmsnorm, lambda dim, eps: nn.RMSNorm(dim, eps)),
])
def test_a_correct_implementation_written_differently_passes(checker, candidate):
    assert checker(candidate) is None


# ---- every mistake a checker lists is reachable, and named by its own message ----------------------
# A candidate that makes exactly one listed mistake (computed with the checker's own variant functions)
# must get exactly that message: no listed mistake is dead code or shadowed by one listed before it.

OWN_MISTAKES = [  # checker, the messages it lists, a candidate that makes the one mistake a message names
    (ex.check_swiglu_hidden_dim, ex._swiglu_mistakes([(64, 32, None)]), _swiglu_like),
    (ex.check_feed_forward, ex._feed_forward_mistakes(FeedForward(4, 8), torch.randn(4)),
     module_like(FeedForward, ex._feed_forward_mistakes)),
    (ex.check_rmsnorm, ex._rmsnorm_mistakes(torch.randn(4), torch.ones(4), 1e-5),
     module_like(RMSNorm, lambda m, x: ex._rmsnorm_mistakes(x, m.weight, m.eps))),
    (ex.check_block, ex._block_mistakes(TransformerBlock(get_config("smoke")), None, None, None),
     module_like(TransformerBlock, lambda m, x, cos, sin, start_pos=0: ex._block_mistakes(m, x, cos, sin))),
]
OWN = [(checker, message, make) for checker, mistakes, make in OWN_MISTAKES for message in mistakes]


@pytest.mark.parametrize("checker, message, make", OWN, ids=[f"{c.__name__}: {m[:50]}" for c, m, _ in OWN])
def test_every_listed_mistake_is_detected_and_named_by_its_own_message(checker, message, make):
    got = rejection(checker, make(message))
    assert got.startswith(message + " (input:"), got
