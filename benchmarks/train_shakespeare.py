"""Which tokenizer, model size and learning rate train best in a fixed wall-clock budget?

Every configuration gets the same number of seconds on Tiny Shakespeare (nanoGPT's CPU recipe
takes about 150 s on our 2-core CI machine and reaches 1.89 nats per character), and is scored by
validation loss in nats per *character*, so different tokenizers compare honestly. Runs go one
after another in fresh processes; the table is printed as markdown.

    python benchmarks/train_shakespeare.py                   # the full grid, 150 s a run
    python benchmarks/train_shakespeare.py --seconds 20 --only "bpe:2048 tiny 3e-3"
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (tokenizer, preset, lr, extra flags)
GRID = [
    ("char", "tiny", 3e-3, []),
    ("bpe:1024", "tiny", 3e-3, []),
    ("bpe:2048", "tiny", 3e-3, []),
    ("bpe:4096", "tiny", 3e-3, []),
    ("bpe:2048", "tiny", 1e-3, []),
    ("bpe:2048", "tiny", 6e-3, []),
    ("bpe:2048", "small", 3e-3, []),
    ("bpe:2048", "small", 1e-3, []),
    ("bpe:4096", "small", 3e-3, []),
]
COMMON = ["--block-size", "128", "--batch-size", "32", "--eval-interval", "100000", "--warmup-steps", "50",
          "--no-progress", "--sample-tokens", "0"]


def run(tokenizer: str, preset: str, lr: float, extra: list[str], seconds: float) -> dict:
    """Train one configuration for `seconds` in a fresh process; return its metrics.json."""
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    cmd = [sys.executable, "-m", "utils", "train", "--tokenizer", tokenizer, "--preset", preset, "--lr", str(lr),
           "--max-steps", "1000000", "--max-seconds", str(seconds), "--out", str(out), *COMMON, *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=150.0, help="training budget of each run")
    p.add_argument("--only", action="append", help='run only "TOKENIZER PRESET LR" (repeatable)')
    args = p.parse_args()
    grid = [g for g in GRID if not args.only or f"{g[0]} {g[1]} {g[2]:g}" in args.only]
    print(f"torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}, budget {args.seconds:g} s a run\n")
    print("| tokenizer | preset | params | lr | steps | tokens seen | tok/s | val nats/token | val nats/char |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tokenizer, preset, lr, extra in grid:
        t0 = time.time()
        m = run(tokenizer, preset, lr, extra, args.seconds)
        print(f"| {tokenizer} | {preset} | {m['params'] / 1e6:.2f}M | {lr:g} | {m['steps']} | {m['tokens_seen']:,} | "
              f"{m['tokens_per_second']:,.0f} | {m['val_loss']:.3f} | **{m['val_loss_per_char']:.3f}** |", flush=True)
        print(f"<!-- {time.time() - t0:.0f} s wall including data preparation and the final evaluation -->",
              file=sys.stderr)


if __name__ == "__main__":
    main()
