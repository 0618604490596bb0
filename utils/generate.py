"""Autoregressive sampling: greedy, temperature, top-k and top-p, with or without the KV cache."""

import math
from collections.abc import Collection, Iterable, Iterator

import torch

from .decode import decoder
from .model import Llama, check_tokens


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, vocab) -> (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise ValueError for sampling settings that mean nothing (checked before any model work)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}: 0.9 keeps the tokens that make up 90% of the mass")


def _check_args(model: Llama, prompt: torch.Tensor, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None, cached: int | None) -> None:
    check_tokens(prompt, 0, model.config.max_seq_len)
    if prompt.shape[1] == 0:
        raise ValueError("prompt is empty: give at least one token (e.g. the end-of-text id)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds the model's max_seq_len ({model.config.max_seq_len}): shorten the prompt "
                         "or ask for fewer tokens")
    if cached is not None:
        room = model.layers[0].attention.cache.max_seq_len if model.has_cache else 0
        if not 0 <= cached < prompt.shape[1] or room < total:
            raise ValueError(f"cached={cached} needs the model's caches attached with room for {total} positions "
                             f"(they hold {room}) and at least one prompt token after the cached ones")
    check_sampling(temperature, top_k, top_p)


def stream(model: Llama, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
           stop_token: int | Collection[int] | None = None,
           generator: torch.Generator | None = None, compile: bool = False,
           cached: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), as soon as it is sampled.

    With the cache the prompt is processed once (prefill), then each step feeds one token
    (decode). Without it every step re-runs the whole sequence: same tokens, O(n^2) work.
    Stops early once every row has produced `stop_token` (one id, or several such as a chat model's
    eos and <|im_end|>); finished rows keep emitting the stop token they produced.
    With use_cache, it allocates the model's caches for this call and frees them at the end;
    cached=n instead says that the caches attached to the model already hold prompt[:, :n] (a chat's
    earlier turns): only the rest is processed, and the caches stay attached for the next call.
    compile=True decodes with utils/decode.py's compiled step (same tokens; compiling takes seconds
    to a minute the first time, then each token is faster); it keeps one cache for the next call.
    Arguments are checked here, before the first token, not when iteration starts.
    """
    _check_args(model, prompt, max_new_tokens, temperature, top_k, top_p, cached)
    if (compile or cached is not None) and not use_cache:
        raise ValueError("compile=True and cached= decode with the KV cache: they need use_cache=True")
    return _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, use_cache, stop_token, generator,
                   compile, cached)


@torch.inference_mode()
def _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, use_cache, stop_token, generator,
            compile=False, cached=None):
    was_training = model.training
    model.eval()
    seq = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    stop_ids = None if stop_token is None else torch.tensor(
        [stop_token] if isinstance(stop_token, int) else sorted(stop_token), dtype=torch.long, device=prompt.device)
    step = decoder(model) if compile else None
    if cached is None and step is not None:
        step.attach(model, prompt.shape[0], prompt.shape[1] + max_new_tokens)
    elif cached is None and use_cache:
        model.setup_cache(prompt.shape[0], max_seq_len=prompt.shape[1] + max_new_tokens)
    start = cached or 0
    try:
        logits = model(prompt[:, start:], start_pos=start)[:, -1] if use_cache else None
        last = prompt[:, -1]
        for i in range(max_new_tokens):
            if not use_cache:
                logits = model(seq)[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if stop_ids is not None:
                nxt = torch.where(done, last, nxt)  # a finished row repeats its stop token
                done |= torch.isin(nxt, stop_ids)
            yield nxt
            last, pos = nxt, prompt.shape[1] + i  # nxt sits at position pos
            if not use_cache:
                seq = torch.cat([seq, nxt[:, None]], dim=1)
            if stop_ids is not None and done.all():
                break
            if use_cache and i + 1 < max_new_tokens:  # no forward after the last token
                if step is not None:  # the same forward, compiled, the position as a tensor (utils/decode.py)
                    logits = step(model, nxt[:, None], pos, check_guards=i == 0)  # same shapes after step 0
                else:
                    logits = model(nxt[:, None], start_pos=pos)[:, -1]
    finally:
        if use_cache and cached is None:
            model.clear_cache()
        model.train(was_training)


def generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             stop_token: int | Collection[int] | None = None,
             generator: torch.Generator | None = None, compile: bool = False) -> torch.Tensor:
    """Continue prompt (B, T) -> (B, T + n), n = max_new_tokens unless every row hit a stop token sooner."""
    new = list(stream(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      use_cache=use_cache, stop_token=stop_token, generator=generator, compile=compile))
    return torch.cat([prompt] + [t[:, None] for t in new], dim=1)


def print_stream(tokenizer, tokens: Iterable[torch.Tensor], stops: Collection[int] = (),
                 context: list[int] | None = None) -> list[int]:
    """Print the text of a stream of (1,) tokens as it comes, until a stop id; return the ids printed.

    Each step decodes context + new ids and prints what is new: SentencePiece drops the leading space of a
    sequence's first piece, so decoding the new ids alone would glue words together; a character of
    several bytes waits for its last one.
    """
    context, new = context or [], []
    shown = tokenizer.decode(context) if context else ""
    for token in tokens:
        if token.item() in stops:
            break
        new.append(token.item())
        text = tokenizer.decode(context + new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tokenizer.decode(context + new)[len(shown):], flush=True)
    return new
