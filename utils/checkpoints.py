"""Checkpoints: one door, `load_pretrained`, for every format: our run folder and everyone else's.

    model, tok = load_model("out")                                 # a folder written by `train`
    model = load_pretrained("TinyLlama/TinyLlama-1.1B-Chat-v1.0")  # or a local directory or file
    tok = load_pretrained_tokenizer(path)                          # the tokenizer shipped with it

Our run folder (written by `utils.train`, laid out in `utils.runs`): ckpt.pt, the tokenizer
(`utils.tokenizer`), metrics.json. Other formats, each in the module named for it (`detect_format`
tells them apart):
    hf           config.json + model.safetensors | model.safetensors.index.json | pytorch_model.bin(.index.json)
    meta         params.json + consolidated.00.pth, consolidated.01.pth, ... (model-parallel shards)
    llama2c-pt   llama2.c's training checkpoint (.pt with "model" and "model_args")
    llama2c-bin  llama2.c's export: version 0 (legacy header), 1 ("ak42" header), 2 (int8, dequantised)
    gguf         llama.cpp's .gguf file (utils/gguf.py): any tensor type the gguf package dequantizes
    hub          "owner/name" on the Hugging Face hub: downloaded, then read as "hf"
"""

import re
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

from .gguf import load_gguf, load_gguf_tokenizer
from .hf import HF_WEIGHT_FILES, download_hub, load_hf
from .llama2c import load_llama2c_bin, load_llama2c_pt
from .lora import merge_lora_state_dict
from .meta import load_meta
from .model import Llama, LlamaConfig
from .runs import CKPT_FILE
from .tokenizer import (
    HFTokenizer,
    Llama3Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    eos_token_from_config,
    is_tiktoken_file,
    load_tokenizer,
)
from .weights import as_dtype, build_model, strip_prefix, torch_load, with_max_seq_len

# ---- our run folder -------------------------------------------------------------------------------------

def load_model(out_dir: str | Path, device="cpu") -> tuple[Llama, Tokenizer]:
    """(model in eval mode, tokenizer) from a folder written by `train`."""
    return load_pretrained(out_dir, device=device), load_tokenizer(out_dir)


def load_ours(path: Path, max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
    """(config, state dict) from our trainer's ckpt.pt {"config": LlamaConfig.to_dict(), "model": ...}."""
    ckpt = torch_load(path / CKPT_FILE if path.is_dir() else path)
    known = {f.name for f in fields(LlamaConfig)}
    config = LlamaConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    config.dropout = 0.0  # loaded for inference
    sd = strip_prefix(ckpt["model"])
    if ckpt.get("lora"):  # a LoRA run keeps W, A and B apart (exact resume): the model is W + (alpha / r) B A
        sd = merge_lora_state_dict(sd, ckpt["lora"]["rank"], ckpt["lora"]["alpha"])
    return with_max_seq_len(config, max_seq_len), sd


# ---- telling formats apart -----------------------------------------------------------------------------

EXPECTED_FILES = (f"ours: {CKPT_FILE} | hf: config.json + one of " + ", ".join(HF_WEIGHT_FILES)
                  + " | meta: params.json + consolidated.00.pth (...) | llama2c: a .pt or .bin file"
                  + " | hub: an 'owner/name' id")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _checkpoint_kind(path: Path) -> str:
    """'ours' or 'llama2c-pt' for a torch.save'd dict, from its keys."""
    ckpt = torch_load(path)
    if isinstance(ckpt, dict) and "model_args" in ckpt and "model" in ckpt:
        return "llama2c-pt"
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and "model" in ckpt:
        return "ours"
    keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"{path} is a PyTorch file but not a checkpoint we know: expected keys 'config' and 'model' "
                     f"(ours) or 'model' and 'model_args' (llama2c), got {keys}")


def _detect_file(p: Path) -> str:
    if (p.name in ("config.json", "params.json") or p.name.startswith(("consolidated.", "pytorch_model"))
            or p.suffix == ".safetensors" or p.name.endswith(".index.json")):
        raise ValueError(f"{p} is one file of a checkpoint directory: pass the directory {p.parent} instead")
    if p.suffix == ".bin":
        return "llama2c-bin"
    if p.suffix == ".gguf":
        return "gguf"
    if p.suffix in (".pt", ".pth", ".ckpt"):
        return _checkpoint_kind(p)
    raise ValueError(f"unknown checkpoint file {p}: expected a directory ({EXPECTED_FILES}), "
                     "a llama2c .bin export, a .pt checkpoint or a llama.cpp .gguf file")


def _detect_dir(p: Path) -> str:
    if (p / CKPT_FILE).exists():
        return _checkpoint_kind(p / CKPT_FILE)
    if (p / "config.json").exists():
        if not any((p / f).exists() for f in HF_WEIGHT_FILES):
            raise FileNotFoundError(f"{p} has config.json but no weights: expected one of {', '.join(HF_WEIGHT_FILES)}")
        return "hf"
    if (p / "params.json").exists():
        if not (p / "consolidated.00.pth").exists():
            raise FileNotFoundError(f"{p} has params.json but no consolidated.00.pth (Meta's weight shards)")
        return "meta"
    found = sorted(f.name for f in p.iterdir())[:10]
    raise ValueError(f"{p} is not a checkpoint directory we know: expected {EXPECTED_FILES}; found {found}")


def detect_format(path: str | Path) -> str:
    """One of "ours", "hf", "meta", "llama2c-pt", "llama2c-bin", "gguf", "hub"; a clear error for anything else."""
    p = Path(path)
    if p.is_dir():
        return _detect_dir(p)
    if p.is_file():
        return _detect_file(p)
    if HUB_ID.match(str(path)) and not str(path).startswith((".", "/")):
        return "hub"
    raise FileNotFoundError(f"{path} does not exist: pass a checkpoint directory ({EXPECTED_FILES}), "
                            "a llama2c .pt/.bin file, a llama.cpp .gguf file, or a Hugging Face hub id 'owner/name'")


class Resolved(NamedTuple):
    """A checkpoint's format and local path, found once (`resolve`) and handed to every loader."""
    fmt: str  # "ours", "hf", "meta", "llama2c-pt", "llama2c-bin" or "gguf"
    path: Path


def resolve(path: str | Path | Resolved) -> Resolved:
    """(format, local path) of a checkpoint: its format detected once, a hub id downloaded (then "hf")."""
    if isinstance(path, Resolved):
        return path
    fmt = detect_format(path)
    return Resolved("hf", download_hub(str(path))) if fmt == "hub" else Resolved(fmt, Path(path))


# ---- the doors ------------------------------------------------------------------------------------------

LOADERS = {"ours": load_ours, "hf": load_hf, "meta": load_meta, "llama2c-pt": load_llama2c_pt,
           "llama2c-bin": load_llama2c_bin, "gguf": load_gguf}


def load_pretrained(path: str | Path | Resolved, *, device="cpu", dtype=None, max_seq_len: int | None = None) -> Llama:
    """A `Llama` (eval mode) with the weights of any supported checkpoint (see `detect_format`) or hub id.

    dtype None keeps the checkpoint's dtype; max_seq_len overrides the context length (RoPE tables only).
    """
    fmt, path = resolve(path)
    if fmt == "gguf":  # dequantized straight to dtype: a 7B Q4 file never exists in float32 first
        config, sd = load_gguf(path, max_seq_len, dtype=as_dtype(dtype))
    else:
        config, sd = LOADERS[fmt](path, max_seq_len)
    return build_model(config, sd, f"{path} ({fmt})", device=device, dtype=dtype)


def load_pretrained_tokenizer(path: str | Path | Resolved) -> Tokenizer | None:
    """The tokenizer shipped with a foreign checkpoint (tokenizer.json, tokenizer.model, a GGUF's metadata), else None.

    A tokenizer.model is Llama 2's SentencePiece or Llama 3's tiktoken file, told apart by content; it may be
    given as the file itself. None for our own checkpoints: load those with utils.tokenizer.load_tokenizer.
    """
    if not isinstance(path, Resolved) and Path(path).is_file() and Path(path).suffix == ".model":
        return _tokenizer_model(Path(path))
    fmt, path = resolve(path)
    if fmt == "ours":
        return None
    if fmt == "gguf":
        return load_gguf_tokenizer(path)
    directory = path if path.is_dir() else path.parent
    if (directory / "tokenizer.json").exists():
        return HFTokenizer(directory / "tokenizer.json", eos_token_from_config(directory))
    if (directory / "tokenizer.model").exists():
        return _tokenizer_model(directory / "tokenizer.model")
    return None


def _tokenizer_model(path: Path) -> SentencePieceTokenizer | Llama3Tokenizer:
    return Llama3Tokenizer(path) if is_tiktoken_file(path) else SentencePieceTokenizer(path)
