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
