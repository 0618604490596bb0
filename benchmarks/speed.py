"""How fast are we? Training against Hugging Face's Llama, decoding against the memory-bandwidth limit.

1. Training: the same shape and the same weights in our `Llama` and in transformers'
   `LlamaForCausalLM`; forward + backward + AdamW, timed in alternation (A, B, A, B, ...) so load
   on a shared machine hits both alike. Reported as tokens/s and as ours / HF.
2. Decoding: tokens/s with and without the KV cache, and the ceiling set by memory bandwidth:
   every decode step must read every weight once, so tokens/s <= bandwidth / bytes of weights.

    python benchmarks/speed.py                  # CPU, small shapes
    python benchmarks/speed.py --device cuda --dtype bf16 --dim 1024 --n-layers 12
"""

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.generate import generate  # noqa: E402
from utils.hf import from_hf  # noqa: E402
from utils.model import Llama, LlamaConfig  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_fn(model, opt, tokens, hf: bool, autocast=None):
    """A closure running one fwd + bwd + optimizer step on `tokens` (B, T+1), under `autocast` if given."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = autocast or contextlib.nullcontext

    def step():
        with autocast():
            logits = model(input_ids=x).logits if hf else model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_alternating(fns: dict, repeats: int, device, warmup: bool = True) -> dict:
    """Median seconds per call of each fn, calls interleaved so noise hits all of them alike."""
    times = {k: [] for k in fns}
    for fn in fns.values() if warmup else ():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_training(cfg: LlamaConfig, batch: int, seq: int, device, dtype, repeats: int,
                   autocast: torch.dtype | None = None) -> None:
    """dtype: the weights' dtype; autocast: also run the step under torch.autocast(autocast), as the trainer
    does when it picks bf16 (fp32 weights, bf16 matmuls)."""
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).train()
    ours = from_hf(hf).train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    fused = device.type in ("cuda", "cpu")
    amp = functools.partial(torch.autocast, device.type, dtype=autocast) if autocast else None
    fns = {
        "ours": train_step_fn(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=fused), tokens, False, amp),
        "hf": train_step_fn(hf, torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=fused), tokens, True, amp),
    }
    t = time_alternating(fns, repeats, device)
    n = batch * seq
    print("| training step | tokens/s | ms/step |\n|---|---|---|")
    for k, v in t.items():
        print(f"| {k} | {n / v:,.0f} | {v * 1e3:.1f} |")
    how = f"{dtype} weights" + (f", {autocast} autocast" if autocast else "")
    print(f"\nours / HF tokens per second: **{t['hf'] / t['ours']:.2f}x** (batch {batch}, seq {seq}, {how})\n")


def bandwidth_gbs(device, n_bytes: int = 1024 * 2**20) -> float:
    """Read bandwidth of this machine: median of 7 sums over a buffer far larger than the caches."""
    x = torch.ones(n_bytes // 4, device=device)
    times = []
    for _ in range(8):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t)
    return n_bytes / statistics.median(times[1:]) / 1e9


def bench_decode(cfg: LlamaConfig, new_tokens: int, device, dtype) -> None:
    model = Llama(cfg).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - model.tok_embeddings.weight.nbytes
    rows = []
    for use_cache in (True, False):
        generate(model, prompt, 4, temperature=0, use_cache=use_cache)  # warm-up
        sync(device)
        t = time.perf_counter()
        generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
        sync(device)
        rows.append((use_cache, new_tokens / (time.perf_counter() - t)))
    bw = bandwidth_gbs(device)
    limit = bw * 1e9 / weight_bytes
    print(f"| decode ({new_tokens} tokens, batch 1) | tokens/s | of the bandwidth limit |\n|---|---|---|")
    for use_cache, tps in rows:
        print(f"| {'with' if use_cache else 'without'} KV cache | {tps:,.0f} | {tps / limit:.0%} |")
    print(f"\nweights read per token: {weight_bytes / 2**20:.1f} MiB; measured bandwidth {bw:.1f} GB/s "
          f"-> limit {limit:,.0f} tokens/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--autocast", default=None, choices=["bf16", "fp16"],
                   help="fp32 weights, matmuls under torch.autocast in this dtype (what the trainer does)")
    p.add_argument("--no-decode", dest="decode", action="store_false", help="training only")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = LlamaConfig(vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=args.n_kv_heads, max_seq_len=max(args.seq, args.new_tokens + 16))
    print(f"device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, shape {cfg}\n")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast]
    bench_training(cfg, args.batch, args.seq, device, dtype, args.repeats, amp)
    if args.decode:
        bench_decode(cfg, args.new_tokens, device, dtype)


if __name__ == "__main__":
    main()
