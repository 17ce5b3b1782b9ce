"""The named parameter schema of the block op (`torch.ops.gptforge_decode.block`, csrc/block.cpp), in one place.

The op takes a block's tensors as one list and its shape as a list of ints, both in a fixed order. That order is
written here as two dataclasses, BlockParams (the tensors) and BlockLayout (the ints), and in csrc/block.cpp as two
enums whose names the library returns (`param_fields()`, `layout_fields()`); `check_schema` compares the two when the
library is loaded, so the sides cannot drift apart silently.

BlockParams (None where a variant has no such tensor):
    norm1_weight, norm1_bias        the attention's pre-norm (a bias only for LayerNorm with bias)
    qkv_weight, qkv_bias            the fused query/key/value projection, (H + 2K) * Hd rows
    proj_weight, proj_bias          the attention's output projection
    q_norm_weight, k_norm_weight    QK-norm gains (RMSNorm over Hd), qk_norm variants only
    value_gate                      the value-embedding gate, layers that read a value-embedding table only
    norm2_weight, norm2_bias        the MLP's pre-norm
    up_weight, up_bias, down_weight, down_bias   the MLP's matrices
    gate_weight, gate_bias          SwiGLU's gate, SwiGLU only
BlockLayout: n_head, n_kv_head, head_dim, norm (0 LayerNorm, 1 RMSNorm), mlp (0 GELU, 1 SwiGLU, 2 ReLU²); the
norms' one eps is passed beside it as a float.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from gptforge.model import Block, GeluMLP, ReLU2MLP, SwiGLUMLP

NORM_KIND = {nn.LayerNorm: 0, nn.RMSNorm: 1}
MLP_KIND = {GeluMLP: 0, SwiGLUMLP: 1, ReLU2MLP: 2}


def _weight(m: nn.Module | None) -> torch.Tensor | None:
    return None if m is None or isinstance(m, nn.Identity) else m.weight


def _bias(m: nn.Module | None) -> torch.Tensor | None:
    return None if m is None else getattr(m, "bias", None)


@dataclass(frozen=True)
class BlockParams:
    """A block's tensors in the order the block op reads them (the module docstring lists them)."""

    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor | None
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor | None
    q_norm_weight: torch.Tensor | None
    k_norm_weight: torch.Tensor | None
    value_gate: torch.Tensor | None
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor | None
    up_weight: torch.Tensor
    up_bias: torch.Tensor | None
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    gate_weight: torch.Tensor | None
    gate_bias: torch.Tensor | None

    @classmethod
    def of(cls, block: Block) -> "BlockParams":
        attn, mlp = block.attn, block.mlp
        gate = getattr(mlp, "gate", None)
        return cls(norm1_weight=block.norm1.weight, norm1_bias=_bias(block.norm1),
                   qkv_weight=attn.qkv.weight, qkv_bias=attn.qkv.bias,
                   proj_weight=attn.proj.weight, proj_bias=attn.proj.bias,
                   q_norm_weight=_weight(attn.q_norm), k_norm_weight=_weight(attn.k_norm), value_gate=attn.value_gate,
                   norm2_weight=block.norm2.weight, norm2_bias=_bias(block.norm2),
                   up_weight=mlp.up.weight, up_bias=mlp.up.bias, down_weight=mlp.down.weight, down_bias=mlp.down.bias,
                   gate_weight=_weight(gate), gate_bias=_bias(gate))

    def as_list(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


@dataclass(frozen=True)
class BlockLayout:
    """A block's shape and kinds, in the order the block op reads them."""

    n_head: int
    n_kv_head: int
    head_dim: int
    norm: int
    mlp: int

    @classmethod
    def of(cls, block: Block) -> "BlockLayout":
        attn = block.attn
        return cls(attn.n_head, attn.n_kv_head, attn.head_dim, NORM_KIND[type(block.norm1)], MLP_KIND[type(block.mlp)])

    def as_list(self) -> list[int]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


def check_schema() -> None:
    """Raise if the loaded library's block op names its parameters or layout otherwise than the dataclasses here."""
    for cls, op in ((BlockParams, torch.ops.gptforge_decode.param_fields),
                    (BlockLayout, torch.ops.gptforge_decode.layout_fields)):
        ours, theirs = [f.name for f in dataclasses.fields(cls)], list(op())
        if ours != theirs:
            raise RuntimeError(f"the native block op reads {cls.__name__} as {theirs}, gptforge/native/schema.py "
                               f"writes {ours}: rebuild from one version of gptforge")
