"""A quantized model's token table and head inside the whole-step op vs as modules around it (batch-1 greedy decode).

    python benchmarks/decode_step_tables.py                      # int8 and int4 g32, the small shape, 5 pairs
    python benchmarks/decode_step_tables.py --formats int4 --pairs 7 --threads 2

For each format, in one process, random weights of `decode_llamacpp.py --shape small`'s dimensions (6 layers,
d 384, vocab 4096, tied table; int8 activations): `generate_steps` per token, (t(256 new tokens) - t(1)) / 255 after
a 32-token prompt, thread CPU time and wall time, with the op embedding from the quantized table and multiplying
the quantized head itself (A, native/step.py as it is) and with both left to their modules around the op (B: the
step's `_table` and `_head` patched to None, as before), alternating A B A B, --pairs pairs: medians, the median of
the pairs' ratios B / A, and whether both decoded the same 256 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_overhead import NEW, PROMPT, SMALL, build  # noqa: E402

from gptforge.generate import generate_steps  # noqa: E402
from gptforge.native import step as native_step  # noqa: E402
from gptforge.sampling import SamplingParams  # noqa: E402


def decode(model, n: int, inside: bool) -> tuple[list[int], float, float]:
    """Tokens, thread CPU and wall seconds of n greedy tokens, the table and head inside the op or around it."""
    table, head = native_step._table, native_step._head
    if not inside:
        native_step._table = native_step._head = lambda m: None
    try:
        p = SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_eos=False)
        with torch.inference_mode():
            c0, w0 = time.thread_time(), time.perf_counter()
            ids = [s.ids[0] for s in generate_steps(model, [PROMPT], p, vocab_size=SMALL["vocab_size"])]
            return ids, time.thread_time() - c0, time.perf_counter() - w0
    finally:
        native_step._table, native_step._head = table, head


def per_token(model, inside: bool) -> tuple[float, float, list[int]]:
    """Microseconds per token (thread CPU, wall) past the first, and the tokens."""
    _, c1, w1 = decode(model, 1, inside)
    ids, c, w = decode(model, NEW, inside)
    return (c - c1) / (NEW - 1) * 1e6, (w - w1) / (NEW - 1) * 1e6, ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default="int8,int4")
    p.add_argument("--pairs", type=int, default=5, help="A/B pairs per format (medians)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| format | threads | us/token inside (CPU / wall) | around (CPU / wall) | around / inside (CPU, median "
          f"of {args.pairs} pairs) | same 256 tokens |")
    print("|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        model = build(fmt)
        per_token(model, True), per_token(model, False)  # warm both
        runs = {True: [], False: []}
        for _ in range(args.pairs):
            for inside in (True, False):
                runs[inside].append(per_token(model, inside))
        med = {k: [statistics.median(r[i] for r in v) for i in (0, 1)] for k, v in runs.items()}
        ratio = statistics.median(b[0] / a[0] for a, b in zip(runs[True], runs[False]))
        same = all(r[2] == runs[True][0][2] for v in runs.values() for r in v)
        print(f"| {fmt} | {args.threads} | {med[True][0]:.0f} / {med[True][1]:.0f} | {med[False][0]:.0f} / "
              f"{med[False][1]:.0f} | **{ratio:.2f}** | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
