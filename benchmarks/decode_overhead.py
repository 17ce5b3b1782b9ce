"""Per-token cost outside the matrix products, batch-1 greedy decode of a small model whose weights sit in cache.

    python benchmarks/decode_overhead.py                                  # the small shape, fp32/bf16/int8/int4
    python benchmarks/decode_overhead.py --formats fp32 --pairs 7

For each format, in one process, one thread, random weights of `decode_llamacpp.py --shape small`'s dimensions
(6 layers, d 384, rotary/RMSNorm/SwiGLU, vocab 4096; int8 and int4 g32 with int8 activations):
- step: `generate_steps` per token, thread CPU time, (t(256 new tokens) - t(1 new token)) / 255 after a 32-token
  prompt, with the whole-step op (native/step.py) and with the per-block path (the block op, DecodeStep.of
  patched to None), alternating A B A B, --pairs pairs: medians, and the median of the pairs' ratios;
- products: the step's matrix products alone (the same kernels on the same matrices in the same order, each fed a
  fixed input), thread CPU time per pass, median of 5: the share of a step they take, and what is left for
  everything else (norms, rotary, attention, residuals, the head's wrapper, sampling, the loop);
- whether both paths decoded the same 256 tokens.
Thread CPU time, not wall time: on a shared machine it is the steadier of the two (docs/BENCHMARKS.md, "Per-token
cost outside the products").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptforge.compress.quantize import quantize_model
from gptforge.config import ModelConfig
from gptforge.generate import generate_steps
from gptforge.model import GPT
from gptforge.native import decode_layout
from gptforge.native import step as native_step
from gptforge.native.schema import op_linear
from gptforge.sampling import SamplingParams

SMALL = dict(n_layer=6, n_head=6, d_model=384, block_size=512, vocab_size=4096, pos_encoding="rotary",
             norm="rmsnorm", mlp="swiglu", bias=False)
PROMPT, NEW = list(range(1, 33)), 256


def build(fmt: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    if fmt == "bf16":
        model = model.to(torch.bfloat16)
    elif fmt in ("int8", "int4"):
        model = quantize_model(model, fmt, group_size=32 if fmt == "int4" else None)[0]
    return decode_layout(model)


def decode(model: GPT, n: int, whole: bool) -> list[int]:
    of = native_step.DecodeStep.of
    if not whole:
        native_step.DecodeStep.of = classmethod(lambda cls, m: None)
    try:
        p = SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_eos=False)
        with torch.inference_mode():
            return [s.ids[0] for s in generate_steps(model, [PROMPT], p, vocab_size=SMALL["vocab_size"])]
    finally:
        native_step.DecodeStep.of = of


def per_token(model: GPT, whole: bool) -> float:
    t0 = time.thread_time()
    decode(model, 1, whole)
    t1 = time.thread_time()
    decode(model, NEW, whole)
    return ((time.thread_time() - t1) - (t1 - t0)) / (NEW - 1)


def _product(m: torch.nn.Module, x: torch.Tensor):
    """The kernel call the op makes for Linear m (its kind's torch op), on input x."""
    lin = op_linear(m)
    if lin.kind == "float":
        return lambda: torch.ops.gptforge_gemv.linear(x, lin.weight, lin.bias)
    if lin.kind == "int8-dynamic":
        return lambda: torch.ops.gptforge_qgemv.int8_linear(x, lin.weight, lin.scale, lin.aux, lin.bias)
    if lin.kind == "int4-dynamic":
        return lambda: torch.ops.gptforge_qgemv.int4_linear(x, lin.weight, m.shape[0], lin.bias)
    return lambda: m(x)


def products(model: GPT) -> float:
    """Thread CPU seconds of one pass over the step's products: each block Linear's kernel as a torch op (so ~1-2 us
    of Python per call is counted here, not in the rest), the head through its module, each on a fixed input row."""
    dtype = model.norm_f.weight.dtype
    calls = []
    for b in model.blocks:
        for m in (b.attn.qkv, b.attn.proj, b.mlp.gate, b.mlp.up, b.mlp.down):
            k = m.in_features if hasattr(m, "in_features") else m.shape[1]
            calls.append(_product(m, torch.randn(1, k).to(dtype)))
    h = torch.randn(1, SMALL["d_model"]).to(dtype)
    calls.append(lambda: model.lm_head(h))
    with torch.inference_mode():
        for _ in range(10):
            for c in calls:
                c()
        out = []
        for _ in range(5):
            t0 = time.thread_time()
            for _ in range(50):
                for c in calls:
                    c()
            out.append((time.thread_time() - t0) / 50)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default="fp32,bf16,int8,int4")
    p.add_argument("--pairs", type=int, default=5, help="A/B pairs per format (medians)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| format | step, whole-step op (ms) | step, block op (ms) | op / block (median of pairs) | products alone "
          "(ms) | share of the op's step | rest (ms) | tokens equal |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        model = build(fmt)
        assert native_step.DecodeStep.of(model) is not None, f"{fmt}: the step op does not cover this model"
        same = decode(model, NEW, True) == decode(model, NEW, False)
        runs: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.pairs):
            for whole in (False, True):
                runs[whole].append(per_token(model, whole))
        ratio = statistics.median(b / a for a, b in zip(runs[False], runs[True]))
        op, block = statistics.median(runs[True]), statistics.median(runs[False])
        prod = products(model)
        print(f"| {fmt} | {op * 1e3:.3f} | {block * 1e3:.3f} | {ratio:.3f} | {prod * 1e3:.3f} | {prod / op:.0%} | "
              f"{(op - prod) * 1e3:.3f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
