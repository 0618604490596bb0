"""Command line: `python -m utils train ...`, `generate ...` and `chat ...` (`--help` on each)."""

import argparse
import os
import sys
from dataclasses import fields
from typing import get_args

import torch

from .chat import add_chat_parser, run_chat
from .train import TrainConfig

TRAIN_HELP = {
    "dataset": "text source: tinyshakespeare, tinystories, hf:<owner>/<name>[:column[:split]], an http(s) URL, "
               "or a local .txt/.md/.jsonl/.json/.csv/.parquet file or folder of .txt files",
    "tokenizer": "char, bpe:<vocab_size> (trained on the training split), or a tiktoken encoding (gpt2, "
                 "cl100k_base, o200k_base)",
    "preset": "model shape to start from (see utils.model.PRESETS): smoke, tiny, small, ...",
    "dim": "width of the residual stream (overrides the preset)",
    "n_layers": "number of transformer blocks (overrides the preset)",
    "n_heads": "number of query heads (overrides the preset)",
    "n_kv_heads": "number of key/value heads; must divide n_heads (overrides the preset)",
    "init_std": "std of the normal initial weights (overrides the preset; tiny uses 0.04, the others 0.02)",
    "dropout": "dropout probability on attention and residual branches",
    "tie_embeddings": "share one matrix between the token embedding and the output layer",
    "block_size": "training context length in tokens (also the model's max_seq_len)",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "max_steps": "stop after this many optimizer steps (and the cosine schedule ends here)",
    "max_seconds": "stop after this many seconds of training, whichever comes first; the schedule then "
                   "follows the clock",
    "lr": "peak learning rate",
    "min_lr_ratio": "the cosine schedule decays to lr * min_lr_ratio",
    "warmup_steps": "steps of linear warmup",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this value",
    "eval_interval": "validate and write a checkpoint every this many steps",
    "eval_windows": "validation windows used during training (the final evaluation uses the whole split)",
    "device": "auto (cuda, then mps, then cpu), or a device such as cpu, cuda, cuda:1, mps",
    "dtype": "auto (bf16 where the hardware has it: GPUs since Ampere, CPUs with AMX; fp16 + loss scaling on "
             "older GPUs; else fp32), fp32, bf16, fp16",
    "compile": "compile the model with torch.compile (faster on recent GPUs, slow to start)",
    "seed": "random seed for initialisation, batches and dropout",
    "out_dir": "folder for ckpt.pt, the tokenizer and metrics.json",
    "progress": "show a progress bar",
}


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (dashes for underscores; --out for out_dir)."""
    for f in fields(TrainConfig):
        flag = "--out" if f.name == "out_dir" else "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=TRAIN_HELP[f.name])
            continue
        kind = f.type if f.type in (int, float, str) else next(a for a in get_args(f.type) if a is not type(None))
        p.add_argument(flag, dest=f.name, type=kind, default=f.default, metavar=f.name.upper(),
                       help=TRAIN_HELP[f.name])


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils", description="Train a LLaMA-2 model and sample from it.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model; writes ckpt.pt and metrics.json into --out",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_flags(t)
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    t.add_argument("--sample-tokens", type=int, default=200, help="tokens of sample text printed at the end")
    g = sub.add_parser("generate", help="stream text from a checkpoint")
    g.add_argument("--checkpoint", required=True,
                   help="a folder written by `train`, a Hugging Face/Meta/llama2.c checkpoint, or a hub id")
    g.add_argument("--prompt", default="", help="text to continue (empty: start from the end-of-text token)")
    g.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more random")
    g.add_argument("--top-k", type=positive_int, default=None, help="sample only from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this much mass")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    add_chat_parser(sub)  # utils/chat.py
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "chat":
            return run_chat(args)
        return run_generate(args)
    except (ValueError, FileNotFoundError, ConnectionError, FloatingPointError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_train(args) -> int:
    from .generate import generate
    from .train import load_model, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    metrics = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 reports
        return 0
    print(f"\nsteps {metrics['steps']}  tokens {metrics['tokens_seen']:,}  {metrics['wall_seconds']:.0f} s  "
          f"{metrics['tokens_per_second']:,.0f} tok/s  val {metrics['val_loss']:.3f} nats/token  "
          f"{metrics['val_loss_per_char']:.3f} nats/char")
    print(f"saved {cfg.out_dir}/ckpt.pt and {cfg.out_dir}/metrics.json")
    if args.sample_tokens > 0:
        model, tok = load_model(cfg.out_dir)
        start = torch.tensor([tok.encode("\n")[-1:] or [0]], dtype=torch.long)
        n = min(args.sample_tokens, model.config.max_seq_len - 1)
        out = generate(model, start, n, temperature=0.8, top_k=200, generator=torch.Generator().manual_seed(0))
        print("\n--- sample ---\n" + tok.decode(out[0].tolist()))
    return 0


def load_for_generation(path: str, device: torch.device):
    """(model, tokenizer) from our training folder or any format `load_pretrained` reads."""
    from .checkpoints import detect_format, load_pretrained, load_pretrained_tokenizer
    from .train import load_model

    if detect_format(path) == "ours":
        return load_model(path, device=device)
    model = load_pretrained(path, device=device)
    tok = load_pretrained_tokenizer(path)
    if tok is None:
        raise FileNotFoundError(f"{path} ships no tokenizer (tokenizer.json or tokenizer.model): "
                                "copy the model's tokenizer file next to its weights")
    return model, tok


def run_generate(args) -> int:
    from .generate import stream
    from .train import pick_device

    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    device = pick_device(args.device)
    model, tok = load_for_generation(args.checkpoint, device)
    start = getattr(tok, "bos_id", None)  # Meta's tokenizers start from BOS, ours from end-of-text
    start = start if start is not None and start >= 0 else (tok.eot_id if tok.eot_id is not None else 0)
    ids = tok.encode(args.prompt) if args.prompt else [start]
    if len(ids) >= model.config.max_seq_len:
        raise ValueError(f"the prompt is {len(ids)} tokens but the model's context is {model.config.max_seq_len}: "
                         "shorten the prompt")
    n = min(args.max_new_tokens, model.config.max_seq_len - len(ids))
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    print(args.prompt, end="", flush=True)
    # Decode prompt + new tokens together and print what is new: SentencePiece drops the leading
    # space of a sequence's first piece, so decoding the new tokens alone would glue words together.
    context = ids if args.prompt else []
    new: list[int] = []
    shown = tok.decode(context) if context else ""
    stops = getattr(tok, "eos_ids", None) or ({tok.eot_id} if tok.eot_id is not None else None)  # GGUF: several
    for token in stream(model, prompt, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        stop_token=stops, generator=gen):
        if stops and token.item() in stops:
            break
        new.append(token.item())
        text = tok.decode(context + new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tok.decode(context + new)[len(shown):])
    return 0


if __name__ == "__main__":
    sys.exit(main())
