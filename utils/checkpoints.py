"""Moving weights between our `Llama` and other implementations (Hugging Face `transformers`)."""

import torch

from .model import Llama, LlamaConfig
from .rope import permute_hf_to_meta


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
    )


def hf_state_dict_to_meta(sd: dict, config: LlamaConfig) -> dict:
    """Rename HF keys to ours and undo HF's q/k row permutation (rotate-half -> adjacent pairs)."""
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    # a tied model has one tensor under both names; HF's state_dict may or may not list lm_head
    out["output.weight"] = out["tok_embeddings.weight"] if config.tie_embeddings else sd["lm_head.weight"]
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(config.n_layers):
        for hf, ours in names.items():
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
