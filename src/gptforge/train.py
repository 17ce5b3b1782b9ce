"""The one training loop: accumulate, clip, step, schedule, evaluate, checkpoint, log.

Every objective runs through `train`: the objective is the `loss_fn` parameter (next-token cross-entropy by
default), so pretraining and, later, fine-tuning and distillation never grow copies of this loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.checkpoint import load_trainer_state, resolve_checkpoint, save_checkpoint, unwrap
from gptforge.config import RunConfig
from gptforge.data import BatchSampler, TokenData
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.optim import build_optimizer, lr_at

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
    steps: int
    tokens: int  # trained on in this call (a resumed run counts from where it resumed)
    seconds: float  # wall time of the optimizer steps, evaluation and checkpoints excluded
    first_val_loss: float | None
    final_val_loss: float | None
    stopped_early: bool  # by the time limit

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GptforgeError(f"train.device is {name!r} but no CUDA device is available; use --train.device cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.precision, or None for plain fp32. `auto` is bf16 on CUDA and fp32
    elsewhere: on CPUs without AMX, bf16 autocast measured slower than fp32 (docs/BENCHMARKS.md)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, sampler: BatchSampler, n_batches: int, device: torch.device,
             amp: torch.dtype | None, loss_fn: LossFn = next_token_loss) -> float:
    """Mean loss per target token over the first `n_batches` batches of a fixed-seed sampler."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for k in range(n_batches):
        x, y = sampler.batch(k)
        with autocast(device, amp):
            loss, n = loss_fn(model, x.to(device), y.to(device))
        total += loss.float()
        count += n
    model.train(was_training)
    return (total / count).item()


class Reporter:
    """A rich progress bar on a terminal (when `bar`); otherwise a plain line every 10 log intervals."""

    def __init__(self, total: int, start: int, bar: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
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
        self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train(cfg: RunConfig, *, resume: str | None = None, loss_fn: LossFn = next_token_loss,
          progress: bool = True) -> TrainResult:
    """Train `cfg.model` on the shards in `cfg.data`, writing checkpoints and `metrics.jsonl` under `cfg.out`.

    `resume`: a checkpoint (or run directory) to continue from, or "auto" for the latest one in `cfg.out`.
    """
    if cfg.data is None or cfg.out is None:
        raise GptforgeError("train needs --data DIR (from gptforge prepare) and --out DIR (where the run is written)")
    tc = cfg.train
    data = TokenData(cfg.data)
    tokenizer = data.tokenizer()
    if tokenizer.fingerprint != data.fingerprint:
        raise GptforgeError(f"{cfg.data}: tokenizer.json does not match the fingerprint in meta.json; re-run gptforge prepare")
    # The vocabulary comes from the data's tokenizer; a preset's own vocab_size only sizes untrained models.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    seq_len = tc.seq_len or cfg.model.block_size
    if seq_len > cfg.model.block_size:
        raise GptforgeError(f"train.seq_len ({seq_len}) exceeds model.block_size ({cfg.model.block_size})")
    run_dir = Path(cfg.out)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    amp = autocast_dtype(tc.precision, device)
    accum = tc.grad_accum(seq_len)

    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)
    optimizer = build_optimizer(model, tc, device.type)
    sampler = BatchSampler(data.shards("train"), tc.micro_batch, seq_len, seed=tc.seed)
    val_sampler = None
    if data.meta["splits"]["val"]["tokens"] > 0:
        val_sampler = BatchSampler(data.shards("val"), tc.micro_batch, seq_len, seed=EVAL_SEED)
    step, tokens_seen = 0, 0

    if resume is not None:
        ckpt = resolve_checkpoint(run_dir if resume == "auto" else resume)
        state = load_trainer_state(ckpt)
        if state["tokenizer_fingerprint"] != data.fingerprint:
            raise GptforgeError(f"checkpoint {ckpt} was trained with tokenizer {state['tokenizer_fingerprint']}, but {cfg.data} was prepared with {data.fingerprint}; prepare the data with --tokenizer {ckpt}/tokenizer.json")
        from safetensors.torch import load_file
        unwrap(model).load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    log = open(run_dir / "metrics.jsonl", "a")

    def record(**fields: Any) -> None:
        log.write(json.dumps(fields) + "\n")
        log.flush()

    def trainer_state() -> dict[str, Any]:
        state = {"step": step, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
                 "sampler": sampler.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "tokenizer_fingerprint": data.fingerprint}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        return state

    def run_eval() -> float | None:
        if val_sampler is None:
            return None
        val = evaluate(model, val_sampler, tc.eval_batches, device, amp, loss_fn)
        record(step=step, val_loss=val, val_ppl=math.exp(min(val, 50)))
        return val

    reporter = Reporter(tc.max_steps, step, progress)
    n_params = model.num_params()
    reporter.note(f"model: {n_params / 1e6:.2f}M parameters, device {device}, "
                  f"precision {'fp32' if amp is None else 'bf16 autocast'}, {tc.micro_batch * accum * seq_len} tokens/step")
    first_val = last_val = run_eval()
    if first_val is not None:
        reporter.note(f"step {step}: val loss {first_val:.4f} (perplexity {math.exp(first_val):.1f})")

    model.train()
    seconds, run_tokens, stopped_early, interrupted = 0.0, 0, False, False
    step_tokens = tc.micro_batch * accum * seq_len
    try:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [next(sampler) for _ in range(accum)]
            n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
            step_loss = torch.zeros((), device=device)
            for x, y in batches:
                with autocast(device, amp):
                    loss_sum, _ = loss_fn(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                loss = loss_sum / n_targets
                loss.backward()
                step_loss += loss.detach()
            clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            run_tokens += step_tokens

            if step % tc.log_every == 0 or step == tc.max_steps:
                loss_value = step_loss.item()  # the one host sync per log interval
                dt = time.perf_counter() - t0
                seconds += dt
                tok_s = run_tokens / max(seconds, 1e-9)
                record(step=step, loss=loss_value, lr=lr, grad_norm=float(grad_norm), tokens=tokens_seen,
                       tokens_per_s=tok_s, elapsed_s=seconds)
                reporter.step(step, f"loss {loss_value:.3f}  {tok_s:,.0f} tok/s", force=step % (tc.log_every * 10) == 0)
            else:
                seconds += time.perf_counter() - t0
                reporter.step(step, "")

            out_of_time = tc.max_time is not None and seconds >= tc.max_time
            if step % tc.eval_every == 0 or step == tc.max_steps or out_of_time:
                last_val = run_eval()
                if last_val is not None:
                    reporter.note(f"step {step}: val loss {last_val:.4f} (perplexity {math.exp(last_val):.1f})")
            if step % tc.save_every == 0 and step < tc.max_steps and not out_of_time:
                save_checkpoint(run_dir, step, model, cfg, tokenizer, trainer_state(), tc.keep_last)
            if out_of_time:
                stopped_early = True
                reporter.note(f"time limit of {tc.max_time:g} s reached at step {step}")
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        reporter.close()
    ckpt = save_checkpoint(run_dir, step, model, cfg, tokenizer, trainer_state(), tc.keep_last)
    log.close()
    if interrupted:
        raise GptforgeError(f"interrupted at step {step}; checkpoint saved to {ckpt}; continue with --resume {ckpt}")
    return TrainResult(run_dir, ckpt, step, run_tokens, seconds, first_val, last_val, stopped_early)
