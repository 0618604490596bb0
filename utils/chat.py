"""Chat with an instruction-tuned model through its chat template.

    python -m utils chat --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf            # interactive; Ctrl-D quits
    python -m utils chat --checkpoint TinyLlama/TinyLlama-1.1B-Chat-v1.0 --message "Hi" --temperature 0

A chat model was fine-tuned on conversations written with role markers, such as SmolLM2's
"<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n", and answers well only when prompted the
same way. The markers come from a Jinja template shipped with the model: `tokenizer.chat_template` in a
GGUF's metadata, `chat_template` in an HF folder's tokenizer_config.json, or chat_template.jinja.
`render_chat` runs it as transformers' `apply_chat_template` does; the reply ends at an end-of-turn id.
"""

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


def load_chat_template(checkpoint, tokenizer) -> tuple[str | None, dict[str, str]]:
    """The model's chat template and the special tokens it prints, or (None, {}) if it has none.

    A GGUF's template came with its tokenizer (GGUFTokenizer.chat_template); an HF folder or hub id has it
    in tokenizer_config.json or chat_template.jinja. checkpoint: a path, or `utils.checkpoints.resolve`'s answer.
    A model with none of its own whose vocabulary has Llama 3's header tokens (Meta's checkpoints) gets Llama 3's
    format (`default_chat_template`).
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    from .checkpoints import resolve

    fmt, path = resolve(checkpoint)
    if fmt == "gguf":
        return default_chat_template(tokenizer)
    template, special = hf_chat_template(path if path.is_dir() else path.parent)
    return (template, special) if template else default_chat_template(tokenizer)


# Meta's Llama 3 chat format (llama-models' ChatFormat): each message is a header naming its role, a blank line,
# the text, <|eot_id|>; the prompt ends with the assistant's header. Meta's checkpoints ship no Jinja template.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def default_chat_template(tokenizer) -> tuple[str | None, dict[str, str]]:
    """For a model with no template of its own: Llama 3's format if its vocabulary has Llama 3's header tokens."""
    inner = getattr(tokenizer, "tokenizer", None)  # HF and GGUF tokenizers wrap a tokenizers.Tokenizer
    known = inner.token_to_id if inner is not None else getattr(tokenizer, "special_tokens", {}).get
    if all(known(t) is not None for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
        return LLAMA3_CHAT_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    return None, {}


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
    """Ids that end the model's turn: a GGUF tokenizer lists them (eos_ids); else eos and the known end markers."""
    from .gguf import END_TOKENS

    ids = set(getattr(tokenizer, "eos_ids", None) or {tokenizer.eot_id} - {None})
    inner = getattr(tokenizer, "tokenizer", None)  # an HFTokenizer's tokenizers.Tokenizer
    if inner is not None:
        for text in (special.get("eos_token"), *END_TOKENS):
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


class KeptCache:
    """The model's KV caches, kept from one turn of a chat to the next, and the ids whose keys and values they hold.

    A new turn's prompt is the whole conversation again, so most of it is already in the caches. A template may
    render earlier turns differently once another follows (a reply re-tokenized, the oldest turn dropped), so a
    turn keeps the longest prefix its prompt shares with those ids and processes only what follows.
    """

    def __init__(self, model):
        self.model, self.ids = model, []

    def reuse(self, ids: list[int], max_new_tokens: int) -> int:
        """Attach caches with room for ids + max_new_tokens; return how many leading ids they already hold."""
        from .decode import decoder

        keep = 0
        for held, new in zip(self.ids, ids[:-1]):  # the last id is always processed: its logits pick the reply
            if held != new:
                break
            keep += 1
        keep = decoder(self.model).attach(self.model, 1, len(ids) + max_new_tokens, keep)
        self.ids = ids[:keep]  # until the reply is done, only these are sure
        return keep

    def replied(self, ids: list[int], reply: list[int]) -> None:
        self.ids = ids + reply[:-1]  # each reply id before the last was fed back to pick the next one


def stream_reply(model, tokenizer, ids: list[int], stops: set[int], args, generator, kept: KeptCache | None = None
                 ) -> str:
    """Sample a reply to the prompt `ids`, printing its text as it comes; return the text.

    With `kept`, the conversation's earlier turns are read from the caches it keeps, not processed again.
    """
    from .generate import print_stream, stream

    prompt = torch.tensor([ids], dtype=torch.long, device=model.output.weight.device)
    cached = kept.reuse(ids, args.max_new_tokens) if kept is not None else None
    tokens = stream(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, stop_token=stops or None, generator=generator, compile=args.compile,
                    cached=cached)
    new = print_stream(tokenizer, tokens, stops)
    if kept is not None:
        kept.replied(ids, new)
    return tokenizer.decode(new).strip()


# ---- the command line (its flags are in utils/__main__.py) ----------------------------------------------

def run_chat(args) -> int:
    """Answer --message, or chat until Ctrl-D / Ctrl-C; older turns are dropped when the context is full."""
    from .checkpoints import load_pretrained, load_pretrained_tokenizer, resolve
    from .device import pick_device
    from .generate import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p)  # before the model loads
    generate_instead = f"use `python -m utils generate --checkpoint {args.checkpoint} --prompt ...` instead"
    if args.message is not None and not args.message.strip():  # before the model is loaded
        raise ValueError("--message is empty: write a message, or leave --message out to chat")
    try:
        checkpoint = resolve(args.checkpoint)  # the format, found once (a hub id: downloaded)
        if checkpoint.fmt == "ours":  # a run finetuned from a chat model chats: its tokenizer keeps the template
            from .tokenizer import load_tokenizer
            path = checkpoint.path
            tokenizer = load_tokenizer(path if path.is_dir() else path.parent)
            if not getattr(tokenizer, "chat_template", None):
                what = ("finetuned from a model that has no chat template" if hasattr(tokenizer, "bos_token")
                        else "trained here from scratch, which has no chat template")  # pretrained tokenizers have one
                raise ValueError(f"{args.checkpoint} is a model {what}: {generate_instead}")
        else:
            tokenizer = load_pretrained_tokenizer(checkpoint)
        if tokenizer is None:
            raise FileNotFoundError(f"{args.checkpoint} ships no tokenizer: a chat needs one and its chat template")
        template, special = load_chat_template(checkpoint, tokenizer)
        if not template:
            raise ValueError(f"{args.checkpoint} has no chat template (tokenizer.chat_template in a GGUF, "
                             "chat_template in tokenizer_config.json or chat_template.jinja), so it is no chat "
                             f"model: {generate_instead}")
        device = pick_device(args.device)
        model = load_pretrained(checkpoint, device=device, dtype=None if args.quantize else args.dtype)
        if args.quantize:  # int8 matrices (utils/quantize.py), activations in --dtype (default bfloat16)
            from .quantize import quantize_int8
            model = quantize_int8(model, args.dtype or "bfloat16")
        wanted, context = args.max_new_tokens, model.config.max_seq_len
        args.max_new_tokens = min(wanted, context // 2)  # the prompt gets the rest
        if args.max_new_tokens < wanted:
            print(f"note: the model's context is {context} tokens, so a reply stops at {args.max_new_tokens} "
                  "(half of it; the conversation gets the rest)", file=sys.stderr)
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
    kept = KeptCache(model)
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
        reply = stream_reply(model, tokenizer, ids, stops, args, generator, kept)
        if args.message is not None:
            return 0
        messages.append({"role": "assistant", "content": reply})
        print()
