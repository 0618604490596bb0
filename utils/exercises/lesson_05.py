"""Lesson 05 (the full model): the checkers of its exercises.

    check_llama           `MyLlama`: embeddings, the blocks, the final norm, the output; with and without a KV cache
    check_count_params    `my_count_params(config)`: the parameters of the model, each shared tensor once
    check_kv_cache_bytes  `my_kv_cache_bytes(config, batch_size, seq_len, bytes_per_element)`
"""

import functools
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..attention import KVCache
from ..model import LlamaConfig
from ..norm import rms_norm
from ..rope import rope_cos_sin
from .checking import _call, _check_parts_attempted, _compare, _describe, _name, _seeded, _weights_problem

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
    from ..model import Llama
    with torch.device("meta"):
        return Llama(LlamaConfig(**dict(fields)))


def _built(c: LlamaConfig) -> nn.Module:
    return _meta_model(tuple(c.to_dict().items()))


def _count_configs() -> list:
    from ..model import PRESETS
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
    from ..model import count_params
    configs, got = _count_configs(), []
    for c in configs:  # every shape first: some mistakes show only on tied, or only on GQA, models
        got.append(_call(fn, dict(config=c)))
        if torch.is_tensor(got[-1]) or not isinstance(got[-1], int) or isinstance(got[-1], bool):
            raise AssertionError(f"returned {got[-1]!r} ({type(got[-1]).__name__}): return a Python int "
                                 f"(sum of p.numel(), or .item() of a tensor) (input: {_shape(c)})")
    built = tuple(sum(p.numel() for p in _built(c).parameters()) for c in configs)  # an independent count
    expected = tuple(count_params(c) for c in configs)
    first = _first_difference(tuple(got), expected, built) if tuple(got) != expected else 0
    _compare(tuple(got), expected, _shape(configs[first]),
             _count_mistakes(configs), "per block: attention dim * head_dim * (2 n_heads + 2 n_kv_heads), "
             "feed-forward 3 * dim * hidden_dim, two norms of dim; plus the embedding, the final norm and the "
             "output layer (none if tied)", also=built,
             labels=[f"model {i + 1} of {len(configs)}" for i in range(len(configs))])


def _kv_cases() -> list:
    from ..model import PRESETS
    small = LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    mha = LlamaConfig(vocab_size=64, dim=24, n_layers=2, n_heads=3, hidden_dim=48, max_seq_len=16)
    return [(small, 3, 10, 2), (mha, 1, 7, 4), (PRESETS["llama2-7b"], 1, 4000, 2), (PRESETS["llama2-70b"], 2, 4096, 1)]


def _kv_bytes(c, B, T, nbytes, kv="kv", heads="n_kv_heads", width="head_dim", layers=True, batch=True,
              seq="seq_len", unit="bytes"):
    """2 (K and V) * n_layers * B * T * n_kv_heads * head_dim * bytes, with knobs for the usual mistakes."""
    per_token = getattr(c, heads) * (c.dim // c.n_heads if width == "head_dim" else c.dim)
    size = {"bytes": nbytes, "elements": 1, "bits": 8 * nbytes}[unit]
    tokens = T if seq == "seq_len" else c.max_seq_len
    return len(kv) * (c.n_layers if layers else 1) * (B if batch else 1) * tokens * per_token * size


def _kv_mistakes(cases: list) -> dict:
    each = lambda **knobs: tuple(_kv_bytes(*case, **knobs) for case in cases)
    return {
        "K/V heads counted with n_heads: the cache holds only the n_kv_heads shared K/V heads (GQA)":
            partial(each, heads="n_heads"),
        "n_kv_heads * dim: each K/V head holds head_dim = dim // n_heads numbers per token":
            partial(each, width="dim"),
        "only keys (or only values): the cache holds both, a factor 2": partial(each, kv="k"),
        "queries counted too: only keys and values are cached (a query is used once, by its own token)":
            partial(each, kv="qkv"),
        "one layer: every layer keeps its own keys and values, times n_layers": partial(each, layers=False),
        "batch_size ignored: every sequence in the batch has its own cache": partial(each, batch=False),
        "config.max_seq_len used: the cache here holds seq_len tokens (the argument)":
            partial(each, seq="max_seq_len"),
        "counted elements, not bytes: multiply by bytes_per_element": partial(each, unit="elements"),
        "bits, not bytes: bytes_per_element is already in bytes (bfloat16: 2)": partial(each, unit="bits"),
    }


def _first_difference(got: tuple, expected: tuple, also: tuple) -> int:
    """The first case where got disagrees with either reference."""
    return next(i for i, (g, e, a) in enumerate(zip(got, expected, also)) if g != e or g != a)


@_seeded
def check_kv_cache_bytes(fn: Callable) -> None:
    """fn(config, batch_size, seq_len, bytes_per_element) -> int: bytes of the KV cache of every layer."""
    cases, got = _kv_cases(), []
    dtypes = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32}
    labels = [f"{_shape(c)}; batch_size={B}, seq_len={T}, bytes_per_element={n}" for c, B, T, n in cases]
    for (c, B, T, nbytes), label in zip(cases, labels):
        inputs = dict(config=c, batch_size=B, seq_len=T, bytes_per_element=nbytes)
        got.append(_call(fn, inputs))
        if torch.is_tensor(got[-1]) or not isinstance(got[-1], int) or isinstance(got[-1], bool):
            why = (", a float (dim / n_heads gives one): return an int, with dim // n_heads or int(...)"
                   if isinstance(got[-1], float) else f" ({type(got[-1]).__name__}): return a number of bytes, an int")
            raise AssertionError(f"returned {got[-1]!r}{why} (input: {label})")
    allocated = []
    for c, B, T, nbytes in cases:  # what the model really allocates, on the meta device (no memory)
        model = _built(c)
        allocated.append(model.setup_cache(B, T, dtype=dtypes[nbytes], device="meta"))
        model.clear_cache()
    expected = tuple(_kv_bytes(*case) for case in cases)
    first = _first_difference(tuple(got), expected, tuple(allocated)) if tuple(got) != expected else 0
    _compare(tuple(got), expected, labels[first], _kv_mistakes(cases),
             "2 (keys and values) * n_layers * batch_size * seq_len * n_kv_heads * head_dim * bytes_per_element",
             also=tuple(allocated), labels=[f"case {i + 1} of {len(cases)}" for i in range(len(cases))])


# The whole model: embeddings, blocks, final norm, output; RoPE positions from start_pos; tied weights.

LLAMA_HINT = ("h = tok_embeddings(tokens); cos, sin = the rows start_pos .. start_pos + T - 1 of tables built with "
              "config.rope_theta; h = layer(h, cos, sin, start_pos) for every layer in self.layers; return "
              "output(norm(h)), the logits (B, T, vocab_size)")
LLAMA_CHUNKS = [(0, 5), (5, 1), (6, 2)]  # (start_pos, T) with a KV cache: a prompt, a decode step, a chunk


def _llama_configs() -> list:
    # init_std 0.1: sharp attention and large logits, as in a trained model, so that mistakes show
    return [LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=16,
                        rope_theta=500000.0, init_std=0.1, norm_eps=1e-2),
            LlamaConfig(vocab_size=48, dim=24, n_layers=2, n_heads=3, hidden_dim=40, max_seq_len=16,
                        tie_embeddings=True, init_std=0.1)]


def _llama(ref, tokens, start_pos=0, rope_from="start_pos", layer_start_pos=True, final_norm=True, emb_scale=1.0,
           probs=False, theta=None, layers="all", norm_eps=None):
    """Llama forward with the modules of ref (a utils Llama), written out, with knobs for the usual mistakes."""
    c, T = ref.config, tokens.shape[1]
    cos, sin = rope_cos_sin(c.head_dim, c.max_seq_len, theta or c.rope_theta)
    first = start_pos if rope_from == "start_pos" else 0
    cos, sin = cos[first:first + T], sin[first:first + T]
    h = ref.tok_embeddings(tokens) * emb_scale
    order = {"all": ref.layers, "first": ref.layers[:1], "last": ref.layers[-1:], "reversed": ref.layers[::-1]}
    for layer in order[layers]:
        h = layer(h, cos, sin, start_pos if layer_start_pos else 0)
    norm = ref.norm if norm_eps is None else partial(rms_norm, weight=ref.norm.weight, eps=norm_eps)
    logits = ref.output(norm(h) if final_norm else h).float()
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
        "the final norm ignores config.norm_eps (RMSNorm's default eps 1e-5 used instead): self.norm = "
        "RMSNorm(config.dim, config.norm_eps)": partial(llama, norm_eps=1e-5),
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
    _check_parts_attempted(mine, ref)
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
    from ..model import Llama
    for config in _llama_configs():
        ref = Llama(config).eval()
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)  # non-trivial gains, so that a missing norm shows
        tokens = torch.randint(0, config.vocab_size, (2, sum(LLAMA_CHUNKS[-1])))
        inputs = dict(tokens=tokens, start_pos=0)
        mine = _llama_module(cls, config, ref, inputs)
        desc = f"{_shape(config)}, rope_theta {config.rope_theta:g}, norm_eps {config.norm_eps:g}; {_describe(inputs)}"
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
