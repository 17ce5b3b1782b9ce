"""Checkpoint directories: save unwrapped state atomically, find the latest, load onto a meta-device model.

A run directory keeps `checkpoints/step-00000500/` folders, each holding
    model.safetensors   weights, unwrapped (no `_orig_mod.` / `module.` prefixes: nanoGPT issue #325)
    config.yaml         the full run config (model shape included)
    tokenizer.json      the tokenizer the model was trained with
    trainer_state.pt    optimizer, step, tokens seen, sampler position, RNG states (tensors and plain values
                        only, so it loads with torch.load(weights_only=True))
and `checkpoints/latest` (and `checkpoints/best`), one-line files naming a step folder. A checkpoint is written
under a temporary name, fsynced and renamed into place, so a crash or a full disk leaves either the old set or
the new one, never half a file under a final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptforge.config import RunConfig, load_yaml, run_config_from_dict
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(dest: Path, model: nn.Module, cfg: RunConfig, tokenizer: Tokenizer,
                     trainer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder at `dest` atomically (temp folder, fsync, rename).

    If writing fails (a full disk, say), the temp folder is removed and whatever was at `dest` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        cfg.save(tmp / CONFIG_FILE)
        tokenizer.save(tmp / TOKENIZER_FILE)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GptforgeError(f"could not write checkpoint {dest} ({e}); earlier checkpoints in {dest.parent} are intact") from None
    if dest.exists():  # re-saving the same step: move the old one aside first, drop it once the new one is in
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dest)
    _fsync_dir(dest.parent)
    return dest


def _write_pointer(root: Path, name: str, target: Path) -> None:
    tmp = root / f".{name}.tmp"
    tmp.write_text(target.name + "\n")
    _fsync_file(tmp)
    os.replace(tmp, root / name)


def _read_pointer(root: Path, name: str) -> Path | None:
    f = root / name
    return root / f.read_text().strip() if f.is_file() else None


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, cfg: RunConfig, tokenizer: Tokenizer,
                    trainer_state: dict[str, Any], keep: int, best: bool = False) -> Path:
    """Save `checkpoints/step-N` and point `latest` (and `best`, if `best`) at it; then delete step folders
    beyond the newest `keep`, never the best one."""
    root = Path(run_dir) / CHECKPOINTS
    dest = write_checkpoint(root / f"step-{step:08d}", model, cfg, tokenizer, trainer_state)
    _write_pointer(root, LATEST, dest)
    if best:
        _write_pointer(root, BEST, dest)
    keep_best = _read_pointer(root, BEST)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        if old != keep_best:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a missing or unreadable file), or None if it can."""
    for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    try:
        with safe_open(str(ckpt / MODEL_FILE), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)  # reads the header entry; a truncated file fails on its offsets
        if (ckpt / MODEL_FILE).stat().st_size < 8:
            return f"{MODEL_FILE} is truncated"
        torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        load_yaml(ckpt / CONFIG_FILE)
    except Exception as e:  # any unreadable file disqualifies the checkpoint; the caller says which
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def find_resumable(run_dir: str | Path, warn=None) -> Path:
    """The newest checkpoint of a run that can be resumed, skipping (and warning about) broken ones."""
    root = Path(run_dir) / CHECKPOINTS
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if warn is not None:
            warn(f"skipping checkpoint {ckpt}: {problem}")
    raise GptforgeError(f"no resumable checkpoint in {root}; start without --resume")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, or from a run directory (its `latest`, else its newest step)."""
    p = Path(path)
    if not p.exists():
        raise GptforgeError(f"checkpoint not found: {p}")
    if (p / MODEL_FILE).is_file():
        return p
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if (named / MODEL_FILE).is_file():
            return named
    steps = sorted(d for d in root.glob("step-*") if (d / MODEL_FILE).is_file())
    if steps:
        return steps[-1]
    raise GptforgeError(f"{p} holds no checkpoint ({MODEL_FILE} not found); give a checkpoint folder or a run directory from gptforge train")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, RunConfig]:
    """Model (eval mode), tokenizer and run config of a checkpoint; weights go straight to `device`.

    The model is built on the meta device (no memory, no init) and the tensors are assigned in place.
    """
    ckpt = resolve_checkpoint(path)
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if not (ckpt / name).is_file():
            raise GptforgeError(f"checkpoint {ckpt} is incomplete: {name} is missing")
    cfg = run_config_from_dict(load_yaml(ckpt / CONFIG_FILE), source=str(ckpt / CONFIG_FILE))
    tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE)
    if tokenizer.vocab_size > cfg.model.padded_vocab_size:
        raise GptforgeError(f"checkpoint {ckpt}: tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.model.padded_vocab_size} rows")
    with torch.device("meta"):
        model = GPT(cfg.model)
    try:
        state = load_file(str(ckpt / MODEL_FILE), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise GptforgeError(f"{ckpt / MODEL_FILE}: cannot read weights ({e})") from None
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise GptforgeError(f"{ckpt / MODEL_FILE} does not match its config.yaml: {e}") from None
    return model.eval(), tokenizer, cfg


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    f = resolve_checkpoint(path) / STATE_FILE
    if not f.is_file():
        raise GptforgeError(f"{f.parent} has no {STATE_FILE}: it can be loaded for inference but not resumed")
    return torch.load(f, map_location="cpu", weights_only=True)
