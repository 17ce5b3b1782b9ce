"""Batch-1 decode: gptforge vs llama.cpp (through llama-cpp-python) on the same weights, in four formats.

    python benchmarks/decode_llamacpp.py --source CKPT_OR_HF_FOLDER      # a checkpoint, or an HF folder (imported)
    python benchmarks/decode_llamacpp.py --shape small                   # random weights, the demo's dimensions
    python benchmarks/decode_llamacpp.py --shape gpt2 --formats int8,int4 --threads 1,2 --rounds 3
    python benchmarks/decode_llamacpp.py --worker ours --model DIR --format int8 --threads 1   # one JSON line

One set of weights (a checkpoint, an HF folder imported with import-hf, or random weights of a --shape with a BPE
trained on the bundled corpus) is converted once per format, each side in its own: ours with `gptforge quantize`
(fp32 as is, bf16, int8, int4 with groups of 32), llama.cpp's with `gptforge export-gguf` (f32, bf16, q8_0, q4_0:
blocks of 32 with one scale, the peers of int8 per channel and int4-g32). Each measurement is a fresh process:
load, a 32-token prompt, greedy decoding with no end-of-text stop, decode rate = 255 / (time(256 new tokens) -
time(1 new token)) so that prefill is left out, median of 3 inside the process; peak RSS of the process
(VmHWM) at the end. Ours loads as `gptforge generate` does (gptforge.load: the CPU decode layout; bf16
asked for explicitly). llama.cpp's side runs llama_cpp.Llama.generate with top_k=1 (its greedy sampler), the KV
cache reset before each timing. Processes alternate ours, llama.cpp, ours, ... (benchmarks/alternate.py's
`measure`), --rounds each, per format and thread count; medians are quoted. Without llama-cpp-python installed
(`make llama-cpp`) the llama.cpp column is skipped with that reason.
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
FORMATS = {  # ours (gptforge quantize --method, None: as is) -> the GGUF type of the same format
    "fp32": (None, "f32"), "bf16": ("bf16", "bf16"), "int8": ("int8", "q8_0"), "int4": ("int4", "q4_0")}


def rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's high-water mark across
    fork + exec into it, so every worker would report the driver's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def timed(run) -> float:
    """Decode tokens per second of `run(n)` (generates n tokens after a fresh prefill), median of 3."""
    run(4)  # warm-up: first-call allocations, kernel selection
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(NEW)
        t2 = time.perf_counter()
        rates.append((NEW - 1) / ((t2 - t1) - (t1 - t0)))
    return statistics.median(rates)


def worker_ours(model_dir: str, fmt: str, threads: int, prompt: list[int]) -> dict:
    import torch

    import gptforge
    from gptforge.generate import generate_steps
    from gptforge.sampling import SamplingParams

    torch.set_num_threads(threads)
    model, tok = gptforge.load(model_dir, device="cpu", dtype="bfloat16" if fmt == "bf16" else "auto")

    def run(n: int) -> None:
        p = SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_eos=False)
        with torch.inference_mode():
            assert sum(1 for _ in generate_steps(model, [prompt], p, vocab_size=tok.vocab_size)) == n

    return {"tok_s": timed(run)}


def worker_llama(gguf_path: str, threads: int, prompt: list[int]) -> dict:
    import llama_cpp

    # n_batch=1: the prompt goes in one token at a time (prefill is not timed): llama-cpp-python 0.3.36's
    # multi-token batches crash in the repacked-weight (AMX) path on our CPU for q8_0/q4_0 (tests/test_gguf.py)
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=PROMPT + NEW + 8, n_batch=1, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def run(n: int) -> None:
        llm.reset()  # a fresh prefill each time (generate would otherwise reuse the cached prompt)
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True), 1):
            if i == n:
                break

    return {"tok_s": timed(run)}


def worker(args) -> None:
    prompt = json.loads(Path(args.prompt).read_text())
    if args.worker == "ours":
        out = worker_ours(args.model, args.format, args.threads, prompt)
    else:
        out = worker_llama(args.model, args.threads, prompt)
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
    work = Path(tempfile.mkdtemp(prefix="decode-llamacpp-"))
    try:
        rows, cfg, tok = measure_all(args, work, skip)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, cfg, tok, skip)


def measure_all(args, work: Path, skip: str | None) -> tuple[list, object, object]:
    """Convert the source to each format, then time each (format, threads) pair in alternating processes."""
    from gptforge.loader import load_checkpoint

    src = source_checkpoint(args, work)
    _, tok, cfg = load_checkpoint(src)
    text = ("ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
            "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief")
    prompt = (tok.encode(text) * 4)[:PROMPT]
    (work / "prompt.json").write_text(json.dumps(prompt))
    me = [sys.executable, __file__, "--prompt", str(work / "prompt.json")]
    rows = []
    for fmt in args.formats.split(","):
        ours, theirs = convert(src, fmt, work)
        for threads in [int(t) for t in args.threads.split(",")]:
            variants = {"gptforge": me + ["--worker", "ours", "--model", str(ours), "--format", fmt]}
            if skip is None:
                variants["llama.cpp"] = me + ["--worker", "llama", "--model", str(theirs), "--format", fmt]
            runs: dict[str, list[dict]] = {name: [] for name in variants}
            for r in range(args.rounds):
                for name, cmd in variants.items():
                    runs[name].append(measure(cmd + ["--threads", str(threads)]))
                    print(f"{fmt} {threads}t round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
            row = {"format": fmt, "gguf": FORMATS[fmt][1], "threads": threads}
            for name, ms in runs.items():
                row[name] = {"tok_s": statistics.median(m["tok_s"] for m in ms), "runs": [m["tok_s"] for m in ms],
                             "peak_rss_mb": statistics.median(m["peak_rss_mb"] for m in ms)}
            if skip is None:
                row["ratio"] = row["gptforge"]["tok_s"] / row["llama.cpp"]["tok_s"]
            rows.append(row)
    return rows, cfg, tok


def report(rows: list[dict], cfg, tok, skip: str | None) -> None:
    print(json.dumps({"model": {"n_layer": cfg.model.n_layer, "d_model": cfg.model.d_model,
                                "vocab": tok.vocab_size, "arch": cfg.model.pos_encoding},
                      "prompt": PROMPT, "new_tokens": NEW, "llama_cpp_skipped": skip, "rows": rows}, indent=1))
    print("\n| format (ours / GGUF) | threads | gptforge tok/s | llama.cpp tok/s | ratio | peak RSS MB ours / llama.cpp |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ours, ll = r["gptforge"], r.get("llama.cpp")
        theirs = (f"{ll['tok_s']:.0f}", f"{r['ratio']:.2f}x", f"{ll['peak_rss_mb']:.0f}") if ll else ("skipped", "-", "-")
        print(f"| {r['format']} / {r['gguf']} | {r['threads']} | {ours['tok_s']:.0f} | {theirs[0]} | {theirs[1]} | "
              f"{ours['peak_rss_mb']:.0f} / {theirs[2]} |")
    if skip:
        print(f"\nllama.cpp column skipped: {skip}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="a gptforge checkpoint or a Hugging Face folder (GPT-2 / Llama)")
    p.add_argument("--shape", default="small", choices=["small", "small-gpt2", "gpt2"],
                   help="random weights of this shape when no --source: small (6 layers, d 384, rotary/RMSNorm/"
                        "SwiGLU), small-gpt2 (the same in GPT-2's variant) or gpt2 (124M)")
    p.add_argument("--formats", default="fp32,bf16,int8,int4")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=3, help="processes per side, alternating (>= 3 for a median)")
    p.add_argument("--worker", choices=["ours", "llama"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--format", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
