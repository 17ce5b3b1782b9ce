"""The decode attention op (csrc/attention.cpp) as a decode step meets it, and what a bf16 KV cache saves.

    python benchmarks/decode_attention.py                           # the op: fp32 vs bf16 cache under an fp32 q
    python benchmarks/decode_attention.py --against main~3          # + this tree's attention.cpp vs REV's
    python benchmarks/decode_attention.py --models DIR[,DIR...]     # + generate_steps us/step, kv fp32 vs bf16

The op: every slot valid (generate's caches are), one query per row, head size 64, 1 thread, thread CPU time. A step's
products stream the weights through the caches between layers, so the keys and values are cold: each timed call
runs over one of 6 layers' caches in turn, with 16 MB of other memory written between rounds of the 6. The two cache
dtypes alternate in one process, 5 rounds, best of each; ratio = fp32 / bf16 time.
--against REV compiles REV's attention.cpp and this tree's alone (the same flags as native/build.py), and times each
in processes of its own, alternating (--rounds each; fp32 caches; medians): the kernel's own change.
--models: each checkpoint loaded as `gptforge generate` does, 256 greedy tokens after a 32-token prompt, batch 1,
1 thread, kv_dtype fp32 and bf16 alternating in one process (--rounds each; medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = "src/gptforge/native/csrc/attention.cpp"
SHAPES = [(1, 6, e) for e in (32, 160, 512)] + [(1, 12, e) for e in (32, 160, 512)] + [(8, 6, e) for e in (32, 160)]
LAYERS, D = 6, 64


def time_op(op, B: int, H: int, E: int, cache_dtype, junk) -> float:
    """Microseconds of thread CPU time per call at (B, H, E), caches cold as in a decode step; best of 5 rounds.
    op None: torch.sum over the same keys and values instead (what streaming those bytes costs)."""
    import torch

    q, k, v = (torch.randn(B, H, 1, D) for _ in range(3))
    caches = [(torch.randn(B, H, E, D).to(cache_dtype), torch.randn(B, H, E, D).to(cache_dtype)) for _ in range(LAYERS)]
    slots, mask = torch.tensor([E - 1]), torch.zeros(B, 1, 1, E)
    n, best = max(4, 2000 // (B * H * E)), float("inf")
    for _ in range(5):
        spent = 0.0
        for _ in range(n):
            junk.add_(1.0)  # the step's weights passing through the caches
            t = time.thread_time()
            for kc, vc in caches:
                if op is None:
                    kc.sum(), vc.sum()
                else:
                    op(q, k, v, kc, vc, slots, mask)
            spent += time.thread_time() - t
        best = min(best, spent / (n * LAYERS))
    return best * 1e6


def op_rows(op, dtypes) -> list[dict]:
    """Each shape's time per call for each cache dtype, the dtypes alternating shape by shape."""
    import torch

    torch.set_num_threads(1)
    junk = torch.zeros(4 << 20)
    rows = []
    for B, H, E in SHAPES:
        row = {"B": B, "H": H, "E": E}
        for name, dt in dtypes.items():
            row[name] = time_op(None if name == "sum" else op, B, H, E, dt, junk)
        rows.append(row)
    return rows


def build_alone(source: str, out: Path) -> Path:
    """attention.cpp (its text) compiled alone into a library (registers gptforge_attn only)."""
    from torch.utils import cpp_extension

    sys.path.insert(0, str(ROOT / "src"))
    from gptforge.native.build import FLAGS

    cpp = out.with_suffix(".cpp")
    cpp.write_text(source)
    (out.parent / "kernels.h").write_text((ROOT / SRC).parent.joinpath("kernels.h").read_text())
    cmd = ["g++", *FLAGS, *(f"-I{p}" for p in cpp_extension.include_paths()), "-shared", str(cpp), "-o", str(out),
           *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"]
    subprocess.run(cmd, check=True)
    return out


def against(rev: str, rounds: int) -> list[dict]:
    """This tree's attention.cpp vs REV's, each built alone, in alternating processes; fp32 caches."""
    work = Path(tempfile.mkdtemp(prefix="decode-attention-"))
    theirs = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{SRC}"], capture_output=True, text=True,
                            check=True).stdout
    libs = {rev: build_alone(theirs, work / "theirs.so"), "ours": build_alone((ROOT / SRC).read_text(),
                                                                               work / "ours.so")}
    runs: dict[str, list[list[dict]]] = {name: [] for name in libs}
    for r in range(rounds):
        for name, lib in libs.items():
            out = subprocess.run([sys.executable, __file__, "--worker", str(lib)], capture_output=True, text=True,
                                 check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {name} done", file=sys.stderr, flush=True)
    rows = []
    for i, (B, H, E) in enumerate(SHAPES):
        row = {"B": B, "H": H, "E": E}
        for name in libs:
            row[name] = statistics.median(run[i]["fp32"] for run in runs[name])
        rows.append(row)
    return rows


def models(dirs: list[str], rounds: int) -> list[dict]:
    """generate_steps' us per step over an fp32 cache and a bf16 one, alternating."""
    import torch

    import gptforge
    from gptforge.generate import generate_steps
    from gptforge.sampling import SamplingParams

    torch.set_num_threads(1)
    p = SamplingParams(max_new_tokens=256, temperature=0.0, stop_at_eos=False)
    rows = []
    for d in dirs:
        model, tok = gptforge.load(d, device="cpu")
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        with torch.inference_mode():
            for _ in range(rounds):
                for kv in times:
                    t0, n = time.perf_counter(), 0
                    for _ in generate_steps(model, [list(range(100, 132))], p, vocab_size=tok.vocab_size,
                                            kv_dtype=kv):
                        n += 1
                    times[kv].append((time.perf_counter() - t0) / n * 1e6)
        rows.append({"model": d, **{k: statistics.median(v) for k, v in times.items()},
                     "ratio": statistics.median(a / b for a, b in zip(times["fp32"], times["bf16"]))})
    return rows


def table(rows: list[dict], cols: list[str], title: str) -> None:
    print(f"\n{title}\n\n| B | heads | slots | " + " | ".join(f"{c} us" for c in cols) + f" | {cols[0]} / {cols[1]} |")
    print("|---" * (4 + len(cols)) + "|")
    for r in rows:
        print(f"| {r['B']} | {r['H']} | {r['E']} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
              + f" | {r[cols[0]] / r[cols[1]]:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", help="a git revision whose attention.cpp to time beside this tree's")
    p.add_argument("--models", help="checkpoints (comma-separated) to decode with kv_dtype fp32 and bf16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    if args.worker:  # one library alone: fp32 caches only (an older op reads q's dtype only)
        torch.ops.load_library(args.worker)
        print(json.dumps(op_rows(torch.ops.gptforge_attn.decode_attention, {"fp32": torch.float32})))
        return
    if args.against:
        table(against(args.against, args.rounds), [args.against, "ours"],
              f"attention.cpp at {args.against} vs this tree's, fp32 caches, cold, 1 thread (medians of processes)")
    sys.path.insert(0, str(ROOT / "src"))
    from gptforge import native

    assert native.available(), "the native kernels could not be built here"
    table(op_rows(torch.ops.gptforge_attn.decode_attention,
                  {"fp32": torch.float32, "bf16": torch.bfloat16, "sum": torch.float32}), ["fp32", "bf16", "sum"],
          "decode_attention, fp32 q over an fp32 / bf16 cache, cold, 1 thread (best of 5); sum: torch.sum over the "
          "fp32 keys and values, the cost of streaming them")
    if args.models:
        print("\n| model | kv fp32 us/step | kv bf16 us/step | fp32 / bf16 |\n|---|---|---|---|")
        for r in models(args.models.split(","), args.rounds):
            print(f"| {r['model']} | {r['fp32']:.0f} | {r['bf16']:.0f} | {r['ratio']:.3f}x |")


if __name__ == "__main__":
    main()
