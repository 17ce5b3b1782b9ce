"""Where a decode's peak memory comes from: VmHWM, anonymous and file-backed resident MB after each stage.

    python benchmarks/decode_memory.py --model CKPT                 # 32-token prompt, 256 greedy tokens, 1 thread
    python benchmarks/decode_memory.py --model CKPT --maps 12       # and the 12 largest mappings at the peak

The stages are the decode benchmark's worker's (benchmarks/decode_llamacpp.py --worker ours): import torch, import
gptforge and its decode loop, gptforge.load, a 4-token warm-up generation, then one of --new tokens after a
--prompt-token prompt; this process is the measurement (one run per process: VmHWM only rises). Resident memory
does not depend on the machine's load. The last row's anonymous MB is VmHWM minus the file-backed MB at the end
(a finished generation frees its cache, so the end state is below the peak).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def status() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def mappings(n: int) -> list[tuple[float, float, str]]:
    """The n largest mappings by resident MB (file name, [heap] or [anon]): (resident, anonymous, name)."""
    total: dict[str, list[float]] = {}
    name = "[anon]"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            name = parts[5] if len(parts) > 5 else "[anon]"
            total.setdefault(name, [0.0, 0.0])
        elif parts and parts[0] in ("Rss:", "Anonymous:"):
            total[name][parts[0] == "Anonymous:"] += int(parts[1]) / 1024
    return sorted(((r, a, k) for k, (r, a) in total.items()), reverse=True)[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint folder")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--maps", type=int, default=0, help="print this many of the largest mappings at the end")
    args = p.parse_args()
    rows = [("python", status())]
    import torch
    rows.append(("import torch", status()))
    import gptforge
    from gptforge.generate import generate_steps
    from gptforge.sampling import SamplingParams
    rows.append(("+ import gptforge.generate", status()))
    torch.set_num_threads(args.threads)
    model, tok = gptforge.load(args.model, device="cpu")
    rows.append(("gptforge.load", status()))
    text = "ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
    prompt = (tok.encode(text) * (args.prompt_tokens // 8 + 1))[: args.prompt_tokens]

    def run(n: int) -> None:
        p = SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_eos=False)
        with torch.inference_mode():
            for _ in generate_steps(model, [prompt], p, vocab_size=tok.vocab_size):
                pass

    run(4)
    rows.append((f"prefill of {len(prompt)} + 4 tokens", status()))
    run(args.new)
    end = status()
    rows.append((f"{args.new} tokens (the peak)", {**end, "RssAnon": end["VmHWM"] - end["RssFile"]}))
    print(f"{args.model}: {len(prompt)}-token prompt, {args.new} new tokens, {args.threads} thread(s), "
          f"torch {torch.__version__}, Python {sys.version.split()[0]}")
    print("| stage (cumulative), MB | VmHWM | anonymous | file-backed |")
    print("|---|---|---|---|")
    for stage, s in rows:
        print(f"| {stage} | {s['VmHWM']:.1f} | {s['RssAnon']:.1f} | {s['RssFile']:.1f} |")
    for resident, anon, name in mappings(args.maps):
        print(f"  {resident:7.1f} MB resident, {anon:6.1f} anonymous  {name}")


if __name__ == "__main__":
    main()
