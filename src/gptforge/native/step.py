"""A whole CPU decode step as one native call (csrc/step.cpp): embedding, every block, the final norm and the head.

`DecodeStep.of(model)` gathers a decode-layout model's tensors once per generation (so a model changed between
generations is read afresh) when the op covers it: an eval-mode fp32 or bf16 GPT whose blocks are all DecodeBlocks (the
block op's variants) without QK-norm, value embeddings or adapters served per row, and a tied head or an unbiased DecodeLinear one. Else it
is None and the caller keeps the model's forward (the per-block op).

Why: at the 6-layer, 384-wide shape the block op's ATen ops and the Python around them cost ~0.9 ms a token beside
~2 ms of products; here the same math is loops over a few hundred floats per row (docs/BENCHMARKS.md, "Per-token
cost outside the products").
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptforge.model import GPT, SoftCap, rotary_tables
from gptforge.native.layout import DecodeBlock, DecodeLinear, DecodeTiedHead
from gptforge.native.schema import NORM_KIND, BlockLayout, BlockParams

# The op's per-layer tensors, in its order (csrc/step.cpp checks the names when a DecodeStep is built).
LAYER_FIELDS = ("norm1_weight", "norm1_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "norm2_weight",
                "norm2_bias", "up_weight", "up_bias", "down_weight", "down_bias", "gate_weight", "gate_bias")
GLOBAL_FIELDS = ("tok_emb", "pos_emb", "rope_cos", "rope_sin", "norm_f_weight", "norm_f_bias", "head_weight")
MAX_ROWS = 16


def _covered(model: nn.Module) -> bool:
    """Whether the step op computes this model's decode step (the module docstring says which models)."""
    if type(model) is not GPT or model.training or not len(model.blocks):
        return False
    cfg, blocks, head = model.config, list(model.blocks), model.lm_head
    norms = [model.norm_f, *(n for b in blocks for n in (b.norm1, b.norm2))]
    head_ok = type(head) is DecodeTiedHead or (type(head) is DecodeLinear and head.bias is None)
    # no LoRA adapters served per row, no quantized Linears (the block op takes both; this op reads fp32 weights)
    plain = all(type(b) is DecodeBlock and b._selection is None and not b._quantized for b in blocks)
    return (plain and cfg.value_embeds == 0 and not cfg.qk_norm and head_ok
            and type(model.norm_f) is type(blocks[0].norm1) and type(model.norm_f) in NORM_KIND
            and len({n.eps for n in norms}) == 1 and model.norm_f.weight is not None
            and isinstance(model.drop, nn.Identity) and isinstance(model.softcap, (nn.Identity, SoftCap))
            and {p.dtype for p in model.parameters()} in ({torch.float32}, {torch.bfloat16})
            and all(p.device.type == "cpu" for p in model.parameters()))


class DecodeStep:
    """One model's decode step as one call of `torch.ops.gptforge_step.decode`, with its tensors gathered once."""

    @classmethod
    def of(cls, model: nn.Module) -> DecodeStep | None:
        """The step of `model`, or None when the op does not cover it (then run model's own forward)."""
        if not _covered(model):
            return None
        check_fields()
        self = cls()
        cfg = model.config
        layout = BlockLayout.of(model.blocks[0])
        self.layout = [cfg.n_layer, layout.n_head, layout.n_kv_head, layout.head_dim, layout.norm, layout.mlp]
        self.eps = float(model.norm_f.eps)
        self.softcap = float(model.softcap.cap) if isinstance(model.softcap, SoftCap) else 0.0
        self.layers = [getattr(BlockParams.of(b), name) for b in model.blocks for name in LAYER_FIELDS]
        head = model.lm_head
        rope = (None, None)
        if model.pos_emb is None:  # every position's cos and sin once, indexed by the op (model.rotary_tables' values)
            rope = tuple(t.contiguous() for t in rotary_tables(torch.arange(cfg.block_size), cfg))
        self.globals = [model.tok_emb.weight, None if model.pos_emb is None else model.pos_emb.weight, *rope,
                        model.norm_f.weight, getattr(model.norm_f, "bias", None),
                        head.table.weight if type(head) is DecodeTiedHead else head.weight]
        return self

    def usable(self, cache, rows: int) -> bool:
        """Whether a step of `rows` rows over `cache` can run here (a native, eager cache; few rows)."""
        return cache.native and rows <= MAX_ROWS and not torch.compiler.is_compiling()

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, V) of one new token per row: ids and positions (B, 1), at the slots `cache.prepare` set."""
        return torch.ops.gptforge_step.decode(
            ids.reshape(-1), pos.reshape(-1).contiguous(), self.globals, self.layers, self.layout, self.eps,
            self.softcap, [kv.k for kv in cache.layers], [kv.v for kv in cache.layers], cache.slots, cache.mask)


_checked = False


def check_fields() -> None:
    """Raise if the loaded library's step op reads its tensors in another order than the lists here."""
    global _checked
    if not _checked:
        for ours, op in ((LAYER_FIELDS, torch.ops.gptforge_step.layer_fields),
                         (GLOBAL_FIELDS, torch.ops.gptforge_step.global_fields)):
            if list(ours) != list(op()):
                raise RuntimeError(f"the native step op reads {list(op())}, gptforge/native/step.py writes "
                                   f"{list(ours)}: rebuild from one version of gptforge")
        _checked = True
