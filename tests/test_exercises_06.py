"""Lesson 06's exercise checkers: each accepts the reference and names the mistake of each wrong version.

The wrong versions are written the way a learner would write them, independently of the checker's
own list of mistakes, so a test passes only if the diagnosis reaches code it has not seen.
"""

import json
import math
from contextlib import redirect_stdout
from io import StringIO

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.checking import rejection, stub
from utils import exercises as ex
from utils.course import ROOT
from utils.data import windows_at
from utils.generate import sample_next
from utils.train import TrainConfig, lr_at

# ---- cross-entropy -----------------------------------------------------------------------------------

def utils_cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def ce_learner(mistake=None):
    """A learner's loss with an explicit softmax; `mistake` picks one bug."""
    def loss(logits, targets):
        B, T, V = logits.shape
        if mistake == "naive log softmax":
            logp = torch.log(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True))
        elif mistake == "raw logits":
            logp = logits
        elif mistake == "softmax dim 1":
            logp = torch.log_softmax(logits, dim=1)
        else:
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        if mistake == "shift again":
            logp, targets, T = logp[:, :-1], targets[:, 1:], T - 1
        nll = -logp.reshape(-1, V)[torch.arange(B * T), targets.reshape(-1)]
        if mistake == "sum":
            return nll.sum()
        if mistake == "per batch":
            return nll.sum() / B
        if mistake == "log2":
            return nll.mean() / math.log(2)
        if mistake == "positive":
            return -nll.mean()
        return nll.mean()
    return loss


def test_cross_entropy_checker_accepts_the_reference_and_an_explicit_version():
    ex.check_cross_entropy_loss(utils_cross_entropy)
    ex.check_cross_entropy_loss(ce_learner())


def test_cross_entropy_checker_says_a_stub_is_not_attempted():
    assert ex.run_check(ex.check_cross_entropy_loss, stub) == "⏳ not attempted yet"


@pytest.mark.parametrize("mistake, message", [
    ("raw logits", "no log-softmax"),
    ("naive log softmax", "log(softmax(x)) underflows"),
    ("softmax dim 1", "softmax over the wrong dimension"),
    ("shift again", "targets shifted a second time"),
    ("sum", "summed over the tokens"),
    ("per batch", "divided by the batch size only"),
    ("log2", "bits, not nats"),
    ("positive", "the sign is flipped"),
])
def test_cross_entropy_checker_names_the_mistake(mistake, message):
    assert message in rejection(ex.check_cross_entropy_loss, ce_learner(mistake))


def test_cross_entropy_checker_names_a_per_token_loss():
    per_token = lambda logits, targets: F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    assert "returned the loss of every token" in rejection(ex.check_cross_entropy_loss, per_token)


# ---- batches ------------------------------------------------------------------------------------------

def batch_learner(mistake=None):
    """A learner's batch builder with a loop over the starts; `mistake` picks one bug."""
    def make_batch(ids, starts, max_seq_len):
        T = max_seq_len
        xs, ys = [], []
        for s in starts:
            s = int(s)
            if mistake == "not shifted":
                x, y = ids[s:s + T], ids[s:s + T]
            elif mistake == "long windows":
                x, y = ids[s:s + T + 1], ids[s + 1:s + T + 2]
            elif mistake == "short windows":
                x, y = ids[s:s + T - 1], ids[s + 1:s + T]
            elif mistake == "start + 1":
                x, y = ids[s + 1:s + T + 1], ids[s + 2:s + T + 2]
            elif mistake == "backwards":
                x, y = ids[s:s + T], ids[s - 1:s + T - 1]
            elif mistake == "swapped":
                x, y = ids[s + 1:s + T + 1], ids[s:s + T]
            else:
                x, y = ids[s:s + T], ids[s + 1:s + T + 1]
            xs.append(x)
            ys.append(y)
        x, y = torch.stack(xs), torch.stack(ys)
        if mistake == "roll":
            y = torch.roll(x, -1, dims=1)
        return (x.int(), y.int()) if mistake == "int32" else (x, y)
    return make_batch


def batch_at_random_starts(ids, starts, max_seq_len):
    """nanoGPT's get_batch: draws its own positions instead of taking the given starts."""
    ix = torch.randint(len(ids) - max_seq_len, (len(starts),))
    x = torch.stack([ids[i:i + max_seq_len] for i in ix])
    y = torch.stack([ids[i + 1:i + 1 + max_seq_len] for i in ix])
    return x, y


def test_batch_checker_accepts_the_reference_and_a_loop():
    ex.check_batch(lambda ids, starts, T: windows_at(ids.numpy(), starts.numpy(), T))
    ex.check_batch(batch_learner())
    assert ex.run_check(ex.check_batch, stub) == "⏳ not attempted yet"


@pytest.mark.parametrize("mistake, message", [
    ("not shifted", "targets not shifted"),
    ("long windows", "off-by-one window: x and y are max_seq_len + 1 tokens long"),
    ("short windows", "off-by-one window: x and y are max_seq_len - 1 tokens long"),
    ("start + 1", "off-by-one window: windows start at starts[i] itself"),
    ("backwards", "targets shifted the wrong way"),
    ("swapped", "x and y swapped"),
    ("int32", "return int64"),
])
def test_batch_checker_names_the_mistake(mistake, message):
    assert message in rejection(ex.check_batch, batch_learner(mistake))


def test_batch_checker_names_torch_roll():
    assert rejection(ex.check_batch, batch_learner("roll")) == (
        "y made by rolling x (torch.roll): its last token wraps around to x's first; cut y from ids, "
        "ids[s + 1 : s + max_seq_len + 1], so that it ends with the token after the window (input: ids (40,), "
        "starts (3,), max_seq_len=6)")


def test_batch_checker_names_windows_at_starts_of_its_own():
    assert rejection(ex.check_batch, batch_at_random_starts).startswith(
        "right windows, but not at the given starts: x[i] must begin at ids[starts[i]]")


def test_an_unnamed_batch_mistake_is_reported_by_position_and_id_not_by_a_difference_of_ids():
    def last_target_repeated(ids, starts, max_seq_len):
        x, y = batch_learner()(ids, starts, max_seq_len)
        return x, torch.cat([y[:, :-1], y[:, -2:-1]], dim=1)
    message = rejection(ex.check_batch, last_target_repeated)
    assert message.startswith("y: 3 of 18 entries differ, the first at [0, 5]: expected "), message


def test_batch_checker_accepts_numpy_indexing_too():
    def with_numpy(ids, starts, T):
        a = ids.numpy()[starts.numpy()[:, None] + np.arange(T + 1)]
        return torch.from_numpy(a[:, :-1]).long(), torch.from_numpy(a[:, 1:]).long()
    ex.check_batch(with_numpy)


# ---- learning-rate schedule ---------------------------------------------------------------------------

def utils_lr(step, max_steps, warmup_steps, lr, min_lr):
    cfg = TrainConfig(lr=lr, min_lr_ratio=min_lr / lr, warmup_steps=warmup_steps, max_steps=max_steps)
    return lr_at(step, cfg)


def lr_learner(mistake=None):
    """A learner's schedule, written out; `mistake` picks one bug."""
    def lr_schedule(step, max_steps, warmup_steps, lr, min_lr):
        if mistake == "nanoGPT warmup" and step < warmup_steps:
            return lr * (step + 1) / (warmup_steps + 1)  # nanoGPT's get_lr
        if mistake == "warmup <=" and step <= warmup_steps:
            return lr * (step + 1) / warmup_steps
        if mistake not in ("no warmup", "no warmup from 0") and step < warmup_steps:
            return lr * step / warmup_steps if mistake == "warmup off by one" else lr * (step + 1) / warmup_steps
        if mistake in ("from step 0", "no warmup from 0"):
            progress = step / max_steps
        elif mistake == "not reaching min":
            progress = (step - warmup_steps) / max_steps
        else:
            progress = max(0.0, (step - warmup_steps) / (max_steps - warmup_steps))
        if mistake == "to zero":
            return 0.5 * lr * (1 + math.cos(math.pi * progress))
        if mistake == "linear":
            return lr - (lr - min_lr) * progress
        if mistake == "full period":
            return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(2 * math.pi * progress))
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    return lr_schedule


def test_lr_checker_accepts_the_trainers_schedule_and_a_written_out_one():
    ex.check_lr_schedule(utils_lr)
    ex.check_lr_schedule(lr_learner())
    assert ex.run_check(ex.check_lr_schedule, stub) == "⏳ not attempted yet"


@pytest.mark.parametrize("mistake, message", [
    ("no warmup", "no warmup: for steps 0 .. warmup_steps - 1"),
    ("no warmup from 0", "no warmup, and the decay measured from step 0"),
    ("warmup off by one", "warmup off by one"),
    ("from step 0", "decay measured from step 0 instead of after warmup"),
    ("not reaching min", "cosine does not reach min_lr"),
    ("to zero", "cosine ends at 0, not at min_lr"),
    ("linear", "linear decay, not cosine"),
    ("full period", "a whole cosine period"),
    ("warmup <=", "warmup one step too long (step <= warmup_steps)"),
])
def test_lr_checker_names_the_mistake(mistake, message):
    assert message in rejection(ex.check_lr_schedule, lr_learner(mistake))


def test_lr_checker_names_nanogpts_warmup():
    assert rejection(ex.check_lr_schedule, lr_learner("nanoGPT warmup")) == (
        "warmup divided by warmup_steps + 1 (as nanoGPT's get_lr): the peak lr is reached at step warmup_steps - 1, "
        "lr * (step + 1) / warmup_steps (input: max_steps=40, warmup_steps=10, lr=1.0, min_lr=0.1, every step 0 .. "
        "max_steps)")


def test_lr_checker_asks_for_a_number():
    assert "return the learning rate as a number" in rejection(ex.check_lr_schedule, lambda *a: "0.001")


# ---- the notebook's exercises with the solutions filled in --------------------------------------------

def test_lesson_06_solutions_pass_every_check_in_the_notebook():
    """Each exercise cell replaced by the solutions: every run_check cell prints passed."""
    nb = json.loads((ROOT / "notebooks" / "06_train_generate.ipynb").read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    first = next(i for i, c in enumerate(cells) if "from utils.exercises import" in "".join(c["source"]))
    exercises = [c for c in cells[first:] if "exercise" in c["metadata"].get("tags", [])]
    checks = [c for c in cells[first:] if "run_check(" in "".join(c["source"])]
    assert len(exercises) >= 3 and len(checks) == len(exercises)
    for c in checks:  # the committed run leaves every exercise to the learner
        assert "not attempted yet" in "".join("".join(o.get("text", "")) for o in c["outputs"])
    namespace, printed = {}, StringIO()
    with redirect_stdout(printed):
        for c in cells[first:]:
            source = "from solutions.lesson_06 import *" if c in exercises else "".join(c["source"])
            exec(compile(source, "<notebook cell>", "exec"), namespace)
    results = [line for line in printed.getvalue().splitlines() if line[:1] in "✅⏳❌"]
    assert results == ["✅ passed"] * len(checks), printed.getvalue()


# ---- sampling, as learners get it wrong ------------------------------------------------------------

def learner_sampler(mistake=None):
    """A learner's sampler; its top-p samples in sorted order and maps back, as Meta's sample_top_p does."""
    def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
        if temperature == 0 and mistake != "no greedy":
            return logits.argmax(dim=-1)
        if mistake == "in place":
            logits /= temperature
        elif mistake == "no temperature with top_k" and top_k is None:
            logits = logits / temperature
        elif mistake not in ("temperature after softmax", "top_p before temperature", "no temperature with top_k"):
            logits = logits / temperature
        if top_k is not None and mistake != "top_k ignored":
            kth = torch.topk(logits, top_k).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        if mistake == "temperature after softmax":
            probs = probs / temperature
        gen = None if mistake == "no generator" else generator
        if top_p is not None:
            sorted_p, idx = torch.sort(probs, dim=-1, descending=mistake != "ascending")
            cum = sorted_p.cumsum(-1)
            sorted_p[(cum > top_p) if mistake == "drop crossing" else (cum - sorted_p > top_p)] = 0.0
            if mistake == "top_p before temperature":  # the cut above was made at temperature 1
                sorted_p = torch.where(sorted_p > 0, sorted_p ** (1 / temperature), 0.0)
            choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
            return idx.gather(-1, choice).squeeze(-1)
        if mistake == "top_p before temperature":
            probs = F.softmax(logits / temperature, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=gen)
        return tokens if mistake == "no squeeze" else tokens.squeeze(-1)
    return sample


def _sampler_like(message):
    def sample(logits, temperature, top_k, top_p, generator):
        if temperature == 0:
            return logits.argmax(-1)
        probs = ex._sampling_mistakes(logits, temperature, top_k, top_p)[message]()
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return sample


REFERENCES_SAMPLE = {
    ex.check_sample_next: sample_next,
}

MISTAKES_SAMPLE = [  # every wrong version and the words its message must contain
    (ex.check_sample_next, learner_sampler("top_k ignored"), "top_k ignored"),
    (ex.check_sample_next, learner_sampler("drop crossing"), "dropped the token that crosses the threshold"),
    (ex.check_sample_next, learner_sampler("temperature after softmax"), "temperature has no effect"),
    (ex.check_sample_next, learner_sampler("no greedy"), "temperature 0 means greedy"),
    (ex.check_sample_next, learner_sampler("no squeeze"), "squeeze"),
    (ex.check_sample_next, learner_sampler("no generator"), "pass generator=generator"),
    (ex.check_sample_next, learner_sampler("in place"), "changed its input logits in place"),
    (ex.check_sample_next, learner_sampler("ascending"), "sorted ascending, the mass before a token rarely"),
    (ex.check_sample_next, learner_sampler("no temperature with top_k"), "temperature has no effect"),
]


def test_a_top_p_cut_chosen_before_the_temperature_is_named_at_temperature_one_half():
    message = rejection(ex.check_sample_next, learner_sampler("top_p before temperature"))
    assert message.startswith(
        "top_p cut chosen before the temperature (on softmax(logits)): divide the logits by the temperature first, "
        "then choose the top-p tokens from those probabilities (the temperature changes how many make up top_p) "
        "(input: logits (40000, 8), temperature=0.5, top_k=None, top_p=0.8,"), message


def test_temperature_ignored_only_with_top_k_is_caught_in_the_combined_case():
    message = rejection(ex.check_sample_next, learner_sampler("no temperature with top_k"))
    assert "temperature=2.0, top_k=3, top_p=None" in message, message


@pytest.mark.parametrize("checker", REFERENCES_SAMPLE, ids=lambda c: c.__name__)
def test_the_sampling_checker_accepts_utils_sample_next(checker):
    assert checker(REFERENCES_SAMPLE[checker]) is None


@pytest.mark.parametrize("checker, candidate, words", MISTAKES_SAMPLE,
                         ids=[f"{c.__name__}: {w}" for c, _, w in MISTAKES_SAMPLE])
def test_the_sampling_checker_names_the_mistake(checker, candidate, words):
    message = rejection(checker, candidate)
    assert words in message, message


@pytest.mark.parametrize("checker, candidate", [
    (ex.check_sample_next, learner_sampler()),
])
def test_a_correct_sampler_written_differently_passes(checker, candidate):
    assert checker(candidate) is None


# ---- every mistake a checker lists is reachable, and named by its own message ----------------------
# A candidate that makes exactly one listed mistake (computed with the checker's own variant functions)
# must get exactly that message: no listed mistake is dead code or shadowed by one listed before it.

OWN_MISTAKES_SAMPLE = [  # checker, the messages it lists, a candidate that makes the one mistake a message names
    (ex.check_sample_next, ex._sampling_mistakes(torch.randn(1, 4), 1.0, 2, 0.5), _sampler_like),
]
OWN_SAMPLE = [(checker, message, make) for checker, mistakes, make in OWN_MISTAKES_SAMPLE for message in mistakes]


@pytest.mark.parametrize("checker, message, make", OWN_SAMPLE,
                         ids=[f"{c.__name__}: {m[:50]}" for c, m, _ in OWN_SAMPLE])
def test_every_listed_sampling_mistake_is_detected_and_named_by_its_own_message(checker, message, make):
    got = rejection(checker, make(message))
    assert got.startswith(message + " (input:"), got
