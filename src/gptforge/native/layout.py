"""The CPU decode layout: module swaps that route a model's decode steps through the native ops.

`decode_layout(model)` replaces each nn.Linear by a DecodeLinear (same parameters, its forward one call of the
few-row `linear` op), the tied head by a DecodeTiedHead (the same, on the token table) and each block whose
variant the block op covers by a DecodeBlock (its decode step, and a short prompt's layer, as one native call,
csrc/step.cpp).
State dict keys never change. Swaps rather than tensor subclasses: a weight subclass's __torch_function__ cost
~6 us of Python per matmul, as much as the product itself for the demo model's in-cache matrices.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.model import Block, TiedHead
from gptforge.native.build import available
from gptforge.native import ops
from gptforge.native.ops import MAX_ROWS
from gptforge.native.schema import (MLP_KIND, NORM_KIND, AdaptedLinear, BlockLayout, BlockParams, CodedLinear,
                                    named_linears)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous(), requires_grad=False)


class DecodeLinear(nn.Linear):
    """An nn.Linear (frozen, same parameters) whose forward is one call of the native `linear` op."""

    @classmethod
    def of(cls, m: nn.Linear) -> "DecodeLinear":
        new = cls(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        new.weight = _frozen(m.weight)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)  # inductor traces PyTorch's own ops
        return torch.ops.gptforge_gemv.linear(x, self.weight, self.bias)


class DecodeTiedHead(TiedHead):
    """A tied head whose product with the (frozen) token table is one call of the native `linear` op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return F.linear(x, self.table.weight)
        return torch.ops.gptforge_gemv.linear(x, self.table.weight, None)


def _native_linear(m: nn.Module) -> bool:
    """A DecodeLinear, an AdaptedLinear (LoRA adapters served per row) whose fused Linear is one, or a quantized
    Linear whose product the op has (its kernel choice "native")."""
    return (type(m) is DecodeLinear or (isinstance(m, AdaptedLinear) and type(m.fused) is DecodeLinear)
            or (isinstance(m, CodedLinear) and m.op_linear() is not None))


def _selections(linears: list[nn.Module]) -> list:
    """The distinct row selections of a block's AdaptedLinears (one AdapterSet: at most one)."""
    return list({id(m.selection): m.selection for m in linears if isinstance(m, AdaptedLinear)}.values())


def _linears(block: Block) -> list[nn.Module]:
    return [m for _, m in named_linears(block) if m is not None]


def _runnable(block: nn.Module) -> bool:
    """Whether the block op computes this block: a plain Block whose Linears are all DecodeLinears, AdaptedLinears
    over one (adapters of one AdapterSet) or quantized ones the op multiplies, norms and MLP of the kinds the op
    knows, one eps for every norm, no dropout. The imported families' variants need no check here: a sliding
    window lives in the KV cache's mask, which the op reads; Qwen2's q/k/v biases without an output bias are the
    schema's separate qkv_bias / proj_bias; Llama 3 RoPE scaling changes only the rotary tables the op is handed
    (tests/test_families.py compares the op's decode with a forward)."""
    if type(block) is not Block:
        return False
    attn, mlp = block.attn, block.mlp
    linears = _linears(block)
    norms = [block.norm1, block.norm2, *(n for n in (attn.q_norm, attn.k_norm) if not isinstance(n, nn.Identity))]
    eps = {n.eps for n in norms}
    return (type(mlp) in MLP_KIND and all(_native_linear(m) for m in linears) and len(_selections(linears)) <= 1
            and all(type(n) in NORM_KIND for n in norms) and type(block.norm1) is type(block.norm2)
            and block.norm1.weight is not None and len(eps) == 1 and None not in eps
            and all(isinstance(d, nn.Identity) for d in (attn.resid_drop, mlp.drop)))


class DecodeBlock(Block):
    """A model.Block (the same submodules) whose CPU decode step over a native KV cache is one C++ call
    (csrc/step.cpp's block op: the whole-step op's layer, run on this one layer; results equal Block.forward's bit
    for bit), with the matmuls on the few-row kernels and the attention on csrc/attention.cpp. Every other call (a
    prompt of more than ops.PROMPT_TOKENS tokens, no cache, training, torch.compile) runs Block.forward; a shorter
    prompt runs the op on its T tokens. Its tensors reach the op through the named schema of schema.py.

    A block whose Linears hold LoRA adapters served per row (schema.AdaptedLinear) runs the op too: the op adds
    each row's update, and the row mask is read from the adapters' thread-local selection at every call (it
    changes every step, and the server's embeddings thread runs the same model with its own rows). So does a
    quantized block (schema.CodedLinear): each product is the one compress.quantize runs for few fp32 rows, called
    from C++; more rows or another dtype take Block.forward, as the modules would leave those kernels.

    Why: the demo model's Python block issues ~20 ops per layer, and at its size their fixed costs, not the
    weights, bound a decode step (docs/BENCHMARKS.md has the before and after).
    """

    @classmethod
    def of(cls, block: Block) -> Block:
        """A DecodeBlock sharing `block`'s submodules, or `block` itself when the op cannot run it."""
        if not _runnable(block):
            return block
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.training = block.training
        for name, child in block.named_children():
            new.add_module(name, child)
        new.params = BlockParams.of(block)
        new.layout = BlockLayout.of(block)
        new._param_list, new._layout_list = new.params.as_list(), new.layout.as_list()  # built once, per call reused
        new.eps = float(block.norm1.eps)
        selections = _selections(_linears(block))
        new._selection = selections[0] if selections else None  # None: no Linear of this block holds adapters
        kinds = (new.layout.qkv_kind, new.layout.proj_kind, new.layout.up_kind, new.layout.down_kind,
                 new.layout.gate_kind)
        new._quantized = any(k != 0 for k in kinds)
        new._weight_only = any(k in (3, 4) for k in kinds)  # schema.LINEAR_KIND's weight-only int8 / int4
        return new

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv=None,
                ve: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if kv is None or self.training or not kv.cache.native or torch.compiler.is_compiling():
            return super().forward(x, rope, kv, ve, mask)
        B, T = x.shape[:2]
        if T > 1 and (T > ops.PROMPT_TOKENS or self._selection is not None or self._weight_only):
            return super().forward(x, rope, kv, ve, mask)
        if self._quantized and ((T == 1 and B > MAX_ROWS) or x.dtype != torch.float32):
            return super().forward(x, rope, kv, ve, mask)
        c = kv.cache
        cos, sin = rope if rope is not None else (None, None)
        lora_mask = self._selection.mask if self._selection is not None else None
        return torch.ops.gptforge_decode.block(x, self._param_list, self._layout_list, self.eps, kv.k, kv.v, c.slots,
                                               c.mask, cos, sin, ve, lora_mask)


def decode_layout(model: nn.Module) -> nn.Module:
    """Route the CPU decode steps of `model` through the native ops (in place; returns the model): each nn.Linear
    becomes a DecodeLinear (same parameters), a tied head a DecodeTiedHead over the same (frozen) token table, and
    each block the op covers a DecodeBlock; products with up to 16 rows run the kernels, with more PyTorch's GEMM.

    The gain is largest where PyTorch's GEMM is weakest, a few rows over a matrix out of cache (`gpt2` at batch
    8) and bf16 weights; docs/BENCHMARKS.md has the figures. For inference on CPU only (the parameters are
    replaced, so an optimizer built before would no longer see them).
    """
    linears = [(parent, name, m) for parent in model.modules() for name, m in parent.named_children()
               if type(m) is nn.Linear]
    if not available():
        # PyTorch's GEMM then: a transposed (in, out)-contiguous weight (HF GPT-2's Conv1D layout) ran 8 rows
        # 2.3x faster than the (out, in) one on the CI CPU, and 1 row no slower.
        for _, _, mod in linears:
            mod.weight = nn.Parameter(mod.weight.detach().t().contiguous().t(), requires_grad=False)
        return model
    for parent, name, mod in linears:
        setattr(parent, name, DecodeLinear.of(mod))
    head = getattr(model, "lm_head", None)
    if type(head) is TiedHead and type(head.table) is nn.Embedding:
        head.table.weight = _frozen(head.table.weight)
        model.lm_head = DecodeTiedHead(head.table)
    for i, block in enumerate(getattr(model, "blocks", [])):
        model.blocks[i] = DecodeBlock.of(block)  # a block's decode step in one native call
    return model
