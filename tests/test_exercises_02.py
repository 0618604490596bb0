"""Lesson 02's exercise checkers (grouped-query attention): each accepts the utils version and names the
mistakes learners make.

The wrong versions below are written the way a learner would write them, independently of the
checker's own list of mistakes, so a test passes only if the diagnosis reaches code it has not seen.
"""

import pytest
import torch

from tests.checking import function_like, learner_attention, module_like, rejection
from utils import exercises as ex
from utils.attention import Attention, causal_mask, repeat_kv
from utils.rope import apply_rotary_emb, rope_cos_sin

# ---- attention, as learners get it wrong (learner_attention is in tests/checking.py) ---------------

class HFNamedAttention(learner_attention()):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__(dim, n_heads, n_kv_heads)
        self.q_proj = self.wq
        del self.wq


REFERENCES = {
    ex.check_repeat_kv: repeat_kv, ex.check_causal_mask: causal_mask, ex.check_attention: Attention,
}

MISTAKES = [  # every wrong version and the words its message must contain
    (ex.check_repeat_kv, lambda x, n_rep: x.repeat(1, n_rep, 1, 1), "tiled instead of grouped"),
    (ex.check_repeat_kv, lambda x, n_rep: torch.repeat_interleave(x, n_rep, dim=2), "along the sequence"),
    (ex.check_repeat_kv, lambda x, n_rep: x[:, :, None].expand(-1, -1, n_rep, -1, -1), "is a reshape or a squeeze"),
    (ex.check_repeat_kv, lambda x, n_rep: x[:, None].expand(-1, n_rep, -1, -1, -1).flatten(1, 2),
     "tiled instead of grouped"),
    (ex.check_causal_mask, lambda q, kv: torch.ones(q, kv, dtype=torch.bool).tril(), "aligned top-left"),
    (ex.check_causal_mask, lambda q, kv: torch.ones(q, kv, dtype=torch.bool).triu(kv - q + 1),
     "True marks the blocked"),
    (ex.check_causal_mask, lambda q, kv: torch.full((q, kv), float("-inf")).triu(kv - q + 1), "additive mask"),
    (ex.check_causal_mask, lambda q, kv: torch.arange(kv)[None] < torch.arange(kv - q, kv)[:, None],
     "the diagonal is masked"),
    (ex.check_attention, learner_attention("no mask"), "no causal mask"),
    (ex.check_attention, learner_attention("no scale"), "scores not scaled"),
    (ex.check_attention, learner_attention("rope on v"), "RoPE applied to v"),
    (ex.check_attention, learner_attention("no rope on k"), "RoPE not applied to k"),
    (ex.check_attention, learner_attention("tiled"), "tiled instead of grouped"),
    (ex.check_attention, learner_attention("softmax over queries"), "softmax over the queries"),
    (ex.check_attention, learner_attention(bias=True), "has biases"),
    (ex.check_attention, HFNamedAttention, "missing wq.weight"),
]


@pytest.mark.parametrize("checker", REFERENCES, ids=lambda c: c.__name__)
def test_every_checker_accepts_the_utils_reference(checker):
    assert checker(REFERENCES[checker]) is None


@pytest.mark.parametrize("checker, candidate, words", MISTAKES, ids=[f"{c.__name__}: {w}" for c, _, w in MISTAKES])
def test_checker_names_the_mistake(checker, candidate, words):
    message = rejection(checker, candidate)
    assert words in message, message


@pytest.mark.parametrize("checker, candidate", [
    (ex.check_attention, learner_attention()), (ex.check_repeat_kv, lambda x, n_rep: x.repeat_interleave(n_rep, 1)),
])
def test_a_correct_implementation_written_differently_passes(checker, candidate):
    assert checker(candidate) is None


# ---- a right attention on an unwritten exercise 1 or 2 ----------------------------------------------

def notebook_stubs() -> dict:
    """Exercises 1 and 2 as the notebook hands them out (named as there, so defined in here)."""
    def repeat_kv(x, n_rep):
        raise NotImplementedError  # your code here

    def causal_mask(q_len, kv_len, device=None):
        raise NotImplementedError  # your code here
    return {"repeat": repeat_kv, "mask": causal_mask}


def attention_calling(repeat=repeat_kv, mask=causal_mask):
    """A learner's right Attention that calls the notebook's repeat_kv and causal_mask, whatever they are."""
    class Attention(learner_attention()):
        def forward(self, x, cos, sin, start_pos=0):
            B, T, _ = x.shape
            q, k, v = (w(x).view(B, T, -1, self.head_dim) for w in (self.wq, self.wk, self.wv))
            q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            n_rep = self.n_heads // self.n_kv_heads
            k, v = repeat(k, n_rep), repeat(v, n_rep)
            scores = (q @ k.transpose(-2, -1) / self.head_dim ** 0.5).masked_fill(~mask(T, T), float("-inf"))
            return self.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))
    return Attention


@pytest.mark.parametrize("stub, exercise", [("repeat", "exercise 1 (repeat_kv)"), ("mask", "exercise 2 (causal_mask)")])
def test_a_right_attention_on_an_unwritten_stub_says_which_exercise_comes_first(stub, exercise):
    assert ex.check_attention(attention_calling()) is None
    result = ex.run_check(ex.check_attention, attention_calling(**{stub: notebook_stubs()[stub]}))
    name = exercise.split("(")[1][:-1]
    assert result == f"⏳ Attention calls {name}, which is not attempted yet: do {exercise} first", result


# ---- every mistake a checker lists is reachable, and named by its own message ----------------------
# A candidate that makes exactly one listed mistake (computed with the checker's own variant functions)
# must get exactly that message: no listed mistake is dead code or shadowed by one listed before it.

x4 = torch.randn(2, 4, 4, 8)
OWN_MISTAKES = [  # checker, the messages it lists, a candidate that makes the one mistake a message names
    (ex.check_repeat_kv, ex._repeat_kv_mistakes(x4, 2), function_like(ex._repeat_kv_mistakes)),
    (ex.check_causal_mask, ex._mask_mistakes(2, 3), function_like(ex._mask_mistakes)),
    (ex.check_attention, ex._attention_mistakes(Attention(8, 2, 1), torch.randn(1, 2, 8), *rope_cos_sin(4, 2)),
     module_like(Attention, lambda m, x, cos, sin, start_pos=0: ex._attention_mistakes(m, x, cos, sin))),
]
OWN = [(checker, message, make) for checker, mistakes, make in OWN_MISTAKES for message in mistakes]


@pytest.mark.parametrize("checker, message, make", OWN, ids=[f"{c.__name__}: {m[:50]}" for c, m, _ in OWN])
def test_every_listed_mistake_is_detected_and_named_by_its_own_message(checker, message, make):
    got = rejection(checker, make(message))
    assert got.startswith(message + " (input:"), got
