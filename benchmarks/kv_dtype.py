"""Perplexity and memory of the KV cache stored in fp32, bf16 and int8 (kvcache.KVCache kv_dtype).

    python benchmarks/kv_dtype.py                               # trains the tiny preset for 300 steps first (~1 min)
    python benchmarks/kv_dtype.py --checkpoint runs/demo/run    # a trained checkpoint (the demo's)
    python benchmarks/kv_dtype.py --checkpoint runs/demo/run --quantize int8,int4   # also its quantized weights


Each validation window (the model's context) is one prefill through a cache of each dtype: every layer's
attention then reads all its keys and values back from the cache, as every decode step does, so the perplexity
is what a generation on that cache sees. Reported: perplexity per dtype, its change against fp32 (%), and the
cache's bytes per token (keys, values and int8's scales, every layer). Results go to a JSON file.
With --quantize, the same for the model's int8 / int4 (groups of 32) weights, quantized in memory as `gptforge
quantize` does: each against the fp32 cache over the same weights (what kv_dtype auto's bf16 for a quantized model
costs: kvcache.resolve_kv_dtype).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptforge.config import RunConfig, TrainConfig, model_preset
from gptforge.corpora import load_corpus
from gptforge.data import TokenData, prepare
from gptforge.generate import load
from gptforge.kvcache import KVCache
from gptforge.train import train

DTYPES = ("fp32", "bf16", "int8")


def trained_tiny(tmp: Path, steps: int) -> tuple[Path, Path]:
    """The tiny preset trained on four plays of the bundled corpus: (checkpoint, data dir)."""
    plays = tmp / "plays"
    plays.mkdir()
    for doc in load_corpus("shakespeare")[:4]:
        (plays / Path(doc.name).name).write_text(doc.text, encoding="utf-8")
    data = tmp / "data"
    prepare([str(plays)], data, vocab_size=512, val_fraction=0.25, seed=0, progress=False)
    tc = TrainConfig(micro_batch=8, seq_len=64, max_steps=steps, warmup_steps=10, lr=3e-3, eval_every=10_000,
                     eval_batches=1, log_every=10_000, save_every=10_000, seed=3, tensorboard=False)
    cfg = RunConfig(model=dataclasses.replace(model_preset("tiny"), vocab_size=TokenData(data).vocab_size), train=tc,
                    data=str(data), out=str(tmp / "run"))
    return train(cfg, progress=False).checkpoint, data


def val_tokens(data: Path | None, tokenizer, n: int) -> np.ndarray:
    """n validation tokens: the data dir's val shards, else the last play of the bundled corpus encoded."""
    if data is not None:
        return np.concatenate(TokenData(data).shards("val"))[:n]
    return np.array(tokenizer.encode(load_corpus("shakespeare")[-1].text)[:n])


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, kv_dtype: str, window: int, batch: int = 8) -> tuple[float, int]:
    """Next-token perplexity over whole windows of `tokens`, each one prefill through a `kv_dtype` cache; and
    the cache's bytes per token."""
    n = len(tokens) // window
    x = torch.as_tensor(tokens[: n * window].astype(np.int64)).view(n, window)
    nll, count, per_token = 0.0, 0, 0
    for i in range(0, n, batch):
        xb = x[i: i + batch]
        cache = KVCache(model.config, len(xb), window, device=torch.device("cpu"), dtype=torch.float32, static=False,
                        kv_dtype=kv_dtype)
        cache.prepare(torch.arange(window), None, end=window)
        logits = model(xb, torch.arange(window), cache)[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), xb[:, 1:].flatten(), reduction="sum").item()
        count += xb[:, 1:].numel()
        per_token = sum(b[0].numel() * b.element_size() for kv in cache.layers for b in kv.buffers()) // window
    return math.exp(nll / count), per_token


def measure(model, tokens: np.ndarray, window: int, methods: list[str]) -> dict[str, dict[str, dict]]:
    """{weights: {kv dtype: {perplexity, bytes_per_token, delta_pct}}} for the model's own weights ("fp32") and
    each quantization method, the delta against the fp32 cache over the same weights."""
    from gptforge.compress.quantize import quantize_model

    out = {}
    for method in ["fp32", *methods]:
        m = model if method == "fp32" else quantize_model(model, method, 32 if method == "int4" else None)[0]
        rows = {}
        for d in DTYPES:
            ppl, per_token = perplexity(m, tokens, d, window)
            rows[d] = {"perplexity": round(ppl, 4), "bytes_per_token": per_token}
        for r in rows.values():
            r["delta_pct"] = round(100 * (r["perplexity"] / rows["fp32"]["perplexity"] - 1), 3)
        out[method] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: train the tiny preset first)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the default tiny model (default 300)")
    ap.add_argument("--tokens", type=int, default=65_536, help="validation tokens scored (default 65536)")
    ap.add_argument("--window", type=int, help="tokens per window (default: the model's context)")
    ap.add_argument("--quantize", default="", help="also these weight formats, comma-separated: int8, int4")
    ap.add_argument("--out", default="kv_dtype.json", help="JSON results file (default kv_dtype.json)")
    args = ap.parse_args(argv)
    methods = [m for m in args.quantize.split(",") if m]
    if not set(methods) <= {"int8", "int4"}:
        ap.error(f"--quantize: int8 and/or int4, not {args.quantize!r}")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, data = (Path(args.checkpoint), None) if args.checkpoint else trained_tiny(Path(tmp), args.steps)
        model, tok = load(ckpt, device="cpu")
        window = args.window or model.config.block_size
        tokens = val_tokens(data, tok, args.tokens)
        results = measure(model, tokens, window, methods)
    print(f"{args.checkpoint or f'tiny preset, {args.steps} steps'}; {len(tokens)} tokens in windows of {window}")
    print("| weights | KV cache | perplexity | Δ vs fp32 cache | bytes per token |")
    print("|---|---|---|---|---|")
    for method, rows in results.items():
        for d, r in rows.items():
            print(f"| {method} | {d} | {r['perplexity']:.3f} | {r['delta_pct']:+.3f}% | {r['bytes_per_token']} |")
    Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint or f"tiny, {args.steps} steps",
                                          "window": window, "tokens": len(tokens), "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
