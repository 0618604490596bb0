"""Lesson 08's exercise checkers: each accepts the reference and names the mistake of each wrong version.

The wrong versions are written the way a learner would write them, independently of the checker's
own list of mistakes, so a test passes only if the diagnosis reaches code it has not seen.
"""

import math

import pytest
import torch

from solutions import lesson_08
from tests.checking import rejection, stub
from utils import exercises as ex
from utils.chat import LLAMA3_CHAT_TEMPLATE, render_chat
from utils.rope import RopeScaling, scale_frequencies

# ---- 1. the frequency ladder ------------------------------------------------------------------------------


def ladder_learner(mistake=None):
    """A learner's Llama 3.1 scaling, a loop over the pairs as Meta wrote it; `mistake` picks one bug."""
    def my_scale_frequencies(freqs, factor, low_freq_factor, high_freq_factor, original_max_seq_len):
        out = []
        for f in freqs.tolist():
            wavelength = (1 / f) if mistake == "no 2 pi" else 2 * math.pi / f
            if mistake == "divide all":
                out.append(f / factor)
            elif wavelength < original_max_seq_len / high_freq_factor:
                out.append(f / factor if mistake == "bands swapped" else f)
            elif wavelength > original_max_seq_len / low_freq_factor:
                out.append(f if mistake == "bands swapped" else f / factor)
            else:
                gamma = (original_max_seq_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
                if mistake == "blend reversed":
                    gamma = 1 - gamma
                out.append((1 - gamma) * f / factor + gamma * f)
        return torch.tensor(out, dtype=freqs.dtype)
    return my_scale_frequencies


def test_scaling_checker_accepts_the_reference_and_a_learners_loop():
    ex.check_scale_frequencies(lambda freqs, *args: scale_frequencies(freqs, RopeScaling(*args)))
    ex.check_scale_frequencies(ladder_learner())
    ex.check_scale_frequencies(lesson_08.my_scale_frequencies)
    assert ex.run_check(ex.check_scale_frequencies, stub) == "⏳ not attempted yet"


@pytest.mark.parametrize("mistake, message", [
    ("divide all", "every frequency divided by factor (plain position interpolation)"),
    ("bands swapped", "the bands swapped"),
    ("blend reversed", "the blend reversed"),
    ("no 2 pi", "wavelength taken as 1 / freq"),
])
def test_scaling_checker_names_the_mistake(mistake, message):
    assert rejection(ex.check_scale_frequencies, ladder_learner(mistake)).startswith(message)


def test_scaling_checker_catches_a_function_that_changes_freqs_in_place():
    def in_place(freqs, factor, *rest):
        freqs /= factor
        return freqs
    assert "changed its input freqs in place" in rejection(ex.check_scale_frequencies, in_place)


# ---- 2. the chat prompt ------------------------------------------------------------------------------------


def prompt_learner(mistake=None):
    """A learner's Llama 3 prompt; `mistake` picks one bug."""
    def my_llama3_chat_prompt(messages):
        gap = "\n" if mistake == "one newline" else "\n\n"
        end = "<|end_of_text|>" if mistake == "end of text" else "<|eot_id|>"
        parts = [] if mistake == "no bos" else ["<|begin_of_text|>"]
        for m in messages:
            parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>{gap}{m['content'].strip()}{end}")
        if mistake != "no reply header":
            parts.append(f"<|start_header_id|>assistant<|end_header_id|>{gap}")
        return "".join(parts)
    return my_llama3_chat_prompt


def test_chat_checker_accepts_the_template_and_a_learners_prompt():
    ex.check_llama3_chat_prompt(lambda messages: render_chat(LLAMA3_CHAT_TEMPLATE, messages,
                                                             bos_token="<|begin_of_text|>"))
    ex.check_llama3_chat_prompt(prompt_learner())
    ex.check_llama3_chat_prompt(lesson_08.my_llama3_chat_prompt)
    assert ex.run_check(ex.check_llama3_chat_prompt, stub) == "⏳ not attempted yet"


@pytest.mark.parametrize("mistake, message", [
    ("end of text", "messages end with <|end_of_text|>"),
    ("no reply header", "the prompt does not end with the assistant's header"),
    ("one newline", "one newline after a header"),
    ("no bos", "no <|begin_of_text|>"),
])
def test_chat_checker_names_the_mistake(mistake, message):
    assert rejection(ex.check_llama3_chat_prompt, prompt_learner(mistake)).startswith(message)


def test_chat_checker_recognises_llama2s_format():
    def llama2(messages):
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        out = ""
        for m in [m for m in messages if m["role"] != "system"]:
            if m["role"] == "user":
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content'].strip()}" if system and not out else m["content"]
                out += f"<s>[INST] {text.strip()} [/INST]"
            else:
                out += f" {m['content'].strip()} </s>"
        return out
    assert rejection(ex.check_llama3_chat_prompt, llama2).startswith("Llama 2's format")


def test_chat_checker_asks_for_a_string():
    assert "return the prompt as one string" in rejection(ex.check_llama3_chat_prompt,
                                                          lambda messages: [1, 2, 3])


# ---- 3. the vocabulary's parameters ------------------------------------------------------------------------


def test_vocab_checker_accepts_a_count_and_a_built_model():
    ex.check_vocab_params(lesson_08.my_vocab_params)

    def by_building(config):
        from utils.model import Llama
        with torch.device("meta"):
            model = Llama(config.__class__(**{**config.to_dict(), "max_seq_len": 8}))
        return model.tok_embeddings.weight.numel() * (1 if config.tie_embeddings else 2)
    ex.check_vocab_params(by_building)
    assert ex.run_check(ex.check_vocab_params, stub) == "⏳ not attempted yet"


@pytest.mark.parametrize("learner, message", [
    (lambda c: 2 * c.vocab_size * c.dim, "a tied output counted twice"),
    (lambda c: c.vocab_size * c.dim, "the output layer left out"),
    (lambda c: c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.dim, "the final norm counted"),
    (lambda c: c.vocab_size * c.hidden_dim * (1 if c.tie_embeddings else 2), "rows of hidden_dim"),
])
def test_vocab_checker_names_the_mistake(learner, message):
    assert rejection(ex.check_vocab_params, learner).startswith(message)


def test_vocab_checker_asks_for_an_int():
    assert "return a Python int" in rejection(ex.check_vocab_params,
                                              lambda c: torch.tensor(c.vocab_size * c.dim))
