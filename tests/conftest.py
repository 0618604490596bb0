import os
import shutil
from pathlib import Path

import pytest

# Tests never reach the Hugging Face hub: offline failures must be fast and clear.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session", autouse=True)
def seeded_corpus_cache():
    """No internet here: seed the project's download cache (data/) from the shared copy, as CI does."""
    target = ROOT / "data" / "tinyshakespeare.txt"
    if not target.exists() and SHARED_CORPUS.exists():
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(SHARED_CORPUS, target)
    return target


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, TokenData): the first 60k characters of the corpus, char-level, tokenized once per module."""
    from utils.data import prepare_data

    d = tmp_path_factory.mktemp("data")
    src = SHARED_CORPUS if SHARED_CORPUS.exists() else ROOT / "data" / "tinyshakespeare.txt"
    text = src.read_text()[:60_000] if src.exists() else "To be, or not to be. " * 3000
    (d / "small.txt").write_text(text)
    return d, prepare_data(str(d / "small.txt"), "char", data_dir=d)
