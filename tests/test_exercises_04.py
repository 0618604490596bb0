"""Lesson 04's solutions pass the checkers its exercises use (tests/test_exercises.py tests the checkers)."""

import pytest

from solutions import lesson_04
from utils import exercises as ex


@pytest.mark.parametrize("checker, name", [
    (ex.check_swiglu_hidden_dim, "my_swiglu_hidden_dim"), (ex.check_feed_forward, "MyFeedForward"),
    (ex.check_rmsnorm, "MyRMSNorm"), (ex.check_block, "MyBlock"),
])
def test_the_lesson_04_solutions_pass(checker, name):
    assert name in lesson_04.__all__
    assert checker(getattr(lesson_04, name)) is None
