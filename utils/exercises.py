"""Exercise checkers: run a learner's version of a lesson's key function and name the likely mistake.

Each `check_*` takes a candidate (a function, or a class with the same signature and parameter names
as the `utils` version), runs it on small seeded inputs of several shapes against the `utils`
reference (and an independent one where there is one), and returns None when it agrees. Otherwise it
raises AssertionError saying what is wrong: it computes what the usual wrong versions (rotate-half
RoPE, tiled K/V heads, LayerNorm instead of RMSNorm, ...) would have returned and names the one the
candidate matches. A stub (raises NotImplementedError, returns None or `...`) raises `NotAttempted`.

Notebooks call `run_check(check_rope, my_rope)`: it prints and returns "✅ passed", "⏳ not attempted
yet" or "❌ <what is wrong>" and never raises, so an exercise never stops a notebook.
"""

import functools
import math
import os
import traceback
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache, causal_mask, repeat_kv
from .data import windows_at
from .feedforward import FeedForward, swiglu_hidden_dim
from .model import LlamaConfig, TransformerBlock
from .norm import RMSNorm
from .rope import (
    apply_rotary_emb,
    apply_rotary_emb_complex,
    apply_rotary_emb_hf,
    permute_hf_to_meta,
    permute_meta_to_hf,
    rope_cos_sin,
    rope_frequencies,
)


class NotAttempted(AssertionError):
    """The candidate is still a stub: it raised NotImplementedError or returned None / `...`."""


def run_check(checker: Callable, candidate) -> str:
    """Run checker(candidate); print and return "✅ passed", "⏳ not attempted yet" or "❌ " + why. Never raises."""
    try:
        checker(candidate)
        result = "✅ passed"
    except NotAttempted:
        result = "⏳ not attempted yet"
    except AssertionError as e:
        result = f"❌ {e}"
    except Exception as e:  # a bug in a checker must not stop the notebook either
        result = f"❌ the checker itself failed ({type(e).__name__}: {e}); please report it"
    print(result)
    return result


# ---- shared helpers: call the candidate safely, compare and diagnose ------------------------------

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
              if f.filename != __file__ and not f.filename.startswith(_TORCH_DIR)]
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
        raised_at = traceback.extract_tb(e.__traceback__)[-1].line or "NotImplementedError"
        if isinstance(e, NotImplementedError) and "NotImplementedError" in raised_at:
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
        return f"expected {expected!r}, got {got!r}"
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
    return f"differs from the reference by up to {(got.double() - expected.double()).abs().max().item():.3g}"


def _matches(got, wrong, close) -> bool:
    try:
        return close(got, wrong())
    except (RuntimeError, IndexError, ValueError):  # a mistake that cannot happen at this shape
        return False


def _compare(got, expected, inputs: str, mistakes: dict | None = None, hint: str = "", also=None,
             close=_close, labels=None) -> None:
    """Return if got matches expected (and `also`, an independent reference); else raise AssertionError
    naming the first known mistake {message: what it would return} that got matches."""
    if close(got, expected) and (also is None or close(got, also)):
        return
    for message, wrong in (mistakes or {}).items():
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


def _module(cls, args: dict, ref: nn.Module, probe: dict) -> nn.Module:
    """Build cls(*args) and load the reference's weights into it by name; say which names it expects."""
    mine = _call(cls, args)
    if not isinstance(mine, nn.Module):
        raise AssertionError(f"{_name(cls)} must subclass nn.Module: class {_name(cls)}(nn.Module)")
    if not any(True for _ in mine.parameters()):
        _call(mine, probe)  # an untouched stub stops here with NotAttempted
    problem = _weights_problem(mine, ref)
    if problem:
        raise AssertionError(f"{_name(cls)} {problem}")
    mine.load_state_dict(ref.state_dict(), strict=False)
    return mine.eval()


# ---- lesson 1: RoPE --------------------------------------------------------------------------------

ROTATE_HALF = ("looks like the rotate-half (Hugging Face) layout: you paired dim i with dim i + head_dim/2; "
               "Meta pairs adjacent dims 2i and 2i+1 (x[..., 0::2], x[..., 1::2])")
ROPE_HINT = ("Rotate each adjacent pair: (x[2i], x[2i+1]) -> (x0 cos - x1 sin, x0 sin + x1 cos), "
             "with cos/sin broadcast as cos[None, :, None, :] (positions on dim 1 of x)")


def _rope(x, c, s, pairs="adjacent", write="interleaved"):
    """Textbook RoPE with knobs for the usual mistakes; c, s broadcast against (B, T, H, hd/2)."""
    a, b = (x[..., 0::2], x[..., 1::2]) if pairs == "adjacent" else x.chunk(2, dim=-1)
    ra, rb = a * c - b * s, a * s + b * c
    return torch.stack((ra, rb), dim=-1).flatten(-2) if write == "interleaved" else torch.cat((ra, rb), dim=-1)


def _rope_mistakes(x, cos, sin) -> dict:
    c, s = cos[None, :, None], sin[None, :, None]  # (1, T, 1, hd/2)
    return {
        ROTATE_HALF: lambda: _rope(x, c, s, "halves", "halves"),
        ROTATE_HALF + ", and the sin terms have the wrong sign": lambda: _rope(x, c, -s, "halves", "halves"),
        "rotates the wrong way (sign of the sin terms): (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)":
            lambda: _rope(x, c, -s),
        "cos and sin swapped": lambda: _rope(x, s, c),
        "right pairs, but the results are written back as two halves (torch.cat): interleave them, "
        "torch.stack((out0, out1), dim=-1).flatten(-2)": lambda: _rope(x, c, s, write="halves"),
        "cos/sin broadcast against the heads: (T, hd/2) lines up with (H, hd/2) of x (B, T, H, hd/2); "
        "use cos[None, :, None, :]": lambda: _rope(x, cos, sin),
        "returned x unchanged: no rotation applied": lambda: x,
    }


@_seeded
def check_rope(fn: Callable) -> None:
    """fn(x (B, T, H, hd), cos (T, hd/2), sin (T, hd/2)) -> (B, T, H, hd): Meta's RoPE on adjacent pairs."""
    for B, T, H, hd in [(2, 4, 4, 8), (1, 5, 2, 16), (3, 1, 3, 4)]:
        x = torch.randn(B, T, H, hd)
        cos, sin = (t[3:] for t in rope_cos_sin(hd, 3 + T))  # positions 3.. so that no row is the identity
        inputs = dict(x=x, cos=cos, sin=sin)
        got = _call(fn, inputs, ROPE_HINT)
        _compare(got, apply_rotary_emb(x, cos, sin), _describe(inputs), _rope_mistakes(x, cos, sin), ROPE_HINT,
                 also=apply_rotary_emb_complex(x, torch.complex(cos, sin)))


def _frequency_mistakes(hd: int, theta: float) -> dict:
    i = torch.arange(hd // 2, dtype=torch.float64)
    return {
        "exponent -i/head_dim: step i by 2, torch.arange(0, head_dim, 2) / head_dim": lambda: theta ** (-i / hd),
        "frequencies grow with i: it is 1 / theta ** (2i / head_dim), not theta ** (2i / head_dim)":
            lambda: theta ** (2 * i / hd),
        "off by one: i starts at 0, so the first pair has frequency 1": lambda: theta ** (-2 * (i + 1) / hd),
        "the last exponent is 1 (linspace): it is (head_dim - 2) / head_dim, torch.arange(0, head_dim, 2) / "
        "head_dim": lambda: theta ** -torch.linspace(0, 1, hd // 2, dtype=torch.float64),
        "theta ignored (always 10000): use the argument (Llama 3 uses 500000)": lambda: 10000.0 ** (-2 * i / hd),
    }


@_seeded
def check_rope_frequencies(fn: Callable) -> None:
    """fn(head_dim, theta) -> (head_dim // 2,): theta ** (-2i / head_dim) for i = 0 .. head_dim/2 - 1."""
    for hd, theta in [(8, 10000.0), (16, 500000.0), (6, 100.0)]:
        inputs = dict(head_dim=hd, theta=theta)
        _compare(_call(fn, inputs), rope_frequencies(hd, theta), _describe(inputs), _frequency_mistakes(hd, theta),
                 "freqs[i] = 1 / theta ** (2i / head_dim), one per pair of dims: head_dim // 2 values")


def _cos_sin_mistakes(hd: int, S: int, theta: float, cos, sin) -> dict:
    angles = torch.outer(torch.arange(1, S + 1, dtype=torch.float64), rope_frequencies(hd, theta))  # from 1
    return {
        "off by one: positions start at 0 (angle 0: cos 1, sin 0), torch.arange(max_seq_len)":
            lambda: (angles.cos(), angles.sin()),
        "returned (sin, cos): return (cos, sin)": lambda: (sin, cos),
        "tables are (head_dim/2, max_seq_len): angles = torch.outer(positions, freqs)": lambda: (cos.T, sin.T),
        "Hugging Face's (max_seq_len, head_dim) tables (frequencies repeated for rotate-half): Meta's layout "
        "wants (max_seq_len, head_dim // 2)": lambda: (torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)),
    }


@_seeded
def check_rope_cos_sin(fn: Callable) -> None:
    """fn(head_dim, max_seq_len, theta) -> (cos, sin), each (max_seq_len, head_dim // 2): of position * freq."""
    for hd, S, theta in [(8, 6, 10000.0), (4, 3, 100.0)]:
        inputs = dict(head_dim=hd, max_seq_len=S, theta=theta)
        got = _call(fn, inputs)
        cos, sin = rope_cos_sin(hd, S, theta)
        _compare(got, (cos, sin), _describe(inputs), _cos_sin_mistakes(hd, S, theta, cos, sin),
                 "angles = torch.outer(torch.arange(max_seq_len), rope_frequencies(head_dim, theta))",
                 labels=("cos", "sin"))


def _permute_mistakes(w, n_heads: int) -> dict:
    return {
        "the other direction (Meta -> HF, permute_meta_to_hf): HF stores each head as its even rows, then "
        "its odd rows; interleave the two halves back": partial(permute_meta_to_hf, w, n_heads),
        "permuted the whole matrix as one head: permute within each head, w.view(n_heads, 2, head_dim // 2, "
        "dim)": partial(permute_hf_to_meta, w, 1),
        "returned w unchanged": partial(torch.clone, w),
    }


@_seeded
def check_permute_hf_to_meta(fn: Callable) -> None:
    """fn(w (n_heads * head_dim, dim), n_heads) -> w with each head's rows in Meta's adjacent-pair order."""
    hint = "within each head, HF's row j goes to row 2j and row j + head_dim/2 to row 2j + 1"
    for n_heads, hd, dim in [(2, 8, 6), (3, 4, 5), (1, 12, 3)]:
        w = torch.randn(n_heads * hd, dim)
        inputs = dict(w=w, n_heads=n_heads)
        got = _call(fn, inputs, hint)
        order = torch.arange(hd).view(2, hd // 2).T.flatten()  # 0, hd/2, 1, hd/2 + 1, ...
        _compare(got, permute_hf_to_meta(w, n_heads), _describe(inputs), _permute_mistakes(w, n_heads), hint,
                 also=w.view(n_heads, hd, dim)[:, order].reshape(-1, dim))


# ---- lesson 2: grouped-query attention -------------------------------------------------------------

TILED = ("looks like K/V heads tiled instead of grouped: query head h must read K/V head h // n_rep "
         "(x.repeat(1, n_rep, 1, 1) gives h % n_kv_heads); use x[:, :, None].expand(...) or repeat_interleave")


def _repeat_kv_mistakes(x, n_rep: int) -> dict:
    return {
        TILED: partial(x.repeat, 1, n_rep, 1, 1),
        "repeated along the sequence (dim 2): repeat the heads, dim 1": partial(x.repeat_interleave, n_rep, 2),
        "repeated along the batch (dim 0): repeat the heads, dim 1": partial(x.repeat_interleave, n_rep, 0),
        "repeated along head_dim (dim 3): repeat the heads, dim 1": partial(x.repeat_interleave, n_rep, 3),
        "returned x unchanged: n_rep ignored": partial(torch.clone, x),
    }


@_seeded
def check_repeat_kv(fn: Callable) -> None:
    """fn(x (B, n_kv_heads, S, hd), n_rep) -> (B, n_kv_heads * n_rep, S, hd), each K/V head n_rep times in a row."""
    for shape, n_rep in [((2, 2, 3, 4), 3), ((1, 3, 2, 2), 2), ((2, 4, 5, 8), 1)]:
        x = torch.randn(shape)
        inputs = dict(x=x, n_rep=n_rep)
        _compare(_call(fn, inputs), repeat_kv(x, n_rep), _describe(inputs), _repeat_kv_mistakes(x, n_rep),
                 "query heads h * n_rep .. h * n_rep + n_rep - 1 all read K/V head h",
                 also=x.repeat_interleave(n_rep, 1))


def _mask_mistakes(q_len: int, kv_len: int) -> dict:
    ones = torch.ones(q_len, kv_len, dtype=torch.bool)
    return {
        "aligned top-left (query i sees keys 0..i), like SDPA's is_causal=True: the last query sits at position "
        "kv_len - 1 and sees every key, so query i sees keys 0 .. i + kv_len - q_len": lambda: ones.tril(),
        "True marks the blocked positions: this mask is True where attention is allowed (invert it)":
            lambda: ~causal_mask(q_len, kv_len),
        "True marks the blocked positions, and it is aligned top-left: True where allowed, and query i sees "
        "keys 0 .. i + kv_len - q_len": lambda: ~ones.tril(),
        "the diagonal is masked: a token may attend to itself (<=, not <)": lambda: ones.tril(kv_len - q_len - 1),
    }


@_seeded
def check_causal_mask(fn: Callable) -> None:
    """fn(q_len, kv_len) -> bool (q_len, kv_len), True where query i may attend to key j: j <= i + kv_len - q_len."""
    for q_len, kv_len in [(2, 5), (4, 4), (1, 6), (3, 7)]:  # q_len < kv_len first: the alignments differ
        inputs = dict(q_len=q_len, kv_len=kv_len)
        got = _call(fn, inputs)
        if torch.is_tensor(got) and got.dtype != torch.bool and got.shape == (q_len, kv_len):
            kind = "an additive mask (0 / -inf)" if got.is_floating_point() and got.isinf().any() else got.dtype
            raise AssertionError(f"returned {kind}: return a boolean mask, True where attention is allowed "
                                 f"(input: {_describe(inputs)})")
        _compare(got, causal_mask(q_len, kv_len), _describe(inputs), _mask_mistakes(q_len, kv_len),
                 "mask[i, j] = j <= i + kv_len - q_len", also=torch.ones(q_len, kv_len).tril(kv_len - q_len).bool())


def _attention(m, x, cos, sin, rope="qk", rope_fn=apply_rotary_emb, heads="grouped", scale=None,
               mask="causal", softmax_dim=-1, merge="transpose", wo=True):
    """Textbook GQA with the weights of m (a utils Attention), with knobs for the usual mistakes."""
    B, T, _ = x.shape
    hd, n_rep = m.head_dim, m.n_heads // m.n_kv_heads
    q, k, v = (w(x).view(B, T, -1, hd) for w in (m.wq, m.wk, m.wv))
    q, k, v = (rope_fn(t, cos, sin) if name in rope else t for name, t in zip("qkv", (q, k, v)))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
    k, v = (t.repeat_interleave(n_rep, 1) if heads == "grouped" else t.repeat(1, n_rep, 1, 1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) * (hd ** -0.5 if scale is None else scale)  # (B, H, T, T)
    past = torch.ones(T, T, dtype=torch.bool).tril()
    if mask != "none":
        scores = scores.masked_fill(~(past.T if mask == "flipped" else past), 0.0 if mask == "zero" else float("-inf"))
    y = scores.softmax(softmax_dim) @ v  # (B, H, T, hd)
    y = (y.transpose(1, 2) if merge == "transpose" else y).reshape(B, T, -1)
    return m.wo(y) if wo else y


def _attention_mistakes(m: Attention, x, cos, sin) -> dict:
    v = partial(_attention, m, x, cos, sin)
    return {
        "no causal mask: tokens also attend to later tokens; fill the scores above the diagonal with -inf "
        "before the softmax (or is_causal=True)": partial(v, mask="none"),
        "masked scores set to 0, not -inf: exp(0) = 1, so later tokens still get weight": partial(v, mask="zero"),
        "mask flipped: tokens attend to later tokens instead of earlier ones (tril keeps the past)":
            partial(v, mask="flipped"),
        "scores not scaled: divide q @ k^T by sqrt(head_dim)": partial(v, scale=1.0),
        "scores scaled by 1/sqrt(dim), the model width: the scale is 1/sqrt(head_dim)":
            partial(v, scale=x.shape[-1] ** -0.5),
        "scores scaled by 1/head_dim: the scale is 1/sqrt(head_dim)": partial(v, scale=1 / m.head_dim),
        "RoPE applied to v as well: rotate only q and k (positions enter through the scores)": partial(v, rope="qkv"),
        "RoPE not applied to k: rotate both q and k": partial(v, rope="q"),
        "RoPE not applied to q: rotate both q and k": partial(v, rope="k"),
        "no RoPE: rotate q and k with apply_rotary_emb(t, cos, sin) while they are (B, T, heads, head_dim)":
            partial(v, rope=""),
        ROTATE_HALF: partial(v, rope_fn=apply_rotary_emb_hf),
        TILED: partial(v, heads="tiled"),
        "softmax over the queries (dim -2): each query's weights sum to 1 over the keys, softmax(dim=-1)":
            partial(v, softmax_dim=-2),
        "heads merged without transposing back: y.transpose(1, 2).reshape(B, T, n_heads * head_dim)":
            partial(v, merge="reshape"),
        "output projection wo missing": partial(v, wo=False),
    }


ATTENTION_HINT = ("check the steps: view as (B, T, heads, head_dim), RoPE on q and k, transpose to (B, heads, T, "
                  "head_dim), repeat K/V, scores / sqrt(head_dim), causal mask, softmax over keys, transpose back, wo")


@_seeded
def check_attention(cls: type) -> None:
    """cls(dim, n_heads, n_kv_heads); forward(x (B, T, dim), cos, sin, start_pos=0) -> (B, T, dim), no cache."""
    for dim, n_heads, n_kv_heads, B, T in [(32, 4, 2, 2, 5), (24, 3, 1, 1, 4), (16, 2, 2, 2, 3)]:
        args = dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
        ref = Attention(dim, n_heads, n_kv_heads).eval()
        x = torch.randn(B, T, dim)
        cos, sin = rope_cos_sin(dim // n_heads, T)
        inputs = dict(x=x, cos=cos, sin=sin, start_pos=0)
        got = _call(_module(cls, args, ref, inputs), inputs, ATTENTION_HINT)
        _compare(got, ref(x, cos, sin), _describe(args | inputs), _attention_mistakes(ref, x, cos, sin),
                 ATTENTION_HINT, also=_attention(ref, x, cos, sin))


# ---- lesson 3: KV cache ----------------------------------------------------------------------------

CACHE_HINT = ("the cache is (batch, n_kv_heads, max_seq_len, head_dim): write at self.k[:, :, start_pos:start_pos "
              "+ T] and return self.k[:, :, :start_pos + T], self.v[:, :, :start_pos + T]")


def _cache_mistakes(history: list, ref: KVCache, expected: tuple) -> dict:
    """What the usual wrong caches would return after the writes in history, [(start_pos, xk, xv), ...]."""
    start, xk, xv = history[-1]
    end = start + xk.shape[2]

    def written_at(where):  # replay every write at position where(start_pos)
        k, v = torch.zeros_like(ref.k), torch.zeros_like(ref.v)
        for s, hk, hv in history:
            k[:, :, where(s):where(s) + hk.shape[2]], v[:, :, where(s):where(s) + hv.shape[2]] = hk, hv
        return k[:, :, :end], v[:, :, :end]

    return {
        "the cache returned only the new keys/values: return everything so far, self.k[:, :, :start_pos + T]":
            lambda: (xk, xv),
        "returned the whole buffer (all max_seq_len positions, the unwritten ones still zero): slice to "
        ":start_pos + T": lambda: (ref.k, ref.v),
        "returned the keys before start_pos without the new ones: slice to :start_pos + T":
            lambda: (ref.k[:, :, :start], ref.v[:, :, :start]),
        "wrote the new keys at position 0 instead of at start_pos": lambda: written_at(lambda s: 0),
        "wrote the new keys one position too far (start_pos + 1): write at start_pos":
            lambda: written_at(lambda s: s + 1),
        "appended (torch.cat) instead of writing at start_pos: a new prompt from start_pos 0 must overwrite "
        "the old keys": lambda: tuple(torch.cat([h[i] for h in history], dim=2) for i in (1, 2)),
        "keys and values swapped: return (keys, values)": lambda: expected[::-1],
        "returned the keys twice: return (keys, values)": lambda: (expected[0], expected[0]),
    }


@_seeded
def check_kv_cache(cls: type) -> None:
    """cls(batch_size, n_kv_heads, max_seq_len, head_dim); update(start_pos, xk, xv (B, n_kv_heads, T, hd))
    -> (keys, values) of every position so far, each (B, n_kv_heads, start_pos + T, hd)."""
    args = dict(batch_size=2, n_kv_heads=2, max_seq_len=8, head_dim=4)
    mine, ref = _call(cls, args), KVCache(*args.values())
    if not callable(getattr(mine, "update", None)):
        raise AssertionError(f"{_name(cls)} has no method update(start_pos, xk, xv)")
    history = []
    for start_pos, T in [(0, 3), (3, 1), (4, 2), (0, 2)]:  # prefill, two decode steps, a new prompt from 0
        xk, xv = torch.randn(2, 2, T, 4), torch.randn(2, 2, T, 4)
        history.append((start_pos, xk, xv))
        inputs = dict(start_pos=start_pos, xk=xk, xv=xv)
        got = _call(mine.update, inputs, CACHE_HINT)
        expected = tuple(t.clone() for t in ref.update(start_pos, xk, xv))
        after = f", after writes at start_pos {[s for s, _, _ in history[:-1]]}" if len(history) > 1 else ""
        _compare(got, expected, _describe(inputs) + after, _cache_mistakes(history, ref, expected), CACHE_HINT,
                 labels=("keys", "values"))


# ---- lesson 4: SwiGLU ------------------------------------------------------------------------------

def _swiglu_rule(dim, multiple_of, mult, base="8/3", rounding="up", multiplier="before") -> int:
    """Meta's hidden size, with knobs for the usual mistakes."""
    h = {"8/3": int(2 * (4 * dim) / 3), "4": 4 * dim, "2/3": int(2 * dim / 3)}[base]
    rnd = {"up": lambda n: multiple_of * ((n + multiple_of - 1) // multiple_of), "none": lambda n: n,
           "down": lambda n: multiple_of * (n // multiple_of),
           "nearest": lambda n: multiple_of * round(n / multiple_of)}[rounding]
    if mult is None or multiplier == "ignored":
        return rnd(h)
    if multiplier == "before":
        return rnd(int(mult * h))
    return int(mult * rnd(h)) if multiplier == "after" else rnd(int(mult * rnd(h)))


def _swiglu_mistakes(cases: list) -> dict:
    rule = lambda **knobs: tuple(_swiglu_rule(*c, **knobs) for c in cases)
    return {
        "not rounded: round up to a multiple of multiple_of": partial(rule, rounding="none"),
        "rounded down: round *up* to the next multiple of multiple_of": partial(rule, rounding="down"),
        "rounded to the nearest multiple: round *up*": partial(rule, rounding="nearest"),
        "ffn_dim_multiplier ignored: scale the width by it before rounding": partial(rule, multiplier="ignored"),
        "ffn_dim_multiplier applied after rounding: scale first, then round up": partial(rule, multiplier="after"),
        "ffn_dim_multiplier applied after rounding (then rounded again): scale first, then round up once":
            partial(rule, multiplier="after, rounded"),
        "4 * dim without the 2/3: SwiGLU has three matrices, so it keeps 2/3 of 4 * dim to cost the same as two":
            partial(rule, base="4"),
        "2/3 of dim: it is 2/3 of 4 * dim": partial(rule, base="2/3"),
    }


@_seeded
def check_swiglu_hidden_dim(fn: Callable) -> None:
    """fn(dim, multiple_of, ffn_dim_multiplier) -> int: int(2 * 4 * dim / 3), times the multiplier, rounded up."""
    cases = [(4096, 256, None), (100, 64, None), (8192, 4096, 1.3), (40, 32, 1.5), (5120, 256, None)]
    got = []
    for case in cases:  # all cases first: rounding down and to the nearest differ only across cases
        inputs = dict(zip(("dim", "multiple_of", "ffn_dim_multiplier"), case))
        got.append(_call(fn, inputs, "ffn_dim_multiplier may be None: scale by it only when it is given"))
        if not isinstance(got[-1], int):
            raise AssertionError(f"returned {got[-1]!r} ({type(got[-1]).__name__}): return an int, nn.Linear needs "
                                 f"one (use // or int()) (input: {_describe(inputs)})")
    _compare(tuple(got), tuple(swiglu_hidden_dim(*c) for c in cases),
             f"(dim, multiple_of, ffn_dim_multiplier) = {', '.join(map(str, cases))}", _swiglu_mistakes(cases),
             "int(2 * (4 * dim) / 3), times ffn_dim_multiplier if given, rounded up to a multiple of multiple_of",
             labels=[str(c) for c in cases])


def _feed_forward_mistakes(m: FeedForward, x) -> dict:
    gate, value = m.w1(x), m.w3(x)
    return {
        "GELU instead of SiLU: the gate is silu(w1(x)) = w1(x) * sigmoid(w1(x))": lambda: m.w2(F.gelu(gate) * value),
        "ReLU instead of SiLU: the gate is silu(w1(x))": lambda: m.w2(F.relu(gate) * value),
        "sigmoid instead of SiLU: silu(z) = z * sigmoid(z)": lambda: m.w2(torch.sigmoid(gate) * value),
        "gate and value swapped: silu goes on w1(x), w3(x) is the linear value": lambda: m.w2(F.silu(value) * gate),
        "w3 not used: SwiGLU multiplies silu(w1(x)) by w3(x)": lambda: m.w2(F.silu(gate)),
        "silu applied to the product: it is silu(w1(x)) * w3(x)": lambda: m.w2(F.silu(gate * value)),
        "added instead of multiplied: silu(w1(x)) * w3(x)": lambda: m.w2(F.silu(gate) + value),
        "w2 not applied: project back to dim with w2": lambda: F.silu(gate) * value,
    }


@_seeded
def check_feed_forward(cls: type) -> None:
    """cls(dim, hidden_dim); forward(x (..., dim)) -> (..., dim) = w2(silu(w1(x)) * w3(x))."""
    for dim, hidden_dim, shape in [(16, 24, (2, 3, 16)), (8, 32, (5, 8))]:
        args, inputs = dict(dim=dim, hidden_dim=hidden_dim), dict(x=torch.randn(shape))
        ref = FeedForward(dim, hidden_dim).eval()
        got = _call(_module(cls, args, ref, inputs), inputs)
        x, (w1, w2, w3) = inputs["x"], (ref.w1.weight, ref.w2.weight, ref.w3.weight)
        _compare(got, ref(x), _describe(args | inputs), _feed_forward_mistakes(ref, x), "w2(silu(w1(x)) * w3(x))",
                 also=(F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T)


# ---- RMSNorm ---------------------------------------------------------------------------------------

def _rmsnorm_mistakes(x, w, eps: float) -> dict:
    ms = x.pow(2).mean(-1, keepdim=True)
    return {
        "LayerNorm, not RMSNorm: don't subtract the mean": lambda: F.layer_norm(x, w.shape, w, None, eps),
        "x.var() subtracts the mean: RMSNorm uses the mean of x², x.pow(2).mean(-1, keepdim=True)":
            lambda: x * torch.rsqrt(x.var(-1, keepdim=True) + eps) * w,
        "eps added outside the square root: x / sqrt(mean(x²) + eps)": lambda: x / (ms.sqrt() + eps) * w,
        "eps missing: x / sqrt(mean(x²) + eps)": lambda: x / ms.sqrt() * w,
        "weight not applied: multiply by self.weight (the learned gain)": lambda: x * torch.rsqrt(ms + eps),
        "divided by the L2 norm, not the RMS: take the mean of x², not the sum":
            lambda: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w,
        "multiplied by the RMS instead of dividing by it: x * rsqrt(mean(x²) + eps)":
            lambda: x * (ms + eps).sqrt() * w,
        "mean over all elements, not per token: .mean(-1, keepdim=True)":
            lambda: x * torch.rsqrt(x.pow(2).mean() + eps) * w,
        "normalised over the wrong dim: the mean of x² runs over the last dim (the features)":
            lambda: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * w,
    }


@_seeded
def check_rmsnorm(cls: type) -> None:
    """cls(dim, eps); forward(x (..., dim)) -> x / sqrt(mean(x^2 over the last dim) + eps) * weight."""
    for dim, eps, shape, scale in [(8, 1e-5, (2, 3, 8), 3.0), (16, 0.1, (4, 16), 0.2)]:
        ref, torch_ref = RMSNorm(dim, eps), nn.RMSNorm(dim, eps)
        ref.weight.copy_(torch.randn(dim))
        torch_ref.weight.copy_(ref.weight)
        x = torch.randn(shape) * scale + 0.5 * scale  # a non-zero mean, so that LayerNorm differs
        args, inputs = dict(dim=dim, eps=eps), dict(x=x)
        got = _call(_module(cls, args, ref, inputs), inputs, "mean(-1, keepdim=True) keeps the mean broadcastable")
        _compare(got, ref(x), _describe(args | inputs), _rmsnorm_mistakes(x, ref.weight, eps),
                 "x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight", also=torch_ref(x))


# ---- the transformer block -------------------------------------------------------------------------

def _block_mistakes(m: TransformerBlock, x, cos, sin) -> dict:
    """What the usual wrong blocks compute, with the reference's sub-layers."""
    attn = lambda h: m.attention(h, cos, sin, 0)
    ff, n1, n2, none = m.feed_forward, m.attention_norm, m.ffn_norm, nn.Identity()

    def pre(norm1=n1, norm2=n2, res1=True, res2=True):
        h = attn(norm1(x)) + (x if res1 else 0)
        return ff(norm2(h)) + (h if res2 else 0)

    def post():
        h = n1(x + attn(x))
        return n2(h + ff(h))

    def normed_residual():
        h = n1(x) + attn(n1(x))
        return n2(h) + ff(n2(h))

    return {
        "post-norm (the norm after the residual add, as in the original Transformer): LLaMA normalises each "
        "sub-layer's input, h = x + attention(attention_norm(x))": post,
        "missing residual around attention: h = x + attention(attention_norm(x))": partial(pre, res1=False),
        "missing residual around the feed-forward: out = h + feed_forward(ffn_norm(h))": partial(pre, res2=False),
        "no residual connections: add each sub-layer's output to its input": partial(pre, res1=False, res2=False),
        "one shared norm: attention_norm before the feed-forward too; ffn_norm has its own weights":
            partial(pre, norm2=n1),
        "one shared norm: ffn_norm before attention too; attention_norm has its own weights": partial(pre, norm1=n2),
        "norms swapped: attention_norm goes before attention, ffn_norm before the feed-forward": partial(pre, n2, n1),
        "residual added to the normalised input: add to x itself, h = x + attention(attention_norm(x))":
            normed_residual,
        "parallel block: the feed-forward must read h = x + attention(...), not x": lambda: x + attn(n1(x)) + ff(n2(x)),
        "no norms: normalise each sub-layer's input, attention(attention_norm(x))": partial(pre, none, none),
    }


@_seeded
def check_block(cls: type) -> None:
    """cls(config); forward(x (B, T, dim), cos, sin, start_pos=0) -> (B, T, dim), pre-norm with residuals."""
    config = LlamaConfig(vocab_size=32, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=16)
    ref = TransformerBlock(config).eval()
    for norm in (ref.attention_norm, ref.ffn_norm):
        norm.weight.copy_(torch.rand(config.dim) + 0.5)  # different gains, so that a shared norm shows
    cases = [dict(zip(("x", "cos", "sin", "start_pos"), (x, *rope_cos_sin(config.head_dim, x.shape[1]), 0)))
             for x in (torch.randn(2, 5, 32), torch.randn(1, 3, 32))]
    mine = _module(cls, dict(config=config), ref, cases[0])
    for inputs in cases:
        x, cos, sin, _ = inputs.values()
        _compare(_call(mine, inputs), ref(x, cos, sin), _describe(inputs), _block_mistakes(ref, x, cos, sin),
                 "h = x + attention(attention_norm(x), cos, sin, start_pos); out = h + feed_forward(ffn_norm(h))")


# ---- generation ------------------------------------------------------------------------------------

def _sampling_probs(logits, temperature, top_k, top_p, keep_crossing=True, sort=True, p_first=False):
    """The distribution sample_next draws from, (B, vocab), the textbook way, with knobs for the usual mistakes."""
    def keep_top_k(p):
        p = torch.where(p >= p.topk(top_k, dim=-1).values[:, -1:], p, 0.0)
        return p / p.sum(-1, keepdim=True)

    def keep_top_p(p):
        order = p.argsort(-1, descending=True) if sort else torch.arange(p.shape[-1]).expand_as(p)
        sorted_p = p.gather(-1, order)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        drop = before >= top_p if keep_crossing else before + sorted_p > top_p
        p = p.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        return p / p.sum(-1, keepdim=True)

    steps = [keep_top_k if top_k is not None else None, keep_top_p if top_p is not None else None]
    p = torch.softmax(logits.double() / temperature, dim=-1)
    for step in steps[::-1] if p_first else steps:
        p = step(p) if step else p
    return p


def _sampling_mistakes(logits, temperature, top_k, top_p) -> dict:
    p = partial(_sampling_probs, logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return {
        "temperature has no effect: divide the logits by it before the softmax (dividing the probabilities "
        "changes nothing, torch.multinomial renormalises them)": partial(p, temperature=1.0),
        "logits multiplied by the temperature: divide them (a higher temperature flattens the distribution)":
            partial(p, temperature=1 / temperature),
        # equals the reference unless both top_k and top_p are given, so it shadows nothing before that case
        "top_p applied before top_k (it then has no effect once top_k has cut): apply top_k first, then top_p to "
        "the renormalised probabilities": partial(p, p_first=True),
        "top_k ignored: keep only the k most likely tokens (set the others to -inf)": partial(p, top_k=None),
        "top_k keeps one token too many": partial(p, top_k=top_k and top_k + 1),
        "top_k keeps one token too few": partial(p, top_k=top_k and top_k - 1),
        "top_p ignored: keep the most likely tokens until their mass reaches top_p": partial(p, top_p=None),
        "top_p dropped the token that crosses the threshold: keep the smallest set whose mass reaches top_p "
        "(drop a token only if the mass before it already does)": partial(p, keep_crossing=False),
        "top_p summed the probabilities unsorted: sort them in descending order before the cumsum":
            partial(p, sort=False),
    }


def _same_distribution(freq, p) -> bool:
    """Frequencies from 20000 draws per row agree with p: same support, within 0.02 (over 5 sigma)."""
    return freq.shape == p.shape and bool(((freq > 0) <= (p > 0)).all()) and (freq - p).abs().max().item() < 0.02


def _token_frequencies(tokens, n: int, V: int, desc: str) -> torch.Tensor:
    """(2, V) frequencies of the tokens drawn for each of the two rows, after checking they are token ids."""
    if not torch.is_tensor(tokens) or tokens.shape != (2 * n,):
        raise AssertionError(f"{_difference(tokens, torch.empty(2 * n))} (input: {desc}): one token id per row; "
                             "torch.multinomial(probs, 1) is (B, 1), so .squeeze(-1)")
    if tokens.is_floating_point() or tokens.min() < 0 or tokens.max() >= V:
        raise AssertionError(f"returned {tokens.dtype} values in [{tokens.min()}, {tokens.max()}]: return token "
                             f"ids (int64, 0 .. vocab - 1), e.g. torch.multinomial(probs, 1) (input: {desc})")
    return torch.stack([torch.bincount(t, minlength=V) / n for t in tokens.long().view(2, n)]).double()


def _rounded(t: torch.Tensor) -> list:
    return [[round(v, 3) for v in row] for row in t.tolist()]


GREEDY = "temperature 0 means greedy: return logits.argmax(dim=-1) before dividing by the temperature"
_PROBS = torch.tensor([[0.06, 0.30, 0.02, 0.16, 0.22, 0.09, 0.12, 0.03],   # two rows, the same values shuffled,
                       [0.22, 0.03, 0.12, 0.30, 0.06, 0.16, 0.02, 0.09]])  # so each row must be handled alone


@_seeded
def check_sample_next(fn: Callable) -> None:
    """fn(logits (B, vocab), temperature, top_k, top_p, generator) -> (B,) token ids; temperature 0 is greedy."""
    n, V = 20000, _PROBS.shape[1]
    logits = _PROBS.log() + torch.tensor([[1.0], [-2.0]])  # log-probabilities up to a constant per row
    # the last case keeps 2 tokens: top_k cuts to 3, top_p to 2 of those (4 of the full distribution)
    for temperature, top_k, top_p in [(1.0, None, None), (0.5, None, None), (1.0, 3, None), (1.0, None, 0.75),
                                      (1.0, 3, 0.72)]:
        inputs = dict(logits=logits.repeat_interleave(n, 0), temperature=temperature, top_k=top_k, top_p=top_p,
                      generator=torch.Generator().manual_seed(0))
        desc = _describe(inputs) + f" (2 rows of logits, each repeated {n} times)"
        tokens = _call(fn, inputs)
        freq, p = _token_frequencies(tokens, n, V, desc), _sampling_probs(logits, temperature, top_k, top_p)
        _compare(freq, p, desc, _sampling_mistakes(logits, temperature, top_k, top_p),
                 f"expected probabilities {_rounded(p)}, your frequencies {_rounded(freq)}", close=_same_distribution)
        inputs["generator"] = torch.Generator().manual_seed(0)
        if top_k is None and top_p is None and not torch.equal(_call(fn, inputs), tokens):
            raise AssertionError("the same generator seed gave different tokens: pass generator=generator to "
                                 "torch.multinomial")
    logits = torch.randn(4, 10)
    inputs = dict(logits=logits, temperature=0.0, top_k=3, top_p=0.9, generator=torch.Generator().manual_seed(0))
    _compare(_call(fn, inputs, GREEDY), logits.argmax(-1), _describe(inputs), hint=GREEDY)


# ---- lesson 03: the attention forward that uses the cache -----------------------------------------

CACHED_CHUNKS = [(0, 3), (3, 1), (4, 1), (5, 3)]  # (start_pos, T): prefill, two decode steps, a chunk
CACHED_ATTENTION_HINT = (
    "with a cache: RoPE on the new q and k (cos/sin are already those of positions start_pos ..), transpose to "
    "(B, heads, T, head_dim), k, v = self.cache.update(start_pos, k, v) (before repeat_kv: the cache holds "
    "n_kv_heads heads), then attend over all S = start_pos + T keys with causal_mask(T, S)")


def _cached_attention(m: Attention, x, cos, sin, mask="bottom-right", cache=True) -> list:
    """Textbook GQA with the weights of m, x (B, S, dim) fed in CACHED_CHUNKS through a growing store of
    rotated keys/values, with knobs for the usual mistakes: the output (B, T, dim) of each chunk."""
    B, hd, n_rep = x.shape[0], m.head_dim, m.n_heads // m.n_kv_heads
    keys = values = x.new_zeros(B, m.n_kv_heads, 0, hd)
    outputs = []
    for start, T in CACHED_CHUNKS:
        xc, c, s = x[:, start:start + T], cos[start:start + T], sin[start:start + T]
        q, k, v = (w(xc).view(B, T, -1, hd) for w in (m.wq, m.wk, m.wv))
        q, k, v = (t.transpose(1, 2) for t in (apply_rotary_emb(q, c, s), apply_rotary_emb(k, c, s), v))
        keys, values = (torch.cat([old[:, :, :start], new], 2) for old, new in ((keys, k), (values, v)))
        kk, vv = (keys, values) if cache else (k, v)  # (B, n_kv_heads, S, hd)
        S = kk.shape[2]
        allowed = {"bottom-right": causal_mask(T, S), "top-left": torch.ones(T, S, dtype=torch.bool).tril(),
                   "none": torch.ones(T, S, dtype=torch.bool)}[mask]
        scores = q @ kk.repeat_interleave(n_rep, 1).transpose(-2, -1) * hd ** -0.5  # (B, H, T, S)
        y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv.repeat_interleave(n_rep, 1)
        outputs.append(m.wo(y.transpose(1, 2).reshape(B, T, -1)))
    return outputs


def _cached_attention_mistakes(m: Attention, x, cos, sin) -> dict:
    """{message: outputs of each chunk}: what the usual wrong forwards return, chunk by chunk."""
    return {
        "attended only over the new tokens, not over the cached ones: k, v = self.cache.update(start_pos, k, v) "
        "returns the keys and values of every position so far; attend over what it returns (and write at "
        "start_pos, not 0)": _cached_attention(m, x, cos, sin, cache=False),
        "masked top-left (is_causal=True) although the cache holds earlier tokens: new token i sits at position "
        "start_pos + i and may see keys 0 .. start_pos + i (a single new token sees every key); use the "
        "bottom-right causal_mask(T, start_pos + T)": _cached_attention(m, x, cos, sin, mask="top-left"),
        "no causal mask with the cache: a prompt or chunk of several new tokens must not see the later ones; mask "
        "with causal_mask(T, start_pos + T) (only a single new token may see every key)":
            _cached_attention(m, x, cos, sin, mask="none"),
    }


def _chunk(x, cos, sin, start: int, T: int) -> dict:
    """The forward inputs for positions start .. start + T - 1 of x (B, S, dim) and the tables (S, hd/2)."""
    return dict(x=x[:, start:start + T], cos=cos[start:start + T], sin=sin[start:start + T], start_pos=start)


@_seeded
def check_cached_attention(cls: type) -> None:
    """cls(dim, n_heads, n_kv_heads) with self.cache (None, or a KVCache the caller installs); forward(x (B, T, dim),
    cos, sin (T, head_dim/2) of positions start_pos .. start_pos + T - 1, start_pos) -> (B, T, dim).

    First without a cache (as check_attention), then with one: a 3-token prompt, two decode steps and a 3-token
    chunk, each output compared with attention over the whole sequence at once."""
    try:
        check_attention.__wrapped__(cls)
    except NotAttempted:
        raise
    except AssertionError as e:
        raise AssertionError(f"without a cache (self.cache is None): {e}") from None
    S = sum(CACHED_CHUNKS[-1])
    for dim, n_heads, n_kv_heads, B in [(32, 4, 2, 2), (24, 3, 1, 1)]:
        args, hd = dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads), dim // n_heads
        ref = Attention(dim, n_heads, n_kv_heads).eval()
        x = torch.randn(B, S, dim)
        cos, sin = rope_cos_sin(hd, S)
        mine = _module(cls, args, ref, _chunk(x, cos, sin, 0, 3))
        mine.cache, ref.cache = KVCache(B, n_kv_heads, S + 2, hd), KVCache(B, n_kv_heads, S + 2, hd)
        whole = _attention(ref, x, cos, sin)  # (B, S, dim): every position at once, no cache
        mistakes = _cached_attention_mistakes(ref, x, cos, sin)
        for i, (start, T) in enumerate(CACHED_CHUNKS):
            inputs = _chunk(x, cos, sin, start, T)
            got = _call(mine, inputs, CACHED_ATTENTION_HINT)
            held = f"the cache holding positions 0 .. {start - 1}" if start else "an empty cache"
            desc = f"{_describe(args | inputs)}, {held}"
            _compare(got, ref(*inputs.values()), desc, {m: partial(o.__getitem__, i) for m, o in mistakes.items()},
                     CACHED_ATTENTION_HINT, also=whole[:, start:start + T])
        cached = getattr(getattr(mine, "cache", None), "k", None)
        if not (torch.is_tensor(cached) and _close(cached[:, :, :S], ref.cache.k[:, :, :S])):
            raise AssertionError("right outputs, but self.cache does not hold the keys: store them there with "
                                 "k, v = self.cache.update(start_pos, k, v) (rotated keys, (B, n_kv_heads, T, "
                                 f"head_dim)), not in a cache of your own (input: {_describe(args)})")


# ---- lesson 05 -------------------------------------------------------------------------------------
# The whole model: counting its parameters and its KV cache from the shape alone. Both are checked on
# several shapes at once (GQA and MHA, tied and untied, Llama-2-7B and 70B), since one shape cannot tell
# some mistakes apart (forgetting the output layer and double-counting a tied one look alike on one model).

def _shape(c: LlamaConfig) -> str:
    """'vocab 100, dim 32, 2 layers, 4 heads, 2 KV heads, hidden 80, untied': what a count depends on."""
    return (f"vocab {c.vocab_size}, dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads, {c.n_kv_heads} KV heads, "
            f"hidden {c.hidden_dim}, {'tied' if c.tie_embeddings else 'untied'}")


@functools.lru_cache(maxsize=8)
def _meta_model(fields: tuple) -> nn.Module:
    """Llama(LlamaConfig(**dict(fields))) on the meta device: shapes without memory, built once per shape."""
    from .model import Llama
    with torch.device("meta"):
        return Llama(LlamaConfig(**dict(fields)))


def _built(c: LlamaConfig) -> nn.Module:
    return _meta_model(tuple(c.to_dict().items()))


def _count_configs() -> list:
    from .model import PRESETS
    return [LlamaConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=80, max_seq_len=64),
            LlamaConfig(vocab_size=50, dim=24, n_layers=3, n_heads=3, hidden_dim=64, max_seq_len=32,
                        tie_embeddings=True),
            LlamaConfig(vocab_size=70, dim=48, n_layers=1, n_heads=6, n_kv_heads=1, hidden_dim=96, max_seq_len=16,
                        tie_embeddings=True),
            PRESETS["llama2-7b"], PRESETS["llama2-70b"]]


def _param_count(c: LlamaConfig, kv_heads=None, ffn_mats=3, hidden=None, norms=(2, 1), embed=1, output=None,
                 bias=False, positions=False, layers=None) -> int:
    """Parameters of a Llama with this shape, written out, with knobs for the usual mistakes."""
    hd, kv, h = c.dim // c.n_heads, c.n_kv_heads if kv_heads is None else kv_heads, hidden or c.hidden_dim
    attn = c.dim * hd * (2 * c.n_heads + 2 * kv) + bias * (c.n_heads * hd + 2 * kv * hd + c.dim)
    ffn = ffn_mats * c.dim * h + bias * ((ffn_mats - 1) * h + c.dim)
    output = (0 if c.tie_embeddings else 1) if output is None else output
    total = (layers or c.n_layers) * (attn + ffn + norms[0] * c.dim) + norms[1] * c.dim
    total += (embed + output) * c.vocab_size * c.dim + bias * output * c.vocab_size
    return total + positions * c.max_seq_len * c.dim


def _count_mistakes(configs: list) -> dict:
    counts = lambda **knobs: tuple(_param_count(c, **knobs) for c in configs)
    return {
        "the norms are missing: each block has two RMSNorm weights (attention_norm, ffn_norm) of dim, and the "
        "final norm one more": partial(counts, norms=(0, 0)),
        "the final norm is missing: after the last block, norm.weight (dim) before the output layer":
            partial(counts, norms=(2, 0)),
        "one norm per block: each block has two, attention_norm and ffn_norm": partial(counts, norms=(1, 1)),
        "norms counted with a bias (LayerNorm): RMSNorm has only a weight, dim numbers": partial(counts, norms=(4, 2)),
        "a tied output layer counted twice: with tie_embeddings the output reuses tok_embeddings' matrix, so count "
        "it once": partial(counts, output=1),
        "the output layer is missing: an untied model has its own (vocab_size, dim) output matrix":
            partial(counts, output=0),
        "the token embedding is missing: tok_embeddings is (vocab_size, dim)": partial(counts, embed=0),
        "K and V counted with n_heads: wk and wv have n_kv_heads * head_dim rows (GQA shares K/V heads)":
            lambda: tuple(_param_count(c, kv_heads=c.n_heads) for c in configs),
        "the feed-forward has three matrices (w1, w2, w3: SwiGLU), not two": partial(counts, ffn_mats=2),
        "feed-forward width 4 * dim: SwiGLU's width is config.hidden_dim":
            lambda: tuple(_param_count(c, hidden=4 * c.dim) for c in configs),
        "biases counted: LLaMA's linear layers have none": partial(counts, bias=True),
        "a position embedding table counted: LLaMA has none, RoPE has no parameters": partial(counts, positions=True),
        "one block counted: multiply the per-block parameters by n_layers": partial(counts, layers=1),
    }


@_seeded
def check_count_params(fn: Callable) -> None:
    """fn(config: LlamaConfig) -> int: the parameters of Llama(config), each shared tensor counted once."""
    from .model import count_params
    configs, got = _count_configs(), []
    for c in configs:  # every shape first: some mistakes show only on tied, or only on GQA, models
        got.append(_call(fn, dict(config=c)))
        if torch.is_tensor(got[-1]) or not isinstance(got[-1], int) or isinstance(got[-1], bool):
            raise AssertionError(f"returned {got[-1]!r} ({type(got[-1]).__name__}): return a Python int "
                                 f"(sum of p.numel(), or .item() of a tensor) (input: {_shape(c)})")
    built = tuple(sum(p.numel() for p in _built(c).parameters()) for c in configs)  # an independent count
    _compare(tuple(got), tuple(count_params(c) for c in configs), "; ".join(map(_shape, configs)),
             _count_mistakes(configs), "per block: attention dim * head_dim * (2 n_heads + 2 n_kv_heads), "
             "feed-forward 3 * dim * hidden_dim, two norms of dim; plus the embedding, the final norm and the "
             "output layer (none if tied)", also=built, labels=[_shape(c) for c in configs])


def _kv_cases() -> list:
    from .model import PRESETS
    small = LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    mha = LlamaConfig(vocab_size=64, dim=24, n_layers=2, n_heads=3, hidden_dim=48, max_seq_len=16)
    return [(small, 3, 10, 2), (mha, 1, 7, 4), (PRESETS["llama2-7b"], 1, 4000, 2), (PRESETS["llama2-70b"], 2, 4096, 1)]


def _kv_bytes(c, B, T, nbytes, kv="kv", heads=None, width=None, layers=True, batch=True, seq=None, unit=1):
    """2 (K and V) * n_layers * B * T * n_kv_heads * head_dim * bytes, with knobs for the usual mistakes."""
    per_token = (heads or c.n_kv_heads) * (width or c.dim // c.n_heads)
    return len(kv) * (c.n_layers if layers else 1) * (B if batch else 1) * (seq or T) * per_token * nbytes * unit


def _kv_mistakes(cases: list) -> dict:
    each = lambda **knobs: tuple(_kv_bytes(*case, **knobs) for case in cases)
    return {
        "K/V heads counted with n_heads: the cache holds only the n_kv_heads shared K/V heads (GQA)":
            lambda: tuple(_kv_bytes(*case, heads=case[0].n_heads) for case in cases),
        "n_kv_heads * dim: each K/V head holds head_dim = dim // n_heads numbers per token":
            lambda: tuple(_kv_bytes(*case, width=case[0].dim) for case in cases),
        "only keys (or only values): the cache holds both, a factor 2": partial(each, kv="k"),
        "queries counted too: only keys and values are cached (a query is used once, by its own token)":
            partial(each, kv="qkv"),
        "one layer: every layer keeps its own keys and values, times n_layers": partial(each, layers=False),
        "batch_size ignored: every sequence in the batch has its own cache": partial(each, batch=False),
        "config.max_seq_len used: the cache here holds seq_len tokens (the argument)":
            lambda: tuple(_kv_bytes(*case, seq=case[0].max_seq_len) for case in cases),
        "counted elements, not bytes: multiply by bytes_per_element": lambda: tuple(_kv_bytes(c, B, T, 1)
                                                                                    for c, B, T, _ in cases),
        "bits, not bytes: bytes_per_element is already in bytes (bfloat16: 2)": partial(each, unit=8),
    }


@_seeded
def check_kv_cache_bytes(fn: Callable) -> None:
    """fn(config, batch_size, seq_len, bytes_per_element) -> int: bytes of the KV cache of every layer."""
    cases, got = _kv_cases(), []
    dtypes = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32}
    for c, B, T, nbytes in cases:
        inputs = dict(config=c, batch_size=B, seq_len=T, bytes_per_element=nbytes)
        got.append(_call(fn, inputs))
        if torch.is_tensor(got[-1]) or not isinstance(got[-1], (int, float)) or isinstance(got[-1], bool):
            raise AssertionError(f"returned {got[-1]!r} ({type(got[-1]).__name__}): return a number of bytes, an "
                                 f"int (input: {_shape(c)}, batch_size={B}, seq_len={T}, bytes_per_element={nbytes})")
    allocated = []
    for c, B, T, nbytes in cases:  # what the model really allocates, on the meta device (no memory)
        model = _built(c)
        allocated.append(model.setup_cache(B, T, dtype=dtypes[nbytes], device="meta"))
        model.clear_cache()
    labels = [f"{_shape(c)}; batch_size={B}, seq_len={T}, bytes_per_element={n}" for c, B, T, n in cases]
    _compare(tuple(got), tuple(_kv_bytes(*case) for case in cases), " | ".join(labels), _kv_mistakes(cases),
             "2 (keys and values) * n_layers * batch_size * seq_len * n_kv_heads * head_dim * bytes_per_element",
             also=tuple(allocated), labels=labels)


# The whole model: embeddings, blocks, final norm, output; RoPE positions from start_pos; tied weights.

LLAMA_HINT = ("h = tok_embeddings(tokens); cos, sin = the rows start_pos .. start_pos + T - 1 of tables built with "
              "config.rope_theta; h = layer(h, cos, sin, start_pos) for every layer in self.layers; return "
              "output(norm(h)), the logits (B, T, vocab_size)")
LLAMA_CHUNKS = [(0, 5), (5, 1), (6, 2)]  # (start_pos, T) with a KV cache: a prompt, a decode step, a chunk


def _llama_configs() -> list:
    # init_std 0.1: sharp attention and large logits, as in a trained model, so that mistakes show
    return [LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=16,
                        rope_theta=500000.0, init_std=0.1),
            LlamaConfig(vocab_size=48, dim=24, n_layers=2, n_heads=3, hidden_dim=40, max_seq_len=16,
                        tie_embeddings=True, init_std=0.1)]


def _llama(ref, tokens, start_pos=0, rope_from="start_pos", layer_start_pos=True, final_norm=True, emb_scale=1.0,
           probs=False, theta=None, layers="all"):
    """Llama forward with the modules of ref (a utils Llama), written out, with knobs for the usual mistakes."""
    c, T = ref.config, tokens.shape[1]
    cos, sin = rope_cos_sin(c.head_dim, c.max_seq_len, theta or c.rope_theta)
    first = start_pos if rope_from == "start_pos" else 0
    cos, sin = cos[first:first + T], sin[first:first + T]
    h = ref.tok_embeddings(tokens) * emb_scale
    order = {"all": ref.layers, "first": ref.layers[:1], "last": ref.layers[-1:], "reversed": ref.layers[::-1]}
    for layer in order[layers]:
        h = layer(h, cos, sin, start_pos if layer_start_pos else 0)
    logits = ref.output(ref.norm(h) if final_norm else h).float()
    return logits.softmax(-1) if probs else logits


def _llama_chunks(ref, tokens, **knobs) -> tuple:
    """The logits of each chunk of LLAMA_CHUNKS, fed through fresh KV caches, with the knobs of `_llama`."""
    ref.setup_cache(tokens.shape[0], ref.config.max_seq_len)
    try:
        return tuple(_llama(ref, tokens[:, s:s + T], s, **knobs) for s, T in LLAMA_CHUNKS)
    finally:
        ref.clear_cache()


def _llama_mistakes(ref, tokens) -> dict:
    c, llama = ref.config, partial(_llama, ref, tokens)
    return {
        "the final norm is missing: logits = output(norm(h)), after the last block": partial(llama, final_norm=False),
        "returned probabilities (softmax): return the logits, cross_entropy and sampling take logits":
            partial(llama, probs=True),
        "embeddings scaled by sqrt(dim) (the original Transformer does; LLaMA does not): h = tok_embeddings(tokens)":
            partial(llama, emb_scale=c.dim ** 0.5),
        "RoPE tables built with theta 10000: use config.rope_theta (this model's is 500000, as in Llama 3)":
            partial(llama, theta=10000.0),
        "only the first block ran: h = layer(h, cos, sin, start_pos) for every layer, in order":
            partial(llama, layers="first"),
        "only the last block ran: h = layer(h, cos, sin, start_pos) for every layer, in order":
            partial(llama, layers="last"),
        "the blocks ran in reverse order: for layer in self.layers, first to last":
            partial(llama, layers="reversed"),
    }


def _llama_cache_mistakes(ref, tokens) -> dict:
    chunks = partial(_llama_chunks, ref, tokens)
    return {
        "RoPE angles of positions 0 .. T - 1 for every chunk: with a cache the new tokens sit at positions "
        "start_pos .. start_pos + T - 1, so take rope_cos[start_pos:start_pos + T]": partial(chunks, rope_from=0),
        # with start_pos 0 in the blocks, attention sees only the new tokens, and a shift of all their RoPE
        # rows cancels out (scores depend on relative positions): the RoPE rows cannot be judged here
        "start_pos not passed to the blocks: each layer writes its keys at start_pos, layer(h, cos, sin, start_pos) "
        "(and take the RoPE rows rope_cos[start_pos:start_pos + T])": partial(chunks, layer_start_pos=False),
    }


def _llama_module(cls, config: LlamaConfig, ref: nn.Module, probe: dict) -> nn.Module:
    """cls(config) with ref's weights loaded by name; tied weights and the blocks' place checked first."""
    mine = _call(cls, dict(config=config))
    if not isinstance(mine, nn.Module):
        raise AssertionError(f"{_name(cls)} must subclass nn.Module: class {_name(cls)}(nn.Module)")
    if not any(True for _ in mine.parameters()):
        _call(mine, probe)  # an untouched stub stops here with NotAttempted
    if config.tie_embeddings:
        out, emb = (getattr(getattr(mine, m, None), "weight", None) for m in ("output", "tok_embeddings"))
        if torch.is_tensor(out) and torch.is_tensor(emb) and out is not emb:
            raise AssertionError(f"{_name(cls)} has its own output matrix although config.tie_embeddings is set: "
                                 "share the embedding's, self.output.weight = self.tok_embeddings.weight")
    problem = _weights_problem(mine, ref)
    if problem:
        raise AssertionError(f"{_name(cls)} {problem}")
    mine.load_state_dict(ref.state_dict(), strict=False)
    return mine.eval()


@_seeded
def check_llama(cls: type) -> None:
    """cls(config); forward(tokens (B, T) int64, start_pos=0) -> logits (B, T, vocab_size), with Meta's names; the
    blocks in self.layers, each with a utils Attention at .attention (the checker attaches KV caches to them)."""
    from .model import Llama
    for config in _llama_configs():
        ref = Llama(config).eval()
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)  # non-trivial gains, so that a missing norm shows
        tokens = torch.randint(0, config.vocab_size, (2, sum(LLAMA_CHUNKS[-1])))
        inputs = dict(tokens=tokens, start_pos=0)
        mine = _llama_module(cls, config, ref, inputs)
        desc = f"{_shape(config)}, rope_theta {config.rope_theta:g}; {_describe(inputs)}"
        _compare(_call(mine, inputs, LLAMA_HINT), ref(tokens), desc, _llama_mistakes(ref, tokens), LLAMA_HINT,
                 also=_llama(ref, tokens))
        attentions = [getattr(layer, "attention", None) for layer in getattr(mine, "layers", [])]
        if not attentions or not all(hasattr(a, "cache") for a in attentions):
            raise AssertionError(f"{_name(cls)} must keep its blocks in self.layers (an nn.ModuleList), each with "
                                 "a utils Attention at .attention, so that a KV cache can be attached")
        for a in attentions:
            a.cache = KVCache(2, config.n_kv_heads, config.max_seq_len, config.head_dim)
        try:
            got = tuple(_call(mine, dict(tokens=tokens[:, s:s + T], start_pos=s), LLAMA_HINT) for s, T in LLAMA_CHUNKS)
        finally:
            for a in attentions:
                a.cache = None
        chunks = ", ".join(f"tokens[:, {s}:{s + T}] at start_pos {s}" for s, T in LLAMA_CHUNKS)
        whole = ref(tokens)  # the same positions without a cache, all at once
        _compare(got, _llama_chunks(ref, tokens), f"{_shape(config)}; with KV caches: {chunks}",
                 _llama_cache_mistakes(ref, tokens), LLAMA_HINT, also=tuple(whole[:, s:s + T] for s, T in LLAMA_CHUNKS),
                 labels=[f"start_pos {s}" for s, _ in LLAMA_CHUNKS])


# ---- lesson 06: training and generation ------------------------------------------------------------

CE_HINT = "F.cross_entropy(logits.flatten(0, 1), targets.flatten()): the mean of -log softmax(logits)[target]"


def _cross_entropy_mistakes(logits, targets) -> dict:
    B, T, _ = logits.shape
    picked = lambda scores: scores.gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    log_p = F.log_softmax(logits, dim=-1)
    return {
        "no log-softmax: the loss is -log softmax(logits)[target], not -logits[target]": lambda: -picked(logits).mean(),
        "softmax without the log: take -log of the probability of the target (F.log_softmax)":
            lambda: -picked(logits.softmax(-1)).mean(),
        "the sign is flipped: the loss is minus the log-probability of the target (it is >= 0)":
            lambda: picked(log_p).mean(),
        "summed over the tokens: take the mean over all B * T tokens": lambda: -picked(log_p).sum(),
        "divided by the batch size only: take the mean over all B * T tokens, not B": lambda: -picked(log_p).sum() / B,
        "returned the loss of every token: take the mean, a single number": lambda: -picked(log_p),
        "bits, not nats: use the natural logarithm (F.log_softmax), not log2":
            lambda: -picked(log_p).mean() / math.log(2),
        "softmax over the wrong dimension: normalise over the vocabulary, dim=-1":
            lambda: -picked(F.log_softmax(logits, dim=1)).mean(),
        "targets shifted a second time: the batch already pairs logits[:, t] with targets[:, t] (y is x shifted)":
            lambda: F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten()),
        "logits and targets flattened out of step: flatten(0, 1) both, (B * T, vocab) and (B * T,)":
            lambda: F.cross_entropy(logits.transpose(0, 1).flatten(0, 1), targets.flatten()),
    }


@_seeded
def check_cross_entropy_loss(fn) -> None:
    """fn(logits (B, T, vocab), targets (B, T) int64) -> the mean next-token loss in nats, a 0-dim tensor."""
    for B, T, V, scale in [(2, 5, 7, 1.0), (3, 4, 11, 2.0), (2, 3, 6, 60.0)]:
        logits, targets = torch.randn(B, T, V) * scale, torch.randint(0, V, (B, T))
        inputs = dict(logits=logits, targets=targets)
        got = _call(fn, inputs, CE_HINT)
        if scale > 10 and torch.is_tensor(got) and got.shape == () and not torch.isfinite(got):
            raise AssertionError(f"returned {got.item()} for large logits: log(softmax(x)) underflows to log(0); "
                                 f"use F.log_softmax (it subtracts the max first) (input: {_describe(inputs)})")
        ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        independent = -(logits - logits.logsumexp(-1, keepdim=True)).gather(-1, targets[..., None]).mean()
        _compare(got, ref, _describe(inputs), _cross_entropy_mistakes(logits, targets), CE_HINT, also=independent)


BATCH_HINT = "x[i] = ids[s : s + max_seq_len] and y[i] = ids[s + 1 : s + max_seq_len + 1] for s = starts[i]"


def _batch_mistakes(ids, starts, T) -> dict:
    def windows(shift_x=0, shift_y=1, len_x=T, len_y=T):
        x = torch.stack([ids[s + shift_x: s + shift_x + len_x] for s in starts.tolist()])
        y = torch.stack([ids[s + shift_y: s + shift_y + len_y] for s in starts.tolist()])
        return x, y

    return {
        "targets not shifted: y must hold the next token of each position, ids[s + 1 : s + max_seq_len + 1]":
            partial(windows, shift_y=0),
        "x and y swapped: x is ids[s : s + max_seq_len], y the same window one token later":
            lambda: windows()[::-1],
        "targets shifted the wrong way: y is one token *later* than x, ids[s + 1 : ...]": partial(windows, shift_y=-1),
        "targets shifted by two: y is x shifted by one token": partial(windows, shift_y=2),
        "off-by-one window: windows start at starts[i] itself, not starts[i] + 1": partial(windows, 1, 2),
        "off-by-one window: x and y are max_seq_len + 1 tokens long; each is max_seq_len, cut from one window of "
        "max_seq_len + 1": partial(windows, len_x=T + 1, len_y=T + 1),
        "off-by-one window: x and y are max_seq_len - 1 tokens long; slice ids[s : s + max_seq_len] for x and "
        "ids[s + 1 : s + max_seq_len + 1] for y": partial(windows, len_x=T - 1, len_y=T - 1),
        "off-by-one window: y is one token short, ids[s + 1 : s + max_seq_len + 1]": partial(windows, len_y=T - 1),
    }


@_seeded
def check_batch(fn) -> None:
    """fn(ids (N,) int64, starts (B,) int64, max_seq_len) -> (x, y), each (B, max_seq_len) int64; y is x shifted."""
    for N, starts, T in [(40, [3, 17, 9], 6), (100, [50, 1, 70, 20], 8), (12, [2], 5)]:
        ids, starts = torch.randperm(1000)[:N], torch.tensor(starts)  # distinct ids: every position tells
        inputs = dict(ids=ids, starts=starts, max_seq_len=T)
        got = _call(fn, inputs, BATCH_HINT)
        if (isinstance(got, (tuple, list)) and len(got) == 2 and all(torch.is_tensor(t) for t in got)
                and any(t.dtype != torch.int64 for t in got)):
            raise AssertionError(f"returned {got[0].dtype} and {got[1].dtype}: return int64 (torch.long) ids, which "
                                 f"nn.Embedding and F.cross_entropy expect (input: {_describe(inputs)})")
        ref = windows_at(ids.numpy(), starts.numpy(), T)
        _compare(tuple(got) if isinstance(got, list) else got, ref, _describe(inputs),
                 _batch_mistakes(ids, starts, T), BATCH_HINT, labels=("x", "y"))


LR_HINT = ("steps 0 .. warmup_steps - 1: lr * (step + 1) / warmup_steps; then progress = (step - warmup_steps) / "
           "(max_steps - warmup_steps), clamped to [0, 1], and min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * progress))")


def _lr_curve(max_steps, warmup, lr, min_lr, warmup_num=1, decay_from=None, span=None, floor=None, height=None,
              period=1.0, shape="cosine", warm=True):
    """The learning rate at steps 0 .. max_steps, textbook, with knobs for the usual mistakes."""
    decay_from = warmup if decay_from is None else decay_from
    span = max(max_steps - decay_from, 1) if span is None else span
    floor = min_lr if floor is None else floor
    height = lr - min_lr if height is None else height
    out = []
    for step in range(max_steps + 1):
        if warm and step < warmup:
            out.append(lr * (step + warmup_num) / warmup)
            continue
        p = min(max((step - decay_from) / span, 0.0), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * period * p)) if shape == "cosine" else 1 - p
        out.append(floor + height * decay)
    return torch.tensor(out, dtype=torch.float64)


def _lr_mistakes(max_steps, warmup, lr, min_lr) -> dict:
    curve = partial(_lr_curve, max_steps, warmup, lr, min_lr)
    return {
        "no warmup: for steps 0 .. warmup_steps - 1 the lr rises linearly, lr * (step + 1) / warmup_steps":
            partial(curve, warm=False),
        "no warmup, and the decay measured from step 0: warm up first, then decay over the remaining steps":
            partial(curve, warm=False, decay_from=0),
        "warmup off by one: step 0 already trains, at lr * (0 + 1) / warmup_steps, and step warmup_steps - 1 "
        "reaches the peak lr": partial(curve, warmup_num=0),
        "decay measured from step 0 instead of after warmup: progress = (step - warmup_steps) / "
        "(max_steps - warmup_steps)": partial(curve, decay_from=0),
        "cosine does not reach min_lr at the last step: the decay lasts max_steps - warmup_steps steps, so "
        "progress = (step - warmup_steps) / (max_steps - warmup_steps)": partial(curve, span=max_steps),
        "cosine ends at 0, not at min_lr: min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * progress))":
            partial(curve, floor=0.0, height=lr),
        "min_lr added on top: the cosine starts at lr and ends at min_lr, min_lr + 0.5 * (lr - min_lr) * (...)":
            partial(curve, height=lr),
        "a whole cosine period (the lr climbs back to the peak): use cos(pi * progress), half a period":
            partial(curve, period=2.0),
        "linear decay, not cosine: min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * progress))":
            partial(curve, shape="linear"),
    }


@_seeded
def check_lr_schedule(fn) -> None:
    """fn(step, max_steps, warmup_steps, lr, min_lr) -> float: linear warmup, then cosine to min_lr (as lr_at)."""
    from .train import TrainConfig, lr_at  # the trainer is imported only by the checker that needs it

    for max_steps, warmup, lr, min_lr in [(40, 10, 1.0, 0.1), (750, 50, 4e-3, 0.0), (12, 3, 3e-4, 3e-5)]:
        cfg = TrainConfig(lr=lr, min_lr_ratio=min_lr / lr, warmup_steps=warmup, max_steps=max_steps)
        got = []
        for step in range(max_steps + 1):
            inputs = dict(step=step, max_steps=max_steps, warmup_steps=warmup, lr=lr, min_lr=min_lr)
            value = _call(fn, inputs, LR_HINT)
            try:
                number = None if isinstance(value, (str, bytes)) else float(value)
            except (TypeError, ValueError):
                number = None
            if number is None:
                raise AssertionError(f"returned {value!r} ({type(value).__name__}): return the learning rate as a "
                                     f"number (input: {_describe(inputs)})")
            got.append(number)
        ref = torch.tensor([lr_at(s, cfg) for s in range(max_steps + 1)], dtype=torch.float64)
        close = partial(_close, atol=1e-9 * lr, rtol=1e-6)
        _compare(torch.tensor(got, dtype=torch.float64), ref,
                 f"max_steps={max_steps}, warmup_steps={warmup}, lr={lr}, min_lr={min_lr}, every step 0 .. max_steps",
                 _lr_mistakes(max_steps, warmup, lr, min_lr), LR_HINT, also=_lr_curve(max_steps, warmup, lr, min_lr),
                 close=close)
