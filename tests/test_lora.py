"""LoRA: a zero-initialised adapter changes nothing, merging changes nothing, only adapters train, and our
LoRALinear computes what peft's LoRA computes on the same Hugging Face Llama with the same A and B."""

import copy

import pytest
import torch

from utils.lora import (
    ALL_TARGETS,
    LoRALinear,
    apply_lora,
    check_targets,
    lora_modules,
    lora_params,
    merge_lora,
    trainable_params,
)
from utils.model import Llama, get_config
from utils.rope import permute_hf_to_meta


def tiny_llama(seed=0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama(get_config("smoke", **overrides)).eval()


def randomize_lora(model, seed=1, std=0.05) -> None:
    """Non-zero B (and fresh A), so the adapters change the logits and comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * std)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("targets", [("wq", "wk", "wv", "wo"), ALL_TARGETS])
def test_zero_initialised_lora_gives_the_base_logits_exactly(targets):
    base = tiny_llama()
    with torch.no_grad():
        expected = base(TOKENS)
    lora = apply_lora(copy.deepcopy(base), rank=4, targets=targets)
    assert len(lora_modules(lora)) == len(targets) * lora.config.n_layers
    assert all(m.lora_A.abs().sum() > 0 for m in lora_modules(lora).values()), "A must start random, B at zero"
    with torch.no_grad():
        assert torch.equal(lora(TOKENS), expected)


def test_merged_equals_unmerged_and_both_differ_from_the_base():
    base = tiny_llama()
    lora = apply_lora(copy.deepcopy(base), rank=4, alpha=16, targets=ALL_TARGETS)
    randomize_lora(lora)
    with torch.no_grad():
        unmerged, before = lora(TOKENS), base(TOKENS)
        merged_model = merge_lora(lora)
        merged = merged_model(TOKENS)
    assert not lora_modules(merged_model), "merging leaves no LoRALinear behind"
    assert set(merged_model.state_dict()) == set(base.state_dict()), "a merged model has the plain Llama's names"
    assert (unmerged - before).abs().max() > 1e-2, "the adapters must change the logits for this test to mean anything"
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_one_optimizer_step_changes_only_lora_parameters_and_the_optimizer_holds_only_them():
    from utils.train import TrainConfig, make_optimizer

    model = apply_lora(tiny_llama().train(), rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    loss = model.loss(TOKENS[:, :-1], TOKENS[:, 1:])
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    lora_names = {k for k in before if k.endswith(("lora_A", "lora_B"))}
    assert changed == lora_names
    held = {id(p) for p in opt.state}
    assert held == {id(p) for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert trainable_params(model) == sum(before[k].numel() for k in lora_names)


@pytest.mark.parametrize("targets", [("wq", "wk", "wv", "wo"), ("wv", "w1", "w2")])
def test_trainable_params_match_the_count_from_the_shape(targets):
    model = apply_lora(tiny_llama(), rank=3, targets=targets)
    assert trainable_params(model) == lora_params(model.config, 3, targets)
    assert model.num_params() == tiny_llama().num_params() + lora_params(model.config, 3, targets)


def test_alpha_defaults_to_twice_the_rank():
    model = apply_lora(tiny_llama(), rank=8)
    m = next(iter(lora_modules(model).values()))
    assert (m.alpha, m.scaling) == (16.0, 2.0)


def test_bad_lora_settings_say_what_to_do():
    with pytest.raises(ValueError, match="pick from wq,wk,wv,wo,w1,w2,w3"):
        check_targets("wq,q_proj")
    with pytest.raises(ValueError, match="positive integer"):
        apply_lora(tiny_llama(), rank=0)
    with pytest.raises(ValueError, match="applied already"):
        apply_lora(apply_lora(tiny_llama(), rank=2, targets="wq"), rank=2, targets="wq")


def test_lora_linear_is_the_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=False)
    m = LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + (3.0 / 2) * (x @ m.lora_A.T) @ m.lora_B.T
    torch.testing.assert_close(m(x), expected)


# ---- against peft ------------------------------------------------------------------------------------------

HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}


def peft_and_ours(targets, rank=4, alpha=12, permute=True):
    """A tiny random HF Llama with peft's LoRA (random A and B), and ours with the same A and B copied in."""
    pytest.importorskip("transformers", reason="transformers is the reference Llama")
    pytest.importorskip("peft", reason="peft is the reference LoRA: pip install peft")
    import peft

    from tests.test_model_vs_hf import make_hf
    from utils.hf import from_hf

    hf = make_hf(8, 2, False, 10000.0, 1e-5)
    ours = apply_lora(from_hf(hf), rank=rank, alpha=alpha, targets=targets)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                          target_modules=[HF_NAMES[t].split(".")[1] for t in targets])
    hf_lora = peft.get_peft_model(hf, cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in lora_modules(ours).items():  # layers.0.attention.wq
            _, i, _, t = name.split(".")
            pm = hf_lora.base_model.model.model.layers[int(i)].get_submodule(HF_NAMES[t])
            A, B = pm.lora_A["default"].weight, pm.lora_B["default"].weight
            A.copy_(torch.randn(A.shape, generator=g) * 0.1)
            B.copy_(torch.randn(B.shape, generator=g) * 0.1)
            m.lora_A.copy_(A)
            # B writes wq's and wk's output rows, which HF stores permuted for its rotate-half RoPE
            heads = {"wq": ours.config.n_heads, "wk": ours.config.n_kv_heads}.get(t)
            m.lora_B.copy_(permute_hf_to_meta(B, heads) if heads and permute else B)
    return hf_lora, ours


@pytest.mark.parametrize("targets", [("wq", "wk", "wv", "wo"), ALL_TARGETS])
def test_our_lora_equals_peft_lora_on_the_same_hf_llama(targets):
    hf_lora, ours = peft_and_ours(targets)
    tokens = torch.randint(0, 101, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_lora(input_ids=tokens).logits
        base = hf_lora.get_base_model()
        with hf_lora.disable_adapter():
            without = base(tokens).logits
        got = ours(tokens)
        merged = merge_lora(ours)(tokens)
    assert (expected - without).abs().max() > 1e-2, "the adapters must change the logits for the test to mean anything"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)


def test_peft_comparison_detects_a_missing_q_k_permutation():
    """The check above can fail: copying HF's B of wq/wk without the RoPE permutation breaks the match."""
    hf_lora, ours = peft_and_ours(("wq", "wk"), permute=False)
    tokens = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - hf_lora(input_ids=tokens).logits).abs().max() > 1e-3
