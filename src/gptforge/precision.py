"""Which precision a training run computes in, and bf16 matmuls on CPUs whose bf16 GEMM is the slow one.

`resolve_precision` turns `train.precision` into what runs on the device; `autocast` is the context every
forward (training and evaluation) runs under.

On a CPU without AMX, oneDNN's bf16 GEMM can run at half the rate of the fp32 one (measured here: 148 vs 290
GFLOP/s, docs/BENCHMARKS.md), although the two compute the same thing: a product of two bf16 numbers is exact
in fp32 (8-bit significands, 16-bit product), and oneDNN accumulates bf16 products in fp32. So `widen_bf16`
swaps a model's Linears, tied head and attention for versions that, under CPU bf16 autocast, run as autocast
would (operands rounded to bf16, result rounded to bf16, and in backward the gradients rounded where autocast
rounds them) but with the bf16 operands widened to fp32 for the fp32 kernels. The results equal native bf16
autocast up to the order of the fp32 additions (a bf16 ulp at most, tested), activations saved for backward stay
bf16 for the linears, and the state dict is unchanged. Outside CPU bf16 autocast the swapped modules compute
exactly what the plain ones do.

Whether to widen is the run's `train.bf16_gemm` (native | widened | auto); `resolve_bf16_gemm` turns auto into
a choice by timing both once per process (`measure_bf16_gemm`), and train records that choice in the run's saved
config, so a rerun of that config takes the same numerics.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.errors import GptforgeError
from gptforge.model import CausalSelfAttention, TiedHead

BF16 = torch.bfloat16
BF16_GEMMS = ("auto", "native", "widened")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 autocast on CUDA and fp32 elsewhere: on CPUs without AMX, bf16 autocast measured
    slower than fp32 (docs/BENCHMARKS.md). fp16 needs a GradScaler, which gptforge runs on CUDA only."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise GptforgeError(f"train.precision fp16 needs a CUDA device (this run is on {device.type}); use bf16 or fp32")
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision, or None where no autocast runs (fp32, bf16-pure)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device))


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing for None. (Widened bf16 matmuls are the model's own modules,
    swapped in by `widen_bf16`, not part of this context.)"""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def resolve_bf16_gemm(choice: str, precision: str, device: torch.device) -> str:
    """`train.bf16_gemm` as a run uses it: native or widened for bf16 autocast on CPU (auto measured here, once per
    process), and `choice` unchanged where it does not apply (other precisions, other devices)."""
    if choice not in BF16_GEMMS:
        raise GptforgeError(f"train.bf16_gemm {choice!r}; use auto, native or widened")
    if choice != "auto" or device.type != "cpu" or resolve_precision(precision, device) != "bf16":
        return choice
    return measure_bf16_gemm()


@functools.cache
def measure_bf16_gemm() -> str:
    """"widened" if this CPU multiplies bf16 matrices faster through fp32 GEMMs on widened operands than through
    its own bf16 GEMM, else "native": one measurement of each (~0.2 s)."""
    # A training-sized product (a micro-batch of 1024 positions through a 1024-wide layer), with the widening
    # and the rounding of the result counted against the widened path.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1024, generator=gen).to(BF16)
    w = torch.randn(1024, 1024, generator=gen).to(BF16)
    paths = {"native": lambda: F.linear(x, w), "widened": lambda: F.linear(x.float(), w.float()).to(BF16)}
    best = dict.fromkeys(paths, float("inf"))
    for fn in paths.values():
        fn()  # warm-up: thread pool, kernel selection
    for _ in range(8):  # alternating, best of each: robust to other work on the same cores
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return "widened" if best["widened"] < best["native"] else "native"


class _WidenedLinear(torch.autograd.Function):
    """F.linear as bf16 autocast computes it, on fp32 kernels. Saves the bf16 operands, as autocast does."""

    @staticmethod
    def forward(ctx, x, w, b):
        xb, wb = x.to(BF16), w.to(BF16)
        with torch.autocast("cpu", enabled=False):
            y = F.linear(xb.float(), wb.float(), None if b is None else b.to(BF16).float()).to(BF16)
        ctx.save_for_backward(xb, wb)
        ctx.dtypes = (x.dtype, w.dtype, None if b is None else b.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        xb, wb = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        gx = gw = gb = None
        # Autocast's backward yields bf16 gradients for the bf16 operands, which the casts' backward then
        # carries to the original dtypes: round to bf16 first, so the numbers are autocast's.
        with torch.autocast("cpu", enabled=False):
            g32 = g.to(BF16).float()
            if ctx.needs_input_grad[0]:
                gx = (g32 @ wb.float()).to(BF16).to(x_dtype)
            g2 = g32.reshape(-1, g32.shape[-1])
            if ctx.needs_input_grad[1]:
                gw = (g2.T @ xb.reshape(-1, xb.shape[-1]).float()).to(BF16).to(w_dtype)
            if b_dtype is not None and ctx.needs_input_grad[2]:
                gb = g2.sum(0).to(BF16).to(b_dtype)
        return gx, gw, gb


def _rounded(t: torch.Tensor | None) -> torch.Tensor | None:
    """A floating operand as autocast would hand it to a bf16 kernel, widened back to fp32 (autograd tracks
    both casts, so its gradient is rounded to bf16 on the way back, as under autocast)."""
    if t is None or not t.is_floating_point():
        return t
    return t.to(BF16).float()


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16


def widened_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b); under CPU bf16 autocast, as autocast computes it but on fp32 kernels."""
    if x.device.type == "cpu" and x.is_floating_point() and _bf16_autocast():
        return _WidenedLinear.apply(x, w, b)
    return F.linear(x, w, b)


def widened_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None, dropout_p=0.0,
                 is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """F.scaled_dot_product_attention; under CPU bf16 autocast, on fp32 kernels with bf16-rounded operands."""
    kw = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if query.device.type != "cpu" or not _bf16_autocast():
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kw)
    with torch.autocast("cpu", enabled=False):
        # Attention saves its inputs for backward: these are fp32 copies (autograd owns the casts), twice what
        # native bf16 attention keeps, for ~1.6x the speed on such CPUs.
        y = F.scaled_dot_product_attention(_rounded(query), _rounded(key), _rounded(value),
                                           attn_mask=_rounded(attn_mask), **kw)
    return y.to(BF16)


class WidenedLinear(nn.Linear):
    """An nn.Linear (the same parameters) whose product runs `widened_linear`."""

    @classmethod
    def of(cls, m: nn.Linear) -> "WidenedLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.weight, new.bias = m.in_features, m.out_features, m.weight, m.bias
        new.training = m.training
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return widened_linear(x, self.weight, self.bias)


class WidenedTiedHead(TiedHead):
    """A tied head whose product with the token table runs `widened_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return widened_linear(x, self.table.weight)


def widen_bf16(model: nn.Module) -> nn.Module:
    """Swap (in place) every plain nn.Linear for a WidenedLinear, a tied head for a WidenedTiedHead and each
    attention's SDPA for `widened_sdpa`: for a run whose `train.bf16_gemm` resolved to widened. Parameters and
    state dict keys are unchanged; other Linear kinds (LoRA's) keep autocast's native bf16 GEMM."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, WidenedLinear.of(child))
            elif type(child) is TiedHead:
                setattr(parent, name, WidenedTiedHead(child.table))
            elif isinstance(child, CausalSelfAttention):
                child.sdpa = widened_sdpa
    return model
