"""Chat templates render as transformers renders them; a long conversation drops its oldest turns."""

import builtins
import io
import json

import pytest
import torch

from utils.__main__ import main
from utils.chat import fit_to_context, render_chat
from utils.checkpoints import load_pretrained
from utils.hf import save_hf
from utils.model import Llama, LlamaConfig

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
TOJSON_LOOPS = """{%- set ns = namespace(turns=0) -%}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {{ m.role }}: {{ m.content | tojson }}
{% endfor %}
{{ ns.turns }} turns{% if add_generation_prompt %} / assistant:{% endif %}"""
TEMPLATES = {"smollm2": SMOLLM2, "llama2": LLAMA2, "zephyr": ZEPHYR, "tojson-loops": TOJSON_LOOPS}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! Café 日本 \"quoted\""},
            {"role": "assistant", "content": " Hello. "}, {"role": "user", "content": "What is 2+2?\nThink."}]


def hf_tokenizer(template: str):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_system", [True, False])
def test_render_chat_equals_transformers_apply_chat_template(name, add_generation_prompt, with_system):
    messages = MESSAGES if with_system else MESSAGES[1:]
    ref = hf_tokenizer(TEMPLATES[name]).apply_chat_template(messages, tokenize=False,
                                                             add_generation_prompt=add_generation_prompt)
    ours = render_chat(TEMPLATES[name], messages, add_generation_prompt, bos_token="<s>", eos_token="</s>")
    assert ours == ref
    assert "Café 日本" in ours


def test_template_exception_is_a_one_line_value_error():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        hf_tokenizer(LLAMA2).apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match="chat template refused these messages: Conversation roles must alternate"):
        render_chat(LLAMA2, messages, bos_token="<s>", eos_token="</s>")


# ---- keeping the conversation within the context -------------------------------------------------------------

def msg(role: str, n: int) -> dict:
    return {"role": role, "content": "x" * n}


def n_chars(messages: list[dict]) -> int:  # one "token" per character: easy to count by hand
    return sum(len(m["content"]) for m in messages)


def test_fit_to_context_drops_the_oldest_turns_and_keeps_the_system_message():
    messages = [msg("system", 10), msg("user", 10), msg("assistant", 10), msg("user", 10), msg("assistant", 10),
                msg("user", 10)]
    assert fit_to_context(messages, n_chars, 60) == messages
    assert fit_to_context(messages, n_chars, 59) == messages[:1] + messages[3:]  # a user turn and its reply go
    assert fit_to_context(messages, n_chars, 39) == messages[:1] + messages[5:]
    assert fit_to_context(messages[1:], n_chars, 30) == messages[3:]


def test_fit_to_context_refuses_a_message_that_cannot_fit():
    with pytest.raises(ValueError, match="this message takes 60 tokens .* more than the 35 the context leaves"):
        fit_to_context([msg("system", 10), msg("user", 10), msg("assistant", 10), msg("user", 50)], n_chars, 35)


# ---- the command line ---------------------------------------------------------------------------------------

@pytest.fixture
def hf_folder(tmp_path):
    """A tiny HF checkpoint with a word-level tokenizer.json and no chat template yet."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                              max_seq_len=128, tie_embeddings=True))
    save_hf(model, tmp_path)
    words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "hello", "there", "how", "are", "you"]
    words += [f"w{i}" for i in range(len(words), 64)]  # every id the model can sample decodes to a word
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return tmp_path


def test_chat_without_a_template_says_to_use_generate(hf_folder, capsys):
    assert main(["chat", "--checkpoint", str(hf_folder), "--message", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no chat template" in err and "python -m utils generate" in err
    assert len(err.strip().splitlines()) == 1


def test_chat_answers_one_message_from_an_hf_folder(hf_folder, capsys):
    (hf_folder / "chat_template.jinja").write_text(ZEPHYR)
    assert main(["chat", "--checkpoint", str(hf_folder), "--message", " "]) == 2
    assert "--message is empty" in capsys.readouterr().err
    assert main(["chat", "--checkpoint", str(hf_folder), "--message", "hello there", "--temperature", "1",
                 "--seed", "0", "--max-new-tokens", "8"]) == 0
    reply = capsys.readouterr().out.split()  # a random model: some of its 8 tokens are words
    assert 1 <= len(reply) <= 8 and all(w.startswith("w") or w in ("hello", "there", "how", "are", "you")
                                        for w in reply)


def test_interactive_chat_ends_cleanly_on_ctrl_d_and_ctrl_c(hf_folder, capsys, monkeypatch):
    config = json.loads((hf_folder / "tokenizer_config.json").read_text())
    (hf_folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": ZEPHYR}))
    args = ["chat", "--checkpoint", str(hf_folder), "--max-new-tokens", "1000", "--seed", "0"]  # 64: half the context
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n" + "hello there " * 40 + "\nhow are you\n"))
    assert main(args) == 0  # stdin ends: Ctrl-D
    out, err = capsys.readouterr()
    assert out.count(">>> ") == 5  # hello, (empty: asked again), too long, how are you, end of input
    assert "error: this message takes" in err and "Traceback" not in err

    def ctrl_c(prompt):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", ctrl_c)
    assert main(args) == 0


# ---- the KV cache kept between turns ------------------------------------------------------------------------

def five_turns(hf_folder, capsys, monkeypatch, keep: bool, extra=()) -> tuple[str, list[int]]:
    """A greedy interactive chat of five messages: (what it printed, tokens each forward pass processed)."""
    import utils.chat
    import utils.checkpoints

    config = json.loads((hf_folder / "tokenizer_config.json").read_text())
    (hf_folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": ZEPHYR}))
    processed = []

    def load_and_count(*args, **kwargs):
        model = load_pretrained(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a, kw: processed.append((a[0] if a else kw["tokens"]).shape[1]),
                                        with_kwargs=True)
        return model

    if "--compile" not in extra:  # a hook in the compiled step would be compiled into it
        monkeypatch.setattr(utils.checkpoints, "load_pretrained", load_and_count)
    if not keep:  # the caches never claim to hold anything: every turn processes the whole conversation
        monkeypatch.setattr(utils.chat.KeptCache, "replied", lambda self, ids, reply: None)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you\nhello there\nyou\nare you there\n"))
    assert main(["chat", "--checkpoint", str(hf_folder), "--temperature", "0", "--max-new-tokens", "6", *extra]) == 0
    return capsys.readouterr().out, processed


def test_a_chat_keeping_its_cache_between_turns_writes_the_tokens_of_one_that_rereads_everything(
        hf_folder, capsys, monkeypatch):
    kept, kept_counts = five_turns(hf_folder, capsys, monkeypatch, keep=True)
    reread, reread_counts = five_turns(hf_folder, capsys, monkeypatch, keep=False)
    assert kept == reread and kept.count(">>> ") == 6
    prefills = lambda counts: [n for n in counts if n > 1]  # decode steps process one token each
    assert len(prefills(kept_counts)) == len(prefills(reread_counts)) == 5
    assert prefills(kept_counts)[0] == prefills(reread_counts)[0]  # turn 1: the whole prompt either way
    for turn in range(1, 5):  # later turns: at most what the prompt added since the turn before
        assert prefills(kept_counts)[turn] <= prefills(reread_counts)[turn] - prefills(reread_counts)[turn - 1]


def test_a_turn_whose_earlier_tokens_changed_rereads_from_the_first_difference():
    """A template may render an earlier turn differently once another follows: keep only the common prefix."""
    from utils.chat import KeptCache
    from utils.generate import generate, stream

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                              max_seq_len=128)).eval()
    kept = KeptCache(model)
    first = torch.randint(0, 64, (20,)).tolist()
    assert kept.reuse(first, 5) == 0
    new = [t.item() for t in stream(model, torch.tensor([first]), 5, temperature=0, cached=0)]
    kept.replied(first, new)
    second = first[:12] + [(first[12] + 1) % 64] + first[13:] + new + [7, 8, 9]  # token 12 rendered differently
    assert kept.reuse(second, 5) == 12
    again = torch.cat(list(stream(model, torch.tensor([second]), 5, temperature=0, cached=12)))
    assert torch.equal(again, generate(model, torch.tensor([second]), 5, temperature=0)[0, len(second):])
    kept.replied(second, again.tolist())
    assert kept.reuse(second, 5) == len(second) - 1  # a prompt the caches hold entirely: its last id again


def test_a_compiled_chat_keeping_its_cache_writes_the_plain_tokens(hf_folder, capsys, monkeypatch):
    """The compiled step reads the same kept caches (one compile, ~10 s on 2 cores)."""
    compiled, _ = five_turns(hf_folder, capsys, monkeypatch, keep=True, extra=("--compile",))  # first: no hooks yet
    plain, _ = five_turns(hf_folder, capsys, monkeypatch, keep=True)
    assert compiled == plain


def test_chat_and_generate_find_the_checkpoint_format_once(hf_folder, capsys, monkeypatch):
    import utils.checkpoints

    (hf_folder / "chat_template.jinja").write_text(ZEPHYR)
    calls, detect = [], utils.checkpoints.detect_format
    monkeypatch.setattr(utils.checkpoints, "detect_format", lambda path: calls.append(path) or detect(path))
    assert main(["chat", "--checkpoint", str(hf_folder), "--message", "hello", "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--checkpoint", str(hf_folder), "--prompt", "hello", "--max-new-tokens", "2"]) == 0
    assert calls == [str(hf_folder)] * 2
