"""Our Llama equals Hugging Face's LlamaForCausalLM, logit for logit."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from utils.generate import generate  # noqa: E402
from utils.hf import from_hf  # noqa: E402

CASES = {  # name: (n_heads, n_kv_heads, tied, rope_theta, eps)
    "gqa-untied": (8, 2, False, 10000.0, 1e-5),
    "mha-tied": (4, 4, True, 500000.0, 1e-6),
    "mqa-untied": (8, 1, False, 1234.5, 1e-4),
    "gqa-tied-theta": (6, 3, True, 50000.0, 3e-5),
}


def make_hf(n_heads, n_kv_heads, tied, theta, eps, seed=0, dim=48, layers=2, vocab=101):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=80, num_hidden_layers=layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=160,
        rms_norm_eps=eps, rope_theta=theta, tie_word_embeddings=tied,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights: a swapped norm would otherwise go unnoticed
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("case", CASES)
def test_from_hf_logits_match(case):
    hf = make_hf(*CASES[case])
    ours = from_hf(hf)
    assert ours.config.rope_theta == CASES[case][3]
    assert ours.config.norm_eps == CASES[case][4]
    assert (ours.output.weight is ours.tok_embeddings.weight) == CASES[case][2]
    tokens = torch.randint(0, 101, (3, 37))
    with torch.no_grad():
        expected = hf(tokens).logits
    got = ours(tokens)
    assert expected.abs().max() > 0.1, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_from_hf_detects_a_wrong_rope_permutation():
    """The check above can fail: skipping the q/k un-permutation breaks the match."""
    hf = make_hf(8, 2, False, 10000.0, 1e-5)
    ours = from_hf(hf)
    with torch.no_grad():
        for i, layer in enumerate(ours.layers):
            layer.attention.wq.weight.copy_(hf.model.layers[i].self_attn.q_proj.weight)
            layer.attention.wk.weight.copy_(hf.model.layers[i].self_attn.k_proj.weight)
    tokens = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["gqa-untied", "mqa-untied", "mha-tied"])
def test_greedy_generation_matches_hf_generate(case):
    # float64 so no argmax is decided by rounding noise between the two implementations
    hf = make_hf(*CASES[case], seed=1).double()
    ours = from_hf(hf)
    prompt = torch.randint(0, 101, (1, 7))
    cached = generate(ours, prompt, 80, temperature=0.0)
    uncached = generate(ours, prompt, 80, temperature=0.0, use_cache=False)
    hf.generation_config.eos_token_id = None  # no early stop, and no token suppressed on its account
    ref = hf.generate(prompt, max_new_tokens=80, do_sample=False, pad_token_id=0)
    assert cached.shape == (1, 87)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)
