"""`python -m utils report`: one markdown row per run folder, read from its metrics.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils.report import report_rows

ROOT = Path(__file__).resolve().parents[1]


def fake_run(folder, **changes):
    """A run folder holding a metrics.json like the trainer's (only the fields a row reads, plus some)."""
    metrics = {"steps": 750, "tokens_seen": 3_072_000, "wall_seconds": 141.72, "tokens_per_second": 21_676.0,
               "val_loss": 3.53, "val_loss_per_char": 1.44512, "device": "cpu", "dtype": "bfloat16",
               "params": 1_053_440, "dataset": "tinyshakespeare", "tokenizer": "bpe:1024", "history": []}
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({**metrics, **changes}))
    return folder


def test_report_prints_the_header_once_then_a_row_per_run_in_order(tmp_path):
    a = fake_run(tmp_path / "a")
    b = fake_run(tmp_path / "b", tokenizer="char", params=870_000, val_loss_per_char=1.6, device="cuda:0")
    lines = report_rows([a, b]).splitlines()
    assert lines[0] == ("| dataset | tokenizer | parameters | steps | device | dtype | wall time | val nats/char |")
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| `tinyshakespeare` | `bpe:1024` | 1.05M | 750 | cpu | bfloat16 | 142 s | **1.445** |"
    assert lines[3] == "| `tinyshakespeare` | `char` | 0.87M | 750 | cuda:0 | bfloat16 | 142 s | **1.600** |"
    assert len(lines) == 4
    assert all(line.count("|") == 9 for line in lines)
    assert report_rows([a], header=False) == lines[2]


def test_report_on_a_folder_without_metrics_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no metrics.json: train into it first"):
        report_rows([fake_run(tmp_path / "ok"), tmp_path])


def test_report_on_a_file_asks_for_its_run_folder(tmp_path):
    run = fake_run(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"is a file: pass its run folder"):
        report_rows([run / "metrics.json"])


def test_report_on_an_incomplete_metrics_file_names_the_missing_fields(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"steps": 10, "val_loss": 3.0}))
    with pytest.raises(ValueError, match=r"lacks \['dataset', 'tokenizer', 'params'"):
        report_rows([run])


def test_report_command_line_prints_rows_and_one_line_errors(tmp_path):
    run = fake_run(tmp_path / "run")
    ok = subprocess.run([sys.executable, "-m", "utils", "report", str(run), str(run)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("| dataset |") == 1 and ok.stdout.count("`bpe:1024`") == 2
    rows_only = subprocess.run([sys.executable, "-m", "utils", "report", "--no-header", str(run)], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert rows_only.stdout.strip().startswith("| `tinyshakespeare`")
    bad = subprocess.run([sys.executable, "-m", "utils", "report", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and "no metrics.json" in bad.stderr
