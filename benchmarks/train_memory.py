"""Peak memory of a GPT-2 124M training step on this CPU, per precision, next to `gptforge plan`'s prediction.

Each precision runs in a fresh process: it records the resident set (RSS) after importing torch, then runs
two real training steps of gptforge's loop step (forward_backward + clip + fused AdamW) on the `gpt2` preset,
micro-batch 4 x 256 tokens, and reads the peak RSS (ru_maxrss). The measured figure is the peak minus the
RSS before the model was built, so the Python/torch baseline is not counted; the plan's is its per-device
total for the same settings on `--hardware cpu` (weights + gradients + optimizer + activations + transient).

    python benchmarks/train_memory.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

MICRO_BATCH, SEQ = 4, 256


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(precision: str) -> None:
    import torch

    from gptforge.config import TrainConfig, model_preset
    from gptforge.model import GPT
    from gptforge.optim import build_optimizer
    from gptforge.train import autocast_dtype, forward_backward, next_token_loss

    base = rss_now_bytes()
    cfg = model_preset("gpt2")
    model = GPT(cfg)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    opt = build_optimizer(model, TrainConfig(), "cpu")
    device = torch.device("cpu")
    x = torch.randint(0, cfg.vocab_size, (MICRO_BATCH, SEQ))
    for _ in range(2):
        forward_backward(model, [(x, x)], next_token_loss, device, autocast_dtype(precision, device))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"measured_bytes": peak - base}))


def main() -> None:
    from gptforge.config import model_preset
    from gptforge.hardware import get_hardware
    from gptforge.plan import PlanConfig, memory

    rows = []
    for precision in ("fp32", "bf16", "bf16-pure"):
        out = subprocess.run([sys.executable, __file__, "--one", precision], capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])["measured_bytes"]
        m = memory(PlanConfig(model_preset("gpt2"), seq_len=SEQ, micro_batch=MICRO_BATCH, precision=precision,
                              hardware="cpu"), get_hardware("cpu"))
        predicted = m.peak_allocated
        rows.append({"precision": precision, "measured_gib": measured / 2**30, "plan_gib": predicted / 2**30,
                     "error_pct": 100 * (predicted - measured) / measured})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        one(sys.argv[2])
    else:
        main()
