"""Where the course lives. The one place the GitHub owner/name is set: badges, colab_links.md and
the notebooks' setup cells all read it from here (`python -m utils.course` rewrites colab_links.md)."""

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


def colab_links_markdown() -> str:
    """The text of colab_links.md: every lesson that exists, in order, with its badge."""
    lines = ["# Open the lessons in Colab", "", "In order; each builds on the ones before it.", ""]
    for name in LESSONS:
        if (ROOT / "notebooks" / f"{name}.ipynb").exists():
            lines.append(f"{len(lines) - 3}. `{name}` {badge_markdown(name)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (ROOT / "colab_links.md").write_text(colab_links_markdown())
    print((ROOT / "colab_links.md").read_text())
