"""Lesson 08 (Llama 3): the checkers of its exercises.

    check_scale_frequencies    `my_scale_frequencies(freqs, factor, low_freq_factor, high_freq_factor,
                               original_max_seq_len)`: Llama 3.1's RoPE frequency ladder
    check_llama3_chat_prompt   `my_llama3_chat_prompt(messages)`: the prompt text in Llama 3's chat format
    check_vocab_params         `my_vocab_params(config)`: the parameters that grow with the vocabulary
"""

import functools
import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch

from ..model import LlamaConfig
from ..rope import RopeScaling, rope_frequencies, scale_frequencies
from .checking import _call, _compare, _seeded

# ---- 1. Llama 3.1's frequency ladder ------------------------------------------------------------------------

SCALING_CASES = [  # (head_dim, theta, factor, low_freq_factor, high_freq_factor, original_max_seq_len)
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),   # Llama 3.1 8B
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),   # Llama 3.2 1B
    (16, 10000.0, 4.0, 1.0, 4.0, 64),       # a small model: every band has pairs
    (32, 10000.0, 8.0, 2.0, 8.0, 512),      # other factors: low_freq_factor is not always 1
]
SCALING_HINT = ("wavelength = 2π / freq; keep freq where wavelength < original_max_seq_len / high_freq_factor, "
                "freq / factor where wavelength > original_max_seq_len / low_freq_factor, in between "
                "(1 - γ) freq / factor + γ freq with γ = (original_max_seq_len / wavelength - low_freq_factor) / "
                "(high_freq_factor - low_freq_factor)")


def _scaling_inputs(case) -> dict:
    hd, theta, factor, low, high, original = case
    return dict(freqs=rope_frequencies(hd, theta), factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_seq_len=original)


def _scaled(freqs, factor, low, high, original, wavelength=2 * math.pi, swap_bands=False, blend="right",
            slow=None) -> torch.Tensor:
    """Llama 3.1's ladder written out, with knobs for the usual mistakes."""
    wavelen = wavelength / freqs
    slow = freqs / factor if slow is None else slow
    gamma = (original / wavelen - low) / (high - low)
    blended = {"right": (1 - gamma) * freqs / factor + gamma * freqs,
               "reversed": gamma * freqs / factor + (1 - gamma) * freqs, "none": freqs}[blend]
    long, short = wavelen > original / low, wavelen < original / high
    if swap_bands:
        long, short = short, long
    return torch.where(short, freqs, torch.where(long, slow, blended))


def _scaling_mistakes(cases) -> dict:
    each = lambda **knobs: tuple(_scaled(*_scaling_inputs(c).values(), **knobs) for c in cases)
    return {
        "every frequency divided by factor (plain position interpolation): Llama 3.1 keeps the fast pairs, "
        "wavelength < original_max_seq_len / high_freq_factor, as they were":
            lambda: tuple(_scaling_inputs(c)["freqs"] / c[2] for c in cases),
        "the bands swapped: it is the slow pairs (long wavelength, > original_max_seq_len / low_freq_factor) that "
        "are divided by factor, and the fast ones (short wavelength) that stay": partial(each, swap_bands=True),
        "the blend reversed: in between it is (1 - γ) freq / factor + γ freq, so that γ = 1 (near the fast band) "
        "leaves the frequency as it was": partial(each, blend="reversed"),
        "wavelength taken as 1 / freq: a pair turns once every 2π / freq positions": partial(each, wavelength=1.0),
        "the slow pairs multiplied by factor: they must turn factor times slower, freq / factor":
            lambda: tuple(_scaled(*_scaling_inputs(c).values(), slow=_scaling_inputs(c)["freqs"] * c[2])
                          for c in cases),
        "no blend between the bands: the pairs with wavelengths between original_max_seq_len / high_freq_factor "
        "and original_max_seq_len / low_freq_factor move smoothly from freq to freq / factor":
            partial(each, blend="none"),
    }


def _describe_case(case) -> str:
    hd, theta, factor, low, high, original = case
    return (f"freqs of head_dim {hd}, theta {theta:g}; factor={factor:g}, low_freq_factor={low:g}, "
            f"high_freq_factor={high:g}, original_max_seq_len={original}")


@_seeded
def check_scale_frequencies(fn: Callable) -> None:
    """fn(freqs (hd/2,), factor, low_freq_factor, high_freq_factor, original_max_seq_len) -> scaled freqs (hd/2,)."""
    got = tuple(_call(fn, _scaling_inputs(c), SCALING_HINT) for c in SCALING_CASES)
    expected = tuple(scale_frequencies(_scaling_inputs(c)["freqs"], RopeScaling(*c[2:])) for c in SCALING_CASES)
    labels = [_describe_case(c) for c in SCALING_CASES]
    _compare(got, expected, " | ".join(labels), _scaling_mistakes(SCALING_CASES), SCALING_HINT,
             also=tuple(_scaled(*_scaling_inputs(c).values()) for c in SCALING_CASES),
             close=partial(_close_tensors, rtol=1e-5), labels=labels)


def _close_tensors(got, expected, rtol=1e-5) -> bool:
    """Tuples of (hd/2,) tensors, equal to rtol: the frequencies span 1 down to 1e-6."""
    if isinstance(expected, tuple):
        return (isinstance(got, (tuple, list)) and len(got) == len(expected)
                and all(_close_tensors(g, e, rtol) for g, e in zip(got, expected)))
    return (torch.is_tensor(got) and not got.is_complex() and got.shape == expected.shape
            and torch.allclose(got.double(), expected.double(), rtol=rtol, atol=0))


# ---- 2. the chat prompt ------------------------------------------------------------------------------------

CHAT_CASES = [
    [{"role": "user", "content": "What is RoPE?"}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "  Why GQA? \n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}],
]
CHAT_HINT = ("<|begin_of_text|>, then for every message <|start_header_id|>ROLE<|end_header_id|>, two newlines, "
             "the content stripped, <|eot_id|>; at the end <|start_header_id|>assistant<|end_header_id|> and two "
             "newlines")


def _llama3_prompt(messages, bos="<|begin_of_text|>", bos_each=False, gap="\n\n", end="<|eot_id|>", strip=True,
                   reply_header=True) -> str:
    """Meta's Llama 3 chat format written out, with knobs for the usual mistakes."""
    header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>{gap}"
    text = "" if bos_each else bos
    for m in messages:
        content = m["content"].strip() if strip else m["content"]
        text += (bos if bos_each else "") + header(m["role"]) + content + end
    return text + (header("assistant") if reply_header else "")


def _llama2_prompt(messages) -> str:
    """Llama 2's chat format, for the learner who writes it out of habit."""
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else None
    turns = [m for m in messages if m["role"] != "system"]
    text = ""
    for i, m in enumerate(turns):
        content = m["content"].strip()
        if m["role"] == "user":
            if i == 0 and system:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            text += f"<s>[INST] {content} [/INST]"
        else:
            text += f" {content} </s>"
    return text


def _chat_mistakes(cases) -> dict:
    each = lambda **knobs: tuple(_llama3_prompt(c, **knobs) for c in cases)
    return {
        "Llama 2's format ([INST] ... [/INST]): Llama 3 marks each message with a header, "
        "<|start_header_id|>ROLE<|end_header_id|>": lambda: tuple(_llama2_prompt(c) for c in cases),
        "no <|begin_of_text|>: the prompt opens with it, once": partial(each, bos=""),
        "<|begin_of_text|> before every message: it opens the prompt once": partial(each, bos_each=True),
        "no blank line after a header: <|end_header_id|> is followed by two newlines, \\n\\n":
            partial(each, gap=""),
        "one newline after a header: Meta's format has two, \\n\\n": partial(each, gap="\n"),
        "messages end with <|end_of_text|>: a turn ends with <|eot_id|> (end of turn); <|end_of_text|> ends a "
        "whole document": partial(each, end="<|end_of_text|>"),
        "the prompt does not end with the assistant's header: add <|start_header_id|>assistant<|end_header_id|> "
        "and \\n\\n, so that the model writes the reply": partial(each, reply_header=False),
        "the content is not stripped: Meta's format writes content.strip()": partial(each, strip=False),
    }


@_seeded
def check_llama3_chat_prompt(fn: Callable) -> None:
    """fn(messages [{"role": ..., "content": ...}, ...]) -> the prompt text in Llama 3's chat format."""
    from ..chat import LLAMA3_CHAT_TEMPLATE, render_chat
    got = []
    for messages in CHAT_CASES:
        got.append(_call(fn, dict(messages=[dict(m) for m in messages]), CHAT_HINT))
        if not isinstance(got[-1], str):
            raise AssertionError(f"returned {type(got[-1]).__name__}: return the prompt as one string (str)")
    templated = tuple(render_chat(LLAMA3_CHAT_TEMPLATE, m, bos_token="<|begin_of_text|>") for m in CHAT_CASES)
    labels = [f"{len(m)} message(s): {', '.join(x['role'] for x in m)}" for m in CHAT_CASES]
    _compare(tuple(got), tuple(_llama3_prompt(m) for m in CHAT_CASES), " | ".join(labels),
             _chat_mistakes(CHAT_CASES), CHAT_HINT, also=templated, labels=labels)


# ---- 3. the parameters of the vocabulary -----------------------------------------------------------------------

def _vocab_configs() -> list:
    from ..model import PRESETS
    small = LlamaConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=80, max_seq_len=16)
    return [PRESETS["llama2-7b"], PRESETS["llama3-8b"], PRESETS["llama3.2-1b"], PRESETS["llama3.2-3b"], small,
            replace(small, tie_embeddings=True)]


def _vocab_params(c: LlamaConfig, copies=None, width=None, norm=False) -> int:
    copies = (1 if c.tie_embeddings else 2) if copies is None else copies
    return copies * c.vocab_size * (width or c.dim) + norm * c.dim


def _built_vocab_params(c: LlamaConfig) -> int:
    return _built_embedding_params(c.vocab_size, c.dim, c.tie_embeddings)


@functools.lru_cache(maxsize=16)
def _built_embedding_params(vocab_size: int, dim: int, tied: bool) -> int:
    """tok_embeddings and output of a one-block Llama built on the meta device (no memory), a shared tensor once:
    the blocks do not change these two, so one small block keeps the build fast."""
    from ..model import Llama
    with torch.device("meta"):
        model = Llama(LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=1, n_heads=1, hidden_dim=8,
                                  max_seq_len=8, tie_embeddings=tied))
    return sum(p.numel() for p in {id(p): p for p in (model.tok_embeddings.weight, model.output.weight)}.values())


def _vocab_mistakes(configs) -> dict:
    each = lambda **knobs: tuple(_vocab_params(c, **knobs) for c in configs)
    return {
        "a tied output counted twice: with tie_embeddings (Llama 3.2) the output layer is the embedding matrix "
        "itself, so count it once": partial(each, copies=2),
        "the output layer left out: an untied model (Llama 2, Llama 3 8B) has its own (vocab_size, dim) output "
        "matrix besides the embedding": partial(each, copies=1),
        "rows of hidden_dim: an embedding row, and a row of the output matrix, is dim wide":
            lambda: tuple(_vocab_params(c, width=c.hidden_dim) for c in configs),
        "the final norm counted: norm.weight has dim numbers whatever the vocabulary": partial(each, norm=True),
    }


def _vocab_shape(c: LlamaConfig) -> str:
    return f"vocab {c.vocab_size}, dim {c.dim}, {'tied' if c.tie_embeddings else 'untied'}"


@_seeded
def check_vocab_params(fn: Callable) -> None:
    """fn(config) -> int: the parameters of the token embedding and the output layer, a tied matrix once."""
    configs, got = _vocab_configs(), []
    for c in configs:
        got.append(_call(fn, dict(config=c)))
        if torch.is_tensor(got[-1]) or not isinstance(got[-1], int) or isinstance(got[-1], bool):
            raise AssertionError(f"returned {got[-1]!r} ({type(got[-1]).__name__}): return a Python int "
                                 f"(input: {_vocab_shape(c)})")
    labels = [_vocab_shape(c) for c in configs]
    _compare(tuple(got), tuple(_vocab_params(c) for c in configs), "; ".join(labels), _vocab_mistakes(configs),
             "vocab_size * dim for the embedding, as much again for an untied output layer",
             also=tuple(_built_vocab_params(c) for c in configs), labels=labels)
