"""Finetuning: a run that starts from a trained model (`train --init-from PATH`) instead of random weights.

    model, tok = load_init("SmolLM2-135M-Instruct.Q4_1.gguf", max_seq_len=256)   # float32, its own tokenizer

The shape and the tokenizer come from the checkpoint (anything `load_pretrained` reads, or one of our run
folders); the dataset is tokenized with that tokenizer, which the run folder then keeps, chat template
included, so `generate` and `chat` work on the finetuned model. With `--lora-rank` only LoRA adapters train
(`utils.lora`). Settings whose from-scratch default would harm a pretrained model have their own defaults
here (`DEFAULTS`): a small learning rate, a short warmup, no weight decay towards zero.
"""

import torch

from .model import Llama

# flags that describe a new model, and so contradict a checkpoint's own shape and tokenizer
SHAPE_FLAGS = ("preset", "dim", "n_layers", "n_heads", "n_kv_heads", "init_std")
MAX_DEFAULT_CONTEXT = 1024  # --init-from without --max-seq-len: the checkpoint's context, at most this

# (from scratch, full finetune, LoRA): the value of a setting left at None
DEFAULTS = {
    "tokenizer": ("bpe:1024", None, None),   # finetuning: the checkpoint's own
    "preset": ("tiny", None, None),          # finetuning: the checkpoint's shape
    "max_seq_len": (128, None, None),        # finetuning: the checkpoint's context, at most MAX_DEFAULT_CONTEXT
    "lr": (4e-3, 1e-4, 2e-3),
    "warmup_steps": (50, 2, 2),
    "weight_decay": (1.0, 0.0, 0.0),
}


def run_kind(cfg) -> int:
    """0 from scratch, 1 full finetune, 2 LoRA: the column of DEFAULTS a TrainConfig takes."""
    return 0 if not cfg.init_from else 2 if cfg.lora_rank else 1


def check_init_flags(cfg) -> None:
    """Raise ValueError for settings that contradict --init-from (or LoRA without it): one line, what to do."""
    if not cfg.init_from:
        if cfg.lora_rank:
            raise ValueError("--lora-rank adapts a trained model: add --init-from PATH (a checkpoint to finetune)")
        return
    if cfg.tokenizer is not None:
        raise ValueError(f"--tokenizer {cfg.tokenizer} contradicts --init-from: a finetuned model keeps the "
                         "tokenizer it was trained with (it comes with the checkpoint); drop --tokenizer")
    given = [f"--{name.replace('_', '-')}" for name in SHAPE_FLAGS if getattr(cfg, name) is not None]
    given += ["--tie-embeddings"] * bool(cfg.tie_embeddings) + ["--dropout"] * bool(cfg.dropout)
    if given:
        raise ValueError(f"{' '.join(given)} contradicts --init-from: the model's shape comes from the checkpoint "
                         f"{cfg.init_from}; drop {'it' if len(given) == 1 else 'them'} (--max-seq-len may shorten "
                         "the context)")
    if cfg.lora_rank is not None and cfg.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {cfg.lora_rank} (leave it out to finetune every weight)")


def init_tokenizer(path: str):
    """The checkpoint's own tokenizer with its chat template (if any), or a FileNotFoundError saying what to do."""
    from .chat import load_chat_template
    from .checkpoints import detect_format, load_pretrained_tokenizer
    from .tokenizer import load_tokenizer

    if detect_format(path) == "ours":
        return load_tokenizer(path)
    tok = load_pretrained_tokenizer(path)
    if tok is None:
        raise FileNotFoundError(f"{path} ships no tokenizer we can load (tokenizer.json, tokenizer.model, or a GGUF's "
                                "tokenizer.ggml.*), and finetuning needs the model's own: copy its tokenizer file "
                                "next to the weights")
    if not getattr(tok, "chat_template", None):  # an HF folder keeps it beside tokenizer.json
        template, special = load_chat_template(path, tok)
        if template:
            tok.chat_template, tok.bos_token, tok.eos_token = template, special["bos_token"], special["eos_token"]
    return tok


def load_init(path: str, max_seq_len: int | None = None) -> tuple[Llama, object]:
    """(model in float32, its tokenizer) to finetune; max_seq_len may shorten the checkpoint's context."""
    from .checkpoints import load_pretrained

    tok = init_tokenizer(path)
    model = load_pretrained(path, dtype=torch.float32)  # a GGUF dequantizes straight to float32
    c = model.config
    if tok.vocab_size > c.vocab_size:
        raise ValueError(f"the tokenizer of {path} has {tok.vocab_size} ids but the model only {c.vocab_size} "
                         "embeddings: they do not belong together")
    if max_seq_len is not None and max_seq_len > c.max_seq_len:
        raise ValueError(f"--max-seq-len {max_seq_len} is longer than the context of {path} ({c.max_seq_len}): "
                         "a finetune may shorten the context, not lengthen it")
    shorten_context(model, max_seq_len or min(c.max_seq_len, MAX_DEFAULT_CONTEXT))
    return model.train(), tok


def shorten_context(model: Llama, max_seq_len: int) -> None:
    """Use the first max_seq_len positions only: the RoPE tables' first rows (no weight depends on the length)."""
    model.config.max_seq_len = max_seq_len
    model.rope_cos, model.rope_sin = model.rope_cos[:max_seq_len].clone(), model.rope_sin[:max_seq_len].clone()
