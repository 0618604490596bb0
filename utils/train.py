"""Training: AdamW, warmup + cosine, mixed precision, accumulation, exact resume, atomic checkpoints.

`train(TrainConfig(...))` is the whole job; `python -m utils train` is a thin layer over it.
A run writes `ckpt.pt`, the tokenizer and `metrics.json` into `out_dir`.
"""

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .checkpoints import atomic_write, load_pretrained
from .data import TokenData, check_enough_tokens, epoch_batch, prepare_data, windows_at
from .model import Llama, LlamaConfig, get_config
from .tokenizer import load_tokenizer

CKPT_FILE = "ckpt.pt"
METRICS_FILE = "metrics.json"


@dataclass
class TrainConfig:
    # data
    dataset: str = "tinyshakespeare"        # a source for utils.data.load_text
    tokenizer: str = "bpe:1024"             # see utils.tokenizer.get_tokenizer
    # model: a preset, then overrides (None keeps the preset's value)
    preset: str = "tiny"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    init_std: float | None = None
    dropout: float = 0.0
    tie_embeddings: bool = False            # share the input embedding and the output layer
    block_size: int = 128                   # training context in tokens (the model's max_seq_len)
    # optimisation
    batch_size: int = 32                    # sequences per micro-batch
    grad_accum: int = 1                     # micro-batches per optimizer step
    max_steps: int = 750                    # defaults: ~145 s on a 2-core AMX CPU (benchmarks/train_shakespeare.md)
    max_seconds: float | None = None        # wall-clock budget; the schedule then follows time
    lr: float = 4e-3
    min_lr_ratio: float = 0.0               # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 1.0               # strong: 1M params memorise 1 MB of text (benchmarks/train_shakespeare.md)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation and checkpoints
    eval_interval: int = 250                # steps between validations (and checkpoints)
    eval_windows: int = 64                  # validation windows used during training
    # system
    device: str = "auto"                    # auto = cuda, then mps, then cpu
    dtype: str = "auto"                     # auto = bf16 where native (GPU, AMX CPU), fp16 on older GPUs, else fp32
    compile: bool = False
    seed: int = 1337
    out_dir: str = "out"
    progress: bool = True                   # tqdm bar

    def validate(self) -> None:
        positive = ("block_size", "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_windows")
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
        return get_config(self.preset, vocab_size=vocab_size, max_seq_len=self.block_size,
                          dropout=self.dropout, tie_embeddings=self.tie_embeddings, **overrides)


# ---- device and precision ---------------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; or exactly the device asked for."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but CUDA is not available: use --device cpu")
        if device.type == "cuda" and device.index is None:  # under torchrun, one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} asked for but MPS is not available: use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16_matmul() -> bool:
    """Does this CPU multiply bf16 matrices in hardware (Intel AMX, Sapphire Rapids and later)?"""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (GPUs since Ampere, CPUs with AMX), fp16 (with loss scaling) on
    older GPUs such as the T4, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)  # a T4 only emulates bf16
            return torch.bfloat16 if native else torch.float16
        if device.type == "cpu" and cpu_has_bf16_matmul():
            return torch.bfloat16  # AMX: 1.2-1.5x faster training steps (benchmarks/train_shakespeare.md)
        return torch.float32  # other CPUs emulate bf16 (slower than fp32); MPS: fp32 is safest
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


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

def val_windows(n_tokens: int, block_size: int, limit: int | None = None) -> np.ndarray:
    """Start offsets of non-overlapping windows over the validation ids; a fixed spread-out subset if limited."""
    check_enough_tokens(n_tokens, block_size, "validation")
    starts = np.arange(0, n_tokens - block_size, block_size)
    if limit is not None and limit < len(starts):
        starts = starts[np.linspace(0, len(starts) - 1, limit).astype(int)]
    return starts


@torch.no_grad()
def evaluate(model: Llama, ids: np.ndarray, starts: np.ndarray, block_size: int, device, autocast,
             batch_size: int = 32) -> tuple[float, int]:
    """(total nats, tokens scored) of next-token prediction over the given windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        x, y = windows_at(ids, s, block_size, device)
        with autocast:
            logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()  # fp32 logits
        count += y.numel()
    model.train()
    return total, count


def per_char(total_nats: float, tokens_scored: int, n_tokens: int, n_chars: int) -> float:
    """Nats per character: the mean loss per token times tokens per character of the text."""
    return total_nats / tokens_scored * n_tokens / n_chars


# ---- checkpoints ------------------------------------------------------------------------------

def atomic_save(obj, path: Path) -> None:
    """torch.save through `atomic_write`: a crash mid-write leaves the previous file intact."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(Path(path), write)


def load_checkpoint(out_dir: str | Path, map_location="cpu") -> dict:
    """The training state saved in out_dir/ckpt.pt."""
    path = Path(out_dir) / CKPT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train first (python -m utils train --out {out_dir}) "
                                "or point --out/--checkpoint at a folder that has one")
    return torch.load(path, map_location=map_location, weights_only=True)  # a downloaded pickle runs no code


def load_model(out_dir: str | Path, device="cpu") -> tuple[Llama, object]:
    """(model in eval mode, tokenizer) from a folder written by `train`."""
    return load_pretrained(out_dir, device=device), load_tokenizer(out_dir)


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


# ---- the training loop ------------------------------------------------------------------------

class Trainer:
    """Owns the model, optimizer and counters of one run; `run()` trains until steps or time run out."""

    def __init__(self, cfg: TrainConfig, data: TokenData | None = None, resume: bool = False, callback=None):
        cfg.validate()
        self.rank, self.world = setup_distributed(pick_device(cfg.device))
        self.out = Path(cfg.out_dir)
        self.callback = callback
        ckpt = load_checkpoint(self.out) if resume else None
        if ckpt is not None:  # the run's shape and data come from the checkpoint; budgets and machine from cfg
            keep = {"max_steps", "max_seconds", "device", "dtype", "progress", "out_dir", "compile", "eval_interval"}
            cfg = TrainConfig(**{**ckpt["train_config"], **{k: getattr(cfg, k) for k in keep}})
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.data = data or prepare_data(cfg.dataset, cfg.tokenizer)
        check_enough_tokens(len(self.data.train), cfg.block_size, "training")
        self.eval_starts = val_windows(len(self.data.val), cfg.block_size, cfg.eval_windows)
        torch.manual_seed(cfg.seed + self.rank)
        self.model = Llama(cfg.model_config(self.data.tokenizer.vocab_size)).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.tokens_seen, self.seconds, self.history = 0, 0, 0.0, []
        if ckpt is not None:
            self._restore(ckpt)
        self.net = torch.compile(self.model) if cfg.compile else self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.net, device_ids=ids)
        use_amp = self.dtype != torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype) if use_amp else nullcontext()

    def _restore(self, ckpt: dict) -> None:
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
            "dataset": self.data.source,
            "rng": rng,
        }, self.out / CKPT_FILE)
        self.data.tokenizer.save(self.out)

    def progress(self) -> float:
        """Fraction of the decay phase done: steps after warmup, or time when a time budget runs out first."""
        cfg = self.cfg
        p = (self.step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        if cfg.max_seconds:
            p = max(p, self.seconds / cfg.max_seconds)
        return p

    def _sync_clock(self) -> None:
        """Under DDP every rank takes rank 0's clock, so all agree on the lr and on when time is up."""
        if self.world > 1:
            t = torch.tensor([self.seconds], dtype=torch.float64, device=self.device)
            dist.broadcast(t, src=0)
            self.seconds = t.item()

    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step over grad_accum micro-batches: (mean loss as a tensor, no sync; the lr used)."""
        cfg = self.cfg
        lr = lr_at(self.progress(), self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            index = (self.step * cfg.grad_accum + micro) * self.world + self.rank  # ranks take disjoint windows
            x, y = epoch_batch(self.data.train, cfg.batch_size, cfg.block_size, index, seed=cfg.seed,
                               device=self.device, split="training")
            last = micro == cfg.grad_accum - 1
            sync = nullcontext() if last or self.world == 1 else self.net.no_sync()
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

    def validate(self, full: bool = False) -> dict:
        """Validation loss in nats per token and per character (fixed windows, or the whole split)."""
        d, T = self.data, self.cfg.block_size
        starts = val_windows(len(d.val), T) if full else self.eval_starts
        total, scored = evaluate(self.model, d.val, starts, T, self.device, self.autocast)
        return {"val_loss": total / scored, "val_loss_per_char": per_char(total, scored, len(d.val), d.val_chars)}

    def _record(self, pending: list[tuple[torch.Tensor, float]], first_step: int) -> None:
        """Move pending (loss, lr) pairs to the history (one host sync), stopping the run on NaN or infinity."""
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

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum * self.world

    def run(self) -> dict:
        """Train until max_steps or max_seconds; validate and checkpoint every eval_interval steps and at the end."""
        cfg = self.cfg
        sync_every = 1 if self.device.type != "cuda" else 20  # on GPUs, let the CPU run ahead
        bar = self._progress_bar()
        pending, start, stopped = [], time.perf_counter() - self.seconds, False
        while self.step < cfg.max_steps and not stopped:
            pending.append(self.train_step())
            self.seconds = time.perf_counter() - start
            self._sync_clock()
            out_of_time = cfg.max_seconds is not None and self.seconds >= cfg.max_seconds
            last = out_of_time or self.step == cfg.max_steps  # finish() validates and saves those
            at_eval = self.step % cfg.eval_interval == 0 and not last
            if len(pending) >= sync_every or at_eval or last:
                self._record(pending, self.step - len(pending) + 1)
                pending = []
                bar.update(self.step - bar.n)
                bar.set_postfix(loss=f"{self.history[-1]['train_loss']:.3f}", lr=f"{self.history[-1]['lr']:.1e}",
                                tok_s=f"{self.tokens_seen / max(self.seconds, 1e-9):,.0f}")
            if at_eval:
                self.history[-1].update(self.validate())
                self.save()
            if self.callback is not None and self.callback(self):
                stopped = True
            stopped = stopped or out_of_time
        if pending:
            self._record(pending, self.step - len(pending) + 1)
        bar.close()
        return self.finish()

    def _progress_bar(self):
        from tqdm.auto import tqdm
        return tqdm(total=self.cfg.max_steps, initial=self.step, disable=not self.cfg.progress or self.rank != 0,
                    desc="train", unit="step", dynamic_ncols=True)

    def finish(self) -> dict:
        """Evaluate on the whole validation split, save, and write metrics.json."""
        final = self.validate(full=True)
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


def config_fields() -> dict[str, object]:
    """Name -> default of every TrainConfig field (the command line is built from these)."""
    return {f.name: f.default for f in fields(TrainConfig)}
