"""The GPU paths: cache equality, HF parity, bf16, fp16 with loss scaling, torch.compile.

Skipped where there is no CUDA device (CI has none); run them on a GPU machine with
`python -m pytest tests/test_cuda.py`.
"""

import pytest
import torch

from utils.checkpoints import load_model
from utils.generate import generate
from utils.model import Llama, get_config
from utils.runs import load_checkpoint
from utils.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def test_kv_cache_greedy_tokens_match_uncached_on_cuda():
    torch.manual_seed(0)  # float64: no argmax is decided by rounding noise between the two paths
    model = Llama(get_config("smoke", vocab_size=97, max_seq_len=96)).to(CUDA, torch.float64).eval()
    prompt = torch.randint(0, 97, (3, 11), device=CUDA)
    cached = generate(model, prompt, 70, temperature=0)
    uncached = generate(model, prompt, 70, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_seeded_sampling_on_cuda_is_reproducible_and_cache_independent():
    torch.manual_seed(0)
    model = Llama(get_config("smoke", vocab_size=97, max_seq_len=96)).to(CUDA, torch.float64).eval()
    prompt = torch.randint(0, 97, (2, 5), device=CUDA)
    runs = [generate(model, prompt, 40, top_k=20, use_cache=c, generator=torch.Generator(CUDA).manual_seed(3))
            for c in (True, True, False)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_logits_match_hf_on_cuda():
    transformers = pytest.importorskip("transformers")
    from utils.hf import from_hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ours = from_hf(hf).eval()
    hf, ours = hf.to(CUDA), ours.to(CUDA)
    x = torch.randint(0, 101, (2, 50), device=CUDA)
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(input_ids=x).logits, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # bf16: same math, looser rounding
            a, b = ours(x).float(), hf(input_ids=x).logits.float()
        assert (a - b).abs().max() < 0.1


def gpu_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(preset="smoke", tokenizer="char", max_seq_len=32, batch_size=16, max_steps=60, eval_interval=30,
                eval_windows=8, lr=3e-3, warmup_steps=5, out_dir=str(tmp_path / "run"), progress=False,
                device="cuda", seed=7)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "auto"])
def test_mixed_precision_training_learns(tmp_path, corpus, dtype):
    m = train(gpu_cfg(tmp_path, dtype=dtype), data=corpus[1])
    first = sum(h["train_loss"] for h in m["history"][:5]) / 5
    last = sum(h["train_loss"] for h in m["history"][-5:]) / 5
    assert last < first - 1.0, (first, last)
    expected = {"bf16": "bfloat16", "fp16": "float16", "auto": "bfloat16"}  # auto: Ampere and later have bf16
    if dtype != "auto" or torch.cuda.is_bf16_supported(including_emulation=False):
        assert m["dtype"] == expected[dtype]
    ckpt = load_checkpoint(tmp_path / "run")
    assert bool(ckpt["scaler"]) == (m["dtype"] == "float16")  # loss scaling only for fp16
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # master weights stay fp32


def test_fp16_resume_equals_uninterrupted_run(tmp_path, corpus):
    kw = dict(dtype="fp16", max_steps=10, eval_interval=100)
    full = train(gpu_cfg(tmp_path / "a", **kw), data=corpus[1])
    train(gpu_cfg(tmp_path / "b", **kw), data=corpus[1], callback=lambda t: t.step == 6)
    resumed = train(gpu_cfg(tmp_path / "b", **kw), data=corpus[1], resume=True)
    # GPU kernels may add in a different order from run to run, so equal to rounding, not bit for bit
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in full["history"]],
                                                                          rel=1e-4)


def test_compiled_training_saves_a_plain_checkpoint(tmp_path, corpus):
    m = train(gpu_cfg(tmp_path, compile=True, dtype="bf16", max_steps=30), data=corpus[1])
    assert m["val_loss"] < m["history"][0]["train_loss"] - 0.5
    ckpt = load_checkpoint(tmp_path / "run")
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    model, tok = load_model(tmp_path / "run", device="cuda")
    out = generate(model, torch.tensor([[0]], device=CUDA), 10, temperature=0)
    assert out.shape == (1, 11)


def test_fast_decode_step_gives_the_eager_tokens_on_cuda():
    """utils/decode.py on a GPU: torch.compile(mode="reduce-overhead") replays one CUDA graph per token."""
    torch.manual_seed(0)
    model = Llama(get_config("smoke", vocab_size=97, max_seq_len=256)).to(CUDA).eval()
    prompt = torch.randint(0, 97, (1, 9), device=CUDA)
    eager = generate(model, prompt, 60, temperature=0)
    assert torch.equal(generate(model, prompt, 60, temperature=0, compile=True), eager)
    assert torch.equal(generate(model, prompt, 50, temperature=0, compile=True), eager[:, :59])  # graph replayed
