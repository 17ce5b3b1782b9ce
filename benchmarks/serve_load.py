"""Load test of `gptforge serve`: concurrent streaming clients against a server on loopback, bounded in time.

    python benchmarks/serve_load.py                          # 1, 4, 16, 32 clients, 60 s each (~5 min)
    python benchmarks/serve_load.py --seconds 10             # a short run
    python benchmarks/serve_load.py --model gpt2-blocks               # a ~90M model whose decode is DRAM-bound (~6 min)
    python benchmarks/serve_load.py --checkpoint runs/demo/run --levels 1,16
    python benchmarks/serve_load.py --scenario prefix        # prefix cache: time to first token, miss vs hit (~1 min)
    python benchmarks/serve_load.py --scenario chat          # prefix cache: multi-turn chat, cache on vs off (~6 min)

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

Two scenarios measure the prefix cache (docs/serve.md), on `--model long` unless told (the `shakespeare`
preset with a 2048-token context: a 1,000-token prefix needs more than its 256):

- `--scenario prefix`: time to first token of a 1,000-token prefix + 20 new tokens (token-id prompts, one token
  asked, one request at a time), on a miss (a prefix never sent) and on a hit (the same prefix, 20 other new
  tokens), alternating miss, hit, miss, hit, in `--reps` server processes; the medians and their ratio
  (target >= 5x), and the cached_tokens the hits reported.
- `--scenario chat`: `--levels` clients (default 8) each hold `--conversations` multi-turn conversations (default
  1; a shared system prompt, then `--turns` turns (default 8) of a ~100-token user message and a 32-token
  reply, the whole conversation resent each turn): the same work for both servers, so no turn is cut short; a
  server with the prefix cache and one with `--prefix-cache-tokens 0` alternate, `--reps` processes each;
  aggregate output tokens/s (all replies over the wall time), medians and ratio (target >= 2x).
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


MODELS = ("shakespeare", "gpt2-blocks", "long")
SCENARIOS = ("load", "prefix", "chat")


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
    elif model == "long":  # the prefix-cache scenarios: a 1,000-token prefix, conversations of ~1,300 tokens
        cfg = dataclasses.replace(model_preset("shakespeare"), block_size=2048)
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


async def run_level(url: str, models: list[str], clients: int, seconds: float, max_tokens: int,
                    texts: list[str]) -> dict:
    """`clients` streaming clients for `seconds`, client k asking for models[k % len(models)]."""
    stats = {"sent": 0, "done": 0, "errors": 0, "lost": 0, "tokens": 0, "ttft": [], "itl": [], "error_samples": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + seconds

        async def loop(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                await one_request(client, url, models[k % len(models)], texts[i % len(texts)], max_tokens, stats)
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


def start_server(ckpt: Path, threads: int, max_batch: int, log: Path,
                 prefix_cache_tokens: int | None = None) -> tuple[subprocess.Popen, str]:
    extra = [] if prefix_cache_tokens is None else ["--prefix-cache-tokens", str(prefix_cache_tokens)]
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", str(ckpt), "--port", "0", "--model-name",
                             "bench", "--max-batch", str(max_batch), "--max-queue", "256", "--threads", str(threads),
                             *extra], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
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


# --- the prefix cache's scenarios --------------------------------------------------------------------------
def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def ttft_scenario(ckpt: Path, args, tmp: Path) -> dict:
    """Miss and hit times to first token, alternating, in args.reps server processes."""
    import random

    from gptforge.checkpoint import read_config

    vocab = read_config(ckpt).model.vocab_size
    rng = random.Random(0)
    miss, hit, cached = [], [], []
    for rep in range(args.reps):
        proc, url = start_server(ckpt, args.threads, args.max_batch, tmp / f"prefix{rep}.log", args.prefix_cache_tokens)
        try:
            with httpx.Client(timeout=120) as client:
                def ask(ids: list[int]) -> tuple[float, int]:
                    t0 = time.perf_counter()
                    r = client.post(url + "/v1/completions", json={"model": "bench", "prompt": ids, "max_tokens": 1,
                                                                   "temperature": 0})
                    dt = time.perf_counter() - t0
                    r.raise_for_status()
                    return dt, r.json()["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)

                new = lambda n: [rng.randrange(256, vocab) for _ in range(n)]  # noqa: E731
                ask(new(1020))  # warm-up: allocator, code paths
                for _ in range(args.rounds):
                    prefix = new(1000)  # never sent before: a miss
                    miss.append(ask(prefix + new(20))[0])
                    dt, c = ask(prefix + new(20))  # the same prefix, other new tokens: a hit
                    hit.append(dt)
                    cached.append(c)
        finally:
            _stop(proc)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    row = {"rounds": len(miss), "miss_ttft_ms": round(med(miss) * 1000, 2), "hit_ttft_ms": round(med(hit) * 1000, 2),
           "speedup": round(med(miss) / med(hit), 2), "cached_tokens_on_hit": sorted(set(cached))}
    row["target_met"] = row["speedup"] >= 5
    print(f"1,000-token prefix + 20 new: miss {row['miss_ttft_ms']} ms, hit {row['hit_ttft_ms']} ms (median of "
          f"{row['rounds']}), {row['speedup']}x; cached_tokens on a hit: {row['cached_tokens_on_hit']}", flush=True)
    return row


async def _conversation_loop(client: httpx.AsyncClient, url: str, k: int, conversations: int, stats: dict,
                             texts: list[str], turns: int, max_tokens: int) -> None:
    """Client k: `conversations` conversations of `turns` turns, each resent whole."""
    system = {"role": "system", "content": texts[0] * 3}  # the same for every client: ~100 tokens
    j = k
    for _ in range(conversations):
        messages = [system]
        for _ in range(turns):
            messages.append({"role": "user", "content": texts[j % len(texts)] * 3})  # ~100 tokens
            j += 7
            body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0.8,
                    "ignore_eos": True}
            try:
                r = await client.post(url + "/v1/chat/completions", json=body)
            except httpx.HTTPError as e:
                stats["errors"] += 1
                stats["error_samples"].append(repr(e)[:200])
                return
            if r.status_code != 200:
                stats["errors"] += 1
                stats["error_samples"].append(f"{r.status_code} {r.text[:200]}")
                return
            out = r.json()
            usage = out["usage"]
            stats["turns"] += 1
            stats["tokens"] += usage["completion_tokens"]
            stats["prompt_tokens"] += usage["prompt_tokens"]
            stats["cached_tokens"] += usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            messages.append({"role": "assistant", "content": out["choices"][0]["message"]["content"]})


async def _chat_run(url: str, clients: int, conversations: int, texts: list[str], turns: int,
                    max_tokens: int) -> dict:
    stats = {"turns": 0, "tokens": 0, "prompt_tokens": 0, "cached_tokens": 0, "errors": 0, "error_samples": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(_conversation_loop(client, url, k, conversations, stats, texts, turns, max_tokens)
                               for k in range(clients)))
        wall = time.perf_counter() - start
    return {**stats, "seconds": round(wall, 2), "tokens_per_s": round(stats["tokens"] / wall, 1),
            "error_samples": stats["error_samples"][:5]}


def chat_scenario(ckpt: Path, args, tmp: Path) -> dict:
    """Multi-turn chat load, the prefix cache on and off alternating (args.reps processes each)."""
    clients = int(args.levels.split(",")[0]) if args.levels != "1,4,16,32" else 8
    texts = prompts()
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for rep in range(args.reps):
        for mode in ("on", "off"):
            bound = args.prefix_cache_tokens if mode == "on" else 0
            proc, url = start_server(ckpt, args.threads, args.max_batch, tmp / f"chat-{mode}{rep}.log", bound)
            try:
                row = asyncio.run(_chat_run(url, clients, args.conversations, texts, args.turns, args.max_tokens))
            finally:
                _stop(proc)
            runs[mode].append(row)
            print(f"cache {mode:>3}: {row['tokens_per_s']:>7.1f} output tok/s, {row['turns']} turns, prompt tokens "
                  f"{row['prompt_tokens']} of which cached {row['cached_tokens']}, errors {row['errors']}", flush=True)
    med = {m: sorted(r["tokens_per_s"] for r in rs)[len(rs) // 2] for m, rs in runs.items()}
    ratio = med["on"] / max(med["off"], 1e-9)
    print(f"multi-turn chat, {clients} clients: {med['on']} vs {med['off']} output tok/s (medians), {ratio:.2f}x",
          flush=True)
    return {"clients": clients, "turns": args.turns, "runs": runs, "median_tokens_per_s": med,
            "ratio": round(ratio, 2), "target_met": ratio >= 2,
            "errors": sum(r["errors"] for rs in runs.values() for r in rs)}


def prefix_main(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model if args.model != "shakespeare" else "long"
        ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(Path(tmp) / f"{model}-random", model)
        fn = ttft_scenario if args.scenario == "prefix" else chat_scenario
        result = {"scenario": args.scenario, "checkpoint": str(args.checkpoint or f"random-init {model}"),
                  "server_threads": args.threads, "prefix_cache_tokens": args.prefix_cache_tokens,
                  **fn(ckpt, args, Path(tmp))}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0 if result.get("errors", 0) == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="load", choices=SCENARIOS,
                    help="load: streaming clients per level (default); prefix, chat: the prefix cache (see above)")
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: a random-init --model)")
    ap.add_argument("--model", default="shakespeare", choices=MODELS,
                    help="the random-init model served without --checkpoint (default shakespeare, long for the "
                         "prefix-cache scenarios; see above)")
    ap.add_argument("--levels", default="1,4,16,32", help="concurrent clients per level (default 1,4,16,32; "
                                                          "chat: the first, default 8)")
    ap.add_argument("--seconds", type=float, default=60.0, help="time per level (default 60)")
    ap.add_argument("--prefix-cache-tokens", type=int, default=None,
                    help="the server's --prefix-cache-tokens (default: its own; 0 turns the cache off)")
    ap.add_argument("--reps", type=int, default=3, help="prefix, chat: server processes per setting (default 3)")
    ap.add_argument("--rounds", type=int, default=8, help="prefix: miss/hit pairs per process (default 8)")
    ap.add_argument("--turns", type=int, default=8, help="chat: turns per conversation (default 8)")
    ap.add_argument("--conversations", type=int, default=1, help="chat: conversations per client (default 1)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's torch threads (default 1: the other core runs HTTP and these clients)")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default 32)")
    ap.add_argument("--out", default="serve_load.json", help="JSON results file (default serve_load.json)")
    args = ap.parse_args(argv)
    if args.scenario != "load":
        if args.max_tokens == 64:
            args.max_tokens = 32  # chat replies
        return prefix_main(args)
    levels = [int(x) for x in args.levels.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(Path(tmp) / f"{args.model}-random",
                                                                               args.model)
        log = Path(tmp) / "server.log"
        proc, url = start_server(ckpt, args.threads, args.max_batch, log, args.prefix_cache_tokens)
        try:
            texts = prompts()
            asyncio.run(warm_up(url, texts))
            rows = []
            for c in levels:
                row = asyncio.run(run_level(url, ["bench"], c, args.seconds, args.max_tokens, texts))
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
