"""The fixed-shape decode step (utils/decode.py) against the plain forward, eager and compiled."""

import pytest
import torch

from utils.decode import attach_cache, cache_length, decode_step, fast_decode_step
from utils.generate import generate
from utils.model import Llama, LlamaConfig


def tiny(seed=0, **kw) -> Llama:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512, multiple_of=32)
    return Llama(LlamaConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_decode_step_equals_the_plain_forward(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 97, (2, 12))
    with torch.inference_mode():
        expected = model(tokens)  # (2, 12, vocab), no cache
        attach_cache(model, 2, 12)
        for layer in model.layers:  # stale keys from an earlier call must stay invisible
            layer.attention.cache.k.normal_()
            layer.attention.cache.v.normal_()
        prefill = model(tokens[:, :5])[:, -1]
        torch.testing.assert_close(prefill, expected[:, 4], atol=1e-5, rtol=1e-5)
        for pos in range(5, 12):
            logits = decode_step(model, tokens[:, pos:pos + 1], torch.tensor([pos]))
            torch.testing.assert_close(logits, expected[:, pos], atol=1e-5, rtol=1e-5)
        model.clear_cache()


def test_cache_length_comes_in_few_sizes():
    assert [cache_length(n, 4096) for n in (1, 200, 256, 257, 600, 3000, 5000)] == [256, 256, 256, 512, 1024,
                                                                                     4096, 4096]
    assert cache_length(100, 64) == 64  # never past the model's context


def test_attach_cache_reuses_the_same_tensors_when_the_size_fits():
    model = tiny()
    attach_cache(model, 1, 40)
    first = model.layers[0].attention.cache
    model.clear_cache()
    attach_cache(model, 1, 200)  # same 256-position bucket: same addresses (CUDA graphs need them)
    assert model.layers[0].attention.cache is first
    attach_cache(model, 1, 300)
    assert model.layers[0].attention.cache is not first and model.layers[0].attention.cache.max_seq_len == 512
    model.clear_cache()


def test_compile_needs_the_cache():
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(tiny(), torch.zeros(1, 3, dtype=torch.long), 4, use_cache=False, compile=True)


def test_compiled_decoding_gives_the_plain_tokens_and_follows_new_weights():
    """One compile (~10 s on 2 cores). CPU freezing bakes the weights into the compiled step, so after the
    weights change in place the step must be rebuilt, not reused with the old ones."""
    model = tiny()
    prompt = torch.randint(0, 97, (2, 7))
    plain = generate(model, prompt, 30, temperature=0)
    assert torch.equal(generate(model, prompt, 30, temperature=0, compile=True), plain)
    assert torch.equal(generate(model, prompt, 25, temperature=0, compile=True), plain[:, :32])  # no recompile
    assert all(layer.attention.cache is None for layer in model.layers)  # the model is left as it was found
    first = fast_decode_step(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # as an optimizer step would: same tensors, new values
    plain = generate(model, prompt, 30, temperature=0)
    assert fast_decode_step(model) is not first
    assert torch.equal(generate(model, prompt, 30, temperature=0, compile=True), plain)


def test_two_models_of_one_shape_each_decode_with_their_own_weights():
    """The compiled step is one function for every model; frozen weights must never leak from one to another."""
    a, b = tiny(seed=0), tiny(seed=1)
    prompt = torch.randint(0, 97, (1, 5))
    plain = [generate(m, prompt, 20, temperature=0) for m in (a, b)]
    assert not torch.equal(*plain)
    for _ in range(2):  # alternating, after both are compiled
        assert torch.equal(generate(a, prompt, 20, temperature=0, compile=True), plain[0])
        assert torch.equal(generate(b, prompt, 20, temperature=0, compile=True), plain[1])
