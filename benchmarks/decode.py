"""Batch-1 greedy decoding: ours (plain and compiled) against Hugging Face and against two limits.

- bare matvecs: the matrix-vector products of one decode step and nothing else, every weight read
  once through PyTorch's own F.linear, in the model's dtype. A decode step cannot do less work.
- memory limit: tokens/s if every step only streamed the weights at the bandwidth a large sum
  reaches on this machine.

Every path decodes the same prompt with the same weights; the paths take turns (A, B, C, ... repeated)
so load on a shared machine hits them alike, and the table gives the median of the rounds.

    python benchmarks/decode.py --shape 11M
    python benchmarks/decode.py --shape 135M --dtype bf16
    python benchmarks/decode.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --dtype bf16 --ppl
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed import bandwidth_gbs, time_alternating  # noqa: E402  (benchmarks/speed.py)

from utils.checkpoints import load_pretrained  # noqa: E402
from utils.generate import generate  # noqa: E402
from utils.hf import convert_meta_to_hf, hf_config_dict  # noqa: E402
from utils.model import Llama, LlamaConfig  # noqa: E402

SHAPES = {  # the 11M preset's shape, and SmolLM2-135M's (tied embeddings, GQA 9/3)
    "11M": LlamaConfig(vocab_size=2048, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=1024),
    "135M": LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                        tie_embeddings=True, max_seq_len=1024),
}


def matrices(model: Llama) -> list[torch.Tensor]:
    """Every weight matrix a decode step multiplies by (the embedding is a lookup, not a product)."""
    return [p for name, p in model.named_parameters() if p.dim() == 2 and name != "tok_embeddings.weight"] + (
        [model.output.weight] if model.config.tie_embeddings else [])


def bare_matvecs(model: Llama, n_tokens: int):
    ws = matrices(model)
    xs = {w.shape[1]: torch.randn(1, 1, w.shape[1], dtype=w.dtype, device=w.device) for w in ws}

    @torch.inference_mode()
    def run():
        for _ in range(n_tokens):
            for w in ws:
                F.linear(xs[w.shape[1]], w)
    return run


def hf_twin(model: Llama):
    import transformers

    cfg = transformers.LlamaConfig(**hf_config_dict(model.config, model.output.weight.dtype))
    cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(cfg).to(model.output.weight.device, model.output.weight.dtype).eval()
    missing, _ = hf.load_state_dict(convert_meta_to_hf(model), strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing
    return hf


def hf_decode(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding the way transformers' generate does it, minus its bookkeeping: a DynamicCache."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        out = hf(input_ids=prompt, past_key_values=cache, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(n - 1):
            out = hf(input_ids=tokens[-1][:, None], past_key_values=cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


def perplexity(model: Llama, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token loss) over non-overlapping windows of held-out text."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, ids.numel() - window - 1, window):
            x, y = ids[i:i + window][None], ids[i + 1:i + window + 1][None]
            total += F.cross_entropy(model(x)[0], y[0], reduction="sum").item()
            count += window
    return math.exp(total / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="11M", help="random weights of this shape")
    p.add_argument("--gguf", default=None, help="a real model instead (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=None, help="tokens per round (default 128 for 11M, 32 otherwise)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled path")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers")
    p.add_argument("--ppl", action="store_true", help="perplexity on Tiny Shakespeare too, vs fp32 (--gguf)")
    args = p.parse_args()
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    gbs = bandwidth_gbs(device)  # first, before the models fill the memory
    if args.gguf:
        model = load_pretrained(args.gguf, dtype=dtype, max_seq_len=1024, device=device)
    else:
        model = Llama(SHAPES[args.shape]).to(device, dtype).eval()
    n = args.tokens or (128 if model.config.n_layers <= 8 else 32)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    weight_bytes = sum(w.nbytes for w in matrices(model))
    print(f"{args.gguf or args.shape}, {args.dtype}, {torch.get_num_threads()} threads, {n} tokens x "
          f"{args.rounds} rounds; weights read per token {weight_bytes / 2**20:.0f} MiB")

    runs = {"bare matvecs": bare_matvecs(model, n),
            "ours": lambda: generate(model, prompt, n, temperature=0)}
    if args.compile:
        t = time.perf_counter()
        generate(model, prompt, 3, temperature=0, compile=True)
        print(f"compiling the decode step took {time.perf_counter() - t:.1f} s")
        runs["ours, compile=True"] = lambda: generate(model, prompt, n, temperature=0, compile=True)
    if args.hf:
        hf = hf_twin(model)
        runs["Hugging Face"] = lambda: hf_decode(hf, prompt, n)
    outputs = {k: fn() for k, fn in runs.items()}  # warm-up, and the tokens to compare
    speed = {k: n / v for k, v in time_alternating(runs, args.rounds, device, warmup=False).items()}
    limit = gbs * 1e9 / weight_bytes
    print(f"\nmemory limit: {gbs:.0f} GB/s (a 1 GiB sum) / {weight_bytes / 2**20:.0f} MiB = {limit:.0f} tokens/s")
    print(f"\n| path | tokens/s | of bare matvecs | of memory limit ({limit:.0f} tok/s) | vs HF |")
    print("|---|---|---|---|---|")
    for k, v in speed.items():
        vs_hf = f"{v / speed['Hugging Face']:.2f}x" if "Hugging Face" in speed else "-"
        print(f"| {k} | {v:.1f} | {v / speed['bare matvecs']:.0%} | {v / limit:.0%} | {vs_hf} |")
    ours = outputs["ours"][:, prompt.shape[1]:]
    for k in runs:
        if k not in ("bare matvecs", "ours"):
            same = torch.equal(outputs[k][:, -n:], ours)
            print(f"\n{k}: {'the same' if same else 'DIFFERENT'} {n} greedy tokens as ours")
    if args.ppl and args.gguf:
        from utils.checkpoints import load_pretrained_tokenizer
        text = (Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt").read_text()[-20000:]
        ids = torch.tensor(load_pretrained_tokenizer(args.gguf).encode(text), device=device)
        ref = load_pretrained(args.gguf, dtype=torch.float32, max_seq_len=1024, device=device)
        ppl, ppl32 = perplexity(model, ids, 512), perplexity(ref, ids, 512)
        print(f"\nperplexity on the last 20,000 characters of Tiny Shakespeare ({ids.numel()} tokens, windows of 512): "
              f"{args.dtype} {ppl:.3f}, fp32 {ppl32:.3f} ({ppl / ppl32 - 1:+.2%})")


if __name__ == "__main__":
    main()
