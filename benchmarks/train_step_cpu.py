"""Process CPU time (and wall time) per step of the training loop itself, `gptforge.train.train`, one thread: for
A/B comparisons of the loop's code (train.py) on a shared machine, where other jobs swing wall time but disturb
a process's own CPU time far less. benchmarks/train_throughput.py times the step's parts (forward_backward,
clip, optimizer) outside the loop, so it does not see the loop's own code.

    python benchmarks/train_step_cpu.py ab BASE_SRC [NEW_SRC] [--rounds 3]   # A = BASE_SRC (a worktree's src/),
                                                                            # B = NEW_SRC, default this tree's src/
    python benchmarks/train_step_cpu.py run DATA [preset] [steps]  # one process: one JSON line

`ab` prepares the bundled Shakespeare once (a 4096-token BPE, the `shakespeare` preset's vocabulary), then
alternates A B A B ... processes for each case and prints the medians and B/A ratios:
  shakespeare: the demo's model (4 layers, d 256, RoPE, RMSNorm), micro-batch 4 x 128 tokens, 20 timed steps;
  tiny: the tests' 2-layer d-64 model, micro-batch 4 x 32 tokens, 200 timed steps (the loop's own overhead shows).
A step is timed from one metrics record to the next (train.log_every 1): train_step, the log record, the stop
decision and the loop around them; evaluation and checkpoints fall outside the timed steps (only at the end).
Reported: the median over steps, and the mean (total over the timed steps / steps).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"shakespeare": dict(micro_batch=4, seq_len=128, steps=20), "tiny": dict(micro_batch=4, seq_len=32, steps=200)}
WARMUP = 3


def run(data: str, preset: str, steps: int) -> dict:
    import gptforge.train as T
    from gptforge.config import RunConfig, TrainConfig, model_preset

    marks: list[tuple[float, float]] = []
    log = T.Metrics.log

    def timed_log(self, step, **scalars):
        if "loss" in scalars:
            marks.append((time.process_time(), time.perf_counter()))
        log(self, step, **scalars)

    T.Metrics.log = timed_log
    case = CASES[preset]
    tc = TrainConfig(micro_batch=case["micro_batch"], seq_len=case["seq_len"], max_steps=WARMUP + steps,
                     warmup_steps=2, eval_every=10**9, eval_batches=1, log_every=1, save_every=10**9,
                     threads=1, tensorboard=False, seed=0)
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(model=model_preset(preset), train=tc, data=data, out=str(Path(out) / "run"))
        result = T.train(cfg, progress=False)
    cpu = [b[0] - a[0] for a, b in zip(marks[WARMUP - 1:], marks[WARMUP:])]
    wall = [b[1] - a[1] for a, b in zip(marks[WARMUP - 1:], marks[WARMUP:])]
    return {"cpu_ms": 1e3 * statistics.median(cpu), "wall_ms": 1e3 * statistics.median(wall),
            "cpu_ms_mean": 1e3 * sum(cpu) / len(cpu), "wall_ms_mean": 1e3 * sum(wall) / len(wall),
            "steps": result.steps, "train_py": T.__file__}


def measure(src: str, data: str, preset: str) -> dict:
    cmd = ["env", f"PYTHONPATH={src}", sys.executable, __file__, "run", data, preset, str(CASES[preset]["steps"])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ab(base_src: str, new_src: str | None, rounds: int) -> None:
    from gptforge.data import prepare

    new_src = new_src or str(Path(__file__).resolve().parents[1] / "src")
    sides = {"A": str(Path(base_src).resolve()), "B": str(Path(new_src).resolve())}
    report = {}
    with tempfile.TemporaryDirectory() as data:
        prepare(["shakespeare"], data, vocab_size=4096, progress=False)
        for preset in CASES:
            runs: dict[str, list[dict]] = {"A": [], "B": []}
            for r in range(rounds):
                for side, src in sides.items():
                    res = measure(src, data, preset)
                    assert res["train_py"].startswith(src), (res["train_py"], src)
                    runs[side].append(res)
                    print(f"{preset} round {r + 1} {side}: cpu {res['cpu_ms']:.2f} ms/step, wall {res['wall_ms']:.2f}",
                          file=sys.stderr, flush=True)
            med = {side: {k: statistics.median(x[k] for x in rs) for k in ("cpu_ms", "wall_ms", "cpu_ms_mean", "wall_ms_mean")}
                   for side, rs in runs.items()}
            report[preset] = {"A": med["A"], "B": med["B"],
                              "B/A": {k: med["B"][k] / med["A"][k] for k in med["A"]},
                              "runs": {side: [round(x["cpu_ms"], 3) for x in rs] for side, rs in runs.items()}}
    print(json.dumps({"A": sides["A"], "B": sides["B"], "rounds": rounds, "cases": report}, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        print(json.dumps(run(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "shakespeare",
                             int(sys.argv[4]) if len(sys.argv) > 4 else CASES["shakespeare"]["steps"])))
    elif sys.argv[1:2] == ["ab"]:
        rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
        ab(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 and not sys.argv[3].startswith("--") else None, rounds)
    else:
        print(__doc__)
