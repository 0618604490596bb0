import os
import shutil
from pathlib import Path

import pytest

# Tests never reach the Hugging Face hub: offline failures must be fast and clear.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
REPO_CORPUS = ROOT / "data" / "tinyshakespeare.txt"  # where a first `python -m utils train` downloads it


def corpus_file() -> Path | None:
    """Tiny Shakespeare: the shared copy beside the repo, else the one in the repo's data/ (a public clone)."""
    return next((p for p in (SHARED_CORPUS, REPO_CORPUS) if p.exists()), None)


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """The path of the whole Tiny Shakespeare text; the test skips, saying where to put it, if there is none."""
    path = corpus_file()
    if path is None:
        pytest.skip(f"tinyshakespeare.txt missing: run `python -m utils train` once online (it downloads it into "
                    f"{REPO_CORPUS.parent}), or put a copy at {SHARED_CORPUS}")
    return path


@pytest.fixture(scope="session", autouse=True)
def seeded_corpus_cache():
    """No internet here: seed the project's download cache (data/) from the shared copy, as CI does."""
    target = REPO_CORPUS
    if not target.exists() and SHARED_CORPUS.exists():
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(SHARED_CORPUS, target)
    return target


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, TokenData): the first 60k characters of the corpus, char-level, tokenized once per module."""
    from utils.data import prepare_data

    d = tmp_path_factory.mktemp("data")
    src = corpus_file()
    text = src.read_text()[:60_000] if src is not None else "To be, or not to be. " * 3000
    (d / "small.txt").write_text(text)
    return d, prepare_data(str(d / "small.txt"), "char", data_dir=d)
