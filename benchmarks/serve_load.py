"""Load test of `gptforge serve`: concurrent streaming clients against a server on loopback, bounded in time.

    python benchmarks/serve_load.py                          # 1, 4, 16, 32 clients, 60 s each (~5 min)
    python benchmarks/serve_load.py --seconds 10             # a short run
    python benchmarks/serve_load.py --model gpt2-blocks               # a ~90M model whose decode is DRAM-bound (~6 min)
    python benchmarks/serve_load.py --checkpoint runs/demo/run --levels 1,16

The server is started here (`gptforge serve CKPT --port 0 --max-batch 32 --threads T`). Without --checkpoint it
serves a random-init model (speed does not depend on what the weights say) with a 4096-token BPE trained on
the bundled plays, chosen by --model:

- `shakespeare` (default): the `shakespeare` preset (4 layers, d 256, context 256, 4.2M parameters). Its
  16 MB of weights sit in cache, so a decode step is compute- and overhead-bound: a batch-16 step costs ~3x a
  batch-1 step, which caps what batching can gain.
- `gpt2-blocks`: the `gpt2` preset's blocks (12 layers, d 768, learned positions) with the same 4096-token
  vocabulary and a 256-token context: 88M parameters, 354 MB of fp32 weights, far beyond cache, loaded
  through gptforge.load (decode_layout: the native few-row fp32 kernels). Its decode is bound by reading the
  weights from DRAM, as a real LLM's is, which is what continuous batching amortizes: a batch-1 step takes
  ~50 ms on 2 cores, so a full run (1, 4, 16, 32 clients, 60 s each) takes about 6 minutes.

Each client loops:
a streaming /v1/completions request (a ~32-token excerpt of the plays as prompt, max_tokens 64,
ignore_eos so that every answer is exactly 64 tokens, temperature 0.8), then the next, until the level's time
is up; requests in flight then finish and are counted.

Reported per level: requests done, errors (a non-200, an error event, a broken stream), lost requests (a
stream that ended without [DONE] or with fewer tokens than asked), aggregate output tokens/s (completion
tokens over the level's wall time), time to first token and inter-token latency (gap between successive
streamed chunks) at p50 and p99. Then the targets: zero errors and lost requests; tokens/s at 16 clients
>= 4x one client's; p99 inter-token latency at 16 clients <= 3x one client's. Results go to a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


MODELS = ("shakespeare", "gpt2-blocks")


def build_checkpoint(dest: Path, model: str = "shakespeare") -> Path:
    """A random-init checkpoint of `model` (one of MODELS) with a 4096-token BPE trained on the bundled plays."""
    import dataclasses

    import torch

    from gptforge.checkpoint import write_checkpoint
    from gptforge.config import RunConfig, model_preset
    from gptforge.corpora import load_corpus
    from gptforge.model import GPT
    from gptforge.tokenizer import Tokenizer

    texts = [d.text for d in load_corpus("shakespeare")[:8]]
    tok = Tokenizer.train(texts, vocab_size=4096)
    if model == "shakespeare":
        cfg = model_preset("shakespeare")
    elif model == "gpt2-blocks":
        # GPT-2's 50k vocabulary would add a 154 MB head that the BPE trained here cannot use; a 256-token
        # context keeps the KV cache of 32 rows at 600 MB (1024 would be 2.4 GB) and is all the load needs
        # (a ~32-token prompt and 64 new tokens).
        cfg = dataclasses.replace(model_preset("gpt2"), vocab_size=tok.vocab_size, block_size=256)
    else:
        raise SystemExit(f"unknown --model {model!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(0)
    return write_checkpoint(dest, RunConfig(model=cfg), tok, model_state=GPT(cfg).state_dict())


def prompts(n: int = 64) -> list[str]:
    """Excerpts of the plays of about 32 tokens (~130 characters)."""
    from gptforge.corpora import load_corpus

    text = load_corpus("shakespeare")[0].text
    step = max(1, (len(text) - 200) // n)
    return [text[i * step: i * step + 130] for i in range(n)]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, stats: dict) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    done, tokens = False, 0
    stats["sent"] += 1
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                stats["errors"] += 1
                stats["error_samples"].append(f"{r.status_code} {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    stats["errors"] += 1
                    stats["error_samples"].append(str(chunk["error"])[:200])
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    if last is None:
                        stats["ttft"].append(now - t0)
                    else:
                        stats["itl"].append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        stats["errors"] += 1
        stats["error_samples"].append(repr(e)[:200])
        return
    if not done or tokens != max_tokens:
        stats["lost"] += 1
        return
    stats["done"] += 1
    stats["tokens"] += tokens


async def run_level(url: str, model: str, clients: int, seconds: float, max_tokens: int, texts: list[str]) -> dict:
    stats = {"sent": 0, "done": 0, "errors": 0, "lost": 0, "tokens": 0, "ttft": [], "itl": [], "error_samples": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + seconds

        async def loop(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                await one_request(client, url, model, texts[i % len(texts)], max_tokens, stats)
                i += clients

        await asyncio.gather(*(loop(k) for k in range(clients)))
        wall = time.perf_counter() - start
    ms = lambda v: None if v is None else round(v * 1000, 2)
    return {"clients": clients, "seconds": round(wall, 2), "requests": stats["done"], "errors": stats["errors"],
            "lost": stats["lost"], "sent": stats["sent"], "tokens": stats["tokens"],
            "tokens_per_s": round(stats["tokens"] / wall, 1),
            "ttft_p50_ms": ms(percentile(stats["ttft"], 50)), "ttft_p99_ms": ms(percentile(stats["ttft"], 99)),
            "itl_p50_ms": ms(percentile(stats["itl"], 50)), "itl_p99_ms": ms(percentile(stats["itl"], 99)),
            "error_samples": stats["error_samples"][:5]}


async def warm_up(url: str, texts: list[str]) -> None:
    """A few requests first, so that the first level does not pay for one-time costs (allocator, code paths)."""
    stats = {"sent": 0, "done": 0, "errors": 0, "lost": 0, "tokens": 0, "ttft": [], "itl": [], "error_samples": []}
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        await asyncio.gather(*(one_request(client, url, "bench", t, 8, stats) for t in texts[:4]))
    if stats["done"] != 4:
        raise SystemExit(f"warm-up requests failed: {stats['error_samples']}")


def start_server(ckpt: Path, threads: int, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", str(ckpt), "--port", "0", "--model-name",
                             "bench", "--max-batch", str(max_batch), "--max-queue", "256", "--threads", str(threads)],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    line = proc.stdout.readline()
    m = re.search(r"at (http://[\d.]+:\d+)/v1", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}; see {log}")
    url = m[1]
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server never became healthy; see {log}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: a random-init --model)")
    ap.add_argument("--model", default="shakespeare", choices=MODELS,
                    help="the random-init model served without --checkpoint (default shakespeare; see above)")
    ap.add_argument("--levels", default="1,4,16,32", help="concurrent clients per level (default 1,4,16,32)")
    ap.add_argument("--seconds", type=float, default=60.0, help="time per level (default 60)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's torch threads (default 1: the other core runs HTTP and these clients)")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default 32)")
    ap.add_argument("--out", default="serve_load.json", help="JSON results file (default serve_load.json)")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(Path(tmp) / f"{args.model}-random",
                                                                               args.model)
        log = Path(tmp) / "server.log"
        proc, url = start_server(ckpt, args.threads, args.max_batch, log)
        try:
            texts = prompts()
            asyncio.run(warm_up(url, texts))
            rows = []
            for c in levels:
                row = asyncio.run(run_level(url, "bench", c, args.seconds, args.max_tokens, texts))
                rows.append(row)
                print(f"{c:>3} clients: {row['tokens_per_s']:>8.1f} tok/s  ttft p50 {row['ttft_p50_ms']} ms "
                      f"p99 {row['ttft_p99_ms']} ms  itl p50 {row['itl_p50_ms']} ms p99 {row['itl_p99_ms']} ms  "
                      f"requests {row['requests']} errors {row['errors']} lost {row['lost']}", flush=True)
            metrics = httpx.get(url + "/metrics").text
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        server_log = log.read_text()

    by = {r["clients"]: r for r in rows}
    checks = {"zero_errors_and_lost": all(r["errors"] == 0 and r["lost"] == 0 for r in rows)}
    if 1 in by and 16 in by:
        speedup = by[16]["tokens_per_s"] / max(by[1]["tokens_per_s"], 1e-9)
        itl_ratio = (by[16]["itl_p99_ms"] or 0) / max(by[1]["itl_p99_ms"] or 1e-9, 1e-9)
        checks.update(throughput_16_vs_1=round(speedup, 2), throughput_target_met=speedup >= 4,
                      itl_p99_16_vs_1=round(itl_ratio, 2), itl_target_met=itl_ratio <= 3)
    steps = re.search(r"^gptforge_decode_steps_total (\S+)$", metrics, re.M)
    result = {"checkpoint": str(args.checkpoint or f"random-init {args.model}"), "max_tokens": args.max_tokens,
              "seconds_per_level": args.seconds, "server_threads": args.threads, "max_batch": args.max_batch,
              "levels": rows, "checks": checks, "decode_steps": float(steps[1]) if steps else None}
    print()
    print("| clients | requests | errors | lost | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['lost']} | {r['tokens_per_s']:.1f} | "
              f"{r['ttft_p50_ms']} / {r['ttft_p99_ms']} | {r['itl_p50_ms']} / {r['itl_p99_ms']} |")
    print()
    print("checks:", json.dumps(checks))
    if "Traceback" in server_log:
        print("the server logged errors:\n" + server_log[-3000:])
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0 if checks["zero_errors_and_lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
