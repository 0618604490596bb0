"""Every lesson runs top to bottom in smoke mode, and the committed copy is a complete, honest run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utils import course

NOTEBOOKS = sorted((course.ROOT / "notebooks").glob("*.ipynb"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def words(nb: dict) -> int:
    text = " ".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    text = re.sub(r"\$\$.*?\$\$|\$[^$]*\$|```.*?```|\(http[^)]*\)", " ", text, flags=re.S)
    return len(re.findall(r"[A-Za-z][A-Za-z'-]*", text))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_a_complete_lesson(path):
    nb = load(path)
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert course.badge_markdown(path.stem) in "".join(cells[0]["source"]), "first cell: its own Colab badge"
    assert "".join(cells[1]["source"]) == course.setup_cell_source(), "second cell: run `python -m utils.course`"
    assert all(c["execution_count"] is not None for c in code), "every code cell was run"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"error outputs committed: {[e['ename'] for e in errors]}"
    assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"]), "at least one plot"
    assert words(nb) >= 600, f"only {words(nb)} words of explanation"
    for prev, cell in zip(cells[1:], cells[2:]):
        if cell["cell_type"] == "code":
            assert prev["cell_type"] == "markdown", f"code cell without a sentence before it: {cell['source'][:80]}"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "outputs come from one run, top to bottom"


# a path that only exists on the machine that ran the notebook: a home folder, a temp folder, a workspace
MACHINE_PATH = re.compile(r"(?<![\w.~])(/work/|/home/|/root/|/tmp/|/Users/|/private/var/|[A-Za-z]:\\+Users\\)")
RESULT_SUFFIXES = (".md", ".json", ".csv", ".txt")  # what benchmarks/ records; its scripts may name /tmp freely


def notebook_texts(nb: dict):
    """(cell index, text) for every source and every text output (images are skipped: base64 is noise)."""
    for i, cell in enumerate(nb["cells"]):
        yield i, "".join(cell["source"])
        for o in cell.get("outputs", []):
            yield i, "".join(o.get("text", "")) + "".join(o.get("traceback", []))
            yield from ((i, "".join(v)) for k, v in o.get("data", {}).items() if k.startswith("text/"))


def machine_paths(text: str) -> list[str]:
    return [text[max(m.start() - 40, 0):m.end() + 40] for m in MACHINE_PATH.finditer(text)]


def test_machine_paths_are_found_by_the_scan():  # the scan below must be able to fail
    assert machine_paths("wrote /work/wt-l05/benchmarks/ablation.md") and machine_paths("at /root/.pyenv/x")
    assert machine_paths(r"C:\\Users\\ada\\llama") and machine_paths("/tmp/run") and machine_paths("/home/ada/x")
    assert not machine_paths("runs/06/default and data/tinyshakespeare.txt, ~/my.txt, 1.5/tmp/")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_names_no_path_of_the_machine_that_ran_it(path):
    found = [(i, hit) for i, text in notebook_texts(load(path)) for hit in machine_paths(text)]
    assert not found, f"absolute paths of this machine in cells {found}: print paths relative to the repository"


def test_committed_benchmark_results_name_no_path_of_the_machine_that_ran_them():
    files = [f for f in sorted((course.ROOT / "benchmarks").rglob("*")) if f.suffix in RESULT_SUFFIXES]
    assert any(f.name == "ablation.md" for f in files)
    found = [(f.name, hit) for f in files for hit in machine_paths(f.read_text(encoding="utf-8"))]
    assert not found, f"absolute paths of a machine: {found}"


# sentences about how the course was written, not about the model: the prose speaks to the learner
MAKING_OF = re.compile(r"\b(the|this|that|our) issue\b|\bissues? (that )?(asked|asks|says|said|wanted|wants|"
                       r"requested|requires)\b|\bissue #?\d+|\bgithub issue", re.I)


def test_making_of_sentences_are_found_by_the_scan():
    assert MAKING_OF.search("The issue that asked for this study asked for equal time.")
    assert MAKING_OF.search("as issue 24 says") and not MAKING_OF.search("Dropout is not an option here.")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_prose_speaks_to_the_learner_not_about_how_the_course_was_made(path):
    cells = load(path)["cells"]
    found = [(i, m.group(0)) for i, c in enumerate(cells) if c["cell_type"] == "markdown"
             for m in MAKING_OF.finditer("".join(c["source"]))]
    assert not found, f"cells {found}: say what the learner sees and measures, not why the lesson was written"


def test_colab_links_and_readme_list_every_lesson_in_order():
    assert (course.ROOT / "colab_links.md").read_text() == course.colab_links_markdown()
    readme = (course.ROOT / "README.md").read_text()
    assert readme == course.readme_with_lessons(readme), "run `python -m utils.course`"


def exercise_cells(nb) -> list:
    """The cells a learner fills in: tagged "exercise" in their metadata."""
    return [c for c in nb["cells"] if "exercise" in c["metadata"].get("tags", [])]


def check_outputs(nb) -> list[str]:
    """The printed text of every cell that grades an exercise (calls run_check)."""
    return ["".join(o.get("text", "") for o in c["outputs"] if o["output_type"] == "stream")
            for c in nb["cells"] if c["cell_type"] == "code" and "run_check(" in "".join(c["source"])]


def execute_in_smoke_mode(nb, path: Path):
    """Run a notebook top to bottom with LLAMA_SMOKE=1, in memory: the committed copy is never overwritten."""
    nbclient = pytest.importorskip("nbclient")
    env = {"LLAMA_SMOKE": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode_with_its_exercises_unattempted(path):
    nbformat = pytest.importorskip("nbformat")
    nb = execute_in_smoke_mode(nbformat.read(str(path), as_version=4), path)
    outputs = check_outputs(nb)
    assert len(exercise_cells(nb)) >= 3 and len(outputs) >= len(exercise_cells(nb)), "at least three exercises"
    assert all("not attempted yet" in text for text in outputs), outputs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_solutions_pass_every_checker(path):
    # every exercise cell replaced by the repository's solutions: each checker must print that it passed
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(path), as_version=4)
    module = f"solutions.lesson_{path.stem[:2]}"
    assert (course.ROOT / "solutions" / f"lesson_{path.stem[:2]}.py").exists(), f"no {module}"
    for cell in exercise_cells(nb):
        cell["source"] = f"from {module} import *  # the solutions"
    outputs = check_outputs(execute_in_smoke_mode(nb, path))
    assert outputs and all("passed" in text and "❌" not in text for text in outputs), outputs


def run_setup_cell(cwd: Path, prelude: str, env_extra: dict | None = None):
    code = prelude + "\n" + course.setup_cell_source() + "\nimport utils\nprint(utils.__file__)"
    env = {**os.environ, **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_setup_cell_uses_the_courses_utils_even_if_another_was_imported_first(tmp_path):
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "__init__.py").write_text("NOT_THE_COURSE = True\n")
    prelude = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import utils; assert utils.NOT_THE_COURSE"
    r = run_setup_cell(course.ROOT / "notebooks", prelude)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(course.ROOT / "utils" / "__init__.py")


def test_setup_cell_says_how_to_fix_a_failed_clone(tmp_path):
    # Colab, no course folder, and a clone that fails (https forbidden here: nothing leaves the machine)
    prelude = "import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab')"
    r = run_setup_cell(tmp_path, prelude, {"GIT_ALLOW_PROTOCOL": "file"})
    assert r.returncode == 1 and "could not clone" in r.stderr and "set REPO above" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
