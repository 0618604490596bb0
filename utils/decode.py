"""Speed: one decode step with the same shapes every time, so torch.compile can make it one graph.

The plain decode step, `model(token, start_pos=pos)`, attends to a cache that grows by one key per
step (a new shape each time) and runs ~40 small PyTorch calls per layer. Each call costs Python
overhead on a CPU and a kernel launch on a GPU, which is why batch-1 decoding of a small model is
far from what reading its weights allows (benchmarks/RESULTS.md). Here the position is a tensor,
the cache is written with index_copy_ and attention always reads the whole preallocated cache, with a
mask hiding the positions not written yet. Nothing depends on the step any more, so:

- on a GPU, torch.compile(mode="reduce-overhead") records the step once as a CUDA graph and
  replays it: one launch per token instead of hundreds;
- on a CPU, torch.compile with "freezing" fuses the small ops and packs each weight for the
  MKL/oneDNN matrix-vector kernels, which read it faster than the plain matmul does.

`decode_step` gives the same logits as the plain forward (tests/test_decode.py); the lessons teach
the plain one. `generate(..., compile=True)` and `--compile` on the CLI use this file.
"""

import contextlib

import torch
import torch.nn.functional as F

from .rope import apply_rotary_emb


def decode_step(model, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One new token per row at position pos: tokens (B, 1), pos (1,) int64 -> logits (B, vocab), float32.

    Equals model(tokens, start_pos=int(pos))[:, -1] after the same earlier steps. The caches must
    have been allocated (model.setup_cache) for batch B.
    """
    cache_len = model.layers[0].attention.cache.max_seq_len
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]  # (1, head_dim / 2): this position's angles
    visible = (torch.arange(cache_len, device=pos.device) <= pos).view(1, 1, 1, cache_len)  # keys 0..pos
    h = model.tok_embeddings(tokens)  # (B, 1, dim)
    for layer in model.layers:
        h = h + attend(layer.attention, layer.attention_norm(h), cos, sin, pos, visible)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h))[:, -1].float()


def attend(attn, x: torch.Tensor, cos, sin, pos: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """`Attention.forward` for one token with a fixed-size cache: x (B, 1, dim) -> (B, 1, dim)."""
    B = x.shape[0]
    q = attn.wq(x).view(B, 1, attn.n_heads, attn.head_dim)
    k = attn.wk(x).view(B, 1, attn.n_kv_heads, attn.head_dim)
    v = attn.wv(x).view(B, 1, attn.n_kv_heads, attn.head_dim)
    q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
    attn.cache.k.index_copy_(2, pos, k.transpose(1, 2))  # cache (B, n_kv_heads, cache_len, hd)
    attn.cache.v.index_copy_(2, pos, v.transpose(1, 2))
    y = F.scaled_dot_product_attention(q.transpose(1, 2), attn.cache.k, attn.cache.v, attn_mask=visible,
                                       enable_gqa=attn.n_heads != attn.n_kv_heads)  # (B, n_heads, 1, hd)
    return attn.wo(y.transpose(1, 2).reshape(B, 1, -1))


def compile_note(model) -> str:
    """What `--compile` costs, for the command line to say before the wait begins."""
    n, device = model.config.n_layers, model.output.weight.device.type
    return (f"compiling the decode step for {device} ({n} layers): the first tokens wait for it, about a minute "
            "for 30 layers on 2 CPU cores, and again for each new cache size (powers of two from 256)")


def cache_length(needed: int, max_seq_len: int) -> int:
    """Cache size for a compiled step: the next power of two >= needed (at least 256, at most max_seq_len).

    Every new cache size is a new graph to compile, so sizes come in a few steps; attention then reads
    at most twice the keys it needs, a small cost next to reading the weights.
    """
    return min(max_seq_len, max(256, 1 << (needed - 1).bit_length()))


def attach_cache(model, batch_size: int, needed: int) -> None:
    """Give every layer a cache of `cache_length(needed)` positions, reusing the last call's if it fits.

    Reusing keeps the cache at the same addresses, which a recorded CUDA graph requires, and saves
    compiling again. Positions past the current one are masked, so old keys there are never read.
    """
    length = cache_length(needed, model.config.max_seq_len)
    w = model.output.weight
    key = (batch_size, length, w.dtype, w.device)
    kept = getattr(model, "_static_caches", None)
    if kept is None or kept[0] != key:
        model.setup_cache(batch_size, max_seq_len=length)
        kept = (key, [layer.attention.cache for layer in model.layers])
        model._static_caches = kept
    for layer, cache in zip(model.layers, kept[1]):
        layer.attention.cache = cache


def fast_decode_step(model):
    """`decode_step` compiled for the model's device, built once per model and set of weights.

    CPU: freezing treats the weights as constants (packed for MKL/oneDNN), so the compiled step is
    rebuilt when they change (new tensors, or updated in place by an optimizer). The first call of each
    cache size compiles: seconds for a small model, about a minute for a 30-layer one on 2 CPU cores.
    The packed weights are a second copy: SmolLM2-135M in fp32 went from 836 to 1,941 MiB resident.
    """
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    built = getattr(model, "_compiled_decode", None)
    if built is not None and built[0] == weights:
        return built[1]
    if built is not None:  # a frozen graph would keep the old weights: start over
        torch.compiler.reset()
    device = model.output.weight.device.type
    if device == "cuda":
        fn = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    elif device == "cpu":
        fn = frozen(torch.compile(decode_step, fullgraph=True))
    else:
        fn = torch.compile(decode_step, fullgraph=True)
    model._compiled_decode = (weights, fn)
    return fn


def frozen(compiled):
    """Run `compiled` with inductor's freezing and C++ wrapper on: they must be set while it compiles,
    which happens at its first call (torch.compile's `options=` does not reach freezing)."""
    from torch._inductor import config

    wanted = {"freezing": True, "cpp_wrapper": True, "cpp.enable_concat_linear": True}
    settings = {k: v for k, v in wanted.items() if k in config.get_config_copy()}  # older torch lacks some

    def run(*args):
        with config.patch(settings):
            return compiled(*args)
    return run


def same_shapes_as_before(skip: bool):
    """Skip torch.compile's guard checks on calls whose shapes are those of the call before (torch >= 2.6)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance(skip_guard_eval_unsafe=skip) if set_stance is not None else contextlib.nullcontext()
