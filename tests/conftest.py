import os

# Tests never reach the Hugging Face hub: offline failures must be fast and clear.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
