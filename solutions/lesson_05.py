"""Solutions to lesson 05's exercises: the same names as the notebook's stubs.

A test replaces each exercise cell by `from solutions.lesson_05 import *` and expects every check to pass.
"""

import torch
from torch import nn

from utils.attention import Attention
from utils.feedforward import FeedForward
from utils.model import LlamaConfig
from utils.norm import RMSNorm


class TransformerBlock(nn.Module):
    """Pre-norm LLaMA block: h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config.dim, config.n_heads, config.n_kv_heads)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)  # (B, T, dim)
        return h + self.feed_forward(self.ffn_norm(h))                       # (B, T, dim)


def count_parameters(config: LlamaConfig) -> int:
    """Parameters of a Llama with this shape, from the shape alone; a tied output matrix is counted once."""
    head_dim = config.dim // config.n_heads
    attention = config.dim * head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)  # wq, wo; wk, wv
    feed_forward = 3 * config.dim * config.hidden_dim                                 # w1, w2, w3
    norms = 2 * config.dim                                                            # attention_norm, ffn_norm
    embeddings = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)  # tok_embeddings, output
    return embeddings + config.n_layers * (attention + feed_forward + norms) + config.dim  # + the final norm


def kv_cache_bytes(config: LlamaConfig, batch_size: int, seq_len: int, bytes_per_element: int) -> int:
    """Bytes of the keys and values of every layer for batch_size sequences of seq_len tokens."""
    head_dim = config.dim // config.n_heads
    return 2 * config.n_layers * batch_size * seq_len * config.n_kv_heads * head_dim * bytes_per_element
