"""A finetune's starting point, checked independently: `init_val_loss_per_char` against transformers.

    python benchmarks/finetune_check.py runs/ft

Reads the run folder's metrics.json (what the trainer measured before its first step) and recomputes the
same number with Hugging Face transformers' own Llama on the same text and windows: the run's validation
split, cut by the run's tokenizer into the trainer's non-overlapping windows of max_seq_len tokens, the
summed next-token loss divided by the split's characters. The model comes from the run's --init-from
checkpoint (a GGUF file through transformers' GGUF loader, or an HF folder). Prints both and their ratio.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data import prepare_data, windows_at  # noqa: E402
from utils.runs import METRICS_FILE  # noqa: E402
from utils.tokenizer import load_tokenizer  # noqa: E402
from utils.train import per_char, val_windows  # noqa: E402


def hf_model(init_from: str):
    """transformers' LlamaForCausalLM for the checkpoint the run started from (a GGUF is dequantized to float32)."""
    import transformers

    path = Path(init_from)
    if path.suffix == ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()  # dequantized
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_val_loss_per_char(run: Path, batch_size: int = 8) -> tuple[float, int, torch.dtype]:
    """(nats per character of the run's validation split under transformers' model, tokens scored, its dtype)."""
    cfg = json.loads((run / METRICS_FILE).read_text())["train_config"]
    data = prepare_data(cfg["dataset"], load_tokenizer(run))
    T = cfg["max_seq_len"]
    model = hf_model(cfg["init_from"])
    starts = val_windows(len(data.val), T)
    total, scored = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = windows_at(data.val, starts[i:i + batch_size], T, "cpu")
        logits = model(x).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        scored += y.numel()
    return per_char(total, scored, len(data.val), data.val_chars), scored, next(model.parameters()).dtype


def main(run_dir: str) -> None:
    run = Path(run_dir)
    metrics = json.loads((run / METRICS_FILE).read_text())
    if not metrics["train_config"].get("init_from"):
        raise SystemExit(f"{run} is not a finetune (no init_from): nothing to check against transformers")
    t0 = time.perf_counter()
    theirs, scored, dtype = hf_val_loss_per_char(run)
    ours = metrics["init_val_loss_per_char"]
    dtype, seconds = str(dtype).removeprefix("torch."), time.perf_counter() - t0
    print(f"{run}: init_val_loss_per_char {ours:.4f} (trainer, {metrics['dtype']}) vs {theirs:.4f} (transformers, "
          f"{dtype}) on {scored:,} tokens: ratio {ours / theirs:.4f} ({seconds:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/finetune_check.py RUN_DIR   (a run trained with --init-from)")
    main(sys.argv[1])
