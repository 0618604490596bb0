"""Helpers shared by the exercise-checker tests."""

import pytest

from utils import exercises as ex


def rejection(checker, candidate) -> str:
    """The checker's message for a wrong candidate (which must not be reported as unattempted)."""
    with pytest.raises(AssertionError) as e:
        checker(candidate)
    assert not isinstance(e.value, ex.NotAttempted), str(e.value)
    return str(e.value)


def stub(*args, **kwargs):
    """What the notebook's exercise cells hold until the learner fills them in."""
    raise NotImplementedError
