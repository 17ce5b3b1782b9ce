"""Quantized decode: the whole-step op, the one-call block op and the Python block, in one process.

    python benchmarks/decode_block_quant.py                              # small shape, every format, 1 thread
    python benchmarks/decode_block_quant.py --shape gpt2 --formats int8-dynamic,int4-dynamic --tokens 32

A quantized model's decode step runs as one native call (csrc/step.cpp, where native.step.DecodeStep covers the
model), or else block by block, each block one native call (csrc/block.cpp calls the int8/int4 kernels that
QuantLinear's forward calls); before either, each block ran as Python modules, one op call per product, norm
and rotary. This times greedy batch-1 decode (generate_steps) all three ways on the same model, alternating,
as thread CPU time per token (steadier than wall time on a shared machine), and prints medians and the median
of the per-round ratios against the Python block. Random weights: speed does not depend on what they say. The
end-to-end figures against llama.cpp are benchmarks/decode_llamacpp.py's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from unittest import mock

import torch

from gptforge import native
from gptforge.compress.quantize import quantize_model
from gptforge.config import ModelConfig, model_preset
from gptforge.generate import generate_steps
from gptforge.model import GPT, Block
from gptforge.native.step import DecodeStep
from gptforge.sampling import SamplingParams

SHAPES = {"small": dict(n_layer=6, n_head=6, d_model=384, block_size=512, vocab_size=4096, pos_encoding="rotary",
                        norm="rmsnorm", mlp="swiglu", bias=False),
          "gpt2": None}  # the gpt2 preset (124M)
FORMATS = ("int8-dynamic", "int8-weight-only", "int4-dynamic", "int4-weight-only")


def per_token_ms(model: GPT, tokens: int, vocab: int) -> float:
    """Thread CPU ms per greedy decode step of one row after a 32-token prompt."""
    p = SamplingParams(max_new_tokens=tokens, temperature=0.0, stop_at_eos=False)
    t0 = time.thread_time()
    with torch.inference_mode():
        n = sum(1 for _ in generate_steps(model, [[5, 6, 7, 8] * 8], p, vocab_size=vocab))
    return (time.thread_time() - t0) / n * 1000


def measure(cfg: ModelConfig, fmt: str, tokens: int, rounds: int) -> dict:
    method, activations = fmt.split("-", 1)
    torch.manual_seed(0)
    model = quantize_model(GPT(cfg).eval(), method, 32 if method == "int4" else None, activations=activations)[0]
    model = native.decode_layout(model)
    ops = sum(type(b) is native.DecodeBlock for b in model.blocks)
    covered = DecodeStep.of(model) is not None
    per_token_ms(model, 4, cfg.vocab_size)  # warm: int4 tiles, row sums, the library
    no_step = mock.patch.object(DecodeStep, "of", classmethod(lambda cls, m: None))  # generate's fallback: the blocks
    python_block = mock.patch.object(native.DecodeBlock, "forward", Block.forward)  # the Python block, as before
    times: dict[str, list[float]] = {"step": [], "block": [], "python": []}
    for _ in range(rounds):
        times["step"].append(per_token_ms(model, tokens, cfg.vocab_size))
        with no_step:
            times["block"].append(per_token_ms(model, tokens, cfg.vocab_size))
            with python_block:
                times["python"].append(per_token_ms(model, tokens, cfg.vocab_size))
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    speedup = {k: round(statistics.median(p / o for p, o in zip(times["python"], times[k])), 3)
               for k in ("step", "block")}
    return {"format": fmt, "blocks_on_the_op": f"{ops}/{len(model.blocks)}", "step_op_covers": covered,
            "step_ms": med["step"], "block_ms": med["block"], "python_block_ms": med["python"], "speedup": speedup}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="small", choices=list(SHAPES))
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--tokens", type=int, default=64, help="decode steps per timing")
    p.add_argument("--rounds", type=int, default=5, help="A/B pairs")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(**SHAPES[args.shape]) if SHAPES[args.shape] else model_preset("gpt2")
    rows = [measure(cfg, fmt, args.tokens, args.rounds) for fmt in args.formats.split(",")]
    print(json.dumps({"shape": args.shape, "threads": args.threads, "rows": rows}, indent=1))
    print(f"\n| {args.shape}, {args.threads} thread(s), CPU ms per token | step op | block op | Python block | "
          "step / block speedup over the Python block |")
    print("|---|---|---|---|---|")
    for r in rows:
        step = r["step_ms"] if r["step_op_covers"] else f"(not covered: {r['step_ms']})"
        print(f"| {r['format']} ({r['blocks_on_the_op']} blocks on the block op) | {step} | {r['block_ms']} | "
              f"{r['python_block_ms']} | {r['speedup']['step']:.2f}x / {r['speedup']['block']:.2f}x |")


if __name__ == "__main__":
    main()
