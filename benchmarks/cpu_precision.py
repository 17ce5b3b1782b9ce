"""Training-step throughput of the `shakespeare` preset on this CPU: fp32 vs bf16 autocast.

Same model, same batch (16 x 256 tokens of the bundled corpus), same optimizer; each process warms up for 2
steps then times 5; processes alternate fp32, bf16, fp32, ... (3 each) and the median tokens/s is quoted.

    python benchmarks/cpu_precision.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def one_run(dtype: str) -> None:
    import torch

    from gptforge.config import TrainConfig, model_preset
    from gptforge.model import GPT
    from gptforge.optim import build_optimizer
    from gptforge.precision import resolve_bf16_gemm, widen_bf16
    from gptforge.train import autocast, next_token_loss

    torch.manual_seed(0)
    cfg = model_preset("shakespeare")
    model = GPT(cfg)
    opt = build_optimizer(model, TrainConfig(), "cpu")
    x = torch.randint(0, cfg.vocab_size, (16, 256))
    y = torch.randint(0, cfg.vocab_size, (16, 256))
    amp = torch.bfloat16 if dtype == "bf16" else None
    if amp is not None and resolve_bf16_gemm("auto", "bf16", torch.device("cpu")) == "widened":
        widen_bf16(model)  # as train builds it with train.bf16_gemm auto
    times = []
    for i in range(7):
        t0 = time.perf_counter()
        with autocast(torch.device("cpu"), amp):
            loss, n = next_token_loss(model, x, y)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    print(json.dumps({"tokens_per_s": 16 * 256 / step, "ms_per_step": step * 1000,
                      "flops_per_s": cfg.flops_per_token(256) * 16 * 256 / step}))


def main() -> None:
    from alternate import alternate

    me = [sys.executable, __file__, "--one"]
    res = alternate({"fp32": me + ["fp32"], "bf16": me + ["bf16"]}, "tokens_per_s")
    res["bf16_over_fp32"] = res["bf16"]["median"] / res["fp32"]["median"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one_run(sys.argv[2])
    else:
        main()
