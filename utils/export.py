"""`python -m utils export`: a checkpoint, with its tokenizer, as a GGUF file or a Hugging Face folder.

    python -m utils export --checkpoint out --format gguf --out model.gguf --dtype q8_0   # llama.cpp, Ollama
    python -m utils export --checkpoint out --format hf --out out/hf                     # transformers

--checkpoint is anything `load_pretrained` reads (our run folder, an HF or Meta folder, llama2.c, a
.gguf file), so a downloaded model can be re-exported too. One module per format: utils/gguf_export.py
writes GGUF, utils/hf.py's `save_hf` writes the Hugging Face folder.
"""

import json
import shutil
from pathlib import Path

FORMATS = ("gguf", "hf")
HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# the tokenizer files a Hugging Face folder ships beside its weights; copied as they are
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                      "chat_template.jinja", "generation_config.json")


def add_export_parser(sub) -> None:
    """The `export` command's flags (called by utils/__main__.py's build_parser)."""
    from .gguf_export import GGUF_DTYPES

    x = sub.add_parser("export", help="write a checkpoint as a GGUF file (llama.cpp, Ollama) or a Hugging Face folder")
    x.add_argument("--debug", action="store_true", help="print the full traceback of an unexpected error")
    x.add_argument("--checkpoint", required=True,
                   help="a run folder written by `train`, an HF/Meta/llama2.c checkpoint, a .gguf file or a hub id")
    x.add_argument("--format", required=True, choices=FORMATS, help="gguf: one file for llama.cpp; hf: a folder")
    x.add_argument("--out", required=True, help="the .gguf file to write (gguf) or the folder (hf)")
    x.add_argument("--dtype", default=None, choices=GGUF_DTYPES,
                   help="storage of the weights: gguf default f32 (exact), q8_0 is 8-bit; hf default: the checkpoint's")


def load_with_tokenizer(path: str):
    """(model, tokenizer, format) from our run folder or any format `load_pretrained` reads; float weights as stored."""
    from .checkpoints import detect_format, load_pretrained, load_pretrained_tokenizer
    from .tokenizer import load_tokenizer

    fmt = detect_format(path)
    model = load_pretrained(path)
    tok = load_tokenizer(path) if fmt == "ours" else load_pretrained_tokenizer(path)
    if tok is None:
        raise FileNotFoundError(f"{path} ships no tokenizer (tokenizer.json or tokenizer.model): copy the model's "
                                "tokenizer file next to its weights, so the exported model can read text")
    return model, tok, fmt


def run_export(args) -> int:
    from .model import count_params

    if args.format == "hf" and args.dtype == "q8_0":
        raise ValueError("--dtype q8_0 is for --format gguf: a Hugging Face folder holds f32, f16 or bf16")
    out = Path(args.out)
    if args.format == "gguf" and out.suffix != ".gguf":
        raise ValueError(f"--out {out} should be a file name ending in .gguf (e.g. --out model.gguf)")
    if args.format == "hf" and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, and --format hf writes a folder: name a folder "
                         f"(e.g. --out {out.stem}-hf)")
    model, tok, fmt = load_with_tokenizer(args.checkpoint)
    source = f"{args.checkpoint} ({fmt})"
    if args.format == "gguf":
        from .gguf_export import export_gguf, summary
        info = export_gguf(model, tok, out, args.dtype or "f32", name=Path(args.checkpoint).stem or "llama")
        print(summary(info, source))
        print(f"run it: llama-cli -m {out} -p \"Hello\" -n 64   (README: Run it in llama.cpp / Ollama)")
        return 0
    if args.dtype:
        model = model.to(getattr(__import__("torch"), HF_DTYPES[args.dtype]))
    save_hf_with_tokenizer(model, tok, out)
    print(f"wrote {out}/ from {source}: {count_params(model.config) / 1e6:.1f}M parameters, "
          f"{str(model.tok_embeddings.weight.dtype).removeprefix('torch.')}, config.json + model.safetensors + "
          f"tokenizer; load it with load_pretrained({str(out)!r})")
    return 0


def tokenizer_json(tok):
    """A tokenizer of ours or Meta's Llama 3 as a `tokenizers.Tokenizer`, for a Hugging Face folder's tokenizer.json.

    tiktoken's (our bpe:N, OpenAI's, Meta's Llama 3): byte-level BPE with merges derived from the ranks, the split
    regex, the special tokens at their ids, and Llama 3's <|begin_of_text|> added in front, as Hugging Face ships
    Llama 3. char: one token per character, unseen characters as their UTF-8 bytes (<0xNN>), as ours does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from .gguf_export import _spell, tiktoken_merges
    from .tokenizer import EOT, CharTokenizer, Llama3Tokenizer

    if isinstance(tok, CharTokenizer):
        vocab = tok.char_to_id | {f"<0x{b:02X}>": tok.byte_offset + b for b in range(256)} | {EOT: tok.eot_id}
        t = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        t.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        t.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        return t
    enc = tok.encoding
    ranks = getattr(tok, "ranks", None) or enc._mergeable_ranks
    special = enc._special_tokens  # {"<|endoftext|>": id, ...}; Llama 3's 256
    vocab = {_spell(b): i for b, i in ranks.items()} | special
    merges = [tuple(m.split(" ")) for m in tiktoken_merges(ranks)[0]]
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])  # at their vocab ids
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    if isinstance(tok, Llama3Tokenizer):
        t.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A",
                                                         special_tokens=[(tok.bos_token, tok.bos_id)])
    return t


def save_hf_with_tokenizer(model, tok, directory: Path) -> None:
    """save_hf, then the tokenizer beside it: a pretrained one's files copied, ours saved as load_tokenizer reads it."""
    from .gguf import GGUFTokenizer
    from .hf import save_hf
    from .tokenizer import EOT, HFTokenizer, Llama3Tokenizer, SentencePieceTokenizer

    bos = getattr(tok, "bos_id", None)
    save_hf(model, directory, bos_token_id=bos if bos is not None and bos >= 0 else None, eos_token_id=tok.eot_id)
    if isinstance(tok, Llama3Tokenizer):  # Meta's: as Hugging Face ships Llama 3, with the chat format `chat` uses
        from .chat import LLAMA3_CHAT_TEMPLATE

        tokenizer_json(tok).save(str(directory / "tokenizer.json"))
        config = {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                  "chat_template": getattr(tok, "chat_template", None) or LLAMA3_CHAT_TEMPLATE}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return
    if not isinstance(tok, (HFTokenizer, SentencePieceTokenizer, GGUFTokenizer)):  # ours: for transformers, and
        tok.save(directory)  # course_tokenizer.json (+ ranks), which utils.tokenizer.load_tokenizer reads exactly
        tokenizer_json(tok).save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT}, indent=2) + "\n")
        return
    copied = set()
    if not isinstance(tok, GGUFTokenizer) and tok.path.parent.resolve() != directory.resolve():
        copied = {name for name in HF_TOKENIZER_FILES if (tok.path.parent / name).exists()}
        for name in copied:
            shutil.copyfile(tok.path.parent / name, directory / name)
    # A GGUF's tokenizer, or a pretrained one kept in a run folder (pretrained_tokenizer.json and
    # course_tokenizer.json, no tokenizer_config.json): the `tokenizers.Tokenizer` and its special tokens
    if not isinstance(tok, SentencePieceTokenizer) and "tokenizer.json" not in copied:
        tok.tokenizer.save(str(directory / "tokenizer.json"))
    if "tokenizer_config.json" not in copied:
        config = {k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "chat_template")}
        if isinstance(tok, SentencePieceTokenizer):  # its special pieces, where the run folder named none
            for key, i in (("bos_token", tok.sp.bos_id()), ("eos_token", tok.sp.eos_id())):
                config[key] = config[key] or (tok.sp.id_to_piece(i) if i >= 0 else None)
        config = {k: v for k, v in config.items() if v is not None}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

