"""Specifications for utils/data.py: every source loads, ids are cached, batches are random windows."""

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets / huggingface_hub are imported

import numpy as np
import pandas as pd
import pytest
import torch

from utils.data import (
    TINYSHAKESPEARE_SHA256,
    check_enough_tokens,
    epoch_batch,
    epoch_starts,
    get_batch,
    load_text,
    prepare_data,
    split_train_val,
    windows_per_epoch,
)
from utils.tokenizer import CharTokenizer

ROWS = ["First story: a llama.", "Second story: café, 東京, 🦙.", "Third story."]


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """An empty cache folder, also set as $LLAMA_DATA_DIR so nothing is written into the repo."""
    path = tmp_path / "data"
    monkeypatch.setenv("LLAMA_DATA_DIR", str(path))
    return path


@pytest.fixture
def seeded_data_dir(data_dir, shakespeare) -> Path:
    """A cache that already holds tinyshakespeare.txt, as after a first download."""
    data_dir.mkdir(parents=True)
    shutil.copy(shakespeare, data_dir / "tinyshakespeare.txt")
    return data_dir


@pytest.fixture
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1, also where another test imported the hub libraries before it was set."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 from a thread; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- sources


def test_tinyshakespeare_loads_from_a_cache_that_passes_the_sha256_check(seeded_data_dir):
    text = load_text("tinyshakespeare")
    assert len(text.encode()) == 1_115_394 and text.startswith("First Citizen:")


def test_tinyshakespeare_cache_with_wrong_sha256_says_delete_and_rerun(data_dir):
    data_dir.mkdir()
    (data_dir / "tinyshakespeare.txt").write_text("not shakespeare")
    with pytest.raises(ValueError, match=f"expected {TINYSHAKESPEARE_SHA256}: delete it"):
        load_text("tinyshakespeare")


@pytest.mark.parametrize("suffix", [".txt", ".md"])
def test_local_text_file_loads_verbatim(tmp_path, data_dir, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("\n".join(ROWS), encoding="utf-8")
    assert load_text(str(path)) == "\n".join(ROWS)


def test_local_jsonl_loads_the_text_column(tmp_path, data_dir):
    path = tmp_path / "stories.jsonl"
    pd.DataFrame({"id": [1, 2, 3], "text": ROWS}).to_json(path, orient="records", lines=True, force_ascii=False)
    assert load_text(str(path)) == "\n\n".join(ROWS)


def test_local_csv_loads_a_named_column(tmp_path, data_dir):
    path = tmp_path / "stories.csv"
    pd.DataFrame({"id": [1, 2, 3], "story": ROWS}).to_csv(path, index=False)
    assert load_text(str(path), column="story") == "\n\n".join(ROWS)


def test_local_parquet_loads_the_text_column(tmp_path, data_dir):
    path = tmp_path / "stories.parquet"
    pd.DataFrame({"text": ROWS}).to_parquet(path)
    assert load_text(str(path)) == "\n\n".join(ROWS)


def test_folder_of_txt_files_loads_in_name_order(tmp_path, data_dir):
    folder = tmp_path / "books"
    folder.mkdir()
    for i, row in reversed(list(enumerate(ROWS))):
        (folder / f"{i:02d}.txt").write_text(row, encoding="utf-8")
    (folder / "skip.csv").write_text("not,text")
    assert load_text(str(folder)) == "\n\n".join(ROWS)


def test_url_is_downloaded_once_into_data_dir_and_then_cached(http_server, data_dir):
    root, base = http_server
    (root / "corpus.txt").write_text("served over http 🦙", encoding="utf-8")
    assert load_text(f"{base}/corpus.txt") == "served over http 🦙"
    (root / "corpus.txt").unlink()  # a second load must not need the server
    assert load_text(f"{base}/corpus.txt") == "served over http 🦙"
    assert [p.name.endswith("corpus.txt") for p in data_dir.iterdir()] == [True]


def test_unreachable_url_says_where_to_save_the_file_by_hand(http_server, data_dir):
    _, base = http_server
    with pytest.raises(ConnectionError, match="save it as .*missing.txt"):
        load_text(f"{base}/missing.txt")
    assert not data_dir.exists() or not any(data_dir.iterdir())  # no partial file left behind


@pytest.mark.parametrize("source", ["tinystories", "hf:roneneldan/TinyStories", "hf:someone/corpus:content:test"])
def test_hub_sources_offline_fail_fast_saying_what_to_do(source, data_dir, hub_offline):
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set.*local path"):
        load_text(source)
    assert time.perf_counter() - start < 10


# ----------------------------------------------------------------------------- bad input


def test_missing_column_lists_the_columns_there_are(tmp_path, data_dir):
    path = tmp_path / "stories.jsonl"
    pd.DataFrame({"id": [1], "story": ["x"]}).to_json(path, orient="records", lines=True)
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['id', 'story'\]"):
        load_text(str(path))


def test_empty_file_is_an_error(tmp_path, data_dir):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        load_text(str(tmp_path / "empty.txt"))


def test_non_utf8_file_says_how_to_convert_it(tmp_path, data_dir):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8.*iconv"):
        load_text(str(tmp_path / "latin1.txt"))


def test_unknown_source_lists_the_sources(data_dir):
    with pytest.raises(ValueError, match="unknown source 'tinyshakespear'.*'tinystories'"):
        load_text("tinyshakespear")


def test_missing_path_is_file_not_found(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        load_text(str(tmp_path / "nope.txt"))


def test_relative_path_is_read_from_the_working_directory_first(tmp_path, data_dir, monkeypatch):
    repo, here = tmp_path / "repo", tmp_path / "here"
    for folder, words in [(repo, "the repository's copy"), (here, "the working directory's copy")]:
        (folder / "texts").mkdir(parents=True)
        (folder / "texts" / "mine.txt").write_text(words)
    monkeypatch.setattr("utils.data.REPO_ROOT", repo)
    monkeypatch.chdir(here)
    assert load_text("texts/mine.txt") == "the working directory's copy"


def test_relative_path_falls_back_to_the_repository_root(tmp_path, data_dir, monkeypatch):
    # a notebook runs in notebooks/, the command line anywhere: "data/my.txt" means the repo's data/ for both
    repo, notebooks = tmp_path / "repo", tmp_path / "repo" / "notebooks"
    (repo / "data").mkdir(parents=True)
    notebooks.mkdir()
    (repo / "data" / "mine.txt").write_text("at the root")
    monkeypatch.setattr("utils.data.REPO_ROOT", repo)
    monkeypatch.chdir(notebooks)
    assert load_text("data/mine.txt") == "at the root"


def test_missing_relative_path_names_every_path_tried(tmp_path, data_dir, monkeypatch):
    repo, here = tmp_path / "repo", tmp_path / "here"
    repo.mkdir(), here.mkdir()
    monkeypatch.setattr("utils.data.REPO_ROOT", repo)
    monkeypatch.chdir(here)
    with pytest.raises(FileNotFoundError) as e:
        load_text("my.txt")
    message = str(e.value)
    assert str(here / "my.txt") in message and str(repo / "my.txt") in message, message
    assert "\n" not in message
    with pytest.raises(ValueError, match=f"unknown source 'mydir'.*{repo / 'mydir'}"):
        load_text("mydir")  # no suffix, no slash: a misspelt source name, or a missing folder


def test_missing_path_on_the_command_line_names_the_paths_tried(tmp_path, data_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LLAMA_DATA_DIR": str(data_dir)}
    r = subprocess.run([sys.executable, "-m", "utils", "train", "--dataset", "my.txt", "--out", str(tmp_path / "run")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert str(tmp_path / "my.txt") in r.stderr and str(Path(__file__).resolve().parents[1] / "my.txt") in r.stderr


def test_unsupported_file_type_is_an_error(tmp_path, data_dir):
    (tmp_path / "book.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match="unsupported file type '.pdf'"):
        load_text(str(tmp_path / "book.pdf"))


# ----------------------------------------------------------------------------- tokens and batches


def test_validation_is_the_last_ten_percent_of_characters_as_in_nanogpt():
    text = "".join(chr(65 + i % 26) for i in range(1001))
    train, val = split_train_val(text)
    assert train == text[: int(1001 * 0.9)] and train + val == text


def test_prepare_data_char_tinyshakespeare_matches_nanogpt(seeded_data_dir, shakespeare):
    data = prepare_data("tinyshakespeare", "char")
    text = shakespeare.read_text(encoding="utf-8")
    assert len(data.tokenizer.chars) == 65  # nanoGPT's shakespeare_char vocabulary
    assert data.train.dtype == np.uint16 and data.train_chars + data.val_chars == len(text)
    assert (len(data.train), len(data.val)) == (1_003_854, 111_540)  # nanoGPT's printed counts
    assert data.tokenizer.decode(data.val.tolist()) == text[data.train_chars :]


def test_second_prepare_data_reads_cached_ids_without_encoding(seeded_data_dir, monkeypatch):
    first = prepare_data("tinyshakespeare", "bpe:300")
    monkeypatch.setattr("utils.tokenizer.TiktokenTokenizer.encode", lambda *a: pytest.fail("re-encoded"))
    second = prepare_data("tinyshakespeare", "bpe:300")
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert second.tokenizer.vocab_size == 300


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path, data_dir):
    path = tmp_path / "book.txt"
    path.write_text("a" * 90 + "Ω" * 10, encoding="utf-8")
    data = prepare_data(str(path), "char")
    assert isinstance(data.tokenizer, CharTokenizer) and data.tokenizer.chars == "a"
    assert data.tokenizer.decode(data.val.tolist()) == "Ω" * 10  # via the byte fallback


def test_batches_are_windows_with_targets_shifted_by_one():
    ids = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(ids, batch_size=4, max_seq_len=8)
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)


def test_restoring_the_generator_state_repeats_the_batches():
    ids, generator = np.arange(1000, dtype=np.uint16), torch.Generator().manual_seed(0)
    state = generator.get_state()
    first = get_batch(ids, 4, 8, generator=generator)
    generator.set_state(state)
    second = get_batch(ids, 4, 8, generator=generator)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_epoch_batches_show_every_window_once_per_epoch():
    ids, B, T = np.arange(1000, dtype=np.uint16), 4, 8
    n = windows_per_epoch(len(ids), T)  # 124 windows: 1000 // 8 - 1, so any offset 0..7 fits
    firsts = np.concatenate([epoch_batch(ids, B, T, i, seed=3)[0][:, 0].numpy() for i in range(2 * n // B)])
    epoch0, epoch1 = firsts[:n], firsts[n:]
    assert len(set(epoch0)) == n and len(set(epoch1)) == n, "no window repeats within an epoch"
    assert len(set(np.diff(np.sort(epoch0)))) == 1, "an epoch's windows tile the text (stride max_seq_len)"
    assert not np.array_equal(epoch0, epoch1), "each epoch has its own order"
    x, y = epoch_batch(ids, B, T, 7, seed=3)
    assert torch.equal(y, x + 1) and x.max() + 1 < len(ids)
    assert torch.equal(x, epoch_batch(ids, B, T, 7, seed=3)[0]), "a batch depends on its index alone (resume)"
    assert not torch.equal(x, epoch_batch(ids, B, T, 7, seed=4)[0])


def test_epoch_batches_of_two_ranks_are_disjoint():
    # the trainer asks rank r of w for batch (step * grad_accum + micro) * w + r
    ids, B, T = np.arange(1000, dtype=np.uint16), 4, 8
    rank0 = {int(v) for i in range(0, 30, 2) for v in epoch_batch(ids, B, T, i)[0][:, 0]}
    rank1 = {int(v) for i in range(1, 30, 2) for v in epoch_batch(ids, B, T, i)[0][:, 0]}
    assert len(rank0) == len(rank1) == 60 and not rank0 & rank1


def test_epoch_batches_from_a_text_of_one_window():
    ids = np.arange(9, dtype=np.uint16)
    assert windows_per_epoch(9, 8) == 1 and epoch_starts(9, 8, epoch=5).tolist() == [0]
    x, _ = epoch_batch(ids, 3, 8, 0)
    assert torch.equal(x, torch.arange(8).expand(3, 8))
    with pytest.raises(ValueError, match="train split has 8 tokens"):
        epoch_batch(ids[:8], 3, 8, 0, split="train")


def test_exactly_one_window_of_tokens_is_enough():
    x, y = get_batch(np.arange(9, dtype=np.uint16), batch_size=2, max_seq_len=8)
    assert torch.equal(x[0], torch.arange(8)) and torch.equal(y[1], torch.arange(1, 9))


def test_too_few_tokens_names_both_numbers():
    with pytest.raises(ValueError, match=r"val split has 50 tokens .* max_seq_len \+ 1 = 257: use a smaller"):
        get_batch(np.zeros(50, dtype=np.uint16), 4, 256, split="val")
    with pytest.raises(ValueError, match="train split has 8 tokens"):
        check_enough_tokens(8, 8, "train")


def test_download_with_the_wrong_sha256_is_rejected_and_not_cached(http_server, tmp_path):
    from utils.data import download
    root, base = http_server
    (root / "corpus.txt").write_text("not the file you expected", encoding="utf-8")
    target = tmp_path / "cache" / "corpus.txt"
    with pytest.raises(ValueError, match="download was corrupted or the file there changed"):
        download(f"{base}/corpus.txt", target, sha256=TINYSHAKESPEARE_SHA256)
    assert not target.exists() and not any(target.parent.iterdir())
