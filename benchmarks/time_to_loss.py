"""Time to quality: the baseline GPT-2 recipe vs the `speedrun` recipe, to the same validation loss.

Both train on the bundled Shakespeare corpus (38 plays, a 4096-token BPE, the same train/val split and the
same fixed validation windows) through gptforge's one training loop (`gptforge.train.train`), one run after
the other, at the same model size (4 layers, 4 heads, d_model 256, sequences of 256 tokens):

  baseline  GPT-2 architecture (learned positions, LayerNorm, GELU, biases, tied head), AdamW, cosine
  speedrun  the `speedrun` model preset + configs/speedrun.yaml's training recipe (Muon, ...)

For each run it reports the training wall time and the tokens it took to first reach the target val loss
(linearly interpolated between the two evaluations around the crossing), and plots val loss against
training time. The target is the baseline's final val loss unless `--target` is given: the quality the
baseline recipe reaches in its ~10 minutes. Time is the loop's own step time (forward, backward, optimizer), summed from its
metrics.jsonl records, so evaluation and checkpoint writes count for neither run.

`--ablation` adds the fields one at a time on top of the baseline, each run for `--budget` steps, and tabulates
the val loss reached, its change, and tokens/s (the per-token cost of each field).

    python benchmarks/time_to_loss.py                       # baseline then speedrun, ~15 min on 2 quiet cores
    python benchmarks/time_to_loss.py --runs speedrun       # one of them
    python benchmarks/time_to_loss.py --ablation --budget 150 --runs none
Results go to --out (default runs/time_to_loss): results.json, ablation.json, val_loss_vs_time.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(n_layer=4, n_head=4, d_model=256, block_size=256)
BASELINE_STEPS = 600  # the baseline's cosine schedule: about 10 minutes on 2 quiet cores
EVAL_EVERY, LOG_EVERY = 20, 5


def base_train(steps: int):
    from gptforge.config import TrainConfig

    return TrainConfig(
        micro_batch=16, seq_len=256, max_steps=steps, lr=1e-3, min_lr=1e-4, warmup_steps=20, schedule="cosine",
        eval_every=EVAL_EVERY, eval_batches=8, log_every=LOG_EVERY, save_every=10**9, keep_last=1,
        save_best=False, tensorboard=False, precision="fp32", seed=1337,
    )


def baseline_recipe(steps: int = BASELINE_STEPS):
    from gptforge.config import ModelConfig

    return ModelConfig(**SHAPE), base_train(steps)


def speedrun_recipe(steps: int | None = None):
    """The `speedrun` preset and configs/speedrun.yaml's train section (its own step count unless given)."""
    from gptforge.config import model_preset, update_dataclass

    raw = yaml.safe_load((ROOT / "configs" / "speedrun.yaml").read_text())
    tc = update_dataclass(base_train(BASELINE_STEPS), raw["train"], "train.")
    if steps is not None:
        tc = dataclasses.replace(tc, max_steps=steps)
    return model_preset(raw["model"]["preset"]), tc


def ablation_ladder(budget: int):
    """(label, model, train) rows, each adding one change to the row above it; the last rows try, on top
    of the speedrun recipe, fields it leaves off."""
    model, tc = baseline_recipe(budget)
    sr_model, sr_train = speedrun_recipe(budget)
    steps = [
        ("baseline (GPT-2: learned pos, LayerNorm, GELU, bias, tied; AdamW, cosine)", {}, {}),
        ("+ rotary positions", dict(pos_encoding="rotary"), {}),
        ("+ RMSNorm, no biases", dict(norm="rmsnorm", bias=False), {}),
        ("+ ReLU² MLP", dict(mlp="relu2"), {}),
        ("+ QK-norm", dict(qk_norm=True), {}),
        ("+ zero-init projections", dict(zero_init_proj=True), {}),
        ("+ untied head", dict(tie_embeddings=False), {}),
        ("+ Muon (muon_lr, momentum of configs/speedrun.yaml)",
         {}, dict(optimizer="muon", muon_lr=sr_train.muon_lr, muon_momentum=sr_train.muon_momentum,
                  muon_weight_decay=sr_train.muon_weight_decay)),
        ("+ the rest of configs/speedrun.yaml's train section (lr, schedule, batch) = speedrun",
         {}, {k: getattr(sr_train, k) for k in ("lr", "min_lr", "warmup_steps", "schedule", "decay_fraction",
                                                  "micro_batch", "weight_decay")}),
        ("speedrun + logit soft-cap 15 (left out of the preset)", dict(logit_softcap=15.0), {}),
        ("speedrun + value embeddings, 1 table (left out of the preset)", dict(logit_softcap=None, value_embeds=1), {}),
    ]
    rows = []
    for label, m, t in steps:
        model = dataclasses.replace(model, **m)
        tc = dataclasses.replace(tc, **t)
        rows.append((label, model, tc))
    speedrun_row = rows[-3][1]
    assert dataclasses.replace(speedrun_row, vocab_size=sr_model.vocab_size) == sr_model, "ladder drifted from the preset"
    return rows


def prepare_data(out: Path) -> Path:
    from gptforge.data import prepare

    data = out / "data"
    if not (data / "meta.json").is_file():
        prepare(["shakespeare"], data, vocab_size=4096, progress=False)
    return data


def curve(run_dir: Path) -> list[dict]:
    """[{step, seconds, tokens, val_loss}] at each evaluation. The loop logs tokens/s averaged over each log
    window, so a window's step time is (steps in it) x tokens per step / tokens/s; summed, they give the
    training time at every step that was logged (every eval step is: LOG_EVERY divides EVAL_EVERY)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds, last_step, at = 0.0, 0, {0: 0.0}
    step_tokens = None
    for r in records:
        if "loss" in r:
            if step_tokens is None:
                step_tokens = r["tokens"] / r["step"]
            seconds += (r["step"] - last_step) * step_tokens / r["tokens_per_s"]
            last_step = r["step"]
            at[r["step"]] = seconds
    return [{"step": r["step"], "seconds": at[r["step"]], "tokens": int(r["step"] * (step_tokens or 0)),
             "val_loss": r["val_loss"]} for r in records if "val_loss" in r]


def crossing(points: list[dict], target: float) -> dict | None:
    """Seconds and tokens at which val loss first reaches `target`, interpolated between evaluations."""
    for prev, cur in zip(points, points[1:]):
        if cur["val_loss"] <= target:
            f = (prev["val_loss"] - target) / max(prev["val_loss"] - cur["val_loss"], 1e-12)
            return {"seconds": prev["seconds"] + f * (cur["seconds"] - prev["seconds"]),
                    "tokens": int(prev["tokens"] + f * (cur["tokens"] - prev["tokens"])),
                    "step": prev["step"] + f * (cur["step"] - prev["step"])}
    return None


def run_one(name: str, model, tc, data: Path, out: Path, threads: int | None) -> dict:
    import torch

    from gptforge.config import RunConfig
    from gptforge.model import GPT
    from gptforge.train import train

    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    if threads:
        torch.set_num_threads(threads)
    cfg = RunConfig(model=model, train=tc, data=str(data), out=str(run_dir))
    t0 = time.perf_counter()
    res = train(cfg, progress=False)
    points = curve(run_dir)
    step_tokens = tc.micro_batch * (tc.seq_len or model.block_size)
    return {"name": name, "model": dataclasses.asdict(model), "train": dataclasses.asdict(tc),
            "params": GPT(dataclasses.replace(model, vocab_size=4096)).num_params(),
            "steps": res.steps, "train_seconds": res.seconds, "wall_seconds": time.perf_counter() - t0,
            "tokens_per_s": res.steps * step_tokens / res.seconds, "final_val_loss": res.final_val_loss,
            "curve": points}


def plot(results: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_k) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        xs = [p["seconds"] for p in r["curve"]]
        ks = [p["tokens"] / 1e6 for p in r["curve"]]
        ys = [p["val_loss"] for p in r["curve"]]
        ax_t.plot(xs, ys, marker=".", label=r["name"])
        ax_k.plot(ks, ys, marker=".", label=r["name"])
    for ax, xl in ((ax_t, "training time (s)"), (ax_k, "tokens (M)")):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
        ax.set_xlabel(xl)
        ax.set_ylabel("val loss")
        ax.set_ylim(top=min(7.0, max(p["val_loss"] for r in results for p in r["curve"])), bottom=target - 0.6)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("gptforge time to loss: Shakespeare, 4 layers x 256, T=256")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="baseline,speedrun", help="comma-separated: baseline, speedrun (or none)")
    ap.add_argument("--target", type=float, default=None,
                    help="val loss to reach (default: the baseline's final val loss, from this call or results.json)")
    ap.add_argument("--baseline-steps", type=int, default=BASELINE_STEPS, help="the baseline's cosine schedule length")
    ap.add_argument("--speedrun-steps", type=int, default=None, help="override configs/speedrun.yaml's max_steps")
    ap.add_argument("--ablation", action="store_true", help="also run the add-one-field-at-a-time ladder")
    ap.add_argument("--budget", type=int, default=150, help="steps per ablation run (default 150)")
    ap.add_argument("--only", default=None, help="ablation: comma-separated row numbers to run (0-based)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "time_to_loss"))
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out)
    names = [n for n in args.runs.split(",") if n and n != "none"]
    recipes = {"baseline": lambda: baseline_recipe(args.baseline_steps),
               "speedrun": lambda: speedrun_recipe(args.speedrun_steps)}
    results = []
    for name in names:
        if name not in recipes:
            sys.exit(f"unknown run {name!r}; choose from baseline, speedrun")
        model, tc = recipes[name]()
        r = run_one(name, model, tc, data, out, args.threads)
        results.append(r)
        print(f"{name}: {r['steps']} steps, {r['train_seconds']:.0f} s, {r['tokens_per_s']:.0f} tok/s, final val "
              f"{r['final_val_loss']:.4f}", flush=True)
    if results:
        # Runs of other names from an earlier call into the same --out are kept, so `--runs speedrun` after a
        # baseline run compares against it.
        previous = out / "results.json"
        if previous.is_file():
            results[:0] = [r for r in json.loads(previous.read_text())["runs"] if r["name"] not in names]
        base = next((r for r in results if r["name"] == "baseline"), None)
        target = args.target if args.target is not None else base and base["final_val_loss"]
        if target is None:
            sys.exit("no --target and no baseline run to take it from; run the baseline first or give --target")
        for r in results:
            r["to_target"] = hit = crossing(r["curve"], target)
            print(f"{r['name']} to val loss {target:.4f}: "
                  + (f"{hit['seconds']:.0f} s, {hit['tokens'] / 1e6:.2f}M tokens" if hit else "not reached"))
        args.target = target
        summary = {"target": target, "runs": results}
        by = {r["name"]: r for r in results}
        if {"baseline", "speedrun"} <= by.keys() and by["baseline"]["to_target"] and by["speedrun"]["to_target"]:
            b, s = by["baseline"]["to_target"], by["speedrun"]["to_target"]
            summary["speedrun_over_baseline"] = {"time": s["seconds"] / b["seconds"], "tokens": s["tokens"] / b["tokens"]}
            print(f"speedrun / baseline to val loss {args.target:.4f}: time {s['seconds'] / b['seconds']:.2f}x, "
                  f"tokens {s['tokens'] / b['tokens']:.2f}x")
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        plot(results, args.target, out / "val_loss_vs_time.png")
        print(f"wrote {out / 'results.json'} and {out / 'val_loss_vs_time.png'}")

    if args.ablation:
        rows = ablation_ladder(args.budget)
        only = None if args.only is None else {int(i) for i in args.only.split(",")}
        table, prev = [], None
        for i, (label, model, tc) in enumerate(rows):
            if only is not None and i not in only:
                continue
            r = run_one(f"ablation-{i:02d}", model, tc, data, out, args.threads)
            row = {"row": i, "change": label, "val_loss": r["final_val_loss"], "tokens_per_s": r["tokens_per_s"],
                   "train_seconds": r["train_seconds"], "steps": r["steps"], "curve": r["curve"]}
            row["delta"] = None if prev is None else row["val_loss"] - prev["val_loss"]
            row["tokens_per_s_ratio"] = None if prev is None else row["tokens_per_s"] / prev["tokens_per_s"]
            table.append(row)
            prev = row
            print(f"[{i}] {label}: val {row['val_loss']:.4f}"
                  + ("" if row["delta"] is None else f" ({row['delta']:+.4f})")
                  + f", {row['tokens_per_s']:.0f} tok/s", flush=True)
        (out / "ablation.json").write_text(json.dumps({"budget_steps": args.budget, "rows": table}, indent=1))
        print(f"\n| # | change | val loss after {args.budget} steps | Δ | tokens/s | tokens/s vs row above |")
        print("|---|---|---|---|---|---|")
        for row in table:
            d = "" if row["delta"] is None else f"{row['delta']:+.3f}"
            t = "" if row["tokens_per_s_ratio"] is None else f"{row['tokens_per_s_ratio']:.2f}x"
            print(f"| {row['row']} | {row['change']} | {row['val_loss']:.3f} | {d} | {row['tokens_per_s']:.0f} | {t} |")


if __name__ == "__main__":
    main()
