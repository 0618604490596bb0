"""From a state dict in Meta's names to a `Llama`, checking every key and shape: what each format's loader ends in.

Every loader (`checkpoints`, `hf`, `meta`, `llama2c`, `gguf`) returns (LlamaConfig, state dict with Meta's
names); `build_model` checks the dict against the shapes the config implies and builds the model
without a random initialisation it would overwrite.
"""

from pathlib import Path

import torch

from .model import Llama, LlamaConfig

IGNORED_KEYS = ("freqs_cos", "freqs_sin", "rope.freqs")  # RoPE tables some formats store; we recompute them


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Meta name -> shape of every weight a `Llama` with this config holds (built on the meta device)."""
    with torch.device("meta"):
        model = Llama(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def few_names(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def check_state_dict(sd: dict, expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise ValueError naming missing keys, unexpected keys and wrong shapes of `sd` against `expected`."""
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {few_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few_names(unexpected)}")
    bad = [f"{k}: expected {expected[k]}, got {tuple(sd[k].shape)}" for k in sorted(set(sd) & set(expected))
           if tuple(sd[k].shape) != expected[k]]
    if bad:
        problems.append("wrong shapes: " + "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""))
    if problems:
        raise ValueError(f"{source} does not fit the model its config describes: " + " | ".join(problems))


def as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(getattr(torch, str(dtype), None), torch.dtype):
        return getattr(torch, str(dtype))
    raise ValueError(f"unknown dtype {dtype!r}: use e.g. torch.float32, 'bfloat16' or 'float16'")


@torch.no_grad()
def build_model(config: LlamaConfig, sd: dict, source: str, device="cpu", dtype=None) -> Llama:
    """A `Llama` holding the weights of `sd` (Meta names; output.weight may be absent if tied), in eval mode."""
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_KEYS)}
    if config.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(sd, expected_shapes(config), source)
    with torch.device("meta"):  # no random init of weights we overwrite: fast, and no 2x memory
        model = Llama(config)
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True replaced the shared Parameter twice
    dtype = as_dtype(dtype) or model.tok_embeddings.weight.dtype
    return model.to(device=device, dtype=dtype).eval()


def torch_load(path: Path) -> dict:
    """torch.load with weights_only=True (a downloaded pickle runs no code), memory-mapped where possible."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # files from before torch 1.6's zip format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from e


def strip_prefix(sd: dict, prefix: str = "_orig_mod.") -> dict:
    """torch.compile'd models save their keys as _orig_mod.<name>."""
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def with_max_seq_len(config: LlamaConfig, max_seq_len: int | None) -> LlamaConfig:
    if max_seq_len:
        config.max_seq_len = max_seq_len
        config.validate()
    return config
