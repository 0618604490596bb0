"""Each component against a reference we did not write, or against a property it must have."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.attention import Attention, causal_mask, repeat_kv
from utils.feedforward import FeedForward, swiglu_hidden_dim
from utils.model import PRESETS, Llama, LlamaConfig, count_params, flops_per_token, get_config
from utils.norm import RMSNorm, fast_rms_norm, fused_rms_norm, rms_norm
from utils.rope import (
    apply_rotary_emb,
    apply_rotary_emb_complex,
    apply_rotary_emb_hf,
    fast_apply_rotary_emb,
    permute_hf_to_meta,
    permute_meta_to_hf,
    precompute_freqs_cis,
    rope_cos_sin,
)


def rmsnorm_pair(dim: int = 64) -> tuple[RMSNorm, nn.RMSNorm]:
    """Ours and torch's RMSNorm with the same random gains."""
    torch.manual_seed(0)
    ours, ref = RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(dim))
        ref.weight.copy_(ours.weight)
    return ours, ref


def test_rmsnorm_matches_torch_rmsnorm():
    ours, ref = rmsnorm_pair()
    x = torch.randn(3, 5, 64) * 4
    torch.testing.assert_close(ours(x), ref(x))


def test_rmsnorm_hand_written_backward_matches_autograd():
    # utils' RMSNorm has its own backward: its gradients must equal autograd's through torch.nn.RMSNorm
    ours, ref = rmsnorm_pair()
    x = (torch.randn(3, 5, 64) * 4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 64)
    ours(x).backward(g)
    ref(x_ref).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    # float64 finite differences, and a bf16 input: the gradient comes back in the input's dtype
    x64 = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_rms_norm, (x64, w64, 1e-5))
    xb = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    ours(xb).sum().backward()
    for x_ in (x.detach(), xb.detach()):  # the fast path's forward is the plain one, bit for bit
        torch.testing.assert_close(fast_rms_norm(x_, ours.weight), rms_norm(x_, ours.weight), rtol=0, atol=0)
    assert xb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_fused_rms_norm_is_rms_norm_in_float32_and_one_rounding_away_in_bf16(device):
    # the GPU's eager inference path (F.rms_norm): the same numbers in float32; in bf16 it rounds once, after the
    # weight, where Meta rounds before it, so they may differ by one bf16 step of the output (2^-8 relative)
    torch.manual_seed(0)
    x, w = torch.randn(4, 9, 576, device=device) * 3, torch.randn(576, device=device) * 0.5 + 1
    torch.testing.assert_close(fused_rms_norm(x, w), rms_norm(x, w), rtol=1e-6, atol=1e-6)
    xb, wb = x.bfloat16(), w.bfloat16()
    fused, plain = fused_rms_norm(xb, wb).float(), rms_norm(xb, wb).float()
    step = plain.abs().clamp_min(1e-3) * 2.0 ** -7  # a bf16 rounding step is at most 2^-7 of the value
    assert (fused - plain).abs().le(step).all()
    assert not torch.equal(fused, rms_norm(xb, wb * 1.01).float())  # the check sees a changed weight


def test_rope_plain_form_equals_meta_complex_form_and_the_fast_path():
    x = torch.randn(2, 9, 4, 16)
    cos, sin = rope_cos_sin(16, 9, theta=10000.0)
    complex_form = apply_rotary_emb_complex(x, precompute_freqs_cis(16, 9))
    torch.testing.assert_close(apply_rotary_emb(x, cos, sin), complex_form)
    torch.testing.assert_close(fast_apply_rotary_emb(x, cos, sin), complex_form)
    compiled = torch.compile(fast_apply_rotary_emb, backend="aot_eager")  # takes the plain branch
    torch.testing.assert_close(compiled(x, cos, sin), complex_form)


def test_rope_conventions_differ_but_agree_after_permutation():
    torch.manual_seed(0)
    n_heads, hd, dim = 4, 16, 64
    wq = torch.randn(n_heads * hd, dim)
    x = torch.randn(1, 7, dim)
    cos, sin = rope_cos_sin(hd, 7)
    meta = apply_rotary_emb((x @ wq.T).view(1, 7, n_heads, hd), cos, sin)
    wq_hf = permute_meta_to_hf(wq, n_heads)
    hf = apply_rotary_emb_hf((x @ wq_hf.T).view(1, 7, n_heads, hd), cos, sin)
    naive = apply_rotary_emb_hf((x @ wq.T).view(1, 7, n_heads, hd), cos, sin)
    assert not torch.allclose(meta, naive, atol=1e-3), "same weights, other convention: must differ"
    # after the permutation, the outputs are the same numbers in a different order within each head
    torch.testing.assert_close(permute_hf_to_meta(hf.reshape(7, -1).T, n_heads).T.reshape(1, 7, n_heads, hd), meta)
    torch.testing.assert_close(permute_hf_to_meta(wq_hf, n_heads), wq)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(64), torch.randn(64)
    cos, sin = rope_cos_sin(64, 200)

    def score(m, n):
        qm = apply_rotary_emb(q.view(1, 1, 1, 64), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rotary_emb(k.view(1, 1, 1, 64), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(10, 3), score(107, 100), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score(5, 5), score(150, 150), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(10, 3), score(10, 4), atol=1e-3)


def test_gqa_with_all_kv_heads_equals_plain_multihead_attention():
    torch.manual_seed(0)
    dim, H, T = 32, 4, 6
    attn = Attention(dim, n_heads=H, n_kv_heads=H)
    x = torch.randn(2, T, dim)
    cos, sin = torch.ones(T, dim // H // 2), torch.zeros(T, dim // H // 2)  # RoPE switched off
    mha = nn.MultiheadAttention(dim, H, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))
        mha.out_proj.weight.copy_(attn.wo.weight)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    ref, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(attn(x, cos, sin), ref, atol=1e-5, rtol=1e-5)


def test_gqa_sdpa_equals_repeat_kv():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    b = F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), is_causal=True)
    torch.testing.assert_close(a, b)
    assert torch.equal(repeat_kv(k, 4)[:, 4:8], k[:, 1:2].expand(2, 4, 5, 16))


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_swiglu_rule_gives_llama2_sizes():
    assert swiglu_hidden_dim(4096, 256) == 11008                      # 7B
    assert swiglu_hidden_dim(5120, 256) == 13824                      # 13B
    assert swiglu_hidden_dim(8192, 4096, ffn_dim_multiplier=1.3) == 28672  # 70B
    assert LlamaConfig(dim=4096).hidden_dim == 11008


def test_swiglu_matches_its_formula():
    torch.manual_seed(0)
    ff = FeedForward(16, 24)
    x = torch.randn(3, 16)
    expected = (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    torch.testing.assert_close(ff(x), expected)


def test_7b_preset_parameter_count():
    assert count_params(PRESETS["llama2-7b"]) == 6_738_415_616
    assert count_params(PRESETS["llama2-13b"]) == 13_015_864_320
    assert count_params(PRESETS["llama2-70b"]) == 68_976_648_192


@pytest.mark.parametrize("name", ["smoke", "tiny", "small"])
def test_count_params_equals_built_model(name):
    for tied in (False, True):
        cfg = get_config(name, tie_embeddings=tied)
        assert Llama(cfg).num_params() == count_params(cfg)


def test_init_std_sets_the_initial_weights():
    torch.manual_seed(0)
    m = Llama(get_config("tiny", init_std=0.1))
    assert abs(m.layers[0].attention.wq.weight.std().item() - 0.1) < 0.005
    assert abs(m.tok_embeddings.weight.std().item() - 0.1) < 0.005
    assert abs(m.layers[0].attention.wo.weight.std().item() - 0.1 / math.sqrt(8)) < 0.002  # scaled by 1/sqrt(2L)
    assert torch.equal(m.norm.weight, torch.ones(128))
    assert get_config("tiny").init_std == 0.04 and get_config("small").init_std == 0.02


def test_flops_per_token_is_six_n_plus_attention():
    cfg = get_config("tiny")
    n_matmul = Llama(cfg).num_params(exclude_embeddings=True)
    assert flops_per_token(cfg, 256) == 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * 256


def test_residual_projections_are_scaled_down_with_depth():
    torch.manual_seed(0)
    model = Llama(get_config("small", vocab_size=1000))
    wo_std = model.layers[0].attention.wo.weight.std().item()
    wq_std = model.layers[0].attention.wq.weight.std().item()
    assert abs(wq_std - 0.02) < 0.002
    assert abs(wo_std - 0.02 / (2 * 6) ** 0.5) < 0.001


def test_rope_tables_stay_float32_after_casting_the_model():
    model = Llama(get_config("smoke")).to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.float32
    assert "rope_cos" not in model.state_dict()


def test_cpu_bf16_autocast_attends_in_fp32_and_stays_close_to_fp32(monkeypatch):
    # CPU bf16 training (picked on AMX CPUs) keeps attention in fp32: PyTorch's bf16 CPU attention
    # backward is several times slower. The logits and gradients must stay close to fp32's.
    torch.manual_seed(0)
    model = Llama(get_config("smoke", vocab_size=97, max_seq_len=32))
    x = torch.randint(0, 97, (2, 32))
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr("utils.attention.F.scaled_dot_product_attention", spy)
    ref = model(x)
    ref.square().mean().backward()
    g_ref = model.layers[0].attention.wq.weight.grad.clone()
    model.zero_grad()
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.square().mean().backward()
    assert seen == [(torch.float32, False)] * model.config.n_layers
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    g = model.layers[0].attention.wq.weight.grad
    assert torch.isfinite(g).all() and F.cosine_similarity(g.flatten(), g_ref.flatten(), dim=0) > 0.99


def test_auto_dtype_uses_bf16_on_cpus_with_amx_or_avx512_bf16(monkeypatch):
    from utils import device as d
    cpu = torch.device("cpu")
    for amx, avx512_bf16, dtype, why in ((True, True, torch.bfloat16, "AMX"),
                                         (False, True, torch.bfloat16, "AVX512-BF16"),
                                         (False, False, torch.float32, "no bf16 matrix instructions")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=avx512_bf16: b, raising=False)
        assert d.pick_dtype("auto", cpu) == dtype and why in d.dtype_reason("auto", cpu, dtype)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older PyTorch: the flags Linux lists
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    for flags, dtype in (({"amx_bf16", "amx_tile", "avx512f"}, torch.bfloat16), ({"avx512_bf16"}, torch.bfloat16),
                         ({"avx512f", "avx2"}, torch.float32)):
        monkeypatch.setattr(d, "cpu_flags", lambda f=flags: frozenset(f))
        assert d.pick_dtype("auto", cpu) == dtype
    from utils.device import pick_dtype
    assert pick_dtype("fp32", torch.device("cpu")) == torch.float32


def test_plain_attention_is_the_formula_head_by_head():
    """The reference against the formula written out per query head (head h reads K/V head h // n_rep)."""
    from utils.attention import attention
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    heads = []
    for h in range(6):
        scores = q[:, h] @ k[:, h // 2].transpose(-1, -2) / math.sqrt(8)  # (B, T, S)
        scores = scores + torch.full((4, 9), float("-inf")).triu(9 - 4 + 1)  # query i sits at position 5 + i
        heads.append(torch.softmax(scores, -1) @ v[:, h // 2])
    torch.testing.assert_close(attention(q, k, v), torch.stack(heads, 1))


@pytest.mark.parametrize("T, S", [(1, 9), (6, 6), (4, 9)])
def test_fused_attention_equals_plain_attention(T, S):
    # decode (one query, every key), plain causal, and a chunk after cached keys (bottom-right mask)
    from utils.attention import attention, fused_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, T, 8), torch.randn(2, 3, S, 8), torch.randn(2, 3, S, 8)
    torch.testing.assert_close(fused_attention(q, k, v), attention(q, k, v))


@pytest.mark.parametrize("T", [1, 3])
def test_fused_attention_at_a_tensor_position_hides_the_keys_after_it(T):
    """A fixed-size cache (the compiled decode step): keys past start_pos + i hold stale numbers, never read."""
    from utils.attention import attention, fused_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, T, 8), torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    start_pos = torch.tensor([5])
    expected = attention(q, k[:, :, :5 + T], v[:, :, :5 + T])  # only what is written: positions 0 .. 5 + T - 1
    torch.testing.assert_close(fused_attention(q, k, v, start_pos=start_pos), expected)
    torch.testing.assert_close(attention(q, k, v, causal_mask(T, 16, start_pos=start_pos)), expected)


def test_kv_cache_update_at_a_tensor_position_writes_in_place_and_returns_the_whole_cache():
    from utils.attention import KVCache
    cache, xk = KVCache(1, 2, 8, 4), torch.randn(1, 2, 3, 4)
    k, v = cache.update(torch.tensor([2]), xk, -xk)
    assert k.shape == (1, 2, 8, 4) and k.data_ptr() == cache.k.data_ptr()
    assert torch.equal(cache.k[:, :, 2:5], xk) and torch.equal(cache.v[:, :, 2:5], -xk)
    assert cache.k[:, :, :2].abs().sum() == 0 and cache.k[:, :, 5:].abs().sum() == 0
