"""Lesson 03's checkers, the KV cache and the attention forward that uses it, and lesson 03's solutions.

As in the other lessons' checker tests, the wrong versions are written the way a learner would write them, not
from the checker's list of mistakes, so a test passes only if the diagnosis reaches code it has not seen.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from solutions import lesson_03
from tests import checking
from utils import exercises as ex
from utils.attention import Attention, KVCache, causal_mask, repeat_kv
from utils.rope import apply_rotary_emb, rope_cos_sin


def learner_cached_attention(mistake=None):
    """A learner's attention forward with a cache, an explicit softmax; `mistake` picks one bug."""
    class MyAttention(nn.Module):
        def __init__(self, dim, n_heads, n_kv_heads):
            super().__init__()
            self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
            self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
            self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
            self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
            self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
            self.cache = None
            self.my_k = self.my_v = None

        def forward(self, x, cos, sin, start_pos=0):
            B, T, _ = x.shape
            if mistake == "cos sliced again":  # they are already the rows of start_pos .. start_pos + T - 1
                cos, sin = cos[start_pos:start_pos + T], sin[start_pos:start_pos + T]
            q = apply_rotary_emb(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
            k = apply_rotary_emb(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
            v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            n_rep = self.n_heads // self.n_kv_heads
            if mistake == "repeat before caching":
                k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            if self.cache is not None and mistake == "own cache":
                if start_pos == 0:
                    self.my_k, self.my_v = k, v
                else:
                    self.my_k, self.my_v = torch.cat([self.my_k, k], 2), torch.cat([self.my_v, v], 2)
                k, v = self.my_k, self.my_v
            elif self.cache is not None and mistake == "result not used":
                self.cache.update(start_pos, k, v)
            elif self.cache is not None and mistake == "written at 0":
                k, v = self.cache.update(0, k, v)
            elif self.cache is not None and mistake != "cache ignored":
                k, v = self.cache.update(start_pos, k, v)
            if mistake != "repeat before caching":
                k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            S = k.shape[2]
            scores = q @ k.transpose(-2, -1)
            if mistake != "no scale":
                scores = scores / math.sqrt(self.head_dim)
            if mistake == "top-left":
                allowed = torch.ones(T, S, dtype=torch.bool).tril()
            elif mistake == "mask only without a cache" and self.cache is not None:
                allowed = torch.ones(T, S, dtype=torch.bool)
            else:
                allowed = causal_mask(T, S)
            y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
            return self.wo(y.transpose(1, 2).reshape(B, T, -1))
    return MyAttention


class SdpaIsCausalAttention(Attention):
    """The common shortcut: SDPA with is_causal=True for any chunk of more than one token."""

    def forward(self, x, cos, sin, start_pos=0):
        B, T, _ = x.shape
        q = apply_rotary_emb(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rotary_emb(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class StubForward(learner_cached_attention()):
    def forward(self, x, cos, sin, start_pos=0):
        raise NotImplementedError("your code here")


def rejection(candidate) -> str:
    return checking.rejection(ex.check_cached_attention, candidate)


def test_the_utils_attention_and_a_learners_correct_version_pass():
    assert ex.check_cached_attention(Attention) is None
    assert ex.check_cached_attention(learner_cached_attention()) is None


@pytest.mark.parametrize("mistake, words", [
    ("cache ignored", "attended only over the new tokens"),
    ("result not used", "attended only over the new tokens"),
    ("written at 0", "attended only over the new tokens"),
    ("top-left", "masked top-left (is_causal=True)"),
    ("mask only without a cache", "no causal mask with the cache"),
    ("own cache", "self.cache does not hold the keys"),
    ("no scale", "without a cache (self.cache is None): scores not scaled"),
    ("cos sliced again", "cos and sin sliced again at start_pos: they are already the rows of positions start_pos"),
])
def test_the_checker_names_the_mistake(mistake, words):
    message = rejection(learner_cached_attention(mistake))
    assert words in message, message


def test_is_causal_for_every_chunk_is_caught_at_the_chunk_after_cached_tokens():
    message = rejection(SdpaIsCausalAttention)
    assert message.startswith("masked top-left (is_causal=True)"), message
    assert "start_pos=5, the cache holding positions 0 .. 4" in message


def test_keys_repeated_before_caching_name_the_line_and_the_order():
    message = rejection(learner_cached_attention("repeat before caching"))
    assert "raised RuntimeError" in message and "self.cache.update" in message, message
    assert "before repeat_kv: the cache holds n_kv_heads heads" in message


def test_a_stub_is_not_attempted_and_run_check_never_raises(capsys):
    with pytest.raises(ex.NotAttempted):
        ex.check_cached_attention(StubForward)
    assert ex.run_check(ex.check_cached_attention, StubForward) == "⏳ not attempted yet"
    assert ex.run_check(ex.check_cached_attention, learner_cached_attention("top-left")).startswith("❌ masked")
    assert capsys.readouterr().out.count("\n") == 2


def _one_listed_mistake(message):
    """A candidate whose cached outputs are exactly what the checker's own variant `message` computes."""
    class OneMistake(Attention):
        def forward(self, x, cos, sin, start_pos=0):
            if self.cache is None:
                return super().forward(x, cos, sin, start_pos)
            self.seen = x if start_pos == 0 else torch.cat([self.seen, x], 1)
            S = sum(ex.CACHED_CHUNKS[-1])
            full = torch.cat([self.seen, self.seen.new_zeros(x.shape[0], S - self.seen.shape[1], x.shape[2])], 1)
            i = [start for start, _ in ex.CACHED_CHUNKS].index(start_pos)
            return ex._cached_attention_mistakes(self, full, *rope_cos_sin(self.head_dim, S))[message][i]
    return OneMistake


LISTED = list(ex._cached_attention_mistakes(Attention(8, 2, 1), torch.randn(1, 8, 8), *rope_cos_sin(4, 8)))


@pytest.mark.parametrize("message", LISTED, ids=[m[:40] for m in LISTED])
def test_every_listed_mistake_is_detected_and_named_by_its_own_message(message):
    got = rejection(_one_listed_mistake(message))
    assert got.startswith(message + " (input:"), got


@pytest.mark.parametrize("checker, name", [
    (ex.check_kv_cache, "MyKVCache"), (ex.check_causal_mask, "my_causal_mask"),
    (ex.check_cached_attention, "MyAttention"), (ex.check_attention, "MyAttention"),
])
def test_the_lesson_03_solutions_pass(checker, name):
    assert name in lesson_03.__all__
    assert checker(getattr(lesson_03, name)) is None


# ---- KV cache, as learners get it wrong ------------------------------------------------------------

def learner_cache(mistake=None):
    class MyCache:
        def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim):
            self.k = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)
            self.v = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)

            self.pos = 0

        def update(self, start_pos, xk, xv):
            B, _, T, _ = xk.shape
            at = {"write at 0": 0, "own counter": 0 if start_pos == 0 else self.pos}.get(mistake, start_pos)
            self.pos = at + T if mistake == "own counter" else start_pos + T
            rows = slice(None) if mistake == "every row" else slice(B)  # [:B], as Meta's cache_k[:bsz]
            self.k[rows, :, at:at + T], self.v[rows, :, at:at + T] = xk, xv
            if mistake == "read every row":
                rows = slice(None)
            if mistake == "only new":
                return xk, xv
            if mistake == "whole buffer":
                return self.k, self.v
            return self.k[rows, :, :self.pos], self.v[rows, :, :self.pos]
    return MyCache


class AppendingCache:
    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim):
        self.k = self.v = None

    def update(self, start_pos, xk, xv):
        self.k = xk if self.k is None else torch.cat([self.k, xk], dim=2)
        self.v = xv if self.v is None else torch.cat([self.v, xv], dim=2)
        return self.k, self.v


def _cache_like(message):
    class OneMistake:
        def __init__(self, *args):
            self.ref, self.history = KVCache(*args), []

        def update(self, start_pos, xk, xv):
            self.history.append((start_pos, xk, xv))
            expected = tuple(t.clone() for t in self.ref.update(start_pos, xk, xv))
            return tuple(t.clone() for t in ex._cache_mistakes(self.history, self.ref, expected)[message]())
    return OneMistake


REFERENCES_CACHE = {
    ex.check_kv_cache: KVCache,
}

MISTAKES_CACHE = [  # every wrong version and the words its message must contain
    (ex.check_kv_cache, learner_cache("only new"), "returned only the new keys"),
    (ex.check_kv_cache, learner_cache("whole buffer"), "whole buffer"),
    (ex.check_kv_cache, learner_cache("write at 0"), "at position 0 instead of at start_pos"),
    (ex.check_kv_cache, AppendingCache, "appended (torch.cat)"),
    (ex.check_kv_cache, learner_cache("every row"), "wrote a batch of 1 into every row of the cache"),
    (ex.check_kv_cache, learner_cache("read every row"), "returned every row of the cache for a smaller batch"),
]


def test_a_cache_with_its_own_position_counter_is_caught_when_the_caller_goes_back():
    message = checking.rejection(ex.check_kv_cache, learner_cache("own counter"))
    assert message == ("kept its own position counter instead of using start_pos: the caller may go back (to "
                       "start_pos 2 after 4 tokens here, as when a reply is regenerated); write at start_pos and "
                       "return :start_pos + T (input: start_pos=2, xk (2, 2, 1, 4), xv (2, 2, 1, 4), after writes "
                       "at start_pos [0, 3, 4, 0, 2])"), message


@pytest.mark.parametrize("checker", REFERENCES_CACHE, ids=lambda c: c.__name__)
def test_the_kv_cache_checker_accepts_the_utils_kv_cache(checker):
    assert checker(REFERENCES_CACHE[checker]) is None


@pytest.mark.parametrize("checker, candidate, words", MISTAKES_CACHE,
                         ids=[f"{c.__name__}: {w}" for c, _, w in MISTAKES_CACHE])
def test_the_kv_cache_checker_names_the_mistake(checker, candidate, words):
    message = checking.rejection(checker, candidate)
    assert words in message, message


@pytest.mark.parametrize("checker, candidate", [
    (ex.check_kv_cache, learner_cache()),
])
def test_a_correct_kv_cache_written_differently_passes(checker, candidate):
    assert checker(candidate) is None


# ---- every mistake a checker lists is reachable, and named by its own message ----------------------
# A candidate that makes exactly one listed mistake (computed with the checker's own variant functions)
# must get exactly that message: no listed mistake is dead code or shadowed by one listed before it.

x4 = torch.randn(2, 4, 4, 8)
OWN_MISTAKES_CACHE = [  # checker, the messages it lists, a candidate that makes the one mistake a message names
    (ex.check_kv_cache, ex._cache_mistakes([(0, x4, x4)], KVCache(2, 4, 8, 8), (x4, x4)), _cache_like),
]
OWN_CACHE = [(checker, message, make) for checker, mistakes, make in OWN_MISTAKES_CACHE for message in mistakes]


@pytest.mark.parametrize("checker, message, make", OWN_CACHE, ids=[f"{c.__name__}: {m[:50]}" for c, m, _ in OWN_CACHE])
def test_every_listed_kv_cache_mistake_is_detected_and_named_by_its_own_message(checker, message, make):
    got = checking.rejection(checker, make(message))
    assert got.startswith(message + " (input:"), got
