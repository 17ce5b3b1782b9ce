"""LoRA vs full fine-tuning of the same base on the same data: trainable parameters, optimizer state, checkpoint
size, peak memory, tokens/s and val loss.

The base is pretrained here on the bundled Shakespeare comedies and tragedies; both methods then fine-tune it
on the histories (prepared with the base's tokenizer, a domain the base has not seen) through
`gptforge.finetune.run.finetune` (task lm), for the same steps and batches. Each fine-tune runs in a fresh
process so that its peak memory is its own: on CPU the peak resident set (ru_maxrss) minus the resident set
before the base was loaded; on CUDA torch.cuda.max_memory_allocated.

    python benchmarks/lora_vs_full.py                    # CPU, ~10 min on 2 cores; prints a table and JSON
    python benchmarks/lora_vs_full.py --device cuda --model gpt2 --base-steps 300 --steps 200
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build_base(a: argparse.Namespace) -> None:
    from gptforge.config import RunConfig, TrainConfig, model_preset
    from gptforge.corpora import load_corpus
    from gptforge.data import prepare
    from gptforge.train import train

    work = Path(a.work)
    if (work / "base" / "checkpoints" / "latest").is_file():
        return
    for genre_dir in ("pre", "ft"):
        (work / "text" / genre_dir).mkdir(parents=True, exist_ok=True)
    for doc in load_corpus("shakespeare"):
        part = "ft" if "/histories/" in doc.name else "pre"
        (work / "text" / part / Path(doc.name).name).write_text(doc.text, encoding="utf-8")
    prepare([str(work / "text" / "pre")], work / "pre_data", vocab_size=4096, val_fraction=0.05, progress=False)
    prepare([str(work / "text" / "ft")], work / "ft_data", tokenizer=work / "pre_data" / "tokenizer.json",
            val_fraction=0.1, progress=False)
    model = model_preset(a.model)
    tc = TrainConfig(max_steps=a.base_steps, micro_batch=a.micro_batch, seq_len=a.seq_len, lr=1e-3,
                     warmup_steps=max(1, a.base_steps // 20), eval_every=a.base_steps, save_every=a.base_steps,
                     tensorboard=False, device=a.device, precision=a.precision, log_every=10)
    r = train(RunConfig(model=model, train=tc, data=str(work / "pre_data"), out=str(work / "base")), progress=False)
    print(f"base: {a.base_steps} steps, val loss {r.first_val_loss:.3f} -> {r.final_val_loss:.3f}", file=sys.stderr)


def one(a: argparse.Namespace, method: str) -> None:
    import torch

    from gptforge.config import RunConfig, TrainConfig
    from gptforge.finetune.lora import LoRAConfig
    from gptforge.finetune.run import FinetuneSpec, finetune

    import gptforge.train

    # No MFU here: on CPU its peak-FLOP/bandwidth probe allocates buffers that would dominate the peak RSS.
    gptforge.train.device_peak_flops = lambda device, precision: None
    work = Path(a.work)
    rss0 = rss_now_bytes()
    lr = a.lora_lr if method == "lora" else a.lr
    tc = TrainConfig(max_steps=a.steps, micro_batch=a.micro_batch, seq_len=a.seq_len, lr=lr,
                     warmup_steps=max(1, a.steps // 10), eval_every=a.steps, save_every=a.steps, eval_batches=20,
                     tensorboard=False, device=a.device, precision=a.precision, save_best=False, log_every=10)
    spec = FinetuneSpec(method=method, task="lm", lora=LoRAConfig(rank=a.rank, alpha=2.0 * a.rank))
    r = finetune(RunConfig(train=tc, out=str(work / f"ft-{method}")), work / "base", spec,
                 data=str(work / "ft_data"), progress=False)
    if a.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    t = r.train
    print(json.dumps({
        "method": method, "lr": lr, "trainable_params": r.trainable_params, "total_params": r.total_params,
        "optimizer_state_mb": r.optimizer_state_bytes / 2**20,
        "checkpoint_mb": (t.checkpoint / "model.safetensors").stat().st_size / 2**20,
        "peak_memory_mb": peak / 2**20, "tokens_per_s": t.tokens_per_s, "steps": t.steps,
        "first_val_loss": t.first_val_loss, "final_val_loss": t.final_val_loss}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/gptforge-lora-bench", help="folder for data, base and runs (reused)")
    p.add_argument("--model", default="shakespeare", help="base model preset (default shakespeare, 4.2M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps of each method")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4, help="full fine-tuning learning rate")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA learning rate (adapters take larger steps)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        one(a, a.one)
        return
    build_base(a)
    argv = sys.argv[1:]
    rows = []
    for method in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, *argv, "--one", method], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'method':<6} {'trainable':>12} {'AdamW state':>12} {'checkpoint':>11} {'peak mem':>10} {'tokens/s':>9} "
          f"{'val loss':>16}")
    for r in rows:
        print(f"{r['method']:<6} {r['trainable_params']:>12,} {r['optimizer_state_mb']:>9.2f} MB {r['checkpoint_mb']:>8.2f} MB "
              f"{r['peak_memory_mb']:>7.0f} MB {r['tokens_per_s']:>9,.0f} {r['first_val_loss']:>7.3f} -> {r['final_val_loss']:.3f}")
    print(json.dumps({"model": a.model, "device": a.device, "precision": a.precision, "steps": a.steps,
                      "micro_batch": a.micro_batch, "seq_len": a.seq_len, "rank": a.rank, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
