"""Checkpoint directories, the file format: save unwrapped state atomically, find the latest valid one, read its
config and trainer state. Building a model from one is gptforge.loader's.

A run directory keeps `checkpoints/step-00000500/` folders, each holding
    model.safetensors   weights, unwrapped (no `_orig_mod.` / `module.` prefixes: nanoGPT issue #325)
      or dcp/           the same weights and the optimizer, sharded by torch.distributed.checkpoint (FSDP runs);
                        `gptforge consolidate` turns it into the single-file form
    config.yaml         the full run config (model shape included)
    tokenizer.json      the tokenizer the model was trained with
    trainer_state.pt    optimizer (keyed by parameter name, so it loads into any world size), step, tokens
                        seen, sampler position, RNG states: tensors and plain values only, so it loads with
                        torch.load(weights_only=True)
and `checkpoints/latest` (and `checkpoints/best`), one-line files naming a step folder. A checkpoint is written
under a temporary name, fsynced and renamed into place, so a crash or a full disk leaves either the old set or
the new one, never half a file under a final name.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptforge.config import RunConfig, load_yaml, run_config_from_dict
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.outputs import check_out, fsync_tree, publish, temp_path, tree_bytes, write_error
from gptforge.tokenizer import HF_CONFIG_FILE, Tokenizer

MODEL_FILE = "model.safetensors"
SHARDS_DIR = "dcp"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's and DDP's wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _agree(ok: bool, d) -> bool:
    """True on every rank only if `ok` on every rank (a barrier that carries failure, so no rank waits for a
    rank that gave up)."""
    if d is None or not d.enabled:
        return ok
    return int(d.sum(torch.tensor(0 if ok else 1, device=d.device)).item()) == 0


def save_file(state: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, imported when a checkpoint is written: loading (loader._mapped) never needs the
    library, so a process that only loads and decodes does not hold it."""
    from safetensors.torch import save_file as write

    write(state, path, metadata=metadata)


def write_checkpoint(dest: Path, cfg: RunConfig, tokenizer: Tokenizer, trainer_state: dict[str, Any] | None = None,
                     *, model_state: dict[str, torch.Tensor] | None = None,
                     write_shards: Callable[[Path], None] | None = None, d=None) -> Path:
    """Write a checkpoint folder at `dest` atomically: a temp folder, fsynced, then renamed.

    `model_state` (full, unwrapped) goes to model.safetensors from rank 0. `write_shards(folder)` is a
    collective every rank calls (FSDP's sharded save). If writing fails anywhere (a full disk, say), the temp
    folder is removed, whatever was at `dest` is untouched, and every rank raises.
    """
    dest = Path(dest)
    main = d is None or d.is_main
    tmp = temp_path(dest)
    error = None
    try:
        if main:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a process killed mid-write
                shutil.rmtree(tmp)
            tmp.mkdir()
    except Exception as e:
        error = e
    if _agree(error is None, d):
        try:
            if write_shards is not None:
                write_shards(tmp / SHARDS_DIR)
            if main:
                if model_state is not None:
                    state = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
                    save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
                cfg.save(tmp / CONFIG_FILE)
                tokenizer.save(tmp / TOKENIZER_FILE)
                (tmp / HF_CONFIG_FILE).write_text(json.dumps(tokenizer.hf_config(cfg.model.block_size), indent=2) + "\n")
                if trainer_state is not None:
                    torch.save(trainer_state, tmp / STATE_FILE)
                if model_state is not None:  # safetensors writes 0600; give it the mode (umask) of its siblings
                    os.chmod(tmp / MODEL_FILE, (tmp / CONFIG_FILE).stat().st_mode & 0o777)
                fsync_tree(tmp)
        except Exception as e:  # OSError, torch.save's RuntimeError, SafetensorError: all mean "not written"
            error = e
    if not _agree(error is None, d):
        written = tree_bytes(tmp) if main else 0
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise GptforgeError(f"could not write checkpoint {dest} (another rank failed to write its part); "
                                f"earlier checkpoints in {dest.parent} are intact")
        raise write_error("checkpoint", dest, error, written=written,
                          state=f"earlier checkpoints in {dest.parent} are intact") from None
    if main:
        publish(tmp, dest)  # re-saving the same step replaces the old folder only once the new one is in
    if d is not None:
        d.barrier()
    return dest


def _write_pointer(root: Path, name: str, target: Path) -> None:
    tmp = root / f".{name}.tmp"
    try:
        tmp.write_text(target.name + "\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, root / name)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise write_error(f"the {name} pointer", root / name, e, state=f"{target} is written; {root / name} is as before") from None


def _read_pointer(root: Path, name: str) -> Path | None:
    f = root / name
    try:
        return root / f.read_text().strip() if f.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _prune(root: Path, keep: int, newest: Path, step: int) -> None:
    """Delete step folders beyond the `keep` most recent of this run, never `newest` (just written) nor the best.
    Recency is the run's own order: folders numbered above the step just saved are from a timeline this run
    left (it resumed from an earlier checkpoint), so they go first; the rest go oldest step first."""
    keep_best = _read_pointer(root, BEST)
    others = [p for p in root.glob("step-*") if p.is_dir() and p != newest]
    by_recency = sorted(others, key=lambda p: (_step_of(p) <= step, _step_of(p)), reverse=True)
    for old in by_recency[max(keep - 1, 0):]:
        if old != keep_best:
            shutil.rmtree(old, ignore_errors=True)


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def save_checkpoint(run_dir: str | Path, step: int, cfg: RunConfig, tokenizer: Tokenizer, trainer_state: dict[str, Any],
                    keep: int, best: bool = False, *, model_state: dict[str, torch.Tensor] | None = None,
                    write_shards: Callable[[Path], None] | None = None, d=None) -> Path:
    """Save `checkpoints/step-N`, point `latest` (and `best`, if `best`) at it, then delete step folders
    beyond this run's `keep` most recent, never the one just written nor the best one. Pointers and pruning
    are rank 0's; `latest` is written only once its folder is in place."""
    root = Path(run_dir) / CHECKPOINTS
    dest = write_checkpoint(root / f"step-{step:08d}", cfg, tokenizer, trainer_state,
                            model_state=model_state, write_shards=write_shards, d=d)
    if d is None or d.is_main:
        _write_pointer(root, LATEST, dest)
        if best:
            _write_pointer(root, BEST, dest)
        _prune(root, keep, dest, step)
    return dest


def _has_weights(p: Path) -> bool:
    return (p / MODEL_FILE).is_file() or (p / SHARDS_DIR / ".metadata").is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, or from a run directory (its `latest`, else its newest step)."""
    p = Path(path)
    if not p.exists():
        raise GptforgeError(f"checkpoint not found: {p}")
    if _has_weights(p):
        return p
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    named = _read_pointer(root, LATEST)
    if named is not None and _has_weights(named):
        return named
    steps = sorted(d for d in root.glob("step-*") if _has_weights(d))
    if steps:
        return steps[-1]
    raise GptforgeError(f"{p} holds no checkpoint ({MODEL_FILE} not found); give a checkpoint folder or a run directory from gptforge train")


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a missing or unreadable file), or None if it can."""
    for name in (CONFIG_FILE, TOKENIZER_FILE, STATE_FILE):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    if not _has_weights(ckpt):
        return f"neither {MODEL_FILE} nor {SHARDS_DIR}/ is there"
    try:
        if (ckpt / MODEL_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(ckpt / MODEL_FILE), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)  # reads the header entry; a truncated file fails on its offsets
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        if not (ckpt / MODEL_FILE).is_file() and "optimizer" in state:
            return "trainer_state.pt and dcp/ disagree"
        load_yaml(ckpt / CONFIG_FILE)
    except Exception as e:  # any unreadable file disqualifies the checkpoint; the caller says which
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def find_resumable(run_dir: str | Path, warn=None) -> Path | None:
    """The checkpoint `latest` names if it can be resumed; else the newest resumable step folder, warning
    about the broken ones skipped; None if the run has no checkpoint at all (so one command can both start
    and continue a run)."""
    root = Path(run_dir) / CHECKPOINTS
    latest = _read_pointer(root, LATEST)
    if latest is not None and latest.is_dir():
        problem = checkpoint_problem(latest)
        if problem is None:
            return latest
        if warn is not None:
            warn(f"skipping checkpoint {latest} (named by {root / LATEST}): {problem}")
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir() and p != latest), key=_step_of, reverse=True)
    if not candidates:
        if latest is not None and latest.is_dir():
            raise GptforgeError(f"no resumable checkpoint in {root}; start without --resume")
        return None
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if warn is not None:
            warn(f"skipping checkpoint {ckpt}: {problem}")
    raise GptforgeError(f"no resumable checkpoint in {root}; start without --resume")


def read_config(ckpt: Path) -> RunConfig:
    """The typed run config a checkpoint folder records (gptforge.loader builds its model from it)."""
    if not (ckpt / CONFIG_FILE).is_file():
        raise GptforgeError(f"checkpoint {ckpt} is incomplete: {CONFIG_FILE} is missing")
    return run_config_from_dict(load_yaml(ckpt / CONFIG_FILE), source=str(ckpt / CONFIG_FILE))


def load_sharded(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load dcp/ shards into a model (and optimizer) of any layout: plain, DDP or FSDP at any world size;
    torch.distributed.checkpoint reshards on load."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        state = {"model": model.state_dict()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(ckpt / SHARDS_DIR), no_dist=not dist.is_initialized())
        model.load_state_dict(state["model"])
        return
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():  # loading in one process is what we mean; DCP warns that it assumed so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(ckpt / SHARDS_DIR), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    f = resolve_checkpoint(path) / STATE_FILE
    if not f.is_file():
        raise GptforgeError(f"{f.parent} has no {STATE_FILE}: it can be loaded for inference but not resumed")
    return torch.load(f, map_location="cpu", weights_only=True)


def consolidate(path: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Turn a sharded (dcp/) checkpoint into the single-file form: model.safetensors and the optimizer in
    trainer_state.pt, keyed by parameter name. Written next to it as `consolidated-<name>` unless `out`;
    the output follows outputs.check_out (`overwrite` replaces only an earlier checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from gptforge.optim import build_optimizer

    ckpt = resolve_checkpoint(path)
    if (ckpt / MODEL_FILE).is_file():
        raise GptforgeError(f"{ckpt} is already a single-file checkpoint")
    dest = check_out(Path(out) if out is not None else ckpt.parent / f"consolidated-{ckpt.name}", "checkpoint",
                     overwrite=overwrite, inputs=[ckpt])
    cfg = read_config(ckpt)
    state = load_trainer_state(ckpt)
    model = GPT(cfg.model)
    if cfg.train.precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    optimizer = build_optimizer(model, cfg.train, "cpu")
    load_sharded(ckpt, model, optimizer)
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return write_checkpoint(dest, cfg, Tokenizer.load(ckpt / TOKENIZER_FILE), {**state, "optimizer": optim_state},
                            model_state=model_state)
