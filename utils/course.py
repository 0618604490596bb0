"""Where the course lives. The one place the GitHub owner/name is set: the notebooks' badges and
setup cells and colab_links.md are generated from it (`python -m utils.course` rewrites them all,
and a test checks they agree)."""

import json
from pathlib import Path

REPO = "llama2-course/llama2-from-scratch"  # GitHub owner/name
BRANCH = "main"
ROOT = Path(__file__).resolve().parent.parent
LESSONS = {  # notebook -> what it teaches, in one line
    "01_rope": "rotary position embeddings, why attention needs position, Meta's and Hugging Face's layouts",
    "02_gqa": "grouped-query attention (MHA, GQA, MQA) and what fewer K/V heads save",
    "03_kv_cache": "the KV cache, prefill and decode, identical tokens at a fraction of the work",
    "04_swiglu": "SwiGLU and RMSNorm, the rest of a LLaMA block, measured against ReLU, GELU and LayerNorm",
    "05_full_model": "the full model assembled and counted, a real pretrained LLM running in it, what each part buys",
    "06_train_generate": "train your own on a dataset you choose, then sample, resume, export and experiment",
    "07_finetune": "finetune a real pretrained model on your data, fully or with LoRA, against training from scratch",
    "08_llama3": "Llama 3 in the same code: the 128k vocabulary, GQA everywhere, RoPE scaling, the chat format",
}


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


def lesson_list_markdown() -> str:
    """Every lesson that exists, in order: one numbered line each, what it teaches and its badge."""
    lessons = [n for n in LESSONS if (ROOT / "notebooks" / f"{n}.ipynb").exists()]
    return "\n".join(f"{i}. `{name}`: {LESSONS[name]} {badge_markdown(name)}" for i, name in enumerate(lessons, 1))


def colab_links_markdown() -> str:
    """The text of colab_links.md: every lesson that exists, in order, with its badge."""
    intro = "# Open the lessons in Colab\n\nIn order; each builds on the ones before it.\n\n"
    return intro + lesson_list_markdown() + "\n"


def readme_with_lessons(readme: str) -> str:
    """README.md's text with the block between <!-- lessons --> and <!-- /lessons --> rewritten."""
    head, rest = readme.split("<!-- lessons -->", 1)
    tail = rest.split("<!-- /lessons -->", 1)[1]
    return f"{head}<!-- lessons -->\n{lesson_list_markdown()}\n<!-- /lessons -->{tail}"


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
    readme = ROOT / "README.md"
    readme.write_text(readme_with_lessons(readme.read_text()))
    print("wrote colab_links.md and the lesson list in README.md")
