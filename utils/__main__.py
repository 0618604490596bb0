"""Command line: `python -m utils train ...`, `generate ...`, `chat ...` and `export ...` (`--help` on each).

Only `train` imports the trainer: generating text needs the model, the checkpoints and the sampler.
"""

import argparse
import os
import shlex
import signal
import sys
import tempfile
import traceback
from dataclasses import fields
from pathlib import Path
from typing import get_args

import torch

from .chat import run_chat


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (dashes for underscores; --out for out_dir), its help from the field.

    A flag not typed leaves no attribute (argparse.SUPPRESS), so `run_train` knows which were typed: a
    resume hears each of them, even one typed with its default value.
    """
    from .runs import flag
    from .train import TrainConfig

    aliases = {"max_seq_len": ["--block-size"]}  # nanoGPT's name works too
    for f in fields(TrainConfig):
        flags = [flag(f.name), *aliases.get(f.name, [])]
        shown = "" if f.default is None else f" (default: {f.default})".replace("%", "%%")
        if f.type in (bool, "bool"):
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f.metadata["help"] + shown)
            continue
        kind = f.type if f.type in (int, float, str) else next(a for a in get_args(f.type) if a is not type(None))
        p.add_argument(*flags, dest=f.name, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                       help=f.metadata["help"] + shown)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_sampling_flags(p: argparse.ArgumentParser, *, temperature: float, top_p: float | None,
                       max_new_tokens: int | None, length: str) -> None:
    """The flags `generate` and `chat` share: how many tokens, how to pick them, where and how to run.
    Each help names its default once (the commands differ in a few)."""
    default = " (default: %(default)s)"
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help=length)
    p.add_argument("--temperature", type=float, default=temperature,
                   help="0 is greedy; higher is more random" + default)
    p.add_argument("--top-k", type=positive_int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=top_p, help="sample from the smallest set with this much mass"
                   + (default if top_p is not None else ""))
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps" + default)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default: the checkpoint's; GGUF files are dequantized to float32); with "
                        "--quantize, the activations' (then bfloat16 unless given)")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8: the weight matrices stored as int8, one scale per output channel, read by torch's int8 "
                        "kernel (utils/quantize.py): half the bytes of bf16 per token")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile; CUDA graphs on a GPU): the first tokens wait for the "
                        "compiler, seconds to minutes; every token after is faster (benchmarks/RESULTS.md)")


def build_parser(command: str | None = "train") -> argparse.ArgumentParser:
    """The parser; the train command's flags only when `command` is train (they import the trainer)."""
    parser = argparse.ArgumentParser(prog="python -m utils", description="Train a LLaMA-2 model and sample from it.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model; writes ckpt.pt and metrics.json into --out", parents=[common])
    if command == "train":
        add_train_flags(t)
    t.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out exactly where it stopped, with its settings")
    t.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a run (replaced when this one first saves)")
    t.add_argument("--sample-tokens", type=int, default=None,
                   help="tokens of sample text printed at the end; 0: none; None: 200, or what the context allows")
    g = sub.add_parser("generate", help="stream text from a checkpoint", parents=[common])
    g.add_argument("--checkpoint", required=True,
                   help="a folder written by `train`, a Hugging Face/Meta/llama2.c checkpoint, or a hub id")
    g.add_argument("--prompt", default="", help="text to continue (empty: start from the end-of-text token)")
    add_sampling_flags(g, temperature=0.8, top_p=None, max_new_tokens=None,
                       length="tokens to generate (default: 200, or fewer if the model's context ends sooner)")
    c = sub.add_parser("chat", help="chat with an instruction-tuned model through its chat template (utils/chat.py)",
                       parents=[common])
    c.add_argument("--checkpoint", required=True,
                   help="a .gguf file, a Hugging Face folder with a chat template, a hub id, or a run folder "
                        "finetuned from a chat model")
    c.add_argument("--message", default=None, help="answer this one message and exit (default: interactive)")
    c.add_argument("--system", default=None, help="a system message (default: the template's own, if any)")
    add_sampling_flags(c, temperature=0.7, top_p=0.9, max_new_tokens=256,
                       length="longest reply, in tokens (at most half the model's context; default: %(default)s)")
    r = sub.add_parser("report", help="one markdown table row per run folder, from its metrics.json", parents=[common])
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by `train`")
    r.add_argument("--no-header", dest="header", action="store_false", help="rows only, to append to a table")
    from .export import add_export_parser  # utils/export.py: --format gguf|hf
    add_export_parser(sub)
    return parser


# mistakes the user can fix: one line, exit code 2 (anything else is a bug: one line and a traceback file)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConnectionError, FloatingPointError, ImportError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "chat":
            return run_chat(args)
        if args.command == "report":
            from .report import report_rows
            print(report_rows(args.run_dirs, header=args.header))
            return 0
        if args.command == "export":
            from .export import run_export
            return run_export(args)
        return run_generate(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        path = Path(tempfile.gettempdir()) / f"llama-utils-error-{os.getpid()}.txt"
        path.write_text(traceback.format_exc())
        what = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
        print(f"error: unexpected {what} (a bug: the full traceback is in {path}, or rerun with --debug; please "
              "report it)", file=sys.stderr)
        return 1


def new_tokens(asked: int | None, context: int, used: int, what: str = "--max-new-tokens") -> int:
    """How many tokens fit after `used` in a context of `context`: `asked`, else 200; a note on stderr if cut."""
    room = context - used
    if asked is not None and asked > room:
        print(f"note: the model's context is {context} tokens and {used} are used, so it generates {max(room, 0)} "
              f"new tokens, not {what} {asked}", file=sys.stderr)
    return max(min(200 if asked is None else asked, room), 1)  # stream() explains when not even 1 fits


def resume_command(out_dir: str) -> str:
    """The command line that continues a run: its checkpoint holds every other setting."""
    launcher = ["torchrun", f"--nproc_per_node={os.environ['WORLD_SIZE']}", "-m"] if "WORLD_SIZE" in os.environ else \
        ["python", "-m"]
    return shlex.join([*launcher, "utils", "train", "--out", out_dir, "--resume"])


def run_train(args) -> int:
    from .checkpoints import load_model
    from .finetune import finetune_config
    from .generate import generate
    from .runs import CKPT_FILE, finished_run
    from .train import TrainConfig, train

    given = {f.name for f in fields(TrainConfig) if hasattr(args, f.name)}  # the flags typed
    cfg = TrainConfig(**{name: getattr(args, name) for name in given})
    if not args.resume:  # --init-from: shape and tokenizer from the checkpoint, the defaults of a finetune
        cfg = finetune_config(cfg, given)
    done = None if args.resume or args.overwrite else finished_run(cfg)
    if done is not None:  # the same command again: the one-liner goes on to `generate`
        if int(os.environ.get("RANK", 0)) == 0:
            further = "--max-seconds S" if done["steps"] < cfg.max_steps else "--max-steps N"  # what stopped it
            print(f"already trained (val {done['val_loss_per_char']:.3f} nats/char, {done['steps']} steps) in "
                  f"{cfg.out_dir}: nothing to do (train further: --resume {further}; start again: --overwrite)")
        return 0
    try:
        metrics = train(cfg, resume=args.resume, overwrite=args.overwrite, given=given)
    except KeyboardInterrupt:
        ckpt = Path(cfg.out_dir) / CKPT_FILE
        kept = f"{ckpt} holds the last completed save" if ckpt.exists() else "no checkpoint was saved yet"
        print(f"\nstopped at once (Ctrl-C): {kept}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 reports
        return 0
    if metrics["interrupted"]:
        print(f"resume with: {resume_command(cfg.out_dir)}")
        return 128 + signal.Signals[metrics["stop_signal"]]
    print(f"\nsteps {metrics['steps']}  tokens {metrics['tokens_seen']:,}  {metrics['wall_seconds']:.0f} s  "
          f"{metrics['tokens_per_second']:,.0f} tok/s  val {metrics['val_loss']:.3f} nats/token  "
          f"{metrics['val_loss_per_char']:.3f} nats/char")
    print(f"saved {cfg.out_dir}/ckpt.pt and {cfg.out_dir}/metrics.json")
    if args.sample_tokens is None or args.sample_tokens > 0:
        model, tok = load_model(cfg.out_dir)
        start = torch.tensor([tok.encode("\n")[-1:] or [0]], dtype=torch.long)
        n = new_tokens(args.sample_tokens, model.config.max_seq_len, 1, "--sample-tokens")
        out = generate(model, start, n, temperature=0.8, top_k=200, generator=torch.Generator().manual_seed(0))
        print("\n--- sample ---\n" + tok.decode(out[0].tolist()))
    return 0


def load_for_generation(path: str, device: torch.device, dtype: str | None = None, quantize: str | None = None):
    """(model, tokenizer) from our training folder or any format `load_pretrained` reads; quantize="int8":
    its matrices as int8 (utils/quantize.py), activations in dtype (default bfloat16)."""
    from .checkpoints import load_pretrained, load_pretrained_tokenizer, resolve
    from .tokenizer import load_tokenizer

    checkpoint = resolve(path)  # the format, found once
    model = load_pretrained(checkpoint, device=device, dtype=None if quantize else dtype)
    if quantize:  # from the checkpoint's own weights (a GGUF's dequantized to float32)
        from .quantize import quantize_int8
        model = quantize_int8(model, dtype or "bfloat16")
    if checkpoint.fmt == "ours":
        # a run folder, or the ckpt.pt in one: the tokenizer is beside it
        return model, load_tokenizer(checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent)
    tok = load_pretrained_tokenizer(checkpoint)
    if tok is None:
        raise FileNotFoundError(f"{path} ships no tokenizer (tokenizer.json or tokenizer.model): "
                                "copy the model's tokenizer file next to its weights")
    return model, tok


def run_generate(args) -> int:
    from .device import pick_device
    from .generate import check_sampling, print_stream, stream

    check_sampling(args.temperature, args.top_k, args.top_p)  # before the model loads
    device = pick_device(args.device)
    model, tok = load_for_generation(args.checkpoint, device, args.dtype, args.quantize)
    start = getattr(tok, "bos_id", None)  # Meta's tokenizers start from BOS, ours from end-of-text
    start = start if start is not None and start >= 0 else (tok.eot_id if tok.eot_id is not None else 0)
    ids = tok.encode(args.prompt) if args.prompt else [start]
    n = new_tokens(args.max_new_tokens, model.config.max_seq_len, len(ids))
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    if args.compile:
        from .decode import compile_note
        print(compile_note(model), file=sys.stderr)
    print(args.prompt, end="", flush=True)
    stops = getattr(tok, "eos_ids", None) or ({tok.eot_id} if tok.eot_id is not None else set())  # GGUF: several
    tokens = stream(model, prompt, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    stop_token=stops or None, generator=gen, compile=args.compile)
    print_stream(tok, tokens, stops, context=ids if args.prompt else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
