"""The planner against measurement: exact parameter counts, model-state bytes within 1% of the tensors held after
an optimizer step, activation bytes within 10% of what autograd saves, and the errors for impossible settings."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gptforge.config import MODEL_PRESETS, ModelConfig, RunConfig, TrainConfig, build_run_config, model_preset
from gptforge.errors import GptforgeError
from gptforge.hardware import PRESETS, get_hardware
from gptforge.hf import model_config_from_hf
from gptforge.model import GPT
from gptforge.optim import build_optimizer
from gptforge.plan import (PlanConfig, activation_bytes, load_model_config, load_run_config, make_plan,
                           max_micro_batch, model_state_bytes, param_shapes, param_tensors, parse_tokens,
                           plan_config_from_run, recommend)


def model_from_hf_config(raw):  # the one HF key map, hf.py's, as import-hf reads it
    return model_config_from_hf(raw)[0]

# GPT-2 small's config.json as published on the Hugging Face hub (the keys the importer reads, plus some it ignores).
GPT2_HF = {"model_type": "gpt2", "activation_function": "gelu_new", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
           "n_layer": 12, "n_positions": 1024, "layer_norm_epsilon": 1e-05, "vocab_size": 50257,
           "resid_pdrop": 0.1, "architectures": ["GPT2LMHeadModel"]}
GPT2_HF_PARAMS = 124_439_808  # transformers GPT2LMHeadModel(...).num_parameters(); ours pads 50257 -> 50304 rows
LLAMA32_1B_HF = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                 "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
                 "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False}
LLAMA32_1B_PARAMS = 1_235_814_400  # meta-llama/Llama-3.2-1B model card / num_parameters()


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_param_count_is_exact_for_presets(name):
    cfg = model_preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    plan = make_plan(PlanConfig(cfg, seq_len=min(cfg.block_size, 256), micro_batch=1), get_hardware("h100-sxm"))
    assert plan.params == sum(p.numel() for p in model.parameters())
    n_tensors, sizes = param_tensors(cfg)  # AdamW keeps a step counter per tensor
    assert n_tensors == len(list(model.parameters())) and sum(sizes) == plan.params
    assert param_shapes(cfg) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # Muon picks by name


def test_param_count_of_hf_configs():
    gpt2 = model_from_hf_config(GPT2_HF)
    padding = (gpt2.padded_vocab_size - gpt2.vocab_size) * gpt2.d_model
    assert gpt2.num_params() - padding == GPT2_HF_PARAMS
    with torch.device("meta"):
        assert sum(p.numel() for p in GPT(gpt2).parameters()) == gpt2.num_params()
    llama = model_from_hf_config(LLAMA32_1B_HF)
    assert llama.num_params() == LLAMA32_1B_PARAMS  # 128256 is already a multiple of 64
    assert llama.num_params() == model_preset("llama-1b").num_params()


def test_model_inputs_from_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2_HF))
    assert load_model_config(str(tmp_path / "config.json")).d_model == 768
    assert load_model_config(str(tmp_path)).n_layer == 12  # a folder holding an HF config.json
    (tmp_path / "run.yaml").write_text("model:\n  preset: tiny\n  n_layer: 3\n")
    assert load_model_config(str(tmp_path / "run.yaml")).n_layer == 3
    assert load_model_config("gpt2-medium").n_layer == 24


# --- model states: weights + gradients + optimizer, measured after one AdamW step ---------------------------

SMALL = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=500, block_size=32)
SMALL_LLAMA = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=500, block_size=32,
                          pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


def held_state_bytes(cfg, precision, optimizer="adamw"):
    torch.manual_seed(0)
    model = GPT(cfg)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer), "cpu")
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = F.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
    loss.backward()
    opt.step()
    storages = {}
    tensors = [t for p in model.parameters() for t in (p, p.grad)]
    tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("cfg", [SMALL, SMALL_LLAMA], ids=["gpt2-like", "llama-like"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-pure"])
def test_model_state_bytes_within_1_percent(cfg, precision):
    s = model_state_bytes(cfg, precision, "adamw")
    predicted = s.weights + s.gradients + s.optimizer
    measured = held_state_bytes(cfg, precision)
    assert abs(predicted - measured) / measured < 0.01, (predicted, measured)
    assert predicted / cfg.num_params() == pytest.approx({"fp32": 16, "bf16": 16, "bf16-pure": 8}[precision], rel=0.01)


# (sgd and adamw-8bit, which train cannot run, were dropped from plan; test_optimizer_variants checked their bytes.)

def test_muon_state_bytes_by_hand_and_measured():
    """configs/speedrun.yaml's Muon run: a momentum per block matrix, AdamW's two states (+ a step) for the rest."""
    cfg = model_preset("speedrun")  # 4 layers, d 256, relu2 MLP 1024 wide, no biases, qk-norm, untied head
    muon = 4 * (256 * 768 + 256 * 256 + 256 * 1024 + 1024 * 256)  # qkv, proj, up, down per block
    adamw = 2 * 4096 * 256 + 4 * (256 + 256 + 64 + 64) + 256  # tok_emb, lm_head; norm1/2, q/k norms; norm_f
    assert muon + adamw == cfg.num_params()
    for precision, w in (("fp32", 4), ("bf16", 4), ("bf16-pure", 2)):
        s = model_state_bytes(cfg, precision, "muon")
        assert s.optimizer == w * muon + 2 * w * adamw + 4 * (2 + 4 * 4 + 1)  # 19 AdamW tensors keep a step
        measured = held_state_bytes(cfg, precision, "muon")
        assert abs(s.weights + s.gradients + s.optimizer - measured) / measured < 0.01


# --- activations: what autograd saves for backward, counted as distinct storages ------------------------------

def eager_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Reference eager attention (softmax(QK^T/sqrt(d)) V with a causal mask), as HF's `eager` path computes it."""
    h, kv, t = q.size(1), k.size(1), q.size(-2)
    if kv != h:
        k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(att, dim=-1) @ v


def saved_activation_bytes(cfg, b, t, precision, checkpointing=False):
    """Bytes of the distinct non-parameter storages autograd saves in one forward + loss of a micro-batch."""
    torch.manual_seed(0)
    model = GPT(cfg)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    if checkpointing:  # reference: reentrant checkpointing saves each block's inputs through save_for_backward
        from torch.utils.checkpoint import checkpoint

        for block in model.blocks:
            block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=True))(block.forward)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(x):
        s = x.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return x

    idx = torch.randint(0, cfg.vocab_size, (b, t))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = F.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten(), reduction="sum")
    loss.backward()  # the graph is sound
    return sum(seen.values())


ACT_CASES = [  # (config, batch, seq, precision, attention, checkpointing)
    (SMALL, 2, 32, "fp32", "sdpa", False),
    (SMALL, 4, 24, "bf16", "sdpa", False),
    (SMALL, 2, 32, "bf16-pure", "sdpa", False),
    (SMALL_LLAMA, 3, 32, "fp32", "sdpa", False),
    (SMALL_LLAMA, 2, 32, "bf16", "sdpa", False),
    (SMALL, 2, 32, "fp32", "eager", False),
    (SMALL_LLAMA, 2, 32, "bf16", "eager", False),
    (SMALL_LLAMA, 2, 16, "bf16-pure", "eager", False),
    (SMALL, 2, 32, "fp32", "sdpa", True),
    (SMALL_LLAMA, 2, 32, "bf16", "sdpa", True),
    (ModelConfig(n_layer=3, n_head=6, d_model=96, vocab_size=64, block_size=128), 1, 128, "fp32", "eager", False),
    (ModelConfig(n_layer=3, n_head=6, d_model=96, vocab_size=64, block_size=128), 1, 128, "bf16", "sdpa", False),
]


@pytest.mark.parametrize("cfg, b, t, precision, attention, ckpt", ACT_CASES)
def test_activation_bytes_within_10_percent(monkeypatch, cfg, b, t, precision, attention, ckpt):
    if attention == "eager":
        monkeypatch.setattr(F, "scaled_dot_product_attention", eager_attention)
    measured = saved_activation_bytes(cfg, b, t, precision, ckpt)
    predicted = activation_bytes(cfg, b, t, precision, attention, ckpt, device="cpu").saved
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


@pytest.mark.parametrize("cfg, precision", [(SMALL, "fp32"), (SMALL_LLAMA, "bf16")], ids=["gpt2-fp32", "llama-amp"])
def test_activation_checkpointing_of_the_trainer(cfg, precision):
    """distributed.apply_activation_checkpointing (non-reentrant): the hooks see each block's input (saved by the
    checkpoint) and nothing of the block's inside, which is recomputed in backward."""
    from gptforge.distributed import apply_activation_checkpointing

    torch.manual_seed(0)
    model = apply_activation_checkpointing(GPT(cfg))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    b, t = 2, 32
    idx = torch.randint(0, cfg.vocab_size, (b, t))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = F.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten(), reduction="sum")
    loss.backward()
    measured = sum(seen.values())
    predicted = activation_bytes(cfg, b, t, precision, "sdpa", checkpointing=True, device="cpu").saved
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_activation_terms_scale_as_the_formulas_say():
    cfg = model_preset("gpt2")
    a1 = activation_bytes(cfg, 1, 1024, "bf16", "sdpa")
    a2 = activation_bytes(cfg, 2, 1024, "bf16", "sdpa")
    assert a2.layers == 2 * a1.layers and a2.head == 2 * a1.head  # linear in the batch
    eager = activation_bytes(cfg, 1, 1024, "bf16", "eager")
    # eager keeps the T x T softmax per head: fp32 under CUDA autocast plus the bf16 copy P@V uses, 6 bytes
    assert eager.per_layer - a1.per_layer > 12 * 1024 * 1024 * 6
    ck = activation_bytes(cfg, 1, 1024, "bf16", "sdpa", checkpointing=True)
    assert ck.per_layer == 1024 * 768 * 4  # only the fp32 block input
    assert a1.head > 1024 * 50304 * 4  # the fp32 log-softmax over the vocabulary


# --- the plan, recommendations and bad input ----------------------------------------------------------------

def test_gpt2_on_h100_plan_numbers():
    pc = PlanConfig(model_preset("gpt2"), micro_batch=16, global_batch=512, world_size=8, hardware="h100-sxm",
                    tokens=10_000_000_000)
    plan = make_plan(pc)
    assert plan.config.accum_steps == 4
    assert plan.throughput.flops_per_token == 6 * (85_054_464 + 1536 + 50304 * 768) + 12 * 12 * 768 * 1024
    # 8 x 989 TFLOP/s x 0.4 / FLOPs per token
    assert plan.throughput.tokens_per_s == pytest.approx(8 * 989e12 * 0.4 / plan.throughput.flops_per_token, rel=1e-6)
    assert plan.memory.fits
    assert plan.inference.kv_bytes_per_token == 2 * 12 * 768 * 2
    matmul_weights = 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 50304 * 768
    assert plan.inference.decode_tokens_per_s == pytest.approx(
        3350e9 / (matmul_weights * 2 + 2 * 12 * 768 * 2 * 1024), rel=1e-9)
    assert json.loads(json.dumps(plan.to_dict()))["memory"]["fits"] is True


def test_recommend_and_sharding():
    big = PlanConfig(model_preset("llama-1b"), seq_len=2048, micro_batch=32, global_batch=256, world_size=8,
                     hardware="a10g")
    hw = get_hardware("a10g")
    plan = make_plan(big, hw)
    assert not plan.memory.fits and plan.suggestion
    rec = recommend(big, hw, deadline_hours=24 * 7)
    assert rec["parallel"] == "fsdp"  # 16 bytes/param of AdamW states alone nearly fill a 24 GB A10G
    assert rec["micro_batch"] >= 1 and 32 % rec["micro_batch"] == 0
    assert rec["accum_steps"] * rec["micro_batch"] * 8 == 256
    assert rec["cheapest"] is not None and rec["cheapest"]["hours"] <= 24 * 7
    ddp = make_plan(PlanConfig(model_preset("gpt2-xl"), micro_batch=1, world_size=8, hardware="a100-40gb"))
    fsdp = make_plan(PlanConfig(model_preset("gpt2-xl"), micro_batch=1, world_size=8, parallel="fsdp",
                                hardware="a100-40gb"))
    assert fsdp.memory.optimizer * 8 >= ddp.memory.optimizer > fsdp.memory.optimizer * 7
    assert max_micro_batch(fsdp.config, fsdp.hardware) > max_micro_batch(ddp.config, ddp.hardware)


def test_cpu_hardware_is_measured():
    cpu = get_hardware("cpu")
    assert cpu.fp32_tflops > 1e-3 and cpu.bandwidth_gbs > 0.5 and cpu.memory_gib > 1


@pytest.mark.parametrize("make, message", [
    (lambda: get_hardware("h100"), "known: a100-40gb"),
    (lambda: get_hardware("custom:memory=24"), "needs bf16, bandwidth"),
    (lambda: PlanConfig(model_preset("tiny"), micro_batch=3, world_size=2, global_batch=8), "--global-batch 6"),
    (lambda: PlanConfig(model_preset("tiny"), world_size=3, nodes=2), "multiple of nodes"),
    (lambda: PlanConfig(model_preset("tiny"), seq_len=100), "exceeds the model's block_size"),
    (lambda: PlanConfig(model_preset("tiny"), precision="fp8"), "is not one of auto, fp32, bf16, fp16, bf16-pure"),
    (lambda: ModelConfig(d_model=100, n_head=12), "divisible by model.n_head"),
    (lambda: load_model_config("gpt3"), "valid presets"),
    (lambda: model_from_hf_config({"model_type": "bert"}), "not supported"),
    (lambda: model_from_hf_config([1, 2]), "not a mapping"),
    (lambda: parse_tokens("lots"), "like 3e9"),
    (lambda: recommend(PlanConfig(model_preset("llama-1b"), world_size=1, hardware="rtx-3090"),
                       get_hardware("rtx-3090")), "smallest change: --precision bf16-pure"),
    (lambda: recommend(PlanConfig(model_preset("gpt2-xl"), micro_batch=1, world_size=1, hardware="l4"),
                       get_hardware("l4")), "fits on a100-40gb, a100-80gb, h100-sxm"),
])
def test_bad_input(make, message):
    with pytest.raises(GptforgeError, match=message.replace("(", r"\(")):
        make()


def test_parse_tokens():
    assert parse_tokens("chinchilla") is None
    assert parse_tokens("300B") == 300_000_000_000 and parse_tokens("2.5e6") == 2_500_000
    assert sorted(PRESETS) == sorted(["a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "l4", "a10g",
                                      "rtx-4090", "rtx-3090"])


# --- the CLI, bench and report -------------------------------------------------------------------------------

def test_plan_cli_json_and_tables(capsys):
    from gptforge.cli import main

    assert main(["plan", "gpt2", "--micro-batch", "4", "--global-batch", "64", "--world-size", "8", "--parallel", "fsdp",
                 "--hardware", "a100-80gb", "--tokens", "2.5B", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 124_475_904 and out["config"]["accum_steps"] == 2
    assert out["throughput"]["train_tokens"] == 2_500_000_000 and out["memory"]["fits"] is True
    assert main(["plan", "llama-1b", "--hardware", "l4", "--micro-batch", "2", "--world-size", "8",
                 "--recommend", "--deadline", "100"]) == 0
    text = capsys.readouterr().out
    assert "does not fit" in text and "smallest change that fits" in text and "recommended:" in text
    assert main(["plan", "gpt2", "--world-size", "3", "--micro-batch", "2", "--global-batch", "8"]) == 2
    assert "--global-batch 6" in capsys.readouterr().err


def test_bench_rows_compare_plan_and_measurement():
    from gptforge.bench import bench

    rows = {r.quantity: r for r in bench(model_preset("tiny"), micro_batch=2, seq_len=32, steps=1, decode_tokens=4)}
    train = rows["train tokens/s"]
    assert train.measured > 0 and train.error == pytest.approx((train.predicted - train.measured) / train.measured)
    assert rows["train MFU"].predicted == 0.4 and 0 < rows["train MFU"].measured
    assert rows["decode tokens/s (batch 1)"].measured > 0
    assert rows["train peak memory"].measured is None and rows["train peak memory"].error is None  # no CPU allocator stats


def test_report_plots_several_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from gptforge.report import report

    for name, lr in (("a", 1e-3), ("b", 3e-4)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(f"train:\n  lr: {lr}\n")
        lines = [{"step": s, "loss": 5.0 / s, "lr": lr, "grad_norm": 1.0 / s, "tokens_per_s": 1000.0 + s}
                 for s in range(1, 6)] + [{"step": 5, "val_loss": 1.2, "val_ppl": 3.3}]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    page = report([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    made = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert made == ["grad_norm.png", "loss.png", "lr.png", "tokens_per_s.png"]  # no mfu logged: no mfu plot
    text = page.read_text()
    assert "lr: 0.001" in text and "lr: 0.0003" in text and "<img src='loss.png'" in text
    with pytest.raises(GptforgeError, match="no metrics.jsonl"):
        report([tmp_path / "out"])


@pytest.mark.parametrize("precision, ckpt, optimizer", [("fp32", False, "adamw"), ("bf16", True, "adamw"),
                                                        ("bf16-pure", False, "muon")])
def test_plan_measure_runs_the_planned_steps(precision, ckpt, optimizer):
    """plan --measure: the planned memory (states + saved activations) within 10% of the tensors the real
    training step holds, for three numerics/checkpointing/optimizer settings; throughput measured and compared."""
    from gptforge.bench import measure_plan

    pc = PlanConfig(SMALL, seq_len=32, micro_batch=2, global_batch=4, precision=precision, checkpointing=ckpt,
                    optimizer=optimizer, hardware="cpu")
    rows = {r.quantity.split(" (")[0]: r for r in measure_plan(pc, "cpu", steps=1)}
    mem = rows["train memory"]
    assert abs(mem.error) < 0.10, (mem.predicted, mem.measured)
    assert rows["train tokens/s"].measured > 0 and rows["MFU"].measured > 0
    with pytest.raises(GptforgeError, match="--world-size 1"):
        measure_plan(PlanConfig(SMALL, seq_len=32, micro_batch=2, world_size=2, hardware="cpu"), "cpu")


def test_plan_measure_cli_json(capsys):
    from gptforge.cli import main

    assert main(["plan", "tiny", "--measure", "--steps", "1", "--seq-len", "32", "--micro-batch", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hardware"]["name"] == "cpu"  # --measure compares with the device it runs on
    assert {r["quantity"].split(" (")[0] for r in out["measured"]} >= {"train memory", "train tokens/s", "MFU"}


# --- one vocabulary with train; planning a run config; one HF key map -------------------------------------------

def test_plan_takes_exactly_trains_names():
    import typing

    hints = typing.get_type_hints(TrainConfig)
    for name in ("precision", "optimizer", "parallel", "fsdp_strategy"):
        for value in typing.get_args(hints[name]):
            sharded = name == "fsdp_strategy" or (name == "parallel" and value != "none")  # over two devices
            kw = {"world_size": 2 if sharded else 1, **({"parallel": "fsdp"} if name == "fsdp_strategy" else {})}
            pc = PlanConfig(model_preset("tiny"), micro_batch=1, **kw, **{name: value})
            assert make_plan(pc).memory.total > 0
    for name, dropped in (("optimizer", "sgd"), ("optimizer", "adamw-8bit"), ("parallel", "fsdp-grad-op")):
        allowed = ", ".join(typing.get_args(hints[name]))
        with pytest.raises(GptforgeError, match=f"{name}: '{dropped}' is not one of {allowed}$"):
            PlanConfig(model_preset("tiny"), **{name: dropped})
    with pytest.raises(GptforgeError, match="muon needs whole weight matrices"):  # train refuses it too
        PlanConfig(model_preset("tiny"), optimizer="muon", parallel="fsdp", world_size=2, micro_batch=1)
    # auto resolves as train resolves it; shard_grad_op keeps whole weights, full_shard shards them
    assert PlanConfig(model_preset("tiny"), hardware="cpu").precision == "fp32"
    assert PlanConfig(model_preset("tiny"), world_size=2).parallel == "ddp"
    full, grad_op = (make_plan(PlanConfig(model_preset("gpt2"), micro_batch=1, world_size=8, parallel="fsdp",
                                          fsdp_strategy=s)).memory for s in ("full_shard", "shard_grad_op"))
    assert grad_op.weights == 8 * full.weights == 4 * model_preset("gpt2").num_params()


def test_plan_of_the_speedrun_config_is_the_run_train_runs():
    run = build_run_config("configs/speedrun.yaml")
    pc = plan_config_from_run(load_run_config("configs/speedrun.yaml"))
    assert (pc.model, pc.optimizer, pc.micro_batch, pc.seq_len) == (run.model, "muon", 16, 256)
    assert (pc.precision, pc.parallel, pc.global_batch, pc.accum_steps) == ("bf16", "none", 16, 1)  # auto on an H100
    assert make_plan(pc).memory.optimizer == model_state_bytes(run.model, "bf16", "muon").optimizer
    # flags override the run; train.batch_tokens sets the global batch as the loop splits it
    tokens = dataclasses.replace(run, train=dataclasses.replace(run.train, batch_tokens=64 * 256))
    pc = plan_config_from_run(tokens, micro_batch=8, world_size=2, optimizer="adamw")
    assert (pc.global_batch, pc.accum_steps, pc.optimizer, pc.parallel) == (64, 4, "adamw", "ddp")
    with pytest.raises(GptforgeError, match="train.batch_tokens"):
        plan_config_from_run(tokens, micro_batch=48)


def test_plan_cli_reads_a_run_config(capsys):
    from gptforge.cli import main

    assert main(["plan", "configs/speedrun.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["optimizer"] == "muon" and out["config"]["micro_batch"] == 16
    assert out["memory"]["optimizer"] == model_state_bytes(model_preset("speedrun"), "bf16", "muon").optimizer
    assert main(["plan", "configs/speedrun.yaml", "--optimizer", "adamw", "--micro-batch", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["config"]["optimizer"], out["config"]["micro_batch"]) == ("adamw", 4)
    assert main(["plan", "configs/speedrun.yaml", "--tokens", "run", "--json"]) == 0  # its 150 steps of 16 x 256
    assert json.loads(capsys.readouterr().out)["throughput"]["train_tokens"] == 150 * 16 * 256
    assert main(["plan", "gpt2", "--optimizer", "sgd"]) == 2
    assert "train.optimizer: 'sgd' is not one of adamw, muon" in capsys.readouterr().err


@pytest.mark.parametrize("cfg", [SMALL, SMALL_LLAMA], ids=["gpt2-like", "llama-like"])
def test_planning_an_hf_config_equals_planning_its_import(tmp_path, cfg):
    from gptforge.checkpoint import write_checkpoint
    from gptforge.interop import export_hf, import_hf
    from gptforge.tokenizer import Tokenizer

    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 20], 300)
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    ckpt = write_checkpoint(tmp_path / "ckpt", RunConfig(model=cfg), tok, model_state=GPT(cfg).state_dict())
    hf_dir, _ = export_hf(ckpt, tmp_path / "hf")
    imported = import_hf(hf_dir, tmp_path / "imported")
    planned = load_model_config(str(hf_dir / "config.json"))
    assert planned == load_model_config(str(imported)) and planned.num_params() == cfg.num_params()
    plans = [make_plan(plan_config_from_run(load_run_config(str(p)), micro_batch=2)).to_dict()
             for p in (hf_dir / "config.json", hf_dir, imported)]
    assert plans[0] == plans[1] == plans[2]
