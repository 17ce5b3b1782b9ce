"""Quantization (int8 per output channel, int4 in groups; activations int8 per row when multiplied) and
bf16/fp16 casts.

Compression is a state-dict transform plus a module swap (gpt-fast's `quantize.py` shape):
`quantize_state_dict` turns fp32 matrices into integer codes and scales; `swap_modules` replaces each
nn.Linear / nn.Embedding of a (meta-device) GPT with a module whose buffers have exactly those names, so the
quantized file loads with `load_state_dict(assign=True)`. The checkpoint records what was done in the run
config's `compression` section, and `gptforge.loader` swaps before it loads: `generate` and `eval` need no change.

The output head is quantized too: it is the largest matrix of a small-vocabulary-heavy model (V x D). With
tied embeddings the head *is* the token table, so the shared table is quantized once (rows are both the
lookup and the head's output channels) rather than stored twice: a second copy would cost more file than
quantizing saves. The head is a module swap like the others: an untied head is a Linear (a QuantLinear), a
tied one (model.TiedHead) becomes a QuantTiedHead that multiplies by the quantized table's codes.
The learned position table (block_size x D, one row read per token) stays fp32: it is small and pays nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.config import CompressionConfig, section_from_dict
from gptforge.errors import GptforgeError
from gptforge.model import TiedHead
from gptforge.native import DecodeLinear, DecodeTiedHead
from gptforge.native import ops as native
from gptforge.native.schema import CodedLinear, CodedTable, OpLinear, OpTable
from gptforge.settings import INT4_GROUP_SIZE, INT4_GROUP_SIZES

METHODS = ("int8", "int4", "bf16", "fp16")
CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_method(method: str, group_size: int | None = None) -> None:
    if method not in METHODS:
        raise GptforgeError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    if group_size is not None and method != "int4":
        raise GptforgeError(f"--group-size applies to int4 only, not {method}; leave it out")
    if method == "int4" and group_size is not None and group_size not in INT4_GROUP_SIZES:
        raise GptforgeError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")


def check_activations(activations: str, method: str | None = None) -> None:
    if activations not in ACTIVATIONS:
        raise GptforgeError(f"unknown activation quantization {activations!r}; use one of {', '.join(ACTIVATIONS)}")
    if method is not None and method in CASTS:
        raise GptforgeError(f"--activations applies to int8 and int4, not {method}; leave it out")


# --- the codes: w ~ q * scale (int8, symmetric per row); w ~ q * scale + lo (int4, asymmetric per group) ----

def int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (N, K) and fp32 scales (N,) with w ~ q * scale[:, None]; max error scale / 2 per row."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes 0..15 packed two per byte (N, K/2), and fp16 scales and minima (N, K/group): w ~ q * scale + lo.

    Asymmetric (min/max) groups spend all 16 levels on each group's actual range, which matters at 4 bits
    (the round-to-nearest baseline of GPTQ, Frantar et al. 2022). Scale and minimum are stored in fp16 and
    the codes are chosen against those rounded values, so the stored model is exactly what was measured.
    """
    n, k = w.shape
    if k % group:
        raise GptforgeError(f"int4 group size {group} does not divide the input width {k}; use a group size that divides {k} (32, 64 or 128)")
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6).half()
    lo = lo.half()
    q = torch.round((wg - lo.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
    # Byte j of a group holds code j (high nibble) and code j + group/2 (low nibble): the compiled GEMV below then
    # multiplies each nibble plane by a contiguous half of the group's inputs, which vectorizes; the
    # neighbour-pair packing it replaced did not (3x slower, docs/compress.md).
    halves = q.view(n, k // group, 2, group // 2)
    return ((halves[:, :, 0] << 4) | halves[:, :, 1]).view(n, k // 2), scale, lo


INT4_PACKING = "group-halves"  # recorded in the checkpoint, so that a later change of layout is caught on load


def unpack_int4(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Codes 0..15 (N, K) of packed int4 rows (N, K/2) quantized in `groups` groups per row."""
    n = packed.shape[0]
    planes = packed.view(n, groups, 1, -1)  # (N, groups, 1, group/2)
    return torch.cat((planes >> 4, planes & 15), dim=2).view(n, -1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """The fp matrix the codes stand for (int8 when lo is None, else packed int4)."""
    if lo is None:
        return q * scale.to(dtype)[..., None]  # one kernel: the int8 codes promote to dtype as they are read
    codes = unpack_int4(q, scale.shape[-1])
    n, k = codes.shape
    g = k // scale.shape[-1]
    w = codes.view(n, -1, g).to(dtype) * scale.to(dtype)[..., None] + lo.to(dtype)[..., None]
    return w.view(n, k)


# --- the matmul ---------------------------------------------------------------------------------------------
# Three paths, chosen when the modules are built (`kernel`, KERNELS below): the few-row CPU kernels of
# gptforge/native (csrc/gemv.cpp), which widen each code in registers; PyTorch's CPU weight-only kernels
# (torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu); or dequantize then F.linear (any device, any
# number of rows).
#
# Which one a QuantLinear runs on CPU in fp32 for up to native.MAX_ROWS rows (decoding), by measurement on the CI
# CPU (one thread, docs/compress.md): "native" (the kernels, which widen the codes in registers and read 1 or 0.5
# bytes a weight; the default), falling back to "aten" for one row when they could not be built (PyTorch's int8/int4
# weight-only CPU kernels: 5-10x slower than the fp32 GEMV at d=768, but they read 1 or 0.5 bytes a weight); "aten"
# skips the native kernels, "dequant" both. More rows (prefill, evaluation) always dequantize: one pass over the
# matrix, shared by every row (1024 rows: 0.8 ms vs 64 ms with the aten kernels).
KERNELS = ("native", "aten", "dequant")
#
# Activations (the checkpoint's `activations`, ACTIVATIONS below): "dynamic" (the default) quantizes each input
# row to int8 when the product is made (symmetric, max|x| / 127; per group of the weight's groups for int4) and
# multiplies on the CPU's integer dot products (native/csrc/qgemv.cpp: AVX-512 VNNI, AVX-VNNI or AVX2, picked at
# run time; int8 prefills on AMX tiles where the CPU has them: native.gemm_path()). It computes the fp32 product of
# the quantize-dequantized activations with the dequantized weights, reads the same 1 or 0.5 bytes a weight and
# multiplies 4-8x more weights per cycle than widening them to fp32 (docs/BENCHMARKS.md). Its error on top of the
# weights' is half an activation step per input; Δ perplexity stays within the weight-only bounds
# (tests/test_compress.py).
# "weight-only" keeps the fp32 activations (the KERNELS paths above): the reference, and the numerics on every
# device where the integer kernels do not run (CUDA, no compiler, torch.compile).
ACTIVATIONS = ("dynamic", "weight-only")


def quantize_activations(x: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """x with each row (or each group of `group` inputs) rounded to its int8 grid, back in x's dtype: exactly the
    activations the dynamic kernels multiply (round half to even of x / s, s = max(max|x| / 127, 1e-12), in fp32)."""
    xf = x.float()
    xs = xf.reshape(*x.shape[:-1], -1, group or x.shape[-1])
    s = (xs.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return (torch.round(xs / s).clamp(-127, 127) * s).reshape(x.shape).to(x.dtype)


def _int4_kernel_args(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor):
    """Codes in the layout of torch._weight_int4pack_mm_for_cpu, and its (K/g, N, 2) scale/zero table, where
    the kernel's convention is w = (q - 8) * scale + zero, i.e. zero = lo + 8 * scale."""
    codes = unpack_int4(q, scale.shape[-1]).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack((scale.float().t(), (lo.float() + 8 * scale.float()).t()), dim=-1).contiguous()
    return packed, sz


class QuantizedMatrix(nn.Module):
    """Shared by the Linear and Embedding replacements: the codes, their dequantization, the matmul."""

    def __init__(self, out_features: int, in_features: int, method: str, group_size: int | None, device=None,
                 kernel: str = "native", activations: str = "dynamic"):
        super().__init__()
        if kernel not in KERNELS:
            raise GptforgeError(f"unknown quantized matmul kernel {kernel!r}; use one of {', '.join(KERNELS)}")
        check_activations(activations)
        self.shape = torch.Size((out_features, in_features))
        self.method, self.group_size, self.kernel, self.activations = method, group_size, kernel, activations
        self._row_sums = None  # int8, dynamic: each code row's sum, computed on first use
        self._packed = None  # int4, dynamic: the codes, scales and minima in native.int4_pack's tiles, on first use
        if method == "int8":
            self.register_buffer("weight_q", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, device=device))
            self.zeros = None
        else:
            groups = in_features // group_size
            self.register_buffer("weight_q", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self._kernel_cache = None

    def _apply(self, fn, recurse=True):
        # Scales (fp32 for int8, fp16 for int4) and minima are part of the format the kernels read: a model-wide
        # .float() / .bfloat16() (gptforge.load's dtype) must not cast them. A move to another device applies.
        # They are held out of fn rather than cast and restored: casting would read every scale page of a mapped
        # checkpoint at load (gptforge.load's dtype) only to throw the copies away (int4 gpt2: 13 MB read, 25 MB).
        keep = {k: self._buffers.pop(k) for k in ("scales", "zeros") if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for k, v in keep.items():  # back in their order, after weight_q: the state dict's keys keep theirs
            self._buffers[k] = v.to(fn(v.new_empty(0)).device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._row_sums = self._packed = self._kernel_cache = None  # derived from the codes being replaced
        super()._load_from_state_dict(*args, **kwargs)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.weight_q, self.scales, self.zeros, dtype)

    def path(self, x: torch.Tensor) -> str:
        """Which product a call with input x runs: "int8-dynamic:avx512vnni", "int8-dynamic:amx" (many rows),
        "weight-only:native", ... (int4 dynamic runs its kernels for any number of rows)"""
        rows = x.numel() // max(x.shape[-1], 1)
        if self._dynamic(x):
            if rows <= native.MAX_ROWS or self.method == "int4":
                return f"{self.method}-dynamic:{native.quant_path()}"
            return f"{self.method}-dynamic:{native.gemm_label()}"
        if self.kernel == "native" and x.dtype == torch.float32 and native.usable(x):
            return "weight-only:native"
        one_row = x.device.type == "cpu" and x.dtype == torch.float32 and rows == 1
        return "weight-only:aten" if one_row and self.kernel in ("native", "aten") else "weight-only:dequant"

    def _dynamic(self, x: torch.Tensor) -> bool:
        # Not when a gradient must reach x: the integer ops have none (rounding would zero it anyway).
        return (self.activations == "dynamic" and self.kernel == "native" and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16) and not (x.requires_grad and torch.is_grad_enabled())
                and not torch.compiler.is_compiling() and native.available())

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._dynamic(x):
            return self._dynamic_matmul(x, bias)
        if self.kernel == "native" and x.dtype == torch.float32 and native.usable(x):
            if self.method == "int8":
                return native.linear_int8(x, self.weight_q, self.scales, bias)
            return native.linear_int4(x, self.weight_q, self.scales, self.zeros, bias)
        one_row = x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() == x.shape[-1]
        if one_row and self.kernel in ("native", "aten"):
            y = self._aten_matmul(x)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y if bias is None else y + bias.to(y.dtype)

    def _dynamic_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.method == "int8":
            if self._row_sums is None:
                self._row_sums = native.int8_row_sums(self.weight_q)
            return native.linear_int8_dynamic(x, self.weight_q, self.scales, self._row_sums, bias)
        if self._packed is None:
            self._packed = native.int4_pack(self.weight_q, self.scales, self.zeros)
        return native.linear_int4_dynamic(x, self._packed, self.shape[0], bias)  # any rows: a prefill too

    def _aten_matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.method == "int8":
            y = torch._weight_int8pack_mm(flat, self.weight_q, self.scales.to(x.dtype))
        else:
            if self._kernel_cache is None:
                self._kernel_cache = _int4_kernel_args(self.weight_q, self.scales, self.zeros)
            packed, sz = self._kernel_cache
            y = torch._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, sz)
        return y.view(*x.shape[:-1], self.shape[0])

    def op_linear_with(self, bias: torch.Tensor | None) -> OpLinear | None:
        """What the native ops multiply for this matrix (native.schema.OpLinear): the tensors of the product
        `matmul` runs for a few fp32 rows on CPU; None for the "aten" / "dequant" kernel choices."""
        if self.kernel != "native":
            return None
        if self.activations == "weight-only":
            return OpLinear(f"{self.method}-weight-only", self.weight_q, bias, self.scales, self.zeros)
        if self.method == "int8":
            if self._row_sums is None:
                self._row_sums = native.int8_row_sums(self.weight_q)
            return OpLinear("int8-dynamic", self.weight_q, bias, self.scales, self._row_sums)
        if self._packed is None:
            self._packed = native.int4_pack(self.weight_q, self.scales, self.zeros)
        return OpLinear("int4-dynamic", self._packed, bias)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized rows idx of the matrix (an embedding lookup reads only those)."""
        q, s = self.weight_q[idx], self.scales[idx]
        z = None if self.zeros is None else self.zeros[idx]
        flat = dequantize(q.reshape(-1, q.shape[-1]), s.reshape(-1, *s.shape[idx.dim():]),
                          None if z is None else z.reshape(-1, *z.shape[idx.dim():]))
        return flat.view(*idx.shape, self.shape[1])

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"out={self.shape[0]}, in={self.shape[1]}, {self.method}{g}, activations={self.activations}"


class QuantLinear(QuantizedMatrix, CodedLinear):
    def __init__(self, linear: nn.Linear, method: str, group_size: int | None, kernel: str = "native",
                 activations: str = "dynamic"):
        super().__init__(linear.out_features, linear.in_features, method, group_size, linear.weight.device, kernel,
                         activations)
        self.bias = linear.bias  # fp32, as are norms: they are a rounding error of the size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def op_linear(self) -> OpLinear | None:
        """What the native block op multiplies for this Linear (native.schema.CodedLinear)."""
        return self.op_linear_with(self.bias)


class QuantEmbedding(QuantizedMatrix, CodedTable):
    def __init__(self, emb: nn.Embedding, method: str, group_size: int | None, kernel: str = "native",
                 activations: str = "dynamic"):
        super().__init__(emb.num_embeddings, emb.embedding_dim, method, group_size, emb.weight.device, kernel,
                         activations)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.rows(idx)

    def op_table(self) -> OpTable:
        """The codes `rows` dequantizes, as the native step op reads them (native.schema.CodedTable)."""
        return OpTable(self.weight_q, self.scales, self.zeros)


class QuantTiedHead(TiedHead, CodedLinear):
    """The tied head of a quantized model: logits from the quantized token table's codes (its rows are the
    head's output channels), with the table's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.matmul(x)

    def op_linear(self) -> OpLinear | None:
        """The table's product, as the native step op multiplies it (native.schema.CodedLinear)."""
        return self.table.op_linear_with(None)




_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def matmul_paths(model: nn.Module, rows: int) -> dict[str, int]:
    """How many of `model`'s matrix products run on each path (QuantizedMatrix.path's names; "fp32:native" /
    "bf16:native" / "fp32:aten" for float Linears and heads) for an input of `rows` rows on its device: what
    `gptforge generate --verbose` prints and the benchmarks record."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantTiedHead) or isinstance(m, QuantLinear):
            mat = m.table if isinstance(m, QuantTiedHead) else m
            path = mat.path(torch.empty(rows, mat.shape[1], device=mat.weight_q.device))
        elif isinstance(m, (nn.Linear, TiedHead)):
            w = m.table.weight if isinstance(m, TiedHead) else m.weight
            kernels = w.device.type == "cpu" and rows <= native.MAX_ROWS and isinstance(m, (DecodeLinear, DecodeTiedHead))
            path = f"{_DTYPE_NAMES.get(w.dtype, str(w.dtype))}:{'native' if kernels else 'aten'}"
        else:
            continue
        out[path] = out.get(path, 0) + 1
    return out


def matmul_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix product's weight as loaded (a quantized one's codes,
    scales and minima). A lookup reads one row of a token table, so a table counts only as a tied head. The
    decode benchmarks divide it by a token's time for their GB/s."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantEmbedding):
            continue
        if isinstance(m, QuantTiedHead):
            m = m.table
        if isinstance(m, QuantizedMatrix):
            total += sum(t.numel() * t.element_size() for t in (m.weight_q, m.scales, m.zeros) if t is not None)
        elif isinstance(m, (nn.Linear, TiedHead)):
            w = m.table.weight if isinstance(m, TiedHead) else m.weight
            total += w.numel() * w.element_size()
    return total


# --- the state-dict transform and the module swap ------------------------------------------------------------

def _targets(model: nn.Module) -> dict[str, nn.Module]:
    """Modules to quantize: every nn.Linear, and the token table (the head, when tied; else the embedding)."""
    out = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out["tok_emb"] = model.tok_emb
    return out


def _check_group(model: nn.Module, group_size: int) -> None:
    for name, m in _targets(model).items():
        width = m.in_features if isinstance(m, nn.Linear) else m.embedding_dim
        if width % group_size:
            raise GptforgeError(f"int4 group size {group_size} does not divide the input width {width} of {name}; "
                                f"use a group size that divides every width (32 divides {width} if it is a multiple of 32)")


def quantize_state_dict(model: nn.Module, method: str, group_size: int | None = None) -> dict[str, torch.Tensor]:
    """The state dict of `model` (a plain fp GPT) with its matrices replaced by codes and scales (or cast)."""
    check_method(method, group_size)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if method in CASTS:
        return {k: v.to(CASTS[method]) if v.is_floating_point() else v for k, v in state.items()}
    if method == "int4":
        group_size = group_size or INT4_GROUP_SIZE
        _check_group(model, group_size)
    for name in _targets(model):
        w = state.pop(f"{name}.weight")
        if method == "int8":
            state[f"{name}.weight_q"], state[f"{name}.scales"] = int8_codes(w)
        else:
            state[f"{name}.weight_q"], state[f"{name}.scales"], state[f"{name}.zeros"] = int4_codes(w, group_size)
    return state


def swap_modules(model: nn.Module, section: dict[str, Any], kernel: str = "native") -> nn.Module:
    """Replace the modules of `model` that a quantized state dict (as recorded in `section`) has codes for, their
    matmuls on `kernel` (KERNELS); a tied head follows its table. In place; works on a meta-device model, whose new
    buffers are then assigned by load_state_dict."""
    method, group = section["method"], section.get("group_size")
    activations = section.get("activations") or "dynamic"
    if method in CASTS:
        return model
    for name, m in _targets(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quant = QuantLinear if isinstance(m, nn.Linear) else QuantEmbedding
        setattr(parent, attr, quant(m, method, group, kernel, activations))
    if type(getattr(model, "lm_head", None)) is TiedHead:
        model.lm_head = QuantTiedHead(model.tok_emb)
    return model


def quantize_model(model: nn.Module, method: str, group_size: int | None = None,
                   activations: str | None = None) -> tuple[nn.Module, dict[str, Any], dict]:
    """A quantized copy of `model` (built on meta, loaded with assign=True, exactly as a checkpoint loads),
    its `compression` section and its state dict. `activations` (ACTIVATIONS; int8/int4 only) is recorded in the
    section when given; absent, the model multiplies with dynamic activations."""
    from gptforge.model import GPT

    if activations is not None:
        check_activations(activations, method)
    state = quantize_state_dict(model, method, group_size)
    int4 = {"group_size": group_size or INT4_GROUP_SIZE, "packing": INT4_PACKING} if method == "int4" else {}
    acts = {"activations": activations} if activations is not None else {}
    section = {"quantization": {"method": method, **int4, **acts}}
    with torch.device("meta"):
        new = GPT(model.config)
    apply_compression(new, section_from_dict(CompressionConfig, section, "compression"))
    new.load_state_dict(state, assign=True)
    return new.eval(), section, state


def apply_compression(model: nn.Module, section: CompressionConfig | None) -> nn.Module:
    """Prepare a freshly built (meta) GPT for a compressed checkpoint's state dict: the swap gptforge.loader applies."""
    q = None if section is None else section.quantization
    if q is None:
        return model
    check_method(q.method, q.group_size)
    if q.activations is not None:
        check_activations(q.activations, q.method)
    if q.method == "int4" and q.packing != INT4_PACKING:
        raise GptforgeError(f"this int4 checkpoint packs its codes as {q.packing or 'neighbour pairs'!r}, which "
                            f"this gptforge no longer reads ({INT4_PACKING!r}); quantize its fp32 parent again")
    return swap_modules(model, q.to_dict())
