"""Finetuning: a run that starts from a trained model (`train --init-from PATH`) instead of random weights.

    model, tok = load_init("SmolLM2-135M-Instruct.Q4_1.gguf", max_seq_len=256)   # float32, its own tokenizer

The shape and the tokenizer come from the checkpoint (anything `load_pretrained` reads, or one of our run
folders); the dataset is tokenized with that tokenizer, which the run folder then keeps, chat template
included, so `generate` and `chat` work on the finetuned model. With `--lora-rank` only LoRA adapters train
(`utils.lora`). Settings whose from-scratch default would harm a pretrained model have their own defaults
here (`FINETUNE_DEFAULTS`): a small learning rate, a short warmup, no weight decay towards zero.
"""

from dataclasses import fields, replace
from pathlib import Path

import torch

from .model import Llama

# flags that describe a new model, and so contradict a checkpoint's own shape and tokenizer
SHAPE_FLAGS = ("preset", "tokenizer", "dim", "n_layers", "n_heads", "n_kv_heads", "init_std", "tie_embeddings",
               "dropout")
FROM_CHECKPOINT = "checkpoint"  # a finetune's preset and tokenizer: the --init-from checkpoint's own
MAX_DEFAULT_CONTEXT = 1024      # --init-from without --max-seq-len: the checkpoint's context, at most this

# settings left at their from-scratch default take these when finetuning: (full finetune, LoRA). A pretrained
# model wants small steps (lr 4e-3 would wreck it) and no weight decay pulling its weights towards zero;
# LoRA's adapters start at zero and take larger steps; no warmup: a CPU finetune may get only a few steps.
FINETUNE_DEFAULTS = {"lr": (1e-4, 2e-3), "warmup_steps": (0, 0), "weight_decay": (0.0, 0.0)}


def finetune_config(cfg, given: set[str] | None = None):
    """A TrainConfig for a run from cfg.init_from: shape and tokenizer from the checkpoint, finetune defaults.

    `given` names the settings the user set (the command line knows); None: those away from their default.
    max_seq_len None means the checkpoint's context (at most MAX_DEFAULT_CONTEXT): what the command line
    does without --max-seq-len; in Python, max_seq_len keeps its value (default 128) unless set to None.
    Settings that contradict the checkpoint raise a ValueError; LoRA without --init-from too.
    """
    if not cfg.init_from:
        if cfg.lora_rank is not None:
            raise ValueError("--lora-rank adapts a trained model: add --init-from PATH (the checkpoint to finetune)")
        return cfg
    if cfg.preset == FROM_CHECKPOINT:
        return cfg  # done already
    default, cli = type(cfg)(), given is not None
    if given is None:
        given = {f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}
    if "tokenizer" in given:
        raise ValueError(f"--tokenizer {cfg.tokenizer} contradicts --init-from: a finetuned model keeps the "
                         "tokenizer it was trained with, which comes with the checkpoint; drop --tokenizer")
    shape = [f"--{name.replace('_', '-')}" for name in SHAPE_FLAGS if name in given]
    if shape:
        raise ValueError(f"{' '.join(shape)} contradicts --init-from: the model's shape comes from the checkpoint "
                         f"{cfg.init_from}; drop {'it' if len(shape) == 1 else 'them'} (--max-seq-len may shorten "
                         "the context)")
    if cfg.lora_rank is not None and cfg.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {cfg.lora_rank} (leave it out to finetune every weight)")
    lora = cfg.lora_rank is not None
    changes = {name: values[lora] for name, values in FINETUNE_DEFAULTS.items() if name not in given}
    if lora and cfg.lora_alpha is None:
        changes["lora_alpha"] = 2.0 * cfg.lora_rank
    if cfg.max_seq_len is None or (cli and "max_seq_len" not in given):
        changes["max_seq_len"] = None  # the checkpoint's context (at most MAX_DEFAULT_CONTEXT), set when it loads
    return replace(cfg, preset=FROM_CHECKPOINT, tokenizer=FROM_CHECKPOINT, **changes)


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
    tok.name = f"{tok.name.split(':', 1)[0]}:{Path(path).name}"  # e.g. gguf:model.gguf, without this machine's path
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
