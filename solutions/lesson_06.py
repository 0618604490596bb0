"""Solutions to lesson 06's exercises: the same names as the notebook's stubs.

A test replaces each exercise cell by `from solutions.lesson_06 import *` and expects every check to pass.
"""

import math

import torch
import torch.nn.functional as F


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in nats: logits (B, T, vocab), targets (B, T) -> a 0-dim tensor."""
    log_probs = F.log_softmax(logits.float(), dim=-1)                        # stable: subtracts the max first
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)         # (B, T): log p(target)
    return -picked.mean()


def make_batch(ids: torch.Tensor, starts: torch.Tensor, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, max_seq_len) from windows of max_seq_len + 1 ids at `starts`: y is x shifted by one token."""
    windows = torch.stack([ids[s: s + max_seq_len + 1] for s in starts.tolist()]).long()  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def lr_schedule(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup over warmup_steps (step 0 gets lr / warmup_steps), then cosine from lr to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, vocab) -> (B,): temperature 0 is greedy, else top-k then top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p                     # the mass of the likelier tokens
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)          # keep the token that crosses top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
