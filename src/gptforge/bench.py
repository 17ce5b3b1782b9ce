"""Measure this device and a model on it, each figure next to what `gptforge plan` predicts.

Peak matmul FLOP/s and copy bandwidth (the planner's hardware figures), a training step (tokens/s, MFU, peak
memory) and batch-1 decode (tokens/s, achieved GB/s). The error is (predicted - measured) / measured.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from gptforge.config import ModelConfig, TrainConfig
from gptforge.distributed import apply_activation_checkpointing
from gptforge.errors import GptforgeError
from gptforge.generate import generate_tokens
from gptforge.hardware import (device_hardware, get_hardware, probe_copy_bandwidth, probe_matmul_flops,
                               resolve_device)
from gptforge.model import GPT
from gptforge.optim import build_optimizer
from gptforge.plan import make_plan, matmul_weights
from gptforge.precision import autocast, autocast_dtype, resolve_bf16_gemm, resolve_precision, widen_bf16
from gptforge.settings import BenchConfig, PlanConfig
from gptforge.train import forward_backward, next_token_loss


@dataclass
class Row:
    quantity: str
    predicted: float | None
    measured: float | None
    unit: str

    @property
    def error(self) -> float | None:
        if self.predicted is None or not self.measured:
            return None
        return (self.predicted - self.measured) / self.measured


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step_s(step, dev: torch.device, steps: int) -> float:
    """Median seconds of `steps` calls of `step` after one warm-up (which creates the optimizer states); the
    CUDA peak-memory counter is reset after the warm-up, so it reads the timed steps' peak."""
    step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(cfg: ModelConfig, *, device: str = BenchConfig.device, precision: str = BenchConfig.precision,
          micro_batch: int = BenchConfig.micro_batch, seq_len: int | None = BenchConfig.seq_len,
          steps: int = BenchConfig.steps, decode_tokens: int = BenchConfig.decode_tokens,
          hardware: str | None = BenchConfig.hardware, mfu: float = BenchConfig.mfu) -> list[Row]:
    """Measure and compare; `precision` takes train.precision's names (auto as train resolves it). The settings'
    defaults are BenchConfig's (`gptforge bench`'s flags)."""
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)  # an unknown name is refused by PlanConfig below
    amp = autocast_dtype(precision, dev)
    hw = device_hardware(dev, hardware)
    seq_len = seq_len or cfg.block_size
    plan = make_plan(PlanConfig(cfg, seq_len=seq_len, micro_batch=micro_batch, precision=precision, mfu=mfu,
                                hardware=hw.name), hw)
    rows: list[Row] = []
    dtype = {"fp32": "fp32", "fp16": "fp16"}.get(precision, "bf16")
    n = 4096 if dev.type == "cuda" else 1024
    rows.append(Row(f"peak matmul ({dtype})", hw.peak_flops(precision) / 1e12,
                    probe_matmul_flops(dtype, n=n, device=device) / 1e12, "TFLOP/s"))
    rows.append(Row("copy bandwidth", hw.bandwidth_gbs,
                    probe_copy_bandwidth(256 if dev.type == "cuda" else 64, device=device) / 1e9, "GB/s"))

    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    opt = build_optimizer(model, TrainConfig(), dev.type)
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    tok_s = micro_batch * seq_len / _median_step_s(step, dev, steps)
    rows.append(Row("train tokens/s", plan.throughput.tokens_per_s, tok_s, "tokens/s"))
    rows.append(Row("train MFU", mfu, tok_s * plan.throughput.flops_per_token / hw.peak_flops(precision), "fraction"))
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    # Without accumulation the gradients are freed before the next forward: compare to the planned peak less them.
    rows.append(Row("train peak memory", (plan.memory.peak_allocated - plan.memory.gradients) / 2**30, peak, "GiB"))

    model.eval()
    c = 4 if precision == "fp32" else 2
    prompt = list(range(1, 9))
    if amp is not None:  # decode in the autocast dtype
        model = model.to(amp)
    for _ in generate_tokens(model, prompt, max_new_tokens=2, vocab_size=cfg.vocab_size, seed=0):
        pass  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    count = sum(1 for _ in generate_tokens(model, prompt, max_new_tokens=decode_tokens, vocab_size=cfg.vocab_size,
                                           seed=0))
    _sync(dev)
    dec = count / (time.perf_counter() - t0)
    # the planner's decode bound is at a context of seq_len; at this short context the cache term is small
    ctx = len(prompt) + decode_tokens // 2
    bound = hw.bandwidth_gbs * 1e9 / (matmul_weights(cfg) * c + plan.inference.kv_bytes_per_token * ctx)
    rows.append(Row("decode tokens/s (batch 1)", bound, dec, "tokens/s"))
    rows.append(Row("decode achieved bandwidth", hw.bandwidth_gbs,
                    dec * (matmul_weights(cfg) * c + plan.inference.kv_bytes_per_token * ctx) / 1e9, "GB/s"))
    return rows


def print_rows(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col, just in (("quantity", "left"), ("predicted", "right"), ("measured", "right"), ("unit", "left"),
                      ("error", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        fmt = (lambda v: "n/a" if v is None else f"{v:,.4g}")
        t.add_row(r.quantity, fmt(r.predicted), fmt(r.measured), r.unit, "n/a" if r.error is None else f"{r.error:+.0%}")
    Console(highlight=False).print(t)


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [{**asdict(r), "error": r.error} for r in rows]


# --- plan --measure: a few real steps of the planned configuration ----------------------------------------------

def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and aliases count once)."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_plan(pc: PlanConfig, device: str | None = None, steps: int = BenchConfig.steps) -> list[Row]:
    """Run `steps` optimizer steps of the planned configuration (after one warm-up) with the training loop's own
    step (`forward_backward`: accumulation over pc.accum_steps micro-batches, token-normalised loss) and put the
    measured memory and throughput next to the plan's.

    Memory on CUDA is the allocator's peak (`torch.cuda.max_memory_allocated`). A CPU has no allocator counter, so
    there the measured figure is what the plan's peak is made of, read from the tensors themselves: the weights,
    gradients and optimizer states held after a step, plus the storages autograd saves for backward in one
    micro-batch (`saved_tensors_hooks`); the plan's transient term is left out of that comparison.
    """
    dev = resolve_device(device)
    if pc.world_size > 1:
        raise GptforgeError("--measure runs on this one device; give --world-size 1 (and --nodes 1) to check the "
                            "per-device plan, then scale out")
    if pc.attention != "sdpa":
        raise GptforgeError("--measure runs gptforge's model, which always uses SDPA attention; give --attention sdpa")
    if pc.precision == "fp16" and dev.type != "cuda":
        raise GptforgeError("fp16 autocast needs CUDA (gptforge's GradScaler path); measure bf16 or fp32 on a CPU")
    hw = get_hardware(pc.hardware) if pc.hardware else device_hardware(dev, None)
    plan = make_plan(pc, hw)

    torch.manual_seed(0)
    model = GPT(pc.model).to(dev, dtype=torch.bfloat16 if pc.precision == "bf16-pure" else None)
    if pc.checkpointing:
        apply_activation_checkpointing(model)
    opt = build_optimizer(model, TrainConfig(optimizer=pc.optimizer), dev.type)  # as train builds it
    amp = autocast_dtype(pc.precision, dev)
    if amp == torch.bfloat16 and resolve_bf16_gemm("auto", pc.precision, dev) == "widened":
        widen_bf16(model)  # as train builds it with train.bf16_gemm auto
    b, t, k = pc.micro_batch, pc.seq_len, pc.accum_steps
    gen = torch.Generator().manual_seed(0)
    batches = [(x[:, :-1], x[:, 1:]) for x in
               (torch.randint(0, pc.model.vocab_size, (b, t + 1), generator=gen) for _ in range(k))]

    def step() -> None:
        forward_backward(model, batches, next_token_loss, dev, amp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = _median_step_s(step, dev, steps)
    tok_s = b * t * k / step_s

    m = plan.memory
    if dev.type == "cuda":
        predicted, measured, what = m.peak_allocated, torch.cuda.max_memory_allocated(dev), "peak allocated"
    else:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(x: torch.Tensor) -> torch.Tensor:
            s = x.untyped_storage()
            if s.data_ptr() not in params:
                saved[s.data_ptr()] = s.nbytes()
            return x

        x, y = batches[0]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), autocast(dev, amp):
            loss, _ = next_token_loss(model, x, y)
        loss.backward()  # leaves gradients, so the states below include them
        states = _storage_bytes([*model.parameters(), *(p.grad for p in model.parameters()),
                                 *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))])
        opt.zero_grad(set_to_none=True)
        predicted = m.weights + m.gradients + m.optimizer + m.activations
        measured, what = states + sum(saved.values()), "states + saved activations"
    return [
        Row(f"train memory ({what})", predicted / 2**30, measured / 2**30, "GiB"),
        Row("train tokens/s", plan.throughput.tokens_per_s, tok_s, "tokens/s"),
        Row("optimizer step time", plan.throughput.step_s, step_s, "s"),
        Row("MFU (give plan --mfu this)", pc.mfu, tok_s * plan.throughput.flops_per_token / hw.peak_flops(pc.precision),
            "fraction"),
    ]
