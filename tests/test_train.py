"""The trainer learns, resumes exactly, never loses a checkpoint, and stops cleanly on NaN."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from utils import train as train_mod
from utils.runs import CKPT_FILE, load_checkpoint
from utils.train import TrainConfig, lr_at, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(preset="smoke", tokenizer="char", max_seq_len=32, batch_size=8, max_steps=12, eval_interval=4,
                eval_windows=8, lr=3e-3, warmup_steps=3, out_dir=str(tmp_path / "run"), progress=False, seed=7)
    return TrainConfig(**{**base, **kw})


def test_a_few_steps_lower_the_loss(tmp_path, corpus):
    m = train(smoke_cfg(tmp_path, max_steps=60, eval_interval=30), data=corpus[1])
    first = sum(h["train_loss"] for h in m["history"][:5]) / 5
    last = sum(h["train_loss"] for h in m["history"][-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert m["val_loss"] < m["history"][0]["train_loss"]


def test_metrics_json_has_the_promised_fields(tmp_path, corpus):
    train(smoke_cfg(tmp_path, max_steps=4), data=corpus[1])
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("steps", "tokens_seen", "wall_seconds", "tokens_per_second", "val_loss", "val_loss_per_char",
                "world_size", "history"):
        assert key in m, key
    assert m["steps"] == 4 and m["tokens_seen"] == 4 * 8 * 32 and m["world_size"] == 1
    data = corpus[1]  # per char = per token * tokens / chars; char level: ~1 token per char
    assert m["val_loss_per_char"] == pytest.approx(m["val_loss"] * len(data.val) / data.val_chars)


def test_resume_after_n_steps_equals_uninterrupted_run(tmp_path, corpus):
    kw = dict(max_steps=10, dropout=0.1, grad_accum=2)  # dropout: the RNG state must be restored too
    full = train(smoke_cfg(tmp_path / "a", **kw), data=corpus[1])
    train(smoke_cfg(tmp_path / "b", **kw), data=corpus[1], callback=lambda t: t.step == 6)  # "crash" at 6
    assert load_checkpoint(tmp_path / "b" / "run")["step"] == 6
    resumed = train(smoke_cfg(tmp_path / "b", **kw), data=corpus[1], resume=True)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    a = load_checkpoint(tmp_path / "a" / "run")["model"]
    b = load_checkpoint(tmp_path / "b" / "run")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_loss"] == full["val_loss"]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, corpus, monkeypatch):
    cfg = smoke_cfg(tmp_path, max_steps=4)
    train(cfg, data=corpus[1])
    before = (tmp_path / "run" / CKPT_FILE).read_bytes()
    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.seek(f.tell() // 2)
        f.truncate()
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(train_mod.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        train(smoke_cfg(tmp_path, max_steps=8), data=corpus[1], resume=True)
    assert (tmp_path / "run" / CKPT_FILE).read_bytes() == before
    assert load_checkpoint(tmp_path / "run")["step"] == 4


def test_nan_loss_stops_with_a_clear_message_and_keeps_last_good_checkpoint(tmp_path, corpus):
    def poison(trainer):
        if trainer.step == 5:
            with torch.no_grad():
                trainer.model.tok_embeddings.weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="loss became nan at step 6.*Lower --lr"):
        train(smoke_cfg(tmp_path, max_steps=12), data=corpus[1], callback=poison)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_max_seconds_stops_the_run_and_drives_the_schedule(tmp_path, corpus):
    m = train(smoke_cfg(tmp_path, max_steps=100_000, max_seconds=2.0, warmup_steps=1), data=corpus[1])
    assert m["steps"] < 100_000 and 2.0 <= m["wall_seconds"] < 10
    cfg = smoke_cfg(tmp_path, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half of the decay phase
    timed = smoke_cfg(tmp_path, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=100_000, max_seconds=100.0)
    assert lr_at(60, timed, seconds=50.0) == pytest.approx(0.55)  # the clock is half gone: so is the decay
    assert lr_at(60, timed, seconds=100.0) == pytest.approx(0.1)


def test_too_little_data_names_both_numbers(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"has \d+ tokens but one batch window needs max_seq_len \+ 1 = 100001"):
        train(smoke_cfg(tmp_path, max_seq_len=100_000), data=corpus[1])


@pytest.mark.parametrize("kw, words", [(dict(batch_size=0), "batch_size must be >= 1"),
                                       (dict(dtype="fp8"), "dtype must be one of"),
                                       (dict(max_seconds=-1.0), "max_seconds must be > 0")])
def test_bad_training_settings(tmp_path, corpus, kw, words):
    with pytest.raises(ValueError, match=words):
        train(smoke_cfg(tmp_path, **kw), data=corpus[1])


def cli(*args, env_extra=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    r = subprocess.run([sys.executable, "-m", "utils", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_cli_trains_end_to_end_then_generates_with_a_seed(tmp_path, corpus):
    data_dir, _ = corpus
    out = tmp_path / "cli"
    r = cli("train", "--dataset", str(data_dir / "small.txt"), "--tokenizer", "char", "--preset", "smoke",
            "--block-size", "32", "--batch-size", "8", "--max-steps", "20", "--eval-interval", "10",
            "--out", str(out), "--no-progress", "--sample-tokens", "20", env_extra={"LLAMA_DATA_DIR": str(data_dir)})
    assert "nats/char" in r.stdout and "--- sample ---" in r.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 20
    args = ("generate", "--checkpoint", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "15", "--seed", "3")
    a, b = cli(*args), cli(*args)
    c = cli(*args[:-1], "4")
    assert a.stdout.startswith("ROMEO:") and len(a.stdout) > len("ROMEO:")
    assert a.stdout == b.stdout and a.stdout != c.stdout
    greedy, compiled = cli(*args, "--temperature", "0"), cli(*args, "--temperature", "0", "--compile")
    assert compiled.stdout == greedy.stdout and "compiling the decode step" in compiled.stderr
    # generating text never imports the trainer (nor its DDP and optimizer machinery)
    probe = ("import runpy, sys; sys.argv = ['utils', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('utils', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "assert 'utils.train' not in sys.modules, 'generate imported utils.train'\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.endswith("ok\n"), r.stderr[-2000:]


def test_old_checkpoints_name_max_seq_len_block_size():
    cfg = TrainConfig.from_dict({**asdict(TrainConfig()), "block_size": 64})
    assert cfg.max_seq_len == 64 and "block_size" not in asdict(cfg)


def test_cli_rejects_bad_flags_and_values(tmp_path):
    r = cli("train", "--no-such-flag", check=False)
    assert r.returncode == 2 and "unrecognized arguments: --no-such-flag" in r.stderr
    r = cli("train", "--max-steps", "many", check=False)
    assert r.returncode == 2 and "invalid int value: 'many'" in r.stderr
    r = cli("train", "--dataset", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "hi", check=False)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", "--checkpoint", "x", "--top-k", "0", check=False)
    assert r.returncode == 2 and "must be a positive integer" in r.stderr


def test_torchrun_with_two_processes_trains_data_parallel(tmp_path, corpus):
    data_dir, _ = corpus
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "utils",
           "train", "--dataset", str(data_dir / "small.txt"), "--tokenizer", "char", "--preset", "smoke",
           "--block-size", "32", "--batch-size", "4", "--max-steps", "6", "--eval-interval", "3", "--out", str(out),
           "--no-progress", "--sample-tokens", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLAMA_DATA_DIR": str(data_dir)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["tokens_seen"] == 6 * 4 * 32 * 2
    assert r.stdout.count("saved ") == 1, "only rank 0 reports"
    assert len(load_checkpoint(out)["rng"]["torch"]) == 2, "every rank's RNG state is saved for resume"


FAULTS = """
import resource, sys, torch
from utils.device import keep_freed_memory
from utils.model import Llama, LlamaConfig
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
model = Llama(LlamaConfig(vocab_size=65, dim=128, n_layers=2, n_heads=4, max_seq_len=64))
tokens = torch.randint(0, 65, (12, 65))
for step in range(13):
    if step == 3:  # after three warm-up steps, ten measured
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_on_each_training_step():
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "2"})
        applied, faults = out.stdout.split()
        runs[mode] = (applied, int(faults))
    assert runs["keep"][0] == "True"
    # glibc's default: the faults grow with the steps (9-20k here in ten); kept: 200-1,000 once, whatever the steps
    assert runs["default"][1] > 4000, runs
    assert runs["keep"][1] < runs["default"][1] / 4, runs


@pytest.mark.parametrize("flags, warned", [
    (dict(max_steps=20_000), True),                     # 256 tokens a step: 95 passes over 54,000 tokens
    (dict(max_steps=20_000, max_seconds=60.0), False),  # the clock decides: no plan to judge
    (dict(max_steps=3000), False),                      # 14 passes
])
def test_a_run_that_would_memorise_small_data_says_so_in_one_line(corpus, tmp_path, capsys, flags, warned):
    cfg = TrainConfig(preset="smoke", max_seq_len=32, batch_size=8, eval_windows=2, eval_interval=1000,
                      out_dir=str(tmp_path / "run"), progress=False, **flags)
    train(cfg, data=corpus[1], callback=lambda trainer: True)  # stop after the first step
    lines = [line for line in capsys.readouterr().out.splitlines() if "passes over the same" in line]
    assert len(lines) == int(warned), lines
    if warned:
        line = lines[0]
        assert line.startswith("warning: 95 passes") and "--max-steps 3375 makes 16 passes" in line, line
