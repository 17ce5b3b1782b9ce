"""`gptforge demo`: prepare the bundled Shakespeare, train the `shakespeare` preset for a bounded time,
report validation loss before and after, and print a sample.

The step count is not fixed: a short probe times fp32 and bf16-autocast steps on this machine, keeps the
faster precision, and sizes the cosine schedule so that it completes within the time budget.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gptforge.config import RunConfig, TrainConfig, model_preset
from gptforge.data import BatchSampler, TokenData, prepare
from gptforge.eval import evaluate_task, shakespeare_next_line
from gptforge.generate import generate
from gptforge.hardware import resolve_device
from gptforge.loader import load_checkpoint
from gptforge.model import GPT
from gptforge.optim import build_optimizer
from gptforge.outputs import check_out, is_artifact
from gptforge.settings import DemoConfig
from gptforge.train import forward_backward, next_token_loss, train

DEMO_TRAIN = TrainConfig(
    micro_batch=16, seq_len=256, lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.1,
    eval_batches=16, log_every=5, save_every=100_000, keep_last=1,
)
DEMO_PROMPT = "**HAMLET**\n"
EVAL_OVERHEAD = 0.06  # share of the budget left for the 6 evaluations and the final checkpoint


@dataclass
class DemoResult:
    run_dir: Path
    checkpoint: Path
    precision: str
    probe_ms: dict
    prepare_mb_per_s: float
    steps: int
    tokens: int
    train_seconds: float
    first_val_loss: float
    final_val_loss: float
    task: dict  # shakespeare-next-line: acc_norm of the untrained and the trained model, and chance
    sample: str
    total_seconds: float


def probe_precision(cfg: RunConfig, data: TokenData, rounds: int = 3) -> dict:
    """Milliseconds per training step in fp32 and bf16 autocast on throwaway copies of the model, the
    faster one ("chosen") and its time when run alone ("steady").

    Both are warmed up first, then timed alternately (fp32, bf16, fp32, ...), keeping each one's fastest
    step, so that a slow first step or a noisy neighbour does not decide the choice.
    """
    device = resolve_device(cfg.train.device, flag="--train.device")
    sampler = BatchSampler(data.shards("train"), cfg.train.micro_batch, cfg.train.seq_len, seed=0)
    x, y = (t.to(device) for t in sampler.batch(0))
    candidates = {"fp32": None, "bf16": torch.bfloat16}
    runs = {}
    for name in candidates:
        torch.manual_seed(0)
        model = GPT(cfg.model).to(device)
        runs[name] = (model, build_optimizer(model, cfg.train, device.type))

    def one_step(name: str) -> float:
        model, opt = runs[name]
        t0 = time.perf_counter()
        forward_backward(model, [(x, y)], next_token_loss, device, candidates[name])  # the loop's own step
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for name in candidates:
        one_step(name)  # warm-up: kernels, allocator
    best = {name: math.inf for name in candidates}
    for _ in range(rounds):
        for name in candidates:
            best[name] = min(best[name], one_step(name))
    chosen = min(best, key=best.get)
    # Alternating two models runs slower than training does (each evicts the other's memory), so the
    # winner is timed once more on its own to size the schedule.
    steady = min(one_step(chosen) for _ in range(rounds))
    return {**{name: t * 1000 for name, t in best.items()}, "steady": steady * 1000, "chosen": chosen}


def run_demo(out: str | Path = DemoConfig.out, minutes: float = DemoConfig.minutes, progress: bool = True, say=print,
             overwrite: bool = False) -> DemoResult:
    """Prepare, train and sample into `out` (data/ and run/). An earlier demo there is replaced only with
    `overwrite` (outputs.check_out); any other non-empty folder is refused."""
    t_start = time.perf_counter()
    out = check_out(out, "demo", overwrite=overwrite)
    if overwrite and is_artifact(out / "run", "run"):  # an earlier demo's run: check_out recognised the folder
        shutil.rmtree(out / "run")
    say(f"[1/4] preparing the bundled Shakespeare corpus into {out / 'data'}")
    stats = prepare(["shakespeare"], out / "data", vocab_size=4096, progress=progress, overwrite=overwrite)
    say(f"      {sum(stats.documents.values())} plays, {sum(stats.tokens.values()):,} tokens "
        f"({stats.bytes_per_token:.2f} bytes/token), tokenized at {stats.mb_per_s:.1f} MB/s")

    data = TokenData(out / "data")
    model_cfg = dataclasses.replace(model_preset("shakespeare"), vocab_size=data.vocab_size)
    cfg = RunConfig(model=model_cfg, train=DEMO_TRAIN, data=str(out / "data"), out=str(out / "run"))
    say("[2/4] timing a training step in fp32 and bf16 to pick the faster precision")
    probe = probe_precision(cfg, data)
    precision = probe["chosen"]
    say(f"      fp32 {probe['fp32']:.0f} ms/step, bf16 {probe['bf16']:.0f} ms/step: using {precision} "
        f"({probe['steady']:.0f} ms/step on its own)")

    budget = minutes * 60 * (1 - EVAL_OVERHEAD)
    steps = max(10, int(budget / (probe["steady"] / 1000)))
    train_cfg = dataclasses.replace(
        DEMO_TRAIN, precision=precision, max_steps=steps, warmup_steps=min(DEMO_TRAIN.warmup_steps, steps // 10),
        eval_every=max(1, math.ceil(steps / 5)), max_time=minutes * 60,
    )
    cfg = dataclasses.replace(cfg, train=train_cfg)
    task = shakespeare_next_line()
    torch.manual_seed(train_cfg.seed)
    before = evaluate_task(GPT(cfg.model).eval(), data.tokenizer(), task, block_size=cfg.model.block_size)
    say(f"[3/4] training the shakespeare preset ({GPT(cfg.model).num_params() / 1e6:.1f}M parameters) "
        f"for {steps} steps, about {minutes:g} minutes")
    result = train(cfg, progress=progress)

    say("[4/4] sampling from the trained model")
    model, tokenizer, _ = load_checkpoint(result.checkpoint)
    sample = generate(model, tokenizer, DEMO_PROMPT, max_new_tokens=120, temperature=0.8, top_k=100, seed=0)
    after = evaluate_task(model, tokenizer, task, block_size=cfg.model.block_size)
    return DemoResult(
        run_dir=result.run_dir, checkpoint=result.checkpoint, precision=precision, probe_ms=probe,
        prepare_mb_per_s=stats.mb_per_s, steps=result.steps, tokens=result.tokens, train_seconds=result.seconds,
        first_val_loss=result.first_val_loss, final_val_loss=result.final_val_loss,
        task={"name": task.name, "before": before.score, "after": after.score, "chance": task.chance},
        sample=DEMO_PROMPT + sample, total_seconds=time.perf_counter() - t_start,
    )
