"""The named parameter schema of the block op (`torch.ops.gptforge_decode.block`, csrc/step.cpp), in one place.

The op takes a block's tensors as one list and its shape as a list of ints, both in a fixed order. That order is
written here as two dataclasses, BlockParams (the tensors) and BlockLayout (the ints), and in csrc/step.cpp as two
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
    qkv_lora, proj_lora, up_lora, down_lora, gate_lora
                                    a Linear holding LoRA adapters served per row (layout.AdaptedLinear): its
                                    pre-scaled B^T (n R, out); its weight and bias above are then the fused ones
                                    (out + n R rows: A under W), and the op's `lora_mask` picks each row's adapter
    qkv_scale, qkv_aux, ... gate_scale, gate_aux
                                    a quantized Linear's (CodedLinear) scales and its kernel's other tensor (int8
                                    dynamic: the codes' row sums; int4 weight-only: the minima); its weight above
                                    is then its codes
BlockLayout: n_head, n_kv_head, head_dim, norm (0 LayerNorm, 1 RMSNorm), mlp (0 GELU, 1 SwiGLU, 2 ReLU²), hidden
(the MLP's width), and each Linear's kind (LINEAR_KIND: which product computes it); the norms' one eps is passed
beside it as a float.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from gptforge.model import Block, GeluMLP, ReLU2MLP, SwiGLUMLP

NORM_KIND = {nn.LayerNorm: 0, nn.RMSNorm: 1}
MLP_KIND = {GeluMLP: 0, SwiGLUMLP: 1, ReLU2MLP: 2}


def _weight(m: nn.Module | None) -> torch.Tensor | None:
    return None if m is None or isinstance(m, nn.Identity) else m.weight


def _bias(m: nn.Module | None) -> torch.Tensor | None:
    return None if m is None else getattr(m, "bias", None)


class RowSelection(Protocol):
    mask: torch.Tensor | None


class AdaptedLinear(nn.Module):
    """What the block op reads from a Linear holding low-rank updates chosen per row (finetune.lora's
    MultiLoRALinear implements it; the native layer cannot import the transforms above it):
        fused      an nn.Linear (out + n R, in): the base weight W with the adapters' A stacked under it
        lora_bt    the adapters' B^T, pre-scaled, (n R, out)
        selection  its `.mask` (B, 1, n R) of the current thread's forward, or None: every row the base's
    Its forward must compute z = fused(x); z[..., :out] + ((z[..., out:] * mask) @ lora_bt)."""

    fused: nn.Linear
    lora_bt: torch.Tensor
    selection: RowSelection


# The products a Linear of the op can take (csrc/block.cpp's Kind): compress/quantize.py's paths for few rows.
LINEAR_KIND = {"float": 0, "int8-dynamic": 1, "int4-dynamic": 2, "int8-weight-only": 3, "int4-weight-only": 4}


@dataclass(frozen=True)
class OpLinear:
    """One Linear as the block op multiplies it: its kind (LINEAR_KIND) and that product's tensors."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: torch.Tensor | None = None
    aux: torch.Tensor | None = None
    lora: torch.Tensor | None = None


class CodedLinear(nn.Module):
    """A Linear whose weight is stored as codes the block op multiplies (compress.quantize's QuantLinear
    implements it; the native layer cannot import the transforms above it)."""

    def op_linear(self) -> OpLinear | None:
        """Its kind and tensors, or None where the op would not compute what its forward does."""
        raise NotImplementedError


@dataclass(frozen=True)
class OpTable:
    """A quantized token table as the step op embeds from it (compress.quantize's QuantEmbedding.rows): int8 codes
    (V, D) and fp32 scales (V,), row = code * scale; or int4 codes packed as quantize.int4_codes packs them (V, D/2)
    with fp16 scales and minima (V, groups), row = code * scale + minimum per group."""

    codes: torch.Tensor
    scale: torch.Tensor
    aux: torch.Tensor | None


class CodedTable(nn.Module):
    """A token table stored as codes the step op dequantizes (compress.quantize's QuantEmbedding implements it)."""

    def op_table(self) -> OpTable | None:
        """Its codes and scales, or None where the op would not compute what its forward does."""
        raise NotImplementedError


def op_linear(m: nn.Module) -> OpLinear | None:
    """A block's Linear as the op multiplies it (an AdaptedLinear: its fused Linear and B^T), None if it cannot."""
    if isinstance(m, AdaptedLinear):
        return OpLinear("float", m.fused.weight, m.fused.bias, lora=m.lora_bt)
    if isinstance(m, CodedLinear):
        return m.op_linear()
    return OpLinear("float", m.weight, m.bias)


def _out_features(m: nn.Module) -> int:
    return m.out_features if hasattr(m, "out_features") else m.shape[0]  # a QuantizedMatrix: its shape


def named_linears(block: Block) -> list[tuple[str, nn.Module | None]]:
    """A block's Linears by their schema names (gate: None outside SwiGLU)."""
    attn, mlp = block.attn, block.mlp
    return [("qkv", attn.qkv), ("proj", attn.proj), ("up", mlp.up), ("down", mlp.down),
            ("gate", getattr(mlp, "gate", None))]


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
    qkv_lora: torch.Tensor | None
    proj_lora: torch.Tensor | None
    up_lora: torch.Tensor | None
    down_lora: torch.Tensor | None
    gate_lora: torch.Tensor | None
    qkv_scale: torch.Tensor | None
    qkv_aux: torch.Tensor | None
    proj_scale: torch.Tensor | None
    proj_aux: torch.Tensor | None
    up_scale: torch.Tensor | None
    up_aux: torch.Tensor | None
    down_scale: torch.Tensor | None
    down_aux: torch.Tensor | None
    gate_scale: torch.Tensor | None
    gate_aux: torch.Tensor | None

    @classmethod
    def of(cls, block: Block) -> "BlockParams":
        attn = block.attn
        fields = dict(norm1_weight=block.norm1.weight, norm1_bias=_bias(block.norm1),
                      q_norm_weight=_weight(attn.q_norm), k_norm_weight=_weight(attn.k_norm),
                      value_gate=attn.value_gate, norm2_weight=block.norm2.weight, norm2_bias=_bias(block.norm2))
        for name, m in named_linears(block):
            lin = op_linear(m) if m is not None else None
            for f in ("weight", "bias", "lora", "scale", "aux"):
                fields[f"{name}_{f}"] = getattr(lin, f) if lin is not None else None
        return cls(**fields)

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
    hidden: int
    qkv_kind: int
    proj_kind: int
    up_kind: int
    down_kind: int
    gate_kind: int

    @classmethod
    def of(cls, block: Block) -> "BlockLayout":
        attn = block.attn
        kinds = {f"{name}_kind": LINEAR_KIND[op_linear(m).kind] if m is not None else 0
                 for name, m in named_linears(block)}
        return cls(attn.n_head, attn.n_kv_head, attn.head_dim, NORM_KIND[type(block.norm1)], MLP_KIND[type(block.mlp)],
                   _out_features(block.mlp.up), **kinds)

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
