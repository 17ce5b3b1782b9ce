"""Issue 19: nothing lost, ever. The output policy (outputs.py), runs that belong to one run, and every write
path under injected faults (ENOSPC, torch.save's RuntimeError, SafetensorError) and on a real full tmpfs:
one line, no temporary files, the previous state byte-identical."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import gptforge.checkpoint as checkpoint_mod
from gptforge.checkpoint import LATEST, find_resumable, save_checkpoint, write_checkpoint
from gptforge.cli import main
from gptforge.config import RunConfig, TrainConfig, model_preset
from gptforge.data import TokenData, prepare
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.outputs import check_out
from gptforge.train import train

TRAIN = TrainConfig(micro_batch=4, seq_len=32, max_steps=4, warmup_steps=1, eval_every=2, eval_batches=1,
                    log_every=1, save_every=2, keep_last=1, tensorboard=False, save_best=False)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) -> its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Temporary names a write may leave: .tmp-*, .old-*, probes, pointer temps."""
    return [str(p) for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-", ".gptforge-probe", ".latest.tmp",
                                                                    ".best.tmp"))]


@pytest.fixture(scope="module")
def tok(prepared):
    return TokenData(prepared).tokenizer()


@pytest.fixture(scope="module")
def cfg(tok):
    return RunConfig(model=dataclasses.replace(model_preset("tiny"), vocab_size=tok.vocab_size), train=TRAIN)


@pytest.fixture(scope="module")
def ckpt(cfg, tok, tmp_path_factory):
    torch.manual_seed(1)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "parent", cfg, tok, model_state=GPT(cfg.model).state_dict())


@pytest.fixture(scope="module")
def run_dir(prepared, cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    train(dataclasses.replace(cfg, data=str(prepared), out=str(out)), progress=False)
    return out


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([*map(str, argv), "--no-progress"])
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)


# --- the policy ------------------------------------------------------------------------------------------

def test_existing_folder_is_refused_and_kept(tmp_path, ckpt, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("notes")
    before = snapshot(tmp_path)
    assert_one_line(*cli(capsys, "quantize", ckpt, "--method", "int8", "--out", precious), "--overwrite")
    assert_one_line(*cli(capsys, "quantize", ckpt, "--method", "int8", "--out", precious, "--overwrite"),
                    "not a checkpoint folder")
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


def test_existing_file_is_refused_and_kept(tmp_path, ckpt, capsys):
    f = tmp_path / "f"
    f.write_text("hi")
    assert_one_line(*cli(capsys, "quantize", ckpt, "--method", "int8", "--out", f), "existing file")
    assert f.read_text() == "hi" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_out_equal_to_or_inside_the_input_is_refused(ckpt, run_dir, capsys):
    before = snapshot(run_dir)
    assert_one_line(*cli(capsys, "quantize", run_dir, "--method", "int8", "--out", run_dir, "--overwrite"), "is the input")
    assert_one_line(*cli(capsys, "quantize", run_dir, "--method", "int8", "--out", run_dir / "q"), "inside the input")
    assert_one_line(*cli(capsys, "import-hf", run_dir, "--out", run_dir), "is the input")
    assert snapshot(run_dir) == before


def test_overwrite_replaces_only_its_own_kind(tmp_path, ckpt, capsys):
    out = tmp_path / "q"
    assert cli(capsys, "quantize", ckpt, "--method", "int8", "--out", out)[0] == 0
    first = snapshot(out)
    assert cli(capsys, "quantize", ckpt, "--method", "bf16", "--out", out, "--overwrite")[0] == 0
    assert snapshot(out) != first and (out / "model.safetensors").is_file() and not leftovers(tmp_path)
    data = tmp_path / "d"  # a checkpoint is not prepared data: --overwrite of prepare refuses it
    shutil.copytree(out, data)
    assert_one_line(*cli(capsys, "prepare", "shakespeare", "--out", data, "--overwrite"), "not a prepared-data folder")


def test_check_out_unwritable_and_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(GptforgeError, match="is a file"):
        check_out(tmp_path / "f" / "sub", "data")
    with pytest.raises(GptforgeError, match="cannot write"):
        check_out("/proc/x", "data")


def test_prepare_checks_out_before_reading(tmp_path, monkeypatch, capsys):
    import gptforge.data as data_mod

    def boom(*a, **k):
        raise AssertionError("sources were read before --out was checked")
    monkeypatch.setattr(data_mod, "_read_sources", boom)
    assert_one_line(*cli(capsys, "prepare", "shakespeare", "--out", "/proc/x"), "/proc")
    (tmp_path / "file").write_text("x")
    assert_one_line(*cli(capsys, "prepare", "shakespeare", "--out", tmp_path / "file"), "existing file")


def test_prepare_counts_empty_files(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("To be, or not to be, that is the question.\n\n" * 40)
    (src / "b.txt").write_text("Whether 'tis nobler in the mind to suffer.\n\n" * 40)
    (src / "empty.txt").write_text("")
    stats = prepare([str(src)], tmp_path / "out", vocab_size=300, val_fraction=0.5, progress=False)
    assert stats.empty_documents == 1 and any("empty.txt" in w for w in stats.warnings)
    assert sum(stats.documents.values()) == 2


def test_warnings_are_not_wrapped_in_logs(tmp_path):
    """rich wraps at 80 columns when stderr is not a terminal; a long path must stay on one line."""
    src = tmp_path / ("a-rather-long-folder-name-" * 4)
    src.mkdir()
    (src / "bad-utf8-file-with-a-long-name.txt").write_bytes(b"caf\xe9 au lait\n\n" * 300 + b"more text\n\n" * 300)
    r = subprocess.run([sys.executable, "-m", "gptforge", "prepare", str(src), "--out", str(tmp_path / "o"),
                        "--vocab-size", "300", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "bad-utf8-file-with-a-long-name.txt: not valid UTF-8" in warning[0]


def test_checkpoint_files_share_one_mode(ckpt):
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
    assert len(set(modes.values())) == 1, modes


# --- runs ------------------------------------------------------------------------------------------------

def test_second_train_into_a_run_is_refused(prepared, run_dir, capsys):
    before = snapshot(run_dir)
    code, err = cli(capsys, "train", "--model", "tiny", "--data", prepared, "--out", run_dir, "--train.max_steps", "2")
    assert_one_line(code, err, "--resume auto", "new --out")
    assert snapshot(run_dir) == before


def test_resume_auto_into_a_foreign_folder_is_refused(prepared, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert_one_line(*cli(capsys, "train", "--model", "tiny", "--data", prepared, "--out", tmp_path, "--resume", "auto"),
                    "not a gptforge run directory")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_resume_auto_follows_latest_and_pruning_keeps_this_runs_newest(cfg, tok, tmp_path):
    run = tmp_path / "run"
    state = {"step": 0}
    weights = GPT(cfg.model).state_dict()
    for step in (10, 20, 30):
        save_checkpoint(run, step, cfg, tok, {**state, "step": step}, keep=5, model_state=weights)
    # resumed from step 10: the next saves are this timeline's; step 30 and 20 are from the one it left
    for step in (12, 14):
        dest = save_checkpoint(run, step, cfg, tok, {**state, "step": step}, keep=2, model_state=weights)
        assert dest.is_dir()
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000012", "step-00000014"]
    assert (root / LATEST).read_text().strip() == "step-00000014"
    save_checkpoint(run, 30, cfg, tok, {**state, "step": 30}, keep=5, model_state=weights)
    (root / LATEST).write_text("step-00000012\n")  # latest names an older step than the highest: it wins
    assert find_resumable(run) == root / "step-00000012"


def test_keep_last_one_never_deletes_the_checkpoint_just_written(cfg, tok, tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 100, cfg, tok, {"step": 100}, keep=1)  # a stale higher step, as a second run once left
    dest = save_checkpoint(run, 4, cfg, tok, {"step": 4}, keep=1)
    latest = run / "checkpoints" / (run / "checkpoints" / LATEST).read_text().strip()
    assert dest.is_dir() and latest == dest


# --- faults ----------------------------------------------------------------------------------------------

def enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def torch_runtime(*a, **k):
    raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file data/0: file write failed")


def safetensor_error(*a, **k):
    raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")


FAULTS = {"enospc": enospc, "runtime": torch_runtime, "safetensors": safetensor_error}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("target", ["save_file", "torch.save"])
def test_checkpoint_save_fault(fault, target, cfg, tok, tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run, 2, cfg, tok, {"step": 2}, keep=3, model_state=GPT(cfg.model).state_dict())
    before = snapshot(tmp_path)
    if target == "save_file":
        monkeypatch.setattr(checkpoint_mod, "save_file", FAULTS[fault])
    else:
        monkeypatch.setattr(torch, "save", FAULTS[fault])
    with pytest.raises(GptforgeError) as e:
        save_checkpoint(run, 4, cfg, tok, {"step": 4}, keep=3, model_state=GPT(cfg.model).state_dict())
    assert "\n" not in str(e.value) and "step-00000004" in str(e.value) and "intact" in str(e.value)
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_train_save_fault_keeps_the_last_checkpoint(fault, prepared, run_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = snapshot(tmp_path)
    monkeypatch.setattr(torch, "save", FAULTS[fault])
    code, err = cli(capsys, "train", "--model", "tiny", "--data", prepared, "--out", run, "--resume", "auto",
                    "--train.max_steps", "6", "--train.micro_batch", "4", "--train.seq_len", "32",
                    "--train.save_every", "2", "--train.eval_every", "100", "--train.tensorboard", "false")
    assert code == 2 and "Traceback" not in err, err  # the run's log lines come first; the error is one line
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and err.rstrip().endswith(errors[0])
    assert not leftovers(tmp_path)
    after = snapshot(tmp_path)
    ckpts = {k: v for k, v in before.items() if "checkpoints" in k}
    assert {k: after.get(k) for k in ckpts} == ckpts  # every checkpoint and pointer as it was
    monkeypatch.undo()
    assert find_resumable(run) is not None


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("verb", ["quantize", "prune", "import-hf", "export-hf", "prepare", "report"])
def test_verb_write_fault(verb, fault, ckpt, run_dir, prepared, tmp_path, monkeypatch, capsys):
    """Each verb writes over an earlier output of its own (--overwrite) and fails mid-write: the earlier
    output is byte-identical, no temporary file is left, and the error is one line."""
    import matplotlib.figure
    import safetensors.torch

    import gptforge.data as data_mod
    from gptforge.interop import export_hf

    hf = tmp_path / "hf"
    export_hf(ckpt, hf)
    small = tmp_path / "small.txt"
    small.write_text("Some words for a small corpus.\n\n" * 50)
    out = tmp_path / "out"
    argv = {"quantize": ["quantize", ckpt, "--method", "int8"],
            "prune": ["prune", ckpt, "--method", "magnitude", "--sparsity", "0.5"],
            "import-hf": ["import-hf", hf],
            "export-hf": ["export-hf", ckpt],
            "prepare": ["prepare", small, "--tokenizer", Path(prepared) / "tokenizer.json"],
            "report": ["report", run_dir]}[verb]
    code, err = cli(capsys, *argv, "--out", out)
    assert code == 0, err
    before = snapshot(tmp_path)
    if verb == "export-hf":
        monkeypatch.setattr(safetensors.torch, "save_file", FAULTS[fault])
    elif verb == "prepare":
        monkeypatch.setattr(data_mod.ShardWriter, "write", FAULTS[fault])
    elif verb == "report":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", FAULTS[fault])
    else:
        monkeypatch.setattr(checkpoint_mod, "save_file", FAULTS[fault])
    code, err = cli(capsys, *argv, "--out", out, "--overwrite")
    assert_one_line(code, err, "could not write", str(out))
    if fault == "enospc":
        assert "free some space" in err and "MB free" in err
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


# --- a real full disk -------------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A 20 MB tmpfs, mounted for the test where the machine allows it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root or CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # a file a failed writer still holds: detach


def fill(mnt: Path, leave: int) -> None:
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_full_tmpfs_during_checkpoint_save(cfg, tok, tmpfs):
    state = {"step": 2, "optimizer": {"m": torch.zeros(300_000)}}
    save_checkpoint(tmpfs / "run", 2, cfg, tok, state, keep=3, model_state=GPT(cfg.model).state_dict())
    fill(tmpfs, 600_000)  # room for model.safetensors (~0.4 MB), not for the 1.2 MB trainer state
    before = snapshot(tmpfs)
    with pytest.raises(GptforgeError) as e:
        save_checkpoint(tmpfs / "run", 4, cfg, tok, {**state, "step": 4}, keep=3, model_state=GPT(cfg.model).state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "free some space" in msg and "MB free" in msg, msg
    assert snapshot(tmpfs) == before and not leftovers(tmpfs)
    assert find_resumable(tmpfs / "run") == tmpfs / "run" / "checkpoints" / "step-00000002"


def test_full_tmpfs_during_prepare(tmpfs, plays_dir, capsys):
    fill(tmpfs, 200_000)
    before = snapshot(tmpfs)
    code, err = cli(capsys, "prepare", plays_dir, "--out", tmpfs / "data", "--vocab-size", "300")
    assert_one_line(code, err, "could not write prepared data", "free some space")
    assert snapshot(tmpfs) == before and not leftovers(tmpfs) and not (tmpfs / "data").exists()
    os.remove(tmpfs / "filler")
