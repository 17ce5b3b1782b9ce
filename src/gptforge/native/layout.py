"""The CPU decode layout: module swaps that route a model's decode steps through the native ops.

`decode_layout(model)` replaces each nn.Linear by a DecodeLinear (same parameters, its forward one call of the
few-row `linear` op), the tied head by a DecodeTiedHead (the same, on the token table) and each block whose
variant the block op covers by a DecodeBlock (its one-token decode step as one native call, csrc/block.cpp).
State dict keys never change. Swaps rather than tensor subclasses: a weight subclass's __torch_function__ cost
~6 us of Python per matmul, as much as the product itself for the demo model's in-cache matrices.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.model import Block, TiedHead
from gptforge.native.build import available
from gptforge.native.schema import MLP_KIND, NORM_KIND, BlockLayout, BlockParams


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


def _runnable(block: nn.Module) -> bool:
    """Whether the block op computes this block: a plain Block whose Linears are all DecodeLinears (not quantized,
    not LoRA), norms and MLP of the kinds the op knows, one eps for every norm, no dropout. The imported families'
    variants need no check here: a sliding window lives in the KV cache's mask, which the op reads; Qwen2's q/k/v
    biases without an output bias are the schema's separate qkv_bias / proj_bias; Llama 3 RoPE scaling changes only
    the rotary tables the op is handed (tests/test_families.py compares the op's decode with a forward)."""
    if type(block) is not Block:
        return False
    attn, mlp = block.attn, block.mlp
    linears = [attn.qkv, attn.proj, mlp.up, mlp.down] + ([mlp.gate] if hasattr(mlp, "gate") else [])
    norms = [block.norm1, block.norm2, *(n for n in (attn.q_norm, attn.k_norm) if not isinstance(n, nn.Identity))]
    eps = {n.eps for n in norms}
    return (type(mlp) in MLP_KIND and all(type(m) is DecodeLinear for m in linears)
            and all(type(n) in NORM_KIND for n in norms) and type(block.norm1) is type(block.norm2)
            and block.norm1.weight is not None and len(eps) == 1 and None not in eps
            and all(isinstance(d, nn.Identity) for d in (attn.resid_drop, mlp.drop)))


class DecodeBlock(Block):
    """A model.Block (the same submodules) whose one-token CPU decode step over a native KV cache is one C++ call
    (csrc/block.cpp): the same ATen ops as Block.forward, issued from C++, with the matmuls on the few-row kernels
    and the attention on csrc/attention.cpp. Every other call (a prefill, no cache, training, torch.compile) runs
    Block.forward. Its tensors reach the op through the named schema of schema.py.

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
        return new

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv=None,
                ve: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if kv is None or x.shape[1] != 1 or self.training or not kv.cache.native or torch.compiler.is_compiling():
            return super().forward(x, rope, kv, ve, mask)
        c = kv.cache
        cos, sin = rope if rope is not None else (None, None)
        return torch.ops.gptforge_decode.block(x, self._param_list, self._layout_list, self.eps, kv.k, kv.v, c.slots,
                                               c.mask, cos, sin, ve)


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
