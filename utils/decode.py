"""Speed: the decode step compiled, so that a token costs one graph instead of ~40 small calls per layer.

The plain decode step, `model(token, start_pos=pos)`, attends to a cache that grows by one key per
step (a new shape each time) and runs ~40 small PyTorch calls per layer. Each call costs Python
overhead on a CPU and a kernel launch on a GPU, which is why batch-1 decoding of a small model is
far from what reading its weights allows (benchmarks/RESULTS.md). The same forward takes the position
as a (1,) tensor instead (gpt-fast's way): the cache is then written with index_copy_ and read whole,
a mask hiding the positions not written yet (`utils.attention.update_in_place`, `fused_attention`).
Nothing depends on the step any more, so:

- on a GPU, torch.compile(mode="reduce-overhead") records the step once as a CUDA graph and
  replays it: one launch per token instead of hundreds;
- on a CPU, torch.compile fuses the small ops and calls C++ matrix kernels chosen by the weights'
  dtype (`cpu_settings`: oneDNN-packed and autotuned for bf16, autotuned for an int8 model from
  utils/quantize.py, plain for fp32, which then stays in torch's on-disk cache);
- on both, inductor's "freezing" treats the weights as constants and concatenates wq, wk, wv (and
  w1, w3) into one matrix each, so a layer runs 4 matrix products instead of 7.

This file holds only that machinery: a `Decoder` owns the compiled step and the fixed-size caches it
reads. `generate(..., compile=True)` and `--compile` on the CLI use it.
"""

import contextlib
import weakref

import torch


def decode_step(model, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One new token per row at position pos: tokens (B, 1), pos (1,) int64 -> logits (B, vocab), float32.

    The model's own forward with the position as a tensor: no shape depends on it. The caches must have been
    allocated (model.setup_cache) for batch B; equals model(tokens, start_pos=int(pos))[:, -1].
    """
    return model(tokens, start_pos=pos)[:, -1]


def compile_note(model) -> str:
    """What `--compile` costs, for the command line to say before the wait begins."""
    n, w = model.config.n_layers, model.output.weight
    if w.device.type == "cuda":
        wait = "32-63 s for 30 layers on an H200 (benchmarks/gpu.md), less once torch's on-disk cache holds this model"
    elif w.dtype == torch.bfloat16:  # cpu_settings: packed weights, which torch's cache cannot hold
        wait = ("about a minute and a half for 30 layers on 2 CPU cores, every time (packed bf16 weights cannot be "
                "cached)")
    else:
        wait = ("one to two and a half minutes for 30 layers on 2 CPU cores, about 20 s once torch's on-disk cache "
                "holds this model")
    return (f"compiling the decode step for {w.device.type} ({n} layers): the first tokens wait for it, {wait}; "
            "again for each new cache size (powers of two from 256)")


def cache_length(needed: int, max_seq_len: int) -> int:
    """Cache size for a compiled step: the next power of two >= needed (at least 256, at most max_seq_len).

    Every new cache size is a new graph to compile, so sizes come in a few steps; attention then reads
    at most twice the keys it needs, a small cost next to reading the weights.
    """
    return min(max_seq_len, max(256, 1 << (needed - 1).bit_length()))


class Decoder:
    """One model's compiled decode step and the fixed-size caches it reads, kept from call to call.

    Get it with `decoder(model)`. Keeping the caches keeps their addresses (a recorded CUDA graph reads
    them there), saves compiling again for the same size, and keeps what they hold (a chat's earlier turns).
    """

    def __init__(self, device_type: str, weights: tuple, dtype: torch.dtype | None = None):
        self.weights = weights  # what the compiled step was built for (CPU freezing bakes the weights in)
        self.step = compiled_step(device_type, dtype)
        self.caches: list = []
        self.position: torch.Tensor | None = None  # (1,) int64 on the model's device, the step's input

    def attach(self, model, batch_size: int, needed: int, keep: int = 0) -> int:
        """Give every layer a cache of `cache_length(needed)` positions: the kept ones if that size fits, else
        new ones into which the first `keep` positions of the kept ones are copied; return how many positions
        it kept (0 when there were no caches to keep). Positions past the current one are masked, so old keys
        there are never read."""
        length = cache_length(needed, model.config.max_seq_len)
        w = model.tok_embeddings.weight  # the activations' dtype, which the caches hold
        old = self.caches
        fits = bool(old) and old[0].k.shape[0] == batch_size and old[0].k.dtype == w.dtype
        if not fits or old[0].max_seq_len != length:
            model.setup_cache(batch_size, max_seq_len=length)
            self.caches = [layer.attention.cache for layer in model.layers]
            keep = min(keep, old[0].max_seq_len, length) if fits else 0
            for new, was in zip(self.caches, old if fits else []):
                new.k[:, :, :keep], new.v[:, :, :keep] = was.k[:, :, :keep], was.v[:, :, :keep]
        for layer, cache in zip(model.layers, self.caches):
            layer.attention.cache = cache
        return keep

    def __call__(self, model, tokens: torch.Tensor, pos: int, check_guards: bool = True) -> torch.Tensor:
        """`decode_step` compiled, at the int position pos: tokens (B, 1) -> logits (B, vocab).
        check_guards=False skips torch.compile's checks when the shapes are those of the call before."""
        if self.position is None or self.position.device != tokens.device:
            self.position = torch.zeros(1, dtype=torch.long, device=tokens.device)
        self.position.fill_(pos)  # in place on the device: torch.tensor([pos], device="cuda") would copy from
        with same_shapes_as_before(not check_guards):  # the host and wait for the GPU at every token
            return self.step(model, tokens, self.position)


_decoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its Decoder


def decoder(model) -> Decoder:
    """The model's `Decoder`, built at its first use and again when its weights change (new tensors, or updated
    in place by an optimizer): CPU freezing treats the weights as constants, packed for MKL/oneDNN. The first
    call of each cache size compiles: seconds for a small model, about a minute for a 30-layer one on 2 CPU
    cores. The packed weights are a second copy: SmolLM2-135M in fp32 went from 836 to 1,941 MiB resident.
    """
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    built = _decoders.get(model)
    if built is not None and built.weights == weights:
        return built
    if built is not None:  # a frozen graph would keep the old weights: start over
        torch.compiler.reset()
    w = model.output.weight
    _decoders[model] = built = Decoder(w.device.type, weights, w.dtype)
    return built


def compiled_step(device_type: str, dtype: torch.dtype | None = None):
    """`decode_step` compiled for a device and the weights' dtype: a CUDA graph on a GPU, frozen weights on a CPU."""
    if device_type == "cuda":
        return frozen(torch.compile(decode_step, mode="reduce-overhead", fullgraph=True), {"cpp_wrapper": False})
    if device_type == "cpu":
        return frozen(torch.compile(decode_step, fullgraph=True), cpu_settings(dtype))
    return torch.compile(decode_step, fullgraph=True)


def cpu_settings(dtype: torch.dtype | None) -> dict:
    """Inductor settings for a CPU decode step, chosen by the weights' dtype (SmolLM2-135M, 2 cores, AMX,
    benchmarks/RESULTS.md section 8):

    - float32: no oneDNN weight packing. As fast without it (41 against 37-39 tokens/s), and only then can
      torch keep the compiled graph in its on-disk cache (a packed weight cannot be pickled), so a second
      process on the same model waits 16 s instead of 60.
    - bfloat16: oneDNN packing and max_autotune's C++ matrix kernels: 67 tokens/s against 50 with packing
      alone and 33 with neither. The packed weights keep it out of the cache: every process waits the whole
      compile (75-90 s).
    - int8 weights (utils/quantize.py): max_autotune's C++ GEMM, which reads the int8 weights itself: 87 tokens/s
      against 58-60 with torch's `_weight_int8pack_mm`; nothing is packed by oneDNN, so it is cached (a second
      process waits 22 s; the first compile, autotuning included, takes over two minutes).
    """
    if dtype == torch.float32:
        return {"cpp.weight_prepack": False}
    autotuned = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                 "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # quiet stderr
    return autotuned if dtype in (torch.bfloat16, torch.int8) else {}


def frozen(compiled, extra: dict | None = None):
    """Run `compiled` with inductor's freezing on: the weights become constants, so inductor may repack them
    and concatenate the projections that read the same input (wq, wk, wv into one matrix; w1, w3 into
    another): one matrix product instead of three, and of two. On a CPU the C++ wrapper also calls the
    kernels without Python in between. The settings must be on while it compiles, which happens at its
    first call (torch.compile's `options=` does not reach freezing)."""
    from torch._inductor import config

    wanted = {"freezing": True, "cpp_wrapper": True, "cpp.enable_concat_linear": True, **(extra or {})}
    settings = {k: v for k, v in wanted.items() if k in config.get_config_copy()}  # older torch lacks some

    def run(*args):
        with config.patch(settings):
            return compiled(*args)
    return run


def same_shapes_as_before(skip: bool):
    """Skip torch.compile's guard checks on calls whose shapes are those of the call before (torch >= 2.6)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance(skip_guard_eval_unsafe=skip) if set_stance is not None else contextlib.nullcontext()
