"""Text sources, train/val split, cached token ids and batches: swap the dataset in one cell.

    data = prepare_data("tinyshakespeare", "char")       # or "tinystories", "hf:owner/name",
    x, y = get_batch(data.train, batch_size=32, max_seq_len=256)   # a path, an http(s) URL
    x, y = epoch_batch(data.train, 32, 256, index=0)     # the trainer's: each window once per epoch

Sources (one string): "tinyshakespeare" (downloaded into data/ and checked against its sha256),
"tinystories" (the first `n_stories` stories of roneneldan/TinyStories, streamed),
"hf:<owner>/<name>[:<column>[:<split>]]" (any hub dataset), a local .txt/.md/.jsonl/.json/.csv/
.parquet file or a folder of .txt files, or an http(s) URL of a text file (downloaded, cached).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokenizer import Tokenizer, get_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LLAMA_DATA_DIR", REPO_ROOT / "data"))
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSTORIES = "roneneldan/TinyStories"
TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SOURCES_HELP = ("use 'tinyshakespeare', 'tinystories', 'hf:<owner>/<name>', an http(s) URL, or the path "
                "of a .txt/.md/.jsonl/.json/.csv/.parquet file or of a folder of .txt files")


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The cache folder: `data_dir` if given, else $LLAMA_DATA_DIR, else <repo>/data."""
    return Path(data_dir or os.environ.get("LLAMA_DATA_DIR") or DATA_DIR)


# ----------------------------------------------------------------------------- text sources


def load_text(source: str = "tinyshakespeare", *, data_dir: str | Path | None = None, column: str = "text",
              split: str = "train", n_stories: int = 20_000) -> str:
    """The whole text of one source (see the module docstring for the source strings)."""
    data_dir = resolve_data_dir(data_dir)
    if source == "tinyshakespeare":
        path = download(TINYSHAKESPEARE_URL, data_dir / "tinyshakespeare.txt", sha256=TINYSHAKESPEARE_SHA256)
        return read_text_file(path)
    if source == "tinystories":
        return _tinystories(data_dir, n_stories)
    if source.startswith("hf:"):
        repo, _, rest = source.removeprefix("hf:").partition(":")
        column_in_source, _, split_in_source = rest.partition(":")
        return load_hub_text(repo, column=column_in_source or column, split=split_in_source or split)
    if source.startswith(("http://", "https://")):
        name = re.sub(r"[^\w.-]", "_", source.rstrip("/").rsplit("/", 1)[-1]) or "download.txt"
        digest = hashlib.sha256(source.encode()).hexdigest()[:8]
        return read_text_file(download(source, data_dir / f"url-{digest}-{name}"))
    return load_local_text(find_local_source(source), column=column)


def local_candidates(source: str | Path) -> list[Path]:
    """Where a local source may be: an absolute path as is; a relative one from the working directory
    (where the command runs; a notebook's folder), then from the repository root."""
    path = Path(source).expanduser()
    if path.is_absolute():
        return [path]
    return list(dict.fromkeys([Path.cwd() / path, REPO_ROOT / path]))  # one entry when the two agree


def find_local_source(source: str | Path) -> Path:
    """The first of `local_candidates(source)` that exists; the error names every path tried."""
    tried = local_candidates(source)
    found = next((p for p in tried if p.exists()), None)
    if found is not None:
        return found
    where = " nor ".join(str(p) for p in tried)
    if Path(source).suffix or "/" in str(source) or os.sep in str(source):
        raise FileNotFoundError(f"no file or folder {str(source)!r}: there is none at {where}; check the path, "
                                f"or give it whole (absolute) ({SOURCES_HELP})")
    raise ValueError(f"unknown source {str(source)!r} (and no file or folder at {where}): {SOURCES_HELP}")


def load_local_text(path: Path, *, column: str = "text") -> str:
    """Text of a local file or of a folder of .txt files (sorted by name, joined by blank lines)."""
    if not path.exists():
        find_local_source(path)  # raises, naming the paths it tried
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"folder {path} holds no .txt files: put the text in .txt files there")
        return _check_not_empty("\n\n".join(read_text_file(f) for f in files), path)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return read_text_file(path)
    if suffix in TABLE_SUFFIXES:
        import datasets  # slow to import, so only when needed

        table = datasets.load_dataset(TABLE_SUFFIXES[suffix], data_files=str(path), split="train")
        return _check_not_empty(_join_column(table, column, str(path)), path)
    raise ValueError(f"cannot read {path}: unsupported file type {suffix!r}; {SOURCES_HELP}")


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's contents; empty or non-UTF-8 files are errors that say what to do."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 ({e.reason} at byte {e.start}): re-save it as UTF-8, "
                         f"e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.txt`") from e
    return _check_not_empty(text, path)


def _check_not_empty(text: str, where: object) -> str:
    """`text`, unless it is empty."""
    if not text.strip():
        raise ValueError(f"{where} holds no text: point the source at a file with some text in it")
    return text


def _join_column(rows, column: str, name: str) -> str:
    """One column of a `datasets` table (or streamed rows) joined with blank lines."""
    columns = list(rows.column_names or [])
    if column not in columns:
        raise ValueError(f"{name} has no column {column!r}; its columns are {columns}: pass column=<one of them>")
    return "\n\n".join(str(t) for t in rows[column] if t is not None)


# ----------------------------------------------------------------------------- downloads


def download(url: str, path: Path, *, sha256: str | None = None) -> Path:
    """Download `url` to `path` once (atomically), checking `sha256` when given; reuse it after."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, f)
            _check_sha256(Path(tmp), sha256, url, fresh=True)
            os.replace(tmp, path)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:  # not disk errors: those say so
            raise ConnectionError(f"could not download {url} ({e}): connect to the internet, or download it "
                                  f"yourself and save it as {path}, or pass a local text file as the source") from e
        finally:
            Path(tmp).unlink(missing_ok=True)
    _check_sha256(path, sha256, url)
    return path


def _check_sha256(path: Path, sha256: str | None, url: str, fresh: bool = False) -> None:
    """Raise if `path`'s sha256 is not the expected one."""
    if sha256 is None:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest == sha256:
        return
    if fresh:
        raise ValueError(f"the file downloaded from {url} has sha256 {digest}, expected {sha256}: the download "
                         "was corrupted or the file there changed; run again, or pass a local copy as the source")
    raise ValueError(f"{path} has sha256 {digest}, expected {sha256}: delete it and run again "
                     f"to re-download it from {url}")


def hub_offline() -> bool:
    """Is HF_HUB_OFFLINE set (to anything but 0/false/no)?"""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def check_hub_reachable(repo: str, timeout: float = 3.0) -> None:
    """Raise ConnectionError at once when the hub cannot be reached: `datasets` would retry for ~25 s first.

    Skipped under HF_HUB_OFFLINE, where `datasets` reads its cache without trying the network.
    """
    if hub_offline():
        return
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"could not load hub dataset {repo!r}: {host}:{port} cannot be reached ({e}). Connect "
                              "to the internet; with a cached copy, set HF_HUB_OFFLINE=1 to use it; or download the "
                              "data and pass its local path (.txt/.jsonl/.csv/.parquet)") from e


def load_hub_text(repo: str, *, column: str = "text", split: str = "train", limit: int | None = None) -> str:
    """One column of a Hugging Face hub dataset (streamed when `limit` rows are asked for)."""
    check_hub_reachable(repo)  # seconds, not the ~25 s of retries `datasets` makes offline
    import datasets

    try:
        if limit is None:
            rows = datasets.load_dataset(repo, split=split)
        else:
            stream = datasets.load_dataset(repo, split=split, streaming=True)  # never the whole set
            rows = datasets.Dataset.from_list(list(stream.take(limit)))
    except Exception as e:  # offline, unknown name, bad split: datasets raises many types
        why = "HF_HUB_OFFLINE is set and there is no cached copy" if hub_offline() else str(e).splitlines()[0]
        raise ConnectionError(f"could not load hub dataset {repo!r} (split {split!r}): {why}. Connect to the "
                              "internet (and unset HF_HUB_OFFLINE), check the name on huggingface.co/datasets, "
                              "or download the data and pass its local path (.txt/.jsonl/.csv/.parquet)") from e
    return _check_not_empty(_join_column(rows, column, f"hub dataset {repo!r}"), repo)


def _tinystories(data_dir: Path, n_stories: int) -> str:
    """The first `n_stories` TinyStories, streamed once and then cached as a text file."""
    path = data_dir / f"tinystories-{n_stories}.txt"
    if not path.exists():
        text = load_hub_text(TINYSTORIES, limit=n_stories)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return read_text_file(path)


# ----------------------------------------------------------------------------- tokens


def split_train_val(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val): the last `val_fraction` of the characters is validation, as in nanoGPT."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}: nanoGPT uses 0.1")
    n_train = int(len(text) * (1 - val_fraction))
    return text[:n_train], text[n_train:]


@dataclass
class TokenData:
    """A source encoded with a tokenizer: 1-D id arrays for each split and their character counts."""

    source: str
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    train_chars: int
    val_chars: int


def prepare_data(source: str = "tinyshakespeare", tokenizer: str | Tokenizer = "char", *,
                 data_dir: str | Path | None = None, val_fraction: float = 0.1, **source_kwargs) -> TokenData:
    """Load, split (text first), train the tokenizer on train only, encode; ids cached on disk.

    `tokenizer` is a name (trained or fetched here) or a ready tokenizer, e.g. a pretrained model's own.
    """
    data_dir = resolve_data_dir(data_dir)
    text = load_text(source, data_dir=data_dir, **source_kwargs)
    train_text, val_text = split_train_val(text, val_fraction)
    if isinstance(tokenizer, str):
        tok = get_tokenizer(tokenizer, train_text=train_text, cache_dir=data_dir / "tokenizers")
        name = tokenizer
    else:  # a ready tokenizer: its name and its ids of a probe identify it in the cache key
        tok, name = tokenizer, tokenizer.name
        tokenizer = json.dumps([name, tok.vocab_size, tok.encode(text[:2000])])
    key = json.dumps([source, sorted(source_kwargs.items()), tokenizer, val_fraction])
    digest = hashlib.sha256(key.encode() + text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]
    cache = data_dir / "tokens" / f"{_slug(source)}-{_slug(name)}-{digest}"
    if not (cache / "val.npy").exists():
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        arrays = {"train": np.array(tok.encode(train_text), dtype=dtype),
                  "val": np.array(tok.encode(val_text), dtype=dtype)}
        _save_arrays(arrays, cache)
    return TokenData(source, tok, np.load(cache / "train.npy"), np.load(cache / "val.npy"),
                     len(train_text), len(val_text))


def _slug(name: str) -> str:
    """A short file-name-safe version of a source or tokenizer name."""
    return re.sub(r"[^\w.-]+", "_", name)[-40:].strip("_") or "source"


def _save_arrays(arrays: dict[str, np.ndarray], cache: Path) -> None:
    """Write each array as <name>.npy into `cache`, atomically (a temp folder, then a rename)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=cache.name + ".part"))
    for name, ids in arrays.items():
        np.save(tmp / f"{name}.npy", ids)
    try:
        os.replace(tmp, cache)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)


def check_enough_tokens(n_tokens: int, max_seq_len: int, split: str) -> None:
    """Raise if `n_tokens` cannot fill one window of max_seq_len + 1 tokens (inputs and targets)."""
    if n_tokens < max_seq_len + 1:
        raise ValueError(f"{split} split has {n_tokens} tokens but one batch window needs max_seq_len + 1 = "
                         f"{max_seq_len + 1}: use a smaller max_seq_len or more data")


def windows_per_epoch(n_tokens: int, max_seq_len: int) -> int:
    """How many non-overlapping windows of max_seq_len + 1 tokens one epoch holds, whatever its offset."""
    check_enough_tokens(n_tokens, max_seq_len, "this")
    return max(n_tokens // max_seq_len - 1, 1)


@functools.lru_cache(maxsize=4)  # a shuffle of 4M windows (1B tokens) takes ~75 ms: do it once per epoch
def epoch_starts(n_tokens: int, max_seq_len: int, epoch: int, seed: int = 0) -> np.ndarray:
    """Start offsets of one epoch's windows, in random order: a grid of stride max_seq_len, shifted by a
    random offset (so window edges move from epoch to epoch), then shuffled. The same (epoch, seed)
    always gives the same order. Read-only (cached)."""
    n = windows_per_epoch(n_tokens, max_seq_len)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    offset = int(torch.randint(min(max_seq_len, n_tokens - n * max_seq_len), (1,), generator=g))
    starts = offset + max_seq_len * torch.randperm(n, generator=g).numpy()
    starts.flags.writeable = False
    return starts


def epoch_batch(ids: np.ndarray, batch_size: int, max_seq_len: int, index: int, *, seed: int = 0,
                device: str | torch.device = "cpu", split: str = "this") -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number `index` of a stream that shows every window once per epoch (sampling without
    replacement), as x, y (B, T) like `get_batch`. It depends on `index` alone, so a resumed run gets
    the batches it would have had, and the processes of a multi-GPU run take disjoint windows by
    asking for different indices. On Tiny Shakespeare it beats `get_batch`'s random windows
    (benchmarks/train_shakespeare.md): over several epochs no part of the text is over- or under-seen."""
    check_enough_tokens(len(ids), max_seq_len, split)
    n = windows_per_epoch(len(ids), max_seq_len)
    k = np.arange(index * batch_size, (index + 1) * batch_size)  # global window numbers
    epochs = {e: epoch_starts(len(ids), max_seq_len, int(e), seed) for e in np.unique(k // n)}
    starts = np.array([epochs[e][i] for e, i in zip(k // n, k % n)])
    return windows_at(ids, starts, max_seq_len, device)


def windows_at(ids: np.ndarray, starts: np.ndarray, max_seq_len: int,
               device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, T) int64 on `device` from windows of max_seq_len + 1 ids at `starts`."""
    windows = ids[starts[:, None] + np.arange(max_seq_len + 1)].astype(np.int64)  # (B, T+1)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    device = torch.device(device)
    if device.type == "cuda":  # pinned host memory makes the copy asynchronous, as in nanoGPT
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_batch(ids: np.ndarray, batch_size: int, max_seq_len: int, *, generator: torch.Generator | None = None,
              device: str | torch.device = "cpu", split: str = "this") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x (B, T) int64 ids and y (B, T) the same windows shifted left by one."""
    check_enough_tokens(len(ids), max_seq_len, split)
    starts = torch.randint(len(ids) - max_seq_len, (batch_size,), generator=generator).numpy()
    return windows_at(ids, starts, max_seq_len, device)
