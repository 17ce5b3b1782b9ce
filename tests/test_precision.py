"""bf16 autocast with widened GEMMs (gptforge/precision.py) computes what native bf16 autocast computes."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from gptforge import precision
from gptforge.config import ModelConfig
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.precision import WidenedBF16

BF16 = torch.bfloat16


def test_linear_matches_autocast_within_a_bf16_ulp():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 96, generator=gen, requires_grad=True)
    w = torch.randn(80, 96, generator=gen, requires_grad=True)
    b = torch.randn(80, generator=gen, requires_grad=True)
    g = torch.randn(3, 37, 80, generator=gen)
    outs = {}
    for mode in ("native", "widened"):
        with torch.autocast("cpu", dtype=BF16), (WidenedBF16() if mode == "widened" else contextlib.nullcontext()):
            y = F.linear(x, w, b)
        y.backward(g)
        outs[mode] = (y, x.grad.clone(), w.grad.clone(), b.grad.clone())
        x.grad = w.grad = b.grad = None
    for ref, got in zip(outs["native"], outs["widened"]):
        assert got.dtype == ref.dtype  # y bf16; gradients in the parameters' fp32
        # Both accumulate exact bf16 products in fp32, in different orders: at most one bf16 rounding apart.
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-2)
    y, gx, gw, _ = outs["widened"]
    assert y.dtype == BF16
    # The operands really are rounded to bf16 (this is bf16 autocast, not fp32): the widened result is exactly
    # the fp32 product of the rounded operands, rounded, and gradients are bf16-representable.
    exact = F.linear(x.detach().to(BF16).float(), w.detach().to(BF16).float(), b.detach().to(BF16).float()).to(BF16)
    assert torch.equal(y, exact)
    assert torch.equal(gw, gw.to(BF16).float()) and torch.equal(gx, gx.to(BF16).float())


def test_attention_matches_autocast():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=gen, requires_grad=True) for _ in range(3))
    res = {}
    for mode in ("native", "widened"):
        with torch.autocast("cpu", dtype=BF16), (WidenedBF16() if mode == "widened" else contextlib.nullcontext()):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.float().sum().backward()
        res[mode] = (y, q.grad.clone())
        q.grad = k.grad = v.grad = None
    assert res["widened"][0].dtype == BF16
    torch.testing.assert_close(res["widened"][0].float(), res["native"][0].float(), rtol=2**-7, atol=2e-2)
    torch.testing.assert_close(res["widened"][1], res["native"][1], rtol=2e-2, atol=2e-2)


def test_training_step_as_close_to_fp32_as_native_bf16():
    """A whole model's loss and gradients: widened bf16 is as far from fp32 as native bf16 is, no farther."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, d_model=128, block_size=64, vocab_size=512))
    x = torch.randint(0, 512, (4, 65))

    def grads(mode):
        model.zero_grad()
        amp = torch.autocast("cpu", dtype=BF16) if mode != "fp32" else contextlib.nullcontext()
        with amp, (WidenedBF16() if mode == "widened" else contextlib.nullcontext()):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (l32, g32), (ln, gn), (lw, gw) = grads("fp32"), grads("native"), grads("widened")
    err_native = ((gn - g32).norm() / g32.norm()).item()
    err_widened = ((gw - g32).norm() / g32.norm()).item()
    assert 1e-4 < err_native < 2e-2 and err_widened < 1.5 * err_native  # bf16-sized error, not fp32's, not worse
    assert abs(lw - l32) < 1.5 * abs(ln - l32) + 1e-3


def test_choice_by_environment(monkeypatch):
    precision.widen_bf16_gemm.cache_clear()
    try:
        monkeypatch.setenv("GPTFORGE_BF16_GEMM", "widened")
        assert precision.widen_bf16_gemm()
        ctx = precision.autocast(torch.device("cpu"), BF16)
        with ctx:
            assert torch.is_autocast_enabled("cpu")
            y = torch.nn.Linear(8, 4)(torch.randn(2, 8))
        assert y.dtype == BF16
        precision.widen_bf16_gemm.cache_clear()
        monkeypatch.setenv("GPTFORGE_BF16_GEMM", "native")
        assert not precision.widen_bf16_gemm()
        precision.widen_bf16_gemm.cache_clear()
        monkeypatch.setenv("GPTFORGE_BF16_GEMM", "fast")
        with pytest.raises(GptforgeError, match="GPTFORGE_BF16_GEMM"):
            precision.widen_bf16_gemm()
        precision.widen_bf16_gemm.cache_clear()
        monkeypatch.delenv("GPTFORGE_BF16_GEMM")
        assert isinstance(precision.widen_bf16_gemm(), bool)  # measured: either answer is valid
    finally:
        precision.widen_bf16_gemm.cache_clear()


def test_activation_checkpointing_recomputes_on_the_same_path(monkeypatch):
    # The recomputation runs in backward, after the forward's context has closed; it must widen as the
    # forward did, or torch refuses the differing saved tensors (and the gradients would differ).
    from gptforge.distributed import apply_activation_checkpointing

    monkeypatch.setenv("GPTFORGE_BF16_GEMM", "widened")
    precision.widen_bf16_gemm.cache_clear()
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, block_size=32, vocab_size=256)
        plain, ckpt = GPT(cfg), GPT(cfg)
        ckpt.load_state_dict(plain.state_dict())
        apply_activation_checkpointing(ckpt)
        x = torch.randint(0, 256, (2, 33))
        grads = []
        for model in (plain, ckpt):
            with precision.autocast(torch.device("cpu"), BF16):
                loss = F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()  # outside the context, as bench.py's memory measurement does
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert precision.widened_active() == 0
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    finally:
        precision.widen_bf16_gemm.cache_clear()
