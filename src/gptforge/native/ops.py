"""Few-row CPU matrix products for decoding, over fp32, bf16, fp16, int8 and int4 weights (csrc/gemv.cpp), and
int8/int4 products with dynamically quantized activations on the CPU's integer dot products (csrc/qgemv.cpp).

A decode step multiplies one row per sequence by every weight matrix, so its speed is the rate at which the
weights stream from memory. The kernels read each weight once per call, widen it to fp32 in registers and keep
several accumulators busy; the CPU decode layout (layout.py) and the quantized Linear of `compress/quantize.py`
use them for up to MAX_ROWS rows. More rows (a prefill, an evaluation) go to PyTorch's GEMM, which is faster
there. docs/BENCHMARKS.md has the measurements.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gptforge.native.build import available

MAX_ROWS = 16  # rows per call that csrc/gemv.cpp accepts; from 16 rows on PyTorch's GEMM is as fast
# A prompt of up to this many tokens over a native KV cache attends through csrc/attention.cpp (each query's loop
# over its cached keys, whose cost grows as T x T) and runs its layers in the block op, as a decode step does: no
# module calls, no SDPA (whose first call alone left ~2 MB of code resident). Longer prompts keep SDPA, faster there.
PROMPT_TOKENS = 64


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


# --- int8 activations (csrc/qgemv.cpp): the weight-only kernels above are the reference and the other option ----

def linear_int8_dynamic(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, row_sums: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (q * scale[:, None])^T (+ bias) with x quantized to int8 per row (symmetric, max|x| / 127), any number
    of rows: the integer kernels up to MAX_ROWS rows, gemm_path's beyond (AMX tiles where the CPU has them);
    `row_sums` is int8_row_sums(q), computed once per matrix. In x's dtype."""
    return torch.ops.gptforge_qgemv.int8_linear(x, q, scale, row_sums, bias)


def int4_pack(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The layout linear_int4_dynamic reads, made once per matrix from packed int4 codes (as linear_int4) and
    their fp16 scales and minima: tiles of 16 output rows, (ceil(N / 16), groups, 64 + 8 * group) uint8, the same
    bytes per weight. The checkpoint keeps the codes as they are; this is derived from them."""
    return torch.ops.gptforge_qgemv.int4_pack(q, scale, lo)


def linear_int4_dynamic(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ bias) for the int4 matrix of n output rows that int4_pack laid out, x quantized to int8 per group
    of the weight's groups, any number of rows. In x's dtype."""
    return torch.ops.gptforge_qgemv.int4_linear(x, packed, n, bias)


def int8_row_sums(q: torch.Tensor) -> torch.Tensor:
    """The int32 sum of each row of int8 codes (N,): the VNNI paths' correction for their +128 activation offset."""
    return torch.ops.gptforge_qgemv.int8_row_sums(q)


def quant_path() -> str:
    """The instruction set the int8-activation kernels run on: avx512vnni, avxvnni, avx2 or scalar."""
    return str(torch.ops.gptforge_qgemv.isa())


def quant_paths() -> list[str]:
    """Every path this CPU can run, best first (the tests force each in turn)."""
    return list(torch.ops.gptforge_qgemv.isas())


def gemm_path() -> str:
    """What an int8 product of more than MAX_ROWS rows (a prefill) runs: "amx" (AMX tiles), "packed" (the packed
    kernels of quant_path) or "onednn" (PyTorch's int8 GEMM). gemm_label names it as --verbose prints it."""
    return str(torch.ops.gptforge_qgemv.gemm())


def gemm_label() -> str:
    """gemm_path as the paths report it: amx, onednn, or packed-<quant_path> for the packed kernels."""
    path = gemm_path()
    return f"packed-{quant_path()}" if path == "packed" else path


def gemm_paths() -> list[str]:
    """Every many-row path this CPU can run (the tests force each in turn)."""
    return list(torch.ops.gptforge_qgemv.gemms())


@contextmanager
def forced_gemm_path(name: str) -> Iterator[None]:
    """Run int8 products of more than MAX_ROWS rows on `name` (amx, packed, onednn, auto) inside the block (a test
    and benchmark hook; AMX where the CPU or its kernel lacks it is an error), then go back to the one before."""
    before = torch.ops.gptforge_qgemv.set_gemm(name)
    try:
        yield
    finally:
        torch.ops.gptforge_qgemv.set_gemm(before)


@contextmanager
def forced_quant_path(name: str) -> Iterator[None]:
    """Run the int8-activation kernels on path `name` inside the block (a test hook; a path this CPU lacks is an
    error), then go back to the one before."""
    before = torch.ops.gptforge_qgemv.set_isa(name)
    try:
        yield
    finally:
        torch.ops.gptforge_qgemv.set_isa(before)
