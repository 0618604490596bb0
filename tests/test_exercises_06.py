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
        return (x.int(), y.int()) if mistake == "int32" else (x, y)
    return make_batch


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
])
def test_lr_checker_names_the_mistake(mistake, message):
    assert message in rejection(ex.check_lr_schedule, lr_learner(mistake))


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
