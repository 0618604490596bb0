"""Training: AdamW, warmup + cosine, mixed precision, accumulation, exact resume, atomic checkpoints, DDP.

`train(TrainConfig(...))` is the whole job; `python -m utils train` is a thin layer over it.
A run writes ckpt.pt, the tokenizer and metrics.json into `out_dir` (`utils.runs`).

The loop (`Trainer.run`) is nanoGPT's: take a batch, forward, backward, clip, step; every
`eval_interval` steps measure the validation loss and save a checkpoint; at the end evaluate on
the whole validation split and save.

Nothing trained is lost: a folder holding a run is continued (resume) or restarted (overwrite) only
when asked, one process at a time (`utils.runs.claim_run_folder`); Ctrl-C finishes the step and saves,
and resuming from any saved step continues exactly as if the run had never stopped. Several GPUs
(torchrun) train one run through `utils.distributed`.
"""

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import TokenData, check_enough_tokens, epoch_batch, prepare_data, windows_at
from .device import dtype_reason, keep_freed_memory, pick_device, pick_dtype
from .distributed import (
    gather_from_ranks,
    leave_process_group,
    max_over_ranks,
    setup_distributed,
    wait_for_all_ranks,
    wrap_ddp,
)
from .files import atomic_write
from .finetune import finetune_config, load_init
from .lora import apply_lora, check_targets, trainable_params
from .model import Llama, LlamaConfig, get_config
from .runs import (
    CKPT_FILE,
    METRICS_FILE,
    StopSignals,
    atomic_save,
    claim_run_folder,
    kept_settings,
    load_checkpoint,
    remove_created,
    resume_config,
)
from .tokenizer import load_tokenizer

MAX_PASSES = 16  # passes over a small training split before `announce` warns of memorising (lesson 6 caps runs here)


def arg(default, help: str):
    """A TrainConfig field with its --help text: the command line is built from these."""
    return field(default=default, metadata={"help": help})


def model_arg(help: str):
    """A TrainConfig field that overrides the preset's value of the LlamaConfig field of the same name."""
    return field(default=None, metadata={"help": help, "model": True})


@dataclass
class TrainConfig:
    # data
    dataset: str = arg("tinyshakespeare", "text source: tinyshakespeare, tinystories, hf:<owner>/<name>[:column"
                       "[:split]], an http(s) URL, or a local .txt/.md/.jsonl/.json/.csv/.parquet file or folder "
                       "of .txt files")
    tokenizer: str = arg("bpe:1024", "char, bpe:<vocab_size> (trained on the training split), or a tiktoken "
                         "encoding (gpt2, cl100k_base, o200k_base); with --init-from, the checkpoint's own")
    # finetuning (utils/finetune.py): start from a trained model, all its weights trained or LoRA adapters only
    init_from: str | None = arg(None, "finetune this checkpoint instead of training from random weights: a run "
                                "folder, an HF folder or hub id, Meta, llama2.c or a .gguf file; its shape and "
                                "tokenizer come with it")
    lora_rank: int | None = arg(None, "with --init-from: train only LoRA adapters of this rank (utils/lora.py), "
                                "the model itself stays frozen")
    lora_alpha: float | None = arg(None, "LoRA's scale: the update is (alpha / rank) B A (default: 2 * rank)")
    lora_targets: str = arg("wq,wk,wv,wo", "the projections LoRA adapts, from wq,wk,wv,wo,w1,w2,w3")
    # model: a preset, then overrides (None keeps the preset's value)
    preset: str = arg("tiny", "model shape to start from (utils.model.PRESETS): smoke, tiny, small, ...")
    dim: int | None = model_arg("width of the residual stream (overrides the preset)")
    n_layers: int | None = model_arg("number of transformer blocks (overrides the preset)")
    n_heads: int | None = model_arg("number of query heads (overrides the preset)")
    n_kv_heads: int | None = model_arg("number of key/value heads; must divide n_heads (overrides the preset)")
    init_std: float | None = model_arg("std of the normal initial weights (overrides the preset; tiny: 0.04)")
    dropout: float = arg(0.0, "dropout probability on attention and residual branches")
    tie_embeddings: bool = arg(False, "share one matrix between the token embedding and the output layer")
    max_seq_len: int = arg(128, "context length in tokens: the training windows and the model's max_seq_len (with "
                           "--init-from: the checkpoint's, at most 1024; this may shorten it)")
    # optimisation
    batch_size: int = arg(32, "sequences per micro-batch")
    grad_accum: int = arg(1, "micro-batches accumulated per optimizer step")
    max_steps: int = arg(750, "stop after this many optimizer steps (the cosine schedule ends here)")
    max_seconds: float | None = arg(None, "stop after this many seconds of training, whichever comes first; "
                                    "the schedule then follows the clock")
    lr: float = arg(4e-3, "peak learning rate (with --init-from, unless given: 1e-4, with LoRA 2e-3)")
    min_lr_ratio: float = arg(0.0, "the cosine schedule decays to lr * min_lr_ratio")
    warmup_steps: int = arg(50, "steps of linear warmup (with --init-from, unless given: 0)")
    weight_decay: float = arg(1.0, "AdamW weight decay (matrices only); strong, since 1M parameters memorise "
                              "1 MB of text (benchmarks/train_shakespeare.md); with --init-from, unless given: 0")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the gradient norm to this value")
    # evaluation and checkpoints
    eval_interval: int = arg(250, "validate and write a checkpoint every this many steps")
    eval_windows: int = arg(64, "validation windows used during training (the final evaluation uses them all)")
    # system
    device: str = arg("auto", "auto (cuda, then mps, then cpu), or a device such as cpu, cuda, cuda:1, mps")
    dtype: str = arg("auto", "auto (bf16 where the hardware has it: GPUs since Ampere, CPUs with AMX or "
                     "AVX512-BF16; fp16 + loss scaling on older GPUs; else fp32), fp32, bf16, fp16")
    compile: bool = arg(False, "compile the model with torch.compile (faster on recent GPUs, slow to start)")
    seed: int = arg(1337, "random seed for initialisation, batches and dropout")
    out_dir: str = arg("out", "folder for ckpt.pt, the tokenizer and metrics.json")
    progress: bool = arg(True, "show a progress bar, a summary of the run at its start and each evaluation")

    def validate(self) -> None:
        """Raise ValueError, saying what to change, for settings no run can use."""
        positive = ("max_seq_len", "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_windows")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:  # max_seq_len None: the checkpoint's
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)} "
                                 f"(--{name.replace('_', '-')} on the command line)")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr} and {self.min_lr_ratio}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be one of auto, fp32, bf16, fp16, got {self.dtype!r}")
        if self.lora_rank is not None:
            check_targets(self.lora_targets)
            if self.lora_alpha is not None and self.lora_alpha <= 0:
                raise ValueError(f"--lora-alpha must be > 0, got {self.lora_alpha}")

    def model_config(self, vocab_size: int) -> LlamaConfig:
        overrides = {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}
        return get_config(self.preset, vocab_size=vocab_size, max_seq_len=self.max_seq_len,
                          dropout=self.dropout, tie_embeddings=self.tie_embeddings, **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A TrainConfig from a checkpoint's train_config (older ones call max_seq_len block_size)."""
        d = dict(d)
        if "block_size" in d:
            d["max_seq_len"] = d.pop("block_size")
        return cls(**d)


MODEL_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("model"))  # dim, n_layers, ...


# ---- optimizer and schedule -------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms); the fused kernel where there is one."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """The learning rate of optimizer step `step`: linear warmup over warmup_steps, then cosine from lr down to
    lr * min_lr_ratio at max_steps, or sooner when max_seconds runs out first (`seconds` of training so far)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)  # of the decay phase
    if cfg.max_seconds:
        progress = max(progress, seconds / cfg.max_seconds)
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


# ---- the run ----------------------------------------------------------------------------------

class Trainer:
    """One run: the model, optimizer, counters and history; `run()` trains until steps or time run out.

    The run folder is claimed first, before any work (`claim_run_folder`): a folder holding a run needs
    resume=True or overwrite=True, and one process at a time may train into it. An overwritten run is
    replaced by this one's first checkpoint (`save`), not before.
    """

    def __init__(self, cfg: TrainConfig, data: TokenData | None = None, resume: bool = False, callback=None,
                 overwrite: bool = False, given: set[str] | None = None):
        cfg = cfg if resume else finetune_config(cfg, given)  # a resumed run's settings come from its checkpoint
        cfg.validate()
        self.out, self.callback, self.stop_signal = Path(cfg.out_dir), callback, None
        self.overwriting, self.saved_step = overwrite, None  # saved_step: of this run's latest checkpoint
        rank = int(os.environ.get("RANK", 0))  # the process group does not exist yet
        self.lock, self.created = claim_run_folder(self.out, resume=resume, overwrite=overwrite, rank=rank)
        try:
            self._setup(cfg, data, load_checkpoint(self.out) if resume else None, given)
        except BaseException:
            self.release()
            raise

    def _setup(self, cfg: TrainConfig, data: TokenData | None, ckpt: dict | None, given: set[str] | None) -> None:
        """Everything but the folder: settings, device, data, model, optimizer; the checkpoint's state if resuming."""
        changes = {}
        if ckpt is not None:
            cfg, changes = resume_config(cfg, ckpt["train_config"], given)
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.rank, self.world = setup_distributed(self.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on each step's fresh activations: 8-14% faster
        self.data, model = self._data_and_model(cfg, data, ckpt)
        check_enough_tokens(len(self.data.train), model.config.max_seq_len, "training")
        self.eval_starts = val_windows(len(self.data.val), model.config.max_seq_len, cfg.eval_windows)
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.tokens_seen, self.seconds, self.history = 0, 0, 0.0, []
        self.init_eval = ckpt.get("init_eval") if ckpt is not None else None  # the loss before step 0
        if ckpt is not None:
            self.restore(ckpt)
            self._check_not_finished()
            self._say_resuming(changes)
        self.net = self._wrap(self.model)
        use_amp = self.dtype != torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype) if use_amp else nullcontext()

    def _data_and_model(self, cfg: TrainConfig, data: TokenData | None, ckpt: dict | None) -> tuple[TokenData, Llama]:
        """The data and the model: from scratch, from --init-from, or (resuming a finetune) the checkpoint's shape.

        A finetune tokenizes the data with the checkpoint's tokenizer; resuming, the run folder holds both the
        weights and the tokenizer, so the --init-from checkpoint is not read again (it may have moved).
        """
        if not cfg.init_from:
            data = data or prepare_data(cfg.dataset, cfg.tokenizer)
            torch.manual_seed(cfg.seed + self.rank)
            return data, Llama(cfg.model_config(data.tokenizer.vocab_size))
        if ckpt is None:
            model, tok = load_init(cfg.init_from, cfg.max_seq_len)
            cfg.max_seq_len = model.config.max_seq_len  # None: the checkpoint's context (at most 1024)
        else:
            model, tok = Llama(LlamaConfig(**ckpt["config"])), load_tokenizer(self.out)
        if data is not None and data.tokenizer.name != tok.name:
            raise ValueError(f"the data was tokenized with {data.tokenizer.name} but {cfg.init_from} uses {tok.name}: "
                             "pass data=None (or prepare_data(dataset, tokenizer) with the checkpoint's tokenizer)")
        data = data or prepare_data(cfg.dataset, tok)
        torch.manual_seed(cfg.seed + self.rank)
        if cfg.lora_rank:
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        return data, model

    def _wrap(self, model: Llama) -> torch.nn.Module:
        """What the training step calls: the model, compiled and/or wrapped for DDP if asked."""
        net = torch.compile(model) if self.cfg.compile else model
        return wrap_ddp(net, self.device) if self.world > 1 else net

    def release(self) -> None:
        """Let other processes train into the folder (run() does this when it ends); remove it if this run created
        it and wrote nothing there."""
        if self.lock is not None:
            self.lock.release()
        remove_created(self.created)

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        """Train until max_steps or max_seconds; evaluate and save every eval_interval steps and at the end.

        A first Ctrl-C (SIGINT) or SIGTERM finishes the step, saves, and returns (metrics["interrupted"]).
        """
        try:
            with self.lock or nullcontext(), StopSignals(announce=self.rank == 0) as signals:
                self.announce()
                if self.step == 0 and self.init_eval is None:  # where the run starts, on the windows of the last
                    self.init_eval = self.evaluate(full=True)
                    self.say(f"before training: val loss {self.init_eval['val_loss']:.3f} nats/token, "
                             f"{self.init_eval['val_loss_per_char']:.3f} nats/char")
                self._loop(signals)
                return self.finish()
        finally:
            remove_created(self.created)  # failed before its first save into a folder it created

    def _loop(self, signals: StopSignals) -> None:
        sync_every = 1 if self.device.type != "cuda" else 20  # on GPUs, let the CPU run ahead
        pending = []
        with self._progress_bar() as bar:  # closed even on an error, ending its line: the error gets its own
            start = time.perf_counter() - self.seconds  # a resumed run continues its clock
            first_step, first_seconds = self.step, self.seconds
            while not self.done():
                pending.append(self.train_step())
                self.seconds, stopping = self._clock(start, signals.signal is not None)
                at_eval = self.step % self.cfg.eval_interval == 0 and not self.done()  # finish() does the last
                if len(pending) >= sync_every or at_eval or self.done() or stopping:
                    self.record(pending, bar)
                    pending = []
                if self.step - first_step == 10:
                    self._say_time_left(first_step, first_seconds)
                if at_eval:
                    self.history[-1].update(self.evaluate())
                    self.say(f"step {self.step}: val loss {self.history[-1]['val_loss']:.3f} nats/token, "
                             f"{self.history[-1]['val_loss_per_char']:.3f} nats/char")
                    self.save()
                if self.callback is not None and self.callback(self):
                    break
                if stopping:  # under DDP every rank stops at the same step (`_clock`)
                    self.stop_signal = signals.signal or signal.SIGINT
                    break
            self.record(pending, bar)

    def done(self) -> bool:
        """Out of steps or out of time."""
        cfg = self.cfg
        return self.step >= cfg.max_steps or (cfg.max_seconds is not None and self.seconds >= cfg.max_seconds)

    def _clock(self, start: float, stopping: bool) -> tuple[float, bool]:
        """(seconds of training so far, stop now?). Under DDP all ranks agree on both (the latest clock, and a
        stop if any rank was asked), so they share the lr, the last step and the checkpoint step."""
        seconds, stop = max_over_ranks([time.perf_counter() - start, float(stopping)], self.device, self.world)
        return seconds, bool(stop)

    def record(self, pending: list[tuple[torch.Tensor, float]], bar) -> None:
        """Move pending (loss, lr) pairs to the history (one host sync), stopping the run on NaN or infinity."""
        if not pending:
            return
        first_step = self.step - len(pending) + 1
        values = torch.stack([loss for loss, _ in pending]).tolist()
        for i, (loss, (_, lr)) in enumerate(zip(values, pending)):
            if not math.isfinite(loss):
                raise FloatingPointError(self._diverged(loss, first_step + i))
            self.history.append({"step": first_step + i, "tokens": (first_step + i) * self.tokens_per_step,
                                 "train_loss": loss, "lr": lr})
        bar.update(self.step - bar.n)
        last = self.history[-1]
        bar.set_postfix(loss=f"{last['train_loss']:.3f}", lr=f"{last['lr']:.1e}",
                        tok_s=f"{self.tokens_seen / max(self.seconds, 1e-9):,.0f}")

    def _diverged(self, loss: float, step: int) -> str:
        """What to do after a NaN or infinite loss: --resume only from a checkpoint this run wrote."""
        said = f"training loss became {loss} at step {step}: stopped"
        if self.saved_step is not None:
            return (f"{said}. The last good checkpoint is {self.out / CKPT_FILE} (step {self.saved_step}). Lower --lr "
                    f"(now {self.cfg.lr}), raise --warmup-steps or use --dtype fp32, then --resume, or start again "
                    "with --overwrite.")
        kept = f" with --overwrite (the earlier run in {self.out} is kept)" if (self.out / CKPT_FILE).exists() else ""
        return (f"{said} before its first checkpoint. Lower --lr (now {self.cfg.lr}) or raise --warmup-steps "
                f"(now {self.cfg.warmup_steps}), and start again{kept}.")

    # ---- one step -----------------------------------------------------------------------------

    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step over grad_accum micro-batches: (mean loss as a tensor, no sync; the lr used)."""
        cfg, T = self.cfg, self.model.config.max_seq_len
        lr = lr_at(self.step, cfg, self.seconds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            index = (self.step * cfg.grad_accum + micro) * self.world + self.rank  # ranks take disjoint windows
            x, y = epoch_batch(self.data.train, cfg.batch_size, T, index, seed=cfg.seed, device=self.device,
                               split="training")
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

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.model.config.max_seq_len * self.cfg.grad_accum * self.world

    # ---- evaluate -----------------------------------------------------------------------------

    def evaluate(self, full: bool = False) -> dict:
        """Validation loss in nats per token and per character (fixed windows, or the whole split)."""
        d, T = self.data, self.model.config.max_seq_len
        starts = val_windows(len(d.val), T) if full else self.eval_starts
        total, scored = sum_loss(self.model, d.val, starts, T, self.device, self.autocast)
        return {"val_loss": total / scored, "val_loss_per_char": per_char(total, scored, len(d.val), d.val_chars)}

    # ---- save and restore ---------------------------------------------------------------------

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
            "dataset": self.data.source, "rng": rng, "init_eval": self.init_eval, "lora": self.lora_settings(),
        }, self.out / CKPT_FILE)
        if self.overwriting:  # the old run is gone now: so are its numbers
            (self.out / METRICS_FILE).unlink(missing_ok=True)
            self.overwriting = False
        self.saved_step = self.step
        self.data.tokenizer.save(self.out)

    def lora_settings(self) -> dict | None:
        """What `load_ours` needs to merge a LoRA run's adapters (W, A, B are saved apart, for an exact resume)."""
        cfg = self.cfg
        return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets} if cfg.lora_rank else None

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint: weights, optimizer, counters, history and RNG states."""
        tok = self.data.tokenizer
        if ckpt["tokenizer"] != tok.name or ckpt["config"]["vocab_size"] < tok.vocab_size:
            raise ValueError(f"checkpoint was trained with tokenizer {ckpt['tokenizer']} "
                             f"({ckpt['config']['vocab_size']} ids) but the data gives {tok.name} ({tok.vocab_size} "
                             "ids): resume with the same --tokenizer and --dataset")
        if ckpt.get("dataset", self.data.source) != self.data.source:
            raise ValueError(f"checkpoint was trained on {ckpt['dataset']} but the data given is {self.data.source}: "
                             "resume with the same data")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.saved_step = ckpt["step"]
        if ckpt["scaler"]:  # empty when the saved run did not use fp16
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.tokens_seen = ckpt["step"], ckpt["tokens_seen"]
        self.seconds, self.history = ckpt["seconds"], ckpt["history"]
        mine = lambda states: states[self.rank] if self.rank < len(states) else states[0]
        torch.set_rng_state(mine(ckpt["rng"]["torch"]))
        if self.device.type == "cuda" and ckpt["rng"]["cuda"][0] is not None:
            torch.cuda.set_rng_state(mine(ckpt["rng"]["cuda"]), self.device)

    def _check_not_finished(self) -> None:
        cfg = self.cfg
        if self.done():
            timed_out = self.step < cfg.max_steps  # it stopped on --max-seconds: more steps alone would not run
            limit = f", {self.seconds:.0f} s of max_seconds {cfg.max_seconds:g}" if cfg.max_seconds else ""
            more = "a larger --max-seconds (and --max-steps if you like)" if timed_out else "a larger --max-steps"
            raise ValueError(f"the run in {self.out} already finished (step {self.step} of max_steps {cfg.max_steps}"
                             f"{limit}): pass {more} to train further")

    # ---- the end ------------------------------------------------------------------------------

    def finish(self) -> dict:
        """Evaluate on the whole validation split, save, and write metrics.json.

        After a stop signal the evaluation uses the usual eval_windows (the user is waiting) and stays out
        of the history, so a resumed run's history is that of a run never stopped.
        """
        stopped = self.stop_signal is not None
        final = self.evaluate(full=not stopped)
        if self.history and not stopped:
            self.history[-1].update(final)
        self.save()
        metrics = {
            "steps": self.step, "tokens_seen": self.tokens_seen, "wall_seconds": round(self.seconds, 3),
            "tokens_per_second": self.tokens_seen / max(self.seconds, 1e-9), **final,
            "world_size": self.world, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "init_val_loss": (self.init_eval or {}).get("val_loss"),
            "init_val_loss_per_char": (self.init_eval or {}).get("val_loss_per_char"),
            "params": self.model.num_params(), "trainable_params": trainable_params(self.model),
            "dataset": self.data.source, "tokenizer": self.data.tokenizer.name,
            "interrupted": stopped, "stop_signal": signal.Signals(self.stop_signal).name if stopped else None,
            "train_config": asdict(self.cfg), "history": self.history,
        }
        if self.rank == 0:
            atomic_write(self.out / METRICS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
        if stopped:
            self.note(f"stopped by {metrics['stop_signal']} after step {self.step} of {self.cfg.max_steps}: saved "
                      f"{self.out / CKPT_FILE}; --resume continues it exactly (in Python: train(cfg, resume=True))")
        return metrics

    # ---- what the run says --------------------------------------------------------------------

    def note(self, message: str) -> None:
        """A line for the user (rank 0), printed without breaking the progress bar."""
        if self.rank == 0:
            from tqdm.auto import tqdm
            tqdm.write(message)

    def say(self, message: str) -> None:
        """A note only when progress is on: quiet runs (tests, benchmarks) stay quiet."""
        if self.cfg.progress:
            self.note(message)

    def _say_resuming(self, changes: dict) -> None:
        cfg = self.cfg
        self.note(f"resuming {self.out / CKPT_FILE} from step {self.step} of {cfg.max_steps} "
                  f"({self.tokens_seen:,} tokens seen, {self.seconds:.0f} s of training)")
        self.note(f"  kept from the checkpoint: {kept_settings(cfg, changes)}")
        shown = [f"{name} {old} -> {new}" for name, (old, new) in changes.items() if name != "progress"]
        if shown:
            self.note(f"  changed: {', '.join(shown)}")

    def announce(self) -> None:
        """What the run will do: device and precision, model, tokenizer, data, steps, where it saves."""
        cfg, d, tok = self.cfg, self.data, self.data.tokenizer
        n, total = self.model.num_params(), cfg.max_steps * self.tokens_per_step
        limit = f" or {cfg.max_seconds:g} s, whichever comes first" if cfg.max_seconds else ""
        self.say(f"device {self.device}, {str(self.dtype).removeprefix('torch.')}: "
                 f"{dtype_reason(cfg.dtype, self.device, self.dtype)}")
        model = f"{cfg.init_from} (finetuned)" if cfg.init_from else cfg.preset
        self.say(f"model {model}: {n:,} parameters, context {self.model.config.max_seq_len}; "
                 f"tokenizer {tok.name}: {tok.vocab_size:,} ids")
        if cfg.lora_rank:
            trained = trainable_params(self.model)
            self.say(f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {cfg.lora_targets}: {trained:,} "
                     f"trainable parameters ({trained / n:.2%}); the rest is frozen")
        self.say(f"data {d.source}: {len(d.train):,} training tokens ({len(d.train) / n:.2g} per parameter), "
                 f"{len(d.val):,} validation tokens")
        self.say(f"steps {self.step} to {cfg.max_steps}{limit}, {self.tokens_per_step:,} tokens each "
                 f"({total / len(d.train):.1f} epochs); every {cfg.eval_interval} steps it evaluates and saves "
                 f"{self.out / CKPT_FILE}")
        self._warn_if_memorising(n, total)

    def _warn_if_memorising(self, n_params: int, total_tokens: int) -> None:
        """One line when the planned steps pass over a small training split more than MAX_PASSES times (lesson 6,
        section 1): the last checkpoint, the one saved, would be a model that has memorised its text."""
        n_train, cfg = len(self.data.train), self.cfg
        passes = total_tokens / n_train
        steps = max(math.ceil(MAX_PASSES * n_train / self.tokens_per_step), 2 * cfg.warmup_steps)  # as lesson 6
        if cfg.max_seconds is None and passes > MAX_PASSES and n_train < 20 * n_params and steps < cfg.max_steps:
            self.note(f"warning: {passes:.0f} passes over the same {n_train:,} training tokens: expect the model to "
                      f"memorise them (validation loss rising while training loss falls), and the last checkpoint "
                      f"with it. --max-steps {steps} makes {steps * self.tokens_per_step / n_train:.0f} passes; "
                      "more text is better still")

    def _say_time_left(self, first_step: int, first_seconds: float) -> None:
        per_step = (self.seconds - first_seconds) / max(self.step - first_step, 1)
        left = (self.cfg.max_steps - self.step) * per_step
        if self.cfg.max_seconds:
            left = min(left, max(self.cfg.max_seconds - self.seconds, 0.0))
        self.say(f"{per_step * 1000:,.0f} ms per step: about {fmt_duration(left)} to go")

    def _progress_bar(self):
        from tqdm.auto import tqdm
        return tqdm(total=self.cfg.max_steps, initial=self.step, disable=not self.cfg.progress or self.rank != 0,
                    desc="train", unit="step", dynamic_ncols=True)


def train(cfg: TrainConfig, *, data: TokenData | None = None, resume: bool = False, overwrite: bool = False,
          callback=None, given: set[str] | None = None) -> dict:
    """Train a model as `cfg` says; returns the metrics also written to out_dir/metrics.json.

    A folder that already holds a run needs resume=True (continue it) or overwrite=True (start again; the
    old run stays until the new one saves its first checkpoint). On resume, the fields of `cfg` named in
    `given` are the ones asked for, whatever their value (the command line passes the flags typed); with
    given=None, those that differ from TrainConfig's defaults: train(replace(cfg, preset="tiny"),
    resume=True) keeps the run's preset, train(..., given={"preset"}) refuses it.
    callback(trainer) runs after every step; returning True stops the run (it is then saved).
    Ctrl-C (or SIGTERM) finishes the step, saves, and returns the metrics with "interrupted": True;
    a second Ctrl-C raises KeyboardInterrupt at once (the last checkpoint stays intact).
    """
    try:
        metrics = Trainer(cfg, data=data, resume=resume, overwrite=overwrite, callback=callback, given=given).run()
        wait_for_all_ranks()
        return metrics
    finally:
        leave_process_group()


def fmt_duration(seconds: float) -> str:
    """4 s, 3.5 min, 2.1 h."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"
