"""Lesson 03 (the KV cache): the checkers of its exercises.

    check_kv_cache          `MyKVCache.update(start_pos, xk, xv)`: write at start_pos, return everything so far
    check_cached_attention  `MyAttention`: the attention forward that reads and writes the cache

Its mask exercise, `my_causal_mask`, is graded by lesson 02's `check_causal_mask`.
"""

from functools import partial

import torch

from ..attention import Attention, KVCache, attention, causal_mask
from ..rope import apply_rotary_emb, rope_cos_sin
from .checking import NotAttempted, _call, _close, _compare, _describe, _module, _name, _seeded
from .lesson_02 import _attention, check_attention

# ---- the KV cache ----------------------------------------------------------------------------------

CACHE_HINT = ("the cache is (batch_size, n_kv_heads, max_seq_len, head_dim): write at self.k[:B, :, "
              "start_pos:start_pos + T] and return self.k[:B, :, :start_pos + T], self.v[:B, :, :start_pos + T]")
SMALL_BATCH_HINT = ("a batch B smaller than batch_size uses only the rows :B (Meta's cache_k[:bsz]): write "
                    "self.k[:B, :, start_pos:start_pos + T], return self.k[:B, :, :start_pos + T]")
# (start_pos, T, B): a prompt, two decode steps, a new prompt from 0, a chunk, a step back to position 2 (as
# when a reply is regenerated), then a batch of 1 in the cache of 2
CACHE_WRITES = [(0, 3, 2), (3, 1, 2), (4, 2, 2), (0, 2, 2), (2, 2, 2), (2, 1, 2), (3, 1, 1)]
COUNTER = ("kept its own position counter instead of using start_pos: the caller may go back (to start_pos 2 after 4 "
           "tokens here, as when a reply is regenerated); write at start_pos and return :start_pos + T")


def _cache_mistakes(history: list, ref: KVCache, expected: tuple) -> dict:
    """What the usual wrong caches would return after the writes in history, [(start_pos, xk, xv), ...]."""
    start, xk, xv = history[-1]
    B, end = xk.shape[0], start + xk.shape[2]

    def written_at(where, upto=end, rows=None):  # replay every write i at position where(i, start_pos)
        k, v = torch.zeros_like(ref.k), torch.zeros_like(ref.v)
        for i, (s, hk, hv) in enumerate(history):
            at, b = where(i, s), rows or hk.shape[0]  # rows=every row: a batch of 1 broadcasts into all of them
            k[:b, :, at:at + hk.shape[2]], v[:b, :, at:at + hv.shape[2]] = hk, hv
        return k[:rows or B, :, :upto], v[:rows or B, :, :upto]

    counter = [0]  # where a cache with its own counter, reset only at start_pos 0, writes each step
    for (s, _, _), (_, before, _) in zip(history[1:], history):
        counter.append(0 if s == 0 else counter[-1] + before.shape[2])

    return {
        "the cache returned only the new keys/values: return everything so far, self.k[:B, :, :start_pos + T]":
            lambda: (xk, xv),
        "returned the whole buffer (all max_seq_len positions, the unwritten ones still zero): slice to "
        ":start_pos + T": lambda: (ref.k, ref.v),
        "returned the keys before start_pos without the new ones: slice to :start_pos + T":
            lambda: (ref.k[:B, :, :start], ref.v[:B, :, :start]),
        "wrote the new keys at position 0 instead of at start_pos": lambda: written_at(lambda i, s: 0),
        "wrote the new keys one position too far (start_pos + 1): write at start_pos":
            lambda: written_at(lambda i, s: s + 1),
        COUNTER: lambda: written_at(lambda i, s: counter[i], counter[-1] + xk.shape[2]),
        "appended (torch.cat) instead of writing at start_pos: a new prompt from start_pos 0 must overwrite "
        "the old keys": lambda: tuple(torch.cat([h[i] for h in history], dim=2) for i in (1, 2)),
        "returned every row of the cache for a smaller batch; " + SMALL_BATCH_HINT:
            lambda: (ref.k[:, :, :end], ref.v[:, :, :end]),
        "wrote a batch of 1 into every row of the cache (it broadcasts) and returned them all; "
        + SMALL_BATCH_HINT: lambda: written_at(lambda i, s: s, rows=ref.k.shape[0]),
        "keys and values swapped: return (keys, values)": lambda: expected[::-1],
        "returned the keys twice: return (keys, values)": lambda: (expected[0], expected[0]),
    }


@_seeded
def check_kv_cache(cls: type) -> None:
    """cls(batch_size, n_kv_heads, max_seq_len, head_dim); update(start_pos, xk, xv (B, n_kv_heads, T, hd))
    -> (keys, values) of every position so far, each (B, n_kv_heads, start_pos + T, hd); B <= batch_size."""
    args = dict(batch_size=2, n_kv_heads=2, max_seq_len=8, head_dim=4)
    mine, ref = _call(cls, args), KVCache(*args.values())
    if not callable(getattr(mine, "update", None)):
        raise AssertionError(f"{_name(cls)} has no method update(start_pos, xk, xv)")
    history = []
    for start_pos, T, B in CACHE_WRITES:
        xk, xv = torch.randn(B, 2, T, 4), torch.randn(B, 2, T, 4)
        history.append((start_pos, xk, xv))
        inputs = dict(start_pos=start_pos, xk=xk, xv=xv)
        got = _call(mine.update, inputs, SMALL_BATCH_HINT if B < args["batch_size"] else CACHE_HINT)
        expected = tuple(t.clone() for t in ref.update(start_pos, xk, xv))
        after = f", after writes at start_pos {[s for s, _, _ in history[:-1]]}" if len(history) > 1 else ""
        batch = f", in a cache of batch_size {args['batch_size']}" if B < args["batch_size"] else ""
        _compare(got, expected, _describe(inputs) + after + batch, _cache_mistakes(history, ref, expected),
                 CACHE_HINT, labels=("keys", "values"))


# ---- the attention forward that uses the cache -----------------------------------------------------

CACHED_CHUNKS = [(0, 3), (3, 1), (4, 1), (5, 3)]  # (start_pos, T): prefill, two decode steps, a chunk
CACHED_ATTENTION_HINT = (
    "with a cache: RoPE on the new q and k (cos/sin are already those of positions start_pos ..), transpose to "
    "(B, heads, T, head_dim), k, v = self.cache.update(start_pos, k, v) (before repeat_kv: the cache holds "
    "n_kv_heads heads), then attend over all S = start_pos + T keys with causal_mask(T, S)")


def _cached_attention(m: Attention, x, cos, sin, mask="bottom-right", cache=True) -> list:
    """Textbook GQA with the weights of m, x (B, S, dim) fed in CACHED_CHUNKS through a growing store of
    rotated keys/values, with knobs for the usual mistakes: the output (B, T, dim) of each chunk."""
    B, hd = x.shape[0], m.head_dim
    keys = values = x.new_zeros(B, m.n_kv_heads, 0, hd)
    outputs = []
    for start, T in CACHED_CHUNKS:
        xc, c, s = x[:, start:start + T], cos[start:start + T], sin[start:start + T]
        q, k, v = (w(xc).view(B, T, -1, hd) for w in (m.wq, m.wk, m.wv))
        q, k, v = (t.transpose(1, 2) for t in (apply_rotary_emb(q, c, s), apply_rotary_emb(k, c, s), v))
        keys, values = (torch.cat([old[:, :, :start], new], 2) for old, new in ((keys, k), (values, v)))
        kk, vv = (keys, values) if cache else (k, v)  # (B, n_kv_heads, S, hd)
        S = kk.shape[2]
        allowed = {"bottom-right": causal_mask(T, S), "top-left": torch.ones(T, S, dtype=torch.bool).tril(),
                   "none": torch.ones(T, S, dtype=torch.bool)}[mask]
        y = attention(q, kk, vv, allowed)  # (B, H, T, hd): the one reference, utils.attention.attention
        outputs.append(m.wo(y.transpose(1, 2).reshape(B, T, -1)))
    return outputs


def _cached_attention_mistakes(m: Attention, x, cos, sin) -> dict:
    """{message: outputs of each chunk}: what the usual wrong forwards return, chunk by chunk."""
    return {
        "attended only over the new tokens, not over the cached ones: k, v = self.cache.update(start_pos, k, v) "
        "returns the keys and values of every position so far; attend over what it returns (and write at "
        "start_pos, not 0)": _cached_attention(m, x, cos, sin, cache=False),
        "masked top-left (is_causal=True) although the cache holds earlier tokens: new token i sits at position "
        "start_pos + i and may see keys 0 .. start_pos + i (a single new token sees every key); use the "
        "bottom-right causal_mask(T, start_pos + T)": _cached_attention(m, x, cos, sin, mask="top-left"),
        "no causal mask with the cache: a prompt or chunk of several new tokens must not see the later ones; mask "
        "with causal_mask(T, start_pos + T) (only a single new token may see every key)":
            _cached_attention(m, x, cos, sin, mask="none"),
    }


def _chunk(x, cos, sin, start: int, T: int) -> dict:
    """The forward inputs for positions start .. start + T - 1 of x (B, S, dim) and the tables (S, hd/2)."""
    return dict(x=x[:, start:start + T], cos=cos[start:start + T], sin=sin[start:start + T], start_pos=start)


def _call_sliced_twice(mine, inputs: dict, cos, sin, ref: Attention, desc: str):
    """mine(**inputs); if that crashes after the prompt, try the tables from position 0: a forward that slices
    cos[start_pos:start_pos + T] again (the caller already did) then gives the right output, and is named."""
    try:
        return _call(mine, inputs, CACHED_ATTENTION_HINT)
    except NotAttempted:
        raise
    except AssertionError:
        start, T = inputs["start_pos"], inputs["x"].shape[1]
        if start == 0:
            raise
        try:
            again = mine(inputs["x"], cos[:start + T], sin[:start + T], start)
        except Exception:
            again = None
        if not (torch.is_tensor(again) and _close(again, ref(*inputs.values()))):
            raise
        raise AssertionError("cos and sin sliced again at start_pos: they are already the rows of positions start_pos "
                             f".. start_pos + T - 1 (the model slices its tables), use them as given (input: {desc})"
                             ) from None


@_seeded
def check_cached_attention(cls: type) -> None:
    """cls(dim, n_heads, n_kv_heads) with self.cache (None, or a KVCache the caller installs); forward(x (B, T, dim),
    cos, sin (T, head_dim/2) of positions start_pos .. start_pos + T - 1, start_pos) -> (B, T, dim).

    First without a cache (as check_attention), then with one: a 3-token prompt, two decode steps and a 3-token
    chunk, each output compared with attention over the whole sequence at once."""
    try:
        check_attention.__wrapped__(cls)
    except NotAttempted:
        raise
    except AssertionError as e:
        raise AssertionError(f"without a cache (self.cache is None): {e}") from None
    S = sum(CACHED_CHUNKS[-1])
    for dim, n_heads, n_kv_heads, B in [(32, 4, 2, 2), (24, 3, 1, 1)]:
        args, hd = dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads), dim // n_heads
        ref = Attention(dim, n_heads, n_kv_heads).eval()
        x = torch.randn(B, S, dim)
        cos, sin = rope_cos_sin(hd, S)
        mine = _module(cls, args, ref, _chunk(x, cos, sin, 0, 3))
        mine.cache, ref.cache = KVCache(B, n_kv_heads, S + 2, hd), KVCache(B, n_kv_heads, S + 2, hd)
        whole = _attention(ref, x, cos, sin)  # (B, S, dim): every position at once, no cache
        mistakes = _cached_attention_mistakes(ref, x, cos, sin)
        for i, (start, T) in enumerate(CACHED_CHUNKS):
            inputs = _chunk(x, cos, sin, start, T)
            held = f"the cache holding positions 0 .. {start - 1}" if start else "an empty cache"
            desc = f"{_describe(args | inputs)}, {held}"
            got = _call_sliced_twice(mine, inputs, cos, sin, ref, desc)
            _compare(got, ref(*inputs.values()), desc, {m: partial(o.__getitem__, i) for m, o in mistakes.items()},
                     CACHED_ATTENTION_HINT, also=whole[:, start:start + T])
        cached = getattr(getattr(mine, "cache", None), "k", None)
        if not (torch.is_tensor(cached) and _close(cached[:, :, :S], ref.cache.k[:, :, :S])):
            raise AssertionError("right outputs, but self.cache does not hold the keys: store them there with "
                                 "k, v = self.cache.update(start_pos, k, v) (rotated keys, (B, n_kv_heads, T, "
                                 f"head_dim)), not in a cache of your own (input: {_describe(args)})")
