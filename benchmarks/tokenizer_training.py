"""Tokenizer training time and corpus size in tokens, for char, bpe:1024/2048/4096 and gpt2.

    python benchmarks/tokenizers.py                              # Tiny Shakespeare (downloaded once)
    python benchmarks/tokenizers.py --source path/to/corpus.txt  # any source utils.data accepts
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data import load_text, split_train_val  # noqa: E402
from utils.tokenizer import get_tokenizer  # noqa: E402

TOKENIZERS = ["char", "bpe:1024", "bpe:2048", "bpe:4096", "gpt2"]


def measure(name: str, train_text: str, text: str) -> dict:
    """Train (or fetch) one tokenizer, encode the whole corpus, check the round trip."""
    start = time.perf_counter()
    tok = get_tokenizer(name, train_text=train_text)  # no cache_dir: always trains
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    ids = tok.encode(text)
    encode_s = time.perf_counter() - start
    assert tok.decode(ids) == text, f"{name} is not lossless on this corpus"
    return {"vocab": tok.vocab_size, "train_s": train_s, "encode_s": encode_s, "tokens": len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="tinyshakespeare")
    parser.add_argument("--tokenizers", nargs="+", default=TOKENIZERS)
    args = parser.parse_args()
    text = load_text(args.source)
    train_text, _ = split_train_val(text)
    print(f"corpus {args.source}: {len(text):,} characters, tokenizers trained on the first 90%\n")
    print(f"| {'tokenizer':<10} | {'vocab':>6} | {'train (s)':>9} | {'encode (s)':>10} | {'tokens':>9} | chars/token |")
    print(f"|{'-' * 12}|{'-' * 8}|{'-' * 11}|{'-' * 12}|{'-' * 11}|{'-' * 13}|")
    for name in args.tokenizers:
        try:
            r = measure(name, train_text, text)
        except ConnectionError:
            print(f"| {name:<10} | {'n/a':>6} | unavailable offline | {'n/a':>9} | {'n/a':>11} |")
            continue
        print(f"| {name:<10} | {r['vocab']:>6} | {r['train_s']:>9.2f} | {r['encode_s']:>10.2f} | {r['tokens']:>9,} | "
              f"{len(text) / r['tokens']:>11.2f} |")


if __name__ == "__main__":
    main()
