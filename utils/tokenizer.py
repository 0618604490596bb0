"""Tokenizers behind one interface: tiktoken's encodings, a byte-level BPE we train, characters.

    tok = get_tokenizer("bpe:4096", train_text=train_text)   # or "char", "gpt2", "cl100k_base"
    ids = tok.encode("To be, or not to be")                  # list[int]
    assert tok.decode(ids) == "To be, or not to be"           # lossless on any UTF-8 text
    tok.save("out/run1"); tok = load_tokenizer("out/run1")   # writes/reads course_tokenizer.json

The BPE trainer is incremental (counts weighted by word frequency, only the words a merge
touches are updated, a lazy max-heap finds the best pair): 4096 tokens on Tiny Shakespeare take
seconds in pure Python, where re-counting every pair per merge (minbpe) takes many minutes.
The trained merges become a `tiktoken.Encoding`, so encoding runs at tiktoken's speed.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Protocol, runtime_checkable

import regex
import tiktoken

# GPT-4's pre-tokenizer: merges never cross these chunk boundaries (words, numbers, punctuation).
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
EOT = "<|endoftext|>"
TIKTOKEN_NAMES = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
TOKENIZER_FILE = "course_tokenizer.json"  # ours; not HF's tokenizer.json, which a run folder may also hold
LEGACY_TOKENIZER_FILE = "tokenizer.json"   # what run folders written before the rename hold
RANKS_FILE = "tokenizer.tiktoken"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from any tokenizer."""

    name: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, directory: str | Path) -> None: ...


class TiktokenTokenizer:
    """A `tiktoken.Encoding`: one of OpenAI's by name, or a BPE we trained (`ranks` given)."""

    def __init__(self, name: str, encoding: tiktoken.Encoding, ranks: dict[bytes, int] | None = None):
        self.name, self.encoding, self.ranks = name, encoding, ranks
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        """Text to ids; a literal "<|endoftext|>" in the text stays ordinary text (lossless)."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        """Ids to text (an incomplete UTF-8 sequence at a cut decodes to U+FFFD)."""
        return self.encoding.decode(list(ids))

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (+ tokenizer.tiktoken with the ranks for a trained BPE)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "tiktoken", "name": self.name}
        if self.ranks is not None:
            meta = {"kind": "bpe", "name": self.name, "pat_str": self.encoding._pat_str,
                    "special_tokens": self.encoding._special_tokens}
            save_ranks(self.ranks, directory / RANKS_FILE)
        (directory / TOKENIZER_FILE).write_text(json.dumps(meta, indent=1))


class CharTokenizer:
    """One id per character seen in training; unseen characters fall back to their UTF-8 bytes.

    Ids: 0..n_chars-1 the sorted characters (as nanoGPT), then 256 byte ids, then end-of-text.
    """

    def __init__(self, chars: str):
        self.name = "char"
        self.chars = "".join(sorted(set(chars)))
        self.char_to_id = {c: i for i, c in enumerate(self.chars)}
        self.byte_offset = len(self.chars)
        self.eot_id = self.byte_offset + 256
        self.vocab_size = self.eot_id + 1

    def encode(self, text: str) -> list[int]:
        """Text to ids, one per character (several for a character outside the vocabulary)."""
        lookup, ids = self.char_to_id, []
        for c in text:
            i = lookup.get(c)
            if i is None:
                ids.extend(self.byte_offset + b for b in c.encode("utf-8"))
            else:
                ids.append(i)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Ids to text; runs of byte ids are decoded as UTF-8 together."""
        out, pending = [], bytearray()
        for i in ids:
            i = int(i)
            if self.byte_offset <= i < self.eot_id:
                pending.append(i - self.byte_offset)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            out.append(EOT if i == self.eot_id else self.chars[i])
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json holding the character vocabulary."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "char", "name": self.name, "chars": self.chars}
        (directory / TOKENIZER_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")


# ----------------------------------------------------------------------------- BPE training


def _word_counts(text: str) -> Counter[bytes]:
    """How often each pre-tokenized chunk (as UTF-8 bytes) occurs in the text."""
    return Counter(chunk.encode("utf-8") for chunk in regex.findall(GPT4_SPLIT_PATTERN, text))


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `word` (left to right) by `new_id`."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(text: str, vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE ranks {token bytes: rank}: 256 bytes + (vocab_size - 257) merges (+1 EOT).

    A ValueError, with the largest size the text allows, if it runs out of pairs to merge first.
    """
    n_merges = vocab_size - 257
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                         "257 (256 bytes + <|endoftext|>); try 'bpe:4096'")
    counts = _word_counts(text)
    words = [list(w) for w in counts]
    freqs = list(counts.values())
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # may hold stale words
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += f
            where[pair].add(w)
    # Max-heap on count; ties go to the smallest pair of ids, as in `_reference_train_bpe`.
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    ranks = {tok: i for i, tok in enumerate(vocab)}
    while len(ranks) < 256 + n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # stale heap entry: the count changed after it was pushed
        token = vocab[pair[0]] + vocab[pair[1]]
        new_id = ranks.get(token)
        if new_id is None:  # another pair already spelled these bytes: reuse that token
            new_id = ranks[token] = len(vocab)
            vocab.append(token)
        changed = _apply_merge(pair, new_id, words, freqs, pair_counts, where)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    if len(ranks) < 256 + n_merges:  # every chunk is one token: no pair left to merge
        raise ValueError(f"bpe:{vocab_size} is more than this text can make: with every possible merge done it "
                         f"gives {len(ranks) + 1:,} tokens (256 bytes, {len(ranks) - 256:,} merges, end-of-text); "
                         f"use bpe:{len(ranks) + 1} or fewer, or more text")
    return ranks


def _apply_merge(pair, new_id, words, freqs, pair_counts, where) -> set[tuple[int, int]]:
    """Merge `pair` in the words that contain it, updating pair counts; return the changed pairs."""
    changed = set()
    for w in where.pop(pair):
        word = words[w]
        new_word = _merge_word(word, pair, new_id)
        if len(new_word) == len(word):
            continue  # stale: this word lost the pair to an earlier merge
        f = freqs[w]
        for p in zip(word, word[1:]):
            pair_counts[p] -= f
            changed.add(p)
        for p in zip(new_word, new_word[1:]):
            pair_counts[p] += f
            where[p].add(w)
            changed.add(p)
        words[w] = new_word
    pair_counts.pop(pair, None)
    changed.discard(pair)
    return changed


def bpe_encoding(name: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """A fast `tiktoken.Encoding` from trained ranks, with <|endoftext|> as the last id."""
    return tiktoken.Encoding(name=name, pat_str=GPT4_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def save_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write ranks in tiktoken's file format: base64(token) rank, one per line."""
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("\n".join(lines) + "\n")


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Ranks from tiktoken's file format (ours, and Meta's Llama 3 tokenizer.model). Read directly:
    tiktoken.load.load_tiktoken_bpe caches files by their path, so a file rewritten in place would read stale."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# ----------------------------------------------------------------------------- get / load


def get_tokenizer(name: str, *, train_text: str | None = None, cache_dir: str | Path | None = None) -> Tokenizer:
    """A tokenizer by name: "char", "bpe:<vocab_size>", or a tiktoken encoding such as "gpt2"."""
    if name in TIKTOKEN_NAMES:
        return _tiktoken_by_name(name)
    if name != "char" and not name.startswith("bpe:"):
        raise ValueError(f"unknown tokenizer {name!r}: use 'char', 'bpe:<vocab_size>' "
                         f"(e.g. 'bpe:4096') or one of {', '.join(TIKTOKEN_NAMES)}")
    vocab_size = _parse_bpe_size(name) if name != "char" else 0
    if train_text is None:
        raise ValueError(f"tokenizer {name!r} is trained on text: pass train_text=..., "
                         "or load a saved one with load_tokenizer(directory)")
    if not train_text:
        raise ValueError(f"cannot train tokenizer {name!r} on empty text: pass the training split")
    cached = None
    if cache_dir is not None:
        digest = hashlib.sha256(train_text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]
        cached = Path(cache_dir) / f"{name.replace(':', '-')}-{digest}"
        if _saved_file(cached) is not None:
            return load_tokenizer(cached)
    if name == "char":
        tok: Tokenizer = CharTokenizer(train_text)
    else:
        ranks = train_bpe(train_text, vocab_size)
        tok = TiktokenTokenizer(name, bpe_encoding(name, ranks), ranks)
    if cached is not None:
        tok.save(cached)
    return tok


def _parse_bpe_size(name: str) -> int:
    """The vocabulary size in "bpe:<vocab_size>"."""
    size = name.removeprefix("bpe:")
    if not size.isdigit() or int(size) < 257:
        raise ValueError(f"bad tokenizer {name!r}: write 'bpe:<vocab_size>' with vocab_size >= 257, "
                         "e.g. 'bpe:4096'")
    return int(size)


def _tiktoken_by_name(name: str) -> TiktokenTokenizer:
    """One of tiktoken's encodings; its vocabulary is downloaded once and cached by tiktoken."""
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as e:  # requests' ConnectionError, HTTPError, ... when offline
        raise ConnectionError(f"could not download the {name} vocabulary ({type(e).__name__}); "
                              "if you are offline use tokenizer 'bpe:4096' or 'char' instead") from e
    return TiktokenTokenizer(name, encoding)


def _saved_file(directory: Path) -> Path | None:
    """The file `Tokenizer.save` wrote in `directory` (or the legacy name), if there is one."""
    for name in (TOKENIZER_FILE, LEGACY_TOKENIZER_FILE):
        path = directory / name
        if path.exists() and (name == TOKENIZER_FILE or '"kind"' in path.read_text(encoding="utf-8")[:200]):
            return path
    return None


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load what `Tokenizer.save(directory)` wrote (e.g. from a checkpoint directory)."""
    directory = Path(directory)
    path = _saved_file(directory)
    if path is None:
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}: save one with tokenizer.save(directory)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta["kind"] in PRETRAINED_FILES:
        return _load_pretrained(directory, meta)
    if meta["kind"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["kind"] == "tiktoken":
        return _tiktoken_by_name(meta["name"])
    ranks = read_ranks(directory / RANKS_FILE)
    encoding = tiktoken.Encoding(name=meta["name"], pat_str=meta["pat_str"], mergeable_ranks=ranks,
                                 special_tokens=meta["special_tokens"])
    return TiktokenTokenizer(meta["name"], encoding, ranks)


# ----------------------------------------------------------------------------- tokenizers of other checkpoints


class HFTokenizer:
    """A `tokenizer.json` through the `tokenizers` library. encode adds BOS as the tokenizer's template says."""

    def __init__(self, path: Path, eos_token: str | None = None):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(f"{path} needs the `tokenizers` library: pip install tokenizers") from e
        self.path, self.tokenizer = path, tokenizers.Tokenizer.from_file(str(path))
        self.name, self.vocab_size = f"tokenizers:{path}", self.tokenizer.get_vocab_size()
        candidates = [eos_token, "</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>"]
        self.eot_id = next((i for t in candidates if t and (i := self.tokenizer.token_to_id(t)) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        save_pretrained_tokenizer(self, directory)


class SentencePieceTokenizer:
    """A `tokenizer.model` (Meta's Llama 2 tokenizer) through `sentencepiece`. encode prepends BOS."""

    def __init__(self, path: Path):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(f"{path} needs the `sentencepiece` library: pip install sentencepiece") from e
        self.path, self.sp = path, sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.name, self.vocab_size = f"sentencepiece:{path}", self.sp.get_piece_size()
        self.bos_id, self.eot_id = self.sp.bos_id(), (self.sp.eos_id() if self.sp.eos_id() >= 0 else None)

    def encode(self, text: str) -> list[int]:
        return ([self.bos_id] if self.bos_id >= 0 else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        # the model's vocabulary may be padded past the tokenizer's: skip ids it has no piece for
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def save(self, directory: str | Path) -> None:
        save_pretrained_tokenizer(self, directory)


# Meta's Llama 3 tokenizer (llama-models, models/llama3/tokenizer.py): tiktoken ranks in tokenizer.model, this
# split pattern, and 256 special tokens numbered after the 128,000 ranks (Llama 3.1 and 3.2 names).
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model calls a tool and waits
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


def is_tiktoken_file(path: Path) -> bool:
    """Meta's Llama 3 tokenizer.model is text, "base64-token rank" per line; Llama 2's is a SentencePiece protobuf."""
    with open(path, "rb") as f:
        head = f.read(64).split(b"\n")[0]
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", head) is not None


class Llama3Tokenizer:
    """Meta's Llama 3 tokenizer: a `tiktoken.Encoding` over tokenizer.model, with Meta's split pattern and special
    tokens. encode prepends <|begin_of_text|> and reads special tokens written in the text (as Hugging Face's
    tokenizer.json does, so a rendered chat template encodes to its header ids); decode skips special tokens."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        ranks = read_ranks(self.path)
        special = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(name=f"llama3:{self.path.name}", pat_str=LLAMA3_SPLIT_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=special)
        self.name, self.vocab_size, self.n_words = f"llama3:{self.path}", self.encoding.n_vocab, len(ranks)
        self.special_tokens = special  # {"<|begin_of_text|>": 128000, ...}
        self.bos_id, self.eot_id = special["<|begin_of_text|>"], special["<|end_of_text|>"]
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        self.eos_ids = {special[t] for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")}  # end a reply

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode([int(i) for i in ids if int(i) < self.n_words])

    def save(self, directory: str | Path) -> None:
        save_pretrained_tokenizer(self, directory)


def eos_token_from_config(directory: Path) -> str | None:
    """The eos token's text from a Hugging Face folder's tokenizer_config.json, if there is one."""
    f = directory / "tokenizer_config.json"
    eos = json.loads(f.read_text()).get("eos_token") if f.exists() else None
    return eos.get("content") if isinstance(eos, dict) else eos


# ----------------------------------------------------------------------------- a pretrained tokenizer in a run folder

PRETRAINED_FILES = {"tokenizers": "pretrained_tokenizer.json", "sentencepiece": "tokenizer.model",
                    "llama3": "tokenizer.model"}
SPECIAL_FIELDS = ("bos_id", "eot_id", "eos_ids", "chat_template", "bos_token", "eos_token")


def save_pretrained_tokenizer(tok, directory: str | Path) -> None:
    """A pretrained model's tokenizer (HF, GGUF, SentencePiece or Meta's Llama 3) into a run folder, with its
    special ids and chat template, so that `load_tokenizer(directory)` gives back one that encodes, decodes and
    chats the same."""
    import shutil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind = "sentencepiece" if hasattr(tok, "sp") else "llama3" if isinstance(tok, Llama3Tokenizer) else "tokenizers"
    path = directory / PRETRAINED_FILES[kind]
    if kind in ("sentencepiece", "llama3"):  # a tokenizer.model file, copied
        if Path(tok.path).resolve() != path.resolve():
            shutil.copyfile(tok.path, path)
    else:
        tok.tokenizer.save(str(path))  # the whole pipeline: vocabulary, merges, special tokens, BOS template
    special = {k: getattr(tok, k, None) for k in SPECIAL_FIELDS}
    special["eos_ids"] = sorted(special["eos_ids"]) if special["eos_ids"] else None
    meta = {"kind": kind, "name": tok.name, "vocab_size": tok.vocab_size, **special}
    (directory / TOKENIZER_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")


def _load_pretrained(directory: Path, meta: dict) -> HFTokenizer | SentencePieceTokenizer | Llama3Tokenizer:
    """What `save_pretrained_tokenizer` wrote: the same name, special ids and chat template as the original."""
    path = directory / PRETRAINED_FILES[meta["kind"]]
    kinds = {"tokenizers": HFTokenizer, "sentencepiece": SentencePieceTokenizer, "llama3": Llama3Tokenizer}
    tok = kinds[meta["kind"]](path)
    tok.name = meta["name"]
    for k in SPECIAL_FIELDS:
        if meta.get(k) is not None or k in ("chat_template", "bos_token", "eos_token"):
            setattr(tok, k, set(meta[k]) if k == "eos_ids" else meta.get(k))
    return tok
