"""Run two measurements as separate processes, alternating A B A B ..., and report each one's median.

Noise on small shared machines is 15-40% run to run, so a comparison is only quoted as the median ratio of
interleaved fresh processes (each process prints one JSON object on its last line).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys


def measure(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def alternate(variants: dict[str, list[str]], key: str, rounds: int = 3) -> dict[str, dict]:
    """{name: argv} -> {name: {"runs": [...], "median": x}} for the metric `key` of each process."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, cmd in variants.items():
            value = measure(cmd)[key]
            results[name].append(value)
            print(f"round {r + 1} {name}: {key} = {value:.4g}", file=sys.stderr, flush=True)
    return {name: {"runs": runs, "median": statistics.median(runs)} for name, runs in results.items()}
