"""Built-in task scoring (`gptforge eval --task`) vs lm-evaluation-harness through `gptforge serve`, on one
checkpoint and one task (shakespeare-next-line, written out as an lm-eval YAML task over a jsonl file).

1. Agreement: acc and acc_norm of both on the same examples (same normalisation: lm-eval's, per character of
   the choice), and the largest difference between lm-eval's per-request log-likelihoods (read off the server's
   `echo` logprobs) and the built-in `eval.loglikelihoods` of the same (context, continuation) pairs.
2. Throughput: examples per second of the built-in scorer (model in this process, batched forward) and of
   lm-eval's local-completions model against a real server (requests of `--lm-eval-batch` prompts, the server
   batching them through one forward), both timed in this run, alternating A B A B (`--rounds` each), median
   quoted. Both per wall second and per CPU second: lm-eval's CPU is its client's (this process) plus the
   server process's, so that on a shared machine, where two processes get more of the cores than one, the
   comparison is of work done. lm-eval is timed around `simple_evaluate` only (its import and the tokenizer
   load are left out).
3. The shipped task on an untrained model (same config, seeded init, as the demo does) and on the checkpoint,
   with chance.

    python benchmarks/eval.py runs/demo/run --limit 200 --out eval.json

Needs the eval extra (lm-eval[api]); set threads with --threads (the server gets the same number).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from gptforge import eval as ev
from gptforge.checkpoint import resolve_checkpoint
from gptforge.loader import load_checkpoint
from gptforge.model import GPT

TASK_YAML = """task: gf_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def start_server(ckpt: str, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", ckpt, "--port", "0", "--threads", str(threads),
                             "--model-name", "bench"], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", proc.stdout.readline())
    if not m:
        raise SystemExit(f"server did not start: {log.read_text()}")
    for _ in range(200):
        try:
            if httpx.get(m[1] + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    return proc, m[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lm_eval_run(url: str, ckpt: str, include: Path, batch: int) -> tuple[dict, float]:
    """lm-eval's local-completions model against the server: (results with samples, seconds of simple_evaluate)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    lm = get_model("local-completions")(model="bench", base_url=f"{url}/v1/completions", tokenizer_backend="huggingface",
                                         tokenizer=ckpt, batch_size=batch, max_retries=1)
    tm = TaskManager(include_path=str(include))
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=["gf_next_line"], task_manager=tm, log_samples=True)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--limit", type=int, default=200, help="examples of the task (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each, alternating (default 3)")
    ap.add_argument("--lm-eval-batch", type=int, default=16, help="prompts per lm-eval request (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in the server (default 1)")
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    ckpt = str(resolve_checkpoint(args.checkpoint))  # a run folder's latest checkpoint: lm-eval reads its tokenizer
    model, tok, cfg = load_checkpoint(ckpt)
    task = ev.shakespeare_next_line()
    task.examples = task.examples[:args.limit]
    tmp = Path(tempfile.mkdtemp(prefix="gptforge-eval-bench-"))
    data = tmp / "next_line.jsonl"
    data.write_text("".join(json.dumps({"query": e.context, "choices": e.choices, "gold": e.gold}) + "\n"
                            for e in task.examples))
    (tmp / "next_line.yaml").write_text(TASK_YAML.format(data=data))
    proc, url = start_server(ckpt, args.threads, tmp / "server.log")
    try:
        built_in_s, lm_s, built_cpu, lm_cpu, built, theirs = [], [], [], [], None, None
        for _ in range(args.rounds):  # A B A B ...
            t0, c0 = time.perf_counter(), time.process_time()
            built = ev.evaluate_task(model, tok, task, block_size=cfg.model.block_size)
            built_in_s.append(time.perf_counter() - t0)
            built_cpu.append(time.process_time() - c0)
            c0, s0 = time.process_time(), cpu_seconds(proc.pid)
            theirs, sec = lm_eval_run(url, ckpt, tmp, args.lm_eval_batch)
            lm_s.append(sec)
            lm_cpu.append(time.process_time() - c0 + cpu_seconds(proc.pid) - s0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    res = theirs["results"]["gf_next_line"]
    reqs, lm_lls = [], []
    for s in theirs["samples"]["gf_next_line"]:
        for k, choice in enumerate(s["doc"]["choices"]):
            reqs.append(ev.encode_pair(tok, s["doc"]["query"], choice))
            lm_lls.append(float(s["resps"][k][0][0]))
    ours = ev.loglikelihoods(model, reqs, vocab_size=tok.vocab_size, block_size=cfg.model.block_size)
    max_ll_diff = max(abs(a - b) for (a, _), b in zip(ours, lm_lls))

    torch.manual_seed(1337)  # the demo's train seed: the untrained model it reports
    untrained = ev.evaluate_task(GPT(cfg.model).eval(), tok, ev.shakespeare_next_line(), block_size=cfg.model.block_size)
    trained = ev.evaluate_task(model, tok, ev.shakespeare_next_line(), block_size=cfg.model.block_size)
    n = len(task.examples)
    out = {
        "checkpoint": ckpt, "examples": n, "threads": args.threads, "lm_eval_batch": args.lm_eval_batch,
        "built_in": {"acc": built.metrics["acc"], "acc_norm": built.metrics["acc_norm"],
                     "seconds": built_in_s, "examples_per_s": n / statistics.median(built_in_s),
                     "cpu_seconds": built_cpu, "examples_per_cpu_s": n / statistics.median(built_cpu)},
        "lm_eval": {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"],
                    "seconds": lm_s, "examples_per_s": n / statistics.median(lm_s),
                    "cpu_seconds": lm_cpu, "examples_per_cpu_s": n / statistics.median(lm_cpu)},
        "max_abs_loglikelihood_diff": max_ll_diff, "requests_compared": len(reqs),
        "speedup_wall": statistics.median(lm_s) / statistics.median(built_in_s),
        "speedup_cpu": statistics.median(lm_cpu) / statistics.median(built_cpu),
        "shipped_task": {"examples": trained.examples, "chance": untrained.chance,
                         "untrained_acc_norm": untrained.score, "trained_acc_norm": trained.score,
                         "untrained_acc": untrained.metrics["acc"], "trained_acc": trained.metrics["acc"]},
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
