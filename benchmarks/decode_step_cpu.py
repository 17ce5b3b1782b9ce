"""Process CPU time (and wall time) per decode step, one thread: for A/B comparisons of the decode policy on a
shared machine, where other jobs swing wall time by 2x but disturb a process's own CPU time far less.

    PYTHONPATH=/tmp/base/src python benchmarks/decode_step_cpu.py static demo 1 0     # A
    PYTHONPATH=src          python benchmarks/decode_step_cpu.py static demo 1 0     # B, alternate A B A B ...
    python benchmarks/decode_step_cpu.py engine demo 8 0.8

static: `generate_steps` on a batch of 64-token prompts, (t(65 tokens) - t(1 token)) / 64, min of 7 repeats.
engine: `BatchEngine.step` with `batch` sequences of 32-token prompts, 48 steps, min of 5 repeats.
shape: demo (the `shakespeare` preset) or tiny (1 layer, d 16, vocab 4096: the policy's own cost dominates).
temperature > 0 adds top-p 0.95. One JSON line: wall_ms and cpu_ms per step. Runs against trees from before
the decode policy's split too (generate.py then held BatchEngine and decode_layout), for the A side.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from gptforge import generate as G
from gptforge.config import ModelConfig, model_preset
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer

try:  # this tree
    from gptforge.engine import BatchEngine
    from gptforge.native import decode_layout
    from gptforge.sampling import SamplingParams
except ImportError:  # a tree from before the split (the A side of an A/B)
    BatchEngine, SamplingParams, decode_layout = G.BatchEngine, G.SamplingParams, G.decode_layout


def clock(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def params(n: int, temperature: float, seed: int = 0) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=temperature, top_p=0.95 if temperature else 1.0, seed=seed,
                          stop_at_eos=False)


def static_step(model, batch: int, temperature: float) -> list[tuple[float, float]]:
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab - 64, (batch, 64)).tolist()

    def run(n):
        assert sum(1 for _ in G.generate_steps(model, x, params(n, temperature), vocab_size=vocab)) == n

    run(4)
    out = []
    for _ in range(7):
        (w1, c1), (w0, c0) = clock(lambda: run(65)), clock(lambda: run(1))
        out.append(((w1 - w0) / 64, (c1 - c0) / 64))
    return out


def engine_step(model, batch: int, temperature: float) -> list[tuple[float, float]]:
    tok = Tokenizer.train(["abc"], vocab_size=model.config.vocab_size)
    out = []
    for _ in range(5):
        engine = BatchEngine(model, tok, batch)
        for i in range(batch):
            engine.add(list(range(1 + i, 33 + i)), params(100, temperature, seed=i))
        for _ in range(4):
            engine.step()
        w, c = clock(lambda: [engine.step() for _ in range(48)])
        out.append((w / 48, c / 48))
    return out


def main() -> None:
    mode, shape, batch, temperature = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = model_preset("shakespeare") if shape == "demo" else ModelConfig(
        n_layer=1, n_head=1, d_model=16, vocab_size=4096, block_size=256)
    model = decode_layout(GPT(cfg).eval())
    times = (static_step if mode == "static" else engine_step)(model, batch, temperature)
    print(json.dumps({"wall_ms": 1e3 * min(w for w, _ in times), "cpu_ms": 1e3 * min(c for _, c in times)}))


if __name__ == "__main__":
    main()
