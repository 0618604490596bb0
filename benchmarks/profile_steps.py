"""Where the time of one decode step and one training step goes, from torch.profiler.

Each PyTorch operator's own time is put in a bucket (matmuls, attention, the small elementwise ops
of norms/RoPE/SwiGLU/residuals, the optimizer, the compiled graph when there is one); what the
operators do not account for is Python and dispatch overhead: wall time minus their sum.

    python benchmarks/profile_steps.py                 # decode (plain and compiled), 11M shape, fp32
    python benchmarks/profile_steps.py --train         # training step, nanoGPT-CPU shape and 11M shape
    python benchmarks/profile_steps.py --train --keep-freed-memory   # as the trainer runs on a CPU
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.decode import decoder  # noqa: E402
from utils.device import keep_freed_memory  # noqa: E402
from utils.model import Llama, LlamaConfig  # noqa: E402

BUCKETS = [  # (bucket, substrings of operator names), first match wins
    ("compiled graph (all of its kernels)", ("CompiledFxGraph",)),
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "mkl", "mkldnn", "aten::linear")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("optimizer (fused AdamW)", ("adam",)),
    ("embedding, loss, argmax", ("embedding", "cross_entropy", "nll_loss", "log_softmax", "argmax")),
    ("elementwise (norms, RoPE, SwiGLU, residual adds, casts, copies)", ("aten::",)),
]

SHAPES = {
    "nanoGPT-CPU": (LlamaConfig(vocab_size=65, dim=128, n_layers=4, n_heads=4, max_seq_len=64), 12, 64),
    "11M": (LlamaConfig(vocab_size=2048, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=1024), 16, 256),
}


def bucket_table(run, n: int, title: str) -> None:
    """Profile n calls of run(); print milliseconds per call by bucket."""
    run()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(n):
            run()
        wall = (time.perf_counter() - t) / n * 1e3
    totals = {name: 0.0 for name, _ in BUCKETS}
    for evt in prof.key_averages():
        for name, keys in BUCKETS:
            if any(k in evt.key for k in keys):
                totals[name] += evt.self_cpu_time_total / 1e3 / n
                break
    overhead = max(wall - sum(totals.values()), 0.0)  # shares are of the profiled wall time
    print(f"\n{title}: {wall:.2f} ms per call under the profiler\n\n| where | ms | share |\n|---|---|---|")
    for name, ms in [*totals.items(), ("Python and dispatch overhead (the rest)", overhead)]:
        if ms > 0.005:
            print(f"| {name} | {ms:.2f} | {ms / wall:.0%} |")


def decode(shape: str, dtype: torch.dtype) -> None:
    cfg = SHAPES[shape][0]
    model = Llama(cfg).to(dtype).eval()
    token = torch.tensor([[1]])
    with torch.inference_mode():
        step = decoder(model)
        step.attach(model, 1, 256)
        model(torch.randint(0, cfg.vocab_size, (1, 128)))
        pos = iter(range(128, 10**9))
        bucket_table(lambda: model(token, start_pos=next(pos) % 200 + 50)[:, -1].argmax(-1), 100,
                     f"decode step, plain forward ({shape}, {dtype})")
        step(model, token, 128)
        bucket_table(lambda: step(model, token, next(pos) % 200 + 50).argmax(-1), 100,
                     f"decode step, compiled (utils/decode.py; {shape}, {dtype})")
        model.clear_cache()


def train(shape: str, autocast: bool) -> None:
    cfg, batch, seq = SHAPES[shape]
    model = Llama(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    bucket_table(step, 10 if shape == "nanoGPT-CPU" else 3,
                 f"training step ({shape}, batch {batch} x {seq}, {'bf16 autocast' if autocast else 'fp32'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="profile training steps instead of decode steps")
    p.add_argument("--shape", choices=SHAPES, default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: weights (decode), autocast (train)")
    p.add_argument("--keep-freed-memory", action="store_true", help="utils.device.keep_freed_memory() first")
    args = p.parse_args()
    kept = args.keep_freed_memory and keep_freed_memory()
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, freed memory kept by glibc: {kept}")
    if args.train:
        for shape in [args.shape] if args.shape else list(SHAPES):
            train(shape, autocast=args.dtype == "bf16")
    else:
        decode(args.shape or "11M", {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])


if __name__ == "__main__":
    main()
