"""Decode: gptforge vs llama.cpp (through llama-cpp-python) on the same weights, in four formats, batch 1 and 8.

    python benchmarks/decode_llamacpp.py --source CKPT_OR_HF_FOLDER      # a checkpoint, or an HF folder (imported)
    python benchmarks/decode_llamacpp.py --shape small                   # random weights, the demo's dimensions
    python benchmarks/decode_llamacpp.py --shape gpt2 --formats int8,int4 --threads 1,2 --batch 1,8 --rounds 3
    python benchmarks/decode_llamacpp.py --worker ours --model DIR --format int8 --threads 1 --batch 8 --prompt P

One set of weights (a checkpoint, an HF folder imported with import-hf, or random weights of a --shape with a BPE
trained on the bundled corpus) is converted once per format, each side in its own: ours with `gptforge quantize`
(fp32 as is, bf16, int8, int4 with groups of 32), llama.cpp's with `gptforge export-gguf` (f32, bf16, q8_0, q4_0:
blocks of 32 with one scale, the peers of int8 per channel and int4-g32). Each measurement is a fresh process:
load, B distinct 32-token prompts decoded together, greedy, no end-of-text stop; decode rate = B x 255 / the time
from the first new token to the 256th (prefill left out), median of --repeats inside the process;
peak RSS of the process (VmHWM) at the end. Ours loads as `gptforge generate` does (gptforge.load: the CPU decode
layout; bf16 asked for explicitly) and decodes with generate_steps (its static batch). llama.cpp's side uses
the low-level API: one llama_batch per step holding a token of each sequence (its own seq_id; a KV cache of
B x the length), greedy argmax of each row's logits, the cache cleared before each timing. Its weights sit in
llama.cpp's extra (repacked; AMX on this CPU) buffers where that path runs: llama-cpp-python 0.3.36 segfaults on
a multi-token batch of q8_0/q4_0 there (and in its CPU_REPACK buffers), so q8_0/q4_0 at batch 1 feed the prompt
one position per call and at batch 8 run without extra buffers (use_extra_bufts off); the path each engine ran
is printed (ours: quantize.matmul_paths at the batch's rows).

Bandwidth: at batch 1, the bytes a token reads = every matrix product's weights as each engine stores them (ours
as loaded: codes, scales, minima; the GGUF's tensors; an embedding table counts only as a tied head) + the KV
cache at the mean decode length (prompt + new/2 positions; ours in --kv-dtype, auto as generate stores it: bf16
for int8 and int4, else the weights' dtype; llama.cpp's f16, from its KV buffer size); GB/s = bytes x tokens/s; the
fraction is of this machine's read bandwidth, measured per thread count in processes of its own (torch.sum over
1 GiB of fp32, best of 5; median of --rounds processes).
Processes alternate ours, llama.cpp, ours, ... (benchmarks/alternate.py's `measure`), --rounds each, per format,
thread count and batch; medians are quoted. The first 16 greedy ids of each row are compared across engines
("same ids": all rows in fp32; rounding may part the others). Without llama-cpp-python installed (`make
llama-cpp`) the llama.cpp column is skipped with that reason.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from alternate import measure  # noqa: E402

PROMPT, NEW = 32, 256
SHAPES = ("small", "small-gpt2", "gpt2")
CHECK = 16  # leading tokens of each row compared across engines (the same greedy ids in fp32)
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type
FORMATS = {  # ours (gptforge quantize --method, None: as is) -> the GGUF type of the same format
    "fp32": (None, "f32"), "bf16": ("bf16", "bf16"), "int8": ("int8", "q8_0"), "int4": ("int4", "q4_0")}


def rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's high-water mark across
    fork + exec into it, so every worker would report the driver's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


REPEATS = 3  # timings inside each process (--repeats)


def timed(run) -> float:
    """Decode steps per second of `run(n)`, which generates n tokens after a fresh prefill and returns the clock
    at its first token and at its last: the n - 1 steps between are the decode, the prefill left out. Median of
    REPEATS."""
    run(4)  # warm-up: first-call allocations, kernel selection
    rates = []
    for _ in range(REPEATS):
        first, last = run(NEW)
        rates.append((NEW - 1) / (last - first))
    return statistics.median(rates)


def worker_ours(model_dir: str, fmt: str, threads: int, prompts: list[list[int]], kv_dtype: str) -> dict:
    import torch

    import gptforge
    from gptforge.compress.quantize import matmul_bytes, matmul_paths
    from gptforge.generate import generate_steps
    from gptforge.kvcache import resolve_kv_dtype
    from gptforge.sampling import SamplingParams

    torch.set_num_threads(threads)
    model, tok = gptforge.load(model_dir, device="cpu", dtype="bfloat16" if fmt == "bf16" else "auto")

    first: list[list[int]] = []  # each row's first tokens, to check both engines decode the same rows

    def run(n: int) -> tuple[float, float]:
        p = SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_eos=False)
        steps, clock = [], []
        with torch.inference_mode():
            for s in generate_steps(model, prompts, p, vocab_size=tok.vocab_size, kv_dtype=kv_dtype):
                clock.append(time.perf_counter())
                steps.append(s.ids)
        assert len(steps) == n
        first[:] = [list(row) for row in zip(*steps[:CHECK])]
        return clock[0], clock[-1]

    cfg = model.config
    kv = resolve_kv_dtype(model, kv_dtype)  # auto: the weights' dtype, bf16 for an int8/int4 model
    kv_item = (next(model.parameters()).element_size() if kv == "auto"
               else {"fp32": 4, "bf16": 2, "int8": 1 + 4 / cfg.head_dim}[kv])  # int8: + a scale per head
    kv_per_pos = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * kv_item
    paths = matmul_paths(model, len(prompts))  # which product each matrix runs at this batch's decode step
    return {"tok_s": len(prompts) * timed(run), "weight_bytes": matmul_bytes(model), "kv_bytes_per_pos": kv_per_pos,
            "first_tokens": first, "path": ", ".join(f"{k} x{v}" for k, v in sorted(paths.items()))}


def gguf_matrix_bytes(path: str) -> int:
    """The same count for a GGUF file, as the file stores each tensor: every 2-D tensor but the embedding tables,
    and the token table when no output.weight exists (the head is then tied to it)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
    total = sum(n for name, n in tensors.items() if name not in ("token_embd.weight", "position_embd.weight"))
    return total + (tensors["token_embd.weight"] if "output.weight" not in tensors else 0)


def llama_log(fn):
    """Run fn() with this process's stderr (where llama.cpp logs) in a file; (fn's result, the log text)."""
    import os

    with tempfile.TemporaryFile(mode="w+") as f:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            out = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return out, f.read()


def worker_llama(gguf_path: str, threads: int, prompts: list[list[int]], quantized: bool, flash: str) -> dict:
    """llama.cpp through llama-cpp-python's low-level API: one llama_batch holds a token of every sequence (distinct
    seq_ids, a KV cache sized for all), greedy from each row's logits. Weights go to llama.cpp's extra (repacked,
    AMX on this CPU) buffers where that path runs: 0.3.36 segfaults on a multi-token batch of q8_0/q4_0 there, so a
    quantized file decodes one token per call in it at batch 1 and runs without the extra buffers at batch > 1."""
    import re

    import llama_cpp as L
    import numpy as np

    B = len(prompts)
    extra = not (quantized and B > 1)
    one_at_a_time = extra and quantized  # the prompt's positions one per call (prefill is not timed)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = extra
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max = B * (PROMPT + NEW + 8), B
    cp.n_batch = cp.n_ubatch = B * PROMPT
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = FLASH_ATTN[flash]

    def open_model():
        model = L.llama_model_load_from_file(gguf_path.encode(), mp)
        return model, L.llama_init_from_model(model, cp)

    (model, ctx), log = llama_log(open_model)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(B * PROMPT, 0, 1)

    def decode(rows: list[list[int]], pos: int) -> None:
        i = 0
        for seq, tokens in enumerate(rows):
            for j, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos + j, 1
                batch.seq_id[i][0], batch.logits[i] = seq, j == len(tokens) - 1
                i += 1
        batch.n_tokens = i
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(outputs: list[int]) -> list[int]:
        return [int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax()) for i in outputs]

    first: list[list[int]] = []

    def run(n: int) -> tuple[float, float]:
        L.llama_memory_clear(mem, True)
        if one_at_a_time:
            for j in range(PROMPT):
                decode([[p[j]] for p in prompts], j)
            last = list(range(B))
        else:
            decode(prompts, 0)
            last = [(s + 1) * PROMPT - 1 for s in range(B)]
        nxt = greedy(last)
        t0 = time.perf_counter()
        first[:] = [[t] for t in nxt]
        for step in range(n - 1):
            decode([[t] for t in nxt], PROMPT + step)
            nxt = greedy(list(range(B)))
            if step + 1 < CHECK:
                for row, t in zip(first, nxt):
                    row.append(t)
        return t0, time.perf_counter()

    tok_s = B * timed(run)
    buffers = sorted(set(re.findall(r"load_tensors:\s+(\S+) model buffer size", log)))
    kv_mib = re.search(r"KV buffer size =\s+([\d.]+) MiB", log)
    kv_per_pos = float(kv_mib.group(1)) * 2**20 / L.llama_n_ctx(ctx) if kv_mib else float("nan")
    L.llama_batch_free(batch)
    path = f"{'extra buffers' if extra else 'no extra buffers'} ({'+'.join(buffers)}), " + (
        "prompt one position a call" if one_at_a_time else "prompt in one batch") + f", flash attention {flash}"
    return {"tok_s": tok_s, "path": path, "kv_bytes_per_pos": kv_per_pos, "first_tokens": first}


def worker_bandwidth(threads: int) -> dict:
    """This machine's read bandwidth at `threads`: torch.sum over 1 GiB of fp32 (far beyond the caches), the
    best of 5 after a warm-up, in bytes read per second."""
    import torch

    torch.set_num_threads(threads)
    big = torch.ones(256 * 1024 * 1024)
    big.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t0)
    return {"gb_s": big.numel() * 4 / best / 1e9}


def worker(args) -> None:
    if args.worker == "bandwidth":
        out = worker_bandwidth(args.threads)
    else:
        prompts = json.loads(Path(args.prompt).read_text())[:args.batch]
        if args.worker == "ours":
            out = worker_ours(args.model, args.format, args.threads, prompts, args.kv_dtype)
        else:
            out = worker_llama(args.model, args.threads, prompts, FORMATS[args.format][1].startswith("q"),
                               args.llama_flash_attn)
    out["peak_rss_mb"] = rss_mb()
    print(json.dumps(out))


# --- the driver: one source -> each format's files -> alternating processes ----------------------------------

def source_checkpoint(args, work: Path) -> Path:
    """The checkpoint every format is made from: --source (a checkpoint, or an HF folder imported here) or random
    weights of --shape with a BPE trained on the bundled corpus (the GGUF needs a real tokenizer)."""
    import torch

    from gptforge.checkpoint import write_checkpoint
    from gptforge.config import ModelConfig, RunConfig, model_preset
    from gptforge.corpora import load_corpus
    from gptforge.interop import import_hf
    from gptforge.model import GPT
    from gptforge.tokenizer import Tokenizer

    if args.source:
        src = Path(args.source)
        return import_hf(src, work / "source") if (src / "config.json").is_file() else src
    shape = {"small": dict(n_layer=6, n_head=6, d_model=384, block_size=512, vocab_size=4096, pos_encoding="rotary",
                           norm="rmsnorm", mlp="swiglu", bias=False),
             "small-gpt2": dict(n_layer=6, n_head=6, d_model=384, block_size=512, vocab_size=4096),
             "gpt2": dict(model_preset("gpt2").__dict__)}[args.shape]
    texts = [d.text for d in load_corpus("shakespeare")]
    tok = Tokenizer.train(texts, shape["vocab_size"])
    cfg = ModelConfig(**{**shape, "vocab_size": tok.vocab_size})  # a small corpus may give fewer merges
    torch.manual_seed(0)
    return write_checkpoint(work / "source", RunConfig(model=cfg), tok, model_state=GPT(cfg).state_dict())


def convert(src: Path, fmt: str, work: Path) -> tuple[Path, Path]:
    from gptforge.compress.run import quantize_checkpoint
    from gptforge.gguf_export import export_gguf

    method, gguf_type = FORMATS[fmt]
    ours = src if method is None else quantize_checkpoint(str(src), method, str(work / f"ours-{fmt}"),
                                                            32 if method == "int4" else None)[0]
    theirs, _ = export_gguf(src, work / f"model-{gguf_type}.gguf", gguf_type)
    return Path(ours), theirs


def driver(args) -> None:
    try:
        import llama_cpp  # noqa: F401
        skip = None
    except ImportError as e:
        skip = f"llama-cpp-python is not installed ({e}); `make llama-cpp` builds it (about 10 minutes)"
    shapes = [None] if args.source else args.shape.split(",")
    for shape in shapes:  # one table per shape
        args.shape = shape
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="decode-llamacpp-"))
        try:
            rows, cfg, tok = measure_all(args, work, skip)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report(rows, cfg, tok, skip, args.kv_dtype)
        print(f"\n({shape or args.source}: {(time.perf_counter() - t0) / 60:.1f} min)", flush=True)


def measure_all(args, work: Path, skip: str | None) -> tuple[list, object, object]:
    """Convert the source to each format, then time each (format, threads, batch) in alternating processes; the
    read bandwidth per thread count in processes of its own first."""
    from gptforge.loader import load_checkpoint

    src = source_checkpoint(args, work)
    _, tok, cfg = load_checkpoint(src)
    text = ("ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
            "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief")
    base = tok.encode(text) * 4
    batches = [int(b) for b in args.batch.split(",")]
    prompts = [base[3 * i:3 * i + PROMPT] for i in range(max(batches))]  # distinct prompts, PROMPT tokens each
    (work / "prompt.json").write_text(json.dumps(prompts))
    me = [sys.executable, __file__, "--prompt", str(work / "prompt.json"), "--repeats", str(args.repeats),
          "--new", str(NEW)]
    thread_counts = [int(t) for t in args.threads.split(",")]
    bandwidth = {}
    for threads in thread_counts:
        runs = [measure(me + ["--worker", "bandwidth", "--threads", str(threads)])["gb_s"] for _ in range(args.rounds)]
        bandwidth[threads] = statistics.median(runs)
        print(f"read bandwidth {threads}t: {runs} GB/s", file=sys.stderr, flush=True)
    rows = []
    for fmt in args.formats.split(","):
        ours, theirs = convert(src, fmt, work)
        # the GGUF's bytes are counted here: its reader maps the file, which would add ~100 MB to a worker's RSS
        gguf_bytes = {} if skip else {"llama.cpp": gguf_matrix_bytes(str(theirs))}
        for threads in thread_counts:
            for b in batches:
                variants = {"gptforge": me + ["--worker", "ours", "--model", str(ours), "--format", fmt,
                                              "--kv-dtype", args.kv_dtype]}
                if skip is None:
                    variants["llama.cpp"] = me + ["--worker", "llama", "--model", str(theirs), "--format", fmt,
                                                  "--llama-flash-attn", args.llama_flash_attn]
                rows.append(measure_row(variants, fmt, threads, b, args.rounds, bandwidth[threads], gguf_bytes))
    return rows, cfg, tok


def measure_row(variants: dict[str, list[str]], fmt: str, threads: int, batch: int, rounds: int,
                bandwidth: float, weight_bytes: dict[str, int]) -> dict:
    """One table row: each engine's processes alternating, medians; at batch 1 the bytes a token reads (matrix
    weights + the KV cache at the mean decode length, prompt + new/2 positions), GB/s and fraction of `bandwidth`."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, cmd in variants.items():
            runs[name].append(measure(cmd + ["--threads", str(threads), "--batch", str(batch)]))
            brief = {k: v for k, v in runs[name][-1].items() if k != "first_tokens"}
            print(f"{fmt} {threads}t b{batch} round {r + 1} {name}: {brief}", file=sys.stderr, flush=True)
    row = {"format": fmt, "gguf": FORMATS[fmt][1], "threads": threads, "batch": batch, "read_bw_gb_s": bandwidth}
    for name, ms in runs.items():
        tok_s = statistics.median(m["tok_s"] for m in ms)
        row[name] = {"tok_s": tok_s, "runs": [m["tok_s"] for m in ms],
                     "peak_rss_mb": statistics.median(m["peak_rss_mb"] for m in ms)}
        if "path" in ms[0]:
            row[name]["path"] = ms[0]["path"]
        if batch == 1:
            nbytes = weight_bytes.get(name, ms[0].get("weight_bytes")) + ms[0]["kv_bytes_per_pos"] * (PROMPT + NEW / 2)
            gb_s = nbytes * tok_s / 1e9
            row[name].update(bytes_per_token=nbytes, gb_s=gb_s, bw_fraction=gb_s / bandwidth)
    if "llama.cpp" in row:
        row["ratio"] = row["gptforge"]["tok_s"] / row["llama.cpp"]["tok_s"]
        # rows whose first CHECK greedy ids agree across engines (all of them in fp32; rounding may part the others)
        row["same_first_tokens"] = sum(a == b for a, b in zip(runs["gptforge"][0]["first_tokens"],
                                                              runs["llama.cpp"][0]["first_tokens"]))
    return row


def report(rows: list[dict], cfg, tok, skip: str | None, kv_dtype: str) -> None:
    print(json.dumps({"model": {"n_layer": cfg.model.n_layer, "d_model": cfg.model.d_model,
                                "vocab": tok.vocab_size, "arch": cfg.model.pos_encoding},
                      "prompt": PROMPT, "new_tokens": NEW, "kv_dtype": kv_dtype, "llama_cpp_skipped": skip,
                      "rows": rows}, indent=1))
    print(f"\n{cfg.model.n_layer} layers, d {cfg.model.d_model}, vocab {tok.vocab_size}: decode tokens/s (all rows), "
          f"medians; our KV cache {kv_dtype}, llama.cpp's f16; bytes/token, GB/s and the fraction of the measured read "
          "bandwidth at batch 1 (ours / llama.cpp)")
    print("\n| format (ours / GGUF) | threads | batch | gptforge tok/s | llama.cpp tok/s | ratio | MB/token | GB/s | "
          "of read BW | peak RSS MB | same ids |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours, ll = r["gptforge"], r.get("llama.cpp") or {}

        def pair(key: str, f: str) -> str:
            if key not in ours:
                return "-"
            return f"{ours[key]:{f}} / " + (f"{ll[key]:{f}}" if key in ll else "-")

        print(f"| {r['format']} / {r['gguf']} | {r['threads']} | {r['batch']} | {ours['tok_s']:.0f} | "
              f"{ll['tok_s']:.0f} | {r['ratio']:.2f}x | " if ll else "skipped | - | ", end="")
        mb = f"{ours['bytes_per_token'] / 1e6:.1f} / {ll.get('bytes_per_token', float('nan')) / 1e6:.1f}" \
            if "bytes_per_token" in ours else "-"
        frac = pair("bw_fraction", ".0%") + (f" (of {r['read_bw_gb_s']:.1f})" if "bw_fraction" in ours else "")
        same = f"{r['same_first_tokens']}/{r['batch']}" if "same_first_tokens" in r else "-"
        print(f"{mb} | {pair('gb_s', '.1f')} | {frac} | {pair('peak_rss_mb', '.0f')} | {same} |")
    paths = sorted({(name, r["format"], r["batch"], r[name]["path"]) for r in rows for name in ("gptforge", "llama.cpp")
                    if "path" in r.get(name, {})})
    for name, fmt, b, path in paths:
        print(f"- {name} {fmt} batch {b}: {path}")
    if skip:
        print(f"\nllama.cpp column skipped: {skip}")


def main() -> None:
    global REPEATS, NEW
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="a gptforge checkpoint or a Hugging Face folder (GPT-2 / Llama)")
    p.add_argument("--shape", default="small",
                   help="random weights of this shape when no --source: small (6 layers, d 384, rotary/RMSNorm/"
                        "SwiGLU), small-gpt2 (the same in GPT-2's variant) or gpt2 (124M); several with commas")
    p.add_argument("--formats", default="fp32,bf16,int8,int4")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch", default="1,8", help="sequences decoded together (each engine's batched decode)")
    p.add_argument("--rounds", type=int, default=3, help="processes per side, alternating (>= 3 for a median)")
    p.add_argument("--repeats", type=int, default=3, help="timings inside each process (their median)")
    p.add_argument("--new", type=int, default=NEW, help="new tokens per timed decode (the rate leaves the first out)")
    p.add_argument("--kv-dtype", default="auto", help="our KV cache's storage (generate's kv_dtype; llama.cpp's "
                   "is f16): auto (the weights' dtype), fp32, bf16 or int8")
    p.add_argument("--llama-flash-attn", choices=list(FLASH_ATTN), default="off",
                   help="llama.cpp's flash attention (llama-cpp-python's Llama() default: off; the low-level "
                        "context default: auto)")
    p.add_argument("--worker", choices=["ours", "llama", "bandwidth"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--format", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not set(args.shape.split(",")) <= set(SHAPES):
        p.error(f"--shape: use {', '.join(SHAPES)} (several with commas), not {args.shape!r}")
    REPEATS, NEW = args.repeats, args.new
    if args.worker:
        args.threads = int(args.threads)
        args.batch = 1 if args.worker == "bandwidth" else int(args.batch)
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
