"""Multi-process training on torch.distributed (gloo on CPU): DDP and FSDP2 under torchrun, via --nproc."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gptforge.checkpoint import checkpoint_problem, consolidate, resolve_checkpoint
from gptforge.config import TrainConfig
from gptforge.errors import GptforgeError
from gptforge.loader import load_checkpoint

pytestmark = pytest.mark.slow


def cli(prepared, out, *extra):
    # 4 micro-batches of 4 x 32 per step: the same global batch for 1, 2 or 4 ranks.
    return [sys.executable, "-m", "gptforge", "train", "--model", "tiny", "--data", str(prepared), "--out", str(out),
            "--no-progress", "--train.micro_batch", "4", "--train.seq_len", "32", "--train.batch_tokens", "512",
            "--train.eval_batches", "2", "--train.log_every", "1", "--train.seed", "5", "--train.warmup_steps", "2",
            "--train.lr", "3e-3", "--train.eval_every", "4", "--train.save_every", "4", "--train.max_steps", "8",
            "--train.dist_timeout", "60", *extra]


def run(cmd, timeout=300):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def curve(run_dir):
    """Every logged loss and val loss, by (kind, step)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        key = "loss" if "loss" in r else "val_loss"
        out[(key, r["step"])] = r[key]
    return out


def assert_same_curve(a, b, rel=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=rel), k


@pytest.fixture(scope="module")
def single(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run(cli(prepared, out))
    return out


def resume_from(ckpt, out):
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    shutil.copy(ckpt.parent.parent / "metrics.jsonl", out / "metrics.jsonl")


def test_ddp_two_ranks_match_one_and_resume_on_one(prepared, single, tmp_path):
    r = run(cli(prepared, tmp_path / "ddp", "--nproc", "2"))
    assert r.stdout.count("trained to step 8") == 1  # rank 0 reports for the job
    assert_same_curve(curve(single), curve(tmp_path / "ddp"))
    ckpt = tmp_path / "ddp" / "checkpoints" / "step-00000004"
    assert (ckpt / "model.safetensors").is_file()  # DDP saves the normal single-file format from rank 0
    resume_from(ckpt, tmp_path / "one")
    run(cli(prepared, tmp_path / "one", "--resume", "auto"))
    assert_same_curve(curve(single), curve(tmp_path / "one"))


def test_fsdp_two_ranks_sharded_checkpoint_resumes_on_one_and_two(prepared, single, tmp_path):
    # Activation checkpointing composes with FSDP (the recomputed blocks gather their shards again).
    run(cli(prepared, tmp_path / "fsdp", "--nproc", "2", "--train.parallel", "fsdp", "--train.activation_checkpointing", "true"))
    assert_same_curve(curve(single), curve(tmp_path / "fsdp"))
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000004"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert checkpoint_problem(ckpt) is None
    for n, extra in ((1, []), (2, ["--nproc", "2", "--train.parallel", "fsdp"])):
        out = tmp_path / f"resume{n}"
        resume_from(ckpt, out)
        run(cli(prepared, out, "--resume", "auto", *extra))
        assert_same_curve(curve(single), curve(out))
    # Consolidation gives the same weights as the single-process run, in the normal format.
    final = consolidate(tmp_path / "fsdp")
    a = load_file(str(final / "model.safetensors"))
    b = load_file(str(resolve_checkpoint(single) / "model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)  # Adam amplifies reduction-order noise on near-zero gradients
    sharded_model, _, _ = load_checkpoint(tmp_path / "fsdp")  # generate/eval read shards directly too
    for k, v in sharded_model.state_dict().items():
        torch.testing.assert_close(v, a[k])


def test_killing_one_rank_fails_the_job_cleanly(prepared, tmp_path):
    cmd = cli(prepared, tmp_path, "--nproc", "2", "--train.max_steps", "100000", "--train.save_every", "5",
              "--train.eval_every", "100000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not (tmp_path / "checkpoints" / "step-00000005").exists():
        assert proc.poll() is None and time.time() - t0 < 180, "\n".join(proc.communicate())
        time.sleep(0.05)
    ranks = [p for p in _descendants(proc.pid) if "\nRANK=1\n" in "\n" + _environ(p)]
    assert ranks, "rank 1 not found"
    os.kill(ranks[0], signal.SIGKILL)
    try:
        proc.communicate(timeout=120)  # torchrun sees the dead worker and stops the rest: no hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert checkpoint_problem(resolve_checkpoint(tmp_path)) is None


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, children) for d in [c, *_descendants(c)]]


def _environ(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().replace(b"\0", b"\n").decode(errors="replace")
    except OSError:
        return ""


def test_world_size_must_divide_the_batch():
    tc = TrainConfig(micro_batch=4, batch_tokens=3 * 4 * 32)
    assert tc.micro_batches_per_step(32, 3) == 3
    with pytest.raises(GptforgeError, match=r"cannot be split over 2 ranks; use a world size in \[1, 3\]"):
        tc.micro_batches_per_step(32, 2)
    assert TrainConfig(micro_batch=4).micro_batches_per_step(32, 4) == 4  # no batch_tokens: one per rank


def test_missing_node_times_out_instead_of_hanging(prepared, tmp_path):
    """The documented multi-node command with only one of two nodes up ends at torchrun's join timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29531", "--rdzv-conf", "join_timeout=5",
           "-m", "gptforge", "train", "--model", "tiny", "--data", str(prepared), "--out", str(tmp_path), "--no-progress"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "RendezvousTimeoutError" in r.stderr
    assert time.time() - t0 < 60
