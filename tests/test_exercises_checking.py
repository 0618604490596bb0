"""The checkers' shared machinery (utils/exercises/checking.py), seen through a few lessons' checkers: a stub
is not attempted, a crash names the learner's line, a wrong shape gets a hint, run_check never raises, the
caller's random state is left alone."""

import ast
import json
import re

import pytest
import torch
from torch import nn

from tests.checking import learner_attention, rejection, rope_pairs
from utils import exercises as ex
from utils.attention import Attention
from utils.course import ROOT
from utils.exercises.checking import EXERCISES
from utils.rope import apply_rotary_emb


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


def test_the_table_of_exercise_stubs_matches_every_notebooks_exercise_cells_in_order():
    found = {}
    for path in sorted((ROOT / "notebooks").glob("0[1-6]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        stubs = [node.name for c in cells if "exercise" in c["metadata"].get("tags", [])
                 for node in ast.parse("".join(c["source"])).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        headings = [int(n) for c in cells if c["cell_type"] == "markdown"
                    for n in re.findall(r"^(?:#+ |\*\*)Exercise (\d+)", "".join(c["source"]), re.M)]
        assert headings == list(range(1, len(stubs) + 1)), (path.name, headings, stubs)
        found |= {name: i + 1 for i, name in enumerate(stubs)}
    assert found == EXERCISES


def test_a_stub_of_the_candidate_itself_is_not_attempted_without_naming_another_exercise():
    class MyKVCache(StubCache):
        pass
    with pytest.raises(ex.NotAttempted) as e:
        ex.check_kv_cache(MyKVCache)
    assert e.value.needs == "" and ex.run_check(ex.check_kv_cache, MyKVCache) == "⏳ not attempted yet"


def test_a_module_without_a_forward_is_a_mistake_not_a_stub():
    class NoForward(nn.Module):
        def __init__(self, dim, eps=1e-5):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def foward(self, x):  # misspelt: nn.Module's own forward raises NotImplementedError
            return x
    message = rejection(ex.check_rmsnorm, NoForward)
    assert message.startswith('NoForward raised NotImplementedError: Module [NoForward] is missing the required '
                              '"forward" function'), message
