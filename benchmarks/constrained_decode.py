"""What constrained decoding costs: decode tokens/s of the server's engine with a JSON-mode grammar vs free text.

    python benchmarks/constrained_decode.py                  # batch 1 and 8, 3 rounds each (~3 min)
    python benchmarks/constrained_decode.py --batch 1 --rounds 5

The demo-size model (the `shakespeare` preset with the 4096-token BPE, random-init as in benchmarks/serve_load.py:
speed does not depend on what the weights say) decodes in a BatchEngine of `--batch` rows, all rows free or all
rows under `response_format: {"type": "json_object"}` (the matcher the server builds, serve/grammar.py). Same
prompt, same sampling (temperature 0.8, seeded per row), no stop ids; a row whose JSON is complete ends and a new
one takes its place, until 256 tokens per row have been decoded. Timed: the engine's steps only (sample + mask +
forward), not the prefills. The two modes run as separate processes, alternating A B A B (benchmarks/alternate.py),
and each one's median tokens/s is reported with the ratio (target: constrained >= 0.90 x free).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
PROMPT = "HAMLET. To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
TOKENS = 256  # per row


def measure(checkpoint: str, mode: str, batch: int, threads: int) -> dict:
    import torch

    from gptforge.engine import BatchEngine
    from gptforge.generate import load
    from gptforge.sampling import SamplingParams
    from gptforge.serve.grammar import Grammars, response_format_grammar

    torch.set_num_threads(threads)
    model, tok = load(checkpoint)
    engine = BatchEngine(model, tok, batch)
    grammars = Grammars(tok)
    grammar = grammars.check(response_format_grammar({"type": "json_object"}), "response_format")
    prompt = tok.encode(PROMPT)
    seeds = iter(range(10**6))

    def add() -> None:
        params = SamplingParams(temperature=0.8, max_new_tokens=TOKENS, seed=next(seeds), stop_at_eos=False)
        engine.add(prompt, params, (), grammars.matcher(grammar, ()) if mode == "json_object" else None)

    for _ in range(batch):
        add()
    for _ in range(8):  # warm-up steps
        for ev in engine.step():
            if ev.finish_reason:
                add()
    tokens, seconds, sequences = 0, 0.0, 0
    while tokens < TOKENS * batch:
        t0 = time.perf_counter()
        events = engine.step()
        seconds += time.perf_counter() - t0
        tokens += len(events)
        for ev in events:
            if ev.finish_reason:
                sequences += 1
                add()  # its prefill is outside the timed steps
    return {"mode": mode, "batch": batch, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "sequences_ended": sequences}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint (default: the demo-size random-init model, built once)")
    ap.add_argument("--batch", type=int, action="append", help="rows decoding together (repeatable; default 1 and 8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", choices=["free", "json_object"], help=argparse.SUPPRESS)  # one process's run
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.checkpoint, args.measure, args.batch[0], args.threads)))
        return
    sys.path.insert(0, str(HERE))
    from alternate import alternate
    from serve_load import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or str(build_checkpoint(Path(tmp) / "demo"))
        report = {}
        for batch in args.batch or [1, 8]:
            cmd = [sys.executable, __file__, "--checkpoint", ckpt, "--batch", str(batch), "--threads",
                   str(args.threads), "--measure"]
            res = alternate({m: cmd + [m] for m in ("free", "json_object")}, "tokens_per_s", args.rounds)
            ratio = res["json_object"]["median"] / res["free"]["median"]
            report[f"batch{batch}"] = {**res, "ratio": ratio}
            print(f"batch {batch}: free {res['free']['median']:.1f} tok/s, json_object "
                  f"{res['json_object']['median']:.1f} tok/s: {ratio:.3f}x (target >= 0.90)", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
