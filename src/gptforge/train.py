"""The one training loop: accumulate, clip, step, schedule, evaluate, checkpoint, log.

Every objective runs through `train`: the objective is the `loss_fn` parameter (next-token cross-entropy by
default), so pretraining, fine-tuning and distillation never grow copies of this loop. Precision, compile and
activation checkpointing are applied to the built model from outside (distributed.py).

Read it bottom up: `train` -> `setup` (a `Run`: the fixed parts; a `TrainState`: the counters checkpoints keep)
-> `loop`, one screen that calls `train_step`, `evaluate_and_keep_best`, `save` and `stop_reason`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from gptforge.checkpoint import (MODEL_FILE, checkpoint_problem, find_resumable, load_sharded, load_trainer_state,
                                 read_config, resolve_checkpoint, save_checkpoint)
from gptforge.config import RunConfig, check_optimizer_parallel
from gptforge.data import BatchSampler, TokenData
from gptforge.distributed import (Dist, apply_activation_checkpointing, apply_compile, apply_ddp, apply_fsdp,
                                  close_distributed, grad_sync, init_distributed)
from gptforge.errors import GptforgeError
from gptforge.eval import bits_per_byte, token_byte_lengths, window_bytes
from gptforge.hardware import device_peak_flops, resolve_device
from gptforge.loader import load_checkpoint
from gptforge.outputs import check_creatable, check_not_input, is_artifact
from gptforge.model import GPT
from gptforge.optim import build_optimizer, lr_at
from gptforge.precision import autocast, autocast_dtype, resolve_bf16_gemm, resolve_precision, widen_bf16

IGNORE_INDEX = -100  # targets with this value (padding, prompt tokens) never count toward the loss
EVAL_SEED = 0  # validation windows are the same in every evaluation and every run, so losses compare


def next_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the target tokens of one micro-batch, and how many targets counted.

    Returning the sum (not the mean) lets the loop divide by the tokens of the whole accumulated step, so
    micro-batches with fewer real targets weigh less (the bug fixed in transformers PR #34191).
    """
    logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (y != IGNORE_INDEX).sum()


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int  # the step the run ended at (a resumed run counts from 0, not from where it resumed)
    tokens: int  # trained on in this call (a resumed run counts from where it resumed)
    seconds: float  # wall time of the optimizer steps, evaluation and checkpoints excluded
    first_val_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    stopped_by: str  # max_steps | max_time | max_tokens | early_stop | SIGINT | SIGTERM
    skipped_steps: int  # steps skipped for a non-finite loss or gradient

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def stopped_early(self) -> bool:
        return self.stopped_by != "max_steps"


# --- one optimizer step's forward and backward ------------------------------------------------------------

def forward_backward(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: LossFn,
                     device: torch.device, amp: torch.dtype | None, scaler=None, d: Dist | None = None) -> torch.Tensor:
    """Accumulate gradients over this rank's micro-batches; returns the step's loss per target token over
    all ranks (detached).

    Each micro-batch's summed loss is divided by the target tokens of the *whole* step (all micro-batches,
    all ranks), so k micro-batches of b sequences give exactly the gradient of one batch of k*b, ignored (-100)
    targets included. DDP and FSDP average gradients over ranks, hence the factor `world`. Gradients are
    reduced across ranks once, on the last micro-batch.
    """
    world = 1 if d is None else d.world
    n_targets = torch.tensor(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches), device=device)
    if d is not None:
        d.sum(n_targets)
    if int(n_targets) == 0:
        raise GptforgeError("a training step has no target tokens (every target is -100); check the loss masks")
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        with grad_sync(model, enabled=i == len(batches) - 1), autocast(device, amp):
            loss_sum, _ = loss_fn(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            loss = loss_sum * (world / n_targets)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach() / world
    return total if d is None else d.sum(total)


@torch.no_grad()
def evaluate(model: nn.Module, sampler: BatchSampler, n_batches: int, device: torch.device,
             amp: torch.dtype | None, loss_fn: LossFn = next_token_loss, d: Dist | None = None) -> float:
    """Mean loss per target token over batches 0..n_batches-1 of a fixed-seed sampler; ranks take turns."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    rank, world = (0, 1) if d is None else (d.rank, d.world)
    for k in range(rank, n_batches, world):
        x, y = sampler.batch(k)
        with autocast(device, amp):
            loss, n = loss_fn(model, x.to(device), y.to(device))
        total += loss.float()
        count += n
    if d is not None:
        d.sum(total)
        d.sum(count)
    model.train(was_training)
    return (total / count).item()


# --- state that resume restores ----------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG the loop may draw from, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignals:
    """SIGINT and SIGTERM set a flag that the loop checks after each step, so it stops at a step boundary
    and saves (a scheduler's preemption sends SIGTERM). A second SIGINT interrupts at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --- logging -----------------------------------------------------------------------------------------------

class Metrics:
    """The same scalars to `metrics.jsonl` and, when the tensorboard package is there, to `tb/` event files.

    On resume, records past the resumed step (written by the run that was killed) are dropped from both, so
    the files read as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool, note):
        self.path = run_dir / "metrics.jsonl"
        if start_step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif start_step == 0:
            self.path.unlink(missing_ok=True)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                note("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")
            else:
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step if start_step > 0 else None)

    def log(self, step: int, **scalars: float) -> None:
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(TB_TAGS.get(key, key), value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


TB_TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
    "mfu": "train/mfu", "peak_memory_gb": "train/peak_memory_gb", "tokens": "train/tokens",
    "skipped_steps": "train/skipped_steps", "val_loss": "val/loss", "val_ppl": "val/perplexity",
}


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory: allocated tensors on CUDA; the process's peak resident set elsewhere (an upper bound)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class Reporter:
    """A rich progress bar on a terminal (when `bar`); otherwise a plain line every 10 log intervals."""

    def __init__(self, total: int, start: int, bar: bool, quiet: bool = False):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True, quiet=quiet)  # ranks other than 0 print nothing
        self.bar = None
        if bar and self.console.is_terminal:
            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def step(self, step: int, info: str, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif force:
            self.note(f"step {step}: {info}")

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)  # log lines stay whole in files and CI logs

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- the run's counters, and its fixed parts ---------------------------------------------------------------

@dataclass
class TrainState:
    """The run's counters, in one place. Those named in SAVED go into every checkpoint's trainer_state.pt (under
    these keys, as before this class existed) and come back on resume; the rest count this call only."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    best_val_loss: float = math.inf
    stale_evals: int = 0  # evaluations in a row without a new best: early stopping's patience
    bad_steps: int = 0  # non-finite steps in a row: train.max_bad_steps of them stop the run
    # this call only
    run_tokens: int = 0
    seconds: float = 0.0  # wall time of the optimizer steps
    first_val_loss: float | None = None
    last_val_loss: float | None = None
    stopped_by: str = "max_steps"
    saved_at: int | None = None  # the step this call last saved
    save_failed: bool = False  # a full disk stays full: no second attempt on the way out

    SAVED: ClassVar[tuple[str, ...]] = ("step", "tokens_seen", "skipped_steps", "best_val_loss", "stale_evals",
                                        "bad_steps")

    def counters(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.SAVED}

    @classmethod
    def resumed(cls, saved: dict[str, Any]) -> TrainState:
        """The counters of a trainer_state.pt; bad_steps is absent from checkpoints written before it was saved."""
        return cls(**{key: saved[key] for key in cls.SAVED if key in saved})


@dataclass
class Run:
    """What a run fixes at setup and every step reads: the model as called and unwrapped, the optimizer,
    precision, samplers, the sizes of a step, and where it writes."""

    cfg: RunConfig  # as saved in config.yaml: the resolved precision and bf16_gemm recorded
    d: Dist
    run_dir: Path
    data: Any  # TokenData, or a fine-tuning source (see `train`)
    tokenizer: Any
    model: nn.Module  # what the step calls: wrapped for DDP/FSDP, compiled
    raw_model: nn.Module  # unwrapped: checkpoints hold its state
    optimizer: torch.optim.Optimizer
    amp: torch.dtype | None  # autocast dtype
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    loss_fn: LossFn
    sampler: Any
    val_sampler: Any
    val_bytes: tuple[int, int] | None  # the validation windows' target tokens and their bytes (bits per byte)
    frozen: set[str]  # parameters never saved (LoRA's base: init_from's, unchanged)
    precision: str
    parallel: str  # none | ddp | fsdp
    seq_len: int
    per_step: int  # micro-batches per optimizer step, over all ranks
    step_tokens: int
    reporter: Reporter
    metrics: Metrics | None = None  # rank 0 only

    @property
    def tc(self):
        return self.cfg.train

    @property
    def device(self) -> torch.device:
        return self.d.device

    @property
    def dist(self) -> Dist | None:
        return self.d if self.d.enabled else None


# --- setup ---------------------------------------------------------------------------------------------------

def claim_run_dir(run_dir: Path, resume: str | None, inputs: tuple = (), verb: str = "train") -> None:
    """A run folder belongs to one run: a new run needs a new or empty folder; --resume auto needs that or a
    run's own folder; it is none of `inputs` (the data, the checkpoint it starts from). Only reads, so every
    rank checks it before anything is written. `verb` names the command in the refusal (only train resumes)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise GptforgeError(f"--out {run_dir} is an existing file; give a folder path for the run")
    check_not_input(run_dir, inputs)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if resume is None:
        hint = "continue that run with --resume auto, or " if verb == "train" else f"{verb} does not resume runs: "
        raise GptforgeError(f"--out {run_dir} already holds files (a run?); {hint}choose a new --out for a new one")
    if resume == "auto" and not is_artifact(run_dir, "run"):
        raise GptforgeError(f"--out {run_dir} is not a gptforge run directory (no checkpoints/step-N, nor config.yaml "
                            f"and metrics.jsonl), so --resume auto will not write into it; choose a new --out")


def _check_writable(run_dir: Path) -> None:
    """Raise now, before data and model are built, if the run folder cannot be created or written; creates nothing."""
    if run_dir.is_dir():
        probe = run_dir / f".write-test-{os.getpid()}"
        try:
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise GptforgeError(f"cannot write to the run directory {run_dir} ({e.strerror or e}); choose another --out") from None
    else:
        check_creatable(run_dir)


def _model_mismatch(saved: RunConfig, cfg: RunConfig) -> list[str]:
    a, b = dataclasses.asdict(saved.model), dataclasses.asdict(cfg.model)
    return [f"{k}: checkpoint {a[k]!r}, this run {b[k]!r}" for k in a if a[k] != b[k] and k != "dropout"]


def _parallel(tc, d: Dist) -> str:
    if tc.parallel == "auto":
        return "ddp" if d.enabled else "none"
    if tc.parallel != "none" and not d.enabled:
        return "none"  # a single process needs no wrapper; the same config runs under torchrun unchanged
    if tc.parallel == "none" and d.enabled:
        raise GptforgeError(f"train.parallel is none but {d.world} processes were started; use ddp or fsdp")
    return tc.parallel


def build_model(cfg: RunConfig, precision: str, parallel: str, d: Dist, init_state: dict | None = None,
                prepare_model: Callable[[nn.Module], nn.Module] | None = None):
    """The model, then what wraps it from outside (activation checkpointing, `prepare_model` such as LoRA,
    DDP/FSDP, compile), then the optimizer over its trainable parameters. Returns (model to call, unwrapped
    model, optimizer, autocast dtype)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    raw = GPT(cfg.model)
    if init_state is not None:
        raw.load_state_dict(init_state)
    raw = raw.to(d.device, dtype=torch.bfloat16 if precision == "bf16-pure" else None)
    amp = autocast_dtype(precision, d.device)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(raw)
    if prepare_model is not None:
        raw = prepare_model(raw)
    if amp == torch.bfloat16 and resolve_bf16_gemm(tc.bf16_gemm, precision, d.device) == "widened":
        widen_bf16(raw)  # CPU bf16 autocast on fp32 GEMMs (precision.py); after LoRA, which swaps plain Linears
    model = raw
    if parallel == "ddp":
        model = apply_ddp(raw, d)
    elif parallel == "fsdp":
        check_optimizer_parallel(tc.optimizer, parallel, d.world)  # the rule plan applies too
        # FSDP's mixed-precision policy replaces autocast: bf16 compute, fp32 master weights and reductions.
        apply_fsdp(raw, tc.fsdp_strategy, torch.bfloat16 if precision == "bf16" else None)
        amp = None
    if tc.compile:
        model = apply_compile(model)
    optimizer = build_optimizer(raw, tc, d.device.type)
    return model, raw, optimizer, amp


def _start_from(init_from: str, cfg: RunConfig, data) -> tuple[RunConfig, dict]:
    """init_from's weights, and its architecture in `cfg` (only dropout may be set anew)."""
    init_ckpt = resolve_checkpoint(init_from)
    compression = read_config(init_ckpt).compression
    if compression is not None and compression.quantized:  # packed integer weights do not train; pruned or cast ones do
        raise GptforgeError(f"{init_ckpt} is quantized ({compression.quantization.method}); fine-tune its unquantized parent instead")
    init_model, init_tok, init_cfg = load_checkpoint(init_ckpt)
    if init_tok.fingerprint != data.fingerprint:
        raise GptforgeError(f"{init_ckpt} was trained with tokenizer {init_tok.fingerprint}, but {cfg.data} was prepared with {data.fingerprint}; prepare the data with --tokenizer {init_ckpt}/tokenizer.json")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(init_cfg.model, dropout=cfg.model.dropout))
    return cfg, init_model.state_dict()


def _samplers(data, source, tc, seq_len: int):
    """The training sampler and the fixed-seed validation one (None without validation data)."""
    if source is not None:
        return source.samplers(tc.micro_batch, seq_len, tc.seed, EVAL_SEED)
    sampler = BatchSampler(data.shards("train"), tc.micro_batch, seq_len, seed=tc.seed)
    val_sampler = None
    if data.meta["splits"]["val"]["tokens"] > 0:
        val_sampler = BatchSampler(data.shards("val"), tc.micro_batch, seq_len, seed=EVAL_SEED)
    return sampler, val_sampler


def setup(cfg: RunConfig, d: Dist, resume: str | None, init_from: str | None, loss_fn: LossFn, progress: bool,
          source=None, prepare_model=None, claimed: bool = False) -> tuple[Run, TrainState]:
    """Check the run folder and the data, build model, optimizer and samplers, restore a resumed run's state,
    then write config.yaml and open the metrics. Nothing is written before every check has passed."""
    tc, run_dir = cfg.train, Path(cfg.out)
    if not claimed:
        claim_run_dir(run_dir, resume, (cfg.data if source is None else None, init_from))
    if d.is_main:
        _check_writable(run_dir)
    data = TokenData(cfg.data) if source is None else source
    tokenizer = data.tokenizer()
    if tokenizer.fingerprint != data.fingerprint:
        raise GptforgeError(f"{cfg.data}: tokenizer.json does not match the fingerprint in meta.json; re-run gptforge prepare")
    reporter = Reporter(tc.max_steps, 0, progress and d.is_main, quiet=not d.is_main)
    init_state = None
    if init_from is not None:
        cfg, init_state = _start_from(init_from, cfg, data)
    # The vocabulary comes from the data's tokenizer; a preset's own vocab_size only sizes untrained models.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    seq_len = tc.seq_len or cfg.model.block_size
    if seq_len > cfg.model.block_size:
        raise GptforgeError(f"train.seq_len ({seq_len}) exceeds model.block_size ({cfg.model.block_size})")
    # The global batch is fixed by the config: micro-batches 0..A-1 of each step are dealt out to ranks in
    # turn, so any world size trains on the same windows in the same steps, and resumes at any world size.
    per_step = tc.micro_batches_per_step(seq_len, d.world)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    precision = resolve_precision(tc.precision, d.device)
    bf16_gemm = resolve_bf16_gemm(tc.bf16_gemm, precision, d.device)  # auto is timed here and recorded below
    parallel = _parallel(tc, d)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls (Ampere and later)
        torch.backends.cudnn.allow_tf32 = True
    model, raw_model, optimizer, amp = build_model(cfg, precision, parallel, d, init_state, prepare_model)
    del init_state
    sampler, val_sampler = _samplers(data, source, tc, seq_len)
    # bits per byte: the fixed validation windows' targets and the bytes they stand for, counted once
    val_bytes = window_bytes(val_sampler, tc.eval_batches, token_byte_lengths(tokenizer)) if val_sampler is not None else None
    run = Run(cfg=cfg, d=d, run_dir=run_dir, data=data, tokenizer=tokenizer, model=model, raw_model=raw_model,
              optimizer=optimizer, amp=amp, scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
              loss_fn=torch.compile(loss_fn) if tc.compile else loss_fn, sampler=sampler, val_sampler=val_sampler,
              val_bytes=val_bytes, frozen={name for name, p in raw_model.named_parameters() if not p.requires_grad},
              precision=precision, parallel=parallel, seq_len=seq_len, per_step=per_step,
              step_tokens=tc.micro_batch * per_step * seq_len, reporter=reporter)
    state = _resume(run, resume)
    run.cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, precision=precision, bf16_gemm=bf16_gemm))
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: a run refused above leaves no folder behind
        run.cfg.save(run_dir / "config.yaml")
        run.metrics = Metrics(run_dir, state.step, tc.tensorboard, reporter.note)
    reporter.note(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, device {d.device}, precision {precision}"
                  f"{f', {parallel} x {d.world}' if d.enabled else ''}{', compiled' if tc.compile else ''}"
                  f"{', activation checkpointing' if tc.activation_checkpointing else ''}; {run.step_tokens} "
                  f"tokens/step = {tc.micro_batch} x {seq_len} x {per_step} micro-batches")
    return run, state


def _resume(run: Run, resume: str | None) -> TrainState:
    """A new run's counters, or those of the checkpoint `resume` names (restoring weights, optimizer, sampler,
    scaler and RNGs with them)."""
    if resume == "auto" and (ckpt := find_resumable(run.run_dir, warn=run.reporter.note)) is None:
        run.reporter.note(f"--resume auto: no checkpoint in {run.run_dir} yet, starting a new run")
        resume = None
    if resume is None:
        return TrainState()
    ckpt = ckpt if resume == "auto" else resolve_checkpoint(resume)
    state = TrainState.resumed(restore(ckpt, run.cfg, run.data, run.raw_model, run.optimizer, run.sampler,
                                       run.scaler, run.d))
    run.reporter.note(f"resumed from {ckpt} at step {state.step}")
    return state


def restore(ckpt: Path, cfg: RunConfig, data: TokenData, raw_model: nn.Module, optimizer, sampler: BatchSampler,
            scaler, d: Dist) -> dict[str, Any]:
    """Load a checkpoint's weights, optimizer, sampler, scaler and RNG states into a freshly built run, after
    checking that it is whole and belongs to this model and tokenizer. Returns its trainer state (the counters)."""
    if (problem := checkpoint_problem(ckpt)) is not None:
        raise GptforgeError(f"cannot resume from {ckpt}: {problem}")
    state = load_trainer_state(ckpt)
    if state["tokenizer_fingerprint"] != data.fingerprint:
        raise GptforgeError(f"checkpoint {ckpt} was trained with tokenizer {state['tokenizer_fingerprint']}, but {cfg.data} was prepared with {data.fingerprint}; prepare the data with --tokenizer {ckpt}/tokenizer.json")
    mismatch = _model_mismatch(read_config(ckpt), cfg)
    if mismatch:
        raise GptforgeError(f"cannot resume {ckpt} with another model config ({'; '.join(mismatch)}); use its config, or --init-from to start a new run from its weights")
    if (ckpt / MODEL_FILE).is_file():
        StateDictOptions, _, set_state_dict, _ = _dcp()
        # Full, name-keyed state: set_state_dict shards it when the model is FSDP-wrapped.
        set_state_dict(raw_model, optimizer, model_state_dict=load_file(str(ckpt / MODEL_FILE)),
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        load_sharded(ckpt, raw_model, optimizer)
    sampler.load_state_dict(state["sampler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if state.get("world", 1) == d.world:  # another world size draws differently anyway (dropout masks)
        set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)], d.device)
    return state


# --- one step, evaluation, checkpoints, stopping -----------------------------------------------------------

@dataclass
class StepResult:
    loss: torch.Tensor  # per target token over all ranks (detached, on the device)
    grad_norm: torch.Tensor  # before clipping
    lr: float
    ok: bool  # stepped; False: skipped for a non-finite loss or gradient


def train_step(run: Run, state: TrainState) -> StepResult:
    """One optimizer step: the scheduled learning rate, forward and backward over the step's micro-batches
    (accumulated), unscale and clip, then step, or skip a step whose loss or gradient is not finite."""
    tc, optimizer, scaler = run.tc, run.optimizer, run.scaler
    lr = lr_at(state.step, tc)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups run at muon_lr / lr times lr
    batches = [run.sampler.batch(state.step * run.per_step + j) for j in range(run.d.rank, run.per_step, run.d.world)]
    loss = forward_backward(run.model, batches, run.loss_fn, run.device, run.amp, scaler, run.dist)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over ranks
        grad_norm = grad_norm.full_tensor()
    # One host sync per step: the guard must know before stepping, and every rank sees the same (all-reduced)
    # loss and norm, so all skip together. fp16 overflow is the GradScaler's to handle (it skips and lowers
    # the scale); only a non-finite loss counts there.
    loss_ok = math.isfinite(loss.item())
    ok = loss_ok and (scaler is not None or math.isfinite(grad_norm.item()))
    if ok:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state.bad_steps = 0
    else:
        if scaler is not None:
            scaler.update()
        run.reporter.note(f"step {state.step + 1}: non-finite {'loss' if not loss_ok else 'gradient norm'}; step skipped")
        if state.bad_steps + 1 >= tc.max_bad_steps:
            # Not counted: the checkpoint saved on the way out holds the counts of its own step, so a run resumed
            # from it stops here again, as this one does.
            optimizer.zero_grad(set_to_none=True)
            raise GptforgeError(
                f"{state.bad_steps + 1} steps in a row (up to step {state.step + 1}) had a non-finite loss or gradient; "
                f"lower --train.lr (now {tc.lr:g}), keep --train.grad_clip on"
                f"{', or use --train.precision bf16 instead of fp16' if run.precision == 'fp16' else ''}; "
                f"the last good checkpoint is in {run.run_dir / 'checkpoints'}")
        state.skipped_steps += 1
        state.bad_steps += 1
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens_seen += run.step_tokens
    state.run_tokens += run.step_tokens
    return StepResult(loss, grad_norm, lr, ok)


class StepLog:
    """A metrics record every train.log_every steps: the mean loss of the good steps since the last one (summed
    on the device, read once per record), throughput and MFU over those steps, peak memory."""

    def __init__(self, run: Run):
        self.flops_per_step = run.cfg.model.flops_per_token(run.seq_len) * run.step_tokens
        self.loss_sum = torch.zeros((), device=run.device)
        self.good, self.steps, self.seconds = 0, 0, 0.0
        self.peak_flops = device_peak_flops(run.device, run.precision)  # CPU: a matmul probe (draws from torch's RNG)

    def add(self, run: Run, state: TrainState, out: StepResult, seconds: float) -> None:
        tc = run.tc
        if out.ok:
            self.loss_sum += out.loss
            self.good += 1
        self.steps += 1
        self.seconds += seconds
        if not (state.step % tc.log_every == 0 or state.step == tc.max_steps):
            run.reporter.step(state.step, "")
            return
        step_seconds = self.seconds / self.steps
        mean_loss = (self.loss_sum / max(self.good, 1)).item()
        memory = float(run.d.max(torch.tensor(peak_memory_gb(run.device), device=run.device)))
        record = dict(loss=mean_loss, lr=out.lr, grad_norm=float(out.grad_norm), tokens=state.tokens_seen,
                      tokens_per_s=run.step_tokens / step_seconds, peak_memory_gb=memory,
                      skipped_steps=state.skipped_steps)
        if self.peak_flops is not None:
            record["mfu"] = self.flops_per_step / step_seconds / (self.peak_flops * run.d.world)
        if run.metrics is not None:
            run.metrics.log(state.step, **record)
        run.reporter.step(state.step, f"loss {mean_loss:.3f}  {record['tokens_per_s']:,.0f} tok/s",
                          force=state.step % (tc.log_every * 10) == 0)
        self.loss_sum.zero_()
        self.good, self.steps, self.seconds = 0, 0, 0.0


def evaluate_and_keep_best(run: Run, state: TrainState) -> float | None:
    """Evaluate (None without validation data); log it, save a new best checkpoint, count patience."""
    if run.val_sampler is None:
        return None
    tc = run.tc
    val = evaluate(run.model, run.val_sampler, tc.eval_batches, run.device, run.amp, run.loss_fn, run.dist)
    ppl, bpb = math.exp(min(val, 50)), bits_per_byte(val, *run.val_bytes)
    if run.metrics is not None:
        run.metrics.log(state.step, val_loss=val, val_ppl=ppl, val_bpb=bpb)
    run.reporter.note(f"step {state.step}: val loss {val:.4f} (perplexity {ppl:.1f}, {bpb:.3f} bits/byte)")
    if val < state.best_val_loss:
        state.best_val_loss, state.stale_evals = val, 0
        if tc.save_best and state.step > 0:
            save(run, state, best=True)
    else:
        state.stale_evals += 1
    return val


def trainer_state(run: Run, state: TrainState, optim_state: dict | None) -> dict[str, Any]:
    """trainer_state.pt's contents: the counters, the sampler's position, every RNG, the optimizer (unless
    sharded beside it) and the fp16 scaler."""
    rngs = [rng_state(run.device)]
    if run.d.enabled:  # every rank's generators, gathered so that a same-size resume restores each
        gathered: list = [None] * run.d.world
        torch.distributed.all_gather_object(gathered, rngs[0])
        rngs = gathered
    run.sampler.position = state.step * run.per_step
    out = {**state.counters(), "sampler": run.sampler.state_dict(), "rng": rngs, "world": run.d.world,
           "tokenizer_fingerprint": run.data.fingerprint}
    if optim_state is not None:
        out["optimizer"] = optim_state
    if run.scaler is not None:
        out["scaler"] = run.scaler.state_dict()
    return out


def _dcp():
    """torch.distributed.checkpoint, imported when a checkpoint is first saved or loaded: importing it costs
    over a second, which every command that imports this module would pay."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    return StateDictOptions, get_state_dict, set_state_dict, dcp


def save(run: Run, state: TrainState, best: bool = False) -> None:
    """Single-file checkpoints from rank 0 (plain and DDP runs); FSDP writes sharded ones collectively."""
    StateDictOptions, get_state_dict, _, dcp = _dcp()
    tc = run.tc
    try:
        if run.parallel == "fsdp":
            msd, osd = get_state_dict(run.raw_model, run.optimizer)
            save_checkpoint(run.run_dir, state.step, run.cfg, run.tokenizer, trainer_state(run, state, None),
                            tc.keep_last, best, d=run.d,
                            write_shards=lambda path: dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path)))
        else:
            msd, osd = get_state_dict(run.raw_model, run.optimizer, options=StateDictOptions(full_state_dict=True))
            msd = {k: v for k, v in msd.items() if k not in run.frozen}  # LoRA: the adapter only
            trainer = trainer_state(run, state, osd)
            if run.d.is_main:
                save_checkpoint(run.run_dir, state.step, run.cfg, run.tokenizer, trainer, tc.keep_last, best,
                                model_state=msd)
            run.d.barrier()
    except GptforgeError:
        state.save_failed = True
        raise
    state.saved_at = state.step


def stop_reason(run: Run, state: TrainState, signals: StopSignals) -> str | None:
    """Why the run stops after this step, before train.max_steps: a time or token budget, or a signal; None to
    go on. Rank 0's decision, shared so that every rank leaves the loop at the same step."""
    tc = run.tc
    stop = 0
    if tc.max_time is not None and state.seconds >= tc.max_time:
        stop = 1
    elif tc.max_tokens is not None and state.run_tokens >= tc.max_tokens:
        stop = 2
    elif signals.received is not None:
        stop = 3 if signals.received == "SIGINT" else 4
    if run.d.enabled:
        stop = int(run.d.max(torch.tensor(stop, device=run.device)))
    return (None, "max_time", "max_tokens", "SIGINT", "SIGTERM")[stop]


def out_of_patience(run: Run, state: TrainState) -> bool:
    """Early stopping, asked after an evaluation: train.early_stop_patience evaluations without a new best."""
    return run.tc.early_stop_patience is not None and state.stale_evals >= run.tc.early_stop_patience


# --- the loop ------------------------------------------------------------------------------------------------

def train(cfg: RunConfig, *, resume: str | None = None, init_from: str | None = None,
          loss_fn: LossFn = next_token_loss, progress: bool = True, source=None,
          prepare_model: Callable[[nn.Module], nn.Module] | None = None, claimed: bool = False) -> TrainResult:
    """Train `cfg.model` on the shards in `cfg.data`, writing checkpoints, metrics and TensorBoard files
    under `cfg.out`. Under torchrun, every rank calls this; rank 0 logs and writes.

    resume:    a checkpoint (or run directory) to continue exactly, or "auto" for the newest valid one in
               `cfg.out`; weights, optimizer, step, sampler position and RNG states are restored, at any
               world size.
    init_from: a checkpoint whose weights (and model config) start a new run with a fresh optimizer.
    source:    batches from elsewhere than token shards (finetune/data.py): an object with `fingerprint`,
               `tokenizer()` and `samplers(micro_batch, seq_len, seed, eval_seed)` -> (train, val or None)
               samplers with `batch(k)` -> (x, y); x is anything with `.to(device)` that loss_fn reads.
    prepare_model: applied to the built (and init_from-loaded) model before DDP/compile and the optimizer,
               e.g. a LoRA swap; parameters it freezes are never saved (they are init_from's, unchanged).
    claimed:   the caller has already checked `cfg.out` (claim_run_dir) and written into it (finetune's base/).
    """
    if cfg.data is None or cfg.out is None:
        raise GptforgeError("train needs --data DIR (from gptforge prepare) and --out DIR (where the run is written)")
    if resume is not None and init_from is not None:
        raise GptforgeError("give either --resume (continue a run) or --init-from (start from its weights), not both")
    tc = cfg.train
    d = init_distributed(resolve_device(tc.device, flag="--train.device"), tc.dist_timeout)
    if source is not None and resume is not None:
        raise GptforgeError("resuming a fine-tuning run from JSONL data is not supported; start it again")
    try:
        run, state = setup(cfg, d, resume, init_from, loss_fn, progress, source, prepare_model, claimed)
        return loop(run, state)
    finally:
        close_distributed()


def loop(run: Run, state: TrainState) -> TrainResult:
    """Evaluate a new run at step 0, then step, log, evaluate and save until max_steps or a stop; save on the
    way out, unless a second Ctrl-C or a failed save ended the run."""
    tc, reporter = run.tc, run.reporter
    if state.step == 0:
        state.first_val_loss = state.last_val_loss = evaluate_and_keep_best(run, state)
    run.model.train()
    log = StepLog(run)
    reporter.step(state.step, "")
    hard_interrupt = False
    with StopSignals() as signals:
        try:
            while state.step < tc.max_steps:
                t0 = time.perf_counter()
                out = train_step(run, state)
                dt = time.perf_counter() - t0
                state.seconds += dt
                log.add(run, state, out, dt)
                stop = stop_reason(run, state, signals)
                if stop is not None or state.step % tc.eval_every == 0 or state.step == tc.max_steps:
                    state.last_val_loss = evaluate_and_keep_best(run, state)
                    if stop is None and out_of_patience(run, state):
                        stop = "early_stop"
                if state.step % tc.save_every == 0 and state.saved_at != state.step:
                    save(run, state)
                if stop is not None:
                    state.stopped_by = stop
                    reporter.note(f"stopping at step {state.step}: {stop}")
                    break
        except KeyboardInterrupt:
            # A second Ctrl-C lands anywhere, perhaps inside optimizer.step(): the state in memory may be half
            # updated, so nothing is saved and the last checkpoint stands.
            hard_interrupt = True
            raise GptforgeError(f"interrupted at step {state.step} without saving; {run.run_dir / 'checkpoints'} keeps "
                                f"the last checkpoint (a train run continues from it with --resume auto)") from None
        finally:
            reporter.close()
            try:
                if state.saved_at != state.step and not hard_interrupt and not state.save_failed:
                    save(run, state)
            finally:
                if run.metrics is not None:
                    run.metrics.close()
    best = None if math.isinf(state.best_val_loss) else state.best_val_loss
    return TrainResult(run.run_dir, run.run_dir / "checkpoints" / f"step-{state.step:08d}", state.step,
                       state.run_tokens, state.seconds, state.first_val_loss, state.last_val_loss, best,
                       state.stopped_by, state.skipped_steps)
