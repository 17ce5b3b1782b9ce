"""Few-row CPU matrix products for decoding, over fp32, bf16, fp16, int8 and int4 weights (csrc/gemv.cpp).

A decode step multiplies one row per sequence by every weight matrix, so its speed is the rate at which the
weights stream from memory. The kernels read each weight once per call, widen it to fp32 in registers and keep
several accumulators busy; the CPU decode layout (layout.py) and the quantized Linear of `compress/quantize.py`
use them for up to MAX_ROWS rows. More rows (a prefill, an evaluation) go to PyTorch's GEMM, which is faster
there. docs/BENCHMARKS.md has the measurements.
"""

from __future__ import annotations

import torch

from gptforge.native.build import available

MAX_ROWS = 16  # rows per call that csrc/gemv.cpp accepts; from 16 rows on PyTorch's GEMM is as fast


def usable(x: torch.Tensor) -> bool:
    """Whether a matmul of x (..., K) can run here: on CPU, at most MAX_ROWS rows, outside torch.compile."""
    return (x.device.type == "cpu" and x.numel() <= MAX_ROWS * x.shape[-1] and not torch.compiler.is_compiling()
            and available())


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def _bias(b: torch.Tensor | None) -> torch.Tensor | None:
    return None if b is None else b.float().contiguous()


def _out(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for an fp32 / bf16 / fp16 weight (N, K), in x's dtype, accumulated in fp32: the
    kernels for up to MAX_ROWS rows, PyTorch's GEMM for more (both decided in C++, in one call)."""
    return torch.ops.gptforge_gemv.linear(x, w, bias)


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (q * scale[:, None])^T (+ bias) for int8 codes q (N, K) and fp32 scales (N,)."""
    return _out(torch.ops.gptforge_gemv.gemv_int8(_rows(x), q, scale, _bias(bias)), x)


def linear_int4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ bias) for int4 codes packed as quantize.int4_codes packs them (N, K/2), w = code * scale + lo
    per group, scale and lo fp16 (N, groups)."""
    return _out(torch.ops.gptforge_gemv.gemv_int4(_rows(x), q, scale, lo, _bias(bias)), x)
