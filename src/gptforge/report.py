"""Plots of one or more runs' metrics.jsonl (PNG, matplotlib) and an HTML page that shows them with each config.

Several runs share each plot, one line per run, so that a sweep compares at a glance.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.eval import evaluate_task, load_task
from gptforge.loader import load_checkpoint
from gptforge.outputs import check_out, staged

# (file stem, title, [(metrics key, line label suffix)]): train.py writes these keys (val_loss on eval records)
PLOTS = [
    ("loss", "loss per target token", [("loss", "train"), ("val_loss", "val")]),
    ("lr", "learning rate", [("lr", "")]),
    ("grad_norm", "gradient norm (before clipping)", [("grad_norm", "")]),
    ("tokens_per_s", "training tokens/s", [("tokens_per_s", "")]),
    ("mfu", "model FLOPs utilisation", [("mfu", "")]),
    ("task", "task accuracy (acc_norm; acc for cloze and generation)", [("task_score", "")]),
]


def task_scores(run_dir: Path, spec: str, limit: int | None = None) -> list[dict]:
    """A task's score on each checkpoint a run still holds (checkpoints/step-*), as metrics records."""
    task = load_task(spec)
    points = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        model, tok, cfg = load_checkpoint(ckpt)
        r = evaluate_task(model, tok, task, block_size=cfg.model.block_size, limit=limit)
        points.append({"step": int(ckpt.name.removeprefix("step-")), "task_score": r.score})
    if not points:
        raise GptforgeError(f"{run_dir} holds no checkpoints (checkpoints/step-*) to score {spec} on")
    return points


def read_metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        raise GptforgeError(f"{run_dir} has no metrics.jsonl; give a run directory written by gptforge train")
    rows = []
    for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise GptforgeError(f"{f}:{i}: not a JSON line") from None
    return rows


def report(run_dirs: list[str | Path], out: str | Path | None = None, overwrite: bool = False,
           task: str | None = None, limit: int | None = None) -> Path:
    """Write one PNG per metric any run has, and index.html, into `out` (default RUN_DIR/report); return the page.
    With `task` (a name or file for gptforge.eval), its score on each checkpoint of each run is plotted too.

    `out` follows outputs.check_out; the default folder is gptforge's own, so an earlier report there is replaced
    without `overwrite`. The folder is written whole, via a temporary one."""
    try:
        import matplotlib
    except ImportError:
        raise GptforgeError("gptforge report needs matplotlib: pip install 'gptforge[report]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in run_dirs]
    for r in runs:
        if not r.is_dir():
            raise GptforgeError(f"run directory not found: {r}")
    default = out is None
    out = check_out(runs[0] / "report" if default else out, "report", overwrite=overwrite or default, inputs=runs,
                    inside_input_ok=default)
    metrics = {r: read_metrics(r) + (task_scores(r, task, limit) if task else []) for r in runs}
    names = [r.name if [x.name for x in runs].count(r.name) == 1 else str(r) for r in runs]
    with staged(out, "report") as tmp:
        _write_report(tmp, runs, names, metrics, plt)
    return out / "index.html"


def _write_report(out: Path, runs: list[Path], names: list[str], metrics: dict[Path, list[dict]], plt) -> None:
    images = []
    for stem, title, series in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for run, name in zip(runs, names):
            for key, suffix in series:
                pts = [(m["step"], m[key]) for m in metrics[run] if key in m and "step" in m and m[key] is not None]
                if pts:
                    label = f"{name} {suffix}".strip() if len(runs) > 1 or suffix else name
                    ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label)
                    drawn += 1
        if drawn:
            ax.set_xlabel("step")
            ax.set_title(title)
            if stem == "loss":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / f"{stem}.png", dpi=100)
            images.append((stem, title))
        plt.close(fig)
    if not images:
        raise GptforgeError(f"no plottable metrics in {', '.join(map(str, runs))} (expected keys like loss, lr)")
    parts = ["<!doctype html><meta charset='utf-8'><title>gptforge report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:49%}"
             "pre{background:#f4f4f4;padding:8px;overflow:auto}</style>",
             f"<h1>gptforge report: {html.escape(', '.join(names))}</h1>"]
    parts += [f"<img src='{stem}.png' alt='{html.escape(title)}'>" for stem, title in images]
    for run, name in zip(runs, names):
        cfg = run / "config.yaml"
        text = cfg.read_text(encoding="utf-8") if cfg.is_file() else "(no config.yaml)"
        last = next((m for m in reversed(metrics[run]) if "loss" in m), {})
        summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("step", "loss", "tokens_per_s") if k in last)
        parts.append(f"<h2>{html.escape(name)}</h2><p>last: {html.escape(summary)}</p><pre>{html.escape(text)}</pre>")
    (out / "index.html").write_text("\n".join(parts), encoding="utf-8")
