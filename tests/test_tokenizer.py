"""Specifications for utils/tokenizer.py: lossless round trips, the fast BPE equals a slow reference."""

import os
from collections import Counter

import pytest
import regex
import requests
import tiktoken
import tiktoken.load

from utils.tokenizer import (
    EOT,
    GPT4_SPLIT_PATTERN,
    Tokenizer,
    bpe_encoding,
    get_tokenizer,
    load_tokenizer,
    train_bpe,
)

os.environ["HF_HUB_OFFLINE"] = "1"
UNICODE = "Café naïve façade — Ünïcödé; 東京タワーと北京烤鸭; emoji 🦙🚀👩‍💻 and 🇫🇷!\n\ttabs  spaces 12345"


@pytest.fixture(scope="module")
def corpus(shakespeare) -> str:
    return shakespeare.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sample(corpus) -> str:
    return corpus[:20_000]


def reference_train_bpe(text: str, vocab_size: int) -> list[tuple[tuple[int, int], int]]:
    """Slow, obviously correct BPE: re-count every pair of every chunk before each merge."""
    chunks = [list(c.encode("utf-8")) for c in regex.findall(GPT4_SPLIT_PATTERN, text)]
    vocab = [bytes([b]) for b in range(256)]
    merges = []
    while len(vocab) < vocab_size - 1:
        counts = Counter(p for chunk in chunks for p in zip(chunk, chunk[1:]))
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        token = vocab[pair[0]] + vocab[pair[1]]
        new_id = vocab.index(token) if token in vocab else len(vocab)
        if new_id == len(vocab):
            vocab.append(token)
        merges.append((pair, new_id))
        chunks = [reference_merge(chunk, pair, new_id) for chunk in chunks]
    return merges


def reference_merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if ids[i : i + 2] == list(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_encode(text: str, merges) -> list[int]:
    """Apply the merges in training order to each chunk's bytes."""
    ids = []
    for chunk in regex.findall(GPT4_SPLIT_PATTERN, text):
        chunk_ids = list(chunk.encode("utf-8"))
        for pair, new_id in merges:
            chunk_ids = reference_merge(chunk_ids, pair, new_id)
        ids.extend(chunk_ids)
    return ids


@pytest.mark.parametrize("name", ["char", "bpe:257", "bpe:300", "bpe:1024"])
def test_trained_tokenizers_round_trip_corpus_and_unicode(name, sample):
    tok = get_tokenizer(name, train_text=sample)
    assert isinstance(tok, Tokenizer) and tok.name == name
    for text in (sample, UNICODE, f"literal {EOT} stays text", ""):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_bpe_4096_round_trips_whole_tinyshakespeare_and_compresses_it(corpus):
    tok = get_tokenizer("bpe:4096", train_text=corpus[: int(len(corpus) * 0.9)])
    ids = tok.encode(corpus)
    assert tok.decode(ids) == corpus
    assert len(corpus) / len(ids) > 3  # about 3.6 characters per token


def test_bpe_vocab_size_counts_bytes_merges_and_end_of_text(sample):
    tok = get_tokenizer("bpe:300", train_text=sample)
    assert tok.vocab_size == 300 and tok.eot_id == 299
    assert tok.decode([tok.eot_id]) == EOT


def test_char_vocabulary_comes_from_training_text_with_byte_fallback():
    tok = get_tokenizer("char", train_text="hello world")
    assert tok.encode("hello") == [3, 2, 4, 4, 5]  # sorted " dehlorw", as nanoGPT numbers them
    assert tok.vocab_size == 8 + 256 + 1 and tok.eot_id == tok.vocab_size - 1
    assert len(tok.encode("é")) == 2 and tok.decode(tok.encode("hé🦙")) == "hé🦙"


def test_fast_trainer_merges_equal_reference_trainer(sample):
    ranks = train_bpe(sample, 400)
    merges = reference_train_bpe(sample, 400)
    by_rank = sorted(ranks, key=ranks.get)
    assert by_rank[256:] == [by_rank[a] + by_rank[b] for (a, b), _ in merges]


def test_tiktoken_encoding_of_trained_bpe_equals_reference_encoder(sample, corpus):
    ranks = train_bpe(sample, 400)
    encoding = bpe_encoding("bpe:400", ranks)
    merges = reference_train_bpe(sample, 400)
    for text in (corpus[500_000:510_000], UNICODE):
        assert encoding.encode_ordinary(text) == reference_encode(text, merges)


@pytest.mark.parametrize("name", ["char", "bpe:300"])
def test_saved_tokenizer_loads_back_to_identical_ids(name, sample, tmp_path):
    tok = get_tokenizer(name, train_text=sample)
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.name, loaded.vocab_size, loaded.eot_id) == (tok.name, tok.vocab_size, tok.eot_id)
    for text in (sample, UNICODE):
        assert loaded.encode(text) == tok.encode(text)


def test_saved_bpe_ranks_are_in_tiktoken_file_format(sample, tmp_path):
    tok = get_tokenizer("bpe:300", train_text=sample)
    tok.save(tmp_path)
    ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tokenizer.tiktoken"))
    assert ranks == train_bpe(sample, 300) and len(ranks) == 299


def test_a_tokenizer_saved_again_in_the_same_folder_loads_the_new_ranks(sample, tmp_path):
    """tiktoken's own file loader caches by path: an overwritten run folder would load the old ranks."""
    get_tokenizer("bpe:300", train_text=sample).save(tmp_path)
    assert load_tokenizer(tmp_path).encode(sample) == get_tokenizer("bpe:300", train_text=sample).encode(sample)
    second = get_tokenizer("bpe:400", train_text=sample)
    second.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(sample) == second.encode(sample)


def test_cache_dir_reuses_the_trained_tokenizer(sample, tmp_path, monkeypatch):
    first = get_tokenizer("bpe:300", train_text=sample, cache_dir=tmp_path)
    monkeypatch.setattr("utils.tokenizer.train_bpe", lambda *a: pytest.fail("retrained"))
    second = get_tokenizer("bpe:300", train_text=sample, cache_dir=tmp_path)
    assert second.encode(sample) == first.encode(sample)


def test_gpt2_round_trips_when_its_vocabulary_is_available():
    try:
        tok = get_tokenizer("gpt2")
    except ConnectionError:
        pytest.skip("gpt2 vocabulary unavailable offline")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.decode(tok.encode(UNICODE)) == UNICODE


def test_offline_tiktoken_download_says_what_to_use_instead(monkeypatch):
    def offline(name):
        raise requests.exceptions.ConnectionError("Name or service not known")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ConnectionError, match="gpt2 vocabulary.*'bpe:4096' or 'char'"):
        get_tokenizer("gpt2")


@pytest.mark.parametrize(
    "name, match",
    [("sentencepiece", "unknown tokenizer"), ("bpe:100", "vocab_size >= 257"), ("bpe:lots", "bpe:<vocab_size>")],
)
def test_bad_tokenizer_names_raise_value_error_saying_what_to_write(name, match):
    with pytest.raises(ValueError, match=match):
        get_tokenizer(name, train_text="some text")


@pytest.mark.parametrize("name", ["char", "bpe:300"])
def test_trained_tokenizers_need_train_text(name):
    with pytest.raises(ValueError, match="train_text"):
        get_tokenizer(name)


def test_load_tokenizer_from_empty_directory_says_how_to_save(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.save"):
        load_tokenizer(tmp_path)


def test_run_folders_written_before_the_rename_still_load(sample, tmp_path):
    # our tokenizer file is course_tokenizer.json; older run folders named it tokenizer.json, which is
    # also Hugging Face's name: a folder holding HF's tokenizer.json is not mistaken for ours
    tok = get_tokenizer("char", train_text=sample)
    tok.save(tmp_path)
    assert (tmp_path / "course_tokenizer.json").exists() and not (tmp_path / "tokenizer.json").exists()
    (tmp_path / "course_tokenizer.json").rename(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path).encode(sample[:50]) == tok.encode(sample[:50])
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(FileNotFoundError, match="no course_tokenizer.json"):
        load_tokenizer(tmp_path)
