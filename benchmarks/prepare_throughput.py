"""`gptforge prepare` throughput vs HF `tokenizers` and tiktoken on the same bytes and vocabulary, and its peak RSS
at two corpus sizes.

The corpus is CPython's standard library (every .py file under the running Python's stdlib folder, site-packages
left out: 31.5 MB for 3.11). One byte-level BPE of --vocab-size tokens is trained on it once; every variant then
encodes the same files with it:

- gptforge:        `prepare(folder, tokenizer=...)`: its tokenize+write rate (what the command prints) and its rate
                   over the whole call (reading the folder twice, the split, writing shards) as `wall_mb_per_s`
- gptforge_hf:     the same with `fast=False` (HF tokenizers behind prepare's chunking and batching)
- hf_encode_batch: `tokenizer.encode_batch(files)`, what a user of HF tokenizers writes
- tiktoken:        `encode_ordinary_batch(files)` (its own thread pool) with the same BPE as tiktoken ranks, built
                   by gptforge.fastencode, as nanochat encodes with a BPE it trained
- tiktoken_1thread: `encode_ordinary(file)` for each file on one thread

Fresh processes alternate A B C ... (3 rounds by default), medians quoted. Then prepare runs once on the corpus as
JSONL and once on three copies of it, and the peak RSS (VmHWM) of each process is reported.

    python benchmarks/prepare_throughput.py                 # the full stdlib, JSON summary on stdout
    python benchmarks/prepare_throughput.py --limit-mb 8    # the first 8 MB of it (a quick, indicative run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def stdlib_files(limit_mb: float | None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts and f.is_file())
    if limit_mb is not None:
        kept, size = [], 0
        for f in files:
            if size >= limit_mb * 1e6:
                break
            kept.append(f)
            size += f.stat().st_size
        files = kept
    return files


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def one_run(which: str, corpus: str, tokenizer: str) -> None:
    from gptforge.data import prepare
    from gptforge.fastencode import fast_encoder
    from gptforge.tokenizer import Tokenizer

    if which.startswith("gptforge"):
        with tempfile.TemporaryDirectory() as out:
            t0, c0 = time.perf_counter(), time.process_time()
            stats = prepare([corpus], Path(out) / "d", tokenizer=tokenizer, val_fraction=0.05, progress=False,
                            include=("*.py",), fast=which == "gptforge")
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"mb_per_s": stats.mb_per_s, "wall_mb_per_s": stats.bytes / 1e6 / wall, "bytes": stats.bytes,
                          "mb_per_cpu_s": stats.bytes / 1e6 / cpu, "encoder": stats.encoder,
                          "tokens": sum(stats.tokens.values()), "peak_rss_mb": peak_rss_mb()}))
        return
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(Path(corpus).rglob("*.py"))]
    n_bytes = sum(len(t.encode()) for t in texts)
    tok = Tokenizer.load(tokenizer)
    t0, c0 = time.perf_counter(), time.process_time()
    if which == "hf_encode_batch":
        tokens = sum(len(e.ids) for e in tok.hf.encode_batch(texts, add_special_tokens=False))
    else:
        enc = fast_encoder(tok).encoding
        t0, c0 = time.perf_counter(), time.process_time()
        if which == "tiktoken":
            tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(texts))
        else:
            tokens = sum(len(enc.encode_ordinary(t)) for t in texts)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"mb_per_s": n_bytes / 1e6 / dt, "mb_per_cpu_s": n_bytes / 1e6 / cpu, "bytes": n_bytes,
                      "tokens": tokens, "peak_rss_mb": peak_rss_mb()}))


def copy_corpus(files: list[Path], root: Path, dest: Path) -> None:
    """The files into dest, same relative paths (so every variant reads the same bytes from one folder)."""
    for f in files:
        target = dest / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())


def rss_at_two_sizes(files: list[Path], tokenizer: str, tmp: Path) -> dict:
    """prepare on the corpus as one JSONL file, and on three copies of it: peak RSS of each (one process each)."""
    import subprocess

    lines = [json.dumps({"text": f.read_text(encoding="utf-8", errors="replace")}) + "\n" for f in files]
    out = {}
    for copies in (1, 3):
        src = tmp / f"corpus_x{copies}.jsonl"
        with open(src, "w") as fh:
            for _ in range(copies):
                fh.writelines(lines)
        cmd = [sys.executable, __file__, "--one", "gptforge", str(src), tokenizer]
        res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        out[f"x{copies}"] = {"mb": res["bytes"] / 1e6, "peak_rss_mb": res["peak_rss_mb"], "mb_per_s": res["mb_per_s"]}
        src.unlink()
    return out


def alternate_all(variants: dict[str, list[str]], rounds: int) -> dict[str, dict]:
    """alternate.alternate, keeping each process's other figures too: the median of every numeric key, the runs of
    mb_per_s (the CPU-time rate, mb_per_cpu_s, counts every thread: it shows what a loaded machine hides in wall
    time, and what threads cost in CPU)."""
    from alternate import measure

    out: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, cmd in variants.items():
            out[name].append(measure(cmd))
            print(f"round {r + 1} {name}: {out[name][-1]['mb_per_s']:.4g} MB/s", file=sys.stderr, flush=True)
    return {name: {"runs": [x["mb_per_s"] for x in runs], "median": statistics.median(x["mb_per_s"] for x in runs),
                   **{k: statistics.median(x[k] for x in runs) for k in ("wall_mb_per_s", "mb_per_cpu_s", "peak_rss_mb")
                      if k in runs[0]}} for name, runs in out.items()}


def main() -> None:
    from gptforge.tokenizer import Tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--limit-mb", type=float, help="only the first files of the stdlib, about this many MB")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], help="variants to leave out")
    args = ap.parse_args()
    files = stdlib_files(args.limit_mb)
    root = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        corpus = tmp / "stdlib"
        copy_corpus(files, root, corpus)
        t0 = time.perf_counter()
        tok = Tokenizer.train((f.read_text(encoding="utf-8", errors="replace") for f in files), args.vocab_size)
        print(f"tokenizer trained in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        tok_path = str(tok.save(tmp / "tokenizer.json"))
        me = [sys.executable, __file__, "--one"]
        variants = {name: me + [name, str(corpus), tok_path] for name in
                    ("gptforge", "gptforge_hf", "hf_encode_batch", "tiktoken", "tiktoken_1thread") if name not in args.skip}
        res = alternate_all(variants, args.rounds)
        res["corpus_mb"] = sum(f.stat().st_size for f in files) / 1e6
        res["vocab_size"] = args.vocab_size
        for peer in ("tiktoken", "tiktoken_1thread", "hf_encode_batch"):
            if "gptforge" in res and peer in res:
                res[f"gptforge_over_{peer}"] = res["gptforge"]["median"] / res[peer]["median"]
        res["peak_rss"] = rss_at_two_sizes(files, tok_path, tmp)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one_run(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
