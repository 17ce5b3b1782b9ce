"""Training-step throughput: gptforge vs Hugging Face `transformers` GPT2LMHeadModel, same shapes, same data.

Shapes (the issue's): 6 layers, 6 heads, d_model 384, T 256, vocab 8192, micro-batch 8, AdamW, GPT-2
architecture (learned positions, LayerNorm, GELU, biases, tied head), dropout 0. Both train on the same
token windows of the bundled corpus (re-tokenized to 8192 ids by a BPE trained once), with the same thread
count. The peer runs the way its users run it: `model(input_ids, labels=...)` with SDPA attention and
`torch.optim.AdamW` with its defaults; ours runs gptforge's training step (`forward_backward` + clip + step).

Each variant is a separate process (2 warm-up steps, median of 5 timed); processes alternate
ours-fp32, hf-fp32, ours-bf16, hf-bf16, ours-bf16 with oneDNN's bf16 GEMMs forced, ours-bf16-pure, ... for 3
rounds, and medians are reported with each variant's fraction of this CPU's measured matmul peak for the
dtype its GEMMs ran in (hardware.probe_matmul_flops; ours bf16 autocast runs fp32 GEMMs on widened bf16
operands where this CPU's bf16 GEMM is slower, gptforge/precision.py).

    python benchmarks/train_throughput.py [--rounds 3] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SHAPE = dict(n_layer=6, n_head=6, d_model=384, vocab_size=8192, block_size=256)
MICRO_BATCH, SEQ, WARMUP, TIMED = 8, 256, 2, 5


def batches(data_dir: str, n: int):
    from gptforge.data import BatchSampler, TokenData

    sampler = BatchSampler(TokenData(data_dir).shards("train"), MICRO_BATCH, SEQ, seed=0)
    return [sampler.batch(k) for k in range(n)]


def run_ours(precision: str, data_dir: str, compile_: bool, gemm: str = "auto") -> dict:
    import torch

    from gptforge.config import ModelConfig, TrainConfig
    from gptforge.distributed import apply_compile
    from gptforge.model import GPT
    from gptforge.optim import build_optimizer
    from gptforge.precision import resolve_bf16_gemm, widen_bf16
    from gptforge.train import autocast_dtype, forward_backward, next_token_loss

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE)
    model = GPT(cfg)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    opt = build_optimizer(model, TrainConfig(), "cpu")
    device = torch.device("cpu")
    amp = autocast_dtype(precision, device)
    if amp == torch.bfloat16 and resolve_bf16_gemm(gemm, precision, device) == "widened":
        widen_bf16(model)  # as train builds it (train.bf16_gemm)
    fwd, loss_fn = model, next_token_loss
    t_compile = 0.0
    if compile_:
        fwd, loss_fn = apply_compile(model), torch.compile(next_token_loss)
    data = batches(data_dir, WARMUP + TIMED)
    times = []
    for i, (x, y) in enumerate(data):
        t0 = time.perf_counter()
        forward_backward(fwd, [(x, y)], loss_fn, device, amp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i == 0:
            t_compile = dt
        if i >= WARMUP:
            times.append(dt)
    return {"step_s": statistics.median(times), "first_step_s": t_compile, "flops_per_token": cfg.flops_per_token(SEQ)}


def run_hf(precision: str, data_dir: str) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], n_embd=SHAPE["d_model"],
                     vocab_size=SHAPE["vocab_size"], n_positions=SHAPE["block_size"],
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg, attn_implementation="sdpa") if _accepts_attn(GPT2LMHeadModel) else GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    data = batches(data_dir, WARMUP + TIMED)
    times = []
    for i, (x, _) in enumerate(data):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times)}


def _accepts_attn(cls) -> bool:
    import inspect

    return "attn_implementation" in inspect.signature(cls.__init__).parameters


def one(which: str, precision: str, data_dir: str, compile_: bool, gemm: str) -> None:
    res = run_ours(precision, data_dir, compile_, gemm) if which == "ours" else run_hf(precision, data_dir)
    res["tokens_per_s"] = MICRO_BATCH * SEQ / res["step_s"]
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="add ours with torch.compile (fp32) as a variant")
    args = ap.parse_args()
    from alternate import alternate

    from gptforge.data import prepare
    from gptforge.hardware import probe_matmul_flops
    from gptforge.precision import measure_bf16_gemm

    with tempfile.TemporaryDirectory() as d:
        prepare(["shakespeare"], d, vocab_size=SHAPE["vocab_size"], progress=False)
        me = [sys.executable, __file__, "--one"]
        variants = {
            "ours fp32": me + ["ours", "fp32", d], "hf fp32": me + ["hf", "fp32", d],
            "ours bf16": me + ["ours", "bf16", d], "hf bf16": me + ["hf", "bf16", d],
            # the same bf16 autocast step with oneDNN's bf16 GEMMs forced (see gptforge/precision.py)
            "ours bf16 native-gemm": me + ["ours", "bf16", d, "gemm=native"],
            "ours bf16-pure": me + ["ours", "bf16-pure", d],
        }
        if args.compile:
            variants["ours fp32 compile"] = me + ["ours", "fp32", d, "compile"]
        res = alternate(variants, "tokens_per_s", rounds=args.rounds)
    from gptforge.config import ModelConfig

    flops_per_token = ModelConfig(**SHAPE).flops_per_token(SEQ)
    peaks = {"fp32": probe_matmul_flops("fp32"), "bf16": probe_matmul_flops("bf16")}
    widened = measure_bf16_gemm() == "widened"  # what "ours bf16" chose on this CPU (the same probe as in its process)
    for name, r in res.items():
        # bf16 autocast with widened GEMMs runs on the fp32 kernels: its share is of the fp32 peak
        dtype = "fp32" if "fp32" in name or (name == "ours bf16" and widened) else "bf16"
        r["fraction_of_matmul_peak"] = r["median"] * flops_per_token / peaks[dtype]
    summary = {
        "ours/hf fp32": res["ours fp32"]["median"] / res["hf fp32"]["median"],
        "ours/hf bf16": res["ours bf16"]["median"] / res["hf bf16"]["median"],
        "ours native-gemm/hf bf16": res["ours bf16 native-gemm"]["median"] / res["hf bf16"]["median"],
        "ours bf16-pure/hf bf16": res["ours bf16-pure"]["median"] / res["hf bf16"]["median"],
        "ours bf16 gemm": "widened" if widened else "native",
        "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
        "flops_per_token": flops_per_token,
    }
    print(json.dumps({"variants": res, "summary": summary}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        extra = sys.argv[5:]  # "compile", "gemm=native|widened" (train.bf16_gemm)
        one(sys.argv[2], sys.argv[3], sys.argv[4], "compile" in extra,
            next((a[len("gemm="):] for a in extra if a.startswith("gemm=")), "auto"))
    else:
        main()
