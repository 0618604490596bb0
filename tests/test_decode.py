"""The forward with the position as a tensor (utils/decode.py's step) against the plain forward, eager and compiled."""

import pytest
import torch
from torch._dynamo.utils import counters

from utils.decode import cache_length, decode_step, decoder
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
        decoder(model).attach(model, 2, 12)
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


def test_the_decoder_keeps_its_caches_when_the_size_fits_and_copies_what_it_keeps_when_it_grows():
    model = tiny()
    attach = decoder(model).attach
    assert attach(model, 1, 40, keep=5) == 0  # nothing to keep yet
    first = model.layers[0].attention.cache
    first.k.normal_()
    model.clear_cache()
    attach(model, 1, 200)  # same 256-position bucket: same addresses (CUDA graphs need them)
    assert model.layers[0].attention.cache is first
    assert attach(model, 1, 300, keep=7) == 7
    grown = model.layers[0].attention.cache
    assert grown is not first and grown.max_seq_len == 512
    assert torch.equal(grown.k[:, :, :7], first.k[:, :, :7]) and grown.k[:, :, 7:].abs().sum() == 0
    model.clear_cache()
    assert not hasattr(model, "_static_caches") and not hasattr(model, "_compiled_decode")


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
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(generate(model, prompt, 25, temperature=0, compile=True), plain[:, :32])
    shorter = generate(model, prompt[:, :3], 30, temperature=0)
    assert torch.equal(generate(model, prompt[:, :3], 30, temperature=0, compile=True), shorter)
    assert counters["stats"]["unique_graphs"] == graphs  # one compile for every prompt length
    assert all(layer.attention.cache is None for layer in model.layers)  # the model is left as it was found
    first = decoder(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # as an optimizer step would: same tensors, new values
    plain = generate(model, prompt, 30, temperature=0)
    assert decoder(model) is not first
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
