"""The exercise checkers: each accepts the utils version and names the mistakes learners really make.

The wrong versions below are written the way a learner would write them, independently of the
checker's own list of mistakes, so a test passes only if the diagnosis reaches code it has not seen.
"""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.checking import rejection
from utils import exercises as ex
from utils.attention import Attention, KVCache, causal_mask, repeat_kv
from utils.feedforward import FeedForward, swiglu_hidden_dim
from utils.generate import sample_next
from utils.model import TransformerBlock, get_config
from utils.norm import RMSNorm
from utils.rope import apply_rotary_emb, permute_hf_to_meta, permute_meta_to_hf, rope_cos_sin, rope_frequencies

REFERENCES = {
    ex.check_rope: apply_rotary_emb, ex.check_rope_frequencies: rope_frequencies, ex.check_rope_cos_sin: rope_cos_sin,
    ex.check_permute_hf_to_meta: permute_hf_to_meta, ex.check_repeat_kv: repeat_kv,
    ex.check_causal_mask: causal_mask, ex.check_attention: Attention, ex.check_kv_cache: KVCache,
    ex.check_swiglu_hidden_dim: swiglu_hidden_dim, ex.check_feed_forward: FeedForward, ex.check_rmsnorm: RMSNorm,
    ex.check_block: TransformerBlock, ex.check_sample_next: sample_next,
}


# ---- RoPE, as learners get it wrong ----------------------------------------------------------------

def rope_pairs(x, cos, sin, sign=1.0, halves=False, write_halves=False, unsqueeze=True):
    """A learner's real-arithmetic RoPE; the flags are the mistakes."""
    x0, x1 = x.chunk(2, dim=-1) if halves else (x[..., 0::2], x[..., 1::2])
    c, s = (cos[None, :, None, :], sin[None, :, None, :]) if unsqueeze else (cos, sin)
    out0, out1 = x0 * c - sign * x1 * s, sign * x0 * s + x1 * c
    return torch.cat((out0, out1), -1) if halves or write_halves else torch.stack((out0, out1), -1).flatten(-2)


def cos_sin_from_position_one(head_dim, max_seq_len, theta=10000.0):
    angles = torch.outer(torch.arange(1, max_seq_len + 1).float(), rope_frequencies(head_dim, theta).float())
    return angles.cos(), angles.sin()


def frequencies_step_one(head_dim, theta=10000.0):
    return 1.0 / theta ** (torch.arange(head_dim // 2) / head_dim)


def frequencies_fixed_theta(head_dim, theta=10000.0):
    return 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2) / head_dim)


# ---- attention, as learners get it wrong -----------------------------------------------------------

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


class HFNamedAttention(learner_attention()):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__(dim, n_heads, n_kv_heads)
        self.q_proj = self.wq
        del self.wq


# ---- KV cache, as learners get it wrong ------------------------------------------------------------

def learner_cache(mistake=None):
    class MyCache:
        def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim):
            self.k = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)
            self.v = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)

        def update(self, start_pos, xk, xv):
            T = xk.shape[2]
            at = 0 if mistake == "write at 0" else start_pos
            self.k[:, :, at:at + T], self.v[:, :, at:at + T] = xk, xv
            if mistake == "only new":
                return xk, xv
            if mistake == "whole buffer":
                return self.k, self.v
            return self.k[:, :, :start_pos + T], self.v[:, :, :start_pos + T]
    return MyCache


class AppendingCache:
    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim):
        self.k = self.v = None

    def update(self, start_pos, xk, xv):
        self.k = xk if self.k is None else torch.cat([self.k, xk], dim=2)
        self.v = xv if self.v is None else torch.cat([self.v, xv], dim=2)
        return self.k, self.v


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

def learner_block(mistake=None):
    class MyBlock(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.attention = Attention(config.dim, config.n_heads, config.n_kv_heads)
            self.feed_forward = FeedForward(config.dim, config.hidden_dim)
            self.attention_norm = RMSNorm(config.dim, config.norm_eps)
            if mistake != "one norm defined":
                self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

        def forward(self, x, cos, sin, start_pos=0):
            if mistake == "post-norm":
                h = self.attention_norm(x + self.attention(x, cos, sin, start_pos))
                return self.ffn_norm(h + self.feed_forward(h))
            ffn_norm = self.attention_norm if mistake == "shared norm" else self.ffn_norm
            h = self.attention(self.attention_norm(x), cos, sin, start_pos)
            h = h if mistake == "no residual" else x + h
            return h + self.feed_forward(ffn_norm(h))
    return MyBlock


# ---- sampling, as learners get it wrong ------------------------------------------------------------

def learner_sampler(mistake=None):
    """A learner's sampler; its top-p samples in sorted order and maps back, as Meta's sample_top_p does."""
    def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
        if temperature == 0 and mistake != "no greedy":
            return logits.argmax(dim=-1)
        if mistake == "in place":
            logits /= temperature
        elif mistake != "temperature after softmax":
            logits = logits / temperature
        if top_k is not None and mistake != "top_k ignored":
            kth = torch.topk(logits, top_k).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        if mistake == "temperature after softmax":
            probs = probs / temperature
        gen = None if mistake == "no generator" else generator
        if top_p is not None:
            sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
            cum = sorted_p.cumsum(-1)
            sorted_p[(cum > top_p) if mistake == "drop crossing" else (cum - sorted_p > top_p)] = 0.0
            choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
            return idx.gather(-1, choice).squeeze(-1)
        tokens = torch.multinomial(probs, 1, generator=gen)
        return tokens if mistake == "no squeeze" else tokens.squeeze(-1)
    return sample


# ---- the table: every wrong version and the words its message must contain ------------------------

MISTAKES = [
    # RoPE
    (ex.check_rope, partial(rope_pairs, halves=True), "rotate-half"),
    (ex.check_rope, partial(rope_pairs, sign=-1.0), "rotates the wrong way"),
    (ex.check_rope, lambda x, cos, sin: rope_pairs(x, sin, cos), "cos and sin swapped"),
    (ex.check_rope, partial(rope_pairs, write_halves=True), "written back as two halves"),
    (ex.check_rope, partial(rope_pairs, unsqueeze=False), "broadcast against the heads"),
    (ex.check_rope, lambda x, cos, sin: x.clone(), "no rotation applied"),
    (ex.check_rope_cos_sin, cos_sin_from_position_one, "off by one: positions start at 0"),
    (ex.check_rope_cos_sin, lambda hd, S, theta=10000.0: rope_cos_sin(hd, S, theta)[::-1], "returned (sin, cos)"),
    (ex.check_rope_frequencies, frequencies_step_one, "step i by 2"),
    (ex.check_rope_frequencies, frequencies_fixed_theta, "theta ignored"),
    (ex.check_rope_frequencies, lambda hd, theta=1e4: theta ** (torch.arange(0, hd, 2) / hd), "grow with i"),
    (ex.check_permute_hf_to_meta, permute_meta_to_hf, "the other direction"),
    (ex.check_permute_hf_to_meta, lambda w, n_heads: permute_hf_to_meta(w, 1), "as one head"),
    # grouped-query attention
    (ex.check_repeat_kv, lambda x, n_rep: x.repeat(1, n_rep, 1, 1), "tiled instead of grouped"),
    (ex.check_repeat_kv, lambda x, n_rep: torch.repeat_interleave(x, n_rep, dim=2), "along the sequence"),
    (ex.check_causal_mask, lambda q, kv: torch.ones(q, kv, dtype=torch.bool).tril(), "aligned top-left"),
    (ex.check_causal_mask, lambda q, kv: torch.ones(q, kv, dtype=torch.bool).triu(kv - q + 1),
     "True marks the blocked"),
    (ex.check_causal_mask, lambda q, kv: torch.full((q, kv), float("-inf")).triu(kv - q + 1), "additive mask"),
    (ex.check_attention, learner_attention("no mask"), "no causal mask"),
    (ex.check_attention, learner_attention("no scale"), "scores not scaled"),
    (ex.check_attention, learner_attention("rope on v"), "RoPE applied to v"),
    (ex.check_attention, learner_attention("no rope on k"), "RoPE not applied to k"),
    (ex.check_attention, learner_attention("tiled"), "tiled instead of grouped"),
    (ex.check_attention, learner_attention("softmax over queries"), "softmax over the queries"),
    (ex.check_attention, learner_attention(bias=True), "has biases"),
    (ex.check_attention, HFNamedAttention, "missing wq.weight"),
    # KV cache
    (ex.check_kv_cache, learner_cache("only new"), "returned only the new keys"),
    (ex.check_kv_cache, learner_cache("whole buffer"), "whole buffer"),
    (ex.check_kv_cache, learner_cache("write at 0"), "at position 0 instead of at start_pos"),
    (ex.check_kv_cache, AppendingCache, "appended (torch.cat)"),
    # SwiGLU
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
    (ex.check_rmsnorm, PlainTensorNorm, "weight as a plain tensor: wrap it in nn.Parameter"),
    (ex.check_rmsnorm, NotAModuleNorm, "must subclass nn.Module"),
    # the block
    (ex.check_block, learner_block("post-norm"), "post-norm"),
    (ex.check_block, learner_block("no residual"), "missing residual around attention"),
    (ex.check_block, learner_block("shared norm"), "one shared norm"),
    (ex.check_block, learner_block("one norm defined"), "missing ffn_norm.weight"),
    # sampling
    (ex.check_sample_next, learner_sampler("top_k ignored"), "top_k ignored"),
    (ex.check_sample_next, learner_sampler("drop crossing"), "dropped the token that crosses the threshold"),
    (ex.check_sample_next, learner_sampler("temperature after softmax"), "temperature has no effect"),
    (ex.check_sample_next, learner_sampler("no greedy"), "temperature 0 means greedy"),
    (ex.check_sample_next, learner_sampler("no squeeze"), "squeeze"),
    (ex.check_sample_next, learner_sampler("no generator"), "pass generator=generator"),
    (ex.check_sample_next, learner_sampler("in place"), "changed its input logits in place"),
]


@pytest.mark.parametrize("checker", REFERENCES, ids=lambda c: c.__name__)
def test_every_checker_accepts_the_utils_reference(checker):
    assert checker(REFERENCES[checker]) is None


@pytest.mark.parametrize("checker, candidate, words", MISTAKES, ids=[f"{c.__name__}: {w}" for c, _, w in MISTAKES])
def test_checker_names_the_mistake(checker, candidate, words):
    message = rejection(checker, candidate)
    assert words in message, message


@pytest.mark.parametrize("checker, candidate", [
    (ex.check_rope, rope_pairs), (ex.check_attention, learner_attention()), (ex.check_kv_cache, learner_cache()),
    (ex.check_feed_forward, learner_ffn()), (ex.check_rmsnorm, learner_rmsnorm()), (ex.check_block, learner_block()),
    (ex.check_sample_next, learner_sampler()), (ex.check_repeat_kv, lambda x, n_rep: x.repeat_interleave(n_rep, 1)),
    (ex.check_rmsnorm, lambda dim, eps: nn.RMSNorm(dim, eps)),
])
def test_a_correct_implementation_written_differently_passes(checker, candidate):
    assert checker(candidate) is None


def stub_raising(x, cos, sin):
    raise NotImplementedError  # your code here


def stub_returning_none(x, cos, sin):
    pass


def stub_returning_ellipsis(x, cos, sin):
    return ...


class StubNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        ...  # your code here

    def forward(self, x):
        ...  # your code here


class StubCache:
    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim):
        pass

    def update(self, start_pos, xk, xv):
        raise NotImplementedError("write xk, xv at start_pos and return all keys and values so far")


class StubForwardAttention(learner_attention()):
    def forward(self, x, cos, sin, start_pos=0):
        raise NotImplementedError


@pytest.mark.parametrize("checker, stub", [
    (ex.check_rope, stub_raising), (ex.check_rope, stub_returning_none), (ex.check_rope, stub_returning_ellipsis),
    (ex.check_rmsnorm, StubNorm), (ex.check_kv_cache, StubCache), (ex.check_attention, StubForwardAttention),
])
def test_a_stub_is_reported_as_not_attempted(checker, stub):
    with pytest.raises(ex.NotAttempted, match="not attempted yet"):
        checker(stub)
    assert ex.run_check(checker, stub) == "⏳ not attempted yet"


def test_a_crash_inside_the_candidate_names_the_exception_the_line_and_the_input():
    def rope_that_crashes(x, cos, sin):
        return x * cos  # (B, T, H, hd) * (T, hd/2) cannot broadcast

    message = rejection(ex.check_rope, rope_that_crashes)
    assert message.startswith("rope_that_crashes raised RuntimeError: The size of tensor a"), message
    assert "`return x * cos" in message and "x (2, 4, 4, 8), cos (4, 4), sin (4, 4)" in message
    assert "Traceback" not in message


def test_a_wrong_shape_is_reported_with_the_expected_shape_and_a_hint():
    message = rejection(ex.check_repeat_kv, lambda x, n_rep: x.repeat_interleave(n_rep, 1).transpose(1, 2))
    assert "expected shape (2, 6, 3, 4), got (2, 3, 6, 4): same sizes in another order, did you forget to " \
           "transpose back?" in message
    message = rejection(ex.check_rope, lambda x, cos, sin: rope_pairs(x, cos, sin).unflatten(-1, (-1, 2)))
    assert "expected shape (2, 4, 4, 8), got (2, 4, 4, 4, 2)" in message


def test_an_unknown_mistake_gets_the_largest_error_the_input_and_a_hint():
    message = rejection(ex.check_rope, lambda x, cos, sin: apply_rotary_emb(x, cos, sin) * 1.01)
    assert message.startswith("differs from the reference by up to") and "x (2, 4, 4, 8)" in message
    assert ex.ROPE_HINT in message


def test_run_check_never_raises_and_reports_each_outcome(capsys):
    assert ex.run_check(ex.check_rope, apply_rotary_emb) == "✅ passed"
    result = ex.run_check(ex.check_repeat_kv, lambda x, n_rep: x.repeat(1, n_rep, 1, 1))
    assert result.startswith("❌ looks like K/V heads tiled")
    assert ex.run_check(ex.check_rope, 42).startswith("❌ int raised TypeError")  # not even a function
    assert ex.run_check(lambda c: 1 / 0, None).startswith("❌ the checker itself failed (ZeroDivisionError")
    assert capsys.readouterr().out.splitlines()[0] == "✅ passed"


def test_checkers_leave_the_callers_random_state_alone():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    ex.check_attention(Attention)
    assert torch.equal(torch.rand(3), expected)


# ---- every mistake a checker lists is reachable, and named by its own message ----------------------
# A candidate that makes exactly one listed mistake (computed with the checker's own variant functions)
# must get exactly that message: no listed mistake is dead code or shadowed by one listed before it.

def _rope_like(builder):
    return lambda message: lambda *args: builder(*args)[message]()


def _module_like(base, builder):
    def make(message):
        class OneMistake(base):
            def forward(self, *args):
                return builder(self, *args)[message]()
        return OneMistake
    return make


def _cache_like(message):
    class OneMistake:
        def __init__(self, *args):
            self.ref, self.history = KVCache(*args), []

        def update(self, start_pos, xk, xv):
            self.history.append((start_pos, xk, xv))
            expected = tuple(t.clone() for t in self.ref.update(start_pos, xk, xv))
            return tuple(t.clone() for t in ex._cache_mistakes(self.history, self.ref, expected)[message]())
    return OneMistake


def _swiglu_like(message):
    knobs = ex._swiglu_mistakes([(64, 32, None)])[message].keywords
    return lambda dim, multiple_of, mult: ex._swiglu_rule(dim, multiple_of, mult, **knobs)


def _sampler_like(message):
    def sample(logits, temperature, top_k, top_p, generator):
        if temperature == 0:
            return logits.argmax(-1)
        probs = ex._sampling_mistakes(logits, temperature, top_k, top_p)[message]()
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return sample


x4, cs4 = torch.randn(2, 4, 4, 8), rope_cos_sin(8, 4)
OWN_MISTAKES = [  # checker, the messages it lists, a candidate that makes the one mistake a message names
    (ex.check_rope, ex._rope_mistakes(x4, *cs4), _rope_like(ex._rope_mistakes)),
    (ex.check_rope_frequencies, ex._frequency_mistakes(8, 1e4), _rope_like(ex._frequency_mistakes)),
    (ex.check_rope_cos_sin, ex._cos_sin_mistakes(8, 4, 1e4, *cs4),
     lambda m: lambda hd, S, theta: ex._cos_sin_mistakes(hd, S, theta, *rope_cos_sin(hd, S, theta))[m]()),
    (ex.check_permute_hf_to_meta, ex._permute_mistakes(torch.randn(8, 2), 1), _rope_like(ex._permute_mistakes)),
    (ex.check_repeat_kv, ex._repeat_kv_mistakes(x4, 2), _rope_like(ex._repeat_kv_mistakes)),
    (ex.check_causal_mask, ex._mask_mistakes(2, 3), _rope_like(ex._mask_mistakes)),
    (ex.check_attention, ex._attention_mistakes(Attention(8, 2, 1), torch.randn(1, 2, 8), *rope_cos_sin(4, 2)),
     _module_like(Attention, lambda m, x, cos, sin, start_pos=0: ex._attention_mistakes(m, x, cos, sin))),
    (ex.check_kv_cache, ex._cache_mistakes([(0, x4, x4)], KVCache(2, 4, 8, 8), (x4, x4)), _cache_like),
    (ex.check_swiglu_hidden_dim, ex._swiglu_mistakes([(64, 32, None)]), _swiglu_like),
    (ex.check_feed_forward, ex._feed_forward_mistakes(FeedForward(4, 8), torch.randn(4)),
     _module_like(FeedForward, ex._feed_forward_mistakes)),
    (ex.check_rmsnorm, ex._rmsnorm_mistakes(torch.randn(4), torch.ones(4), 1e-5),
     _module_like(RMSNorm, lambda m, x: ex._rmsnorm_mistakes(x, m.weight, m.eps))),
    (ex.check_block, ex._block_mistakes(TransformerBlock(get_config("smoke")), None, None, None),
     _module_like(TransformerBlock, lambda m, x, cos, sin, start_pos=0: ex._block_mistakes(m, x, cos, sin))),
    (ex.check_sample_next, ex._sampling_mistakes(torch.randn(1, 4), 1.0, 2, 0.5), _sampler_like),
]
OWN = [(checker, message, make) for checker, mistakes, make in OWN_MISTAKES for message in mistakes]


@pytest.mark.parametrize("checker, message, make", OWN, ids=[f"{c.__name__}: {m[:50]}" for c, m, _ in OWN])
def test_every_listed_mistake_is_detected_and_named_by_its_own_message(checker, message, make):
    got = rejection(checker, make(message))
    assert got.startswith(message + " (input:"), got
