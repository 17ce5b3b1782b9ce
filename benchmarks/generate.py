"""Decode speed: gptforge's engine vs Hugging Face `transformers` `generate()`, and vs this machine's bandwidth.

    python benchmarks/generate.py                      # the full comparison (several minutes on 2 cores)
    python benchmarks/generate.py --worker ours --shape gpt2 --batch 1     # one measurement, one JSON line
    python benchmarks/generate.py --threads 1 --kernels                    # the few-row kernels alone
    python benchmarks/generate.py --gpu [--spec-gbs 4800]                  # llama-1b bf16 b1 on CUDA vs spec

Both sides get the same random weights (our fused qkv Linear copied into GPT-2's transposed Conv1D layout,
built locally from a GPT2Config: no hub access; ours then stored as `gptforge.load` does on CPU, see
`native.decode_layout`), the same prompts (random ids, 64 tokens per row), greedy
decoding of 64 new tokens with no EOS, and the same thread count. Decode time is measured the same way on
both: time(generate N tokens) - time(generate 1 token), so prefill is left out, median of 3 in a process.
Each (shape, batch) pair runs as separate processes alternating ours and HF (benchmarks/alternate.py).

The shapes: `gpt2` (124M) and the `shakespeare` demo dimensions (4 layers, d 256, vocab 4096, context 256)
built as a GPT-2 (learned positions, LayerNorm), since HF GPT2 has no rotary/RMSNorm variant; our own demo
variant (rotary, RMSNorm) has no peer here: `--worker ours --shape shakespeare` times it alone.

Bandwidth: a large tensor copy (read + write of 1 GiB) gives the machine's achievable GB/s, and a sum of the
same GiB its read-only rate; our decode reads (weights + the KV cache so far) per step, so achieved GB/s =
bytes per step x steps/s. Where the weights fit in the CPU's last-level cache (bf16 `gpt2` is 250 MB), some of
those reads are served from cache, and the fraction can pass 100%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from gptforge.generate import generate_steps
from gptforge.native import decode_layout
from gptforge.sampling import SamplingParams

PROMPT_LEN, NEW_TOKENS, REPEATS = 64, 64, 3


def shape_config(shape: str):
    from gptforge.config import ModelConfig, model_preset

    if shape == "gpt2":
        return model_preset("gpt2")
    if shape == "shakespeare-gpt2":  # the demo's dimensions in GPT-2's variant, so HF GPT2 can run it
        return ModelConfig(n_layer=4, n_head=4, d_model=256, vocab_size=4096, block_size=256)
    return model_preset(shape)


def build_ours(shape: str, dtype: torch.dtype):
    from gptforge.model import GPT

    torch.manual_seed(0)
    return GPT(shape_config(shape)).eval().to(dtype)


def build_hf(shape: str, dtype: torch.dtype):
    """HF GPT2LMHeadModel holding exactly our model's weights (vocab rows above the true size dropped)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ours = build_ours(shape, torch.float32)
    cfg = ours.config
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    sd = {"transformer.wte.weight": ours.tok_emb.weight[: cfg.vocab_size], "transformer.wpe.weight": ours.pos_emb.weight,
          "transformer.ln_f.weight": ours.norm_f.weight, "transformer.ln_f.bias": ours.norm_f.bias}
    for i, b in enumerate(ours.blocks):
        h = f"transformer.h.{i}."
        # Conv1D stores (in, out): the transpose of nn.Linear's (out, in).
        sd |= {h + "ln_1.weight": b.norm1.weight, h + "ln_1.bias": b.norm1.bias,
               h + "ln_2.weight": b.norm2.weight, h + "ln_2.bias": b.norm2.bias,
               h + "attn.c_attn.weight": b.attn.qkv.weight.T, h + "attn.c_attn.bias": b.attn.qkv.bias,
               h + "attn.c_proj.weight": b.attn.proj.weight.T, h + "attn.c_proj.bias": b.attn.proj.bias,
               h + "mlp.c_fc.weight": b.mlp.up.weight.T, h + "mlp.c_fc.bias": b.mlp.up.bias,
               h + "mlp.c_proj.weight": b.mlp.down.weight.T, h + "mlp.c_proj.bias": b.mlp.down.bias}
    missing, unexpected = hf.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.to(dtype), ours


def prompts(batch: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (batch, PROMPT_LEN), generator=g)  # (B, PROMPT_LEN)


def decode_seconds(run) -> float:
    """Median time of N new tokens minus median time of 1 (the prefill and first sample)."""
    run(NEW_TOKENS)  # warm-up: allocation, first-call dispatch
    run(1)
    full, first = [], []
    for _ in range(REPEATS):
        t = time.perf_counter(); run(NEW_TOKENS); full.append(time.perf_counter() - t)
        t = time.perf_counter(); run(1); first.append(time.perf_counter() - t)
    return statistics.median(full) - statistics.median(first)


def worker(args) -> dict:
    if args.side == "hf" and args.device != "cpu":
        sys.exit("the HF worker runs on CPU only (--device cpu)")
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.side == "hf":
        model, ours = build_hf(args.shape, dtype)
        cfg = ours.config
        x = prompts(args.batch, cfg.vocab_size)
        mask = torch.ones_like(x)

        @torch.no_grad()
        def run(n):
            out = model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 use_cache=True, pad_token_id=0)
            assert out.shape == (args.batch, PROMPT_LEN + n)
    else:
        model = build_ours(args.shape, dtype).to(args.device)
        cfg = model.config
        x = prompts(args.batch, cfg.vocab_size).tolist()
        if args.device == "cpu" and not args.plain_layout:  # what gptforge.load does on CPU
            decode_layout(model)
        # True: generate.compiled_step, inductor's static-shape step on CPU (no CUDA graphs there), CUDA graphs on
        # CUDA; None: the engine's default, the CUDA-graph step on CUDA only.
        compile = args.compile or None

        def run(n):
            p = SamplingParams(max_new_tokens=n, temperature=0)
            steps = sum(1 for _ in generate_steps(model, x, p, vocab_size=cfg.vocab_size, compile=compile))
            assert steps == n  # the last step's ids reached the host: every kernel before it has finished

    seconds = decode_seconds(run)
    return {"tokens_per_s": args.batch * (NEW_TOKENS - 1) / seconds}


def step_bytes(shape: str, batch: int, dtype: str) -> float:
    """Bytes one decode step reads: every weight but the position table (one row of it), plus the KV cache up
    to the current length, averaged over the steps."""
    from gptforge.model import GPT

    cfg = shape_config(shape)
    with torch.device("meta"):
        weights = sum(p.numel() for n, p in GPT(cfg).named_parameters() if n != "pos_emb.weight")
    kv = 2 * cfg.n_layer * batch * cfg.kv_heads * cfg.head_dim * (PROMPT_LEN + NEW_TOKENS / 2)
    return (weights + kv) * (2 if dtype == "bfloat16" else 4)


def bandwidth_gb_s(threads: int) -> dict:
    """Achievable memory bandwidth: copy 1 GiB (read 1 + write 1), and sum it (read only), best of 5 each. A
    decode step only reads, so the read figure is its true ceiling; the copy figure is the issue's yardstick."""
    torch.set_num_threads(threads)
    src = torch.ones(256 * 2**20)  # 1 GiB fp32
    dst = torch.empty_like(src)
    copy = read = float("inf")
    for _ in range(6):
        t = time.perf_counter(); dst.copy_(src); copy = min(copy, time.perf_counter() - t)
        t = time.perf_counter(); src.sum(); read = min(read, time.perf_counter() - t)
    return {"gb_per_s": 2 * src.numel() * 4 / copy / 1e9, "read_gb_per_s": src.numel() * 4 / read / 1e9}


def kernel_table(threads: int) -> None:
    """The few-row kernels alone (gptforge.native), on `gpt2`'s block matrices and its head, fp32 inputs: microseconds,
    weight GB/s and GFLOP/s per call, best of many calls (so a matrix that fits in cache is read from cache)."""
    from gptforge import native

    torch.set_num_threads(threads)
    assert native.available(), "the native kernels could not be built"
    print("dtype     (N, K)         rows      us     GB/s  GFLOP/s")
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in ((2304, 768), (3072, 768), (768, 3072), (50304, 768)):
            w = torch.randn(n, k).to(dtype)
            for rows in (1, 2, 4, 8, 16):
                x = torch.randn(rows, k)
                torch.ops.gptforge_gemv.gemv(x, w, None)
                best = float("inf")
                for _ in range(max(5, int(3e8 / (n * k)))):
                    t = time.perf_counter()
                    torch.ops.gptforge_gemv.gemv(x, w, None)
                    best = min(best, time.perf_counter() - t)
                print(f"{str(dtype)[6:]:9s} ({n:5d}, {k:4d})  {rows:4d}  {best * 1e6:8.1f}"
                      f"  {w.nbytes / best / 1e9:6.1f}  {2 * n * k * rows / best / 1e9:7.1f}", flush=True)


def gpu_bandwidth(args) -> None:
    """The issue's GPU row: batch-1 bf16 decode on CUDA (CUDA-graph step), as a fraction of the spec bandwidth
    and of a measured device copy; 3 processes, median."""
    sys.path.insert(0, str(Path(__file__).parent))
    from alternate import measure

    if not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device; none is visible here")
    shape = "llama-1b" if args.shape == "gpt2" else args.shape
    me = [sys.executable, __file__, "--device", "cuda"]
    copy = statistics.median(measure(me + ["--worker", "bandwidth"])["gb_per_s"] for _ in range(3))
    runs = [measure(me + ["--worker", "ours", "--shape", shape, "--batch", "1", "--dtype", "bfloat16"])["tokens_per_s"]
            for _ in range(3)]
    tps = statistics.median(runs)
    gb = step_bytes(shape, 1, "bfloat16") * tps / 1e9
    name = torch.cuda.get_device_name()
    print(f"{name}, {shape} bf16 b1: {tps:.1f} tok/s ({', '.join(f'{r:.1f}' for r in runs)}); reads {gb:.0f} GB/s = "
          f"{gb / args.spec_gbs:.0%} of the {args.spec_gbs:.0f} GB/s spec, {gb / copy:.0%} of a measured copy "
          f"({copy:.0f} GB/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", dest="side", choices=["ours", "hf", "bandwidth"], help="run one measurement")
    ap.add_argument("--shape", default="gpt2", help="gpt2, shakespeare-gpt2 or a preset name")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="ours: torch.compile the static decode step")
    ap.add_argument("--plain-layout", action="store_true",
                    help="ours: keep Linear weights (out, in) in memory instead of the engine's CPU layout")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated cases of the full run, e.g. gpt2-b1,gpt2-b8")
    ap.add_argument("--with-compiled", action="store_true", help="full run: also time ours with --compile")
    ap.add_argument("--kernels", action="store_true", help="time the few-row kernels alone (gptforge.native) and stop")
    ap.add_argument("--device", default="cpu", help="worker: cpu or cuda (ours only; HF runs on CPU)")
    ap.add_argument("--gpu", action="store_true",
                    help="ours on CUDA only: batch-1 decode of --shape (default llama-1b) in bf16 vs --spec-gbs")
    ap.add_argument("--spec-gbs", type=float, default=3350.0, help="--gpu: the device's spec bandwidth, GB/s "
                    "(H100 SXM 3350, H200 4800)")
    args = ap.parse_args()
    if args.kernels:
        kernel_table(args.threads)
        return
    if args.side == "bandwidth":
        if args.device != "cpu":
            from gptforge.hardware import probe_copy_bandwidth

            print(json.dumps({"gb_per_s": probe_copy_bandwidth(1024, device=args.device) / 1e9}))
        else:
            print(json.dumps(bandwidth_gb_s(args.threads)))
        return
    if args.gpu:
        gpu_bandwidth(args)
        return
    if args.side:
        print(json.dumps(worker(args)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from alternate import alternate, measure

    me = [sys.executable, __file__, "--threads", str(args.threads)]
    bws = [measure(me + ["--worker", "bandwidth"]) for _ in range(3)]
    bw = statistics.median(b["gb_per_s"] for b in bws)
    read_bw = statistics.median(b["read_gb_per_s"] for b in bws)
    print(f"memory bandwidth (1 GiB, median of 3 processes): copy {bw:.1f} GB/s, read {read_bw:.1f} GB/s")
    cases = {f"{s}-b{b}": (s, b) for s in ("gpt2", "shakespeare-gpt2") for b in (1, 8)}
    for name in (args.only.split(",") if args.only else cases):
        shape, batch = cases[name]
        common = ["--shape", shape, "--batch", str(batch), "--dtype", args.dtype]
        variants = {"ours": me + ["--worker", "ours"] + common, "hf": me + ["--worker", "hf"] + common}
        if args.with_compiled:
            variants["ours-compiled"] = me + ["--worker", "ours", "--compile"] + common
        res = alternate(variants, "tokens_per_s", rounds=args.rounds)
        ours, hf = res["ours"]["median"], res["hf"]["median"]
        runs = lambda k: ", ".join(f"{v:.1f}" for v in res[k]["runs"])
        line = f"{name} {args.dtype}: ours {ours:.1f} tok/s ({runs('ours')}), HF {hf:.1f} ({runs('hf')}), {ours / hf:.2f}x"
        if args.with_compiled:
            c = res["ours-compiled"]["median"]
            line += f"; ours compiled {c:.1f} ({runs('ours-compiled')}), {c / hf:.2f}x"
        if batch == 1:
            gb = step_bytes(shape, batch, args.dtype) * ours / 1e9
            line += (f"; ours reads {gb:.1f} GB/s = {gb / bw:.0%} of the copy bandwidth, "
                     f"{gb / read_bw:.0%} of the read one")
        print(line, flush=True)


if __name__ == "__main__":
    main()
