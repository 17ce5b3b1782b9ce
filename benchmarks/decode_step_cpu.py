"""Process CPU time (and wall time) per decode step, one thread: for A/B comparisons of the decode policy on a
shared machine, where other jobs swing wall time by 2x but disturb a process's own CPU time far less.

    PYTHONPATH=/tmp/base/src python benchmarks/decode_step_cpu.py static demo 1 0     # A
    PYTHONPATH=src          python benchmarks/decode_step_cpu.py static demo 1 0     # B, alternate A B A B ...
    python benchmarks/decode_step_cpu.py engine demo 8 0.8

    python benchmarks/decode_step_cpu.py formats gpt2 --threads 1,2 --rounds 3   # formats and kernel paths
    python benchmarks/decode_step_cpu.py kernels 1                                # the quantized products alone
    python benchmarks/decode_step_cpu.py gemm 1                                   # int8 products of 17-512 rows
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python benchmarks/decode_step_cpu.py gemm 1   # oneDNN without AMX
    python benchmarks/decode_step_cpu.py gemm 1 avx2    # the packed kernels on AVX2 (with ONEDNN_MAX_CPU_ISA=AVX2)
    python benchmarks/decode_step_cpu.py prompt CKPT 1                            # short prompts: op vs Python block

static: `generate_steps` on a batch of 64-token prompts, (t(65 tokens) - t(1 token)) / 64, min of 7 repeats.
engine: `BatchEngine.step` with `batch` sequences of 32-token prompts, 48 steps, min of 5 repeats.
shape: demo (the `shakespeare` preset) or tiny (1 layer, d 16, vocab 4096: the policy's own cost dominates).
temperature > 0 adds top-p 0.95. One JSON line: wall_ms and cpu_ms per step. Runs against trees from before
the decode policy's split too (generate.py then held BatchEngine and decode_layout), for the A side.

gemm: the many-row int8 products (a prefill's) on each path this CPU has (native.ops.gemm_paths: AMX tiles, the
packed kernels of the current instruction-set path or the one named, oneDNN's at::_int_mm), ms for the four `gpt2`
block matrices at 17 to 512 rows, paths alternating in one process (A B C A B C), best of 2 alternations of medians
of 7. ONEDNN_MAX_CPU_ISA holds oneDNN to an older instruction set, as on a CPU without AMX.
prompt: a checkpoint's prefill (generate's _prefill: the prompt into a fresh KV cache) of 8-256 tokens, ms, with
every layer in the block op (native attention) and with Block.forward (SDPA), alternating, best of 2 medians of 5:
where native.ops.PROMPT_TOKENS comes from.

formats: random weights of a shape (gpt2: the 124M preset; demo) written once as checkpoints in fp32, bf16, int8
and int4 g32 (each int format with dynamic and weight-only activations), each loaded in a fresh process as
`gptforge generate` loads it (gptforge.load), per thread count: batch-1 greedy decode tokens/s (128 tokens after
a 16-token prompt, the first token's time left out), prefill tokens/s of 512 tokens (one forward; the shape's
block size if shorter), the weight bytes a decode step reads (every matrix product's codes, scales and minima),
GB/s = bytes x tokens/s and its fraction of the read bandwidth measured in the same round (a `torch.sum` over
1 GiB, best of 5, in its own process), the matmul paths that ran (quantize.matmul_paths) and the process's peak
RSS after loading and decoding (before the prefill, whose 512 rows of logits are not a decode's memory).
Processes alternate format by format (benchmarks/alternate.py's `measure`), medians of --rounds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from gptforge import generate as G
from gptforge.config import ModelConfig, model_preset
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer

try:  # this tree
    from gptforge.engine import BatchEngine
    from gptforge.native import decode_layout
    from gptforge.sampling import SamplingParams
except ImportError:  # a tree from before the split (the A side of an A/B)
    BatchEngine, SamplingParams, decode_layout = G.BatchEngine, G.SamplingParams, G.decode_layout


def clock(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def params(n: int, temperature: float, seed: int = 0) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=temperature, top_p=0.95 if temperature else 1.0, seed=seed,
                          stop_at_eos=False)


def static_step(model, batch: int, temperature: float) -> list[tuple[float, float]]:
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab - 64, (batch, 64)).tolist()

    def run(n):
        assert sum(1 for _ in G.generate_steps(model, x, params(n, temperature), vocab_size=vocab)) == n

    run(4)
    out = []
    for _ in range(7):
        (w1, c1), (w0, c0) = clock(lambda: run(65)), clock(lambda: run(1))
        out.append(((w1 - w0) / 64, (c1 - c0) / 64))
    return out


def engine_step(model, batch: int, temperature: float) -> list[tuple[float, float]]:
    tok = Tokenizer.train(["abc"], vocab_size=model.config.vocab_size)
    out = []
    for _ in range(5):
        engine = BatchEngine(model, tok, batch)
        for i in range(batch):
            engine.add(list(range(1 + i, 33 + i)), params(100, temperature, seed=i))
        for _ in range(4):
            engine.step()
        w, c = clock(lambda: [engine.step() for _ in range(48)])
        out.append((w / 48, c / 48))
    return out


# --- formats -----------------------------------------------------------------------------------------------------
FORMATS = {"fp32": (None, None), "bf16": ("bf16", None), "int8": ("int8", "dynamic"),
           "int8-weight-only": ("int8", "weight-only"), "int4": ("int4", "dynamic"),
           "int4-weight-only": ("int4", "weight-only")}


def write_formats(shape: str, work: Path) -> dict[str, Path]:
    """The shape's random-weight checkpoint in every format (kept in `work`: a second run reuses them)."""
    from gptforge.checkpoint import write_checkpoint
    from gptforge.compress.run import quantize_checkpoint
    from gptforge.config import RunConfig

    cfg = model_preset("gpt2" if shape == "gpt2" else "shakespeare")
    out = {"fp32": work / f"{shape}-fp32"}
    if not out["fp32"].exists():
        torch.manual_seed(0)
        tok = Tokenizer.train(["abc def ghi"] * 10, vocab_size=300)
        write_checkpoint(out["fp32"], RunConfig(model=cfg), tok, model_state=GPT(cfg).state_dict())
    for name, (method, acts) in FORMATS.items():
        if method is not None:
            out[name] = work / f"{shape}-{name}"
            if not out[name].exists():
                quantize_checkpoint(str(out["fp32"]), method, str(out[name]), 32 if method == "int4" else None,
                                    activations=acts)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(ckpt: str, fmt: str, threads: int) -> dict:
    from gptforge.compress.evaluate import decode_speed
    from gptforge.compress.quantize import matmul_bytes, matmul_paths
    from gptforge.generate import load

    torch.set_num_threads(threads)
    model, tok = load(ckpt, dtype="bfloat16" if fmt == "bf16" else None)
    vocab = model.config.vocab_size
    tps = decode_speed(model, vocab, 128)
    rss = peak_rss_mb()  # load + decode (the prefill below holds 512 rows of logits)
    n = min(512, model.config.block_size)
    x = torch.randint(0, vocab, (1, n))
    with torch.no_grad():
        model(x[:, :64])
        t0 = time.perf_counter()
        model(x)
        prefill = n / (time.perf_counter() - t0)
    nbytes = matmul_bytes(model)
    return {"format": fmt, "threads": threads, "decode_tok_s": tps, "prefill_tok_s": prefill, "prefill_tokens": n,
            "bytes_per_token": nbytes, "gb_s": nbytes * tps / 1e9, "paths_decode": matmul_paths(model, 1),
            "paths_prefill": matmul_paths(model, n), "peak_rss_mb": rss}


def bandwidth(threads: int) -> dict:
    torch.set_num_threads(threads)
    big = torch.ones(256 * 1024 * 1024)  # 1 GiB of fp32
    big.sum()
    best = min(clock(big.sum)[0] for _ in range(5))
    return {"gb_s": big.numel() * 4 / best / 1e9}


def formats_main(shape: str, threads: list[int], rounds: int, work: Path, only: list[str]) -> None:
    import statistics
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    ckpts = write_formats(shape, work)
    me = [sys.executable, __file__]
    rows = []
    for t in threads:
        runs: dict[str, list[dict]] = {name: [] for name in ["bandwidth", *only]}
        for r in range(rounds):
            for name in runs:
                cmd = me + (["bandwidth", str(t)] if name == "bandwidth" else ["worker", str(ckpts[name]), name, str(t)])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs[name].append(json.loads(out.strip().splitlines()[-1]))
                print(f"threads {t} round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
        bw = statistics.median(x["gb_s"] for x in runs.pop("bandwidth"))
        for name, res in runs.items():
            med = {k: statistics.median(x[k] for x in res) for k in ("decode_tok_s", "prefill_tok_s", "gb_s", "peak_rss_mb")}
            rows.append({**res[0], **med, "read_bw_gb_s": bw, "bw_fraction": med["gb_s"] / bw,
                         "decode_runs": [x["decode_tok_s"] for x in res]})
    print(json.dumps({"shape": shape, "rounds": rounds, "rows": rows}, indent=1))


def kernels_main(threads: int) -> None:
    """The products alone, thread CPU time (a shared machine disturbs it less than wall time), medians of 30:
    weights per second (G weights/s: each weight counted once per call, whatever the rows) and the bytes they
    stand for (GB/s: fp32 4, int8 1, int4 g32 0.625 bytes a weight) of each path at 1, 2, 4, 8 and 16 rows, for
    the `gpt2` block matrices (in cache: 2.4 MB int8) and for 16 such sets (out of cache: 113 MB int8), and the
    512-row prefill of those four matrices, int8 dynamic (native.ops.gemm_path's: AMX tiles here) and int4 dynamic
    (its kernels) vs fp32 (PyTorch's GEMM). One JSON line."""
    import statistics

    from gptforge.compress.quantize import int4_codes, int8_codes
    from gptforge.native import available, ops

    assert available(), "the native kernels could not be built"
    torch.set_num_threads(threads)
    timer = time.thread_time if threads == 1 else time.perf_counter

    def rate(fn, weights: int, n: int = 30) -> float:
        fn()
        ts = []
        for _ in range(n):
            t0 = timer()
            fn()
            ts.append(timer() - t0)
        return weights / statistics.median(ts) / 1e9

    torch.manual_seed(0)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    mats = []
    for n, k in shapes * 16:
        w = torch.randn(n, k)
        q, s = int8_codes(w)
        q4 = int4_codes(w, 32)
        mats.append((w, q, s, ops.int8_row_sums(q), *q4, ops.int4_pack(*q4)))
    out: dict = {"threads": threads, "paths": ops.quant_paths(), "g_weights_per_s": {}, "gb_per_s": {}}
    bytes_per_weight = {"fp32": 4.0, "int8": 1.0, "int4": 0.5 + 4 / 32}
    for where, ms in (("in_cache", mats[:4]), ("out_of_cache", mats)):
        nw = sum(m[0].numel() for m in ms)
        for rows in (1, 2, 4, 8, 16):
            xs = {k: torch.randn(rows, k) for k in (768, 3072)}
            res = {"fp32": rate(lambda: [ops.linear(xs[m[0].shape[1]], m[0]) for m in ms], nw),
                   "int8_weight_only": rate(lambda: [ops.linear_int8(xs[m[0].shape[1]], m[1], m[2]) for m in ms], nw),
                   "int4_weight_only": rate(lambda: [ops.linear_int4(xs[m[0].shape[1]], *m[4:7]) for m in ms], nw)}
            for path in ops.quant_paths()[:3]:
                with ops.forced_quant_path(path):
                    res[f"int8_dynamic_{path}"] = rate(
                        lambda: [ops.linear_int8_dynamic(xs[m[0].shape[1]], m[1], m[2], m[3]) for m in ms], nw)
                    res[f"int4_dynamic_{path}"] = rate(
                        lambda: [ops.linear_int4_dynamic(xs[m[0].shape[1]], m[7], m[0].shape[0]) for m in ms], nw)
            out["g_weights_per_s"][f"{where}_rows{rows}"] = {k: round(v, 2) for k, v in res.items()}
            out["gb_per_s"][f"{where}_rows{rows}"] = {k: round(v * bytes_per_weight[k[:4]], 2) for k, v in res.items()}
    xs = {k: torch.randn(512, k) for k in (768, 3072)}
    ms = mats[:4]
    fp32 = rate(lambda: [torch.nn.functional.linear(xs[m[0].shape[1]], m[0]) for m in ms], 1, 5)
    int8 = rate(lambda: [ops.linear_int8_dynamic(xs[m[0].shape[1]], m[1], m[2], m[3]) for m in ms], 1, 5)
    int4 = rate(lambda: [ops.linear_int4_dynamic(xs[m[0].shape[1]], m[7], m[0].shape[0]) for m in ms], 1, 5)
    out["prefill512_int8_dynamic_over_fp32"] = round(int8 / fp32, 2)
    out["prefill512_int4_dynamic_over_fp32"] = round(int4 / fp32, 2)
    print(json.dumps(out))


def gemm_main(threads: int, isa: str | None) -> None:
    """The many-row int8 products per path (module docstring: gemm). One JSON line."""
    import statistics

    from gptforge.compress.quantize import int8_codes
    from gptforge.native import available, ops

    assert available(), "the native kernels could not be built"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mats = [(q, s, ops.int8_row_sums(q)) for q, s in (int8_codes(torch.randn(n, k)) for n, k in
                                                      [(2304, 768), (768, 768), (3072, 768), (768, 3072)])]
    def ms(path: str, rows: int) -> float:
        xs = {k: torch.randn(rows, k) for k in (768, 3072)}
        with ops.forced_gemm_path(path):
            once = lambda: [ops.linear_int8_dynamic(xs[q.shape[1]], q, s, w) for q, s, w in mats]  # noqa: E731
            once()
            ts = []
            for _ in range(7):
                t0 = time.perf_counter()
                once()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    paths, out = ops.gemm_paths(), {}
    with ops.forced_quant_path(isa or ops.quant_path()):  # the packed kernels' instruction set
        for rows in (17, 32, 64, 128, 512):
            runs = {p: [] for p in paths}
            for _ in range(2):
                for p in paths:
                    runs[p].append(ms(p, rows))
            out[rows] = {p: round(min(v), 3) for p, v in runs.items()}
        path = ops.quant_path()
    print(json.dumps({"threads": threads, "quant_path": path, "ms_per_layer": out}))


def prompt_main(ckpt: str, threads: int) -> None:
    """A checkpoint's prefill through the block op and through Block.forward (module docstring: prompt)."""
    import statistics

    import gptforge
    import gptforge.native.ops as ops

    torch.set_num_threads(threads)
    model, _ = gptforge.load(ckpt, device="cpu")

    def ms(T: int, limit: int) -> float:
        ops.PROMPT_TOKENS = limit  # read at each call by native/layout.py and kvcache.py
        prompt = [[100 + (i * 37) % 3000 for i in range(T)]]
        with torch.inference_mode():
            G._prefill(model, prompt, T + 8, False)
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                G._prefill(model, prompt, T + 8, False)
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    out = {}
    for T in (8, 17, 32, 64, 128, 256):
        runs = [ms(T, 10**6), ms(T, 0), ms(T, 10**6), ms(T, 0)]
        out[T] = {"op": round(min(runs[0::2]), 2), "python": round(min(runs[1::2]), 2)}
    print(json.dumps({"checkpoint": ckpt, "threads": threads, "prefill_ms": out}))


def main() -> None:
    if sys.argv[1] == "gemm":
        gemm_main(int(sys.argv[2]) if len(sys.argv) > 2 else 1, sys.argv[3] if len(sys.argv) > 3 else None)
        return
    if sys.argv[1] == "prompt":
        prompt_main(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
        return
    if sys.argv[1] == "kernels":
        kernels_main(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
        return
    if sys.argv[1] == "worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    if sys.argv[1] == "bandwidth":
        print(json.dumps(bandwidth(int(sys.argv[2]))))
        return
    if sys.argv[1] == "formats":
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("mode")
        p.add_argument("shape", choices=["gpt2", "demo"])
        p.add_argument("--threads", default="1,2")
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--work", default="/tmp/gptforge-decode-formats")
        p.add_argument("--only", default=",".join(FORMATS), help="formats, comma-separated: " + ", ".join(FORMATS))
        a = p.parse_args()
        formats_main(a.shape, [int(t) for t in a.threads.split(",")], a.rounds, Path(a.work), a.only.split(","))
        return
    mode, shape, batch, temperature = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = model_preset("shakespeare") if shape == "demo" else ModelConfig(
        n_layer=1, n_head=1, d_model=16, vocab_size=4096, block_size=256)
    model = decode_layout(GPT(cfg).eval())
    times = (static_step if mode == "static" else engine_step)(model, batch, temperature)
    print(json.dumps({"wall_ms": 1e3 * min(w for w, _ in times), "cpu_ms": 1e3 * min(c for _, c in times)}))


if __name__ == "__main__":
    main()
