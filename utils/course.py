"""Where the course lives. The one place the GitHub owner/name is set: the notebooks' badges and
setup cells and colab_links.md are generated from it (`python -m utils.course` rewrites them all,
and a test checks they agree)."""

import json
from pathlib import Path

REPO = "llama2-course/llama2-from-scratch"  # GitHub owner/name
BRANCH = "main"
ROOT = Path(__file__).resolve().parent.parent
LESSONS = ["01_rope", "02_gqa", "03_kv_cache", "04_swiglu", "05_full_model", "06_train_generate"]


def colab_url(notebook: str) -> str:
    """Open-in-Colab address of notebooks/<notebook>.ipynb on GitHub."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{notebook}.ipynb"


def badge_markdown(notebook: str) -> str:
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook)})"


def setup_cell_source() -> str:
    """The second cell of every lesson: runs unchanged in Colab (clone + install) and locally."""
    return f'''# Setup: in Colab, clone the course and install what Colab lacks; locally, find the repo root.
import os
import subprocess
import sys
from pathlib import Path

REPO = "{REPO}"  # working from a fork? put its owner/name here
if "google.colab" in sys.modules and not Path(REPO.split("/")[1]).exists():
    r = subprocess.run(["git", "clone", "--depth", "1", f"https://github.com/{{REPO}}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"could not clone https://github.com/{{REPO}}: {{r.stderr.strip()[-300:]}}\\n"
                         "If the course lives in a fork, set REPO above to its owner/name (and in utils/course.py).")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "tiktoken", "datasets"], check=True)
candidates = [Path.cwd(), *Path.cwd().parents, Path(REPO.split("/")[1]).resolve()]
ROOT = next((p for p in candidates if (p / "utils" / "model.py").exists()), None)
if ROOT is None:
    raise SystemExit("the course's utils/ folder is not here: open this notebook from the course's folder, or in Colab")
sys.path.insert(0, str(ROOT))
if "utils" in sys.modules and Path(sys.modules["utils"].__file__ or "").parent != ROOT / "utils":
    for module in [m for m in sys.modules if m == "utils" or m.startswith("utils.")]:
        del sys.modules[module]  # another package called utils was imported first: use the course's
SMOKE = os.environ.get("LLAMA_SMOKE") == "1"  # tiny sizes and few steps, for the test suite'''


def colab_links_markdown() -> str:
    """The text of colab_links.md: every lesson that exists, in order, with its badge."""
    lines = ["# Open the lessons in Colab", "", "In order; each builds on the ones before it.", ""]
    lessons = [n for n in LESSONS if (ROOT / "notebooks" / f"{n}.ipynb").exists()]
    lines += [f"{i}. `{name}` {badge_markdown(name)}" for i, name in enumerate(lessons, 1)]
    return "\n".join(lines) + "\n"


def sync_notebook(path: Path) -> bool:
    """Rewrite cell 0 (badge line) and cell 1 (setup) of a lesson from REPO; True if it changed."""
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    first = "".join(cells[0]["source"]).split("\n")
    first[0] = badge_markdown(path.stem)
    new0, new1 = "\n".join(first), setup_cell_source()
    changed = "".join(cells[0]["source"]) != new0 or "".join(cells[1]["source"]) != new1
    cells[0]["source"], cells[1]["source"] = new0, new1
    if changed:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed


if __name__ == "__main__":
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        print(("updated " if sync_notebook(nb) else "ok      ") + nb.name)
    (ROOT / "colab_links.md").write_text(colab_links_markdown())
    print("wrote colab_links.md")
