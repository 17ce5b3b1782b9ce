"""What constrained decoding costs: decode tokens/s of the server's engine with a JSON-mode grammar vs free text.

    python benchmarks/constrained_decode.py                  # batch 1 and 8, 3 rounds each (~3 min)
    python benchmarks/constrained_decode.py --batch 1 --rounds 5

The demo-size model (the `shakespeare` preset with the 4096-token BPE, random-init as in benchmarks/serve_load.py:
speed does not depend on what the weights say) decodes in a BatchEngine of `--batch` rows, all rows free or all
rows under `response_format: {"type": "json_object"}` (the matcher the server builds, serve/grammar.py). Same
prompt, same sampling (temperature 0.8, seeded per row), no stop ids; a row whose JSON is complete ends and a new
one takes its place, until 256 tokens per row have been decoded. The free rows are ended where the json_object
run just before ended its rows (same lengths, same steps), so both modes run the same forwards over the same
context lengths: only the constraint's work differs. Timed: the engine's steps only (sample + mask + forward),
not the prefills, in wall time and in the thread's CPU time (one torch thread: the step runs on the calling
thread; CPU time is what a shared, oversubscribed machine still measures fairly). The two modes run as separate
processes, alternating (json_object, then free, each round), and each one's median is reported with the ratio
(target: constrained >= 0.90 x free).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
PROMPT = "HAMLET. To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
TOKENS = 256  # per row


def measure(checkpoint: str, mode: str, batch: int, threads: int, lengths_file: str) -> dict:
    import torch

    from gptforge.engine import BatchEngine
    from gptforge.generate import load
    from gptforge.sampling import SamplingParams
    from gptforge.serve.grammar import Grammars, response_format_grammar

    torch.set_num_threads(threads)
    model, tok = load(checkpoint)
    engine = BatchEngine(model, tok, batch)
    grammars = Grammars(tok)
    grammar = grammars.compile(response_format_grammar({"type": "json_object"}), "response_format")
    prompt = tok.encode(PROMPT)
    # The free rows end where the previous json_object run's rows ended: the same rows, as long, at the same
    # steps, so both modes run the same forwards and differ only in the constraint's work.
    lengths = json.loads(Path(lengths_file).read_text()) if mode == "free" else []
    ids: dict[int, int] = {}  # engine seq id -> its row's rank among the added ones
    made: dict[int, int] = {}  # rank -> tokens it made

    def add() -> None:
        rank = len(ids)
        length = lengths[rank] if rank < len(lengths) else TOKENS
        params = SamplingParams(temperature=0.8, max_new_tokens=length, seed=rank, stop_at_eos=False)
        ids[engine.add(prompt, params, (), grammars.matcher(grammar, ()) if mode == "json_object" else None)] = rank

    for _ in range(batch):
        add()
    for _ in range(8):  # warm-up steps
        for ev in engine.step():
            made[ids[ev.seq]] = made.get(ids[ev.seq], 0) + 1
            if ev.finish_reason:
                add()
    tokens, seconds, cpu, sequences = 0, 0.0, 0.0, 0
    while tokens < TOKENS * batch:
        t0, c0 = time.perf_counter(), time.thread_time()
        events = engine.step()
        seconds += time.perf_counter() - t0
        cpu += time.thread_time() - c0
        tokens += len(events)
        for ev in events:
            made[ids[ev.seq]] = made.get(ids[ev.seq], 0) + 1
            if ev.finish_reason:
                sequences += 1
                add()  # its prefill is outside the timed steps
    if mode == "json_object":
        Path(lengths_file).write_text(json.dumps([made[r] for r in range(len(made))]))
    return {"mode": mode, "batch": batch, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu, "sequences_ended": sequences}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint (default: the demo-size random-init model, built once)")
    ap.add_argument("--batch", type=int, action="append", help="rows decoding together (repeatable; default 1 and 8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", choices=["free", "json_object"], help=argparse.SUPPRESS)  # one process's run
    ap.add_argument("--lengths", help=argparse.SUPPRESS)  # json_object writes its rows' lengths, free reads them
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.checkpoint, args.measure, args.batch[0], args.threads, args.lengths)))
        return
    sys.path.insert(0, str(HERE))
    from alternate import measure as run
    from serve_load import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or str(build_checkpoint(Path(tmp) / "demo"))
        report = {}
        for batch in args.batch or [1, 8]:
            cmd = [sys.executable, __file__, "--checkpoint", ckpt, "--batch", str(batch), "--threads",
                   str(args.threads), "--lengths", str(Path(tmp) / "lengths.json"), "--measure"]
            runs: dict[str, list[dict]] = {"json_object": [], "free": []}
            for r in range(args.rounds):  # A B A B: the machine's drift hits both alike
                for mode in runs:
                    runs[mode].append(run(cmd + [mode]))
                    print(f"batch {batch} round {r + 1} {mode}: {runs[mode][-1]['tokens_per_s']:.1f} tok/s, "
                          f"{runs[mode][-1]['tokens_per_cpu_s']:.1f} tok/CPU-s", file=sys.stderr, flush=True)
            res = {mode: {key: statistics.median(x[key] for x in xs) for key in ("tokens_per_s", "tokens_per_cpu_s")}
                   for mode, xs in runs.items()}
            ratios = {key: res["json_object"][key] / res["free"][key] for key in res["free"]}
            report[f"batch{batch}"] = {"runs": runs, "medians": res, "ratios": ratios}
            print(f"batch {batch}: free {res['free']['tokens_per_s']:.1f} tok/s ({res['free']['tokens_per_cpu_s']:.1f}"
                  f" per CPU-s), json_object {res['json_object']['tokens_per_s']:.1f} tok/s "
                  f"({res['json_object']['tokens_per_cpu_s']:.1f}): {ratios['tokens_per_s']:.3f}x wall, "
                  f"{ratios['tokens_per_cpu_s']:.3f}x CPU (target >= 0.90)", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
