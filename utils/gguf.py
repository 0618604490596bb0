"""GGUF, llama.cpp's one-file format: a `Llama` and its tokenizer from a .gguf file.

    model = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")   # checkpoints.py calls load_gguf
    tok = load_pretrained_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")

A GGUF file is typed key/value metadata (`llama.block_count`, `tokenizer.ggml.tokens`, ...) followed
by tensors stored in blocks: Q4_0 keeps 32 weights as 4-bit integers and one fp16 scale, the K-quants
nest blocks of 32 in super-blocks of 256. The `gguf` package (ggml's own reader) reads the file and
`gguf.quants.dequantize` turns every tensor back into floats; nothing here parses bytes by hand.

Three facts make the weights fit our `Llama`:
- Names: llama.cpp's `blk.N.attn_q.weight` is Meta's `layers.N.attention.wq.weight` (GGUF_LAYER_NAMES).
- Shapes: GGUF lists a tensor's dimensions fastest-varying first (ggml's ne[0] is the row length), the
  reverse of PyTorch's (rows, cols): `token_embd.weight` is listed as [dim, vocab_size].
- RoPE layout: llama.cpp's Llama RoPE rotates adjacent pairs (2i, 2i+1), as Meta's does, so its
  convert_hf_to_gguf.py permutes the q/k rows of an HF checkpoint back from rotate-half: GGUF q/k are
  in our (Meta) layout already and load unpermuted. transformers' GGUF loader permutes them back to
  HF's layout; tests/test_gguf.py checks the real SmolLM2 file gives transformers' logits this way.

Llama 3.1's RoPE scaling has no metadata key: convert_hf_to_gguf.py stores it as a tensor, rope_freqs.weight,
the number each pair's frequency is divided by (`rope_freqs`); `rope_scaling_from_freqs` reads it back.
"""

import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .model import LlamaConfig, count_params
from .rope import RopeScaling, rope_frequencies, scale_frequencies
from .tokenizer import LLAMA3_SPLIT_PATTERN

# llama.cpp's tensor names -> Meta's (ours): blk.N.attn_q.weight is layers.N.attention.wq.weight.
GGUF_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
GGUF_LAYER_NAMES = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
                    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
                    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}
PROGRESS_BAR_BYTES = 200 * 2**20  # files larger than this show a progress bar while they load


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading .gguf files needs the `gguf` package (ggml's reader): pip install gguf") from e
    return gguf


def read_gguf(path: str | Path):
    """A `gguf.GGUFReader` over the file (memory-mapped: tensors are read when dequantized)."""
    try:
        return _gguf().GGUFReader(path)
    except (ValueError, KeyError, IndexError) as e:  # bad magic, unknown version, a type id it does not know
        raise ValueError(f"could not read {path} as a GGUF file ({type(e).__name__}: {e}): is it a complete "
                         "llama.cpp .gguf file? A ggml type the gguf package does not know needs a newer "
                         "gguf (pip install -U gguf)") from e


def metadata(reader, key: str, default=None):
    """The value stored under `key` (a number, string or list), or `default` if the file has none."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# ---- the model ------------------------------------------------------------------------------------------

def _check_supported(reader, path) -> None:
    """Refuse, in one line each, what our Llama cannot run: other architectures, scaled RoPE, experts."""
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported: only 'llama' (Llama 1/2/3, "
                         "TinyLlama, SmolLM, Mistral 7B) loads into this model")
    scaling = metadata(reader, "llama.rope.scaling.type", "none")
    if scaling != "none" or metadata(reader, "llama.rope.scale_linear", 1.0) != 1.0:
        raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported: only plain RoPE "
                         "(llama.rope.scaling.type none or absent) and Llama 3.1's (rope_freqs.weight) are")
    if metadata(reader, "llama.expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts models (llama.expert_count > 0) are not supported")


def _decimal(x: float) -> float:
    """GGUF stores float32, so 1e-5 reads back as 9.99999975e-06: the shortest decimal with that float32 is 1e-5."""
    return float(str(np.float32(x)))


def config_from_gguf(reader, path="model.gguf", max_seq_len: int | None = None) -> LlamaConfig:
    """LlamaConfig from the `llama.*` metadata; vocab_size is the embedding's row count, tied if no output.weight."""
    _check_supported(reader, path)
    get = lambda key, default=None: metadata(reader, f"llama.{key}", default)
    required = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")
    missing = [f"llama.{k}" for k in required if get(k) is None]
    if missing:
        raise ValueError(f"{path} lacks metadata {missing}: a Llama GGUF needs llama.{', llama.'.join(required)}")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # torch order
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{path} has no token_embd.weight tensor: is this a model file?")
    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    for key in ("rope.dimension_count", "attention.key_length"):
        if get(key) is not None and int(get(key)) != dim // n_heads:
            raise ValueError(f"{path}: llama.{key} = {get(key)} differs from embedding_length / head_count = "
                             f"{dim // n_heads}: models with a decoupled head_dim are not supported")
    theta = _decimal(get("rope.freq_base", 10000.0))
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    scaling = None if freqs is None else rope_scaling_from_freqs(dequantize(freqs), dim // n_heads, theta, path)
    return LlamaConfig(
        vocab_size=shapes["token_embd.weight"][0],  # padded vocabularies: the rows are the truth
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=_decimal(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=max_seq_len or int(get("context_length", 2048)),
        tie_embeddings="output.weight" not in shapes,
    )


def rope_freqs(config: LlamaConfig) -> torch.Tensor | None:
    """What llama.cpp stores as rope_freqs.weight (float32, (head_dim / 2,)): plain / scaled frequency per pair,
    1 for the fast pairs, the factor for the slow ones; None for plain RoPE, which stores no such tensor."""
    if config.rope_scaling is None:
        return None
    freqs = rope_frequencies(config.head_dim, config.rope_theta)
    return (freqs / scale_frequencies(freqs, config.rope_scaling)).float()


def rope_scaling_from_freqs(divisors: torch.Tensor, head_dim: int, theta: float, path="model.gguf") -> RopeScaling:
    """The RopeScaling whose frequencies are the plain ones / `divisors` (rope_freqs.weight), checked pair by pair.

    factor is the largest divisor. Every Llama 3.x uses Meta's low_freq_factor 1, high_freq_factor 4 and
    original context 8192; other values are solved from the blended pairs, whose 1 / divisor
    = (1 - γ) / factor + γ with γ = (L / λ - 1) / (β - 1), a straight line in 1 / λ.
    """
    freqs, divisors = rope_frequencies(head_dim, theta), divisors.double().flatten()
    factor = round(float(divisors.max()), 4)
    candidates = [RopeScaling(factor=max(factor, 1.0))]
    blended = (divisors > 1 + 1e-6) & (divisors < factor - 1e-4)
    if blended.sum() >= 2 and factor > 1:
        gamma = (1 / divisors[blended] - 1 / factor) / (1 - 1 / factor)
        x = freqs[blended] / (2 * math.pi)  # 1 / wavelength
        slope, intercept = np.polyfit(x.numpy(), gamma.numpy(), 1)  # gamma = slope * x + intercept
        if intercept < 0:
            beta = 1 - 1 / intercept
            candidates.append(RopeScaling(factor=factor, high_freq_factor=round(beta, 4),
                                          original_max_seq_len=round(slope * (beta - 1))))
    for scaling in candidates:
        if torch.allclose(freqs / scale_frequencies(freqs, scaling), divisors, rtol=1e-5, atol=0):
            return scaling
    raise ValueError(f"{path}: rope_freqs.weight {divisors.tolist()[:4]}... does not follow Llama 3.1's RoPE "
                     "scaling rule: only that per-frequency scaling is supported")


def meta_name(gguf_name: str) -> str:
    """llama.cpp's tensor name -> ours; a name we do not know is kept, so check_state_dict can name it."""
    name, _, suffix = gguf_name.rpartition(".")  # "blk.3.attn_q", "weight"
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES:
        return f"layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.{suffix}"
    return f"{GGUF_TOP_NAMES[name]}.{suffix}" if name in GGUF_TOP_NAMES else gguf_name


def dequantizable_types() -> list[str]:
    """Names of the ggml tensor types `gguf.quants.dequantize` handles (F32, F16, BF16, Q4_0, ..., Q6_K, IQ*)."""
    gguf = _gguf()
    names = []
    for qtype in gguf.GGMLQuantizationType:
        try:  # one all-zero block of the type
            gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
            names.append(qtype.name)
        except (NotImplementedError, KeyError, ValueError):
            pass
    return names


def _check_tensor_types(reader, path) -> None:
    supported = dequantizable_types()
    bad = {t.name: t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in supported}
    if bad:
        name, kind = next(iter(bad.items()))
        raise ValueError(f"{path}: tensor {name} is {kind}, which cannot be dequantized ({len(bad)} such tensors): "
                         f"supported types are {', '.join(supported)}")


def dequantize(tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of its PyTorch shape (the reverse of the ne order GGUF lists)."""
    w = _gguf().quants.dequantize(tensor.data, tensor.tensor_type)  # float32, rows of the fastest dimension
    w = w.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    if not w.flags.writeable:  # F32 comes back as a view of the read-only memory map
        w = w.copy()
    return torch.from_numpy(w).to(dtype)


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (Linux MemAvailable), or None where we cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None  # e.g. macOS and Windows: no check


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def check_memory(reader, config: LlamaConfig, dtype: torch.dtype, path) -> tuple[int, int | None]:
    """(bytes the dequantized model needs, bytes available); ValueError, before any work, if it does not fit."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    largest = max(t.n_elements for t in reader.tensors)
    needed = count_params(config) * itemsize + largest * (4 + itemsize)  # + one tensor in flight (fp32 + cast)
    available = available_memory()
    if available is not None and needed > available:
        smaller = " or load it with dtype=torch.bfloat16 (half of float32)" if itemsize == 4 else ""
        raise ValueError(f"{path} needs {_size(needed)} of memory as {str(dtype).removeprefix('torch.')} but only "
                         f"{_size(available)} is available: close other programs, pick a smaller model{smaller}")
    return needed, available


def load_gguf(path: Path, max_seq_len: int | None = None, *, dtype=None,
              verbose: bool = True) -> tuple[LlamaConfig, dict]:
    """(config, Meta-named state dict) from a .gguf file, every tensor dequantized to `dtype` (None: float32).

    Refuses a model that does not fit in memory before dequantizing anything; with verbose, says on
    stderr what it loads and shows a progress bar for files over 200 MB.
    """
    reader = read_gguf(path)
    config = config_from_gguf(reader, path, max_seq_len)
    _check_tensor_types(reader, path)
    dtype = dtype or torch.float32
    needed, available = check_memory(reader, config, dtype, path)
    if verbose:
        types = Counter(t.tensor_type.name for t in reader.tensors)
        print(f"loading {metadata(reader, 'general.name', Path(path).name)!r} from {path}: "
              f"{count_params(config) / 1e6:.1f}M parameters stored as "
              f"{', '.join(f'{n} {kind}' for kind, n in types.most_common())} tensors -> "
              f"{str(dtype).removeprefix('torch.')}, {_size(needed)} of memory"
              + (f" ({_size(available)} available)" if available is not None else ""), file=sys.stderr)
    from tqdm.auto import tqdm

    show = verbose and Path(path).stat().st_size > PROGRESS_BAR_BYTES
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]  # in config.rope_scaling already
    sd = {meta_name(t.name): dequantize(t, dtype)
          for t in tqdm(tensors, desc="dequantizing", unit="tensor", disable=not show, file=sys.stderr)}
    return config, sd


# ---- the tokenizer --------------------------------------------------------------------------------------
#
# The file stores the vocabulary (tokenizer.ggml.tokens), a type per token, the merges of a byte-level
# BPE or the scores of a SentencePiece model, and the special ids. We rebuild the tokenizer with the
# `tokenizers` library, as transformers' GGUF loader does, and as llama.cpp tokenizes.

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type values

# Byte-level BPE cuts text into chunks (words, numbers, punctuation) before merging; tokenizer.ggml.pre names
# the rule the vocabulary was trained with. llama.cpp's llama-vocab.cpp lists the same ones.
LLAMA3_SPLIT = LLAMA3_SPLIT_PATTERN  # Meta's, as its tiktoken tokenizer splits (utils/tokenizer.py)
GPT2_PRE = ("default", "gpt2")  # GPT-2's regex, which tokenizers' ByteLevel pre-tokenizer applies
DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "codeshell")  # every digit alone, then GPT-2's
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")

# Tokens that end a turn, besides tokenizer.ggml.eos_token_id, when the vocabulary has them.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "</s>", "<EOT>")


class GGUFTokenizer:
    """A GGUF file's tokenizer, as a `tokenizers.Tokenizer`. encode adds BOS where the file asks for it.

    eos_ids holds every id that ends a reply (eos, <|im_end|>, <|eot_id|>, ...); chat_template is the
    file's Jinja chat template (tokenizer.chat_template) or None.
    """

    def __init__(self, tokenizer, name: str, bos_id: int | None, eos_id: int | None, eos_ids: set[int],
                 chat_template: str | None):
        self.tokenizer, self.name, self.vocab_size = tokenizer, name, tokenizer.get_vocab_size()
        self.bos_id, self.eot_id, self.eos_ids, self.chat_template = bos_id, eos_id, eos_ids, chat_template
        self.bos_token = tokenizer.id_to_token(bos_id) if bos_id is not None else None
        self.eos_token = tokenizer.id_to_token(eos_id) if eos_id is not None else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory) -> None:
        """Into a run folder (finetuning): `utils.tokenizer.load_tokenizer(directory)` gives it back."""
        from .tokenizer import save_pretrained_tokenizer
        save_pretrained_tokenizer(self, directory)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str):
    """GPT-2-style BPE (SmolLM2, Llama 3): bytes spelled as printable characters, merges learned on chunks."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # llama.cpp accepts a merge whose result is no token (it never fires: utils.gguf_export writes one where a
    # vocabulary has no merges, as GGUF arrays cannot be empty); the tokenizers library refuses it: skip those
    pairs = [(a, b) for a, b in pairs if a + b in vocab and a in vocab and b in vocab]
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGITS_THEN_GPT2_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in GPT2_PRE:
            print(f"warning: tokenizer.ggml.pre {pre!r} is not one we know: text is cut into chunks as GPT-2 does, "
                  "which may tokenize some text differently from llama.cpp", file=sys.stderr)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece's BPE merges the adjacent pair whose union scores best. As ranked merges: every way to
    split a piece into two pieces of the vocabulary, best-scoring piece first (as transformers' generate_merges).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(left, right, score) for left, right in sorted(splits, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: ties keep vocabulary order
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_bpe(tokens: list[str], scores: list[float], merges: list[str] | None, unk: str | None,
                       add_space_prefix: bool):
    """Llama 2's SentencePiece: spaces as "▁", unknown characters as <0xNN> byte tokens (byte fallback).

    Like Llama 2's own tokenizer.json, a normalizer writes the "▁" prefix before every stretch of text:
    " hi" -> "▁▁hi", as sentencepiece and llama.cpp (which also adds it after a special token) do.
    transformers' GGUF loader uses Metaspace("first") instead, which gives "▁hi" there.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else merges_from_scores(tokens, scores)
    tok = Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def _add_special_tokens(tok, tokens: list[str], types: list[int], ids: dict[str, int | None]) -> None:
    """Control tokens and the bos/eos/unk/pad ids become special: matched whole in the text, as llama.cpp
    does ("<|im_start|>" is one id, never "<", "|", "im", ...), and skipped by decode. User-defined tokens
    are matched whole too, but decoded."""
    from tokenizers import AddedToken

    special = {i for i, t in enumerate(types) if t == CONTROL} | {i for i in ids.values() if i is not None}
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
    tok.add_tokens([AddedToken(t, normalized=False) for t, t_type in zip(tokens, types) if t_type == USER_DEFINED])


def _add_bos_eos(tok, tokens: list[str], bos: int | None, eos: int | None) -> None:
    """encode adds BOS before (EOS after) the text, as tokenizer.ggml.add_bos_token (add_eos_token) says."""
    from tokenizers import processors

    pairs = [(tokens[i], i) for i in (bos, eos) if i is not None]
    single = ([tokens[bos]] if bos is not None else []) + ["$A"] + ([tokens[eos]] if eos is not None else [])
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=pairs)


def load_gguf_tokenizer(path: str | Path) -> GGUFTokenizer | None:
    """The tokenizer in a GGUF file's metadata (tokenizer.ggml.model "gpt2" or "llama"), or None if it has none."""
    reader = read_gguf(path)
    get = lambda key, default=None: metadata(reader, f"tokenizer.ggml.{key}", default)
    kind, tokens = get("model"), get("tokens")
    if kind is None or tokens is None:
        return None
    try:
        import tokenizers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the tokenizer of {path} needs the `tokenizers` library: pip install tokenizers") from e
    ids = {key: get(f"{key}_token_id") for key in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    if kind == "gpt2":
        tok = _byte_level_bpe(tokens, get("merges", []), get("pre", "default"))
    elif kind == "llama":
        unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
        tok = _sentencepiece_bpe(tokens, get("scores"), get("merges"), unk, get("add_space_prefix", True))
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported: only 'gpt2' (byte-level BPE, "
                         "as SmolLM2 and Llama 3) and 'llama' (SentencePiece, as Llama 2)")
    _add_special_tokens(tok, tokens, get("token_type") or [NORMAL] * len(tokens), ids)
    add_bos = get("add_bos_token", kind == "llama") and ids["bos"] is not None  # llama.cpp: SentencePiece adds BOS
    add_eos = get("add_eos_token", False) and ids["eos"] is not None
    if add_bos or add_eos:
        _add_bos_eos(tok, tokens, ids["bos"] if add_bos else None, ids["eos"] if add_eos else None)
    eos_ids = {i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None}
    eos_ids |= {i for i in map(tok.token_to_id, END_TOKENS) if i is not None}
    return GGUFTokenizer(tok, f"gguf:{path}", ids["bos"], ids["eos"], eos_ids,
                         metadata(reader, "tokenizer.chat_template"))
