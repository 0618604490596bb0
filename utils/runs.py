"""The run folder: what `train` writes into out_dir, who may write there, and what a resume may change.

    out/ckpt.pt        everything a resume needs: model, optimizer, step, history, RNG (`load_checkpoint`)
    out/metrics.json   the run's numbers, read by `utils.report`
    out/train.lock     one training process per folder (`utils.files.FolderLock`)

Nothing trained is lost: a folder holding a run is continued (resume) or restarted (overwrite) only
when asked (`claim_run_folder`), and an overwritten run stays until the new one saves; a failed start
leaves no empty folder behind (`remove_created`); a finished command run again finds its run
(`finished_run`); a resume keeps the run's settings except those RESUME_MAY_CHANGE;
Ctrl-C or SIGTERM finishes the step and saves (`StopSignals`).
"""

import contextlib
import itertools
import json
import os
import signal
import sys
import threading
from dataclasses import asdict, fields
from pathlib import Path

import torch

from .files import FolderLock, atomic_write, remove_stale_temporaries

CKPT_FILE = "ckpt.pt"
METRICS_FILE = "metrics.json"
TRAINING_KEYS = ("config", "train_config", "model", "optimizer", "step")  # what a resume reads


# ---- the checkpoint ---------------------------------------------------------------------------

def atomic_save(obj, path: Path) -> None:
    """torch.save through `atomic_write`: a crash mid-write leaves the previous file intact."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(Path(path), write)


def load_checkpoint(out_dir: str | Path, map_location="cpu") -> dict:
    """The training state saved in out_dir/ckpt.pt; a clear ValueError for a damaged or foreign file."""
    path = Path(out_dir) / CKPT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train first (python -m utils train --out {out_dir}) "
                                "or point --out/--checkpoint at a folder that has one")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)  # a downloaded pickle runs no code
    except Exception as e:  # truncated, damaged, or not a PyTorch file: torch raises many types
        why = (str(e).splitlines() or [""])[0].split(". ")[0]  # torch's first sentence says what it found
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {why}): it is damaged or incomplete (an "
                         "interrupted copy?). Restore a good copy, or start the run again with --overwrite") from e
    missing = [k for k in TRAINING_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a checkpoint written by utils.train (no {', '.join(missing)}): resume "
                         "only runs this trainer wrote, or start again with --overwrite")
    return ckpt


# ---- claiming the folder ----------------------------------------------------------------------

def claim_run_folder(out: Path, *, resume: bool, overwrite: bool, rank: int = 0) -> tuple[FolderLock | None, list]:
    """Check `out` before any work, then (rank 0) create and lock it and clean up after killed writes:
    (the lock, the folders it created, deepest first: `remove_created` takes them away after a failed start).

    Refuses what would lose a run: a file as the folder, or a checkpoint neither resumed nor overwritten.
    Overwrite deletes nothing here: the old run stays until the new one saves its first checkpoint over it
    (`Trainer.save`), so a start that fails on its settings, data or first steps leaves it as it was.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it again: pick one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: pass a folder for the run (created if missing)")
    if (out / CKPT_FILE).exists() and not resume and not overwrite:
        raise FileExistsError(f"{out} already holds a trained run ({CKPT_FILE}): continue it with --resume, start "
                              "again with --overwrite (replaces it), or pick another --out (in Python: resume=True, "
                              "overwrite=True, or another out_dir)")
    if resume and not out.is_dir():
        load_checkpoint(out)  # raises, saying what to do (without creating the folder)
    if rank != 0:
        return None, []
    created = list(itertools.takewhile(lambda p: not p.exists(), (out, *out.parents)))  # runs/a, runs
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --out {out} ({e.strerror}): pick a folder you can write to") from e
    try:
        lock = FolderLock(out).acquire()
    except BaseException:
        remove_created(created)
        raise
    stale = remove_stale_temporaries(out)
    if stale:
        print(f"removed {len(stale)} temporary file(s) an interrupted write left in {out}: "
              f"{', '.join(p.name for p in stale)}")
    return lock, created


def remove_created(folders: list) -> None:
    """Remove, deepest first, the folders a start created, if nothing was written into them: a failed start
    leaves no empty --out behind. A folder that existed before, or holds anything, is never touched."""
    for folder in folders:
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            return


def finished_run(cfg) -> dict | None:
    """The metrics of the run in cfg.out_dir (a TrainConfig's) if it finished with exactly cfg's settings (the
    folder and --progress aside), else None: running a finished command again is then no error."""
    out = Path(cfg.out_dir)
    try:
        metrics = json.loads((out / METRICS_FILE).read_text())
        ckpt = load_checkpoint(out)
        saved = asdict(type(cfg).from_dict(ckpt["train_config"]))
    except (OSError, ValueError, TypeError):  # none, damaged, or written by an older trainer: not the same run
        return None
    if metrics.get("interrupted", True) or metrics.get("steps") != ckpt["step"]:
        return None  # stopped early, or resumed since
    same = all(saved[name] == value for name, value in asdict(cfg).items() if name not in ("out_dir", "progress"))
    return metrics if same else None


# ---- resuming ---------------------------------------------------------------------------------

def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--out" if name == "out_dir" else "--" + name.replace("_", "-")


# settings a resumed run takes from the command line (the length of the run, the machine, and the
# schedule: the NaN advice is a lower lr); everything else must match the checkpoint
RESUME_MAY_CHANGE = ("max_steps", "max_seconds", "eval_interval", "device", "dtype", "compile", "progress",
                     "lr", "min_lr_ratio", "warmup_steps", "grad_clip")


def resume_config(cfg, saved: dict, given=None) -> tuple:
    """The checkpoint's settings, updated with those asked for in `cfg` (a TrainConfig): (config, {name: (old, new)}).

    Asked for: the fields named in `given` (the command line passes the flags typed, whatever their value),
    or, when `given` is None (Python's `train(cfg, resume=True)`), those `cfg` sets away from the defaults.
    A resume may change only RESUME_MAY_CHANGE; asking for another model shape, data, tokenizer or
    optimizer setting is an error, since the run would no longer be the one saved.
    """
    config_type = type(cfg)
    old, default = config_type.from_dict(saved), config_type()
    merged, changes = asdict(old), {}
    for f in fields(config_type):
        new, was = getattr(cfg, f.name), getattr(old, f.name)
        asked = f.name in given if given is not None else new != getattr(default, f.name)
        if f.name == "out_dir" or new == was or not asked:
            continue  # equal to the checkpoint's value, or not asked for
        if f.name not in RESUME_MAY_CHANGE:
            was = was if was is not None else f"from preset {old.preset}"
            raise ValueError(f"{flag(f.name)} {new} contradicts the checkpoint in {cfg.out_dir}, trained with "
                             f"{f.name} {was}: a resumed run keeps its settings; drop "
                             f"the flag, or start a new run (another --out, or --overwrite). A resume may change "
                             f"only {', '.join(flag(n) for n in RESUME_MAY_CHANGE)}")
        merged[f.name] = new
        changes[f.name] = (was, new)
    merged["out_dir"] = cfg.out_dir  # the folder may have moved
    return config_type(**merged), changes


def kept_settings(cfg, changed) -> str:
    """The run's settings (a TrainConfig) that differ from the defaults and were not `changed`, as name=value."""
    default, skip = type(cfg)(), {"out_dir", "progress", *changed}
    kept = [f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg)
            if f.name not in skip and getattr(cfg, f.name) != getattr(default, f.name)]
    return " ".join(kept) or "the defaults"


# ---- stopping: Ctrl-C saves -------------------------------------------------------------------

class StopSignals:
    """While the run lasts, the first SIGINT (Ctrl-C) or SIGTERM (Colab, schedulers) asks it to stop after
    the current step and save; a second one of the same kind raises KeyboardInterrupt at once. Handlers are
    installed only in the main thread (Python allows no other), and the previous ones come back afterwards."""

    def __init__(self, announce: bool = True):
        self.signal: int | None = None
        self.announce, self.previous = announce, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal == signum:
            raise KeyboardInterrupt(f"second {name}: stopped at once")
        if self.signal is not None:  # torchrun answers a Ctrl-C with SIGTERM to every worker: already stopping
            return
        self.signal = signum
        if self.announce:  # os.write, not print: a handler that prints may land inside another print
            msg = f"\n{name}: finishing this step, then saving (press Ctrl-C again to stop at once)\n"
            with contextlib.suppress(Exception):  # no file descriptor in a notebook: the loop says it later
                os.write(sys.stderr.fileno(), msg.encode())
