"""Compression on a model trained here: quality (Δ perplexity, KL, agreement), file size and CPU decode speed.

    python benchmarks/compress.py --work /tmp/compress-bench          # everything (~12 min on 2 shared cores)
    python benchmarks/compress.py --work /tmp/compress-bench --speed-only   # decode speed only (~6 min)
    python benchmarks/compress.py --speed-only --only gpt2-structured       # one speed group (small, gpt2, gpt2-structured)
    python benchmarks/compress.py --work /tmp/compress-bench --only trained-gpt2   # the 86M trained parent (~12 min)
    python benchmarks/compress.py --work /tmp/compress-bench --only trained-gpt2 --speed-only   # re-time it (~2 min)
    python benchmarks/compress.py --worker CKPT                       # one decode measurement, one JSON line

The parent: 4 layers, d 128, 4 heads, rotary, RMSNorm, a 1024-token BPE of the bundled Shakespeare, 0.92M
parameters, trained 600 steps x 2048 tokens (~2.5 min, one thread). Quality is measured with `gptforge eval`'s
function on 64 x 8 x 128 = 65,536 held-out tokens. Speed: greedy batch-1 decode of 128 tokens through
`gptforge.generate` (one thread; tokens after the first over the time after the first, so prefill is out), each variant in its own process, alternating A B A B (benchmarks/alternate.py),
medians of 3. A `gpt2`-shaped model (124M, random weights: speed does not depend on the values) is timed the
same way for int8/int4 and for structured 30%/50% pruning, where the weights no longer fit in cache; the
structured rows are timed again with the parent's 1024-token vocabulary, whose head does not dominate.
Distillation: a student with ~1/4 of the parent's parameters trained on the same tokens from scratch and with
KD (T=2, 0.5 KL + 0.5 CE); both val-loss curves (cross-entropy) go to distill_curves.png.

`--only trained-gpt2` (run only when named; results under "trained_gpt2" in results-trained-gpt2.json): the #7
rows on a parent that is trained here AND bandwidth-bound, unlike the 0.92M one. The `gpt2` preset's blocks
(12 layers, 12 heads, d 768, learned positions, LayerNorm, GELU) with the same 1024-token BPE and block_size
128: 85.9M parameters, 344 MB fp32, more than this CPU's caches, so a decoded token is paid in DRAM reads.
Trained 200 steps x 4 x 128 = 102,400 tokens (lr 6e-4, 20 warmup steps, cosine, 2 threads, ~7 min on a
2-core CPU): far under-trained (val loss 4.88 against the small parent's 3.78), which is fine for speed
and still a real trained weight distribution for quality. Then int8, int4 g32, structured 30% before and after
80 recovery steps (~2 min); quality on 16 x 8 x 128 = 16,384 held-out tokens (two threads; skipped with
--speed-only); decode speed of fp32 / int8 / int4-g32 / structured-30-recovered, 32 tokens, one thread, each
in its own process through `gptforge.load` (the fp32 parent gets the native fp32 GEMV, checked and recorded
as fp32_native_kernel), alternating, medians of 3. Checkpoints already in WORK/gpt2-* are reused, so a
second run only re-times (and, without --speed-only, re-evaluates).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from alternate import alternate  # noqa: E402

TEACHER = dict(n_layer=4, n_head=4, d_model=128, block_size=128, pos_encoding="rotary", norm="rmsnorm", bias=False)
STUDENT = dict(TEACHER, n_layer=2, d_model=80)  # 0.26x the teacher's parameters (235,920 vs 918,656)
TRAIN = dict(micro_batch=16, seq_len=128, lr=2e-3, min_lr=2e-4, warmup_steps=20, max_steps=600, eval_every=100,
             eval_batches=16, tensorboard=False, save_every=100_000, keep_last=1, threads=1)
DECODE_TOKENS = 128
SPEED_GROUPS = ("small", "gpt2", "gpt2-structured")  # the alternation groups of the speed section (--only)
TRAINED_GPT2 = "trained-gpt2"  # the bandwidth-bound trained parent's group (--only trained-gpt2)
GROUPS = (*SPEED_GROUPS, TRAINED_GPT2)
# The trained gpt2-shaped parent: the `gpt2` preset's blocks (learned positions, LayerNorm, GELU, biases) with
# the benchmark's 1024-token BPE; block_size = seq_len so that eval and decode stay in trained positions.
GPT2_SEQ = 128
# 200 steps x 512 tokens = 102,400 tokens: ~7 min at ~250 tokens/s (2 threads, measured on the CI CPU).
GPT2_TRAIN = dict(micro_batch=4, seq_len=GPT2_SEQ, lr=6e-4, min_lr=6e-5, warmup_steps=20, max_steps=200,
                  eval_every=100, eval_batches=8, tensorboard=False, save_every=100_000, keep_last=1, threads=2)
GPT2_RECOVER_STEPS = 80  # structured 30% recovery: ~2 min at the parent's batch (0.7x its compute per step)
GPT2_EVAL = dict(batches=16, batch_size=8)  # 16,384 held-out tokens: 5 forward passes of an 86M model, bounded
GPT2_DECODE_TOKENS = 32


def worker(ckpt: str, tokens: int, threads: int = 1) -> None:
    """Decode tokens/s of one checkpoint in this process, or of a random gpt2-shaped model: `gpt2:METHOD`
    (METHOD fp32, int8, int4 or structuredNN, NN% structured pruning by weight magnitude) with GPT-2's 50257
    vocabulary, `gpt2-v1024:METHOD` with the parent's 1024-token one (the same blocks, a 0.8M-weight head)."""
    torch.set_num_threads(threads)
    from gptforge.compress.evaluate import decode_speed

    if ckpt.startswith(("gpt2:", "gpt2-v1024:")):
        import dataclasses

        from gptforge.compress.prune import shrink, structured_plan
        from gptforge.compress.quantize import quantize_model
        from gptforge.config import model_preset
        from gptforge.native import decode_layout
        from gptforge.model import GPT

        shape, method = ckpt.split(":")
        vocab = 1024 if shape == "gpt2-v1024" else 50257
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(model_preset("gpt2"), vocab_size=vocab)).eval()
        if method.startswith("structured"):  # random weights: magnitude is as good an importance as any for speed
            model = decode_layout(shrink(model, structured_plan(model, int(method[len("structured"):]) / 100)))
        elif method == "fp32":
            model = decode_layout(model)
        else:
            model = quantize_model(model, method, 32 if method == "int4" else None)[0]
    else:
        from gptforge.generate import load

        model, tok = load(ckpt, device="cpu")
        vocab = tok.vocab_size
    speeds = [decode_speed(model, vocab, tokens) for _ in range(3)]
    print(json.dumps({"tokens_per_s": statistics.median(speeds)}))


def run(work: Path, speed_only: bool = False, threads: int = 1, only: tuple[str, ...] = SPEED_GROUPS) -> dict:
    """The groups in `only`: the small parent's run and its speed groups (SPEED_GROUPS), then trained-gpt2."""
    torch.set_num_threads(1)
    t_start = time.time()
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"timings_s": {}}

    def mark(name):
        out["timings_s"][name] = round(time.time() - t_start)
        print(f"[{out['timings_s'][name]:5d} s] {name}", file=sys.stderr, flush=True)

    if speed := tuple(g for g in only if g in SPEED_GROUPS):
        _small_parent(work, out, mark, speed_only, threads, speed)
    if TRAINED_GPT2 in only:
        _trained_gpt2(work, out, mark, speed_only, threads)
    return out


def _data(work: Path) -> Path:
    """The 1024-token BPE of the bundled Shakespeare, prepared once per work folder and shared by both parents."""
    from gptforge.data import prepare

    data = work / "data"
    if not (data / "meta.json").is_file():
        prepare(["shakespeare"], data, vocab_size=1024, progress=False)
    return data


def _small_parent(work: Path, out: dict, mark, speed_only: bool, threads: int, only: tuple[str, ...]) -> dict:
    from gptforge.compress.distill import DistillConfig, distill
    from gptforge.compress.evaluate import eval_checkpoints
    from gptforge.compress.run import prune_checkpoint, quantize_checkpoint
    from gptforge.config import ModelConfig, RunConfig, TrainConfig
    from gptforge.train import train

    if speed_only and "small" not in only:  # the gpt2-shaped rows build their own random models
        return _speed(work, out, mark, threads, only)
    data = _data(work)
    tc = TrainConfig(**TRAIN)
    teacher = work / "teacher"
    if not (teacher / "checkpoints").is_dir():
        train(RunConfig(model=ModelConfig(**TEACHER, vocab_size=1024), train=tc, data=str(data), out=str(teacher)),
              progress=False)
    mark("teacher ready")
    variants = {"int8": ("int8", None), "int4-g32": ("int4", 32), "int4-g64": ("int4", 64),
                "int4-g128": ("int4", 128), "bf16": ("bf16", None)}
    for name, (method, g) in variants.items():
        quantize_checkpoint(str(teacher), method, str(work / name), g)
    if speed_only:
        if not (work / "structured-30-recovered").is_dir():
            prune_checkpoint(str(teacher), "structured", str(work / "structured-30-recovered"), 0.3, data=str(data),
                             recover_steps=200, progress=False)
        return _speed(work, out, mark, threads, only)
    prune_runs = {"magnitude-50": dict(method="magnitude", sparsity=0.5), "wanda-50": dict(method="wanda", sparsity=0.5),
                  "magnitude-2:4": dict(method="magnitude", pattern="2:4"), "wanda-2:4": dict(method="wanda", pattern="2:4"),
                  "structured-30": dict(method="structured", sparsity=0.3)}
    for name, kw in prune_runs.items():
        prune_checkpoint(str(teacher), out=str(work / name), data=str(data), progress=False, **kw)
    prune_checkpoint(str(teacher), "structured", str(work / "structured-30-recovered"), 0.3, data=str(data),
                     recover_steps=200, progress=False)
    mark("compressed")
    names = ["teacher", *variants, *prune_runs, "structured-30-recovered"]
    rows = eval_checkpoints([str(work / n) for n in names], str(data), batches=64, batch_size=8, decode_tokens=0)
    out["quality"] = {n: {k: r[k] for k in ("params", "file_bytes", "val_loss", "perplexity", "delta_ppl_pct",
                                             "mean_kl", "top1_agreement_pct")} for n, r in zip(names, rows)}
    mark("quality")

    # Distillation: same student shape, same tokens, KD vs from scratch.
    scfg = RunConfig(model=ModelConfig(**STUDENT, vocab_size=1024), train=tc, data=str(data))
    scratch = train(dataclasses.replace(scfg, out=str(work / "student-scratch")), progress=False)
    kd = distill(dataclasses.replace(scfg, out=str(work / "student-kd")), str(teacher), DistillConfig(), progress=False)
    out["distill"] = {"teacher_params": out["quality"]["teacher"]["params"],
                      "student_params": ModelConfig(**STUDENT, vocab_size=1024).num_params(),
                      "tokens": scratch.tokens, "scratch_val_loss": scratch.final_val_loss, "kd_val_loss": kd.final_val_loss,
                      "teacher_val_loss": out["quality"]["teacher"]["val_loss"]}
    _plot_curves(work, {"from scratch": work / "student-scratch", "distilled (KD)": work / "student-kd"},
                 work / "distill_curves.png")
    mark("distill")
    return _speed(work, out, mark, threads, only)


def _speed(work: Path, out: dict, mark, threads: int = 1, only: tuple[str, ...] = SPEED_GROUPS) -> dict:
    me = [sys.executable, __file__, "--threads", str(threads), "--worker"]
    if "small" in only:
        small = {n: me + [str(work / n)] for n in ("teacher", "int8", "int4-g32", "structured-30-recovered")}
        out["speed_small"] = alternate(small, "tokens_per_s", rounds=3)
        mark("speed small")
    if "gpt2" in only:
        big = {m: me + [f"gpt2:{m}", "--tokens", "16"] for m in ("fp32", "int8", "int4")}
        out["speed_gpt2"] = alternate(big, "tokens_per_s", rounds=3)
        mark("speed gpt2")
    if "gpt2-structured" in only:
        # Structured pruning leaves the embedding/head alone: with GPT-2's vocabulary the tied head is 38.6M of
        # the 124M weights read per token, which caps 30% at ~1.27x (docs/compress.md); the 1024-token variant
        # (the parent's tokenizer) shows the blocks' own speedup. Each has its own fp32 baseline.
        spec = [f"{shape}:{m}" for shape in ("gpt2", "gpt2-v1024") for m in ("fp32", "structured30", "structured50")]
        out["speed_gpt2_structured"] = alternate({n: me + [n, "--tokens", "16"] for n in spec}, "tokens_per_s", rounds=3)
        mark("speed gpt2 structured")
    return out


def _trained_gpt2(work: Path, out: dict, mark, speed_only: bool, threads: int) -> dict:
    """The #7 rows on a bandwidth-bound parent trained here: `gpt2` blocks, 1024-token BPE, 86M parameters
    (344 MB fp32, above this CPU's caches). Every checkpoint already in WORK/gpt2-* is reused, so a second
    run only re-times (and, without --speed-only, re-evaluates)."""
    from gptforge import native
    from gptforge.checkpoint import MODEL_FILE, read_config, resolve_checkpoint
    from gptforge.compress.evaluate import eval_checkpoints
    from gptforge.compress.run import prune_checkpoint, quantize_checkpoint
    from gptforge.config import RunConfig, TrainConfig, model_preset
    from gptforge.generate import load
    from gptforge.train import train

    data = _data(work)
    tc = TrainConfig(**GPT2_TRAIN)
    model_cfg = dataclasses.replace(model_preset("gpt2"), vocab_size=1024, block_size=GPT2_SEQ)
    parent = work / "gpt2-parent"
    res: dict = {"model": dataclasses.asdict(model_cfg), "params": model_cfg.num_params(),
                 "train": {"steps": tc.max_steps, "tokens": tc.max_steps * tc.micro_batch * GPT2_SEQ,
                           "threads": tc.threads}}
    out["trained_gpt2"] = res
    if not (parent / "checkpoints" / f"step-{tc.max_steps:08d}" / MODEL_FILE).is_file():
        result = train(RunConfig(model=model_cfg, train=tc, data=str(data), out=str(parent)), progress=False)
        res["train"]["seconds"] = round(result.seconds)  # absent when the parent was reused
    vals = [json.loads(line) for line in (parent / "metrics.jsonl").read_text().splitlines()]
    res["train"]["val_loss"] = [(r["step"], r["val_loss"]) for r in vals if "val_loss" in r]
    mark("gpt2 parent ready")

    ckpts = {"fp32": parent, **{n: work / f"gpt2-{n}" for n in ("int8", "int4-g32", "structured-30",
                                                               "structured-30-recovered")}}
    for name, (method, g) in {"int8": ("int8", None), "int4-g32": ("int4", 32)}.items():
        if not (ckpts[name] / MODEL_FILE).is_file():
            quantize_checkpoint(str(parent), method, str(ckpts[name]), g)
    if not (ckpts["structured-30"] / MODEL_FILE).is_file():
        prune_checkpoint(str(parent), "structured", str(ckpts["structured-30"]), 0.3, data=str(data), progress=False)
    rec = ckpts["structured-30-recovered"]
    # prune_checkpoint writes the pruned model to OUT before recovering into it: only a recovered config counts.
    if not ((rec / MODEL_FILE).is_file()
            and read_config(rec).compression.pruning.recover_steps == GPT2_RECOVER_STEPS):
        t0 = time.time()
        prune_checkpoint(str(parent), "structured", str(rec), 0.3, data=str(data), recover_steps=GPT2_RECOVER_STEPS,
                         progress=False)
        res["recover_seconds"] = round(time.time() - t0)
    res["recover_steps"] = GPT2_RECOVER_STEPS
    mark("gpt2 compressed")

    # The worker's load path must give the fp32 parent the native fp32 GEMV; otherwise "vs fp32" would compare
    # against PyTorch's GEMM.
    model, _ = load(str(resolve_checkpoint(parent)), device="cpu")
    res["fp32_native_kernel"] = all(isinstance(m, native.DecodeLinear)
                                    for m in model.modules() if isinstance(m, torch.nn.Linear))
    del model

    if not speed_only:
        torch.set_num_threads(tc.threads)  # 5 forwards of an 86M model over 16k tokens: use both cores
        rows = eval_checkpoints([str(ckpts[n]) for n in ckpts], str(data), decode_tokens=0, **GPT2_EVAL)
        torch.set_num_threads(1)
        res["quality"] = {n: {k: r[k] for k in ("params", "file_bytes", "val_loss", "perplexity", "delta_ppl_pct",
                                                 "mean_kl", "top1_agreement_pct", "eval_tokens")}
                          for n, r in zip(ckpts, rows)}
        mark("gpt2 quality")

    me = [sys.executable, __file__, "--threads", str(threads), "--tokens", str(GPT2_DECODE_TOKENS), "--worker"]
    timed = ("fp32", "int8", "int4-g32", "structured-30-recovered")
    res["speed"] = alternate({n: me + [str(ckpts[n])] for n in timed}, "tokens_per_s", rounds=3)
    res["speed_vs_fp32"] = {n: res["speed"][n]["median"] / res["speed"]["fp32"]["median"] for n in timed}
    mark("speed trained gpt2")
    return out


def _plot_curves(work: Path, runs: dict[str, Path], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run_dir in runs.items():
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        pts = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("step (2048 tokens each)")
    ax.set_ylabel("val cross-entropy")
    ax.set_title("student (0.26x params): KD vs from scratch, same tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/compress-bench", help="folder for data, checkpoints and results")
    ap.add_argument("--worker", help="measure one checkpoint's decode speed and print one JSON line")
    ap.add_argument("--tokens", type=int, default=DECODE_TOKENS, help="tokens to decode per measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each decode-speed process (default 1)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only the decode-speed comparisons (trains/quantizes what they need if missing)")
    ap.add_argument("--only", default=",".join(SPEED_GROUPS),
                    help=f"comma-separated groups, of {', '.join(GROUPS)} (default: the small parent's run, "
                         f"{', '.join(SPEED_GROUPS)}); a subset of those needs --speed-only; {TRAINED_GPT2} runs "
                         "only when named, with or without --speed-only")
    args = ap.parse_args()
    only = tuple(g.strip() for g in args.only.split(",") if g.strip())
    if unknown := sorted(set(only) - set(GROUPS)):
        ap.error(f"unknown --only group(s) {', '.join(unknown)}; use {', '.join(GROUPS)}")
    speed = set(only) & set(SPEED_GROUPS)
    if speed and speed != set(SPEED_GROUPS) and not args.speed_only:
        ap.error(f"--only {', '.join(sorted(speed))} applies to --speed-only runs (the small parent's full run "
                 f"times all of {', '.join(SPEED_GROUPS)})")
    if args.worker:
        worker(args.worker, args.tokens, args.threads)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    res = run(Path(args.work), args.speed_only, args.threads, only)
    name = "results.json" if set(only) == set(SPEED_GROUPS) else f"results-{'-'.join(only)}.json"  # keep the full run's
    (Path(args.work) / name).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
