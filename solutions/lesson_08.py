"""Solutions to lesson 08's exercises: the same names as the notebook's stubs.

A test replaces each exercise cell by `from solutions.lesson_08 import *` and expects every check to pass.
"""

import math

import torch

__all__ = ["my_scale_frequencies", "my_llama3_chat_prompt", "my_vocab_params"]


def my_scale_frequencies(freqs, factor, low_freq_factor, high_freq_factor, original_max_seq_len):
    """Llama 3.1's frequency ladder: freqs (hd/2,) -> scaled freqs (hd/2,)."""
    wavelength = 2 * math.pi / freqs
    gamma = (original_max_seq_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - gamma) * freqs / factor + gamma * freqs
    slow = wavelength > original_max_seq_len / low_freq_factor
    fast = wavelength < original_max_seq_len / high_freq_factor
    return torch.where(fast, freqs, torch.where(slow, freqs / factor, blended))


def my_llama3_chat_prompt(messages):
    """The prompt text for [{"role": ..., "content": ...}, ...] in Llama 3's chat format."""
    header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    text = "<|begin_of_text|>"
    for m in messages:
        text += header(m["role"]) + m["content"].strip() + "<|eot_id|>"
    return text + header("assistant")


def my_vocab_params(config):
    """Parameters of the token embedding and the output layer, a tied matrix counted once: an int."""
    return config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)
