"""Lesson 05's exercise checkers: each accepts the reference and names the mistake of each wrong version.

The wrong versions are written the way a learner would write them, independently of the checker's
own list of mistakes, so a test passes only if the diagnosis reaches code it has not seen.
"""

import ast
import json
from contextlib import redirect_stdout
from io import StringIO

import pytest
import torch
from torch import nn

from solutions import lesson_05
from tests.checking import rejection, stub
from utils import exercises as ex
from utils.course import ROOT
from utils.model import Llama, TransformerBlock, count_params
from utils.norm import RMSNorm
from utils.rope import rope_cos_sin

# ---- the whole model -----------------------------------------------------------------------------------

def llama_learner(mistake=None):
    """A learner's model, built from utils blocks; `mistake` picks one bug."""
    class MyLlama(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
            self.norm = RMSNorm(config.dim) if mistake == "default eps" else RMSNorm(config.dim, config.norm_eps)
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
            if config.tie_embeddings and mistake != "untied":
                self.output.weight = self.tok_embeddings.weight
            theta = 10000.0 if mistake == "default theta" else config.rope_theta
            self.cos, self.sin = rope_cos_sin(config.head_dim, config.max_seq_len, theta)

        def forward(self, tokens, start_pos=0):
            T = tokens.shape[1]
            first = 0 if mistake in ("rope from 0", "start_pos ignored") else start_pos
            cos, sin = self.cos[first:first + T], self.sin[first:first + T]
            h = self.tok_embeddings(tokens)
            if mistake == "scaled embeddings":
                h = h * self.config.dim ** 0.5
            for layer in self.layers:
                h = layer(h, cos, sin, 0 if mistake in ("no start_pos to blocks", "start_pos ignored") else start_pos)
            logits = self.output(h if mistake == "no final norm" else self.norm(h))
            return logits.softmax(-1) if mistake == "softmax" else logits
    return MyLlama


class BlocksElsewhere(nn.Module):
    """Right numbers, but the blocks in self.blocks: Meta-named weights cannot load."""

    def __init__(self, config):
        super().__init__()
        self.inner = llama_learner()(config)

    def forward(self, tokens, start_pos=0):
        return self.inner(tokens, start_pos)


def test_llama_checker_accepts_the_reference_and_a_learners_model():
    ex.check_llama(Llama)
    ex.check_llama(llama_learner())
    ex.check_llama(lesson_05.MyLlama)
    assert ex.run_check(ex.check_llama, stub) == "⏳ not attempted yet"


@pytest.mark.parametrize("mistake, message", [
    ("no final norm", "the final norm is missing"),
    ("softmax", "returned probabilities (softmax)"),
    ("scaled embeddings", "embeddings scaled by sqrt(dim)"),
    ("default theta", "RoPE tables built with theta 10000"),
    ("rope from 0", "RoPE angles of positions 0 .. T - 1 for every chunk"),
    ("no start_pos to blocks", "start_pos not passed to the blocks"),
    ("start_pos ignored", "start_pos not passed to the blocks"),
    ("untied", "has its own output matrix although config.tie_embeddings is set"),
    ("default eps", "the final norm ignores config.norm_eps"),
])
def test_llama_checker_names_the_mistake(mistake, message):
    assert message in ex.run_check(ex.check_llama, llama_learner(mistake))
    assert message in rejection(ex.check_llama, llama_learner(mistake))


def test_llama_checker_names_weights_that_cannot_load():
    assert "not named like Meta's" in rejection(ex.check_llama, BlocksElsewhere)


# ---- counting parameters -----------------------------------------------------------------------------

def count_learner(mistake=None):
    """A learner's count, term by term; `mistake` picks one bug."""
    def count_parameters(config):
        d, L, V, h = config.dim, config.n_layers, config.vocab_size, config.hidden_dim
        head_dim = d // config.n_heads
        kv_heads = config.n_heads if mistake == "n_heads for K/V" else config.n_kv_heads
        q = o = d * d
        k = v = d * kv_heads * head_dim
        attention = q + k + v + o
        if mistake == "biases":
            attention += d + 2 * kv_heads * head_dim + d
        width = 4 * d if mistake == "4 * dim" else h
        ffn = (2 if mistake == "two matrices" else 3) * d * width + (2 * width + d) * (mistake == "biases")
        norms = {"no norms": 0, "one norm per block": d, "layernorm": 4 * d}.get(mistake, 2 * d)
        per_block = attention + ffn + norms
        blocks = per_block if mistake == "one block" else L * per_block
        final_norm = {"no norms": 0, "no final norm": 0, "layernorm": 2 * d}.get(mistake, d)
        embedding = 0 if mistake == "no embedding" else V * d
        if mistake == "output always separate":
            output = V * d
        elif mistake == "output never counted":
            output = 0
        else:
            output = 0 if config.tie_embeddings else V * d
        output += V * (mistake == "biases") * (not config.tie_embeddings)
        positions = config.max_seq_len * d if mistake == "position table" else 0
        return embedding + blocks + final_norm + output + positions
    return count_parameters


def count_from_state_dict(config):
    """Build it (on the meta device: no memory) and add up the state dict: lists a tied matrix twice."""
    with torch.device("meta"):
        model = Llama(config)
    return sum(t.numel() for t in model.state_dict().values())


def count_from_parameters(config):
    with torch.device("meta"):
        return sum(p.numel() for p in Llama(config).parameters())


def test_count_checker_accepts_the_reference_a_written_out_count_and_a_built_model():
    ex.check_count_params(count_params)
    ex.check_count_params(count_learner())
    ex.check_count_params(lesson_05.my_count_params)
    ex.check_count_params(count_from_parameters)
    assert ex.run_check(ex.check_count_params, stub) == "⏳ not attempted yet"


@pytest.mark.parametrize("mistake, message", [
    ("no norms", "the norms are missing"),
    ("no final norm", "the final norm is missing"),
    ("one norm per block", "one norm per block"),
    ("layernorm", "norms counted with a bias (LayerNorm)"),
    ("output always separate", "a tied output layer counted twice"),
    ("output never counted", "the output layer is missing"),
    ("no embedding", "the token embedding is missing"),
    ("n_heads for K/V", "K and V counted with n_heads"),
    ("two matrices", "three matrices"),
    ("4 * dim", "feed-forward width 4 * dim"),
    ("biases", "biases counted"),
    ("position table", "a position embedding table counted"),
    ("one block", "one block counted"),
])
def test_count_checker_names_the_mistake(mistake, message):
    assert message in rejection(ex.check_count_params, count_learner(mistake))


def test_count_checker_names_two_mistakes_at_once():
    def one_block_without_the_final_norm(config):
        return count_learner("one block")(config) - config.dim
    assert rejection(ex.check_count_params, one_block_without_the_final_norm) == (
        "the final norm is missing: after the last block, norm.weight (dim) before the output layer; and a second "
        "mistake: one block counted (input: vocab 100, dim 32, 2 layers, 4 heads, 2 KV heads, hidden 80, untied)")


def test_count_checker_names_a_state_dict_sum_on_a_tied_model():
    assert "a tied output layer counted twice" in rejection(ex.check_count_params, count_from_state_dict)


def test_count_checker_asks_for_an_int():
    message = rejection(ex.check_count_params, lambda config: torch.tensor(count_params(config)))
    assert "return a Python int" in message
    assert "return a Python int" in rejection(ex.check_count_params, lambda config: float(count_params(config)))


# ---- KV cache bytes ----------------------------------------------------------------------------------

def kv_learner(mistake=None):
    """A learner's KV-cache size; `mistake` picks one bug."""
    def kv_cache_bytes(config, batch_size, seq_len, bytes_per_element):
        heads = config.n_heads if mistake == "n_heads" else config.n_kv_heads
        width = config.dim if mistake == "dim per head" else config.dim // config.n_heads
        tensors = {"keys only": 1, "q, k and v": 3}.get(mistake, 2)
        layers = 1 if mistake == "one layer" else config.n_layers
        batch = 1 if mistake == "no batch" else batch_size
        tokens = config.max_seq_len if mistake == "max_seq_len" else seq_len
        size = {"elements": 1, "bits": 8 * bytes_per_element}.get(mistake, bytes_per_element)
        return tensors * layers * batch * tokens * heads * width * size
    return kv_cache_bytes


def kv_from_a_model(config, batch_size, seq_len, bytes_per_element):
    """What setup_cache allocates, on the meta device."""
    dtype = {1: torch.int8, 2: torch.float16, 4: torch.float32}[bytes_per_element]
    with torch.device("meta"):
        return Llama(config).setup_cache(batch_size, seq_len, dtype=dtype)


def test_kv_checker_accepts_a_written_out_formula_and_a_model_allocation():
    ex.check_kv_cache_bytes(kv_learner())
    ex.check_kv_cache_bytes(lesson_05.my_kv_cache_bytes)
    ex.check_kv_cache_bytes(kv_from_a_model)
    assert ex.run_check(ex.check_kv_cache_bytes, stub) == "⏳ not attempted yet"


@pytest.mark.parametrize("mistake, message", [
    ("n_heads", "K/V heads counted with n_heads"),
    ("dim per head", "n_kv_heads * dim"),
    ("keys only", "only keys (or only values)"),
    ("q, k and v", "queries counted too"),
    ("one layer", "one layer"),
    ("no batch", "batch_size ignored"),
    ("max_seq_len", "config.max_seq_len used"),
    ("elements", "counted elements, not bytes"),
    ("bits", "bits, not bytes"),
])
def test_kv_checker_names_the_mistake(mistake, message):
    assert message in rejection(ex.check_kv_cache_bytes, kv_learner(mistake))


def test_kv_checker_asks_for_a_number():
    assert "return a number of bytes" in rejection(ex.check_kv_cache_bytes, lambda *args: "2 GB")


def test_kv_checker_asks_for_an_int_not_a_float():
    def with_true_division(config, batch_size, seq_len, bytes_per_element):
        head_dim = config.dim / config.n_heads  # a float
        return 2 * config.n_layers * batch_size * seq_len * config.n_kv_heads * head_dim * bytes_per_element
    message = rejection(ex.check_kv_cache_bytes, with_true_division)
    assert message.startswith("returned 5760.0, a float (dim / n_heads gives one): return an int, with "
                              "dim // n_heads or int(...) (input: vocab 64, dim 32, 3 layers"), message


def test_kv_checker_names_two_mistakes_at_once_in_a_short_message():
    def n_heads_and_one_layer(config, batch_size, seq_len, bytes_per_element):
        return 2 * batch_size * seq_len * config.n_heads * (config.dim // config.n_heads) * bytes_per_element
    message = rejection(ex.check_kv_cache_bytes, n_heads_and_one_layer)
    assert message == ("K/V heads counted with n_heads: the cache holds only the n_kv_heads shared K/V heads (GQA); "
                       "and a second mistake: one layer (input: vocab 64, dim 32, 3 layers, 4 heads, 2 KV heads, "
                       "hidden 64, untied; batch_size=3, seq_len=10, bytes_per_element=2)"), message


def test_kv_checker_without_a_diagnosis_shows_one_case_and_the_ratio():
    message = rejection(ex.check_kv_cache_bytes, lambda config, B, T, n: 3 * kv_learner()(config, B, T, n))
    assert message.startswith("case 1 of 4: expected 5760, got 17280 (3 times the answer) (input: vocab 64, dim 32, "
                              "3 layers, 4 heads, 2 KV heads, hidden 64, untied; batch_size=3, seq_len=10, "
                              "bytes_per_element=2). 2 (keys and values) * n_layers"), message
    assert len(message) < 300, len(message)


# ---- the notebook's exercises with the solutions filled in --------------------------------------------

def test_the_lesson_05_solutions_pass_every_check_in_the_notebook():
    """Each exercise cell stubs names the solutions define; each check cell, run with the solutions, passes."""
    nb = json.loads((ROOT / "notebooks" / "05_full_model.ipynb").read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    exercises = [c for c in cells if "exercise" in c["metadata"].get("tags", [])]
    checks = [c for c in cells if "run_check(" in "".join(c["source"])]
    assert len(exercises) >= 3 and len(checks) == len(exercises)
    stubbed = {node.name for c in exercises for node in ast.parse("".join(c["source"])).body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert stubbed == set(lesson_05.__all__)
    for c in checks:  # the committed run leaves every exercise to the learner
        assert "not attempted yet" in "".join("".join(o["text"]) for o in c["outputs"] if "text" in o)
    namespace, printed = {**vars(ex), **{name: getattr(lesson_05, name) for name in lesson_05.__all__}}, StringIO()
    with redirect_stdout(printed):
        for c in checks:
            exec(compile("".join(c["source"]), "<notebook cell>", "exec"), namespace)
    results = [line for line in printed.getvalue().splitlines() if line[:1] in "✅⏳❌"]
    assert results == ["✅ passed"] * len(checks), printed.getvalue()


# ---- every mistake a checker lists is reachable, and named by its own message ----------------------
# A candidate that makes exactly one listed mistake (computed with the checker's own variant functions)
# must get exactly that message: no listed mistake is dead code or shadowed by one listed before it.

LLAMA = Llama(ex._llama_configs()[0])
LLAMA_MISTAKES = ex._llama_mistakes(LLAMA, None) | ex._llama_cache_mistakes(LLAMA, None)


def llama_like(message):
    knobs = LLAMA_MISTAKES[message].keywords  # the checker's own knobs for this mistake

    class OneMistake(Llama):
        def forward(self, tokens, start_pos=0):
            return ex._llama(self, tokens, start_pos, **knobs)
    return OneMistake


def count_like(message):
    configs = ex._count_configs()
    counts = ex._count_mistakes(configs)[message]()
    return lambda config: counts[configs.index(config)]


def kv_like(message):
    cases = ex._kv_cases()
    sizes = ex._kv_mistakes(cases)[message]()
    return lambda config, B, T, n: sizes[cases.index((config, B, T, n))]


OWN_MISTAKES = [
    (ex.check_llama, list(LLAMA_MISTAKES), llama_like),
    (ex.check_count_params, list(ex._count_mistakes(ex._count_configs())), count_like),
    (ex.check_kv_cache_bytes, list(ex._kv_mistakes(ex._kv_cases())), kv_like),
]
OWN = [(checker, message, make) for checker, messages, make in OWN_MISTAKES for message in messages]


@pytest.mark.parametrize("checker, message, make", OWN, ids=[f"{c.__name__}: {m[:50]}" for c, m, _ in OWN])
def test_every_listed_mistake_is_detected_and_named_by_its_own_message(checker, message, make):
    got = rejection(checker, make(message))
    assert got.startswith(message + " (input:"), got
