"""Llama 3.x in the same code: Llama 3.1's RoPE scaling and the Llama 3 shapes, against transformers.

The scaled models here are small, with an original context of 64 tokens, and run on 300 positions: past
the original context, where the scaling is what the model was fine-tuned to expect.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from utils.checkpoints import load_pretrained
from utils.hf import config_from_hf, from_hf, save_hf
from utils.model import Llama, count_params, get_config
from utils.rope import RopeScaling, rope_frequencies, scale_frequencies

transformers = pytest.importorskip("transformers")

ORIGINAL = 64  # the original context of the small scaled models below
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": ORIGINAL}
TOKENS = torch.randint(0, 101, (2, 300), generator=torch.Generator().manual_seed(0))  # 300 > ORIGINAL


def scaled_hf(scaling=SCALING, tied=False, theta=10000.0, seed=0):
    """A random transformers Llama with Llama 3.1's RoPE scaling; head_dim 16, so with theta 10000 its
    wavelengths (6 ... 19869 positions) fall in all three of the rule's bands for an original context of 64."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=theta,
        rope_scaling=dict(scaling), tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.5 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return hf


def hf_logits(hf, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens).logits


def max_error(model: Llama, expected: torch.Tensor, tokens=TOKENS) -> float:
    with torch.no_grad():
        return (model(tokens) - expected).abs().max().item()


def without_scaling(model: Llama) -> Llama:
    """The same weights with plain RoPE: what this code did before Llama 3.1's scaling."""
    plain = Llama(dataclasses.replace(model.config, rope_scaling=None)).eval()
    plain.load_state_dict(model.state_dict())
    return plain


# ---- 1. the frequency ladder ---------------------------------------------------------------------------

def meta_apply_scaling(freqs: list[float], factor=8.0, low=1.0, high=4.0, old_context_len=8192) -> list[float]:
    """Meta's llama3 apply_scaling (llama-models, first release), frequency by frequency."""
    low_wavelen, high_wavelen = old_context_len / low, old_context_len / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


def test_scaled_ladder_is_metas_apply_scaling_and_transformers_llama3():
    freqs = rope_frequencies(128, 500000.0)  # Llama 3.1 8B
    ours = scale_frequencies(freqs, RopeScaling())
    torch.testing.assert_close(ours, torch.tensor(meta_apply_scaling(freqs.tolist()), dtype=torch.float64))
    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(ours.float(), inv_freq, rtol=1e-6, atol=0)
    # the three bands: fast pairs untouched, slow ones 8x slower, a blend between
    assert torch.equal(ours[:20], freqs[:20]) and torch.allclose(ours[-20:], freqs[-20:] / 8)
    middle = (ours != freqs) & ~torch.isclose(ours, freqs / 8)
    assert 3 <= middle.sum() <= 10 and torch.all((ours[middle] < freqs[middle]) & (ours[middle] > freqs[middle] / 8))


def test_bad_scaling_says_what_is_wrong():
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=4.0)
    with pytest.raises(ValueError, match="factor >= 1"):
        RopeScaling(factor=0.5)


# ---- 2. the model, against transformers ----------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_scaled_rope_logits_match_transformers_past_the_original_context(tied):
    hf = scaled_hf(tied=tied)
    ours = from_hf(hf)
    assert ours.config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, ORIGINAL)
    expected = hf_logits(hf)
    assert expected.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert max_error(ours, expected) <= 1e-4


def test_plain_rope_fails_the_same_comparison():
    """The test above can fail: the same weights with plain RoPE miss transformers' logits by far."""
    hf = scaled_hf()
    ours = from_hf(hf)
    expected = hf_logits(hf)
    assert max_error(without_scaling(ours), expected) > 100 * 1e-4
    within = TOKENS[:, :ORIGINAL]  # inside the original context the slow pairs barely turn: a smaller, real miss
    assert max_error(without_scaling(ours), hf_logits(hf, within), within) > 1e-4


def test_scaled_kv_cache_decode_matches_transformers():
    """Positions past the original context, one token at a time through the KV cache."""
    hf = scaled_hf(seed=1).double()
    ours = from_hf(hf)
    hf.generation_config.eos_token_id = None
    from utils.generate import generate
    prompt = TOKENS[:1, :5]
    got = generate(ours, prompt, 150, temperature=0.0)
    ref = hf.generate(prompt, max_new_tokens=150, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)


def test_save_hf_round_trips_the_scaling_through_transformers(tmp_path):
    hf = scaled_hf()
    save_hf(from_hf(hf), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == cfg["rope_scaling"]["rope_type"] == "llama3"
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf_logits(reloaded), hf_logits(hf), atol=1e-5, rtol=0)
    ours = load_pretrained(tmp_path)
    assert ours.config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, ORIGINAL)
    assert max_error(ours, hf_logits(hf)) <= 1e-4


def test_transformers4_config_json_with_rope_scaling_loads(tmp_path):
    """transformers 4.43+ wrote the scaling under rope_scaling and theta at the top level."""
    hf = scaled_hf(theta=500000.0)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=500000.0, rope_scaling=SCALING)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_pretrained(tmp_path)
    assert ours.config.rope_theta == 500000.0 and ours.config.rope_scaling.original_max_seq_len == ORIGINAL
    assert max_error(ours, hf_logits(hf)) <= 1e-4


def test_our_checkpoint_config_keeps_the_scaling():
    """ckpt.pt stores config.to_dict(): the scaling comes back as a RopeScaling."""
    config = get_config("smoke", rope_scaling=RopeScaling(factor=4.0, original_max_seq_len=16))
    again = type(config)(**config.to_dict())
    assert again == config and isinstance(again.rope_scaling, RopeScaling)


# ---- 3. Meta's params.json and llama.cpp's GGUF -------------------------------------------------------------

META_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("tied", [False, True])
def test_meta_use_scaled_rope_is_metas_fixed_scaling(tmp_path, tied):
    """params.json `use_scaled_rope: true` (Llama 3.1): factor 8, 1, 4, original context 8192. A tied model
    (Llama 3.2 1B) has no output.weight in its shards."""
    from tests.test_checkpoints import write_meta
    hf = scaled_hf(META_SCALING, tied=tied, theta=500000.0)
    write_meta(from_hf(hf), tmp_path, n_shards=2)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    if tied:
        for f in tmp_path.glob("consolidated.*.pth"):
            torch.save({k: v for k, v in torch.load(f).items() if k != "output.weight"}, f)
    ours = load_pretrained(tmp_path)
    c = ours.config
    assert (c.rope_scaling, c.rope_theta, c.max_seq_len, c.tie_embeddings) == (RopeScaling(), 500000.0, 131072, tied)
    expected = hf_logits(hf)
    assert max_error(ours, expected) <= 1e-4
    assert max_error(without_scaling(ours), expected) > 1e-3


def convert_hf_to_gguf_rope_freqs(hf) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors): rope_freqs.weight, the number
    each frequency is divided by, from the HF config's llama3 rope scaling."""
    p, c = hf.config.rope_parameters, hf.config
    dim = c.hidden_size // c.num_attention_heads
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


def test_gguf_rope_freqs_tensor_gives_transformers_logits(tmp_path):
    from tests.test_gguf import write_gguf
    hf = scaled_hf()
    factors = convert_hf_to_gguf_rope_freqs(hf)
    write_gguf(from_hf(hf), tmp_path / "model.gguf", edit=lambda w: w.add_tensor("rope_freqs.weight", factors))
    ours = load_pretrained(tmp_path / "model.gguf")
    assert ours.config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, ORIGINAL)
    expected = hf_logits(hf)
    assert max_error(ours, expected) <= 1e-4
    assert max_error(without_scaling(ours), expected) > 1e-2


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 8B, Llama 3.2 1B/3B (as their HF configs say)
def test_gguf_rope_freqs_of_llama3_read_back_as_metas_scaling(factor):
    from utils.gguf import rope_freqs, rope_scaling_from_freqs
    hf = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                                  rope_scaling={**META_SCALING, "factor": factor})
    factors = torch.from_numpy(convert_hf_to_gguf_rope_freqs(type("HF", (), {"config": hf})))
    scaling = rope_scaling_from_freqs(factors, 64, 500000.0)
    assert scaling == RopeScaling(factor=factor)
    config = get_config("llama3.2-1b", rope_scaling=scaling)
    torch.testing.assert_close(rope_freqs(config), factors, rtol=1e-6, atol=0)  # what a GGUF writer stores


def test_gguf_rope_freqs_that_are_no_llama3_scaling_are_refused():
    from utils.gguf import rope_scaling_from_freqs
    with pytest.raises(ValueError, match="does not follow Llama 3.1's RoPE scaling rule"):
        rope_scaling_from_freqs(torch.linspace(1, 3, 32), 64, 500000.0)


# ---- 4. the presets --------------------------------------------------------------------------------------

# Hugging Face's config.json of each model, the fields that set the shapes
HF_LLAMA3 = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      max_position_embeddings=8192, tie_word_embeddings=False, rope_scaling=None),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        max_position_embeddings=131072, tie_word_embeddings=False, rope_scaling=META_SCALING),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        max_position_embeddings=131072, tie_word_embeddings=True,
                        rope_scaling={**META_SCALING, "factor": 32.0}),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        max_position_embeddings=131072, tie_word_embeddings=True,
                        rope_scaling={**META_SCALING, "factor": 32.0}),
}
COUNTS = {"llama3-8b": 8_030_261_248, "llama3.1-8b": 8_030_261_248, "llama3.2-1b": 1_235_814_400,
          "llama3.2-3b": 3_212_749_824}


def hf_llama3_config(name):
    return transformers.LlamaConfig(vocab_size=128256, num_key_value_heads=8, rms_norm_eps=1e-5,
                                    rope_theta=500000.0, **HF_LLAMA3[name])


@pytest.mark.parametrize("name", HF_LLAMA3)
def test_llama3_presets_count_what_transformers_builds(name):
    """count_params of the preset == the parameters of transformers' model of the same config (meta device:
    shapes only, nothing allocated); and the config read back from transformers' is the preset."""
    hf_config = hf_llama3_config(name)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config)
    assert count_params(get_config(name)) == sum(p.numel() for p in hf.parameters()) == COUNTS[name]
    ours = config_from_hf(hf_config)
    preset = get_config(name)
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "norm_eps", "rope_theta",
                  "rope_scaling", "max_seq_len", "tie_embeddings"):
        assert getattr(ours, field) == getattr(preset, field), field
