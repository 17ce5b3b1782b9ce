"""Compression: quantized formats round-trip and bound their error, pruning hits its sparsity and pattern
exactly, structured pruning equals masking, distillation's loss and gradient, and the eval table."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import hfquant
from gptforge.checkpoint import write_checkpoint
from gptforge.compress.distill import DistillConfig, DistillLoss, distill
import gptforge.compress.quantize as Q
from gptforge.compress.evaluate import eval_checkpoints
from gptforge.compress.prune import block_linears, prune_model, shrink, structured_plan, structured_widths, unstructured_masks
from gptforge.compress.quantize import (QuantEmbedding, QuantLinear, dequantize, matmul_bytes, quantize_activations,
                                        quantize_model, quantize_state_dict)
from gptforge.compress.run import prune_checkpoint, quantize_checkpoint
from gptforge.config import ModelConfig, RunConfig, TrainConfig, model_preset
from gptforge.data import TokenData, prepare
from gptforge.errors import GptforgeError
from gptforge.loader import load_checkpoint
from gptforge.model import GPT

SMALL_TRAIN = TrainConfig(micro_batch=4, seq_len=32, eval_batches=2, log_every=1, tensorboard=False, warmup_steps=1)


def tiny(**kw) -> GPT:
    return GPT(dataclasses.replace(model_preset("tiny"), **kw)).eval()


@pytest.fixture(scope="module")
def ckpt(prepared, tmp_path_factory):
    """A tiny model (random weights, the prepared data's tokenizer) written as a checkpoint."""
    tok = TokenData(prepared).tokenizer()
    cfg = RunConfig(model=dataclasses.replace(model_preset("tiny"), vocab_size=tok.vocab_size), train=SMALL_TRAIN)
    torch.manual_seed(1)
    model = GPT(cfg.model)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "parent", cfg, tok, model_state=model.state_dict())


# --- quantization -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, group", [("int8", None), ("int4", 32), ("int4", 64), ("bf16", None), ("fp16", None)])
def test_quantized_checkpoint_round_trips(ckpt, tmp_path, method, group):
    model, _, _ = load_checkpoint(ckpt)
    before, _, _ = quantize_model(model, method, group)
    x = torch.randint(0, 500, (2, 16))
    expected = before(x)
    dest, section = quantize_checkpoint(str(ckpt), method, str(tmp_path / "q"), group)
    loaded, _, cfg = load_checkpoint(dest)
    assert cfg.compression.to_dict() == section and section["quantization"]["method"] == method
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    fp32 = (ckpt / "model.safetensors").stat().st_size
    ratio = (dest / "model.safetensors").stat().st_size / fp32
    assert ratio < {"int8": 0.30, "int4": 0.20, "bf16": 0.51, "fp16": 0.51}[method]


def test_per_layer_error_is_within_half_a_step():
    model = tiny()
    for method, group in (("int8", None), ("int4", 32)):
        state = quantize_state_dict(model, method, group)
        for name, w in model.state_dict().items():
            if f"{name[:-len('weight')]}weight_q" not in state:
                continue
            base = name[:-len("weight")]
            q, s, z = state[base + "weight_q"], state[base + "scales"], state.get(base + "zeros")
            err = (dequantize(q, s, z) - w).abs()
            step = s.float()[:, None] if z is None else s.float().repeat_interleave(group, dim=1)
            assert (err <= step / 2 + 1e-6).all(), (method, name)  # round to nearest: half a step at most
            rel = (err.norm() / w.norm()).item()
            assert rel < (0.01 if method == "int8" else 0.12), (method, name, rel)


@pytest.mark.parametrize("method, group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_one_row_kernels_equal_the_dequantized_matmul(method, group):
    """Decode's kernels (gptforge.native's ones for 1 and 8 rows, PyTorch's aten weight-only kernels for one) and
    the many-row dequantize path compute the same product; int4 codes unpack to exactly what was packed."""
    import gptforge.compress.quantize as Q
    from gptforge import native

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384, bias=True)
    ql = QuantLinear(lin, method, group, activations="weight-only")
    if method == "int8":
        ql.weight_q, ql.scales = Q.int8_codes(lin.weight.detach())
    else:
        ql.weight_q, ql.scales, ql.zeros = Q.int4_codes(lin.weight.detach(), group)
        codes = torch.round((lin.weight.detach().view(384, -1, group) - ql.zeros.float()[..., None])
                            / ql.scales.float()[..., None]).clamp(0, 15).view(384, 256)
        assert torch.equal(Q.unpack_int4(ql.weight_q, 256 // group), codes.to(torch.uint8))
    for rows in (1, 8):
        x = torch.randn(1, rows, 256)
        expected = F.linear(x, ql.dequantized(), lin.bias)
        kernels = ("native", "aten", "dequant") if rows == 1 else ("native", "dequant")
        for kernel in kernels:
            ql.kernel = kernel
            with torch.no_grad():
                torch.testing.assert_close(ql(x), expected, rtol=1e-5, atol=1e-5)
    assert native.available()  # so the "native" rows above did run the native kernels
    with torch.no_grad():  # more rows than the native kernels take: the dequantize path
        x = torch.randn(1, native.MAX_ROWS + 1, 256)
        torch.testing.assert_close(ql(x), F.linear(x, ql.dequantized(), lin.bias))


@pytest.mark.parametrize("method, group", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_dynamic_activations_equal_the_quantized_activations_product(method, group):
    """The default numerics: every row count (the integer kernels up to 16 rows, native.gemm_path()'s beyond; int4's
    kernels at any count) computes F.linear of the quantize-dequantized activations with the dequantized weights; the
    path that ran is named; weight-only keeps the fp32 activations."""
    from gptforge import native

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    ql = QuantLinear(lin, method, group)
    assert ql.activations == "dynamic"
    if method == "int8":
        ql.weight_q, ql.scales = Q.int8_codes(lin.weight.detach())
    else:
        ql.weight_q, ql.scales, ql.zeros = Q.int4_codes(lin.weight.detach(), group)
    for rows, path in ((1, native.ops.quant_path()), (16, native.ops.quant_path()),
                       (40, native.ops.gemm_label() if method == "int8" else native.ops.quant_path())):
        x = torch.randn(1, rows, 256)
        assert ql.path(x) == f"{method}-dynamic:{path}"
        with torch.no_grad():
            expected = F.linear(quantize_activations(x, group), ql.dequantized(), lin.bias)
            torch.testing.assert_close(ql(x), expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(ql(x), F.linear(x, ql.dequantized(), lin.bias), rtol=1e-5, atol=1e-5)
    ql.activations = "weight-only"
    x = torch.randn(1, 1, 256)
    assert ql.path(x) == "weight-only:native"
    with torch.no_grad():
        torch.testing.assert_close(ql(x), F.linear(x, ql.dequantized(), lin.bias), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """The tiny model trained briefly on the prepared plays (60 steps, a few seconds on a quiet machine): real
    weight and activation distributions for the quantized perplexity bounds."""
    from gptforge.train import train

    tc = TrainConfig(micro_batch=8, seq_len=32, max_steps=60, warmup_steps=5, lr=5e-3, eval_every=1000,
                     eval_batches=1, log_every=1000, save_every=1000, tensorboard=False, threads=2)
    cfg = RunConfig(model=model_preset("tiny"), train=tc, data=str(prepared), out=str(tmp_path_factory.mktemp("tr")))
    torch.manual_seed(0)
    model, _, _ = load_checkpoint(train(cfg, progress=False).checkpoint)
    return model


def _perplexity(model, windows: torch.Tensor, rows: int) -> float:
    """exp(mean next-token loss) over the windows, `rows` tokens per forward (16: every matmul on the few-row
    kernels; 64 x 4: the many-row paths)."""
    losses = []
    with torch.no_grad():
        for chunk in windows.split(4 if rows > 16 else 1):
            x = chunk[:, :rows]
            logits = model(x[:, :-1])
            losses.append(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none"))
    return torch.cat(losses).mean().exp().item()


@pytest.mark.parametrize("method, group, bound_pct", [("int8", None, 0.5), ("int4", 32, 5.0)])
def test_quantized_perplexity_is_within_the_bounds_with_dynamic_activations(trained, prepared, method, group, bound_pct):
    """Δ perplexity vs fp32 on held-out text: int8 <= 0.5%, int4 g32 <= 5%, with the activations quantized too,
    on the decode kernels (17-token windows, 16 rows a product) and on the prefill paths (4 x 65 tokens)."""
    from gptforge.data import BatchSampler, TokenData

    batch = BatchSampler(TokenData(prepared).shards("val"), 32, 64, seed=5).batch(0)[0]  # (32, 65) held-out tokens
    for rows in (17, 65):
        fp32 = _perplexity(trained, batch, rows)
        dynamic, _, _ = quantize_model(trained, method, group)
        weight_only, _, _ = quantize_model(trained, method, group, activations="weight-only")
        d_dyn = 100 * (_perplexity(dynamic, batch, rows) / fp32 - 1)
        d_wo = 100 * (_perplexity(weight_only, batch, rows) / fp32 - 1)
        assert abs(d_dyn) <= bound_pct, (rows, fp32, d_dyn, d_wo)
        assert abs(d_wo) <= bound_pct, (rows, fp32, d_dyn, d_wo)
        assert d_dyn != d_wo  # the activations really were quantized


@pytest.mark.parametrize("tied", [True, False])
def test_output_head_is_quantized(tied):
    """The quantized model equals an fp model whose every matrix, the head included, is replaced by its
    dequantized codes: so the head really runs on the quantized table."""
    model = tiny(tie_embeddings=tied)
    q, _, state = quantize_model(model, "int4", 32, activations="weight-only")
    assert isinstance(q.tok_emb, QuantEmbedding)
    assert "tok_emb.weight" not in state and "lm_head.weight" not in state
    if not tied:
        assert isinstance(q.lm_head, QuantLinear)
    fake = tiny(tie_embeddings=tied)
    fake.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, (QuantLinear, QuantEmbedding)):
                fake.get_submodule(name).weight.copy_(m.dequantized())
    x = torch.randint(0, 500, (2, 16))
    torch.testing.assert_close(q(x), fake(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q(x), model(x), atol=1e-4)  # and the codes did change the weights


def test_quantized_checkpoint_generates(ckpt, tmp_path):
    from gptforge.generate import generate, load

    dest, _ = quantize_checkpoint(str(ckpt), "int8", str(tmp_path / "q8"))
    model, tok = load(dest, device="cpu")
    out = generate(model, tok, "the ", max_new_tokens=8, temperature=0.0)
    assert isinstance(out, str) and len(tok.encode(out)) >= 1


def test_generate_verbose_names_the_kernels(ckpt, tmp_path, capsys):
    from gptforge import native
    from gptforge.cli import main

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    dest, _ = quantize_checkpoint(str(ckpt), "int8", str(tmp_path / "q8"))
    assert main(["generate", str(dest), "--prompt", "the king " * 20, "--max-new-tokens", "2", "--verbose"]) == 0
    err = capsys.readouterr().err
    assert f"matmuls, decode step: 9 int8-dynamic:{native.ops.quant_path()}" in err  # 2 blocks x 4 + the head
    assert f"9 int8-dynamic:{native.ops.gemm_label()}" in err  # the prompt's rows


def test_weight_only_activations_are_recorded_and_loaded(ckpt, tmp_path):
    dest, section = quantize_checkpoint(str(ckpt), "int8", str(tmp_path / "q"), activations="weight-only")
    assert section["quantization"]["activations"] == "weight-only"
    model, _, cfg = load_checkpoint(dest)
    assert cfg.compression.quantization.activations == "weight-only"
    assert {m.activations for m in model.modules() if isinstance(m, QuantLinear)} == {"weight-only"}
    with pytest.raises(GptforgeError, match="applies to int8 and int4"):
        quantize_checkpoint(str(ckpt), "bf16", str(tmp_path / "c"), activations="dynamic")
    with pytest.raises(GptforgeError, match="unknown activation quantization"):
        quantize_checkpoint(str(ckpt), "int8", str(tmp_path / "d"), activations="int4")


def test_quantize_bad_input(ckpt, tmp_path):
    model = tiny()
    with pytest.raises(GptforgeError, match="unknown quantization method 'int3'"):
        quantize_state_dict(model, "int3")
    with pytest.raises(GptforgeError, match="group size 128 does not divide the input width 64"):
        quantize_state_dict(model, "int4", 128)
    with pytest.raises(GptforgeError, match="must be one of 32, 64, 128"):
        quantize_state_dict(model, "int4", 48)
    dest, _ = quantize_checkpoint(str(ckpt), "int8", str(tmp_path / "q8"))
    with pytest.raises(GptforgeError, match="already quantized"):
        quantize_checkpoint(str(dest), "int4", str(tmp_path / "again"))


# --- pruning ------------------------------------------------------------------------------------------------

def _batches(prepared, n=2):
    from gptforge.compress.prune import calibration_batches
    return calibration_batches(str(prepared), n, 4, 32)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_unstructured_reaches_the_sparsity_exactly(prepared, method, sparsity):
    model = tiny(vocab_size=TokenData(prepared).tokenizer().vocab_size)
    pruned, section, masks = prune_model(model, method, sparsity, batches=_batches(prepared))
    for name, m in block_linears(pruned).items():
        zeros = (m.weight == 0)
        if method == "wanda":  # compared within each output row: every row loses exactly its share
            assert (zeros.sum(1) == round(sparsity * m.in_features)).all(), name
        else:
            assert int(zeros.sum()) == round(sparsity * m.weight.numel()), name
    assert section["pruning"]["measured_sparsity"] == pytest.approx(sparsity, abs=2e-3)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_four_pattern_is_exact(prepared, method):
    model = tiny(vocab_size=TokenData(prepared).tokenizer().vocab_size)
    pruned, section, _ = prune_model(model, method, None, "2:4", batches=_batches(prepared))
    for m in block_linears(pruned).values():
        nonzero = (m.weight != 0).reshape(m.out_features, -1, 4).sum(-1)
        assert (nonzero == 2).all()
    assert section["pruning"]["measured_sparsity"] == 0.5


def test_wanda_weighs_weights_by_activation_norms(prepared):
    model = tiny(vocab_size=TokenData(prepared).tokenizer().vocab_size)
    batches = _batches(prepared)
    wanda = unstructured_masks(model, "wanda", 0.5, batches=batches)
    magnitude = unstructured_masks(model, "magnitude", 0.5)
    differ = sum(int((wanda[k] != magnitude[k]).sum()) for k in wanda)
    assert differ > 0.05 * sum(m.numel() for m in wanda.values())


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2, "mlp": "swiglu", "bias": False, "pos_encoding": "rotary"}])
def test_structured_shrinks_and_equals_the_masked_model(prepared, kw):
    model = tiny(**kw)
    plan = structured_plan(model, 0.5, _batches(prepared))
    small = shrink(model, plan)
    cfg, new = model.config, small.config
    assert new.kv_heads == cfg.kv_heads // 2 and new.n_head == cfg.n_head // 2
    assert new.head_dim == cfg.head_dim and new.mlp_width == cfg.mlp_width // 2
    assert small.blocks[0].attn.qkv.weight.shape[0] < model.blocks[0].attn.qkv.weight.shape[0]
    assert small.num_params() < model.num_params() and small.num_params() == new.num_params()
    # The masked model: the dropped heads' and channels' outputs zeroed in the full-size model.
    masked = tiny(**kw)
    masked.load_state_dict(model.state_dict())
    per = cfg.n_head // cfg.kv_heads
    with torch.no_grad():
        for i, block in enumerate(masked.blocks):
            for g in set(range(cfg.kv_heads)) - set(plan.groups[i]):
                block.attn.proj.weight[:, g * per * cfg.head_dim:(g + 1) * per * cfg.head_dim] = 0
            drop = sorted(set(range(cfg.mlp_width)) - set(plan.channels[i]))
            block.mlp.down.weight[:, drop] = 0
    x = torch.randint(0, 500, (2, 24))
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)


def test_structured_checkpoint_loads_with_its_new_shape(ckpt, prepared, tmp_path):
    dest, section, _ = prune_checkpoint(str(ckpt), "structured", str(tmp_path / "s"), 0.25, data=str(prepared))
    model, _, cfg = load_checkpoint(dest)
    assert cfg.model.n_head == 3 and cfg.model.head_size == 16 and cfg.model.d_mlp == 192
    assert model(torch.randint(0, 500, (1, 8))).shape == (1, 8, cfg.model.padded_vocab_size)


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("preset,kw", [("gpt2", {}), ("tiny", {}), ("tiny", {"n_kv_head": 2, "mlp": "swiglu"}),
                                       ("gpt2", {"d_mlp": 3000})])
def test_structured_widths_are_aligned_and_reach_the_sparsity(preset, kw, sparsity):
    cfg = dataclasses.replace(model_preset(preset), **kw)
    groups, channels, achieved = structured_widths(cfg, sparsity)
    assert channels % 64 == 0 and 1 <= groups <= cfg.kv_heads

    def block_weights(heads, kv, f):  # one layer's Linear weights: qkv, proj, the MLP's 2 or 3 matrices
        d, hd = cfg.d_model, cfg.head_dim
        return (heads + 2 * kv) * hd * d + heads * hd * d + (3 if cfg.mlp == "swiglu" else 2) * d * f

    per = cfg.n_head // cfg.kv_heads
    total = block_weights(cfg.n_head, cfg.kv_heads, cfg.mlp_width)
    assert achieved == pytest.approx(1 - block_weights(groups * per, groups, channels) / total, abs=1e-12)
    assert achieved >= sparsity
    # ...and no more than needed: 64 more channels would have fallen short.
    if channels + 64 <= cfg.mlp_width:
        assert 1 - block_weights(groups * per, groups, channels + 64) / total < sparsity


def test_structured_widths_for_gpt2_and_the_bench_parent():
    # gpt2 at 30%: 8 of 12 heads, 2176 of 3072 channels (34 x 64), 30.6% of the block weights.
    assert structured_widths(model_preset("gpt2"), 0.3) == (8, 2176, pytest.approx(0.30556, abs=1e-5))
    parent = ModelConfig(n_layer=4, n_head=4, d_model=128, pos_encoding="rotary", norm="rmsnorm", bias=False)
    assert structured_widths(parent, 0.3) == (3, 320, pytest.approx(1 / 3))
    with pytest.raises(GptforgeError, match="can lose at most 0.750 of its block weights"):
        structured_widths(model_preset("tiny"), 0.9)


def test_structured_pruned_model_quantizes_and_reports_its_sparsity(prepared):
    model = tiny(n_layer=1, d_model=128, n_head=4, d_mlp=512)
    small, section, _ = prune_model(model, "structured", 0.3, batches=_batches(prepared))
    assert section["pruning"]["mlp_channels"] == "512->320" and section["pruning"]["measured_sparsity"] >= 0.3
    # An aligned width is one int4 g32 groups divide (358 channels, the old nearest rounding, would not).
    q = quantize_model(small, "int4", 32)[0]
    x = torch.randint(0, 500, (1, 8))
    assert (q(x) - small(x)).abs().max() < 0.5


def test_recovery_keeps_the_sparsity(ckpt, prepared, tmp_path):
    before, _, _ = load_checkpoint(ckpt)
    dest, section, result = prune_checkpoint(str(ckpt), "magnitude", str(tmp_path / "m"), 0.5, data=str(prepared),
                                             recover_steps=3, progress=False)
    assert result.steps == 3 and section["pruning"]["recover_steps"] == 3
    after, _, cfg = load_checkpoint(dest)
    for name, m in block_linears(after).items():
        assert int((m.weight == 0).sum()) == m.weight.numel() // 2, name
    assert cfg.compression.pruning.method == "magnitude"
    changed = [not torch.equal(m.weight, before.get_submodule(n).weight) for n, m in block_linears(after).items()]
    assert all(changed)


def test_prune_bad_input(ckpt, tmp_path):
    model = tiny()
    for s in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(GptforgeError, match=r"--sparsity must be in \(0, 1\)"):
            prune_model(model, "magnitude", s)
    with pytest.raises(GptforgeError, match="unknown pruning method 'random'"):
        prune_model(model, "random", 0.5)
    with pytest.raises(GptforgeError, match="pattern 2:4 means sparsity 0.5"):
        prune_model(model, "magnitude", 0.3, "2:4")
    with pytest.raises(GptforgeError, match="wanda needs --data"):
        prune_checkpoint(str(ckpt), "wanda", str(tmp_path / "w"), 0.5)


# --- distillation -------------------------------------------------------------------------------------------

def test_distill_loss_is_zero_for_the_teacher_itself():
    teacher = tiny()
    loss_fn = DistillLoss(teacher, 512, DistillConfig(temperature=2.0, kl_weight=1.0, ce_weight=0.0))
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    y[0, :4] = -100
    teacher.train()  # (dropout is 0) in eval mode the objective is plain cross-entropy, checked below
    loss, n = loss_fn(teacher, x, y)
    assert int(n) == 28 and abs(float(loss)) < 1e-5
    teacher.eval()
    ce = F.cross_entropy(teacher(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    assert float(loss_fn(teacher, x, y)[0]) == pytest.approx(float(ce), rel=1e-6)


def test_distill_gradient_matches_finite_differences():
    torch.manual_seed(3)
    teacher, student = tiny().double(), tiny(n_layer=1, d_model=32, n_head=2).double()
    loss_fn = DistillLoss(teacher, 512, DistillConfig(temperature=1.5, kl_weight=0.7, ce_weight=0.3))
    x, y = torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (2, 8))
    student.train()
    loss, _ = loss_fn(student, x, y)
    loss.backward()
    for p, rows in ((student.blocks[0].mlp.up.weight, (0, 3, 100)), (student.tok_emb.weight, (int(x[0, 0]), int(y[1, 2])))):
        for idx in [(r, c) for r in rows for c in (0, 7)]:
            eps, old = 1e-6, p.data[idx].item()
            p.data[idx] = old + eps
            up = loss_fn(student, x, y)[0].item()
            p.data[idx] = old - eps
            down = loss_fn(student, x, y)[0].item()
            p.data[idx] = old
            assert p.grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_distill_trains_through_the_loop_and_checks_the_tokenizer(ckpt, prepared, plays_dir, tmp_path):
    student = dataclasses.replace(model_preset("tiny"), n_layer=1, d_model=32, n_head=2)
    cfg = RunConfig(model=student, train=dataclasses.replace(SMALL_TRAIN, max_steps=3), data=str(prepared),
                    out=str(tmp_path / "student"))
    result = distill(cfg, str(ckpt), progress=False)
    assert result.steps == 3 and (result.checkpoint / "model.safetensors").is_file()
    other = tmp_path / "other"
    prepare([str(plays_dir)], other, vocab_size=600, val_fraction=0.5, progress=False)
    with pytest.raises(GptforgeError, match="teacher and student tokenizers differ"):
        distill(dataclasses.replace(cfg, data=str(other), out=str(tmp_path / "s2")), str(ckpt), progress=False)
    with pytest.raises(GptforgeError, match="temperature must be > 0"):
        DistillConfig(temperature=0)


# --- eval ---------------------------------------------------------------------------------------------------

def test_eval_of_identical_checkpoints(ckpt, prepared, tmp_path):
    dest, _ = quantize_checkpoint(str(ckpt), "int8", str(tmp_path / "q8"))
    rows = eval_checkpoints([str(ckpt), str(ckpt), str(dest)], str(prepared), batches=2, batch_size=2, decode_tokens=4)
    a, b, q = rows
    assert b["mean_kl"] == 0.0 and b["top1_agreement_pct"] == 100.0 and b["delta_ppl_pct"] == 0.0
    assert b["val_loss"] == a["val_loss"] and a["params"] == q["params"] == GPT(load_checkpoint(ckpt)[2].model).num_params()
    assert 0 < q["mean_kl"] < 0.01 and q["file_bytes"] < 0.3 * a["file_bytes"]
    assert a["decode_tokens_per_s"] > 0 and q["weights_memory_bytes"] < 0.3 * a["weights_memory_bytes"]


def test_head_size_config_is_backward_compatible():
    assert ModelConfig(n_head=4, d_model=64).head_dim == 16
    cfg = ModelConfig(n_head=3, d_model=64, head_size=16)
    assert cfg.head_dim == 16 and GPT(cfg).num_params() == cfg.num_params()
    with pytest.raises(GptforgeError, match="divisible"):
        ModelConfig(n_head=3, d_model=64)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_model_dtype_casts_leave_the_codes_format_alone(method):
    """gptforge.load casts the model to its dtype; the scales and minima keep the dtypes the kernels read, so a
    quantized model still decodes, with the same logits as before the cast."""
    model = tiny()
    q, _, _ = quantize_model(model, method, 32 if method == "int4" else None)
    x = torch.randint(0, 500, (1, 5))
    with torch.no_grad():
        before = q(x)
        q.float()
        after = q(x)
        step = q(x[:, :1])  # one row: the decode kernels
    ql = q.blocks[0].mlp.up
    assert ql.scales.dtype == (torch.float32 if method == "int8" else torch.float16)
    torch.testing.assert_close(after, before)
    torch.testing.assert_close(step, before[:, :1], rtol=1e-4, atol=1e-4)


# --- quantized quality on an imported model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def imported(prepared, tmp_path_factory):
    """hfquant.train_hf_llama's model (80 steps, ~4 s) brought in by import_hf: its checkpoint folder."""
    pytest.importorskip("transformers", reason="the imported model is built with transformers")
    from gptforge.interop import import_hf

    folder = tmp_path_factory.mktemp("hf") / "llama"
    val_loss = hfquant.train_hf_llama(prepared, folder)
    assert val_loss < 0.75 * math.log(TokenData(prepared).vocab_size), val_loss  # clearly learned: uniform is 6.24
    return import_hf(folder, tmp_path_factory.mktemp("imported") / "ckpt")


@pytest.mark.parametrize("method, group, bound_pct", [("int8", None, 0.5), ("int4", 32, 5.0)])
def test_quantized_perplexity_of_an_imported_model_is_within_the_bounds(imported, prepared, tmp_path, method, group,
                                                                         bound_pct):
    """The imported Llama's Δ perplexity vs its fp32 self on held-out text, quantized by quantize_checkpoint and
    loaded by gptforge.generate.load (the native decode ops): int8 <= 0.5%, int4 g32 <= 5%, with dynamic activations
    and weight-only, through the decode steps and the prefill; and dynamic differs from weight-only."""
    fp32, got = hfquant.quantized_deltas(imported, prepared, tmp_path, method, group)
    assert fp32[0] == pytest.approx(fp32[1], rel=1e-4)  # the decode steps compute what the prefill does
    assert fp32[0] < 0.2 * TokenData(prepared).vocab_size  # and the model learned: uniform is 512
    for acts, deltas in got.items():
        assert all(abs(d) <= bound_pct for d in deltas), (fp32, got)
    assert got["dynamic"] != got["weight-only"], got  # the activations really were quantized
    print(f"imported {method}: fp32 ppl decode/prefill {fp32[0]:.3f}/{fp32[1]:.3f}, Δ% {got}")


def test_matmul_bytes_counts_each_product_weight_once():
    """A decode step's weight bytes: fp32 Linears at 4 bytes a weight plus the tied head (the table once, not again
    as the embedding); int8 at 1 byte plus a 4-byte scale per row; int4 g32 at half a byte plus two fp16 per group."""
    model = tiny()
    cfg = model.config
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in linears) + cfg.vocab_size * cfg.d_model
    rows = sum(m.out_features for m in linears) + cfg.vocab_size
    assert matmul_bytes(model) == 4 * weights
    assert matmul_bytes(quantize_model(tiny(), "int8")[0]) == weights + 4 * rows
    assert matmul_bytes(quantize_model(tiny(), "int4", 32)[0]) == weights // 2 + 2 * 2 * weights // 32
