"""load_pretrained reads every checkpoint layout we support with the logits of the model it came from.

Every file is written here by the layout's own rules (transformers' save_pretrained, Meta's
model-parallel sharding, llama2c's export.py byte layouts): nothing is downloaded.
"""

import io
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from utils.checkpoints import detect_format, load_pretrained, load_pretrained_tokenizer
from utils.hf import save_hf
from utils.model import Llama, LlamaConfig
from utils.rope import rope_cos_sin

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(0))


# ---- models and writers -------------------------------------------------------------------------------

def random_llama(tied=True, n_heads=4, n_kv_heads=2, vocab_size=96, seed=0, **kw) -> Llama:
    """A tiny GQA Llama with weights large enough for the logits to mean something, and non-unit norms."""
    torch.manual_seed(seed)
    kw = {"hidden_dim": 64, "norm_eps": 1e-6, "rope_theta": 5000.0, **kw}
    cfg = LlamaConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      max_seq_len=64, tie_embeddings=tied, **kw)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.5 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def assert_same_logits(got: Llama, expected, tokens=TOKENS, atol=1e-5):
    with torch.no_grad():
        ref = expected(tokens)
        ref = getattr(ref, "logits", ref)
        assert ref.abs().max() > 0.5, "logits too small for the comparison to mean anything"
        torch.testing.assert_close(got(tokens), ref, atol=atol, rtol=0)


def make_hf(n_heads, n_kv_heads, tied, seed=0, theta=10000.0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=theta,
        tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.5 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return hf


def write_hf_bin(hf, directory, n_shards=1):
    """transformers 4's .bin layout: pytorch_model.bin, or shards + pytorch_model.bin.index.json."""
    hf.config.save_pretrained(directory)
    sd = hf.state_dict()
    if n_shards == 1:
        return torch.save(sd, directory / "pytorch_model.bin")
    keys, weight_map = list(sd), {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        torch.save({k: sd[k] for k in keys[i::n_shards]}, directory / name)
        weight_map.update({k: name for k in keys[i::n_shards]})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_hf(hf, directory, layout):
    if layout == "safetensors":
        hf.save_pretrained(directory)
    elif layout == "sharded-safetensors":
        hf.save_pretrained(directory, max_shard_size="20KB")
        assert (directory / "model.safetensors.index.json").exists()
    else:
        write_hf_bin(hf, directory, n_shards=3 if layout == "sharded-bin" else 1)


META_SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0}


def write_meta(model, directory, n_shards):
    """params.json (vocab_size -1, as Meta ships it) + consolidated.NN.pth split like fairscale's layers."""
    c = model.config
    params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "vocab_size": -1, "multiple_of": c.multiple_of, "ffn_dim_multiplier": c.ffn_dim_multiplier,
              "norm_eps": c.norm_eps, "rope_theta": c.rope_theta}
    (directory / "params.json").write_text(json.dumps(params))
    sd = model.state_dict()
    for i in range(n_shards):
        shard = {"rope.freqs": torch.ones(c.head_dim // 2)}
        for k, v in sd.items():
            dim = META_SPLIT.get(k.split(".")[-2])
            shard[k] = v.clone() if dim is None else v.chunk(n_shards, dim)[i].clone()
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")


def write_meta_llama3(directory: Path, tokenizer_model: Path) -> Path:
    """A tiny random Meta Llama 3 folder: consolidated.00.pth and params.json for Llama 3's 128,256 ids, beside the
    given tokenizer.model (Meta's tiktoken file)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    write_meta(Llama(LlamaConfig(vocab_size=128256, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=64)),
               directory, n_shards=1)
    (directory / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    return directory


LLAMA2C = {"rope_theta": 10000.0, "norm_eps": 1e-5}  # fixed in llama2c (run.c), not stored in its files


def llama2c_model_args(c: LlamaConfig) -> dict:
    return {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
            "vocab_size": c.vocab_size, "hidden_dim": c.hidden_dim, "multiple_of": c.multiple_of,
            "norm_eps": c.norm_eps, "max_seq_len": c.max_seq_len, "dropout": 0.0}


def fp32(f, t):
    f.write(t.detach().float().contiguous().numpy().astype("<f4").tobytes())


def llama2c_header_params(model):
    c = model.config
    return [c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len]


def write_llama2c_v0(model, path):
    """export.py legacy_export: 7 int32, vocab_size < 0 if not shared, then fp32 weights (and freqs)."""
    c, L = model.config, model.layers
    p = llama2c_header_params(model)
    p[5] = p[5] if c.tie_embeddings else -p[5]
    cos, sin = rope_cos_sin(c.head_dim, c.max_seq_len)
    with open(path, "wb") as f:
        f.write(struct.pack("7i", *p))
        fp32(f, model.tok_embeddings.weight)
        for get in (lambda b: b.attention_norm, lambda b: b.attention.wq, lambda b: b.attention.wk,
                    lambda b: b.attention.wv, lambda b: b.attention.wo, lambda b: b.ffn_norm,
                    lambda b: b.feed_forward.w1, lambda b: b.feed_forward.w2, lambda b: b.feed_forward.w3):
            for block in L:
                fp32(f, get(block).weight)
        fp32(f, model.norm.weight)
        fp32(f, cos)
        fp32(f, sin)
        if not c.tie_embeddings:
            fp32(f, model.output.weight)


def llama2c_matrices(model):
    L = model.layers
    return [model.tok_embeddings.weight, *[b.attention.wq.weight for b in L], *[b.attention.wk.weight for b in L],
            *[b.attention.wv.weight for b in L], *[b.attention.wo.weight for b in L],
            *[b.feed_forward.w1.weight for b in L], *[b.feed_forward.w2.weight for b in L],
            *[b.feed_forward.w3.weight for b in L]] + ([] if model.config.tie_embeddings else [model.output.weight])


def llama2c_header(f, model, version, group_size=None):
    f.write(struct.pack("I", 0x616B3432))
    f.write(struct.pack("i", version))
    f.write(struct.pack("7i", *llama2c_header_params(model)))
    f.write(struct.pack("B", int(model.config.tie_embeddings)))
    if group_size is not None:
        f.write(struct.pack("i", group_size))
    f.write(b"\0" * (256 - f.tell()))


def write_llama2c_v1(model, path):
    """export.py version1_export: 256-byte "ak42" header, norms first, then the matrices, fp32."""
    with open(path, "wb") as f:
        llama2c_header(f, model, 1)
        for w in [*[b.attention_norm.weight for b in model.layers], *[b.ffn_norm.weight for b in model.layers],
                  model.norm.weight, *llama2c_matrices(model)]:
            fp32(f, w)


def quantize_q80(w, group_size):
    """export.py's quantize_q80: symmetric int8 per group of group_size values."""
    w = w.detach().float().reshape(-1, group_size)
    scale = w.abs().max(dim=1).values / 127.0
    return torch.round(w / scale[:, None]).to(torch.int8), scale


@torch.no_grad()
def write_llama2c_v2(model, path, group_size=16) -> Llama:
    """export.py version2_export; returns the model with the dequantised weights the file holds."""
    with open(path, "wb") as f:
        llama2c_header(f, model, 2, group_size)
        for w in [*[b.attention_norm.weight for b in model.layers], *[b.ffn_norm.weight for b in model.layers],
                  model.norm.weight]:
            fp32(f, w)
        for w in llama2c_matrices(model):
            q, s = quantize_q80(w, group_size)
            f.write(q.numpy().tobytes())
            fp32(f, s)
            w.copy_((q.float() * s[:, None]).reshape(w.shape))
    return model


# ---- 1. Hugging Face directories ----------------------------------------------------------------------

HF_CASES = {"gqa-untied": (8, 2, False), "mha-tied": (4, 4, True)}


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
@pytest.mark.parametrize("case", HF_CASES)
def test_hf_directory_logits_match_transformers(tmp_path, layout, case):
    hf = make_hf(*HF_CASES[case])
    write_hf(hf, tmp_path, layout)
    assert detect_format(tmp_path) == "hf"
    ours = load_pretrained(tmp_path)
    assert not ours.training
    assert (ours.output.weight is ours.tok_embeddings.weight) == HF_CASES[case][2]
    assert ours.config.max_seq_len == 64 and ours.config.norm_eps == 1e-5
    assert_same_logits(ours, hf, TOKENS % 101, atol=1e-4)


def test_hf_transformers4_config_with_top_level_rope_theta(tmp_path):
    hf = make_hf(8, 2, False, theta=500000.0)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=500000.0, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_pretrained(tmp_path)
    assert ours.config.rope_theta == 500000.0
    assert_same_logits(ours, hf, TOKENS % 101, atol=1e-4)


def test_load_pretrained_casts_dtype_and_overrides_max_seq_len(tmp_path):
    make_hf(4, 2, True).save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, dtype="bfloat16", max_seq_len=128)
    assert ours.tok_embeddings.weight.dtype == torch.bfloat16 and ours.rope_cos.dtype == torch.float32
    assert ours.config.max_seq_len == 128 and ours.rope_cos.shape[0] == 128


def test_hub_id_offline_gives_a_clear_error():
    assert detect_format("some-owner/some-llama") == "hub"
    with pytest.raises(FileNotFoundError, match="^no folder some-owner/some-llama here, and the Hugging Face hub"):
        load_pretrained("some-owner/some-llama")


# ---- 2. Meta and llama2.c -----------------------------------------------------------------------------

@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_directory_logits_match(tmp_path, n_shards):
    model = random_llama(tied=False, hidden_dim=None, multiple_of=16, ffn_dim_multiplier=1.3)
    assert model.config.hidden_dim == 112
    write_meta(model, tmp_path, n_shards)
    assert detect_format(tmp_path) == "meta"
    ours = load_pretrained(tmp_path)
    c = ours.config
    assert (c.vocab_size, c.hidden_dim, c.n_kv_heads, c.rope_theta, c.norm_eps) == (96, 112, 2, 5000.0, 1e-6)
    assert c.max_seq_len == 4096 and load_pretrained(tmp_path, max_seq_len=256).config.max_seq_len == 256
    assert_same_logits(ours, model)


def test_llama2c_pt_logits_match(tmp_path):
    model = random_llama(tied=True, **LLAMA2C)
    sd = {**model.state_dict(), "freqs_cos": torch.zeros(64, 4), "freqs_sin": torch.zeros(64, 4)}
    # llama2c's checkpoint also has a "config" dict (its training globals): "model_args" tells them apart
    ckpt = {"model": sd, "model_args": llama2c_model_args(model.config), "optimizer": {}, "iter_num": 5,
            "best_val_loss": 1.0, "config": {"dim": 32, "batch_size": 8}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert detect_format(tmp_path / "ckpt.pt") == detect_format(tmp_path) == "llama2c-pt"
    ours = load_pretrained(tmp_path / "ckpt.pt")
    assert ours.output.weight is ours.tok_embeddings.weight and ours.config.n_kv_heads == 2
    assert_same_logits(ours, model)


@pytest.mark.parametrize("version,tied", [(0, True), (0, False), (1, True), (1, False), (2, True)])
def test_llama2c_bin_logits_match(tmp_path, version, tied):
    model = random_llama(tied=tied, **LLAMA2C)
    path = tmp_path / "model.bin"
    if version == 2:
        model = write_llama2c_v2(model, path)  # compare with the int8 weights the file holds
    else:
        (write_llama2c_v0 if version == 0 else write_llama2c_v1)(model, path)
    assert detect_format(path) == "llama2c-bin"
    ours = load_pretrained(path)
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    assert (ours.config.n_heads, ours.config.n_kv_heads, ours.config.max_seq_len) == (4, 2, 64)
    assert_same_logits(ours, model)


# ---- 3. save_hf -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path, tied):
    model = random_llama(tied=tied)
    save_hf(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors") or not tied
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    assert_same_logits(model, hf, atol=1e-4)
    assert_same_logits(load_pretrained(tmp_path), model)  # and back


def test_our_trained_checkpoint_exports_to_transformers(tmp_path):
    model = random_llama(tied=False, n_heads=8, n_kv_heads=2)
    run = tmp_path / "run"
    run.mkdir()
    compiled = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # as torch.compile saves them
    torch.save({"config": model.config.to_dict(), "model": compiled, "step": 0, "optimizer": {}}, run / "ckpt.pt")
    (run / "tokenizer.json").write_text('{"kind": "char", "chars": "ab"}')  # our tokenizer, not HF's
    assert detect_format(run) == detect_format(run / "ckpt.pt") == "ours"
    assert load_pretrained_tokenizer(run) is None
    ours = load_pretrained(run)
    assert_same_logits(load_pretrained(run / "ckpt.pt"), model)
    save_hf(ours, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert_same_logits(ours, hf, atol=1e-4)


# ---- 4. bad inputs --------------------------------------------------------------------------------------

def test_missing_path_and_unknown_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"config.json.*params.json.*consolidated.00.pth"):
        load_pretrained(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"0")
    with pytest.raises(ValueError, match="unknown checkpoint file"):
        load_pretrained(tmp_path / "weights.npz")
    torch.save({"state": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected keys 'config' and 'model'"):
        load_pretrained(tmp_path / "other.pt")


def test_hf_missing_weights_or_files(tmp_path):
    hf = make_hf(4, 2, False)
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    with pytest.raises(ValueError, match="pass the directory"):
        load_pretrained(next(tmp_path.glob("model-*.safetensors")))
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: {shard.name}"):
        load_pretrained(tmp_path)


def hf_dir_with(tmp_path, edit_weights=None, edit_config=None):
    make_hf(4, 2, False).save_pretrained(tmp_path)
    if edit_weights:
        sd = load_file(tmp_path / "model.safetensors")
        edit_weights(sd)
        save_file(sd, tmp_path / "model.safetensors")
    if edit_config:
        cfg = json.loads((tmp_path / "config.json").read_text())
        edit_config(cfg)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_hf_missing_key_is_named(tmp_path):
    hf_dir_with(tmp_path, edit_weights=lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing keys: lm_head.weight"):
        load_pretrained(tmp_path)


def test_hf_unexpected_key_is_named(tmp_path):
    hf_dir_with(tmp_path, edit_weights=lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(48)}))
    with pytest.raises(ValueError, match=r"unexpected keys: model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_pretrained(tmp_path)


def test_hf_wrong_shape_names_key_and_shapes(tmp_path):
    hf_dir_with(tmp_path, edit_config=lambda cfg: cfg.update(intermediate_size=96))
    shapes = r"model\.layers\.0\.mlp\.down_proj\.weight: expected \(48, 96\), got \(48, 80\)"
    with pytest.raises(ValueError, match=shapes):
        load_pretrained(tmp_path)


def test_hf_unsupported_rope_scaling(tmp_path):
    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    hf_dir_with(tmp_path, edit_config=lambda cfg: cfg.update(rope_parameters=scaled))
    with pytest.raises(ValueError, match="'linear' is not supported"):
        load_pretrained(tmp_path)


def test_meta_missing_shard_and_wrong_shapes(tmp_path):
    model = random_llama(tied=False)
    write_meta(model, tmp_path, 2)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wk\.weight: expected \(32, 32\), got \(16, 32\)"):
        load_pretrained(tmp_path)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match="consolidated.00.pth ... consolidated.01.pth"):
        load_pretrained(tmp_path)


def test_llama2c_bin_truncated_padded_or_unknown_version(tmp_path):
    path = tmp_path / "model.bin"
    write_llama2c_v1(random_llama(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(ValueError, match="truncated"):
        load_pretrained(path)
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match="does not match its header"):
        load_pretrained(path)
    path.write_bytes(data[:4] + struct.pack("i", 3) + data[8:])
    with pytest.raises(ValueError, match="version 3 is not supported"):
        load_pretrained(path)


# ---- tokenizers shipped with the weights -----------------------------------------------------------------

def write_tokenizer_json(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))


def write_sentencepiece_model(directory):
    import sentencepiece as spm
    buf = io.BytesIO()
    lines = ["the quick brown fox jumps over the lazy dog", "hello world, to be or not to be"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=40, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(buf.getvalue())


def test_tokenizer_json_shipped_with_hf_weights(tmp_path):
    make_hf(4, 2, True).save_pretrained(tmp_path)
    assert load_pretrained_tokenizer(tmp_path) is None  # none shipped
    write_tokenizer_json(tmp_path)
    tok = load_pretrained_tokenizer(tmp_path)
    assert tok.encode("hello world") == [3, 4]
    assert tok.decode([1, 3, 4, 2]) == "hello world"
    assert (tok.vocab_size, tok.eot_id) == (5, 2) and "tokenizer.json" in tok.name


def test_sentencepiece_model_next_to_llama2c_bin(tmp_path):
    write_llama2c_v1(random_llama(), tmp_path / "model.bin")
    write_sentencepiece_model(tmp_path)
    tok = load_pretrained_tokenizer(tmp_path / "model.bin")
    ids = tok.encode("hello world")
    assert ids[0] == 1 and tok.decode(ids) == "hello world"  # BOS first, as Llama 2 was trained
    assert (tok.vocab_size, tok.eot_id) == (40, 2)
    assert tok.decode(ids + [95]) == "hello world"  # the model's vocab (96) is padded past the tokenizer's


@pytest.mark.parametrize("library,writer", [("tokenizers", write_tokenizer_json),
                                            ("sentencepiece", write_sentencepiece_model)])
def test_missing_tokenizer_library_says_what_to_install(tmp_path, monkeypatch, library, writer):
    make_hf(4, 2, True).save_pretrained(tmp_path)
    writer(tmp_path)
    monkeypatch.setitem(sys.modules, library, None)  # import now raises ImportError
    with pytest.raises(ImportError, match=f"pip install {library}"):
        load_pretrained_tokenizer(tmp_path)


# ---- the command line takes every format ---------------------------------------------------------------

def run_cli_generate(path, *extra):
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "utils", "generate", "--checkpoint", str(path), "--prompt", "hello",
                           "--max-new-tokens", "8", "--seed", "0", *extra], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_generates_from_hf_folder_and_llama2c_bin(tmp_path):
    hf_dir, c_dir = tmp_path / "hf", tmp_path / "c"
    hf_dir.mkdir()
    c_dir.mkdir()
    make_hf(4, 2, True).save_pretrained(hf_dir)
    write_tokenizer_json(hf_dir)
    write_llama2c_v1(random_llama(), c_dir / "model.bin")
    write_sentencepiece_model(c_dir)
    for path in (hf_dir, c_dir / "model.bin"):
        r = run_cli_generate(path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.startswith("hello")
    (hf_dir / "tokenizer.json").unlink()
    r = run_cli_generate(hf_dir)
    assert r.returncode == 2 and "ships no tokenizer" in r.stderr
