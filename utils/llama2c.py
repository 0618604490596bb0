"""karpathy/llama2.c checkpoints: the training `.pt` and the `.bin` exports (versions 0, 1, 2).

The `.bin` files are flat float32 arrays behind a header (version 2: int8 with one float32 scale per
group, dequantised here). Their q/k rows are in Meta's adjacent-pair RoPE layout, as ours are.
"""

import struct
from pathlib import Path

import numpy as np
import torch

from .model import LlamaConfig
from .weights import strip_prefix, torch_load


def load_llama2c_pt(path: Path, max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
    """(config, state dict) from llama2c's training checkpoint {"model", "model_args", ...}."""
    ckpt = torch_load(path)
    args, sd = ckpt["model_args"], strip_prefix(ckpt["model"])
    emb, out = sd.get("tok_embeddings.weight"), sd.get("output.weight")
    tied = out is None or emb is None or out.data_ptr() == emb.data_ptr() or torch.equal(out, emb)
    config = LlamaConfig(
        vocab_size=args["vocab_size"], dim=args["dim"], n_layers=args["n_layers"], n_heads=args["n_heads"],
        n_kv_heads=args.get("n_kv_heads"), hidden_dim=args.get("hidden_dim"),
        multiple_of=args.get("multiple_of", 256), norm_eps=args.get("norm_eps", 1e-5),
        max_seq_len=max_seq_len or args.get("max_seq_len", 256), tie_embeddings=tied,
    )
    return config, sd


LLAMA2C_MAGIC = 0x616B3432  # "ak42"


def _read_llama2c_header(f) -> tuple[int, tuple, bool, int]:
    """(version, (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len), shared, group_size)."""
    (magic,) = struct.unpack("<I", f.read(4))
    if magic != LLAMA2C_MAGIC:  # version 0: no magic, 7 int32, vocab_size < 0 when the classifier is not shared
        f.seek(0)
        p = struct.unpack("<7i", f.read(28))
        return 0, (*p[:5], abs(p[5]), p[6]), p[5] > 0, 0
    (version,) = struct.unpack("<i", f.read(4))
    if version not in (1, 2):
        raise ValueError(f"llama2c .bin version {version} is not supported: only versions 0, 1 and 2 are")
    p = struct.unpack("<7i", f.read(28))
    (shared,) = struct.unpack("<B", f.read(1))
    group_size = struct.unpack("<i", f.read(4))[0] if version == 2 else 0
    return version, p, bool(shared), group_size


class _Reader:
    """Consecutive arrays of one flat buffer: take(n_layers, rows, cols) -> tensor."""

    def __init__(self, data: np.ndarray, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, *shape: int) -> torch.Tensor:
        n = int(np.prod(shape))
        if self.pos + n > self.data.size:
            raise ValueError(f"{self.path} is truncated: needs more than the {self.data.size} values it holds "
                             "for the shapes its header declares")
        out = torch.from_numpy(self.data[self.pos:self.pos + n].reshape(shape))
        self.pos += n
        return out


def _llama2c_sd(layers: dict, top: dict, n_layers: int) -> dict:
    """Meta-named state dict from {name: (n_layers, ...) stacked weights} and the top-level weights."""
    sd = dict(top)
    for name, w in layers.items():
        prefix = "" if name.endswith("_norm") else "attention." if name in ("wq", "wk", "wv", "wo") else "feed_forward."
        for i in range(n_layers):
            sd[f"layers.{i}.{prefix}{name}.weight"] = w[i]
    return sd


def _read_v0(r: _Reader, p: tuple, shared: bool) -> dict:
    dim, hidden, L, n_heads, n_kv, vocab, seq = p
    kv_dim, hd = n_kv * (dim // n_heads), dim // n_heads
    top = {"tok_embeddings.weight": r.take(vocab, dim)}
    shapes = {"attention_norm": (dim,), "wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim),
              "wo": (dim, dim), "ffn_norm": (dim,), "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim)}
    layers = {name: r.take(L, *shape) for name, shape in shapes.items()}
    top["norm.weight"] = r.take(dim)
    r.take(2, seq, hd // 2)  # freqs_cos, freqs_sin: we recompute them
    if not shared:
        top["output.weight"] = r.take(vocab, dim)
    return _llama2c_sd(layers, top, L)


def _read_v1(r: _Reader, p: tuple, shared: bool, take_matrix) -> dict:
    dim, hidden, L, n_heads, n_kv, vocab, seq = p
    kv_dim = n_kv * (dim // n_heads)
    layers = {"attention_norm": r.take(L, dim), "ffn_norm": r.take(L, dim)}
    top = {"norm.weight": r.take(dim), "tok_embeddings.weight": take_matrix(vocab, dim)}
    shapes = {"wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim),
              "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim)}
    for name, shape in shapes.items():
        layers[name] = torch.stack([take_matrix(*shape) for _ in range(L)])
    if not shared:
        top["output.weight"] = take_matrix(vocab, dim)
    return _llama2c_sd(layers, top, L)


def _int8_reader(data: bytes, offset: int, group_size: int, path: Path):
    """take(rows, cols): int8 values then one fp32 scale per group of group_size, dequantised to fp32."""
    pos = [offset]

    def take(*shape: int) -> torch.Tensor:
        n = int(np.prod(shape))
        if pos[0] + n + 4 * (n // group_size) > len(data):
            raise ValueError(f"{path} is truncated: the shapes its header declares need more bytes than it has")
        q = np.frombuffer(data, dtype=np.int8, count=n, offset=pos[0]).astype(np.float32)
        s = np.frombuffer(data, dtype=np.float32, count=n // group_size, offset=pos[0] + n)
        pos[0] += n + 4 * (n // group_size)
        return torch.from_numpy((q.reshape(-1, group_size) * s[:, None]).reshape(shape))

    return take


def load_llama2c_bin(path: Path, max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
    """(config, state dict) from a llama2c export: version 0 (legacy), 1 (fp32) or 2 (int8, dequantised)."""
    with open(path, "rb") as f:
        version, p, shared, group_size = _read_llama2c_header(f)
    dim, hidden, L, n_heads, n_kv, vocab, seq = p
    if min(p) < 1 or dim % n_heads or n_heads % n_kv:
        raise ValueError(f"{path} header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, "
                         f"max_seq_len) = {p} is not a valid llama2c model: is this a llama2c .bin export?")
    header = 28 if version == 0 else 256
    if version == 2:
        data = bytearray(path.read_bytes())  # writable, so torch.from_numpy does not warn
        norms = _Reader(np.frombuffer(data, dtype=np.float32, count=(2 * L + 1) * dim, offset=header), path)
        sd = _read_v1(norms, p, shared, _int8_reader(data, header + 4 * (2 * L + 1) * dim, group_size, path))
    else:
        r = _Reader(np.fromfile(path, dtype=np.float32, offset=header), path)
        sd = _read_v0(r, p, shared) if version == 0 else _read_v1(r, p, shared, r.take)
        if r.pos != r.data.size:
            raise ValueError(f"{path} holds {r.data.size} values after its header, the header's shapes need "
                             f"{r.pos}: the file does not match its header")
    config = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=L, n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=hidden,
                         max_seq_len=max_seq_len or seq, tie_embeddings=shared)
    return config, sd
