"""Training: AdamW, warmup + cosine, mixed precision, accumulation, exact resume, atomic checkpoints, DDP.

`train(TrainConfig(...))` is the whole job; `python -m utils train` is a thin layer over it.
A run writes ckpt.pt, the tokenizer and metrics.json into `out_dir` (`utils.checkpoints`).

The loop (`Trainer.run`) is nanoGPT's: take a batch, forward, backward, clip, step; every
`eval_interval` steps measure the validation loss and save a checkpoint; at the end evaluate on
the whole validation split and save.
"""

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .checkpoints import CKPT_FILE, METRICS_FILE, atomic_save, load_checkpoint
from .data import TokenData, check_enough_tokens, epoch_batch, prepare_data, windows_at
from .device import pick_device, pick_dtype
from .files import atomic_write
from .model import Llama, LlamaConfig, get_config


def arg(default, help: str):
    """A TrainConfig field with its --help text: the command line is built from these."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    dataset: str = arg("tinyshakespeare", "text source: tinyshakespeare, tinystories, hf:<owner>/<name>[:column"
                       "[:split]], an http(s) URL, or a local .txt/.md/.jsonl/.json/.csv/.parquet file or folder "
                       "of .txt files")
    tokenizer: str = arg("bpe:1024", "char, bpe:<vocab_size> (trained on the training split), or a tiktoken "
                         "encoding (gpt2, cl100k_base, o200k_base)")
    # model: a preset, then overrides (None keeps the preset's value)
    preset: str = arg("tiny", "model shape to start from (utils.model.PRESETS): smoke, tiny, small, ...")
    dim: int | None = arg(None, "width of the residual stream (overrides the preset)")
    n_layers: int | None = arg(None, "number of transformer blocks (overrides the preset)")
    n_heads: int | None = arg(None, "number of query heads (overrides the preset)")
    n_kv_heads: int | None = arg(None, "number of key/value heads; must divide n_heads (overrides the preset)")
    init_std: float | None = arg(None, "std of the normal initial weights (overrides the preset; tiny: 0.04)")
    dropout: float = arg(0.0, "dropout probability on attention and residual branches")
    tie_embeddings: bool = arg(False, "share one matrix between the token embedding and the output layer")
    max_seq_len: int = arg(128, "context length in tokens: the training windows and the model's max_seq_len")
    # optimisation
    batch_size: int = arg(32, "sequences per micro-batch")
    grad_accum: int = arg(1, "micro-batches accumulated per optimizer step")
    max_steps: int = arg(750, "stop after this many optimizer steps (the cosine schedule ends here)")
    max_seconds: float | None = arg(None, "stop after this many seconds of training, whichever comes first; "
                                    "the schedule then follows the clock")
    lr: float = arg(4e-3, "peak learning rate")
    min_lr_ratio: float = arg(0.0, "the cosine schedule decays to lr * min_lr_ratio")
    warmup_steps: int = arg(50, "steps of linear warmup")
    weight_decay: float = arg(1.0, "AdamW weight decay (matrices only); strong, since 1M parameters memorise "
                              "1 MB of text (benchmarks/train_shakespeare.md)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the gradient norm to this value")
    # evaluation and checkpoints
    eval_interval: int = arg(250, "validate and write a checkpoint every this many steps")
    eval_windows: int = arg(64, "validation windows used during training (the final evaluation uses them all)")
    # system
    device: str = arg("auto", "auto (cuda, then mps, then cpu), or a device such as cpu, cuda, cuda:1, mps")
    dtype: str = arg("auto", "auto (bf16 where the hardware has it: GPUs since Ampere, CPUs with AMX; fp16 + "
                     "loss scaling on older GPUs; else fp32), fp32, bf16, fp16")
    compile: bool = arg(False, "compile the model with torch.compile (faster on recent GPUs, slow to start)")
    seed: int = arg(1337, "random seed for initialisation, batches and dropout")
    out_dir: str = arg("out", "folder for ckpt.pt, the tokenizer and metrics.json")
    progress: bool = arg(True, "show a progress bar")

    def validate(self) -> None:
        """Raise ValueError, saying what to change, for settings no run can use."""
        positive = ("max_seq_len", "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_windows")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr} and {self.min_lr_ratio}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be one of auto, fp32, bf16, fp16, got {self.dtype!r}")

    def model_config(self, vocab_size: int) -> LlamaConfig:
        overrides = {k: getattr(self, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "init_std")
                     if getattr(self, k) is not None}
        return get_config(self.preset, vocab_size=vocab_size, max_seq_len=self.max_seq_len,
                          dropout=self.dropout, tie_embeddings=self.tie_embeddings, **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A TrainConfig from a checkpoint's train_config (older ones call max_seq_len block_size)."""
        d = dict(d)
        if "block_size" in d:
            d["max_seq_len"] = d.pop("block_size")
        return cls(**d)


# ---- optimizer and schedule -------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms); the fused kernel where there is one."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to lr * min_lr_ratio at progress 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


# ---- evaluation -------------------------------------------------------------------------------

def val_windows(n_tokens: int, max_seq_len: int, limit: int | None = None) -> np.ndarray:
    """Start offsets of non-overlapping windows over the validation ids; a fixed spread-out subset if limited."""
    check_enough_tokens(n_tokens, max_seq_len, "validation")
    starts = np.arange(0, n_tokens - max_seq_len, max_seq_len)
    if limit is not None and limit < len(starts):
        starts = starts[np.linspace(0, len(starts) - 1, limit).astype(int)]
    return starts


@torch.no_grad()
def sum_loss(model: Llama, ids: np.ndarray, starts: np.ndarray, max_seq_len: int, device, autocast,
             batch_size: int = 32) -> tuple[float, int]:
    """(total nats, tokens scored) of next-token prediction over the given windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = windows_at(ids, starts[i:i + batch_size], max_seq_len, device)
        with autocast:
            logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()  # fp32 logits
        count += y.numel()
    model.train()
    return total, count


def per_char(total_nats: float, tokens_scored: int, n_tokens: int, n_chars: int) -> float:
    """Nats per character: the mean loss per token times tokens per character of the text."""
    return total_nats / tokens_scored * n_tokens / n_chars


# ---- distributed ------------------------------------------------------------------------------

def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size). Under torchrun, join the process group (NCCL for GPUs, Gloo for CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def gather_from_ranks(obj, world: int) -> list:
    """Every rank's `obj` (e.g. RNG states), so a resumed multi-GPU run continues as each rank would have."""
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


# ---- the run ----------------------------------------------------------------------------------

class Trainer:
    """One run: the model, optimizer, counters and history; `run()` trains until steps or time run out."""

    # settings a resumed run takes from the command line; everything else comes from the checkpoint
    RESUME_MAY_CHANGE = ("max_steps", "max_seconds", "device", "dtype", "progress", "out_dir", "compile",
                         "eval_interval")

    def __init__(self, cfg: TrainConfig, data: TokenData | None = None, resume: bool = False, callback=None):
        cfg.validate()
        ckpt = load_checkpoint(cfg.out_dir) if resume else None
        if ckpt is not None:
            given = {k: getattr(cfg, k) for k in self.RESUME_MAY_CHANGE}
            cfg = TrainConfig.from_dict({**ckpt["train_config"], **given})
        self.cfg, self.out, self.callback = cfg, Path(cfg.out_dir), callback
        self.device = pick_device(cfg.device)
        self.rank, self.world = setup_distributed(self.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.data = data or prepare_data(cfg.dataset, cfg.tokenizer)
        check_enough_tokens(len(self.data.train), cfg.max_seq_len, "training")
        self.eval_starts = val_windows(len(self.data.val), cfg.max_seq_len, cfg.eval_windows)
        torch.manual_seed(cfg.seed + self.rank)
        self.model = Llama(cfg.model_config(self.data.tokenizer.vocab_size)).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.tokens_seen, self.seconds, self.history = 0, 0, 0.0, []
        if ckpt is not None:
            self.restore(ckpt)
        self.net = self._wrap(self.model)
        use_amp = self.dtype != torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype) if use_amp else nullcontext()

    def _wrap(self, model: Llama) -> torch.nn.Module:
        """What the training step calls: the model, compiled and/or wrapped for DDP if asked."""
        net = torch.compile(model) if self.cfg.compile else model
        if self.world > 1:
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return net

    # ---- one step -----------------------------------------------------------------------------

    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step over grad_accum micro-batches: (mean loss as a tensor, no sync; the lr used)."""
        cfg = self.cfg
        lr = lr_at(self.progress(), self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            index = (self.step * cfg.grad_accum + micro) * self.world + self.rank  # ranks take disjoint windows
            x, y = epoch_batch(self.data.train, cfg.batch_size, cfg.max_seq_len, index, seed=cfg.seed,
                               device=self.device, split="training")
            last = micro == cfg.grad_accum - 1
            sync = nullcontext() if last or self.world == 1 else self.net.no_sync()  # DDP: all-reduce once
            with sync, self.autocast:
                logits = self.net(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) / cfg.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return total, lr

    def progress(self) -> float:
        """Fraction of the decay phase done: steps after warmup, or time when a time budget runs out first."""
        cfg = self.cfg
        p = (self.step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        if cfg.max_seconds:
            p = max(p, self.seconds / cfg.max_seconds)
        return p

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.max_seq_len * self.cfg.grad_accum * self.world

    # ---- evaluate and save --------------------------------------------------------------------

    def evaluate(self, full: bool = False) -> dict:
        """Validation loss in nats per token and per character (fixed windows, or the whole split)."""
        d, T = self.data, self.cfg.max_seq_len
        starts = val_windows(len(d.val), T) if full else self.eval_starts
        total, scored = sum_loss(self.model, d.val, starts, T, self.device, self.autocast)
        return {"val_loss": total / scored, "val_loss_per_char": per_char(total, scored, len(d.val), d.val_chars)}

    def save(self) -> None:
        """Write ckpt.pt (atomically) and the tokenizer into out_dir; only rank 0 writes."""
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rng = {"torch": gather_from_ranks(torch.get_rng_state(), self.world),
               "cuda": gather_from_ranks(cuda_rng, self.world)}  # batches depend on the step alone
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_save({
            "config": self.model.config.to_dict(), "train_config": asdict(self.cfg),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step, "tokens_seen": self.tokens_seen,
            "seconds": self.seconds, "history": self.history, "tokenizer": self.data.tokenizer.name,
            "dataset": self.data.source, "rng": rng,
        }, self.out / CKPT_FILE)
        self.data.tokenizer.save(self.out)

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint: weights, optimizer, counters, history and RNG states."""
        tok = self.data.tokenizer
        if ckpt["tokenizer"] != tok.name or ckpt["config"]["vocab_size"] != tok.vocab_size:
            raise ValueError(f"checkpoint was trained with tokenizer {ckpt['tokenizer']} "
                             f"({ckpt['config']['vocab_size']} ids) but the data gives {tok.name} ({tok.vocab_size} "
                             "ids): resume with the same --tokenizer and --dataset")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when the saved run did not use fp16
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.tokens_seen = ckpt["step"], ckpt["tokens_seen"]
        self.seconds, self.history = ckpt["seconds"], ckpt["history"]
        mine = lambda states: states[self.rank] if self.rank < len(states) else states[0]
        torch.set_rng_state(mine(ckpt["rng"]["torch"]))
        if self.device.type == "cuda" and ckpt["rng"]["cuda"][0] is not None:
            torch.cuda.set_rng_state(mine(ckpt["rng"]["cuda"]), self.device)

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        """Train until max_steps or max_seconds; evaluate and save every eval_interval steps and at the end."""
        sync_every = 1 if self.device.type != "cuda" else 20  # on GPUs, let the CPU run ahead
        bar, pending = self._progress_bar(), []
        start = time.perf_counter() - self.seconds  # a resumed run continues its clock
        while not self.done():
            pending.append(self.train_step())
            self.seconds = self._clock(start)
            at_eval = self.step % self.cfg.eval_interval == 0 and not self.done()  # finish() does the last
            if len(pending) >= sync_every or at_eval or self.done():
                self.record(pending, bar)
                pending = []
            if at_eval:
                self.history[-1].update(self.evaluate())
                self.save()
            if self.callback is not None and self.callback(self):
                break
        self.record(pending, bar)
        bar.close()
        return self.finish()

    def done(self) -> bool:
        """Out of steps or out of time."""
        cfg = self.cfg
        return self.step >= cfg.max_steps or (cfg.max_seconds is not None and self.seconds >= cfg.max_seconds)

    def _clock(self, start: float) -> float:
        """Seconds of training so far; under DDP every rank takes rank 0's, so all agree on the lr and the end."""
        seconds = time.perf_counter() - start
        if self.world > 1:
            t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
            dist.broadcast(t, src=0)
            seconds = t.item()
        return seconds

    def record(self, pending: list[tuple[torch.Tensor, float]], bar) -> None:
        """Move pending (loss, lr) pairs to the history (one host sync), stopping the run on NaN or infinity."""
        if not pending:
            return
        first_step = self.step - len(pending) + 1
        values = torch.stack([loss for loss, _ in pending]).tolist()
        for i, (loss, (_, lr)) in enumerate(zip(values, pending)):
            if not math.isfinite(loss):
                kept = self.out / CKPT_FILE
                raise FloatingPointError(
                    f"training loss became {loss} at step {first_step + i}: stopped. The last good checkpoint "
                    f"is {kept if kept.exists() else 'none (no checkpoint was written yet)'}. Lower --lr "
                    f"(now {self.cfg.lr}), raise --warmup-steps or use --dtype fp32, then --resume or start over.")
            self.history.append({"step": first_step + i, "tokens": (first_step + i) * self.tokens_per_step,
                                 "train_loss": loss, "lr": lr})
        bar.update(self.step - bar.n)
        last = self.history[-1]
        bar.set_postfix(loss=f"{last['train_loss']:.3f}", lr=f"{last['lr']:.1e}",
                        tok_s=f"{self.tokens_seen / max(self.seconds, 1e-9):,.0f}")

    def _progress_bar(self):
        from tqdm.auto import tqdm
        return tqdm(total=self.cfg.max_steps, initial=self.step, disable=not self.cfg.progress or self.rank != 0,
                    desc="train", unit="step", dynamic_ncols=True)

    def finish(self) -> dict:
        """Evaluate on the whole validation split, save, and write metrics.json."""
        final = self.evaluate(full=True)
        if self.history:
            self.history[-1].update(final)
        self.save()
        metrics = {
            "steps": self.step, "tokens_seen": self.tokens_seen, "wall_seconds": round(self.seconds, 3),
            "tokens_per_second": self.tokens_seen / max(self.seconds, 1e-9), **final,
            "world_size": self.world, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "params": self.model.num_params(), "dataset": self.data.source, "tokenizer": self.data.tokenizer.name,
            "train_config": asdict(self.cfg), "history": self.history,
        }
        if self.rank == 0:
            atomic_write(self.out / METRICS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
        return metrics


def train(cfg: TrainConfig, *, data: TokenData | None = None, resume: bool = False, callback=None) -> dict:
    """Train a model as `cfg` says; returns the metrics also written to out_dir/metrics.json.

    callback(trainer) runs after every step; returning True stops the run (it is then saved).
    """
    try:
        return Trainer(cfg, data=data, resume=resume, callback=callback).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
