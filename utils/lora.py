"""LoRA (Hu et al., 2021): finetune a frozen model through a low-rank update of chosen projections.

    y = W x + (alpha / r) * B (A x)        W (out, in) frozen; A (r, in), B (out, r) trained; r << in, out

B starts at zero, so before the first step the model computes exactly what the base model does; only A
and B receive gradients, so the optimizer keeps state for r * (in + out) numbers per projection instead
of in * out. After training, `merge_lora` folds B A into W and the model is a plain `Llama` again.

    apply_lora(model, rank=8)           # wq, wk, wv, wo of every layer become LoRALinear; the rest is frozen
    trainable_params(model)             # what the optimizer will hold
    merge_lora(model)                   # W <- W + (alpha / r) B A: plain nn.Linear, same logits
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")             # the attention projections (the LoRA paper's choice)
ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # ... and the SwiGLU feed-forward's three matrices


class LoRALinear(nn.Module):
    """A frozen linear map plus a trainable rank-r update: (..., in) -> (..., out) = W x + (alpha / r) B(A x)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free projections (every Llama matrix is one)")
        out_features, in_features = base.weight.shape
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.weight = base.weight  # the same Parameter (and the same state-dict name): W, frozen
        self.weight.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))  # (out, r): zero, so B A = 0 at the start
        # peft's default: A ~ kaiming-uniform, as nn.Linear initialises its weight
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, computed in float32, in W's dtype: (out, in)."""
        delta = self.lora_B.float() @ self.lora_A.float()
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in={in_features}, out={out_features}, rank={self.rank}, alpha={self.alpha:g}"


def check_targets(targets) -> tuple[str, ...]:
    """The target names as a tuple ("wq,wv" or a sequence); a ValueError for a name that is no Llama projection."""
    names = tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in names if t not in ALL_TARGETS]
    if bad or not names:
        raise ValueError(f"LoRA targets {list(bad or names)} are not projections of a Llama block: "
                         f"pick from {','.join(ALL_TARGETS)} (e.g. --lora-targets wq,wk,wv,wo)")
    return names


def _targets_in(model: nn.Module, targets: tuple[str, ...]):
    """(parent module, attribute name) of each nn.Linear whose name is one of `targets`."""
    for module in list(model.modules()):
        for name in targets:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                yield module, name


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS) -> nn.Module:
    """Replace the target projections (in place) by LoRALinear(rank, alpha; default 2 * rank) and freeze the rest."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = 2.0 * rank if alpha is None else float(alpha)
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    found = list(_targets_in(model, check_targets(targets)))
    if not found:
        raise ValueError(f"no projection named {', '.join(check_targets(targets))} in the model: LoRA has nothing "
                         "to adapt (was it applied already?)")
    for parent, name in found:
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    freeze_base(model)
    return model


def freeze_base(model: nn.Module) -> None:
    """Only lora_A and lora_B keep requires_grad; every other parameter is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain bias-free nn.Linear with weight W + (alpha / r) B A, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                out_features, in_features = child.weight.shape
                linear = nn.Linear(in_features, out_features, bias=False, device="meta")
                linear.weight = nn.Parameter(child.merged_weight(), requires_grad=True)
                setattr(parent, name, linear)
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Name -> LoRALinear of every adapted projection."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_params(model: nn.Module) -> int:
    """Parameters with requires_grad (shared tensors counted once): what gets gradients and optimizer state."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_params(config, rank: int, targets=DEFAULT_TARGETS) -> int:
    """LoRA's trainable parameters for a LlamaConfig, from the shape alone: sum of r * (in + out) over targets."""
    c = config
    shapes = {"wq": (c.dim, c.n_heads * c.head_dim), "wk": (c.dim, c.n_kv_heads * c.head_dim),
              "wv": (c.dim, c.n_kv_heads * c.head_dim), "wo": (c.n_heads * c.head_dim, c.dim),
              "w1": (c.dim, c.hidden_dim), "w2": (c.hidden_dim, c.dim), "w3": (c.dim, c.hidden_dim)}
    return c.n_layers * sum(rank * sum(shapes[t]) for t in check_targets(targets))


def merge_lora_state_dict(sd: dict, rank: int, alpha: float) -> dict:
    """A LoRA model's state dict (W, lora_A, lora_B per adapted projection) -> a plain Llama's: W + (alpha / r) B A."""
    out = {k: v for k, v in sd.items() if not k.endswith(("lora_A", "lora_B"))}
    for key in sd:
        if key.endswith(".lora_A"):
            prefix = key.removesuffix("lora_A")
            W, A, B = sd[prefix + "weight"], sd[prefix + "lora_A"], sd[prefix + "lora_B"]
            out[prefix + "weight"] = (W.float() + (alpha / rank) * (B.float() @ A.float())).to(W.dtype)
    return out
