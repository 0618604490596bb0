"""Writing GGUF: our `Llama` and its tokenizer in one file that llama.cpp, Ollama and LM Studio run.

    export_gguf(model, tokenizer, "model.gguf", dtype="q8_0")
    python -m utils export --checkpoint out --format gguf --out model.gguf [--dtype f32|f16|bf16|q8_0]

The reverse of utils/gguf.py, written with the `gguf` package's own GGUFWriter and quantizers:
- Names: our `layers.N.attention.wq.weight` is llama.cpp's `blk.N.attn_q.weight` (utils.gguf's tables,
  inverted); a tied model has no output.weight, and llama.cpp then reuses token_embd.weight.
- Shapes: GGUFWriter takes the numpy array in PyTorch's (rows, cols) order and lists it reversed.
- RoPE layout: llama.cpp rotates adjacent pairs, as Meta and we do; its convert_hf_to_gguf.py permutes
  Hugging Face's rotate-half q/k rows back to that order. So our wq/wk go in unpermuted: exactly what
  utils/gguf.py reads back unpermuted, and what tests/test_export.py checks against llama.cpp's logits.
- Types: 1-D tensors (the norms) stay F32, as llama.cpp's converter keeps them; a 2-D weight whose rows
  do not split into q8_0's blocks of 32 is stored F16 instead, as the converter does.

The tokenizer goes in the file too (tokenizer.ggml.*), so llama.cpp tokenizes exactly as we do: see
`tokenizer_fields` for which of our tokenizers can be written exactly and which are refused.
"""

from pathlib import Path

import torch

from .files import atomic_write
from .gguf import (
    CONTROL,
    GGUF_LAYER_NAMES,
    GGUF_TOP_NAMES,
    NORMAL,
    UNUSED,
    USER_DEFINED,
    metadata,
    read_gguf,
    rope_freqs,
)
from .model import Llama, LlamaConfig, count_params

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")  # --dtype choices: the 2-D weights' storage


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("writing .gguf files needs the `gguf` package (ggml's writer): pip install gguf") from e
    return gguf


# ---- the weights ----------------------------------------------------------------------------------------

def gguf_tensor_name(name: str) -> str:
    """Our (Meta) name -> llama.cpp's: layers.3.attention.wq.weight -> blk.3.attn_q.weight."""
    top = {v: k for k, v in GGUF_TOP_NAMES.items()}
    layer = {v: k for k, v in GGUF_LAYER_NAMES.items()}
    stem, _, suffix = name.rpartition(".")
    if stem in top:
        return f"{top[stem]}.{suffix}"
    _, i, rest = stem.split(".", 2)  # "layers", "3", "attention.wq"
    return f"blk.{i}.{layer[rest]}.{suffix}"


def gguf_tensor(w: torch.Tensor, dtype: str):
    """(array as GGUFWriter takes it, its ggml type): 1-D F32; 2-D as `dtype` (F16 where q8_0's blocks do not fit)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    data = w.detach().float().cpu().numpy()
    qtype = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[dtype] if data.ndim == 2 else q.F32
    if qtype == q.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = q.F16  # rows of e.g. 48 floats: llama.cpp's converter falls back to F16 the same way
    return gguf.quants.quantize(data, qtype), qtype


def file_type(dtype: str):
    ft = _gguf().LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[dtype]


def add_config(writer, config: LlamaConfig, name: str) -> None:
    """The llama.* keys llama.cpp builds the model from (utils.gguf.config_from_gguf reads the same ones)."""
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)


# ---- the whole file -------------------------------------------------------------------------------------

def export_gguf(model: Llama, tokenizer, path: str | Path, dtype: str = "f32", name: str = "llama") -> dict:
    """Write `model` and `tokenizer` to a .gguf file (atomically); return what was written, for a summary line.

    dtype is the storage of the 2-D weights: f32 (exact), f16, bf16, or q8_0 (8-bit blocks of 32).
    A tokenizer that llama.cpp cannot reproduce exactly is refused (ValueError) before anything is written.
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}: use one of {', '.join(GGUF_DTYPES)}")
    gguf, config = _gguf(), model.config
    fields, kind = tokenizer_fields(tokenizer, config.vocab_size)  # refuses before the slow part
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    types: dict[str, int] = {}

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, "llama")
        add_config(writer, config, name)
        writer.add_file_type(file_type(dtype))
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value, vtype, sub_type in fields:
            writer.add_key_value(key, value, vtype, sub_type)
        for key, w in model.state_dict().items():
            if config.tie_embeddings and key == "output.weight":
                continue  # no output.weight: llama.cpp ties it to token_embd.weight
            data, qtype = gguf_tensor(w, dtype)
            writer.add_tensor(gguf_tensor_name(key), data, raw_dtype=qtype)
            types[qtype.name] = types.get(qtype.name, 0) + 1
        divisors = rope_freqs(config)  # Llama 3.1 scaled RoPE: plain / scaled frequency of each pair
        if divisors is not None:
            writer.add_tensor("rope_freqs.weight", divisors.numpy())
            types["F32"] = types.get("F32", 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return {"path": str(path), "parameters": count_params(config), "tensor_types": types, "tokenizer": kind,
            "bytes": path.stat().st_size}


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from a llama_cpp.Llama made with logits_all=True: one eval per token, as ours decodes."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))  # llm.scores: numpy, (n_ctx, vocab)
        llm.eval(out[-1:])
    return out


# ---- the tokenizer --------------------------------------------------------------------------------------
#
# llama.cpp's byte-level BPE ("gpt2" model) cuts text into chunks with the pre-tokenizer named by
# tokenizer.ggml.pre, then merges byte pairs by the rank of tokenizer.ggml.merges. Tokens are spelled
# as GPT-2 spells bytes (a printable character per byte: " " is "Ġ", "\n" is "Ċ").
#
# Our `bpe:N` chunks text with GPT-4's regex (utils.tokenizer.GPT4_SPLIT_PATTERN, tiktoken's cl100k_base
# pattern). llama.cpp's "llama-bpe" (Llama 3) chunks with the same regex: it writes the contractions as
# '[sS]... instead of (?i:...), [\r\n]+ where ours has [\r\n] after a greedy \s* (the same chunks: \s*
# gives back one newline either way), and no possessive quantifiers (none of ours ever backtracks into a
# match). Its "ignore_merges" takes a chunk that is a token whole, as tiktoken does before merging.
# One difference remains: (?i) also folds the long s "ſ" to "s": "'ſt" is two chunks for us, one there.

GPT2_PATTERNS = (  # GPT-2's regex, as tiktoken's gpt2/r50k_base/p50k_base write it (old and new tiktoken)
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters: printable Latin-1 bytes are themselves, others shift up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


BYTE_SPELLING = bytes_to_unicode()


def _spell(token: bytes) -> str:
    """Token bytes as llama.cpp's gpt2 vocabulary spells them: b" the" -> "Ġthe"."""
    return "".join(BYTE_SPELLING[b] for b in token)


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE of `token` using only merges ranked below max_rank: the two parts it is merged from."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pairs = [(ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= max_rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiktoken_merges(ranks: dict[bytes, int]) -> tuple[list[str], int]:
    """Ranks -> llama.cpp's merges ("Ġt he"), lowest rank first, as transformers' tiktoken converter derives them;
    and how many tokens have no such merge (reached only whole, which llama-bpe's ignore_merges does)."""
    merges, unreachable = [], 0
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) == 2:
            merges.append(f"{_spell(parts[0])} {_spell(parts[1])}")
        else:
            unreachable += 1
    return merges, unreachable


def _field(key: str, value):
    """(key, value, GGUF value type, element type) for GGUFWriter.add_key_value."""
    t = _gguf().GGUFValueType
    if isinstance(value, list):
        first = value[0] if value else ""
        sub = t.STRING if isinstance(first, str) else t.FLOAT32 if isinstance(first, float) else t.INT32
        return key, value, t.ARRAY, sub
    vtype = t.BOOL if isinstance(value, bool) else t.UINT32 if isinstance(value, int) else t.STRING
    return key, value, vtype, None


def _padded(tokens: list[str], types: list[int], vocab_size: int, what: str):
    """Tokens and types filled up to the model's rows with unused [PAD<i>] tokens, as llama.cpp's converter does."""
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer ({what}) has {len(tokens)} tokens but the model only {vocab_size} rows: "
                         "export the model with the tokenizer it was trained with")
    pads = range(len(tokens), vocab_size)
    return tokens + [f"[PAD{i}]" for i in pads], types + [UNUSED] * len(pads)


def byte_level_bpe_fields(tokens, types, merges, pre, vocab_size, eot_id, what) -> list[tuple]:
    """tokenizer.ggml.* for a "gpt2" tokenizer whose end-of-text token is both BOS and EOS (added by neither)."""
    tokens, types = _padded(tokens, types, vocab_size, what)
    f = [("model", "gpt2"), ("pre", pre), ("tokens", tokens), ("token_type", types), ("merges", merges),
         ("add_bos_token", False), ("add_eos_token", False)]
    if eot_id is not None:  # without ids llama.cpp's gpt2 defaults (11) would stop generation at a normal token
        f += [("bos_token_id", eot_id), ("eos_token_id", eot_id), ("padding_token_id", eot_id)]
    return [_field(f"tokenizer.ggml.{k}", v) for k, v in f]


def tiktoken_fields(tok, vocab_size: int) -> tuple[list[tuple], str]:
    """Our trained `bpe:N`, or one of OpenAI's encodings: ranks -> tokens and merges, the regex -> a llama.cpp pre."""
    from .tokenizer import GPT4_SPLIT_PATTERN

    enc = tok.encoding
    ranks = tok.ranks if tok.ranks is not None else enc._mergeable_ranks
    if enc._pat_str == GPT4_SPLIT_PATTERN:
        pre = "llama-bpe"
    elif enc._pat_str in GPT2_PATTERNS:
        pre = "gpt-2"
    else:
        raise ValueError(f"tokenizer {tok.name}: no pre-tokenizer of llama.cpp splits text as its regex does, so "
                         "it cannot be exported exactly: train with bpe:N (our BPE) or use gpt2 or cl100k_base")
    merges, unreachable = tiktoken_merges(ranks)
    if unreachable and pre == "gpt-2":  # llama.cpp's gpt-2 pre-tokenizer only merges: every token needs a merge
        raise ValueError(f"tokenizer {tok.name}: {unreachable} tokens have no merge that makes them, which llama.cpp's "
                         "gpt-2 pre-tokenizer needs: it cannot be exported exactly; train with bpe:N")
    tokens, types = tiktoken_vocabulary(enc, ranks)
    return byte_level_bpe_fields(tokens, types, merges, pre, vocab_size, tok.eot_id, tok.name), f"gpt2/{pre}"


def tiktoken_vocabulary(enc, ranks: dict[bytes, int]) -> tuple[list[str], list[int]]:
    """A tiktoken encoding's tokens as llama.cpp's gpt2 vocabulary spells them, and their types."""
    n = enc.n_vocab
    tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n  # the gaps between ids some encodings have
    for token, i in ranks.items():
        tokens[i], types[i] = _spell(token), NORMAL
    for token, i in enc._special_tokens.items():
        tokens[i], types[i] = token, CONTROL
    return tokens, types


def llama3_fields(tok, vocab_size: int) -> tuple[list[tuple], str]:
    """Meta's Llama 3 tokenizer.model (tiktoken ranks, Meta's regex, 256 special tokens) as llama.cpp's converter
    writes Llama 3: "gpt2" with the "llama-bpe" pre-tokenizer, <|begin_of_text|> added, and the chat format our
    `chat` uses for Meta's checkpoints, which ship no template (utils.chat.LLAMA3_CHAT_TEMPLATE; a finetune's
    run folder keeps it)."""
    from .chat import LLAMA3_CHAT_TEMPLATE

    ranks = tok.encoding._mergeable_ranks
    merges, _ = tiktoken_merges(ranks)
    tokens, types = _padded(*tiktoken_vocabulary(tok.encoding, ranks), vocab_size, tok.name)
    f = [("model", "gpt2"), ("pre", "llama-bpe"), ("tokens", tokens), ("token_type", types), ("merges", merges),
         ("add_bos_token", True), ("add_eos_token", False), ("bos_token_id", tok.bos_id),
         ("eos_token_id", tok.eot_id), ("eot_token_id", tok.special_tokens["<|eot_id|>"])]
    fields = [_field(f"tokenizer.ggml.{k}", v) for k, v in f]
    fields.append(_field("tokenizer.chat_template", getattr(tok, "chat_template", None) or LLAMA3_CHAT_TEMPLATE))
    return fields, "gpt2/llama-bpe (Llama 3's tokenizer.model)"


def char_fields(tok, vocab_size: int) -> tuple[list[tuple], str]:
    """The char tokenizer as a byte-level BPE: a character of one UTF-8 byte is that byte's token, one of two
    bytes a merge of its bytes; an unseen character falls back to its bytes, as ours does. A character of
    three or four bytes would need an intermediate token that ours does not have: refused."""
    long = [c for c in tok.chars if len(c.encode("utf-8")) > 2]
    if long:
        raise ValueError(f"the char tokenizer has characters of 3+ UTF-8 bytes ({''.join(long[:5])!r}...) that "
                         "llama.cpp cannot tokenize the way it does: train with --tokenizer bpe:N to export to GGUF")
    tokens = [_spell(c.encode("utf-8")) for c in tok.chars]
    seen = set(tokens)
    # A byte whose character is in the vocabulary is never emitted alone by ours: give it a name no text matches.
    tokens += [_spell(bytes([b])) if _spell(bytes([b])) not in seen else f"<unused_byte_0x{b:02X}>"
               for b in range(256)]
    types = [NORMAL] * len(tok.chars) + [NORMAL if not t.startswith("<unused") else UNUSED for t in tokens[-256:]]
    tokens, types = tokens + ["<|endoftext|>"], types + [CONTROL]
    merges = [" ".join(_spell(bytes([b])) for b in c.encode("utf-8")) for c in tok.chars if len(c.encode()) == 2]
    # GGUF arrays cannot be empty and llama.cpp needs the key: a merge of the special token, which text never forms
    merges = merges or ["<|endoftext|> <|endoftext|>"]
    return byte_level_bpe_fields(tokens, types, merges, "llama-bpe", vocab_size, tok.eot_id, "char"), "gpt2/char"


def gguf_source_fields(path: Path, vocab_size: int) -> tuple[list[tuple], str]:
    """A GGUF file's own tokenizer: every tokenizer.* key copied as it is (ids, merges, chat template...)."""
    reader = read_gguf(path)
    fields = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            fields.append((key, field.contents(), field.types[0], sub))
    n = len(metadata(reader, "tokenizer.ggml.tokens", []))
    if n > vocab_size:
        raise ValueError(f"{path}'s tokenizer has {n} tokens but the model only {vocab_size} rows")
    kind = f"{metadata(reader, 'tokenizer.ggml.model')}/{metadata(reader, 'tokenizer.ggml.pre', 'default')}"
    return fields, f"{kind} (from {path.name})"


# Hugging Face's byte-level pre-tokenizers (tokenizer.json's "pre_tokenizer") -> the llama.cpp pre that splits alike
HF_PRE = {"ByteLevel(regex)": "gpt-2", "Digits(individual)+ByteLevel(regex)": "smollm",
          "Split(llama3)+ByteLevel": "llama-bpe"}


def _hf_pre_name(pre: dict | None) -> str:
    """A tokenizer.json pre_tokenizer in words: "Digits(individual)+ByteLevel(regex)", "Split(llama3)+ByteLevel"."""
    from .gguf import LLAMA3_SPLIT

    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    words = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            words.append("ByteLevel(regex)" if step.get("use_regex", True) else "ByteLevel")
        elif kind == "Digits":
            words.append("Digits(individual)" if step.get("individual_digits") else "Digits")
        elif kind == "Split":
            llama3 = step.get("pattern", {}).get("Regex") == LLAMA3_SPLIT and step.get("behavior") == "Isolated"
            words.append("Split(llama3)" if llama3 else "Split")
        else:
            words.append(str(kind))
    return "+".join(words)


def _special_ids(directory: Path, vocab: dict[str, int], tok=None) -> dict[str, int]:
    """bos/eos/padding ids and the chat template from tokenizer_config.json (and chat_template.jinja), else from
    `tok` itself: a run folder has no tokenizer_config.json, and keeps a finetuned model's bos_token, eos_token
    and chat template in its course_tokenizer.json (utils.tokenizer.save_pretrained_tokenizer)."""
    import json

    f = directory / "tokenizer_config.json"
    config = json.loads(f.read_text()) if f.exists() else {}
    out = {}
    for key, name in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        token = config.get(key, getattr(tok, key, None))
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            out[name] = vocab[token]
    template = config.get("chat_template", getattr(tok, "chat_template", None))
    if (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text()
    if isinstance(template, str):
        out["chat_template"] = template
    return out


def hf_tokenizer_fields(path: Path, vocab_size: int, tok=None) -> tuple[list[tuple], str]:
    """A byte-level BPE tokenizer.json (SmolLM2, Llama 3) as "gpt2", with the pre its pre_tokenizer matches."""
    import json

    spec = json.loads(path.read_text(encoding="utf-8"))
    model, shape = spec["model"], _hf_pre_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or shape not in HF_PRE:
        sp = path.parent / "tokenizer.model"
        hint = f"; its {sp.name} is exported instead if you load that" if sp.exists() else ""
        raise ValueError(f"{path}: a {model.get('type')} tokenizer with pre-tokenizer {shape or 'none'} has no "
                         f"llama.cpp equivalent we can write exactly (supported: byte-level BPE with "
                         f"{', '.join(HF_PRE)}){hint}")
    vocab = dict(model["vocab"])
    types = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n = max(vocab.values()) + 1
    tokens, token_types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
    for token, i in vocab.items():
        tokens[i], token_types[i] = token, types.get(i, NORMAL)
    tokens, token_types = _padded(tokens, token_types, vocab_size, str(path))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = _special_ids(path.parent, vocab, tok)
    template = special.pop("chat_template", None)
    post = json.dumps(spec.get("post_processor") or {})
    add_bos = "bos_token_id" in special and json.dumps(tokens[special["bos_token_id"]]) in post
    f = [("model", "gpt2"), ("pre", HF_PRE[shape]), ("tokens", tokens), ("token_type", token_types),
         ("merges", merges), ("add_bos_token", add_bos), ("add_eos_token", False), *special.items()]
    fields = [_field(f"tokenizer.ggml.{k}", v) for k, v in f]
    if template:
        fields.append(_field("tokenizer.chat_template", template))
    return fields, f"gpt2/{HF_PRE[shape]} (from {path.name})"


def sentencepiece_fields(tok, vocab_size: int) -> tuple[list[tuple], str]:
    """A SentencePiece tokenizer.model (Llama 2) as "llama": pieces, scores and types, as llama.cpp's converter."""
    from .gguf import BYTE, UNKNOWN

    sp = tok.sp
    probe = "a  b\u2003ﬁ"  # two spaces, an em space, the "fi" ligature: kept by Llama 2's (identity) normalizer
    if sp.decode(sp.encode(probe)) != probe:
        raise ValueError(f"{tok.path} normalizes text (NFKC or collapsing spaces), which llama.cpp does not do: it "
                         "cannot be exported exactly; only identity normalization, as Llama 2's, is supported")
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [float(sp.get_score(i)) for i in range(n)]
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
             else BYTE if sp.is_byte(i) else NORMAL for i in range(n)]
    padded, types = _padded(tokens, types, vocab_size, str(tok.path))
    scores += [-1000.0] * (len(padded) - n)
    prefix = sp.encode("a", out_type=str)[:1] == ["▁a"] or sp.encode("a", out_type=str)[:1] == ["▁"]
    f = [("model", "llama"), ("pre", "default"), ("tokens", padded), ("scores", scores), ("token_type", types),
         ("add_bos_token", sp.bos_id() >= 0), ("add_eos_token", False), ("add_space_prefix", prefix)]
    f += [(k, i) for k, i in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()),
                              ("unknown_token_id", sp.unk_id()), ("padding_token_id", sp.pad_id())) if i >= 0]
    fields = [_field(f"tokenizer.ggml.{k}", v) for k, v in f]
    template = _special_ids(tok.path.parent, {}, tok).get("chat_template")
    if template:
        fields.append(_field("tokenizer.chat_template", template))
    return fields, f"llama/sentencepiece (from {tok.path.name})"


def tokenizer_fields(tok, vocab_size: int) -> tuple[list[tuple], str]:
    """(GGUFWriter fields for tokenizer.*, a short description); ValueError for a tokenizer it cannot write exactly.

    Ours: bpe:N -> "gpt2" + "llama-bpe" (the same regex); char -> "gpt2" with 2-byte merges, refused if it
    has characters of 3+ bytes. OpenAI's: cl100k_base -> "llama-bpe", gpt2/r50k/p50k -> "gpt-2", others refused.
    A pretrained model's: a GGUF file's keys copied; a byte-level tokenizer.json and a tokenizer.model (Llama 2's
    SentencePiece, Llama 3's tiktoken) converted.
    """
    from .gguf import GGUFTokenizer
    from .tokenizer import CharTokenizer, HFTokenizer, Llama3Tokenizer, SentencePieceTokenizer, TiktokenTokenizer

    if isinstance(tok, TiktokenTokenizer):
        return tiktoken_fields(tok, vocab_size)
    if isinstance(tok, Llama3Tokenizer):
        return llama3_fields(tok, vocab_size)
    if isinstance(tok, CharTokenizer):
        return char_fields(tok, vocab_size)
    if isinstance(tok, GGUFTokenizer):
        return gguf_source_fields(Path(tok.name.removeprefix("gguf:")), vocab_size)
    if isinstance(tok, HFTokenizer):
        return hf_tokenizer_fields(tok.path, vocab_size, tok)
    if isinstance(tok, SentencePieceTokenizer):
        return sentencepiece_fields(tok, vocab_size)
    raise ValueError(f"tokenizer {getattr(tok, 'name', type(tok).__name__)!r} cannot be written to GGUF: export a "
                     "model trained with bpe:N or char, or one loaded from GGUF, tokenizer.json or tokenizer.model")


def summary(info: dict, source: str) -> str:
    """One line on what export_gguf wrote."""
    types = ", ".join(f"{n} {t}" for t, n in sorted(info["tensor_types"].items(), key=lambda kv: -kv[1]))
    return (f"wrote {info['path']} from {source}: {info['parameters'] / 1e6:.1f}M parameters, tensors {types}, "
            f"tokenizer {info['tokenizer']}, {info['bytes'] / 1e6:.1f} MB")

