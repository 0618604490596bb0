"""Lesson 01's exercise checkers (RoPE): each accepts the utils version and names the mistakes learners make.

The wrong versions below are written the way a learner would write them, independently of the
checker's own list of mistakes, so a test passes only if the diagnosis reaches code it has not seen.
"""

from functools import partial

import pytest
import torch

from tests.checking import function_like, rejection, rope_pairs
from utils import exercises as ex
from utils.rope import apply_rotary_emb, permute_hf_to_meta, permute_meta_to_hf, rope_cos_sin, rope_frequencies

# ---- RoPE, as learners get it wrong ----------------------------------------------------------------

def cos_sin_from_position_one(head_dim, max_seq_len, theta=10000.0):
    angles = torch.outer(torch.arange(1, max_seq_len + 1).float(), rope_frequencies(head_dim, theta).float())
    return angles.cos(), angles.sin()


def cos_sin_of(frequencies):
    """A learner's tables with the frequencies computed inline by `frequencies(head_dim, theta)`."""
    def rope_cos_sin(head_dim, max_seq_len, theta=10000.0):
        angles = torch.outer(torch.arange(max_seq_len).float(), frequencies(head_dim, theta).float())
        return angles.cos(), angles.sin()
    return rope_cos_sin


def frequencies_step_one(head_dim, theta=10000.0):
    return 1.0 / theta ** (torch.arange(head_dim // 2) / head_dim)


def frequencies_fixed_theta(head_dim, theta=10000.0):
    return 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2) / head_dim)


REFERENCES = {
    ex.check_rope: apply_rotary_emb, ex.check_rope_frequencies: rope_frequencies, ex.check_rope_cos_sin: rope_cos_sin,
    ex.check_permute_hf_to_meta: permute_hf_to_meta,
}

MISTAKES = [  # every wrong version and the words its message must contain
    (ex.check_rope, partial(rope_pairs, halves=True), "rotate-half"),
    (ex.check_rope, partial(rope_pairs, sign=-1.0), "rotates the wrong way"),
    (ex.check_rope, lambda x, cos, sin: rope_pairs(x, sin, cos), "cos and sin swapped"),
    (ex.check_rope, partial(rope_pairs, write_halves=True), "written back as two halves"),
    (ex.check_rope, partial(rope_pairs, unsqueeze=False), "broadcast against the heads"),
    (ex.check_rope, lambda x, cos, sin: x.clone(), "no rotation applied"),
    (ex.check_rope_cos_sin, cos_sin_from_position_one, "off by one: positions start at 0"),
    (ex.check_rope_cos_sin, lambda hd, S, theta=10000.0: rope_cos_sin(hd, S, theta)[::-1], "returned (sin, cos)"),
    (ex.check_rope_cos_sin, lambda hd, S, theta=10000.0: tuple(t.T for t in rope_cos_sin(hd, S, theta)),
     "tables are (head_dim/2, max_seq_len)"),
    (ex.check_rope_cos_sin, cos_sin_of(frequencies_fixed_theta), "the frequency ladder is wrong (theta ignored"),
    (ex.check_rope_cos_sin, cos_sin_of(lambda hd, theta: rope_frequencies(hd, theta).repeat(2)),
     "Hugging Face's (max_seq_len, head_dim) tables"),
    (ex.check_rope_cos_sin, cos_sin_of(lambda hd, theta: theta ** (torch.arange(0, hd, 2) / hd)),
     "the frequency ladder is wrong (frequencies grow with i)"),
    (ex.check_rope_frequencies, frequencies_step_one, "step i by 2"),
    (ex.check_rope_frequencies, frequencies_fixed_theta, "theta ignored"),
    (ex.check_rope_frequencies, lambda hd, theta=1e4: theta ** (torch.arange(0, hd, 2) / hd), "grow with i"),
    (ex.check_permute_hf_to_meta, permute_meta_to_hf, "the other direction"),
    (ex.check_permute_hf_to_meta, lambda w, n_heads: permute_hf_to_meta(w, 1), "as one head"),
    (ex.check_permute_hf_to_meta, lambda w, n: w.view(n, 2, -1, w.shape[1]).reshape(w.shape), "without the transpose"),
]


@pytest.mark.parametrize("checker", REFERENCES, ids=lambda c: c.__name__)
def test_every_checker_accepts_the_utils_reference(checker):
    assert checker(REFERENCES[checker]) is None


@pytest.mark.parametrize("checker, candidate, words", MISTAKES, ids=[f"{c.__name__}: {w}" for c, _, w in MISTAKES])
def test_checker_names_the_mistake(checker, candidate, words):
    message = rejection(checker, candidate)
    assert words in message, message


def test_tables_with_a_frequency_exponent_stepped_by_one_name_the_frequencies():
    assert rejection(ex.check_rope_cos_sin, cos_sin_of(frequencies_step_one)) == (
        "the frequency ladder is wrong (exponent -i/head_dim): step i by 2, torch.arange(0, head_dim, 2) / head_dim; "
        "or call rope_frequencies(head_dim, theta) (input: head_dim=8, max_seq_len=6, theta=10000.0)")


@pytest.mark.parametrize("checker, candidate", [
    (ex.check_rope, rope_pairs),
])
def test_a_correct_implementation_written_differently_passes(checker, candidate):
    assert checker(candidate) is None


# ---- every mistake a checker lists is reachable, and named by its own message ----------------------
# A candidate that makes exactly one listed mistake (computed with the checker's own variant functions)
# must get exactly that message: no listed mistake is dead code or shadowed by one listed before it.

x4, cs4 = torch.randn(2, 4, 4, 8), rope_cos_sin(8, 4)
OWN_MISTAKES = [  # checker, the messages it lists, a candidate that makes the one mistake a message names
    (ex.check_rope, ex._rope_mistakes(x4, *cs4), function_like(ex._rope_mistakes)),
    (ex.check_rope_frequencies, ex._frequency_mistakes(8, 1e4), function_like(ex._frequency_mistakes)),
    (ex.check_rope_cos_sin, ex._cos_sin_mistakes(8, 4, 1e4, *cs4),
     lambda m: lambda hd, S, theta: ex._cos_sin_mistakes(hd, S, theta, *rope_cos_sin(hd, S, theta))[m]()),
    (ex.check_permute_hf_to_meta, ex._permute_mistakes(torch.randn(8, 2), 1), function_like(ex._permute_mistakes)),
]
OWN = [(checker, message, make) for checker, mistakes, make in OWN_MISTAKES for message in mistakes]


@pytest.mark.parametrize("checker, message, make", OWN, ids=[f"{c.__name__}: {m[:50]}" for c, m, _ in OWN])
def test_every_listed_mistake_is_detected_and_named_by_its_own_message(checker, message, make):
    got = rejection(checker, make(message))
    assert got.startswith(message + " (input:"), got
