"""The KV cache changes the cost of generation, never its result."""

import pytest
import torch

from utils.generate import generate, sample_next, stream
from utils.model import Llama, get_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Llama(get_config("smoke", vocab_size=97, max_seq_len=128, n_heads=4, n_kv_heads=2)).double().eval()
    with torch.no_grad():  # larger weights than the init, so greedy choices are far from ties
        for p in m.parameters():
            p.mul_(4.0)
    return m


def test_kv_cache_greedy_tokens_match_uncached(model):
    prompt = torch.randint(0, 97, (2, 9))
    cached = generate(model, prompt, 72, temperature=0.0)
    uncached = generate(model, prompt, 72, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 81)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 9:].tolist())) > 3, "degenerate output would make the check weak"


def test_prompt_in_two_chunks_gives_the_same_logits_as_in_one(model):
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 64)
        first = model(tokens[:, :17], start_pos=0)
        second = model(tokens[:, 17:], start_pos=17)  # a chunk of 13 after 17 cached tokens
        model.clear_cache()
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-10, rtol=0)


def test_chunk_with_top_left_mask_would_be_wrong(model):
    """The bottom-right alignment matters: SDPA's is_causal on a chunk hides the chunk's own past."""
    import torch.nn.functional as F
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8)
    from utils.attention import causal_mask
    right = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(3, 10))
    wrong = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(right, wrong)


def test_cache_reports_bytes_and_resets(model):
    c = model.config
    nbytes = model.setup_cache(3, 50)
    assert nbytes == 2 * c.n_layers * 3 * c.n_kv_heads * 50 * c.head_dim * 8  # float64
    with torch.no_grad():
        model(torch.randint(0, 97, (3, 5)))
    assert model.layers[0].attention.cache.k.abs().sum() > 0
    model.reset_cache()
    assert model.layers[0].attention.cache.k.abs().sum() == 0
    model.clear_cache()
    assert not model.has_cache


def test_sampling_with_a_seed_is_reproducible(model):
    prompt = torch.randint(0, 97, (1, 4))
    a = generate(model, prompt, 20, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 20, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
    c = generate(model, prompt, 20, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cached_sampling_equals_uncached_sampling(model):
    prompt = torch.randint(0, 97, (2, 4))
    kw = dict(temperature=0.8, top_p=0.9)
    a = generate(model, prompt, 30, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, prompt, 30, use_cache=False, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    p = torch.softmax(logits[0], 0)  # 0.636, 0.234, ...: top_p=0.7 keeps tokens 0 and 1
    assert p[0] < 0.7 < p[0] + p[1]
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert sample_next(logits[:1], 0.0).item() == 0


def test_stop_token_ends_generation_early(model):
    prompt = torch.randint(0, 97, (1, 4))
    free = generate(model, prompt, 30, temperature=0.0)
    stop = free[0, 10].item()  # the 7th generated token
    out = generate(model, prompt, 30, temperature=0.0, stop_token=stop)
    first = (free[0, 4:] == stop).nonzero()[0].item()
    assert out.shape[1] == 4 + first + 1 and out[0, -1].item() == stop


def test_stop_token_may_be_several_ids_and_finished_rows_repeat_theirs(model):
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(5))
    free = generate(model, prompt, 30, temperature=0.0)
    stops = {free[0, 8].item(), free[1, 12].item()}  # one id from each row's continuation
    out = generate(model, prompt, 30, temperature=0.0, stop_token=stops)
    firsts = [next(t for t in range(4, 34) if free[r, t].item() in stops) for r in range(2)]
    assert out.shape[1] == max(firsts) + 1  # generation ends when the slower row stops
    for r, first in enumerate(firsts):
        assert torch.equal(out[r, :first + 1], free[r, :first + 1])
        assert (out[r, first:] == free[r, first]).all()  # then it repeats the stop token it produced


def test_stream_yields_the_same_tokens_one_at_a_time(model):
    prompt = torch.randint(0, 97, (1, 4))
    pieces = list(stream(model, prompt, 12, temperature=0.0))
    assert len(pieces) == 12 and pieces[0].shape == (1,)
    assert torch.equal(torch.stack(pieces, 1), generate(model, prompt, 12, temperature=0.0)[:, 4:])
    assert not model.has_cache and model.training is False


def test_generation_restores_training_mode():
    m = Llama(get_config("smoke"))
    m.train()
    generate(m, torch.zeros(1, 3, dtype=torch.long), 2)
    assert m.training and not m.has_cache
