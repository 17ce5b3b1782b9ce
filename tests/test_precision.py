"""bf16 autocast with widened GEMMs (gptforge/precision.py) computes what native bf16 autocast computes."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gptforge import precision
from gptforge.config import ModelConfig, RunConfig, TrainConfig, load_yaml, model_preset, run_config_from_dict
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.precision import WidenedLinear, WidenedTiedHead, widen_bf16, widened_linear, widened_sdpa

BF16 = torch.bfloat16
CPU = torch.device("cpu")


def test_linear_matches_autocast_within_a_bf16_ulp():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 96, generator=gen, requires_grad=True)
    w = torch.randn(80, 96, generator=gen, requires_grad=True)
    b = torch.randn(80, generator=gen, requires_grad=True)
    g = torch.randn(3, 37, 80, generator=gen)
    outs = {}
    for mode, linear in (("native", F.linear), ("widened", widened_linear)):
        with torch.autocast("cpu", dtype=BF16):
            y = linear(x, w, b)
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
    assert torch.equal(widened_linear(x, w, b), F.linear(x, w, b))  # outside autocast: the plain product


def test_attention_matches_autocast():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=gen, requires_grad=True) for _ in range(3))
    res = {}
    for mode, sdpa in (("native", F.scaled_dot_product_attention), ("widened", widened_sdpa)):
        with torch.autocast("cpu", dtype=BF16):
            y = sdpa(q, k, v, is_causal=True)
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
    wide = widen_bf16(copy.deepcopy(model))
    assert list(wide.state_dict()) == list(model.state_dict())  # a module swap: the same keys
    assert isinstance(wide.blocks[0].mlp.up, WidenedLinear) and isinstance(wide.lm_head, WidenedTiedHead)
    x = torch.randint(0, 512, (4, 65))

    def grads(mode):
        m = wide if mode == "widened" else model
        m.zero_grad()
        with torch.autocast("cpu", dtype=BF16, enabled=mode != "fp32"):
            logits = m(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])

    (l32, g32), (ln, gn), (lw, gw) = grads("fp32"), grads("native"), grads("widened")
    err_native = ((gn - g32).norm() / g32.norm()).item()
    err_widened = ((gw - g32).norm() / g32.norm()).item()
    assert 1e-4 < err_native < 2e-2 and err_widened < 1.5 * err_native  # bf16-sized error, not fp32's, not worse
    assert abs(lw - l32) < 1.5 * abs(ln - l32) + 1e-3


def test_choice_by_config():
    assert precision.resolve_bf16_gemm("widened", "bf16", CPU) == "widened"
    assert precision.resolve_bf16_gemm("native", "bf16", CPU) == "native"
    with pytest.raises(GptforgeError, match="train.bf16_gemm 'fast'"):
        precision.resolve_bf16_gemm("fast", "bf16", CPU)
    assert precision.resolve_bf16_gemm("auto", "bf16", CPU) in ("native", "widened")  # measured: either is valid
    assert precision.resolve_bf16_gemm("auto", "fp32", CPU) == "auto"  # no bf16 matmuls: nothing to choose
    model = widen_bf16(torch.nn.Sequential(torch.nn.Linear(8, 4)))
    with precision.autocast(CPU, BF16):
        assert torch.is_autocast_enabled("cpu")
        y = model(torch.randn(2, 8))
    assert y.dtype == BF16


def test_the_run_config_records_the_measured_choice(prepared, tmp_path):
    """train.bf16_gemm auto is timed once at the start and the saved config says what it chose."""
    from gptforge.train import train

    tc = TrainConfig(micro_batch=2, seq_len=16, max_steps=2, warmup_steps=1, eval_every=2, eval_batches=1,
                     log_every=1, save_every=2, tensorboard=False, precision="bf16", device="cpu")
    train(RunConfig(model=model_preset("tiny"), train=tc, data=str(prepared), out=str(tmp_path / "run")),
          progress=False)
    saved = run_config_from_dict(load_yaml(tmp_path / "run" / "config.yaml"))
    assert saved.train.bf16_gemm == precision.measure_bf16_gemm()
    rerun = dataclasses.replace(tc, bf16_gemm=saved.train.bf16_gemm)
    assert precision.resolve_bf16_gemm(rerun.bf16_gemm, "bf16", CPU) == saved.train.bf16_gemm


def test_activation_checkpointing_recomputes_on_the_same_path():
    # The recomputation runs in backward, after the forward's autocast context has closed; the widened modules
    # are the model's own, so it widens as the forward did (else torch refuses the differing saved tensors).
    from gptforge.distributed import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, block_size=32, vocab_size=256)
    plain, ckpt = GPT(cfg), GPT(cfg)
    ckpt.load_state_dict(plain.state_dict())
    widen_bf16(plain)
    apply_activation_checkpointing(widen_bf16(ckpt))
    x = torch.randint(0, 256, (2, 33))
    grads = []
    for model in (plain, ckpt):
        with precision.autocast(CPU, BF16):
            loss = F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()  # outside the context, as bench.py's memory measurement does
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
