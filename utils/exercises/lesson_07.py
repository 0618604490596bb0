"""Lesson 07 (finetuning and LoRA): the checkers of its exercises.

    check_lora_linear      `MyLoRALinear(base, rank, alpha)`: W x + (alpha / r) B(A x), W frozen, B zero at the start
    check_merge_lora       `my_merge_lora(weight, lora_A, lora_B, alpha)`: W + (alpha / r) B A
    check_lora_params      `my_lora_params(config, rank, targets)`: LoRA's trainable parameters from the shape
"""

from collections.abc import Callable

import torch
from torch import nn

from ..lora import ALL_TARGETS, LoRALinear, lora_params
from ..model import LlamaConfig
from .checking import _call, _compare, _describe, _name, _seeded

# ---- LoRALinear ------------------------------------------------------------------------------------------

LORA_CASES = [(12, 10, 2, 4.0), (16, 24, 4, 8.0), (8, 8, 1, 3.0)]  # (in, out, rank, alpha)


def _lora_forward(x, W, A, B, scale) -> torch.Tensor:
    return x @ W.T + scale * (x @ A.T) @ B.T


def _lora_mistakes(x, W, A, B, rank, alpha) -> dict:
    return {
        "the update is scaled by alpha, not alpha / rank": lambda: _lora_forward(x, W, A, B, alpha),
        "the update is scaled by rank / alpha: it is alpha / rank": lambda: _lora_forward(x, W, A, B, rank / alpha),
        "the update is not scaled: multiply B(A x) by alpha / rank": lambda: _lora_forward(x, W, A, B, 1.0),
        "the frozen W x is missing: LoRA adds its update to the base layer's output":
            lambda: (alpha / rank) * (x @ A.T) @ B.T,
        "only W x: the update (alpha / rank) * B(A x) is missing": lambda: x @ W.T,
    }


def _lora_parts(mine: nn.Module, base: nn.Linear, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate's A (rank, in) and B (out, rank), checked by name and shape."""
    out_f, in_f = base.weight.shape
    named = dict(mine.named_parameters())
    for name, shape in (("lora_A", (rank, in_f)), ("lora_B", (out_f, rank))):
        p = named.get(name)
        if p is None:
            raise AssertionError(f"{_name(type(mine))} has no parameter {name}: create self.{name} = nn.Parameter(...) "
                                 f"of shape {shape} in __init__ (A: (rank, in_features), B: (out_features, rank))")
        if tuple(p.shape) != shape:
            flip = ": it is stored as (out, in), like nn.Linear's weight" * (tuple(p.shape) == shape[::-1])
            raise AssertionError(f"{name} has shape {tuple(p.shape)}, expected {shape}{flip}")
    return named["lora_A"], named["lora_B"]


def _check_training_state(mine: nn.Module, base: nn.Linear, A, B) -> None:
    frozen = [n for n, p in mine.named_parameters() if p.requires_grad and not n.startswith("lora_")]
    if frozen:
        raise AssertionError(f"{', '.join(frozen)} still has requires_grad=True: freeze the base layer "
                             "(weight.requires_grad_(False)), only lora_A and lora_B train")
    if not (A.requires_grad and B.requires_grad):
        raise AssertionError("lora_A and lora_B must have requires_grad=True: they are what LoRA trains")
    if B.abs().max() != 0:
        raise AssertionError("lora_B does not start at zero: initialise it with zeros, so that the layer computes "
                             "exactly what the base layer does before the first step")
    if A.abs().max() == 0:
        raise AssertionError("lora_A starts at zero too: with A = 0 and B = 0 no gradient ever reaches either "
                             "(dL/dB needs A x, dL/dA needs B); initialise A randomly (e.g. nn.init.kaiming_uniform_)")


@_seeded
def check_lora_linear(cls: Callable) -> None:
    """cls(base: nn.Linear, rank, alpha) -> module: x -> base(x) + (alpha / rank) * B(A x), base frozen, B = 0."""
    for in_f, out_f, rank, alpha in LORA_CASES:
        base = nn.Linear(in_f, out_f, bias=False)
        W = base.weight.detach().clone()
        mine = _call(cls, {"base": base, "rank": rank, "alpha": alpha})
        if not isinstance(mine, nn.Module):
            raise AssertionError(f"{_name(cls)} must subclass nn.Module: class {_name(cls)}(nn.Module)")
        A, B = _lora_parts(mine, base, rank)
        _check_training_state(mine, base, A, B)
        x = torch.randn(3, 5, in_f)
        inputs = _describe({"x": x}) + f", in {in_f}, out {out_f}, rank {rank}, alpha {alpha}"
        missing_base = {"the frozen W x is missing: LoRA adds its update to the base layer's output":
                        lambda out_f=out_f: torch.zeros(3, 5, out_f)}
        _compare(_call(mine, {"x": x}), x @ W.T, inputs + " (B = 0: the output must be the base layer's)", missing_base)
        A.copy_(torch.randn_like(A) * 0.3)
        B.copy_(torch.randn_like(B) * 0.3)
        got = _call(mine, {"x": x})
        ref = LoRALinear(nn.Linear(in_f, out_f, bias=False), rank, alpha)
        ref.weight.copy_(W)
        ref.lora_A.copy_(A)
        ref.lora_B.copy_(B)
        _compare(got, ref(x), inputs, _lora_mistakes(x, W, A, B, rank, alpha),
                 also=_lora_forward(x, W, A, B, alpha / rank))


# ---- merging ---------------------------------------------------------------------------------------------

def _merge_mistakes(W, A, B, alpha, rank) -> dict:
    return {
        "scaled by alpha, not alpha / rank": lambda: W + alpha * B @ A,
        "not scaled: add (alpha / rank) * B @ A": lambda: W + B @ A,
        "scaled by rank / alpha: it is alpha / rank": lambda: W + rank / alpha * B @ A,
        "subtracted: the merged weight is W + (alpha / rank) B A": lambda: W - alpha / rank * B @ A,
        "only the update: add it to W": lambda: alpha / rank * B @ A,
    }


@_seeded
def check_merge_lora(fn: Callable) -> None:
    """fn(weight (out, in), lora_A (r, in), lora_B (out, r), alpha) -> weight + (alpha / r) B A, (out, in)."""
    for in_f, out_f, rank, alpha in LORA_CASES:
        W, A, B = torch.randn(out_f, in_f), torch.randn(rank, in_f), torch.randn(out_f, rank)
        inputs = {"weight": W, "lora_A": A, "lora_B": B, "alpha": alpha}
        got = _call(fn, inputs, "B @ A has the weight's shape (out, in); the rank is lora_A.shape[0]")
        _compare(got, W + alpha / rank * B @ A, _describe(inputs), _merge_mistakes(W, A, B, alpha, rank))


# ---- counting --------------------------------------------------------------------------------------------

LORA_CONFIGS = [
    (LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536), 8,
     ("wq", "wk", "wv", "wo")),
    (LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32), 16, ("wq", "wv")),
    (LlamaConfig(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384), 4, ALL_TARGETS),
]


def _count(config: LlamaConfig, rank: int, targets, per_matrix="r(in+out)", kv_heads="n_kv_heads", layers=True) -> int:
    c = config
    kv = (c.n_kv_heads if kv_heads == "n_kv_heads" else c.n_heads) * c.head_dim
    shapes = {"wq": (c.dim, c.dim), "wk": (c.dim, kv), "wv": (c.dim, kv), "wo": (c.dim, c.dim),
              "w1": (c.dim, c.hidden_dim), "w2": (c.hidden_dim, c.dim), "w3": (c.dim, c.hidden_dim)}
    one = {"r(in+out)": lambda i, o: rank * (i + o), "in*out": lambda i, o: i * o, "r*in": lambda i, o: rank * i,
           "2r*dim": lambda i, o: 2 * rank * c.dim}[per_matrix]
    return (c.n_layers if layers else 1) * sum(one(*shapes[t]) for t in targets)


def _count_mistakes(config, rank, targets) -> dict:
    count = lambda **knobs: lambda: _count(config, rank, targets, **knobs)
    return {
        "counts in * out per matrix: that is the frozen weight; LoRA trains A (r, in) and B (out, r)":
            count(per_matrix="in*out"),
        "counts A only: B (out, r) trains too": count(per_matrix="r*in"),
        "wk and wv as (dim, dim): with grouped-query attention they have n_kv_heads * head_dim outputs":
            count(kv_heads="n_heads"),
        "one layer only: every layer has its own adapters, multiply by n_layers": count(layers=False),
        "2 * rank * dim per matrix: that holds only for square ones; use rank * (in + out)": count(per_matrix="2r*dim"),
    }


@_seeded
def check_lora_params(fn: Callable) -> None:
    """fn(config: LlamaConfig, rank, targets) -> int: n_layers * sum over targets of rank * (in + out)."""
    for config, rank, targets in LORA_CONFIGS:
        inputs = {"config": config, "rank": rank, "targets": targets}
        got = _call(fn, inputs, "a target is one of wq, wk, wv, wo, w1, w2, w3")
        got = int(got) if isinstance(got, (int, float)) or torch.is_tensor(got) else got
        desc = f"dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads, {config.n_kv_heads} KV heads, " \
               f"hidden {config.hidden_dim}, rank {rank}, targets {','.join(targets)}"
        _compare(got, lora_params(config, rank, targets), desc, _count_mistakes(config, rank, targets))
