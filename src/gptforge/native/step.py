"""A whole CPU decode step as one native call (csrc/step.cpp): embedding, every block, the final norm and the head.

`DecodeStep.of(model)` gathers a decode-layout model's tensors once per generation when the op covers it: an
eval-mode GPT whose blocks are all DecodeBlocks (the block op's variants: float or quantized Linears, LoRA adapters
served per row) without QK-norm or value embeddings, in fp32 or bf16 (fp32 where a Linear is quantized: the
quantized products take fp32 rows). The token table runs inside the op when it is plain or quantized
(schema.CodedTable: its rows dequantized in C++, as QuantEmbedding's), and so does the head when it is a float one
(tied, or an unbiased DecodeLinear) or a quantized one (schema.CodedLinear: tied to the quantized table or its own
QuantLinear, unbiased; multiplied by block_linear by its kind); any other table or head runs its own module around
the op. Otherwise `of` is None and the caller keeps the model's forward (the per-block op).

Why: at the 6-layer, 384-wide shape the block op's ATen ops and the Python around them cost ~0.9 ms a token beside
~2 ms of fp32 products; here the same math is loops over a few hundred floats per row (docs/BENCHMARKS.md,
"Per-token cost outside the products").
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from gptforge.model import GPT, SoftCap, rotary_tables
from gptforge.native.layout import DecodeBlock, DecodeLinear, DecodeTiedHead
from gptforge.native.ops import MAX_ROWS
from gptforge.native.schema import (LINEAR_KIND, NORM_KIND, BlockLayout, BlockParams, CodedLinear, CodedTable,
                                    OpLinear)

# The op's per-layer tensors (schema.py's BlockParams, as the block op reads one layer's: schema.check_schema checks
# the library's order) and Linear kinds, by schema.py's names.
LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(BlockParams))
KIND_FIELDS = ("qkv_kind", "proj_kind", "up_kind", "down_kind", "gate_kind")
GLOBAL_FIELDS = ("tok_emb", "pos_emb", "rope_cos", "rope_sin", "norm_f_weight", "norm_f_bias", "head_weight",
                 "tok_scale", "tok_aux", "head_scale", "head_aux")


def _covered(model: nn.Module) -> bool:
    """Whether the step op computes this model's decode step (the module docstring says which models)."""
    if type(model) is not GPT or model.training or not len(model.blocks):
        return False
    cfg, blocks = model.config, list(model.blocks)
    norms = [model.norm_f, *(n for b in blocks for n in (b.norm1, b.norm2))]
    dtypes = {p.dtype for p in model.parameters()}
    quantized = any(b._quantized for b in blocks if type(b) is DecodeBlock)
    # adapters served per row: of one AdapterSet, whose row mask the op reads per call
    return (all(type(b) is DecodeBlock for b in blocks) and len({id(b._selection) for b in blocks
                                                                 if b._selection is not None}) <= 1
            and cfg.value_embeds == 0 and not cfg.qk_norm
            and type(model.norm_f) is type(blocks[0].norm1) and type(model.norm_f) in NORM_KIND
            and len({n.eps for n in norms}) == 1 and model.norm_f.weight is not None
            and isinstance(model.drop, nn.Identity)
            and dtypes in (({torch.float32},) if quantized else ({torch.float32}, {torch.bfloat16}))
            and all(p.device.type == "cpu" for p in model.parameters()))


def _head(model: GPT) -> OpLinear | None:
    """The head as the op multiplies it (a float tied head or unbiased Linear, a quantized one in an fp32 model: its
    kind and tensors, schema.OpLinear), or None: the model's own head module runs after the op. Soft-cap: SoftCap's
    or none."""
    head = model.lm_head
    if not isinstance(model.softcap, (nn.Identity, SoftCap)):
        return None
    if type(head) is DecodeTiedHead and type(head.table) is nn.Embedding:
        return OpLinear("float", head.table.weight, None)
    if type(head) is DecodeLinear and head.bias is None:
        return OpLinear("float", head.weight, None)
    if isinstance(head, CodedLinear) and model.norm_f.weight.dtype == torch.float32:  # quantized products: fp32 rows
        lin = head.op_linear()
        return lin if lin is not None and lin.bias is None and lin.lora is None else None
    return None


def _table(model: GPT) -> list[torch.Tensor | None] | None:
    """The token table's tensors as the op embeds from them, [table, None, None] of a float one or [codes, scale,
    minima] of a quantized one in an fp32 model (schema.CodedTable), with a learned position table of the model's
    dtype or none; None: the model's own modules embed before the op."""
    tok, pe, dtype = model.tok_emb, model.pos_emb, model.norm_f.weight.dtype
    if pe is not None and (type(pe) is not nn.Embedding or pe.weight.dtype != dtype):
        return None
    if type(tok) is nn.Embedding:
        return [tok.weight, None, None]
    t = tok.op_table() if isinstance(tok, CodedTable) and dtype == torch.float32 else None
    return None if t is None else [t.codes, t.scale, t.aux]


class DecodeStep:
    """One model's decode step as one call of `torch.ops.gptforge_step.decode`, with its tensors gathered once."""

    @classmethod
    def of(cls, model: nn.Module) -> DecodeStep | None:
        """The step of `model`, or None when the op does not cover it (then run model's own forward)."""
        if not _covered(model):
            return None
        check_fields()
        self = cls()
        cfg, first = model.config, BlockLayout.of(model.blocks[0])
        self.model = model
        self.layout = [cfg.n_layer, first.n_head, first.n_kv_head, first.head_dim, first.norm, first.mlp, first.hidden]
        self.eps = float(model.norm_f.eps)
        self.layers = [getattr(b.params, name) for b in model.blocks for name in LAYER_FIELDS]
        self.kinds = [getattr(b.layout, name) for b in model.blocks for name in KIND_FIELDS]
        head, table = _head(model), _table(model)
        self.head = head is None  # the model's own head (and soft-cap) after the op
        self.softcap = float(model.softcap.cap) if head is not None and isinstance(model.softcap, SoftCap) else 0.0
        # head kind and output width: the int4 kernels' tiles do not say their rows
        self.layout += [LINEAR_KIND[head.kind] if head else 0, cfg.padded_vocab_size]
        # A table of another kind embeds in its own module before the op, positions included.
        self.embed = table is None
        # Rotary models: cos and sin of every position a cache holds, computed when a longer cache arrives (the op
        # indexes them; model.rotary_tables' values). Not block_size's worth up front: an imported model's context
        # (131,072 positions for Llama 3) would cost 2 x 64 MB of tables per generation.
        self._rope_len = 0 if model.pos_emb is None else None
        tok, head = table or [None] * 3, head or OpLinear("float", None, None)
        self.globals = [tok[0], None if model.pos_emb is None or self.embed else model.pos_emb.weight, None, None,
                        model.norm_f.weight, getattr(model.norm_f, "bias", None), head.weight, *tok[1:], head.scale,
                        head.aux]
        self._cache = self._kv = None
        self._op = torch.ops.gptforge_step.decode.default  # the packet's overload lookup costs ~4 us a call
        self.selection = next((b._selection for b in model.blocks if b._selection is not None), None)
        return self

    def usable(self, cache, rows: int) -> bool:
        """Whether a step of `rows` rows over `cache` can run here (a native, eager cache; few rows)."""
        return cache.native and rows <= MAX_ROWS and not torch.compiler.is_compiling()

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache, slots: torch.Tensor | None,
                 end: int) -> torch.Tensor:
        """Logits (B, V) of one new token per row: ids and positions (B,) or (B, 1), written at `slots` (one for
        every row, (B,) or (B, 1): each row's; None: end - 1 for every row) among the cache's first `end` slots.
        The op marks the slots valid and builds the attention mask itself: no `cache.prepare` before it (each of
        its tensor ops costs 10-30 us once a step has streamed the weights through the CPU's caches)."""
        if cache is not self._cache:  # the layers' buffers, listed once per cache
            self._cache, self._kv = cache, ([kv.k for kv in cache.layers], [kv.v for kv in cache.layers])
            if self._rope_len is not None and cache.length > self._rope_len:
                self._rope_len = cache.length
                tables = rotary_tables(torch.arange(cache.length), self.model.config)
                self.globals[2:4] = [t.contiguous() for t in tables]
        x = None
        if self.embed:  # as GPT.forward embeds: (B, 1, D)
            x = self.model.tok_emb(ids.reshape(-1, 1))
            x = x if self.model.pos_emb is None else x + self.model.pos_emb(pos.reshape(-1, 1))
        # ids, pos and slots flattened by the op (tensor ops from here cost ~3 us each); its overload called directly
        out = self._op(ids, pos, x, self.globals, self.layers, self.kinds, self.layout, self.eps, self.softcap,
                       *self._kv, cache.valid, slots, end, cache.window or 0,
                       None if self.selection is None else self.selection.mask)
        # the head as GPT.forward applies it, on (B, 1, D): a LoRA head reads its row mask as (B, 1, n R)
        return self.model.softcap(self.model.lm_head(out[:, None]))[:, -1] if self.head else out


_checked = False


def check_fields() -> None:
    """Raise if the loaded library's step op reads its globals in another order than GLOBAL_FIELDS, or if
    schema.py no longer names a Linear kind KIND_FIELDS reads. (The per-layer tensors are BlockParams' own fields,
    which schema.check_schema compares with the op's when the library loads.)"""
    global _checked
    if not _checked:
        op = list(torch.ops.gptforge_step.global_fields())
        if list(GLOBAL_FIELDS) != op:
            raise RuntimeError(f"the native step op reads {op}, gptforge/native/step.py writes "
                               f"{list(GLOBAL_FIELDS)}: rebuild from one version of gptforge")
        missing = set(KIND_FIELDS) - {f.name for f in dataclasses.fields(BlockLayout)}
        if missing:
            raise RuntimeError(f"native/step.py reads {sorted(missing)}, which schema.py no longer names")
        _checked = True
