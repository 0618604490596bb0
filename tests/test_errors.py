"""Bad input fails early with a ValueError that says what to change."""

import pytest
import torch

from utils.generate import generate, stream
from utils.model import Llama, LlamaConfig, get_config


@pytest.mark.parametrize("kwargs, words", [
    (dict(dim=100, n_heads=8), "divisible by n_heads"),
    (dict(dim=64, n_heads=8, n_kv_heads=3), "pick n_kv_heads in [1, 2, 4, 8]"),
    (dict(dim=36, n_heads=4), "must be even"),
    (dict(dim=64, n_heads=4, dropout=1.5), "dropout"),
    (dict(dim=64, n_heads=4, n_layers=0), "n_layers must be a positive"),
    (dict(dim=64, n_heads=4, init_std=0.0), "init_std must be > 0"),
])
def test_invalid_config_is_rejected(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        LlamaConfig(**kwargs)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="choose one of"):
        get_config("llama-9000")


@pytest.fixture(scope="module")
def model():
    return Llama(get_config("smoke", max_seq_len=32)).eval()


def test_too_many_tokens(model):
    with pytest.raises(ValueError, match=r"exceeds max_seq_len \(32\)"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_cache_position_plus_new_tokens_beyond_max_seq_len(model):
    with pytest.raises(ValueError, match=r"start_pos \(30\) \+ tokens \(5\)"):
        model(torch.zeros(1, 5, dtype=torch.long), start_pos=30)
    model.setup_cache(1, 16)
    try:
        with pytest.raises(ValueError, match="KV cache holds 16 positions"):
            model(torch.zeros(1, 5, dtype=torch.long), start_pos=14)
    finally:
        model.clear_cache()


@pytest.mark.parametrize("tokens, words", [
    (torch.zeros(1, 4), r"int64 \(or int32\) tensor"),
    (torch.zeros(4, dtype=torch.long), "shape \\(batch, seq_len\\)"),
    ([[1, 2, 3]], r"int64 \(or int32\) tensor"),
])
def test_bad_token_ids(model, tokens, words):
    with pytest.raises(ValueError, match=words):
        model(tokens)


@pytest.mark.parametrize("kwargs, words", [
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be >= 1"),
])
def test_bad_sampling_arguments(model, kwargs, words):
    with pytest.raises(ValueError, match=words):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 5, **kwargs)


def test_prompt_plus_new_tokens_longer_than_context(model):
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate(model, torch.zeros(1, 20, dtype=torch.long), 13)


def test_stream_checks_before_the_first_token(model):
    with pytest.raises(ValueError, match="temperature"):
        stream(model, torch.zeros(1, 3, dtype=torch.long), 5, temperature=-1)


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")])
def test_a_sampling_setting_that_is_no_number_is_one_line_and_exit_2(command, flag, value, capsys):
    from utils.__main__ import main
    assert main([command, "--checkpoint", "checked-after-the-flags", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag[2:].replace('-', '_')} must be") and f"got {value}" in err
    assert len(err.strip().splitlines()) == 1
