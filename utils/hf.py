"""Hugging Face `transformers` Llama checkpoints: config, weight names, and the q/k permutation.

    model = from_hf(hf_model)                  # a LlamaForCausalLM in memory -> our Llama, same logits
    config, sd = load_hf(Path("folder"))       # config.json + safetensors (or .bin), sharded or not
    save_hf(model, "out/hf")                   # transformers' from_pretrained loads this

HF stores wq/wk with rows permuted for its rotate-half RoPE; ours is Meta's adjacent-pair RoPE, so
those two are permuted on the way in (`convert_hf_to_meta`) and out (`convert_meta_to_hf`), with
n_kv_heads for wk (GQA). Lesson 01 derives the permutation.
"""

import json
from pathlib import Path

import torch

from .files import atomic_write
from .model import Llama, LlamaConfig
from .rope import RopeScaling, permute_hf_to_meta, permute_meta_to_hf
from .weights import check_state_dict, expected_shapes, few_names, torch_load, with_max_seq_len

# Hugging Face's per-layer names -> Meta's (ours).
HF_LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                  "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                  "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                  "post_attention_layernorm": "ffn_norm"}


def _hf_rope(hf_config) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling): on the config and in `rope_scaling` in transformers 4, in `rope_parameters` in 5."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "llama3", None):
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported: only plain RoPE (Llama 2) and "
                         "'llama3' (Llama 3.1+) are")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    theta = float(theta if theta is not None else 10000.0)
    if rope_type != "llama3":
        return theta, None
    return theta, RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_seq_len=int(params["original_max_position_embeddings"]))


def config_from_hf(hf_config) -> LlamaConfig:
    """LlamaConfig equivalent to a transformers LlamaConfig."""
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError(f"head_dim {head_dim} * n_heads {hf_config.num_attention_heads} != hidden_size "
                         f"{hf_config.hidden_size}: models with a decoupled head_dim are not supported")
    theta, scaling = _hf_rope(hf_config)
    return LlamaConfig(
        vocab_size=hf_config.vocab_size,
        dim=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        hidden_dim=hf_config.intermediate_size,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=hf_config.max_position_embeddings,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=getattr(hf_config, "initializer_range", 0.02),
    )


def convert_hf_to_meta(sd: dict, config: LlamaConfig) -> dict:
    """Rename HF keys to ours and undo HF's q/k row permutation (rotate-half -> adjacent pairs)."""
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    # a tied model has one tensor under both names; HF's state_dict may or may not list lm_head
    out["output.weight"] = out["tok_embeddings.weight"] if config.tie_embeddings else sd["lm_head.weight"]
    for i in range(config.n_layers):
        for hf, ours in HF_LAYER_NAMES.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if ours == "attention.wq":
                w = permute_hf_to_meta(w, config.n_heads)
            elif ours == "attention.wk":
                w = permute_hf_to_meta(w, config.n_kv_heads)
            out[f"layers.{i}.{ours}.weight"] = w
    return out


@torch.no_grad()
def from_hf(hf_model) -> Llama:
    """A transformers LlamaForCausalLM in, an equivalent `Llama` (same logits) out, same dtype and device."""
    config = config_from_hf(hf_model.config)
    sd = hf_model.state_dict()
    ref = sd["model.embed_tokens.weight"]
    model = Llama(config).to(device=ref.device, dtype=ref.dtype)
    model.load_state_dict(convert_hf_to_meta(sd, config), strict=True)
    return model.eval()


HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def config_from_hf_json(cfg: dict, source: str = "config.json") -> LlamaConfig:
    """LlamaConfig from a transformers config.json dict (transformers 4 and 5 layouts)."""
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: model_type {cfg['model_type']!r} is not supported, only 'llama'")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "rms_norm_eps", "max_position_embeddings")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"{source} lacks {missing}: a Llama config.json needs {list(required)}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: biases or hidden_act {cfg.get('hidden_act')!r} are not Llama-2's: "
                         "only attention_bias=false, mlp_bias=false, hidden_act='silu' are supported")
    return config_from_hf(_Namespace(cfg))


class _Namespace:
    """A dict seen through getattr, as config_from_hf reads a transformers config."""

    def __init__(self, d: dict):
        self.__dict__.update(d)


def _hf_weight_files(directory: Path) -> list[Path]:
    """The files holding the weights, preferring safetensors; shards listed by the index must all exist."""
    for name in HF_WEIGHT_FILES:
        if not (directory / name).exists():
            continue
        if not name.endswith(".index.json"):
            return [directory / name]
        shards = sorted(set(json.loads((directory / name).read_text())["weight_map"].values()))
        absent = [s for s in shards if not (directory / s).exists()]
        if absent:
            raise FileNotFoundError(f"{directory / name} lists shards that are missing: {few_names(absent)}")
        return [directory / s for s in shards]
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(HF_WEIGHT_FILES)}")


def read_hf_weights(directory: Path) -> dict:
    """All tensors of an HF checkpoint directory, HF names, merged over shards."""
    sd = {}
    for f in _hf_weight_files(directory):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd.update(load_file(f))
        else:
            sd.update(torch_load(f))
    return sd


def _hf_name(key: str) -> str:
    """Our (Meta) name -> Hugging Face's."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if key in top:
        return top[key]
    i, rest = key.removeprefix("layers.").split(".", 1)
    meta_to_hf = {v: k for k, v in HF_LAYER_NAMES.items()}
    return f"model.layers.{i}.{meta_to_hf[rest.removesuffix('.weight')]}.weight"


def load_hf(directory: Path, max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
    """(config, Meta-named state dict) from an HF directory; q/k un-permuted from rotate-half."""
    config = config_from_hf_json(json.loads((directory / "config.json").read_text()), str(directory / "config.json"))
    config = with_max_seq_len(config, max_seq_len)
    sd = {k: v for k, v in read_hf_weights(directory).items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    expected = {_hf_name(k): s for k, s in expected_shapes(config).items()
                if not (config.tie_embeddings and k == "output.weight")}
    check_state_dict(sd, expected, str(directory))
    return config, convert_hf_to_meta(sd, config)


def hf_config_dict(config: LlamaConfig, dtype: torch.dtype = torch.float32, bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> dict:
    """config.json for transformers' LlamaForCausalLM (readable by transformers 4 and 5)."""
    dtype_name = str(dtype).removeprefix("torch.")
    s = config.rope_scaling
    scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": config.dim, "intermediate_size": config.hidden_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": config.rope_theta},
        "rope_scaling": scaling,  # transformers 4 reads Llama 3.1's scaling here
        "max_position_embeddings": config.max_seq_len, "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype_name, "dtype": dtype_name, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
    }


def convert_meta_to_hf(model: Llama) -> dict:
    """HF-named, contiguous tensors with q/k permuted to rotate-half; no lm_head.weight when tied."""
    c = model.config
    out = {}
    for k, w in model.state_dict().items():
        if c.tie_embeddings and k == "output.weight":
            continue  # HF re-ties it on load; safetensors refuses two names for one tensor
        if k.endswith("attention.wq.weight"):
            w = permute_meta_to_hf(w, c.n_heads)
        elif k.endswith("attention.wk.weight"):
            w = permute_meta_to_hf(w, c.n_kv_heads)
        out[_hf_name(k)] = w.detach().cpu().contiguous()
    return out


@torch.no_grad()
def save_hf(model: Llama, directory: str | Path, *, bos_token_id: int | None = None,
            eos_token_id: int | None = None) -> Path:
    """Write config.json + model.safetensors that transformers' LlamaForCausalLM.from_pretrained loads."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = convert_meta_to_hf(model)
    config = hf_config_dict(model.config, model.tok_embeddings.weight.dtype, bos_token_id, eos_token_id)
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


HUB_PATTERNS = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "chat_template.jinja"]


def download_hub(repo_id: str) -> Path:
    """snapshot_download the files `load_hf` needs (safetensors, else pytorch_model*.bin) and tokenizer."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(f"downloading {repo_id!r} needs huggingface_hub: pip install huggingface_hub") from e
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
        if not any((path / f).exists() for f in HF_WEIGHT_FILES):
            path = Path(snapshot_download(repo_id, allow_patterns=["pytorch_model*.bin", "*.bin.index.json"]))
    except Exception as e:
        from huggingface_hub import constants

        first = next((line for line in str(e).splitlines() if line.strip()), "").split(". ")[0].rstrip(".")
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if constants.HF_HUB_OFFLINE else first
        raise FileNotFoundError(f"no folder {repo_id} here, and the Hugging Face hub did not give it either "
                                f"({type(e).__name__}: {why}): check the path, or pass a local folder holding "
                                "config.json and model.safetensors") from e
    return path
