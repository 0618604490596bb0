"""One markdown table row per training run, for sharing results (`python -m utils report RUN_DIR...`).

    print(report_rows(["out", "runs/char"]))     # header, then a row per run, from each metrics.json

Rows read only what `utils.train` wrote into the run's metrics.json, so a row can be appended to
benchmarks/datasets.md (`python -m utils report --no-header out >> benchmarks/datasets.md`).
"""

import json
from pathlib import Path

from .runs import METRICS_FILE

FIELDS = ("dataset", "tokenizer", "params", "steps", "device", "dtype", "wall_seconds", "val_loss_per_char")
COLUMNS = ("dataset", "tokenizer", "parameters", "steps", "device", "dtype", "wall time", "val nats/char")


def report_header() -> str:
    """The table's two header lines."""
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def report_row(run_dir: str | Path) -> str:
    """One markdown row from run_dir/metrics.json."""
    path = Path(run_dir) / METRICS_FILE
    if Path(run_dir).is_file():
        raise ValueError(f"{run_dir} is a file: pass its run folder ({Path(run_dir).parent})")
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no {METRICS_FILE}: train into it first "
                                f"(python -m utils train --out {run_dir}) or pass a run folder that has one")
    m = json.loads(path.read_text())
    missing = [k for k in FIELDS if k not in m]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it was not written by this course's trainer, or by an older "
                         "version of it; train again to get a complete one")
    cells = (f"`{m['dataset']}`", f"`{m['tokenizer']}`", f"{m['params'] / 1e6:.2f}M", f"{m['steps']:,}",
             m["device"], m["dtype"], f"{m['wall_seconds']:.0f} s", f"**{m['val_loss_per_char']:.3f}**")
    return "| " + " | ".join(cells) + " |"


def report_rows(run_dirs: list[str | Path], header: bool = True) -> str:
    """The header (once, unless header=False), then one row per run folder, in the order given."""
    rows = [report_row(d) for d in run_dirs]  # every folder is checked before anything is printed
    return "\n".join(([report_header()] if header else []) + rows)
