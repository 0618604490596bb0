"""Meta's Llama 2 and 3 checkpoints: params.json + consolidated.NN.pth, one shard per model-parallel rank.

Llama 3.1+ write `use_scaled_rope: true` in params.json: Meta's `apply_scaling` with its fixed values
(factor 8, low_freq_factor 1, high_freq_factor 4, original context 8192), `RopeScaling()` here; Meta's later
code reads `rope_scaling_factor` and `rope_high_freq_factor` from params.json where they are given.
"""

import json
from pathlib import Path

import torch

from .model import LlamaConfig
from .rope import RopeScaling
from .weights import IGNORED_KEYS, torch_load

# How Meta's model-parallel layers split a weight over shards (fairscale): None = replicated.
META_SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0}


def _meta_shards(directory: Path) -> list[Path]:
    shards = sorted(directory.glob("consolidated.*.pth"))
    expected = [directory / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != expected:
        raise FileNotFoundError(f"Meta shards in {directory} must be numbered consolidated.00.pth ... "
                                f"consolidated.{len(shards) - 1:02d}.pth, found {[s.name for s in shards]}")
    return shards


def merge_meta_shards(shards: list[dict]) -> dict:
    """One state dict from Meta's model-parallel shards: concatenate split weights, keep replicated ones."""
    keys = [k for k in shards[0] if not k.endswith(IGNORED_KEYS)]
    merged = {}
    for k in keys:
        absent = [i for i, s in enumerate(shards) if k not in s]
        if absent:
            raise ValueError(f"{k} is in consolidated.00.pth but not in shard(s) {absent}: the shards do not match")
        dim = META_SHARD_DIM.get(k.split(".")[-2]) if len(shards) > 1 else None
        merged[k] = shards[0][k] if dim is None else torch.cat([s[k] for s in shards], dim=dim)
    return merged


def rope_scaling_from_meta(params: dict) -> RopeScaling | None:
    """Meta's scaled RoPE (`use_scaled_rope`), with the factors its code would use, or None for plain RoPE."""
    if not params.get("use_scaled_rope"):
        return None
    return RopeScaling(factor=float(params.get("rope_scaling_factor") or 8.0),
                       high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0))


def config_from_meta(params: dict, sd: dict, max_seq_len: int | None = None) -> LlamaConfig:
    """LlamaConfig from params.json; vocab_size -1, the SwiGLU width and tying are read off the weights."""
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing or "tok_embeddings.weight" not in sd:
        raise ValueError(f"params.json needs dim, n_layers, n_heads (missing {missing}) and the shards "
                         "tok_embeddings.weight")
    vocab_size = params.get("vocab_size", -1)
    w1 = sd.get("layers.0.feed_forward.w1.weight")
    scaling = rope_scaling_from_meta(params)
    theta = float(params.get("rope_theta", 10000.0))
    # not in params.json: the context each generation was trained to (Llama 2: 4096, 3: 8192, 3.1+: 128k)
    context = 131072 if scaling else 8192 if theta >= 500000 else 4096
    return LlamaConfig(
        vocab_size=vocab_size if vocab_size > 0 else sd["tok_embeddings.weight"].shape[0],
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), hidden_dim=w1.shape[0] if w1 is not None else None,
        multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=max_seq_len or context, tie_embeddings="output.weight" not in sd,
    )


def load_meta(directory: Path, max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
    """(config, state dict) from params.json + consolidated.NN.pth, shards merged."""
    params = json.loads((directory / "params.json").read_text())
    sd = merge_meta_shards([torch_load(f) for f in _meta_shards(directory)])
    return config_from_meta(params, sd, max_seq_len), sd
