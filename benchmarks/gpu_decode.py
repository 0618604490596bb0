"""Batch-1 decoding on a GPU: where the time goes, and what each setting of the compiled step buys.

One process, one model, the same prompt and weights for every path:

- eager: ours and Hugging Face's (`decode.py`'s twin), with a profile of one decode step of each
  (CUDA kernels launched, host time per step), and two variants of ours that change one thing;
- compiled (`utils/decode.py`), built up one setting at a time: CUDA graphs alone with the position
  copied from the host each token (as before), the position kept on the GPU, then inductor's freezing
  (wq/wk/wv and w1/w3 concatenated: the default now), then attention written out for one query, then three
  inductor settings that aim at fewer kernels per layer (coordinate descent tuning, one-row products as
  reductions, Triton GEMM templates);
- the same weights in fp32 and bf16: do HF's greedy tokens equal ours?

    python benchmarks/gpu_decode.py --shape 135M --dtype bf16 --tokens 128
"""

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import SHAPES, hf_decode, hf_twin  # noqa: E402  (benchmarks/decode.py)

import utils.attention  # noqa: E402
import utils.decode  # noqa: E402
import utils.norm  # noqa: E402
from utils.generate import generate  # noqa: E402
from utils.model import Llama  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, rounds: int) -> tuple[float, object]:
    """Median seconds of `rounds` calls after one warm-up, and the warm-up's result."""
    out = fn()
    times = []
    for _ in range(rounds):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.flatten().tolist(), b.flatten().tolist()
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return f"all {len(a)} equal" if i is None else f"first {i} of {len(a)} equal"


# ---- variants of the compiled step -------------------------------------------------------------------

class HostPosition(utils.decode.Decoder):
    """The step as it was: the position made on the host and copied to the GPU at every token."""

    def __call__(self, model, tokens, pos, check_guards=True):
        with utils.decode.same_shapes_as_before(not check_guards):
            return self.step(model, tokens, torch.tensor([pos], device=tokens.device))


def one_query_attention(q, k, v, dropout_p=0.0, start_pos=0):
    """Attention for one new token over a fixed-size cache, written out: (B, H, 1, hd) -> (B, H, 1, hd).

    The query heads are grouped by the K/V head they share, so K/V are never repeated; inductor fuses the
    scale, mask and softmax into one kernel between two matrix products."""
    if not isinstance(start_pos, torch.Tensor) or q.shape[2] != 1:
        return FUSED(q, k, v, dropout_p, start_pos)
    B, H, _, hd = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    qg = q.view(B, H_kv, H // H_kv, hd)  # (B, H_kv, n_rep, hd)
    scores = (qg @ k.transpose(-2, -1)).float() / math.sqrt(hd)  # (B, H_kv, n_rep, S)
    seen = torch.arange(S, device=q.device) <= start_pos  # (S,)
    probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1).to(v.dtype)
    return (probs @ v).view(B, H, 1, hd)


FUSED = utils.attention.fused_attention


def compiled_variants(device):
    c = utils.decode

    def plain():
        return torch.compile(c.decode_step, mode="reduce-overhead", fullgraph=True)

    def frozen_with(**extra):  # the default step with more inductor settings
        return lambda: c.frozen(plain(), {"cpp_wrapper": False, **extra})

    def products_as_reductions():
        """Inductor's decompose_mm_pass turns a matrix product into a multiply and a sum. On a GPU it is meant for
        tall, thin products (at least 10,240 rows, under 32 columns), limits read when its module is imported:
        widened here so that it takes every one-row product of the step."""
        from torch._inductor.fx_passes import decompose_mem_bound_mm as mm
        mm.min_first_dimension_decomposition, mm.max_other_dimension_decomposition = 1, 1 << 30
        return frozen_with(post_grad_fusion_options={"decompose_mm_pass": {}})()
    return {
        "compiled: CUDA graphs, position from the host (before)": (HostPosition, plain, FUSED),
        "compiled: CUDA graphs, position on the GPU": (c.Decoder, plain, FUSED),
        "compiled: + freezing (concatenated projections; the default)": (c.Decoder, None, FUSED),
        "compiled: + freezing + one-query attention written out": (c.Decoder, None, one_query_attention),
        # fewer, larger kernels (not yet measured): Triton kernels tuned by coordinate descent (gpt-fast's setting),
        # products with one row turned into reductions that fuse with the norm before them, Triton GEMM templates
        # whose epilogues take the SiLU-gate and the residual add
        "compiled: + freezing + coordinate descent tuning": (c.Decoder, frozen_with(coordinate_descent_tuning=True),
                                                              FUSED),
        "compiled: + freezing + one-row products as reductions": (c.Decoder, products_as_reductions, FUSED),
        "compiled: + freezing + max_autotune (Triton GEMM templates)": (
            c.Decoder, frozen_with(max_autotune=True, max_autotune_gemm_backends="TRITON,ATEN"), FUSED),
    }


def run_compiled(model, prompt, n, device, rounds, cls, make_step, attention):
    """Decode with a Decoder of class cls whose step is make_step() (None: the library's own)."""
    torch.compiler.reset()
    utils.attention.fused_attention = attention
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    d = cls(device.type, weights, model.output.weight.dtype)
    if make_step is not None:
        d.step = make_step()
    utils.decode._decoders[model] = d
    try:
        t = time.perf_counter()
        generate(model, prompt, n, temperature=0, compile=True)
        sync(device)
        first = time.perf_counter() - t
        seconds, out = timed(lambda: generate(model, prompt, n, temperature=0, compile=True), device, rounds)
        step_ms = time_steps(model, d, prompt, device)
        return first, seconds, out, step_ms
    finally:
        utils.attention.fused_attention = FUSED


def time_steps(model, d, prompt, device, steps: int = 100) -> float:
    """Milliseconds per call of the compiled step alone, replayed back to back (no sampling, no Python loop
    work besides the call): what the generate loop adds is the rest."""
    tok = prompt[:, -1:].clone()  # contiguous, as generate's tokens are: other strides would compile again
    with torch.inference_mode():
        d.attach(model, 1, prompt.shape[1] + steps + 1)
        d(model, tok, prompt.shape[1])
        sync(device)
        t = time.perf_counter()
        for i in range(steps):
            d(model, tok, prompt.shape[1] + i, check_guards=False)
        sync(device)
    model.clear_cache()
    return (time.perf_counter() - t) / steps * 1e3


# ---- eager: profile and variants ---------------------------------------------------------------------

def profile_step(forward, device) -> dict:
    """Kernels launched and host milliseconds of one decode step (after warm-up), with the top host ops."""
    from torch.profiler import ProfilerActivity, profile

    forward()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        forward()
        sync(device)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"kernels": kernels,
            "top host ops (self us, count)": [(e.key, round(e.self_cpu_time_total), e.count) for e in top]}


def eager_forwards(model, hf, prompt):
    """One decode step of each, after a 16-token prefill into a fresh cache."""
    from transformers import DynamicCache

    def ours():
        with torch.inference_mode():
            model.setup_cache(1, 64)
            model(prompt, start_pos=0)
            return torch.inference_mode()(lambda: model(prompt[:, :1], start_pos=prompt.shape[1]))

    def theirs():
        with torch.inference_mode():
            cache = DynamicCache()
            hf(input_ids=prompt, past_key_values=cache, use_cache=True)
            return torch.inference_mode()(lambda: hf(input_ids=prompt[:, :1], past_key_values=cache,
                                                     use_cache=True))
    return ours, theirs


def without_dropout_modules(model):
    """nn.Dropout(0) does nothing but still costs a module call: 61 per token for 30 layers."""
    for m in list(model.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, torch.nn.Dropout):
                setattr(m, name, torch.nn.Identity())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="135M")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip", default="", help="comma-separated compiled variants to skip (1-7; 4 compiled for over "
                   "2 minutes on an H200 without finishing)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = Llama(SHAPES[args.shape]).to(device, dtype).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    n, results = args.tokens, {}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.shape}, {args.dtype}, {name}, torch {torch.__version__}, {n} greedy tokens, median of "
          f"{args.rounds} rounds", flush=True)

    def row(key, seconds, out, first=None, step_ms=None):
        same = first_difference(out[:, -n:], ref[:, -n:])
        results[key] = dict(tok_s=n / seconds, first_call_s=first, step_ms=step_ms, tokens=same)
        extra = (f", first call {first:.1f} s" if first else "") + (f", step alone {step_ms:.3f} ms" if step_ms else "")
        print(f"{key}: {n / seconds:.1f} tok/s ({same} with ours eager{extra})", flush=True)

    seconds, ref = timed(lambda: generate(model, prompt, n, temperature=0), device, args.rounds)
    row("ours eager", seconds, ref)
    hf = hf_twin(model)
    seconds, out = timed(lambda: hf_decode(hf, prompt, n), device, args.rounds)
    row("Hugging Face eager (DynamicCache)", seconds, torch.cat([prompt, out], 1))
    ours_fwd, hf_fwd = eager_forwards(model, hf, prompt)
    for key, make in (("ours", ours_fwd), ("HF", hf_fwd)):
        prof = profile_step(make(), device)
        results[f"profile {key}"] = prof
        print(f"profile of one eager decode step, {key}: {json.dumps(prof)}", flush=True)
    model.clear_cache()

    plain_norm = utils.norm.RMSNorm.forward
    utils.norm.RMSNorm.forward = lambda self, x: F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
    seconds, out = timed(lambda: generate(model, prompt, n, temperature=0), device, args.rounds)
    row("ours eager, F.rms_norm (experiment)", seconds, out)
    utils.norm.RMSNorm.forward = plain_norm

    # HF against ours on the same weights in fp32 (copies): is a bf16 difference rounding, or a real one?
    hf = None  # free its memory before the fp32 copies
    model32 = copy.deepcopy(model).float()
    hf32 = hf_twin(model32)
    ours32 = generate(model32, prompt, n, temperature=0)[:, -n:]
    theirs32 = hf_decode(hf32, prompt, n)
    with torch.inference_mode():
        gap = (model32(prompt)[0] - hf32(input_ids=prompt).logits[0].float()).abs().max().item()
    results["fp32 HF vs ours"] = dict(tokens=first_difference(theirs32, ours32), max_logit_gap=gap)
    print(f"fp32, HF's greedy tokens against ours: {first_difference(theirs32, ours32)}; prompt logits "
          f"{gap:.2e} apart at most", flush=True)
    model32 = hf32 = None

    for i, (key, (cls, make_step, attention)) in enumerate(compiled_variants(device).items(), 1):
        if str(i) in args.skip.split(","):
            continue
        counters.clear()
        try:
            first, seconds, out, step_ms = run_compiled(model, prompt, n, device, args.rounds, cls, make_step,
                                                        attention)
            row(key, seconds, out, first, step_ms)
            if counters["inductor"]["decompose_mm"]:
                print(f"  matrix products written as reductions: {counters['inductor']['decompose_mm']}", flush=True)
        except Exception as e:  # a variant that fails must not cost the others their numbers
            results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{key}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)

    torch.compiler.reset()
    without_dropout_modules(model)
    seconds, out = timed(lambda: generate(model, prompt, n, temperature=0), device, args.rounds)
    row("ours eager, no Dropout modules (experiment)", seconds, out)

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
