"""The LLaMA-2 model: token embeddings, n_layers x (RMSNorm -> GQA -> RMSNorm -> SwiGLU), logits.

Parameter names follow Meta's llama/model.py (tok_embeddings, layers.N.attention.wq, ...,
feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), so loading Meta or llama2.c
weights is a name map, not a puzzle.
"""

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache
from .feedforward import FeedForward, swiglu_hidden_dim
from .norm import RMSNorm
from .rope import RopeScaling, rope_cos_sin


@dataclass
class LlamaConfig:
    vocab_size: int = 32000                 # tokens in the vocabulary
    dim: int = 4096                         # width of the residual stream
    n_layers: int = 32                      # transformer blocks
    n_heads: int = 32                       # query heads
    n_kv_heads: int | None = None           # key/value heads (None: = n_heads, i.e. MHA)
    hidden_dim: int | None = None           # SwiGLU width (None: Meta's 2/3 * 4 * dim rule)
    multiple_of: int = 256                  # SwiGLU width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None # scales the SwiGLU width before rounding (Llama 2 70B: 1.3)
    norm_eps: float = 1e-5                  # RMSNorm epsilon
    rope_theta: float = 10000.0             # RoPE base (Llama 2: 10000, Llama 3: 500000)
    rope_scaling: RopeScaling | None = None # Llama 3.1+: the slow RoPE frequencies slowed (None: plain RoPE)
    max_seq_len: int = 2048                 # longest context, in tokens
    dropout: float = 0.0                    # dropout on attention and residual branches
    tie_embeddings: bool = False            # share tok_embeddings and output weights
    init_std: float = 0.02                  # std of the normal initial weights (HF: initializer_range)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = swiglu_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if isinstance(self.rope_scaling, dict):  # as to_dict() wrote it into a checkpoint
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, saying what to change, for a shape the model cannot be built with."""
        check_config(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention = Attention(config.dim, config.n_heads, config.n_kv_heads, config.dropout)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, config.dropout)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, start_pos: int = 0):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """LLaMA-2. model(tokens (B, T) int64, start_pos=0) -> logits (B, T, vocab_size).

    start_pos is an int, or a (1,) tensor in the compiled decode step (utils/decode.py), whose shapes must not
    depend on it.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # RoPE tables: plain float32 tensors, not buffers, so model.to(bfloat16) cannot round them (bf16
        # angles at position 4000 would be off by whole radians) and checkpoints hold only learned
        # weights. Meta keeps its freqs_cis the same way; forward moves them to the input's device.
        self.rope_cos, self.rope_sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta, "cpu",
                                                    scaling=config.rope_scaling)
        self._init_weights()

    def _init_weights(self) -> None:
        """Every matrix from N(0, init_std); norms start at 1. GPT-2 / llama2.c: the projections that
        write into the residual stream get std / sqrt(2 * n_layers), so the variance of the stream does
        not grow with depth (2 writes per layer)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        check_tokens(tokens, start_pos, self.config.max_seq_len)
        positions = start_pos + torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
        cos, sin = self.rope_at(positions)  # (T, head_dim / 2) each
        h = self.dropout(self.tok_embeddings(tokens))  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos)
        return self.output(self.norm(h)).float()  # (B, T, vocab_size)

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin at positions (T,) -> (T, head_dim / 2) each, the tables moved to their device."""
        if self.rope_cos.device != positions.device:
            self.rope_cos, self.rope_sin = self.rope_cos.to(positions.device), self.rope_sin.to(positions.device)
        return self.rope_cos[positions], self.rope_sin[positions]

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy in nats: tokens, targets (B, T)."""
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)

    # ---- KV cache -------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> int:
        """Allocate one KVCache per layer, by default in the activations' dtype (the embedding's: an int8 model's
        output.weight is int8); return the total bytes allocated."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        w = self.tok_embeddings.weight
        c = self.config
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, c.n_kv_heads, max_seq_len, c.head_dim,
                                            dtype=dtype or w.dtype, device=device or w.device)
        return self.cache_nbytes()

    def cache_nbytes(self) -> int:
        return sum(layer.attention.cache.nbytes for layer in self.layers if layer.attention.cache is not None)

    def reset_cache(self) -> None:
        for layer in self.layers:
            if layer.attention.cache is not None:
                layer.attention.cache.reset()

    def clear_cache(self) -> None:
        """Free the caches: the model goes back to plain (training-style) forward passes."""
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def has_cache(self) -> bool:
        return self.layers[0].attention.cache is not None

    # ---- accounting -----------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each shared tensor counted once; optionally without the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n


# ---- presets, checks and counting ----------------------------------------------------------------

def check_config(c: LlamaConfig) -> None:
    """Raise ValueError, saying what to change, for a shape the model cannot be built with."""
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
        if getattr(c, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(c, name)}")
    if c.dim % c.n_heads:
        ok = [h for h in range(1, c.dim + 1) if c.dim % h == 0 and (c.dim // h) % 2 == 0]
        raise ValueError(f"dim ({c.dim}) must be divisible by n_heads ({c.n_heads}): "
                         f"pick n_heads in {ok[:12]}")
    if c.n_heads % c.n_kv_heads:
        ok = [h for h in range(1, c.n_heads + 1) if c.n_heads % h == 0]
        raise ValueError(f"n_heads ({c.n_heads}) must be divisible by n_kv_heads ({c.n_kv_heads}): "
                         f"pick n_kv_heads in {ok}")
    if c.head_dim % 2:
        raise ValueError(f"head_dim = dim / n_heads = {c.head_dim} must be even for RoPE: "
                         "change dim or n_heads")
    if not c.init_std > 0:
        raise ValueError(f"init_std must be > 0, got {c.init_std}")
    if not 0.0 <= c.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {c.dropout}")


# Named shapes. The Llama 2 and 3 ones are for counting (llama2-7b: 6.7B parameters); the small ones train on a CPU.
PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, max_seq_len=4096),
    "llama2-13b": LlamaConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, max_seq_len=4096),
    "llama2-70b": LlamaConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              ffn_dim_multiplier=1.3, multiple_of=4096, max_seq_len=4096),
    # Llama 3: 128k vocabulary, 8 K/V heads at every size, theta 500000; 3.1 and 3.2 scale RoPE to a
    # 128k context (3.2's factor 32 is its Hugging Face config's); 3.2 ties the embeddings
    "llama3-8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                             ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                               ffn_dim_multiplier=1.3, rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0),
                               max_seq_len=131072),
    "llama3.2-1b": LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                               ffn_dim_multiplier=1.5, rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0),
                               max_seq_len=131072, tie_embeddings=True),
    "llama3.2-3b": LlamaConfig(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
                               ffn_dim_multiplier=1.0, rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0),
                               max_seq_len=131072, tie_embeddings=True),
    "tinyllama-1.1b": LlamaConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                  hidden_dim=5632, max_seq_len=2048),
    "smoke": LlamaConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         hidden_dim=64, max_seq_len=64),
    # init_std 0.04: better than GPT-2's 0.02 at this width (benchmarks/train_shakespeare.md, round 5)
    "tiny": LlamaConfig(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                        hidden_dim=384, max_seq_len=256, init_std=0.04),
    "small": LlamaConfig(vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=4,
                         hidden_dim=768, max_seq_len=256),
    # about 10M parameters (bpe:1024), for a GPU such as Colab's T4: 1000 steps on Tiny Shakespeare reach
    # 1.47 nats/char (31 s on an H100, benchmarks/gpu.md); more steps memorise the 1 MB corpus
    "colab-t4": LlamaConfig(vocab_size=4096, dim=384, n_layers=6, n_heads=6, n_kv_heads=2,
                            hidden_dim=1024, max_seq_len=256),
}


def get_config(name: str, **overrides) -> LlamaConfig:
    """A copy of preset `name` with fields overridden, e.g. get_config("tiny", vocab_size=65)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    base = PRESETS[name]
    if "n_heads" in overrides and base.n_kv_heads == base.n_heads:
        overrides.setdefault("n_kv_heads", None)  # a multi-head preset stays multi-head
    if "dim" in overrides or "multiple_of" in overrides or "ffn_dim_multiplier" in overrides:
        overrides.setdefault("hidden_dim", None)  # recompute the SwiGLU width for the new shape
    return replace(base, **overrides)


def check_tokens(tokens: torch.Tensor, start_pos: int | torch.Tensor, max_seq_len: int) -> None:
    """Raise ValueError unless tokens is an int (B, T) tensor whose positions fit in max_seq_len.

    A tensor start_pos (the compiled decode step) is not read here: its caller checks the position.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an int64 (or int32) tensor of shape (batch, seq_len), got {got}: "
                         "use torch.tensor([ids], dtype=torch.long), or add a batch dimension with tokens[None]")
    end = start_pos + tokens.shape[1]
    if not isinstance(start_pos, torch.Tensor) and end > max_seq_len:
        raise ValueError(f"start_pos ({start_pos}) + tokens ({tokens.shape[1]}) = {end} exceeds max_seq_len "
                         f"({max_seq_len}): shorten the input or build the model with a larger max_seq_len")


def count_params(config: LlamaConfig) -> int:
    """Parameter count from the shape alone (no model built): works for 7B on a laptop."""
    c = config
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    ffn = 3 * c.dim * c.hidden_dim
    per_layer = attn + ffn + 2 * c.dim
    embed = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    return embed + c.n_layers * per_layer + c.dim


def flops_per_token(config: LlamaConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 * N_non_embedding + 12 * L * dim * T (PaLM, App. B).

    The output projection counts as a matmul; the input embedding is a lookup and costs nothing.
    """
    c = config
    T = seq_len or c.max_seq_len
    n_matmul = count_params(c) - c.vocab_size * c.dim * (0 if c.tie_embeddings else 1)
    return 6 * n_matmul + 12 * c.n_layers * c.dim * T
