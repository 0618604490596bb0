"""The machinery every lesson's checkers share: run a candidate safely, compare, name the mistake.

`run_check(checker, candidate)` is what a notebook calls: it prints and returns "✅ passed", "⏳ not
attempted yet" or "❌ <what is wrong>" and never raises. A checker calls the candidate through `_call`
(a stub raises `NotAttempted`, naming the earlier exercise when the stub is another one the candidate
calls; a crash becomes one line naming the learner's line and the input), builds a module candidate with
the reference's weights through `_module`, and ends in `_compare`: the candidate agrees with the reference,
or the message of the first known mistake it matches (or of two at once), or where and how far it is off.
"""

import functools
import inspect
import itertools
import os
import traceback
from collections.abc import Callable

import torch
from torch import nn


class NotAttempted(AssertionError):
    """The candidate is still a stub: it raised NotImplementedError or returned None / `...`. `needs` names the
    stub of an earlier exercise that a finished candidate calls ('' when the candidate itself is the stub)."""

    def __init__(self, message: str, needs: str = ""):
        super().__init__(message)
        self.needs = needs


# The stubs of every lesson's exercise cells, with their number in that lesson: a candidate that calls one of
# them still unwritten is told which exercise to do first (tests/test_exercises_checking.py reads the notebooks).
EXERCISES = {
    "rope_cos_sin": 1, "apply_rotary_emb": 2, "permute_hf_to_meta": 3,              # 01
    "repeat_kv": 1, "causal_mask": 2, "Attention": 3,                               # 02
    "MyKVCache": 1, "my_causal_mask": 2, "MyAttention": 3,                          # 03
    "MyFeedForward": 1, "my_swiglu_hidden_dim": 2, "MyRMSNorm": 3, "MyBlock": 4,    # 04
    "MyLlama": 1, "my_count_params": 2, "my_kv_cache_bytes": 3,                     # 05
    "cross_entropy_loss": 1, "make_batch": 2, "lr_schedule": 3, "sample_next_token": 4,  # 06
}


def _needs(candidate: str, stub: str) -> NotAttempted:
    """NotAttempted for a candidate that calls (or builds) another exercise's stub."""
    todo = f"do exercise {EXERCISES[stub]} ({stub}) first" if stub in EXERCISES else f"write {stub} first"
    return NotAttempted(f"{candidate} calls {stub}, which is not attempted yet: {todo}", needs=stub)


def run_check(checker: Callable, candidate) -> str:
    """Run checker(candidate); print and return "✅ passed", "⏳ not attempted yet" or "❌ " + why. Never raises."""
    try:
        checker(candidate)
        result = "✅ passed"
    except NotAttempted as e:
        result = f"⏳ {e}" if e.needs else "⏳ not attempted yet"
    except AssertionError as e:
        result = f"❌ {e}"
    except Exception as e:  # a bug in a checker must not stop the notebook either
        result = f"❌ the checker itself failed ({type(e).__name__}: {e}); please report it"
    print(result)
    return result


# ---- shared helpers: call the candidate safely, compare and diagnose ------------------------------
_HERE = os.path.dirname(__file__) + os.sep  # this package: the checkers' own frames, left out of tracebacks
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _seeded(checker):
    """Run the checker seeded and without autograd, leaving the caller's random state as it was."""
    @functools.wraps(checker)
    def run(candidate) -> None:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            return checker(candidate)
    return run


def _name(fn) -> str:
    qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
    return qualname.split(".<locals>.")[-1]


def _owner(fn) -> str:
    """The class or function a candidate is: 'MyBlock' for the class, an instance or a bound method of it."""
    if inspect.ismethod(fn):
        fn = fn.__self__
    if not (inspect.isclass(fn) or inspect.isfunction(fn) or inspect.isbuiltin(fn)):
        fn = type(fn)
    return _name(fn).split(".")[0]


def _stub_raised(exc: BaseException) -> str | None:
    """The function or class whose `raise NotImplementedError` line raised exc (None if exc came from elsewhere,
    e.g. torch's Module without a forward): 'repeat_kv', or 'MyFeedForward' for one of its methods."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if not isinstance(exc, NotImplementedError) or tb is None:
        return None
    frame = traceback.extract_tb(tb)[-1]
    if frame.filename.startswith((_HERE, _TORCH_DIR)) or "NotImplementedError" not in (frame.line or
                                                                                       "NotImplementedError"):
        return None
    this = tb.tb_frame.f_locals.get("self")
    return type(this).__name__ if this is not None else tb.tb_frame.f_code.co_name


def _describe(inputs: dict) -> str:
    """'x (2, 5, 4, 8), n_rep=3': tensors by shape, numbers by value, anything else by type."""
    def one(k, v):
        if torch.is_tensor(v):
            return f"{k} {tuple(v.shape)}"
        return f"{k}={v!r}" if v is None or isinstance(v, (int, float, str)) else f"{k}={type(v).__name__}"
    return ", ".join(one(k, v) for k, v in inputs.items())


def _where(exc: BaseException) -> str:
    """' at line 12: `q = ...`', the deepest frame of the learner's code in the traceback ('' if none)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith((_HERE, _TORCH_DIR))]
    if not frames:
        return ""
    f = frames[-1]
    return f" at line {f.lineno}: `{f.line}`" if f.line else f" at line {f.lineno}"


def _call(fn, inputs: dict, hint: str = ""):
    """fn(*inputs.values()); a stub raises NotAttempted, a crash or a changed input an AssertionError."""
    saved = {k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}
    try:
        out = fn(*inputs.values())
    except Exception as e:
        stub = _stub_raised(e)
        if stub is not None and stub != _owner(fn):
            raise _needs(_owner(fn), stub) from None
        if stub is not None:
            raise NotAttempted(f"{_name(fn)} is not attempted yet: it raises NotImplementedError") from None
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise AssertionError(f"{_name(fn)} raised {type(e).__name__}: {msg}{_where(e)} "
                             f"(input: {_describe(inputs)}). {hint}".rstrip(". ")) from None
    if out is None or out is Ellipsis:
        raise NotAttempted(f"{_name(fn)} returned {out!r}: not attempted yet (or is a `return` missing?)")
    for k, v in saved.items():
        if not torch.equal(v, inputs[k]):
            raise AssertionError(f"{_name(fn)} changed its input {k} in place: compute a new tensor instead "
                                 f"(y = x * c, not x *= c or x[...] = ...)")
    return out


def _close(got, expected, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """Same type and shape and allclose; tuples element by element, bool tensors exactly, numbers by ==."""
    if isinstance(expected, tuple):
        return (isinstance(got, (tuple, list)) and len(got) == len(expected)
                and all(_close(g, e, atol, rtol) for g, e in zip(got, expected)))
    if torch.is_tensor(expected):
        if not torch.is_tensor(got) or got.shape != expected.shape or got.is_complex():
            return False
        if expected.dtype == torch.bool:
            return got.dtype == torch.bool and torch.equal(got, expected)
        return torch.allclose(got.double(), expected.double(), rtol=rtol, atol=atol)
    return not torch.is_tensor(got) and got == expected


def _difference(got, expected, labels=None) -> str:
    """Say how got differs from expected: type, shape (with a hint), NaN, or the largest error."""
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            names = f" ({', '.join(labels)})" if labels else ""
            return f"expected a tuple of {len(expected)}{names}, got {type(got).__name__}"
        i = next(i for i, (g, e) in enumerate(zip(got, expected)) if not _close(g, e))
        return f"{labels[i] if labels else f'element {i}'}: {_difference(got[i], expected[i])}"
    if not torch.is_tensor(expected):
        numbers = all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in (got, expected))
        ratio = f" ({got / expected:.3g} times the answer)" if numbers and expected and got else ""
        return f"expected {expected!r}, got {got!r}{ratio}"
    if not torch.is_tensor(got):
        return f"expected a tensor, got {type(got).__name__}"
    g, e = tuple(got.shape), tuple(expected.shape)
    if g != e:
        hint = (": same sizes in another order, did you forget to transpose back?" if sorted(g) == sorted(e) else
                ": same number of elements, is a reshape or a squeeze wrong?" if got.numel() == expected.numel()
                else "")
        return f"expected shape {e}, got {g}{hint}"
    if got.is_complex():
        return "returned complex numbers: turn them back into real pairs (torch.view_as_real(...).flatten(-2))"
    if not torch.isfinite(got.double()).all():
        return "the output contains NaN or inf"
    wrong = (got != expected).nonzero()
    if not expected.is_floating_point() and len(wrong):  # ids: where they differ, not by how much
        at = tuple(wrong[0].tolist())
        return (f"{len(wrong)} of {expected.numel()} entries differ, the first at {list(at)}: expected "
                f"{expected[at].item()}, got {got[at].item()}")
    return f"differs from the reference by up to {(got.double() - expected.double()).abs().max().item():.3g}"


def _matches(got, wrong, close) -> bool:
    try:
        return close(got, wrong())
    except (RuntimeError, IndexError, KeyError, TypeError, ValueError):  # a mistake that cannot happen here
        return False


def _pairs(mistakes: dict) -> dict:
    """Two listed mistakes at once, for those written as knobs of one function (partial(f, knob=...)) that
    touch different knobs: {'first message; and a second mistake: what the second is': both knobs}."""
    knobbed = [(m, w) for m, w in mistakes.items() if isinstance(w, functools.partial) and w.keywords]
    both = {}
    for (m1, w1), (m2, w2) in itertools.combinations(knobbed, 2):
        same_call = w1.func is w2.func and len(w1.args) == len(w2.args) and all(
            a is b for a, b in zip(w1.args, w2.args))
        if same_call and not w1.keywords.keys() & w2.keywords.keys():
            both[f"{m1}; and a second mistake: {m2.split(': ')[0]}"] = functools.partial(
                w1.func, *w1.args, **w1.keywords, **w2.keywords)
    return both


def _compare(got, expected, inputs: str, mistakes: dict | None = None, hint: str = "", also=None,
             close=_close, labels=None) -> None:
    """Return if got matches expected (and `also`, an independent reference); else raise AssertionError
    naming the first known mistake {message: what it would return} that got matches, or two of them."""
    if close(got, expected) and (also is None or close(got, also)):
        return
    mistakes = mistakes or {}
    for message, wrong in itertools.chain(mistakes.items(), _pairs(mistakes).items()):
        if _matches(got, wrong, close):
            raise AssertionError(f"{message} (input: {inputs})")
    raise AssertionError(f"{_difference(got, expected, labels)} (input: {inputs}). {hint}".rstrip(". "))


def _weights_problem(mine: nn.Module, ref: nn.Module) -> str | None:
    """Why the reference's weights cannot be loaded into the candidate by name, or None if they can."""
    want = {k: tuple(p.shape) for k, p in ref.named_parameters()}
    have = {k: tuple(p.shape) for k, p in mine.named_parameters()}
    fmt = lambda keys, shapes: ", ".join(f"{k} {shapes[k]}" for k in keys)
    missing, extra = [k for k in want if k not in have], [k for k in have if k not in want]
    if any(k.endswith(".bias") for k in extra):
        return (f"has biases ({fmt(extra, have)}): LLaMA's linear layers have none, "
                "use nn.Linear(in_features, out_features, bias=False)")
    for k in missing:
        try:
            if torch.is_tensor(functools.reduce(getattr, k.split("."), mine)):
                return f"has {k} as a plain tensor: wrap it in nn.Parameter(...) so that it is learned and saved"
        except AttributeError:
            pass
    for k in (k for k in want if k in have and have[k] != want[k]):
        flip = ": nn.Linear(in_features, out_features) stores its weight as (out, in)" * (have[k] == want[k][::-1])
        return f"has {k} of shape {have[k]}, expected {want[k]}{flip}"
    if extra:
        return (f"has parameters not named like Meta's, so weights cannot load by name: missing "
                f"{fmt(missing, want) or 'nothing'}; unexpected {fmt(extra, have)}; expected {fmt(want, want)}")
    return f"is missing {fmt(missing, want)}: create it in __init__" if missing else None


def _check_parts_attempted(mine: nn.Module, ref: nn.Module) -> None:
    """Raise NotAttempted naming a sub-module of mine that is still another exercise's stub (no weights where the
    reference has some, a forward that raises NotImplementedError), e.g. MyBlock's MyFeedForward."""
    want = [k for k, _ in ref.named_parameters()]
    for name, part in mine.named_modules():
        if name and not any(True for _ in part.parameters()) and any(k.startswith(name + ".") for k in want):
            forward = type(part).forward
            code = getattr(forward, "__code__", None)
            if forward is not nn.Module.forward and code is not None and "NotImplementedError" in code.co_names:
                raise _needs(_owner(mine), type(part).__name__)


def _module(cls, args: dict, ref: nn.Module, probe: dict) -> nn.Module:
    """Build cls(*args) and load the reference's weights into it by name; say which names it expects."""
    mine = _call(cls, args)
    if not isinstance(mine, nn.Module):
        raise AssertionError(f"{_name(cls)} must subclass nn.Module: class {_name(cls)}(nn.Module)")
    if not any(True for _ in mine.parameters()):
        _call(mine, probe)  # an untouched stub stops here with NotAttempted
    _check_parts_attempted(mine, ref)
    problem = _weights_problem(mine, ref)
    if problem:
        raise AssertionError(f"{_name(cls)} {problem}")
    mine.load_state_dict(ref.state_dict(), strict=False)
    return mine.eval()
