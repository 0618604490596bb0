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


def test_colab_links_and_readme_list_every_lesson_in_order():
    assert (course.ROOT / "colab_links.md").read_text() == course.colab_links_markdown()
    readme = (course.ROOT / "README.md").read_text()
    assert readme == course.readme_with_lessons(readme), "run `python -m utils.course`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(path), as_version=4)
    env = {"LLAMA_SMOKE": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        client.execute()  # executed in memory: the committed copy is never overwritten
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
