"""Chat with an instruction-tuned model through its chat template.

    python -m utils chat --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf            # interactive; Ctrl-D quits
    python -m utils chat --checkpoint TinyLlama/TinyLlama-1.1B-Chat-v1.0 --message "Hi" --temperature 0

A chat model was fine-tuned on conversations written with role markers, such as SmolLM2's
"<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n", and answers well only when prompted the
same way. The markers come from a Jinja template shipped with the model: `tokenizer.chat_template` in a
GGUF's metadata, `chat_template` in an HF folder's tokenizer_config.json, or chat_template.jinja.
`render_chat` runs it as transformers' `apply_chat_template` does; the reply ends at an end-of-turn id.
"""

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=8)
def _compile(template: str):
    """A chat template compiled as transformers compiles it: sandboxed (templates are code from the internet),
    trim_blocks and lstrip_blocks, loop controls, raise_exception, a tojson that keeps non-ASCII text."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat templates need jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **special) -> str:
    """The prompt text for messages [{"role": "system" | "user" | "assistant", "content": str}, ...].

    add_generation_prompt appends the opening of the assistant's turn; `special` are the token strings a
    template may print (bos_token="<s>", eos_token="</s>").
    """
    import jinja2

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template refused these messages: {e}") from e


# ---- where the template comes from --------------------------------------------------------------------

def _token_text(token) -> str | None:
    """tokenizer_config.json writes a special token as "<s>" or as {"content": "<s>", ...}."""
    return token.get("content") if isinstance(token, dict) else token


def hf_chat_template(directory: Path) -> tuple[str | None, dict[str, str]]:
    """(template, special token strings) from an HF folder: tokenizer_config.json, else chat_template.jinja."""
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    special = {k: _token_text(config.get(k)) or "" for k in ("bos_token", "eos_token")}
    return template, special


def load_chat_template(path: str | Path, tokenizer) -> tuple[str | None, dict[str, str]]:
    """The model's chat template and the special tokens it prints, or (None, {}) if it has none.

    A GGUF's template came with its tokenizer (GGUFTokenizer.chat_template); an HF folder or hub id has it
    in tokenizer_config.json or chat_template.jinja.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    from .checkpoints import detect_format, download_hub

    fmt = detect_format(path)
    if fmt == "gguf":
        return None, {}
    directory = download_hub(str(path)) if fmt == "hub" else Path(path)
    return hf_chat_template(directory if directory.is_dir() else directory.parent)


# ---- the conversation -----------------------------------------------------------------------------------

def fit_to_context(messages: list[dict], n_tokens: Callable[[list[dict]], int], budget: int) -> list[dict]:
    """The latest messages whose prompt takes at most `budget` tokens: the system message stays, the oldest
    turns (a user message and the replies to it) go first. ValueError if the last message alone does not fit."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while (n := n_tokens(system + turns)) > budget:
        if len(turns) <= 1:
            raise ValueError(f"this message takes {n} tokens with the chat template (and system message), more than "
                             f"the {budget} the context leaves for it: send a shorter one")
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # templates expect a user message first
            turns = turns[1:]
    return system + turns


def stop_ids(tokenizer, special: dict[str, str]) -> set[int]:
    """Ids that end the model's turn: a GGUF tokenizer lists them (eos_ids); else eos and the known markers."""
    ids = set(getattr(tokenizer, "eos_ids", None) or {tokenizer.eot_id} - {None})
    inner = getattr(tokenizer, "tokenizer", None)  # an HFTokenizer's tokenizers.Tokenizer
    if inner is not None:
        for text in (special.get("eos_token"), "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            if text and inner.token_to_id(text) is not None:
                ids.add(inner.token_to_id(text))
    return ids


def encode_prompt(tokenizer, text: str, bos_token: str | None) -> list[int]:
    """The rendered conversation as ids. A template that writes bos_token itself, fed to a tokenizer that adds
    one too (Llama 2's), would start with two BOS: keep one."""
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None and bos_token and getattr(tokenizer, "tokenizer", None) is not None:
        bos = tokenizer.tokenizer.token_to_id(bos_token)
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids


def stream_reply(model, tokenizer, ids: list[int], stops: set[int], args, generator) -> str:
    """Sample a reply to the prompt `ids`, printing its text as it comes; return the text."""
    from .generate import stream

    prompt = torch.tensor([ids], dtype=torch.long, device=model.output.weight.device)
    new: list[int] = []
    shown = ""
    for token in stream(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, stop_token=stops or None, generator=generator,
                        compile=args.compile):
        if token.item() in stops:
            break
        new.append(token.item())
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text
    text = tokenizer.decode(new)
    print(text[len(shown):], flush=True)
    return text.strip()


# ---- the command line -----------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_chat_parser(sub) -> argparse.ArgumentParser:
    """`python -m utils chat`: its flags, as a subcommand of the main parser."""
    c = sub.add_parser("chat", help="chat with an instruction-tuned model through its chat template")
    c.add_argument("--checkpoint", required=True,
                   help="a .gguf file, a Hugging Face folder with a chat template, or a hub id")
    c.add_argument("--message", default=None, help="answer this one message and exit (default: interactive)")
    c.add_argument("--system", default=None, help="a system message (default: the template's own, if any)")
    c.add_argument("--max-new-tokens", type=_positive_int, default=256,
                   help="longest reply, in tokens (at most half the model's context; default: %(default)s)")
    c.add_argument("--temperature", type=float, default=0.7,
                   help="0 is greedy; higher is more random (default: %(default)s)")
    c.add_argument("--top-k", type=_positive_int, default=None, help="sample only from the k most likely tokens")
    c.add_argument("--top-p", type=float, default=0.9,
                   help="sample from the smallest set with this much mass (default: %(default)s)")
    c.add_argument("--seed", type=int, default=None, help="random seed, for reproducible replies")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default: the checkpoint's; GGUF files are dequantized to float32)")
    c.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile; CUDA graphs on a GPU): the first reply waits for the "
                        "compiler, seconds to minutes; every token after is faster (benchmarks/RESULTS.md)")
    return c


def run_chat(args) -> int:
    """Answer --message, or chat until Ctrl-D / Ctrl-C; older turns are dropped when the context is full."""
    from .checkpoints import detect_format, load_pretrained, load_pretrained_tokenizer
    from .device import pick_device
    from .generate import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p)  # before the model loads
    generate_instead = f"use `python -m utils generate --checkpoint {args.checkpoint} --prompt ...` instead"
    ours = detect_format(args.checkpoint) == "ours"
    if ours:  # a run folder chats if its model was finetuned from a chat model (its tokenizer keeps the template)
        from .tokenizer import load_tokenizer
        if not getattr(load_tokenizer(args.checkpoint), "chat_template", None):
            raise ValueError(f"{args.checkpoint} is a model trained here from scratch, which has no chat template: "
                             f"{generate_instead}")
    try:
        tokenizer = load_tokenizer(args.checkpoint) if ours else load_pretrained_tokenizer(args.checkpoint)
        if tokenizer is None:
            raise FileNotFoundError(f"{args.checkpoint} ships no tokenizer: a chat needs one and its chat template")
        template, special = load_chat_template(args.checkpoint, tokenizer)
        if not template:
            raise ValueError(f"{args.checkpoint} has no chat template (tokenizer.chat_template in a GGUF, "
                             "chat_template in tokenizer_config.json or chat_template.jinja), so it is no chat "
                             f"model: {generate_instead}")
        device = pick_device(args.device)
        model = load_pretrained(args.checkpoint, device=device, dtype=args.dtype)
        args.max_new_tokens = min(args.max_new_tokens, model.config.max_seq_len // 2)  # the prompt gets the rest
        return _converse(model, tokenizer, template, special, args, device)
    except (KeyboardInterrupt, EOFError):  # Ctrl-C anywhere, Ctrl-D at the prompt: leave quietly
        print(file=sys.stderr)
        return 0


def _converse(model, tokenizer, template: str, special: dict[str, str], args, device) -> int:
    stops = stop_ids(tokenizer, special)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    messages = [{"role": "system", "content": args.system}] if args.system else []
    count = lambda msgs: len(encode_prompt(tokenizer, render_chat(template, msgs, **special), special["bos_token"]))
    budget = model.config.max_seq_len - args.max_new_tokens
    if args.compile:
        from .decode import compile_note
        print(compile_note(model), file=sys.stderr)
    if args.message is None:
        print(f"chatting with {args.checkpoint}: Ctrl-D or Ctrl-C to quit", file=sys.stderr)
    while True:
        text = args.message if args.message is not None else input(">>> ")
        if not text.strip() and args.message is not None:
            raise ValueError("--message is empty: write a message, or leave --message out to chat")
        if not text.strip():
            continue
        try:
            messages = fit_to_context(messages + [{"role": "user", "content": text}], count, budget)
        except ValueError as e:
            if args.message is not None:
                raise
            print(f"error: {e}", file=sys.stderr)
            continue
        ids = encode_prompt(tokenizer, render_chat(template, messages, **special), special["bos_token"])
        reply = stream_reply(model, tokenizer, ids, stops, args, generator)
        if args.message is not None:
            return 0
        messages.append({"role": "assistant", "content": reply})
        print()
