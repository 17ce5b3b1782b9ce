"""The training engine: accumulation, schedules, precision, crash safety, exact resume, guards, logging."""

import dataclasses
import errno
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import gptforge.checkpoint as checkpoint_mod
import gptforge.train as train_mod
from gptforge.checkpoint import resolve_checkpoint
from gptforge.config import RunConfig, TrainConfig, model_preset
from gptforge.distributed import apply_activation_checkpointing
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.optim import lr_at
from gptforge.train import IGNORE_INDEX, forward_backward, next_token_loss, train


def run_cfg(data, out, **kw) -> RunConfig:
    tc = TrainConfig(micro_batch=4, seq_len=32, max_steps=20, warmup_steps=2, lr=3e-3, eval_every=10, eval_batches=2,
                     log_every=1, save_every=10, keep_last=3, seed=5)
    return RunConfig(model=model_preset("tiny"), train=dataclasses.replace(tc, **kw), data=str(data), out=str(out))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


# --- accumulation and schedules ------------------------------------------------------------------------------

def test_accumulation_equals_one_big_batch_with_ignored_targets():
    torch.manual_seed(0)
    x = torch.randint(0, 512, (8, 16))
    y = torch.randint(0, 512, (8, 16))
    y[0, :12] = IGNORE_INDEX  # the first micro-batches hold far fewer real targets than the others
    y[1, :] = IGNORE_INDEX
    y[5, 3:9] = IGNORE_INDEX
    grads = []
    for splits in (1, 2, 4, 8):
        torch.manual_seed(1)
        model = GPT(model_preset("tiny"))
        b = 8 // splits
        batches = [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(splits)]
        loss = forward_backward(model, batches, next_token_loss, torch.device("cpu"), None)
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    # The reference: the mean cross-entropy over all real targets of the whole batch.
    torch.manual_seed(1)
    ref_model = GPT(model_preset("tiny"))
    ref = torch.nn.functional.cross_entropy(ref_model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    ref.backward()
    for loss, g in grads:
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        for a, p in zip(g, ref_model.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


def test_batch_tokens_sets_accumulation(prepared, tmp_path):
    r = train(run_cfg(prepared, tmp_path, batch_tokens=4 * 32 * 3, max_steps=2), progress=False)
    assert r.tokens == 2 * 4 * 32 * 3
    with pytest.raises(GptforgeError, match="multiple of micro_batch x seq_len"):
        train(run_cfg(prepared, tmp_path / "b", batch_tokens=100), progress=False)


@pytest.mark.parametrize("schedule, checks", [
    ("cosine", {0: 0.25, 3: 1.0, 54: 0.55, 104: 0.1, 200: 0.1}),
    ("linear", {3: 1.0, 54: 0.55, 79: 0.325, 104: 0.1}),
    ("constant", {0: 0.25, 3: 1.0, 50: 1.0, 104: 1.0}),
    ("wsd", {3: 1.0, 60: 1.0, 83: 1.0, 90: 0.7, 104: 0.1, 150: 0.1}),
])
def test_schedule_shapes(schedule, checks):
    tc = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=104, schedule=schedule, decay_fraction=0.2)
    for step, value in checks.items():
        assert lr_at(step, tc) == pytest.approx(value), (schedule, step)
    after = [lr_at(s, tc) for s in range(4, 110)]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # never rises after warmup


# --- precision, compile, activation checkpointing -----------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "bf16-pure"])
def test_bf16_runs_on_cpu(prepared, tmp_path, precision):
    r = train(run_cfg(prepared, tmp_path, precision=precision, max_steps=20, lr=1e-2), progress=False)
    losses = train_losses(tmp_path)
    assert all(math.isfinite(v) for v in losses.values())
    assert r.final_val_loss < r.first_val_loss
    weights = load_file(str(r.checkpoint / "model.safetensors"))
    expected = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    assert all(t.dtype == expected for t in weights.values())


def test_fp16_on_cpu_is_refused(prepared, tmp_path):
    with pytest.raises(GptforgeError, match="fp16 needs a CUDA device"):
        train(run_cfg(prepared, tmp_path, precision="fp16"), progress=False)


def test_activation_checkpointing_keeps_gradients_and_names():
    torch.manual_seed(0)
    a = GPT(model_preset("tiny"))
    b = GPT(model_preset("tiny"))
    b.load_state_dict(a.state_dict())
    keys = list(b.state_dict())
    b = apply_activation_checkpointing(b)
    assert list(b.state_dict()) == keys
    x = torch.randint(0, 512, (2, 16))
    for m in (a, b):
        loss, n = next_token_loss(m, x, x)
        (loss / n).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compile_matches_eager_and_saves_unwrapped(prepared, tmp_path):
    eager = train(run_cfg(prepared, tmp_path / "eager", max_steps=4, eval_batches=1), progress=False)
    compiled = train(run_cfg(prepared, tmp_path / "compiled", max_steps=4, eval_batches=1, compile=True,
                             activation_checkpointing=True), progress=False)
    le, lc = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    for step in le:
        assert lc[step] == pytest.approx(le[step], rel=1e-4)
    keys = load_file(str(compiled.checkpoint / "model.safetensors")).keys()
    assert keys == load_file(str(eager.checkpoint / "model.safetensors")).keys()
    assert not any("_orig_mod" in k for k in keys)


# --- budgets, guards, early stopping ------------------------------------------------------------------------

def test_max_tokens_budget(prepared, tmp_path):
    r = train(run_cfg(prepared, tmp_path, max_steps=1000, max_tokens=5 * 4 * 32), progress=False)
    assert r.steps == 5 and r.stopped_by == "max_tokens" and resolve_checkpoint(tmp_path) == r.checkpoint


def nan_on(steps):
    """A loss function that returns NaN on the given (1-based) training calls."""
    calls = {"n": 0}

    def loss_fn(model, x, y):
        loss, n = next_token_loss(model, x, y)
        if model.training:
            calls["n"] += 1
            if calls["n"] in steps:
                loss = loss * float("nan")
        return loss, n
    return loss_fn


def test_non_finite_steps_are_skipped_and_counted(prepared, tmp_path):
    r = train(run_cfg(prepared, tmp_path, max_steps=10), loss_fn=nan_on({3, 7}), progress=False)
    assert r.skipped_steps == 2 and r.steps == 10
    records = [m for m in metrics(tmp_path) if "loss" in m]
    assert all(math.isfinite(m["loss"]) for m in records) and records[-1]["skipped_steps"] == 2


def test_many_non_finite_steps_stop_the_run(prepared, tmp_path):
    with pytest.raises(GptforgeError, match=r"5 steps in a row .*lower --train.lr"):
        train(run_cfg(prepared, tmp_path, max_steps=50), loss_fn=nan_on(set(range(4, 100))), progress=False)
    # The weights saved are the last good ones: finite everywhere.
    weights = load_file(str(resolve_checkpoint(tmp_path) / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_resume_keeps_the_count_of_non_finite_steps_in_a_row(prepared, tmp_path):
    """The run of non-finite steps is part of the saved state: resumed from a checkpoint taken inside one, a run
    stops at the step the uninterrupted run stopped at, with the same message."""
    stop = r"5 steps in a row \(up to step 9\) had a non-finite loss"
    with pytest.raises(GptforgeError, match=stop):  # steps 5.. are non-finite: stops at step 9
        train(run_cfg(prepared, tmp_path / "full", max_steps=50, save_every=7), loss_fn=nan_on(set(range(5, 100))),
              progress=False)
    root = tmp_path / "full" / "checkpoints"
    # step 7: saved with 3 skipped steps behind it; step 8: saved on the way out, the stopping step not counted
    for step, bad in ((7, 3), (8, 4)):
        state = checkpoint_mod.load_trainer_state(root / f"step-{step:08d}")
        assert (state["step"], state["skipped_steps"], state["bad_steps"]) == (step, bad, bad)
        with pytest.raises(GptforgeError, match=stop):
            train(run_cfg(prepared, tmp_path / f"from-{step}", max_steps=50, save_every=7),
                  resume=str(root / f"step-{step:08d}"), loss_fn=nan_on(set(range(1, 100))), progress=False)


def test_early_stopping_keeps_the_best(prepared, tmp_path, monkeypatch):
    values = iter([6.0, 5.0, 4.0, 4.5, 4.6, 4.7, 4.8])
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: next(values))
    r = train(run_cfg(prepared, tmp_path, max_steps=100, eval_every=5, save_every=1000, keep_last=1,
                      early_stop_patience=2), progress=False)
    assert r.stopped_by == "early_stop" and r.steps == 20 and r.best_val_loss == 4.0
    root = tmp_path / "checkpoints"
    assert (root / "best").read_text().strip() == "step-00000010"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000010", "step-00000020"]


# --- checkpoints and resume ---------------------------------------------------------------------------------

def test_init_from_starts_a_new_run_from_the_weights(prepared, tmp_path):
    base = train(run_cfg(prepared, tmp_path / "base"), progress=False)
    ft = train(run_cfg(prepared, tmp_path / "ft", max_steps=3, lr=1e-4), init_from=str(base.checkpoint), progress=False)
    assert ft.first_val_loss == pytest.approx(base.final_val_loss, rel=1e-6)  # same weights, same windows
    assert ft.steps == 3 and not (tmp_path / "ft" / "checkpoints" / "step-00000020").exists()


def test_resume_with_another_model_config_is_refused(prepared, tmp_path):
    train(run_cfg(prepared, tmp_path, max_steps=2), progress=False)
    cfg = run_cfg(prepared, tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=3))
    with pytest.raises(GptforgeError, match=r"another model config \(n_layer: checkpoint 2, this run 3\)"):
        train(cfg, resume="auto", progress=False)


def test_corrupted_latest_falls_back_to_previous(prepared, tmp_path):
    train(run_cfg(prepared, tmp_path, max_steps=20, save_every=10), progress=False)
    latest = tmp_path / "checkpoints" / "step-00000020" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    r = train(run_cfg(prepared, tmp_path, max_steps=20, save_every=10), resume="auto", progress=False)
    assert r.tokens == 10 * 4 * 32  # resumed at step 10, not 20
    assert load_file(str(tmp_path / "checkpoints" / "step-00000020" / "model.safetensors"))  # rewritten whole


def test_disk_full_during_save_keeps_previous_checkpoint(prepared, tmp_path, monkeypatch):
    real = checkpoint_mod.save_file
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_mod, "save_file", failing)
    with pytest.raises(GptforgeError, match="No space left on device.*intact"):
        train(run_cfg(prepared, tmp_path, max_steps=30, save_every=10), progress=False)
    root = tmp_path / "checkpoints"
    assert resolve_checkpoint(tmp_path) == root / "step-00000010"
    assert checkpoint_mod.checkpoint_problem(root / "step-00000010") is None
    assert not list(root.glob(".tmp-*"))


def test_unwritable_out_fails_before_training(prepared, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # the message is outputs.check_creatable's since the output policy (b2cee60) named the blocking file
    with pytest.raises(GptforgeError, match=r"cannot write .*/file is a file, not a folder; choose another --out"):
        train(run_cfg(prepared, blocker / "run"), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def cli_train(prepared, out, *extra):
    return [sys.executable, "-m", "gptforge", "train", "--model", "tiny", "--data", str(prepared), "--out", str(out),
            "--no-progress", "--train.micro_batch", "4", "--train.seq_len", "32", "--train.eval_batches", "2",
            "--train.log_every", "1", "--train.seed", "5", "--train.warmup_steps", "2", "--train.lr", "3e-3", *extra]


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(prepared, tmp_path):
    """A run killed with SIGKILL and resumed continues with the same losses, step for step (CPU fp32)."""
    args = ["--train.max_steps", "80", "--train.save_every", "10", "--train.eval_every", "40"]
    full = subprocess.run(cli_train(prepared, tmp_path / "full", *args), capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(cli_train(prepared, run, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(run / "checkpoints" / "step-00000020", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(train_losses(run))
    assert killed_at < 80
    resumed = subprocess.run(cli_train(prepared, run, *args, "--resume", "auto"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(run) == train_losses(tmp_path / "full")  # every step, exactly
    a = load_file(str(resolve_checkpoint(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(resolve_checkpoint(run) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(prepared, tmp_path):
    proc = subprocess.Popen(cli_train(prepared, tmp_path, "--train.max_steps", "100000", "--train.save_every", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "metrics.jsonl", proc)
    while proc.poll() is None and max(train_losses(tmp_path), default=0) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    ckpt = resolve_checkpoint(tmp_path)
    state = checkpoint_mod.load_trainer_state(ckpt)
    assert 3 <= state["step"] < 100000 and checkpoint_mod.checkpoint_problem(ckpt) is None


# --- logging ---------------------------------------------------------------------------------------------------

def test_metrics_jsonl_and_tensorboard_tags(prepared, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(run_cfg(prepared, tmp_path, max_steps=10, eval_every=5), progress=False)
    records = metrics(tmp_path)
    train_keys = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_memory_gb", "skipped_steps", "mfu"}
    assert all(train_keys <= set(r) for r in records if "loss" in r)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 5, 10]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_gb", "train/mfu",
            "val/loss", "val/perplexity"} <= tags
    # MFU = 6N+12LdT FLOPs per token x tokens/s / this CPU's measured matmul peak: a fraction, well below 1.
    assert all(0 < r["mfu"] < 1 for r in records if "mfu" in r)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 11))


def test_resume_auto_without_checkpoints_starts_a_new_run(prepared, tmp_path):
    r = train(run_cfg(prepared, tmp_path, max_steps=3), resume="auto", progress=False)
    assert r.steps == 3 and r.first_val_loss is not None


def test_init_from_a_quantized_checkpoint_is_refused(prepared, tmp_path):
    from gptforge.compress.run import quantize_checkpoint

    base = train(run_cfg(prepared, tmp_path / "base", max_steps=2), progress=False)
    quantized, _ = quantize_checkpoint(str(base.checkpoint), "int8", str(tmp_path / "q"))
    with pytest.raises(GptforgeError, match=r"quantized \(int8\); fine-tune its unquantized parent"):
        train(run_cfg(prepared, tmp_path / "ft"), init_from=str(quantized), progress=False)
