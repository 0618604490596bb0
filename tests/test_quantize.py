"""Int8 weight-only quantization (utils/quantize.py): the error bound, the kernel, the model, the CLI."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from utils.__main__ import main
from utils.checkpoints import load_pretrained_tokenizer
from utils.generate import generate
from utils.hf import save_hf
from utils.model import Llama, LlamaConfig
from utils.quantize import (
    Int8Linear,
    dequantize,
    fast_int8_linear,
    int8_linear,
    quantize_int8,
    quantize_per_channel,
    uses_int8_kernel,
)

needs_compile = pytest.mark.skipif(
    not torch._dynamo.is_dynamo_supported()
    or not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")),
    reason="torch.compile is unavailable here (inductor needs a supported Python and a C++ compiler on a CPU)")


def tiny(seed=0, **kw) -> Llama:
    """A random tiny model whose rows differ in size, as trained models' do (one outlier row per matrix)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, multiple_of=32)
    model = Llama(LlamaConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.empty(m.weight.shape[0], 1).log_normal_(0, 0.5))
    return model


def rows_with_outliers(out=48, inp=64) -> torch.Tensor:
    w = torch.randn(out, inp) * torch.logspace(-3, 1, out)[:, None]  # rows four decades apart
    w[3, 7] = 40.0  # an outlier coarsens its own row only
    w[5] = 0.0  # an all-zero row must not divide by zero
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_channel_round_trip_is_within_half_a_step_of_each_rows_scale(dtype):
    torch.manual_seed(0)
    w = rows_with_outliers()
    q, scales = quantize_per_channel(w, dtype)
    assert q.dtype == torch.int8 and scales.dtype == dtype and scales.shape == (48,)
    s = scales.float()[:, None]
    assert ((w - q.float() * s).abs() <= s / 2 * (1 + 1e-6)).all()
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[torch.arange(48) != 5] >= 126).all()  # full range used
    assert (q[5] == 0).all()
    assert torch.equal(dequantize(q, scales), (q.float() * s).to(dtype))  # the weight it stands for, in dtype


def test_the_int8_forms_equal_a_linear_on_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=False)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        layer = Int8Linear.from_linear(linear, dtype)
        w = dequantize(layer.weight, layer.scales).float()  # (96, 64)
        for shape in ((1, 1, 64), (2, 1, 64), (2, 30, 64)):  # decode steps, and a prompt (plain form)
            x = torch.randn(shape).to(dtype)
            expected = F.linear(x.float(), w)
            scale = expected.abs().max()
            for got in (layer(x), int8_linear(x, layer.weight, layer.scales),
                        fast_int8_linear(x, layer.weight, layer.scales)):
                assert got.dtype == dtype and got.shape == (*shape[:-1], 96)
                assert (got.float() - expected).abs().max() <= tol * scale
    bf16 = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    assert uses_int8_kernel(bf16, layer.weight)  # eager decoding runs the kernel ...
    assert not uses_int8_kernel(bf16.float(), layer.weight) and not uses_int8_kernel(bf16.expand(1, 64, 64),
                                                                                     layer.weight)  # ... only then


def quantize_with(model: Llama, rule) -> Llama:
    """Every nn.Linear replaced by Int8Linear(*rule(weight)), activations left in float32."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(*rule(child.weight.detach())))
    return model


def per_tensor(w):  # one scale for the whole matrix: rows with small weights get a coarse grid
    s = w.abs().max() / 127
    return torch.round(w / s).to(torch.int8), s.expand(w.shape[0]).clone()


def truncated(w):  # per channel, but rounding towards zero: errors up to a whole step, all one way
    q, s = quantize_per_channel(w, torch.float32)
    return torch.trunc(w / s[:, None]).to(torch.int8), s


@torch.inference_mode()
def test_quantized_logits_are_close_and_a_wrong_quantization_is_measurably_worse():
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    reference = tiny()(tokens)
    error = lambda model: ((model(tokens) - reference).abs().mean() / reference.abs().mean()).item()  # noqa: E731
    ours = error(quantize_int8(tiny(), torch.float32))
    assert ours < 0.02
    assert error(quantize_with(tiny(), per_tensor)) > 3 * ours
    assert error(quantize_with(tiny(), truncated)) > 1.5 * ours
    assert error(quantize_int8(tiny())) < 0.03  # bf16 activations add their own rounding


def test_quantize_int8_keeps_the_embedding_and_gives_a_tied_output_its_own_copy():
    model = quantize_int8(tiny(tie_embeddings=True))
    assert isinstance(model.output, Int8Linear) and isinstance(model.layers[1].feed_forward.w2, Int8Linear)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and model.output.weight.dtype == torch.int8
    names = set(model.state_dict())
    assert {"layers.0.attention.wq.weight", "layers.0.attention.wq.scales", "output.scales"} <= names
    with pytest.raises(ValueError, match="quantized already"):
        quantize_int8(model)


def test_kv_cache_greedy_tokens_match_uncached_on_a_quantized_model():
    """In float32 activations, so that the cache is what is tested: bf16 rounds the decode kernel's sums and the
    prompt's plain form differently, and a near-tie then flips a token after some 10 or 20 (next test)."""
    model = quantize_int8(tiny(), torch.float32)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, 24, temperature=0)
    assert torch.equal(cached, generate(model, prompt, 24, temperature=0, use_cache=False))


@torch.inference_mode()
def test_bf16_decode_steps_through_the_kernel_give_the_logits_of_the_whole_sequence():
    model = quantize_int8(tiny())
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    whole = model(tokens)  # (2, 24, vocab): 48 rows, the plain form
    model.setup_cache(2, 24)
    assert model.layers[0].attention.cache.k.dtype == torch.bfloat16  # the activations' dtype, not int8
    steps = [model(tokens[:, :5])[:, -1]] + [model(tokens[:, t:t + 1], start_pos=t)[:, -1] for t in range(5, 24)]
    model.clear_cache()
    torch.testing.assert_close(torch.stack(steps, 1), whole[:, 4:], atol=0.02 * whole.abs().max().item(), rtol=0)


@needs_compile
def test_compiled_quantized_decoding_gives_the_eager_tokens_through_the_int8_kernel():
    """One compile (about a minute on 2 cores, autotuning included). Inductor's freezing must recognise each
    Int8Linear's plain form as an int8 matrix product (its "woq" pattern): 7 projections per layer and the output."""
    model = quantize_int8(tiny())
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    eager = generate(model, prompt, 24, temperature=0)
    matched = counters["inductor"]["woq_matcher_count"]
    assert torch.equal(generate(model, prompt, 24, temperature=0, compile=True), eager)
    assert counters["inductor"]["woq_matcher_count"] - matched == 7 * 2 + 1


def hf_folder(path, dim=32, hidden_dim=64):
    """A tiny HF checkpoint with a word-level tokenizer (as tests/test_chat.py builds one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    save_hf(Llama(LlamaConfig(vocab_size=64, dim=dim, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=hidden_dim,
                              max_seq_len=128, tie_embeddings=True)), path)
    words = ["<unk>", "<s>", "</s>", "hello", "there"] + [f"w{i}" for i in range(5, 64)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


@pytest.mark.parametrize("extra", [(), pytest.param(("--compile",), marks=needs_compile)])
def test_generate_quantize_int8_prints_what_the_quantized_model_generates(tmp_path, capsys, monkeypatch, extra):
    """With --compile too (one compile of a 1-layer model, a few seconds)."""
    import utils.quantize

    quantized, real = [], utils.quantize.quantize_int8
    monkeypatch.setattr(utils.quantize, "quantize_int8", lambda *a: quantized.append(real(*a)) or quantized[-1])
    folder = hf_folder(tmp_path)
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "hello there", "--temperature", "0",
                 "--max-new-tokens", "6", "--quantize", "int8", *extra]) == 0
    printed = capsys.readouterr().out
    model = quantized[0]
    assert isinstance(model.output, Int8Linear) and model.tok_embeddings.weight.dtype == torch.bfloat16
    tok = load_pretrained_tokenizer(folder)
    ids = tok.encode("hello there")
    new = generate(model, torch.tensor([ids]), 6, temperature=0, compile=bool(extra))[0, len(ids):].tolist()
    new = new[:new.index(tok.eot_id)] if tok.eot_id in new else new
    assert printed.rstrip("\n") == "hello there" + tok.decode(ids + new)[len(tok.decode(ids)):]


def test_chat_quantize_int8_answers(tmp_path, capsys):
    folder = hf_folder(tmp_path)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    assert main(["chat", "--checkpoint", str(folder), "--message", "hello", "--temperature", "0",
                 "--max-new-tokens", "4", "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.strip()


def test_quantize_int8_on_a_width_the_bf16_kernel_misreads_is_one_line_and_exit_2(tmp_path, capsys):
    folder = hf_folder(tmp_path, dim=40, hidden_dim=72)  # head_dim 10: wo reads 40 inputs, w2 72
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "hello", "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "multiple of 16" in err and "--dtype float32" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "hello", "--max-new-tokens", "3",
                 "--quantize", "int8", "--dtype", "float32"]) == 0  # the plain form reads any width
