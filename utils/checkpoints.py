"""Moving weights between our `Llama` and other implementations: load any Llama checkpoint, export to HF.

    model = load_pretrained("TinyLlama/TinyLlama-1.1B-Chat-v1.0")  # or a local directory or file
    tok = load_pretrained_tokenizer(path)                          # its own tokenizer, or None
    save_hf(model, "out/hf")                                       # transformers can load this

Formats (`detect_format`):
    ours         our trainer's directory with ckpt.pt ({"config", "model", ...}), or that file
    hf           config.json + model.safetensors | model.safetensors.index.json | pytorch_model.bin(.index.json)
    meta         params.json + consolidated.00.pth, consolidated.01.pth, ... (model-parallel shards)
    llama2c-pt   llama2c's training checkpoint (.pt with "model" and "model_args")
    llama2c-bin  llama2c's export: version 0 (legacy header), 1 ("ak42" header), 2 (int8, dequantised)
    gguf         llama.cpp's .gguf file (utils/gguf.py): any tensor type the gguf package dequantizes
    hub          "owner/name" on the Hugging Face hub: downloaded, then read as "hf"

Our model uses Meta's RoPE (adjacent pairs), as do Meta and llama2c; HF stores wq/wk permuted for
rotate-half, so those two are permuted on the way in and out, with n_kv_heads for wk (GQA).
"""

import json
import os
import re
import struct
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from .gguf import GGUFTokenizer, load_gguf, load_gguf_tokenizer
from .model import Llama, LlamaConfig
from .rope import permute_hf_to_meta, permute_meta_to_hf

# Hugging Face's per-layer names -> Meta's (ours).
HF_LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                  "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                  "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                  "post_attention_layernorm": "ffn_norm"}


def _hf_rope_theta(hf_config) -> float:
    """rope_theta sits on the config in transformers 4, in `rope_parameters` in transformers 5."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported: only plain RoPE (Llama 2) is")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def config_from_hf(hf_config) -> LlamaConfig:
    """LlamaConfig equivalent to a transformers LlamaConfig."""
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError(f"head_dim {head_dim} * n_heads {hf_config.num_attention_heads} != hidden_size "
                         f"{hf_config.hidden_size}: models with a decoupled head_dim are not supported")
    return LlamaConfig(
        vocab_size=hf_config.vocab_size,
        dim=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        hidden_dim=hf_config.intermediate_size,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=_hf_rope_theta(hf_config),
        max_seq_len=hf_config.max_position_embeddings,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=getattr(hf_config, "initializer_range", 0.02),
    )


def hf_state_dict_to_meta(sd: dict, config: LlamaConfig) -> dict:
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
    model.load_state_dict(hf_state_dict_to_meta(sd, config), strict=True)
    return model.eval()


# ---- common: build a Llama from (config, Meta-named state dict), checking every key and shape ---------

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
EXPECTED_FILES = ("ours: ckpt.pt | hf: config.json + one of " + ", ".join(HF_WEIGHT_FILES)
                  + " | meta: params.json + consolidated.00.pth (...) | llama2c: a .pt or .bin file"
                  + " | hub: an 'owner/name' id")
IGNORED_KEYS = ("freqs_cos", "freqs_sin", "rope.freqs")  # RoPE tables some formats store; we recompute them


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Meta name -> shape of every weight a `Llama` with this config holds (built on the meta device)."""
    with torch.device("meta"):
        model = Llama(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def check_state_dict(sd: dict, expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise ValueError naming missing keys, unexpected keys and wrong shapes of `sd` against `expected`."""
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    bad = [f"{k}: expected {expected[k]}, got {tuple(sd[k].shape)}" for k in sorted(set(sd) & set(expected))
           if tuple(sd[k].shape) != expected[k]]
    if bad:
        problems.append("wrong shapes: " + "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""))
    if problems:
        raise ValueError(f"{source} does not fit the model its config describes: " + " | ".join(problems))


def _as_dtype(dtype) -> torch.dtype | None:
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
    model._init_rope()  # the RoPE buffers were built on the meta device
    dtype = _as_dtype(dtype) or model.tok_embeddings.weight.dtype
    return model.to(device=device, dtype=dtype).eval()


def _torch_load(path: Path) -> dict:
    """torch.load with weights_only=True (a downloaded pickle runs no code), memory-mapped where possible."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # files from before torch 1.6's zip format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from e


def _strip_prefix(sd: dict, prefix: str = "_orig_mod.") -> dict:
    """torch.compile'd models save their keys as _orig_mod.<name>."""
    return {k.removeprefix(prefix): v for k, v in sd.items()}


# ---- format detection ----------------------------------------------------------------------------------

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _checkpoint_kind(path: Path) -> str:
    """'ours' or 'llama2c-pt' for a torch.save'd dict, from its keys."""
    ckpt = _torch_load(path)
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
    if (p / "ckpt.pt").exists():
        return _checkpoint_kind(p / "ckpt.pt")
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


# ---- Hugging Face -------------------------------------------------------------------------------------

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
            raise FileNotFoundError(f"{directory / name} lists shards that are missing: {_few(absent)}")
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
            sd.update(_torch_load(f))
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
    config = _with_max_seq_len(config, max_seq_len)
    sd = {k: v for k, v in read_hf_weights(directory).items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    expected = {_hf_name(k): s for k, s in expected_shapes(config).items()
                if not (config.tie_embeddings and k == "output.weight")}
    check_state_dict(sd, expected, str(directory))
    return config, hf_state_dict_to_meta(sd, config)


def _with_max_seq_len(config: LlamaConfig, max_seq_len: int | None) -> LlamaConfig:
    if max_seq_len:
        config.max_seq_len = max_seq_len
        config.validate()
    return config


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
        raise FileNotFoundError(f"{repo_id!r} is no local path, and could not be downloaded from the Hugging Face "
                                f"hub ({type(e).__name__}: {e}). If you are offline, pass a local directory "
                                "holding config.json and model.safetensors instead") from e
    return path


# ---- Meta ---------------------------------------------------------------------------------------------

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


def config_from_meta(params: dict, sd: dict, max_seq_len: int | None = None) -> LlamaConfig:
    """LlamaConfig from params.json; vocab_size -1 and the SwiGLU width are read off the weights."""
    if params.get("use_scaled_rope"):
        raise ValueError("params.json asks for scaled RoPE (Llama 3.1+): only plain RoPE (Llama 2) is supported")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing or "tok_embeddings.weight" not in sd:
        raise ValueError(f"params.json needs dim, n_layers, n_heads (missing {missing}) and the shards "
                         "tok_embeddings.weight")
    vocab_size = params.get("vocab_size", -1)
    w1 = sd.get("layers.0.feed_forward.w1.weight")
    return LlamaConfig(
        vocab_size=vocab_size if vocab_size > 0 else sd["tok_embeddings.weight"].shape[0],
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), hidden_dim=w1.shape[0] if w1 is not None else None,
        multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 10000.0)),
        max_seq_len=max_seq_len or 4096,  # not in params.json; Llama 2 was trained on 4096
    )


def load_meta(directory: Path, max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
    """(config, state dict) from params.json + consolidated.NN.pth, shards merged."""
    params = json.loads((directory / "params.json").read_text())
    sd = merge_meta_shards([_torch_load(f) for f in _meta_shards(directory)])
    return config_from_meta(params, sd, max_seq_len), sd


# ---- llama2.c -----------------------------------------------------------------------------------------

def load_llama2c_pt(path: Path, max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
    """(config, state dict) from llama2c's training checkpoint {"model", "model_args", ...}."""
    ckpt = _torch_load(path)
    args, sd = ckpt["model_args"], _strip_prefix(ckpt["model"])
    emb, out = sd.get("tok_embeddings.weight"), sd.get("output.weight")
    tied = out is None or emb is None or out.data_ptr() == emb.data_ptr() or torch.equal(out, emb)
    config = LlamaConfig(
        vocab_size=args["vocab_size"], dim=args["dim"], n_layers=args["n_layers"], n_heads=args["n_heads"],
        n_kv_heads=args.get("n_kv_heads"), hidden_dim=args.get("hidden_dim"),
        multiple_of=args.get("multiple_of", 256), norm_eps=args.get("norm_eps", 1e-5),
        max_seq_len=max_seq_len or args.get("max_seq_len", 256), tie_embeddings=tied,
    )
    return config, sd


LLAMA2C_MAGIC = 0x616B3432  # "ak42"


def _read_llama2c_header(f) -> tuple[int, tuple, bool, int]:
    """(version, (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len), shared, group_size)."""
    (magic,) = struct.unpack("<I", f.read(4))
    if magic != LLAMA2C_MAGIC:  # version 0: no magic, 7 int32, vocab_size < 0 when the classifier is not shared
        f.seek(0)
        p = struct.unpack("<7i", f.read(28))
        return 0, (*p[:5], abs(p[5]), p[6]), p[5] > 0, 0
    (version,) = struct.unpack("<i", f.read(4))
    if version not in (1, 2):
        raise ValueError(f"llama2c .bin version {version} is not supported: only versions 0, 1 and 2 are")
    p = struct.unpack("<7i", f.read(28))
    (shared,) = struct.unpack("<B", f.read(1))
    group_size = struct.unpack("<i", f.read(4))[0] if version == 2 else 0
    return version, p, bool(shared), group_size


class _Reader:
    """Consecutive arrays of one flat buffer: take(n_layers, rows, cols) -> tensor."""

    def __init__(self, data: np.ndarray, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, *shape: int) -> torch.Tensor:
        n = int(np.prod(shape))
        if self.pos + n > self.data.size:
            raise ValueError(f"{self.path} is truncated: needs more than the {self.data.size} values it holds "
                             "for the shapes its header declares")
        out = torch.from_numpy(self.data[self.pos:self.pos + n].reshape(shape))
        self.pos += n
        return out


def _llama2c_sd(layers: dict, top: dict, n_layers: int) -> dict:
    """Meta-named state dict from {name: (n_layers, ...) stacked weights} and the top-level weights."""
    sd = dict(top)
    for name, w in layers.items():
        prefix = "" if name.endswith("_norm") else "attention." if name in ("wq", "wk", "wv", "wo") else "feed_forward."
        for i in range(n_layers):
            sd[f"layers.{i}.{prefix}{name}.weight"] = w[i]
    return sd


def _read_v0(r: _Reader, p: tuple, shared: bool) -> dict:
    dim, hidden, L, n_heads, n_kv, vocab, seq = p
    kv_dim, hd = n_kv * (dim // n_heads), dim // n_heads
    top = {"tok_embeddings.weight": r.take(vocab, dim)}
    shapes = {"attention_norm": (dim,), "wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim),
              "wo": (dim, dim), "ffn_norm": (dim,), "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim)}
    layers = {name: r.take(L, *shape) for name, shape in shapes.items()}
    top["norm.weight"] = r.take(dim)
    r.take(2, seq, hd // 2)  # freqs_cos, freqs_sin: we recompute them
    if not shared:
        top["output.weight"] = r.take(vocab, dim)
    return _llama2c_sd(layers, top, L)


def _read_v1(r: _Reader, p: tuple, shared: bool, take_matrix) -> dict:
    dim, hidden, L, n_heads, n_kv, vocab, seq = p
    kv_dim = n_kv * (dim // n_heads)
    layers = {"attention_norm": r.take(L, dim), "ffn_norm": r.take(L, dim)}
    top = {"norm.weight": r.take(dim), "tok_embeddings.weight": take_matrix(vocab, dim)}
    shapes = {"wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim),
              "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim)}
    for name, shape in shapes.items():
        layers[name] = torch.stack([take_matrix(*shape) for _ in range(L)])
    if not shared:
        top["output.weight"] = take_matrix(vocab, dim)
    return _llama2c_sd(layers, top, L)


def _int8_reader(data: bytes, offset: int, group_size: int, path: Path):
    """take(rows, cols): int8 values then one fp32 scale per group of group_size, dequantised to fp32."""
    pos = [offset]

    def take(*shape: int) -> torch.Tensor:
        n = int(np.prod(shape))
        if pos[0] + n + 4 * (n // group_size) > len(data):
            raise ValueError(f"{path} is truncated: the shapes its header declares need more bytes than it has")
        q = np.frombuffer(data, dtype=np.int8, count=n, offset=pos[0]).astype(np.float32)
        s = np.frombuffer(data, dtype=np.float32, count=n // group_size, offset=pos[0] + n)
        pos[0] += n + 4 * (n // group_size)
        return torch.from_numpy((q.reshape(-1, group_size) * s[:, None]).reshape(shape))

    return take


def load_llama2c_bin(path: Path, max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
    """(config, state dict) from a llama2c export: version 0 (legacy), 1 (fp32) or 2 (int8, dequantised)."""
    with open(path, "rb") as f:
        version, p, shared, group_size = _read_llama2c_header(f)
    dim, hidden, L, n_heads, n_kv, vocab, seq = p
    if min(p) < 1 or dim % n_heads or n_heads % n_kv:
        raise ValueError(f"{path} header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, "
                         f"max_seq_len) = {p} is not a valid llama2c model: is this a llama2c .bin export?")
    header = 28 if version == 0 else 256
    if version == 2:
        data = bytearray(path.read_bytes())  # writable, so torch.from_numpy does not warn
        norms = _Reader(np.frombuffer(data, dtype=np.float32, count=(2 * L + 1) * dim, offset=header), path)
        sd = _read_v1(norms, p, shared, _int8_reader(data, header + 4 * (2 * L + 1) * dim, group_size, path))
    else:
        r = _Reader(np.fromfile(path, dtype=np.float32, offset=header), path)
        sd = _read_v0(r, p, shared) if version == 0 else _read_v1(r, p, shared, r.take)
        if r.pos != r.data.size:
            raise ValueError(f"{path} holds {r.data.size} values after its header, the header's shapes need "
                             f"{r.pos}: the file does not match its header")
    config = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=L, n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=hidden,
                         max_seq_len=max_seq_len or seq, tie_embeddings=shared)
    return config, sd


# ---- ours ---------------------------------------------------------------------------------------------

def load_ours(path: Path, max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
    """(config, state dict) from our trainer's ckpt.pt {"config": LlamaConfig.to_dict(), "model": ...}."""
    ckpt = _torch_load(path / "ckpt.pt" if path.is_dir() else path)
    known = {f.name for f in fields(LlamaConfig)}
    config = LlamaConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    config.dropout = 0.0  # loaded for inference
    return _with_max_seq_len(config, max_seq_len), _strip_prefix(ckpt["model"])


# ---- the entry points ---------------------------------------------------------------------------------

LOADERS = {"ours": load_ours, "hf": load_hf, "meta": load_meta, "llama2c-pt": load_llama2c_pt,
           "llama2c-bin": load_llama2c_bin, "gguf": load_gguf}


def load_pretrained(path: str | Path, *, device="cpu", dtype=None, max_seq_len: int | None = None) -> Llama:
    """A `Llama` (eval mode) with the weights of any supported checkpoint (see `detect_format`) or hub id.

    dtype None keeps the checkpoint's dtype; max_seq_len overrides the context length (RoPE tables only).
    """
    fmt = detect_format(path)
    if fmt == "hub":
        path, fmt = download_hub(str(path)), "hf"
    if fmt == "gguf":  # dequantized straight to dtype: a 7B Q4 file never exists in float32 first
        config, sd = load_gguf(Path(path), max_seq_len, dtype=_as_dtype(dtype))
    else:
        config, sd = LOADERS[fmt](Path(path), max_seq_len)
    return build_model(config, sd, f"{path} ({fmt})", device=device, dtype=dtype)


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), flush it to disk, then rename over `path`: a crash never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def hf_config_dict(config: LlamaConfig, dtype: torch.dtype = torch.float32, bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> dict:
    """config.json for transformers' LlamaForCausalLM (readable by transformers 4 and 5)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": config.dim, "intermediate_size": config.hidden_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}, "rope_scaling": None,
        "max_position_embeddings": config.max_seq_len, "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype_name, "dtype": dtype_name, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
    }


def hf_state_dict_from_meta(model: Llama) -> dict:
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
    sd = hf_state_dict_from_meta(model)
    config = hf_config_dict(model.config, model.tok_embeddings.weight.dtype, bos_token_id, eos_token_id)
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


# ---- tokenizers shipped with foreign checkpoints ------------------------------------------------------

class HFTokenizer:
    """A `tokenizer.json` through the `tokenizers` library. encode adds BOS as the tokenizer's template says."""

    def __init__(self, path: Path, eos_token: str | None = None):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(f"{path} needs the `tokenizers` library: pip install tokenizers") from e
        self.path, self.tokenizer = path, tokenizers.Tokenizer.from_file(str(path))
        self.name, self.vocab_size = f"tokenizers:{path}", self.tokenizer.get_vocab_size()
        candidates = [eos_token, "</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>"]
        self.eot_id = next((i for t in candidates if t and (i := self.tokenizer.token_to_id(t)) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class SentencePieceTokenizer:
    """A `tokenizer.model` (Meta's Llama 2 tokenizer) through `sentencepiece`. encode prepends BOS."""

    def __init__(self, path: Path):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(f"{path} needs the `sentencepiece` library: pip install sentencepiece") from e
        self.path, self.sp = path, sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.name, self.vocab_size = f"sentencepiece:{path}", self.sp.get_piece_size()
        self.bos_id, self.eot_id = self.sp.bos_id(), (self.sp.eos_id() if self.sp.eos_id() >= 0 else None)

    def encode(self, text: str) -> list[int]:
        return ([self.bos_id] if self.bos_id >= 0 else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        # the model's vocabulary may be padded past the tokenizer's: skip ids it has no piece for
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])


def _eos_token(directory: Path) -> str | None:
    """The eos token's text from tokenizer_config.json, if there is one."""
    f = directory / "tokenizer_config.json"
    eos = json.loads(f.read_text()).get("eos_token") if f.exists() else None
    return eos.get("content") if isinstance(eos, dict) else eos


def load_pretrained_tokenizer(path: str | Path) -> HFTokenizer | SentencePieceTokenizer | GGUFTokenizer | None:
    """The tokenizer shipped with a foreign checkpoint (tokenizer.json, tokenizer.model, a GGUF's metadata), else None.

    None for our own checkpoints too: load those with utils.tokenizer.load_tokenizer(directory).
    """
    fmt = detect_format(path)
    if fmt == "ours":
        return None
    if fmt == "gguf":
        return load_gguf_tokenizer(path)
    directory = download_hub(str(path)) if fmt == "hub" else Path(path)
    directory = directory if directory.is_dir() else directory.parent
    if (directory / "tokenizer.json").exists():
        return HFTokenizer(directory / "tokenizer.json", _eos_token(directory))
    if (directory / "tokenizer.model").exists():
        return SentencePieceTokenizer(directory / "tokenizer.model")
    return None
