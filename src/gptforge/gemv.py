"""Few-row CPU matrix products for decoding, over fp32, bf16, fp16, int8 and int4 weights (csrc/gemv.cpp).

A decode step multiplies one row per sequence by every weight matrix, so its speed is the rate at which the
weights stream from memory. The kernels here read each weight once per call, widen it to fp32 in registers
and keep several accumulators busy; they are what `generate` (through `decode_layout`) and the quantized
Linear of `compress/quantize.py` use on CPU for up to MAX_ROWS rows. More rows (a prefill, an evaluation)
go to PyTorch's GEMM, which is faster there. docs/BENCHMARKS.md has the measurements.

The library also holds the attention of a decode step over the KV cache (csrc/attention.cpp,
`torch.ops.gptforge_attn.decode_attention`, used by generate.KVCache) and a whole block's decode step
(csrc/block.cpp, `torch.ops.gptforge_decode.block`, used by DecodeBlock below). The sources are compiled on
first use for the CPU they run on (g++ -O3 -march=native -fopenmp, in parallel, ~20 s on 2 cores) into a cache
folder keyed by the sources, the flags, the torch version and the CPU's flags, then loaded as torch ops.
Without a compiler, or with GPTFORGE_NATIVE_KERNELS=0, `available()` is False and callers keep PyTorch's
kernels: slower, same results.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from gptforge.model import Block, GeluMLP, ReLU2MLP, SwiGLUMLP

MAX_ROWS = 16  # rows per call that csrc/gemv.cpp accepts; from 16 rows on PyTorch's GEMM is as fast
# The matmuls, the attention of a decode step over the KV cache (generate.KVCache uses it) and a whole block's
# decode step (DecodeBlock): one library. HEADERS are hashed with the sources into the library's name.
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("gemv.cpp", "attention.cpp", "block.cpp")]
HEADERS = [Path(__file__).parent / "csrc" / "kernels.h"]
_loaded: bool | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor()


# -fopenmp: at::parallel_for is a header template, so without it the kernels' loops over output rows ran on one
# thread whatever torch.set_num_threads said; libgomp.so.1 is torch's own, already loaded.
FLAGS = ["-O3", "-march=native", "-std=c++20", "-fopenmp", "-fPIC", "-w",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def _library_path() -> Path:
    parts = [*(p.read_bytes() for p in SOURCES + HEADERS), *map(str.encode, FLAGS), torch.__version__.encode(),
             _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts))
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptforge" / "kernels"
    return root / f"gemv-{key.hexdigest()[:16]}.so"


def _build(dest: Path) -> None:
    """Compile csrc/*.cpp into dest, the sources in parallel: written under a temporary name, then renamed (two
    processes building at once each rename a complete file)."""
    from torch.utils import cpp_extension

    dest.parent.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        objects = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        compiles = [subprocess.Popen([cxx, *FLAGS, *includes, "-c", str(src), "-o", str(obj)], stderr=subprocess.PIPE,
                                     text=True) for src, obj in zip(SOURCES, objects)]
        for c, stderr in [(c, c.communicate()[1]) for c in compiles]:  # every compiler finishes before a raise
            _check(c.returncode, stderr)
        so = Path(tmp) / dest.name
        link = subprocess.run([cxx, *FLAGS, "-shared", *map(str, objects), "-o", str(so),
                               *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"],
                              capture_output=True, text=True)
        _check(link.returncode, link.stderr)
        os.replace(so, dest)


def _check(returncode: int, stderr: str) -> None:
    """Raise with the compiler's first error line (the one that names the cause)."""
    if returncode:
        errors = [line for line in stderr.splitlines() if "error" in line] or stderr.strip().splitlines()
        raise RuntimeError(errors[0] if errors else f"exit {returncode}")


def available() -> bool:
    """Whether the kernels are loaded (building them on the first call); False on failure, with one warning."""
    global _loaded
    if _loaded is None:
        _loaded = False
        if os.environ.get("GPTFORGE_NATIVE_KERNELS", "1") == "0" or not sys.platform.startswith("linux"):
            return False
        try:
            path = _library_path()
            if not path.exists():
                _build(path)
            torch.ops.load_library(str(path))
            _loaded = True
        except (OSError, RuntimeError, FileNotFoundError) as e:
            warnings.warn(f"gptforge: the CPU decode kernels (gemv.cpp) could not be built ({e}); decoding uses "
                          "PyTorch's kernels, which are slower. Install g++ to enable them, or set "
                          "GPTFORGE_NATIVE_KERNELS=0 to silence this.", stacklevel=2)
    return _loaded


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


class DecodeLinear(torch.nn.Linear):
    """An nn.Linear (frozen, same parameters) whose forward is one call of `linear`: what
    `generate.decode_layout` swaps in for every Linear of a model decoded on CPU.

    A module swap rather than a weight subclass: the subclass's __torch_function__ cost ~6 us of Python per
    matmul, as much as the product itself for the demo model's in-cache matrices.
    """

    @classmethod
    def of(cls, m: torch.nn.Linear) -> "DecodeLinear":
        new = cls(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        new.weight = torch.nn.Parameter(m.weight.detach().contiguous(), requires_grad=False)
        if m.bias is not None:
            new.bias = torch.nn.Parameter(m.bias.detach(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)  # inductor traces PyTorch's own ops
        return torch.ops.gptforge_gemv.linear(x, self.weight, self.bias)


class DecodeWeight(torch.nn.Parameter):
    """A (frozen) weight (N, K) whose F.linear runs `linear` above; every other op sees a plain tensor and
    returns one. For a matrix that the model multiplies by with F.linear rather than through a Linear module:
    the tied head (`tok_emb.weight`), which is also looked up as the token table.
    """

    @staticmethod
    def wrap(t: torch.Tensor) -> "DecodeWeight":
        return DecodeWeight(t.detach().contiguous(), requires_grad=False)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and type(args[0]) is torch.Tensor and not torch.compiler.is_compiling():
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return linear(args[0], args[1].as_subclass(torch.Tensor), bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


class DecodeBlock(Block):
    """A model.Block (the same submodules) whose one-token CPU decode step over a native KV cache is one C++ call
    (csrc/block.cpp): the same ATen ops as Block.forward, issued from C++, with the matmuls on the kernels here
    and the attention on csrc/attention.cpp. Every other call (a prefill, no cache, training, torch.compile)
    runs Block.forward. `generate.decode_layout` swaps it in where `of` accepts the block.

    Why: the demo model's Python block issues ~20 ops per layer, and at its size their fixed costs, not the
    weights, bound a decode step (docs/BENCHMARKS.md has the before and after).
    """

    @classmethod
    def of(cls, block: Block) -> Block:
        """A DecodeBlock sharing `block`'s submodules, or `block` itself when the op cannot run it: a Linear that
        is not a DecodeLinear (quantized, LoRA), a norm or MLP of another kind, or norms of different eps."""
        attn, mlp = block.attn, block.mlp
        gate = mlp.gate if isinstance(mlp, SwiGLUMLP) else None
        linears = [attn.qkv, attn.proj, mlp.up, mlp.down] + ([gate] if gate is not None else [])
        qk_norms = [n for n in (attn.q_norm, attn.k_norm) if not isinstance(n, torch.nn.Identity)]
        norms = [block.norm1, block.norm2, *qk_norms]
        eps = {n.eps for n in norms}
        runnable = (type(block) is Block and type(mlp) in _MLP_KIND
                    and all(type(m) is DecodeLinear for m in linears)
                    and all(type(n) in (torch.nn.LayerNorm, torch.nn.RMSNorm) for n in norms)
                    and type(block.norm1) is type(block.norm2) and block.norm1.weight is not None
                    and len(eps) == 1 and None not in eps
                    and all(isinstance(d, torch.nn.Identity) for d in (attn.resid_drop, mlp.drop)))
        if not runnable:
            return block
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.training = block.training
        for name, child in block.named_children():
            new.add_module(name, child)
        weight = lambda m: None if isinstance(m, torch.nn.Identity) else m.weight
        # The order csrc/block.cpp reads them in.
        new._params = [block.norm1.weight, getattr(block.norm1, "bias", None), attn.qkv.weight, attn.qkv.bias,
                       attn.proj.weight, attn.proj.bias, weight(attn.q_norm), weight(attn.k_norm), attn.value_gate,
                       block.norm2.weight, getattr(block.norm2, "bias", None), mlp.up.weight, mlp.up.bias,
                       mlp.down.weight, mlp.down.bias, None if gate is None else gate.weight,
                       None if gate is None else gate.bias]
        new._layout = [attn.n_head, attn.n_kv_head, attn.head_dim, int(isinstance(block.norm1, torch.nn.RMSNorm)),
                       _MLP_KIND[type(mlp)]]
        new._eps = float(eps.pop())
        return new

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv=None,
                ve: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if kv is None or x.shape[1] != 1 or self.training or not kv.cache.native or torch.compiler.is_compiling():
            return super().forward(x, rope, kv, ve, mask)
        c = kv.cache
        cos, sin = rope if rope is not None else (None, None)
        return torch.ops.gptforge_decode.block(x, self._params, self._layout, self._eps, kv.k, kv.v, c.slots,
                                               c.mask, cos, sin, ve)


_MLP_KIND = {GeluMLP: 0, SwiGLUMLP: 1, ReLU2MLP: 2}
