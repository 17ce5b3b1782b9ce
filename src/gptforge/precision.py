"""Which precision a training run computes in, and bf16 matmuls on CPUs whose bf16 GEMM is the slow one.

`resolve_precision` turns `train.precision` into what runs on the device; `autocast` is the context every
forward (training and evaluation) runs under.

On a CPU without AMX, oneDNN's bf16 GEMM can run at half the rate of the fp32 one (measured here: 148 vs 290
GFLOP/s, docs/BENCHMARKS.md), although the two compute the same thing: a product of two bf16 numbers is exact
in fp32 (8-bit significands, 16-bit product), and oneDNN accumulates bf16 products in fp32. So under bf16
autocast on such a CPU, `autocast` also enters `WidenedBF16`, a torch-function mode that runs each `F.linear`
and `F.scaled_dot_product_attention` as autocast would (operands rounded to bf16, result rounded to bf16, and
in backward the gradients rounded where autocast rounds them) but with the bf16 operands widened to fp32 for
the fp32 kernels. The results equal native bf16 autocast up to the order of the fp32 additions (a bf16 ulp at
most, tested), activations saved for backward stay bf16 for the linears, and the model file knows nothing of
it. Whether to widen is decided by measuring both once per process (`widen_bf16_gemm`);
GPTFORGE_BF16_GEMM=native|widened overrides the measurement.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gptforge.errors import GptforgeError

BF16 = torch.bfloat16


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
    """Autocast to `dtype` on `device` (nothing for None), with bf16 matmuls widened where that is faster."""
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == BF16 and widen_bf16_gemm():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cpu", dtype=BF16))
        stack.enter_context(WidenedBF16())
        return stack
    return torch.autocast(device.type, dtype=dtype)


@functools.cache
def widen_bf16_gemm() -> bool:
    """True if this CPU multiplies bf16 matrices faster through fp32 GEMMs on widened operands than through its
    own bf16 GEMM: GPTFORGE_BF16_GEMM=widened|native decides, otherwise one measurement of each (~0.2 s)."""
    choice = os.environ.get("GPTFORGE_BF16_GEMM", "auto")
    if choice not in ("auto", "native", "widened"):
        raise GptforgeError(f"GPTFORGE_BF16_GEMM={choice!r}; use auto, native or widened")
    if choice != "auto":
        return choice == "widened"
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
    return best["widened"] < best["native"]


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


def widened_active() -> int:
    """Non-zero while a WidenedBF16 mode is entered in this thread. A block recomputed by activation
    checkpointing must take the same path as its forward did (same saved tensors), and the recomputation runs
    in backward, outside the forward's context: distributed.apply_activation_checkpointing re-enters it."""
    return getattr(WidenedBF16._active, "depth", 0)


_SDPA_SIGNATURE = inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    scale=None, enable_gqa=False: None)


class WidenedBF16(TorchFunctionMode):
    """Under CPU bf16 autocast: F.linear and scaled-dot-product attention on fp32 kernels with bf16 operands
    (see the module docstring). Every other function runs untouched."""

    _active = threading.local()  # how many are entered in this thread: activation checkpointing asks

    def __enter__(self):
        WidenedBF16._active.depth = widened_active() + 1
        return super().__enter__()

    def __exit__(self, *exc):
        WidenedBF16._active.depth = widened_active() - 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != BF16:
            return func(*args, **kwargs)
        if func is F.linear:
            x, w, *rest = args
            b = rest[0] if rest else kwargs.get("bias")
            if x.device.type == "cpu" and x.is_floating_point():
                return _WidenedLinear.apply(x, w, b)
        elif func is F.scaled_dot_product_attention:
            bound = _SDPA_SIGNATURE.bind(*args, **kwargs).arguments
            q, k, v = (bound.pop(n) for n in ("query", "key", "value"))
            if q.device.type == "cpu":
                mask = bound.pop("attn_mask", None)
                with torch.autocast("cpu", enabled=False):
                    # Attention saves its inputs for backward: these are fp32 copies (autograd owns the
                    # casts), twice what native bf16 attention keeps, for ~1.6x the speed on such CPUs.
                    y = F.scaled_dot_product_attention(_rounded(q), _rounded(k), _rounded(v),
                                                       attn_mask=_rounded(mask), **bound)
                return y.to(BF16)
        return func(*args, **kwargs)
