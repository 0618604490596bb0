"""Lesson 06 (training and generation): the checkers of its exercises.

    check_cross_entropy_loss  `cross_entropy_loss(logits, targets)`: the mean next-token loss
    check_batch               `make_batch(ids, starts, max_seq_len)`: inputs and their targets, one token later
    check_lr_schedule         `lr_schedule(step, max_steps, warmup_steps, lr, min_lr)`: warmup, then cosine
    check_sample_next         `sample_next_token(logits, temperature, top_k, top_p, generator)`
"""

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from ..data import windows_at
from .checking import _call, _close, _compare, _describe, _difference, _seeded

# ---- training --------------------------------------------------------------------------------------

CE_HINT = "F.cross_entropy(logits.flatten(0, 1), targets.flatten()): the mean of -log softmax(logits)[target]"


def _cross_entropy_mistakes(logits, targets) -> dict:
    B, T, _ = logits.shape
    picked = lambda scores: scores.gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    log_p = F.log_softmax(logits, dim=-1)
    return {
        "no log-softmax: the loss is -log softmax(logits)[target], not -logits[target]": lambda: -picked(logits).mean(),
        "softmax without the log: take -log of the probability of the target (F.log_softmax)":
            lambda: -picked(logits.softmax(-1)).mean(),
        "the sign is flipped: the loss is minus the log-probability of the target (it is >= 0)":
            lambda: picked(log_p).mean(),
        "summed over the tokens: take the mean over all B * T tokens": lambda: -picked(log_p).sum(),
        "divided by the batch size only: take the mean over all B * T tokens, not B": lambda: -picked(log_p).sum() / B,
        "returned the loss of every token: take the mean, a single number": lambda: -picked(log_p),
        "bits, not nats: use the natural logarithm (F.log_softmax), not log2":
            lambda: -picked(log_p).mean() / math.log(2),
        "softmax over the wrong dimension: normalise over the vocabulary, dim=-1":
            lambda: -picked(F.log_softmax(logits, dim=1)).mean(),
        "targets shifted a second time: the batch already pairs logits[:, t] with targets[:, t] (y is x shifted)":
            lambda: F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten()),
        "logits and targets flattened out of step: flatten(0, 1) both, (B * T, vocab) and (B * T,)":
            lambda: F.cross_entropy(logits.transpose(0, 1).flatten(0, 1), targets.flatten()),
    }


@_seeded
def check_cross_entropy_loss(fn) -> None:
    """fn(logits (B, T, vocab), targets (B, T) int64) -> the mean next-token loss in nats, a 0-dim tensor."""
    for B, T, V, scale in [(2, 5, 7, 1.0), (3, 4, 11, 2.0), (2, 3, 6, 60.0)]:
        logits, targets = torch.randn(B, T, V) * scale, torch.randint(0, V, (B, T))
        inputs = dict(logits=logits, targets=targets)
        got = _call(fn, inputs, CE_HINT)
        if scale > 10 and torch.is_tensor(got) and got.shape == () and not torch.isfinite(got):
            raise AssertionError(f"returned {got.item()} for large logits: log(softmax(x)) underflows to log(0); "
                                 f"use F.log_softmax (it subtracts the max first) (input: {_describe(inputs)})")
        ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        independent = -(logits - logits.logsumexp(-1, keepdim=True)).gather(-1, targets[..., None]).mean()
        _compare(got, ref, _describe(inputs), _cross_entropy_mistakes(logits, targets), CE_HINT, also=independent)


BATCH_HINT = "x[i] = ids[s : s + max_seq_len] and y[i] = ids[s + 1 : s + max_seq_len + 1] for s = starts[i]"


def _batch_mistakes(ids, starts, T) -> dict:
    def windows(shift_x=0, shift_y=1, len_x=T, len_y=T):
        x = torch.stack([ids[s + shift_x: s + shift_x + len_x] for s in starts.tolist()])
        y = torch.stack([ids[s + shift_y: s + shift_y + len_y] for s in starts.tolist()])
        return x, y

    return {
        "targets not shifted: y must hold the next token of each position, ids[s + 1 : s + max_seq_len + 1]":
            partial(windows, shift_y=0),
        "x and y swapped: x is ids[s : s + max_seq_len], y the same window one token later":
            lambda: windows()[::-1],
        "targets shifted the wrong way: y is one token *later* than x, ids[s + 1 : ...]": partial(windows, shift_y=-1),
        "targets shifted by two: y is x shifted by one token": partial(windows, shift_y=2),
        "off-by-one window: windows start at starts[i] itself, not starts[i] + 1": partial(windows, 1, 2),
        "off-by-one window: x and y are max_seq_len + 1 tokens long; each is max_seq_len, cut from one window of "
        "max_seq_len + 1": partial(windows, len_x=T + 1, len_y=T + 1),
        "off-by-one window: x and y are max_seq_len - 1 tokens long; slice ids[s : s + max_seq_len] for x and "
        "ids[s + 1 : s + max_seq_len + 1] for y": partial(windows, len_x=T - 1, len_y=T - 1),
        "off-by-one window: y is one token short, ids[s + 1 : s + max_seq_len + 1]": partial(windows, len_y=T - 1),
        "y made by rolling x (torch.roll): its last token wraps around to x's first; cut y from ids, "
        "ids[s + 1 : s + max_seq_len + 1], so that it ends with the token after the window":
            lambda: (windows()[0], windows()[0].roll(-1, dims=1)),
    }


OWN_STARTS = ("right windows, but not at the given starts: x[i] must begin at ids[starts[i]] (don't draw your own "
              "positions, the caller chose them)")


def _windows_found(ids, got, T: int) -> tuple:
    """The windows (x, y) at the positions where got's rows of x begin in ids (distinct ids): what a make_batch
    that drew its own starts returns."""
    at = {v: i for i, v in enumerate(ids.tolist())}
    s = [at[v] for v in got[0][:, 0].tolist()]  # KeyError: x is not cut from ids
    return tuple(torch.stack([ids[i + k:i + k + T] for i in s]) for k in (0, 1))


@_seeded
def check_batch(fn) -> None:
    """fn(ids (N,) int64, starts (B,) int64, max_seq_len) -> (x, y), each (B, max_seq_len) int64; y is x shifted."""
    for N, starts, T in [(40, [3, 17, 9], 6), (100, [50, 1, 70, 20], 8), (12, [2], 5)]:
        ids, starts = torch.randperm(1000)[:N], torch.tensor(starts)  # distinct ids: every position tells
        inputs = dict(ids=ids, starts=starts, max_seq_len=T)
        got = _call(fn, inputs, BATCH_HINT)
        if (isinstance(got, (tuple, list)) and len(got) == 2 and all(torch.is_tensor(t) for t in got)
                and any(t.dtype != torch.int64 for t in got)):
            raise AssertionError(f"returned {got[0].dtype} and {got[1].dtype}: return int64 (torch.long) ids, which "
                                 f"nn.Embedding and F.cross_entropy expect (input: {_describe(inputs)})")
        ref = windows_at(ids.numpy(), starts.numpy(), T)
        mistakes = _batch_mistakes(ids, starts, T) | {OWN_STARTS: partial(_windows_found, ids, got, T)}
        _compare(tuple(got) if isinstance(got, list) else got, ref, _describe(inputs), mistakes, BATCH_HINT,
                 labels=("x", "y"))


LR_HINT = ("steps 0 .. warmup_steps - 1: lr * (step + 1) / warmup_steps; then progress = (step - warmup_steps) / "
           "(max_steps - warmup_steps), clamped to [0, 1], and min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * progress))")


def _lr_curve(max_steps, warmup, lr, min_lr, warmup_num=1, warmup_den=0, warm_until=0, decay_from=None, span=None,
              floor=None, height=None, period=1.0, shape="cosine", warm=True):
    """The learning rate at steps 0 .. max_steps, textbook, with knobs for the usual mistakes."""
    decay_from = warmup if decay_from is None else decay_from
    span = max(max_steps - decay_from, 1) if span is None else span
    floor = min_lr if floor is None else floor
    height = lr - min_lr if height is None else height
    out = []
    for step in range(max_steps + 1):
        if warm and step < warmup + warm_until:
            out.append(lr * (step + warmup_num) / (warmup + warmup_den))
            continue
        p = min(max((step - decay_from) / span, 0.0), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * period * p)) if shape == "cosine" else 1 - p
        out.append(floor + height * decay)
    return torch.tensor(out, dtype=torch.float64)


def _lr_mistakes(max_steps, warmup, lr, min_lr) -> dict:
    curve = partial(_lr_curve, max_steps, warmup, lr, min_lr)
    return {
        "no warmup: for steps 0 .. warmup_steps - 1 the lr rises linearly, lr * (step + 1) / warmup_steps":
            partial(curve, warm=False),
        "no warmup, and the decay measured from step 0: warm up first, then decay over the remaining steps":
            partial(curve, warm=False, decay_from=0),
        "warmup off by one: step 0 already trains, at lr * (0 + 1) / warmup_steps, and step warmup_steps - 1 "
        "reaches the peak lr": partial(curve, warmup_num=0),
        "warmup divided by warmup_steps + 1 (as nanoGPT's get_lr): the peak lr is reached at step warmup_steps - 1, "
        "lr * (step + 1) / warmup_steps": partial(curve, warmup_den=1),
        "warmup one step too long (step <= warmup_steps): at step warmup_steps the lr is already past the peak; "
        "warm up while step < warmup_steps": partial(curve, warm_until=1),
        "decay measured from step 0 instead of after warmup: progress = (step - warmup_steps) / "
        "(max_steps - warmup_steps)": partial(curve, decay_from=0),
        "cosine does not reach min_lr at the last step: the decay lasts max_steps - warmup_steps steps, so "
        "progress = (step - warmup_steps) / (max_steps - warmup_steps)": partial(curve, span=max_steps),
        "cosine ends at 0, not at min_lr: min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * progress))":
            partial(curve, floor=0.0, height=lr),
        "min_lr added on top: the cosine starts at lr and ends at min_lr, min_lr + 0.5 * (lr - min_lr) * (...)":
            partial(curve, height=lr),
        "a whole cosine period (the lr climbs back to the peak): use cos(pi * progress), half a period":
            partial(curve, period=2.0),
        "linear decay, not cosine: min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * progress))":
            partial(curve, shape="linear"),
    }


@_seeded
def check_lr_schedule(fn) -> None:
    """fn(step, max_steps, warmup_steps, lr, min_lr) -> float: linear warmup, then cosine to min_lr (as lr_at)."""
    from ..train import TrainConfig, lr_at  # the trainer is imported only by the checker that needs it

    for max_steps, warmup, lr, min_lr in [(40, 10, 1.0, 0.1), (750, 50, 4e-3, 0.0), (12, 3, 3e-4, 3e-5)]:
        cfg = TrainConfig(lr=lr, min_lr_ratio=min_lr / lr, warmup_steps=warmup, max_steps=max_steps)
        got = []
        for step in range(max_steps + 1):
            inputs = dict(step=step, max_steps=max_steps, warmup_steps=warmup, lr=lr, min_lr=min_lr)
            value = _call(fn, inputs, LR_HINT)
            try:
                number = None if isinstance(value, (str, bytes)) else float(value)
            except (TypeError, ValueError):
                number = None
            if number is None:
                raise AssertionError(f"returned {value!r} ({type(value).__name__}): return the learning rate as a "
                                     f"number (input: {_describe(inputs)})")
            got.append(number)
        ref = torch.tensor([lr_at(s, cfg) for s in range(max_steps + 1)], dtype=torch.float64)
        close = partial(_close, atol=1e-9 * lr, rtol=1e-6)
        _compare(torch.tensor(got, dtype=torch.float64), ref,
                 f"max_steps={max_steps}, warmup_steps={warmup}, lr={lr}, min_lr={min_lr}, every step 0 .. max_steps",
                 _lr_mistakes(max_steps, warmup, lr, min_lr), LR_HINT, also=_lr_curve(max_steps, warmup, lr, min_lr),
                 close=close)


# ---- generation ------------------------------------------------------------------------------------

def _sampling_probs(logits, temperature, top_k, top_p, keep_crossing=True, sort=True, p_first=False,
                    cut_at_t1=False):
    """The distribution sample_next draws from, (B, vocab), the textbook way, with knobs for the usual mistakes."""
    if cut_at_t1:  # the tokens kept chosen on the temperature-1 distribution, the temperature applied after
        kept = _sampling_probs(logits, 1.0, top_k, top_p, keep_crossing, sort, p_first) > 0
        p = torch.softmax(logits.double() / temperature, dim=-1) * kept
        return p / p.sum(-1, keepdim=True)

    def keep_top_k(p):
        p = torch.where(p >= p.topk(top_k, dim=-1).values[:, -1:], p, 0.0)
        return p / p.sum(-1, keepdim=True)

    def keep_top_p(p):
        order = p.argsort(dim=-1, descending=True) if sort else torch.arange(p.shape[-1]).expand_as(p)
        sorted_p = p.gather(-1, order)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        drop = before >= top_p if keep_crossing else before + sorted_p > top_p
        p = p.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        return p / p.sum(-1, keepdim=True)

    steps = [keep_top_k if top_k is not None else None, keep_top_p if top_p is not None else None]
    p = torch.softmax(logits.double() / temperature, dim=-1)
    for step in steps[::-1] if p_first else steps:
        p = step(p) if step else p
    return p


def _sampling_mistakes(logits, temperature, top_k, top_p) -> dict:
    p = partial(_sampling_probs, logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return {
        "temperature has no effect: divide the logits by it before the softmax, with or without top_k and top_p "
        "(dividing the probabilities changes nothing, torch.multinomial renormalises them)":
            partial(p, temperature=1.0),
        "logits multiplied by the temperature: divide them (a higher temperature flattens the distribution)":
            partial(p, temperature=1 / temperature),
        # equals the reference unless both top_k and top_p are given, so it shadows nothing before that case
        "top_p applied before top_k (it then has no effect once top_k has cut): apply top_k first, then top_p to "
        "the renormalised probabilities": partial(p, p_first=True),
        "top_k ignored: keep only the k most likely tokens (set the others to -inf)": partial(p, top_k=None),
        "top_k keeps one token too many": partial(p, top_k=top_k and top_k + 1),
        "top_k keeps one token too few": partial(p, top_k=top_k and top_k - 1),
        "top_p has no effect: keep the most likely tokens until their mass reaches top_p (sort with descending=True: "
        "sorted ascending, the mass before a token rarely reaches top_p and nothing is dropped)":
            partial(p, top_p=None),
        "top_p dropped the token that crosses the threshold: keep the smallest set whose mass reaches top_p "
        "(drop a token only if the mass before it already does)": partial(p, keep_crossing=False),
        "top_p summed the probabilities unsorted: sort them in descending order before the cumsum":
            partial(p, sort=False),
        "top_p cut chosen before the temperature (on softmax(logits)): divide the logits by the temperature first, "
        "then choose the top-p tokens from those probabilities (the temperature changes how many make up top_p)":
            partial(p, cut_at_t1=True),
    }


def _same_distribution(freq, p) -> bool:
    """Frequencies from 20000 draws per row agree with p: same support, within 0.02 (over 5 sigma)."""
    return freq.shape == p.shape and bool(((freq > 0) <= (p > 0)).all()) and (freq - p).abs().max().item() < 0.02


def _token_frequencies(tokens, n: int, V: int, desc: str) -> torch.Tensor:
    """(2, V) frequencies of the tokens drawn for each of the two rows, after checking they are token ids."""
    if not torch.is_tensor(tokens) or tokens.shape != (2 * n,):
        raise AssertionError(f"{_difference(tokens, torch.empty(2 * n))} (input: {desc}): one token id per row; "
                             "torch.multinomial(probs, 1) is (B, 1), so .squeeze(-1)")
    if tokens.is_floating_point() or tokens.min() < 0 or tokens.max() >= V:
        raise AssertionError(f"returned {tokens.dtype} values in [{tokens.min()}, {tokens.max()}]: return token "
                             f"ids (int64, 0 .. vocab - 1), e.g. torch.multinomial(probs, 1) (input: {desc})")
    return torch.stack([torch.bincount(t, minlength=V) / n for t in tokens.long().view(2, n)]).double()


def _rounded(t: torch.Tensor) -> list:
    return [[round(v, 3) for v in row] for row in t.tolist()]


GREEDY = "temperature 0 means greedy: return logits.argmax(dim=-1) before dividing by the temperature"
_PROBS = torch.tensor([[0.06, 0.30, 0.02, 0.16, 0.22, 0.09, 0.12, 0.03],   # two rows, the same values shuffled,
                       [0.22, 0.03, 0.12, 0.30, 0.06, 0.16, 0.02, 0.09]])  # so each row must be handled alone


@_seeded
def check_sample_next(fn: Callable) -> None:
    """fn(logits (B, vocab), temperature, top_k, top_p, generator) -> (B,) token ids; temperature 0 is greedy."""
    n, V = 20000, _PROBS.shape[1]
    logits = _PROBS.log() + torch.tensor([[1.0], [-2.0]])  # log-probabilities up to a constant per row
    # (1.0, 3, 0.72) keeps 2 tokens: top_k cuts to 3, top_p to 2 of those (4 of the full distribution);
    # (0.5, None, 0.8) keeps 3: chosen at temperature 1 the cut would keep 4
    for temperature, top_k, top_p in [(1.0, None, None), (0.5, None, None), (1.0, 3, None), (1.0, None, 0.75),
                                      (1.0, 3, 0.72), (0.5, None, 0.8), (2.0, 3, None)]:
        inputs = dict(logits=logits.repeat_interleave(n, 0), temperature=temperature, top_k=top_k, top_p=top_p,
                      generator=torch.Generator().manual_seed(0))
        desc = _describe(inputs) + f" (2 rows of logits, each repeated {n} times)"
        tokens = _call(fn, inputs)
        freq, p = _token_frequencies(tokens, n, V, desc), _sampling_probs(logits, temperature, top_k, top_p)
        _compare(freq, p, desc, _sampling_mistakes(logits, temperature, top_k, top_p),
                 f"expected probabilities {_rounded(p)}, your frequencies {_rounded(freq)}", close=_same_distribution)
        inputs["generator"] = torch.Generator().manual_seed(0)
        if top_k is None and top_p is None and not torch.equal(_call(fn, inputs), tokens):
            raise AssertionError("the same generator seed gave different tokens: pass generator=generator to "
                                 "torch.multinomial")
    logits = torch.randn(4, 10)
    inputs = dict(logits=logits, temperature=0.0, top_k=3, top_p=0.9, generator=torch.Generator().manual_seed(0))
    _compare(_call(fn, inputs, GREEDY), logits.argmax(-1), _describe(inputs), hint=GREEDY)
