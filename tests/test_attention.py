"""The native decode attention op (csrc/attention.cpp) against float64 SDPA over the same cache: every cache dtype
it reads (q's own; bf16 or fp16 under an fp32 q), head sizes on and off the vector width, blocks of masked slots,
grouped-query heads; and generation over a bf16 cache on the native path (fp32 and int8 models) against the PyTorch
path on the same cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptforge import native
from gptforge.config import ModelConfig
from gptforge.generate import generate_steps
from gptforge.model import GPT, Block
from gptforge.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernels could not be built here")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (F32, F16)]  # (q's dtype, the caches')


def _case(qd, cd, B, H, K, D, E, per_row, seed):
    """q, k, v (B, H|K, 1, D) as the model's strided views; caches (B, K, E + 3, D); slots; an additive mask that
    hides a random 40% of the slots and, past 40 slots, the whole block 16..31 (but never a query's own slot)."""
    torch.manual_seed(seed)
    qkv = torch.randn(B, 1, (H + 2 * K) * D).to(qd)
    q, k, v = (t.view(B, 1, -1, D).transpose(1, 2) for t in qkv.split([H * D, K * D, K * D], dim=-1))
    kc, vc = torch.randn(B, K, E + 3, D).to(cd), torch.randn(B, K, E + 3, D).to(cd)
    slots = torch.tensor([[E - 1], [max(E - 2, 0)]][:B]) if per_row else torch.tensor([E - 1])
    allowed = torch.rand(B, 1, 1, E) > 0.4
    if E > 40:
        allowed[..., 16:32] = False
    allowed[torch.arange(B), 0, 0, slots.view(-1).expand(B)] = True
    mask = torch.where(allowed, torch.zeros((), dtype=qd), float("-inf"))
    return q, k, v, kc, vc, slots, mask


def _reference(q, k, v, kc, vc, slots, mask):
    """The cache writes (k, v rounded to the cache's dtype, as KVCache.update stores them) and float64 SDPA."""
    kc, vc = kc.clone(), vc.clone()
    at = slots.view(-1, 1).expand(q.shape[0], -1)[:, None, :, None].expand_as(k)
    kc.scatter_(2, at, k.to(kc.dtype))
    vc.scatter_(2, at, v.to(vc.dtype))
    E = mask.shape[-1]
    y = F.scaled_dot_product_attention(q.double(), kc[:, :, :E].double(), vc[:, :, :E].double(),
                                       attn_mask=mask.double(), enable_gqa=q.shape[1] != k.shape[1])
    return y, kc, vc


@pytest.mark.parametrize("qd,cd", PAIRS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("D", [64, 128, 80, 24])
@pytest.mark.parametrize("E", [1, 17, 50])
def test_op_equals_sdpa_over_the_rounded_cache(qd, cd, D, E):
    """Outputs within 2e-6 of float64 for an fp32 q (whatever the cache's dtype: the keys and values are widened
    exactly), within bf16/fp16's rounding of the output otherwise; the caches hold exactly k.to(cache dtype)."""
    for B, H, K, per_row in ((1, 6, 6, False), (2, 8, 2, True)):
        q, k, v, kc, vc, slots, mask = _case(qd, cd, B, H, K, D, E, per_row, seed=D * E + B)
        ref, kr, vr = _reference(q, k, v, kc, vc, slots, mask)
        y = torch.ops.gptforge_attn.decode_attention(q, k, v, kc, vc, slots, mask)
        assert y.dtype == qd and torch.equal(kc, kr) and torch.equal(vc, vr)
        tol = 2e-6 if qd == F32 else (8e-3 if qd == BF16 else 1e-3)
        assert (y.double() - ref).abs().max().item() < tol, (B, H, K)


def test_every_slot_masked_gives_zeros_and_wrong_cache_dtypes_are_refused():
    q, k, v, kc, vc, slots, mask = _case(F32, F32, 1, 2, 2, 64, 20, False, seed=0)
    y = torch.ops.gptforge_attn.decode_attention(q, k, v, kc, vc, slots, torch.full_like(mask, float("-inf")))
    assert torch.equal(y, torch.zeros_like(y))  # a row with nothing to attend to (SDPA would give NaN)
    with pytest.raises(RuntimeError, match="bfloat16/float16 under a float32 q"):
        torch.ops.gptforge_attn.decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kc, vc, slots,
                                                 mask.bfloat16())
    with pytest.raises(RuntimeError, match="caches must be"):
        torch.ops.gptforge_attn.decode_attention(q, k, v, kc.bfloat16(), vc.half(), slots, mask)


CONFIGS = {  # head size 64 (the vector path) with learned positions; 24 (the scalar path), rotary and GQA
    "gpt2-hd64": dict(n_layer=2, n_head=2, d_model=128, vocab_size=300, block_size=64),
    "llama-hd24": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=96, vocab_size=300, block_size=64,
                       pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", bias=False),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
@pytest.mark.parametrize("op", ["step", "block"])
def test_generate_over_a_bf16_cache_takes_the_native_path(config, fmt, op, monkeypatch):
    """An fp32 or int8 model over a bf16 KV cache decodes through the native step op (csrc/step.cpp), or without it
    the block op (csrc/block.cpp), each calling the attention op with the bf16 caches; its greedy tokens equal the
    PyTorch path's over the same bf16 cache, and its log-probabilities agree within 1e-4 (fp32: the same math in
    another summation order)."""
    from gptforge.compress.quantize import quantize_model
    from gptforge.native.layout import DecodeBlock
    from gptforge.native.step import DecodeStep

    torch.manual_seed(1)
    model = GPT(ModelConfig(**CONFIGS[config])).eval()
    if fmt == "int8":
        model = quantize_model(model, "int8", None)[0]
    model = native.decode_layout(model)
    calls = []
    if op == "step":
        call = DecodeStep.__call__
        monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: calls.append(a[2].native) or call(self, *a))
    else:  # the block op per layer: each decode step's first block over a native cache, none falling back
        monkeypatch.setattr(DecodeStep, "of", classmethod(lambda cls, model: None))
        fwd, base = DecodeBlock.forward, Block.forward
        monkeypatch.setattr(DecodeBlock, "forward", lambda self, x, rope, kv=None, *a: (
            calls.append(kv.cache.native) if x.shape[1] == 1 and self is model.blocks[0] else None)
            or fwd(self, x, rope, kv, *a))
        monkeypatch.setattr(Block, "forward", lambda self, x, *a: (
            calls.append("fallback") if x.shape[1] == 1 else None) or base(self, x, *a))
    p = SamplingParams(max_new_tokens=24, temperature=0, logprobs=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [30, 31]]
    ours = list(generate_steps(model, prompts, p, vocab_size=300, kv_dtype="bf16"))
    assert calls == [True] * 23  # every decode step after the prefill: the op over a native bf16 cache
    with monkeypatch.context() as m:
        m.setattr(native, "available", lambda: False)  # KVCache.native off: SDPA over the widened bf16 cache
        theirs = list(generate_steps(model, prompts, p, vocab_size=300, kv_dtype="bf16"))
    assert True not in calls[23:]  # the reference run: no native op over its cache
    assert [s.ids for s in ours] == [s.ids for s in theirs]
    torch.testing.assert_close(torch.tensor([s.logprobs for s in ours]), torch.tensor([s.logprobs for s in theirs]),
                               atol=1e-4, rtol=0)
