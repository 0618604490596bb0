"""Solutions to lesson 05's exercises: the same names as the notebook's stubs.

A test replaces each exercise cell by `from solutions.lesson_05 import *` and expects every check to pass.
"""

from dataclasses import replace

import torch
from torch import nn

from utils.model import PRESETS, LlamaConfig, TransformerBlock, count_params
from utils.norm import RMSNorm
from utils.rope import rope_cos_sin

__all__ = ["MyLlama", "my_count_params", "my_kv_cache_bytes"]


class MyLlama(nn.Module):
    """LLaMA with Meta's names: tokens (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight              # one matrix, used twice
        self.rope_cos, self.rope_sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        T = tokens.shape[1]
        cos = self.rope_cos[start_pos:start_pos + T]                     # positions start_pos .. start_pos + T - 1
        sin = self.rope_sin[start_pos:start_pos + T]
        h = self.tok_embeddings(tokens)                                  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos)
        return self.output(self.norm(h)).float()                        # (B, T, vocab_size)


def my_count_params(config: LlamaConfig) -> int:
    """Parameters of a LLaMA with this shape, from the shape alone; a tied output matrix counted once."""
    head_dim = config.dim // config.n_heads
    attention = config.dim * head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)  # wq, wo; wk, wv
    feed_forward = 3 * config.dim * config.hidden_dim                                 # w1, w2, w3
    norms = 2 * config.dim                                                            # attention_norm, ffn_norm
    embeddings = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)  # tok_embeddings, output
    return embeddings + config.n_layers * (attention + feed_forward + norms) + config.dim  # + the final norm


def my_kv_cache_bytes(config: LlamaConfig, batch_size: int, seq_len: int, bytes_per_element: int) -> int:
    """Bytes of the keys and values cached by every layer for batch_size sequences of seq_len tokens."""
    head_dim = config.dim // config.n_heads
    return 2 * config.n_layers * batch_size * seq_len * config.n_kv_heads * head_dim * bytes_per_element


# ---- exercise 3's questions, answered (not part of the checked exercises: `import *` leaves them out)

def sequences_that_fit(config: LlamaConfig, weight_bytes: int, cache_bytes: int, *, weights: LlamaConfig | None = None,
                       memory: float = 2 * 80e9, seq_len: int = 4096) -> int:
    """How many seq_len-token sequences' KV caches (of `config`) fit in `memory` bytes next to the weights
    (of `weights`, by default `config` itself)."""
    free = memory - count_params(weights or config) * weight_bytes
    return max(int(free // my_kv_cache_bytes(config, 1, seq_len, cache_bytes)), 0)


def exercise_3_answers() -> dict:
    """Two 80 GB GPUs (160e9 bytes), Llama-2-70B, 4,096-token sequences:

    - bf16 weights (137.95 GB) and a bf16 cache (1.34 GB per sequence): 22.05 GB free -> 16 sequences;
    - int8 weights (68.98 GB) and an int8 cache (0.67 GB per sequence): 91.02 GB free -> 135 sequences;
    - had 70B kept multi-head attention (n_kv_heads 64), each sequence's bf16 cache would be 10.74 GB,
      eight times GQA's: 2 sequences next to today's weights; and since MHA's wk and wv are eight times
      larger too (78.37B parameters, 156.74 GB in bf16), not even one sequence fits.
    """
    gqa = PRESETS["llama2-70b"]
    mha = replace(gqa, n_kv_heads=gqa.n_heads)
    return {"bf16": sequences_that_fit(gqa, 2, 2), "int8": sequences_that_fit(gqa, 1, 1),
            "MHA cache, GQA weights": sequences_that_fit(mha, 2, 2, weights=gqa),
            "MHA cache, MHA weights": sequences_that_fit(mha, 2, 2)}


if __name__ == "__main__":  # python -m solutions.lesson_05
    print(exercise_3_answers())
