import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gptforge.checkpoint import load_trainer_state, resolve_checkpoint
from gptforge.compress.distill import distill
from gptforge.config import RunConfig, TrainConfig, model_preset
from gptforge.data import prepare
from gptforge.errors import GptforgeError
from gptforge.finetune.run import finetune
from gptforge.generate import generate
from gptforge.loader import load_checkpoint
from gptforge.optim import lr_at
from gptforge.settings import FinetuneSpec
from gptforge.train import train


def small_run(data, out, **train_kw) -> RunConfig:
    tc = TrainConfig(micro_batch=8, seq_len=64, max_steps=60, warmup_steps=5, lr=3e-3, eval_every=30,
                     eval_batches=4, log_every=10, save_every=40, keep_last=2, seed=3)
    return RunConfig(model=model_preset("tiny"), train=dataclasses.replace(tc, **train_kw), data=str(data), out=str(out))


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(small_run(prepared, out), progress=False)


def test_prepare_train_generate_end_to_end(run, prepared):
    assert run.steps == 60 and run.tokens == 60 * 8 * 64
    assert run.final_val_loss < run.first_val_loss - 0.5  # it learned something from real text
    model, tok, cfg = load_checkpoint(run.run_dir)
    assert cfg.model.vocab_size == tok.vocab_size == 512  # the data's tokenizer sized the model
    text = generate(model, tok, "ROMEO", max_new_tokens=30, temperature=0.8, seed=0)
    assert isinstance(text, str) and text == generate(model, tok, "ROMEO", max_new_tokens=30, temperature=0.8, seed=0)


def test_loss_falls_in_the_log(run):
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]


def test_checkpoint_layout(run):
    ckpts = sorted((run.run_dir / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000040", "step-00000060"]  # keep_last=2
    assert resolve_checkpoint(run.run_dir) == ckpts[-1]
    # tokenizer_config.json: so that transformers' AutoTokenizer loads a checkpoint offline (Tokenizer.hf_config)
    assert {p.name for p in ckpts[-1].iterdir()} == {"model.safetensors", "config.yaml", "tokenizer.json",
                                                     "tokenizer_config.json", "trainer_state.pt"}
    keys = load_file(str(ckpts[-1] / "model.safetensors")).keys()
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    state = load_trainer_state(ckpts[-1])  # weights_only=True
    assert state["step"] == 60 and state["sampler"]["position"] == 60
    assert not list((run.run_dir / "checkpoints").glob(".tmp-*"))


def test_resume_continues_the_same_run(prepared, tmp_path):
    """Resuming from step 40 reproduces the uninterrupted run's weights at step 60 (CPU fp32)."""
    full = train(small_run(prepared, tmp_path / "full"), progress=False)
    ckpt40 = tmp_path / "full" / "checkpoints" / "step-00000040"
    resumed = train(small_run(prepared, tmp_path / "resumed"), resume=str(ckpt40), progress=False)
    assert resumed.steps == 60 and resumed.tokens == 20 * 8 * 64
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_time_limit_stops_and_saves(prepared, tmp_path):
    r = train(small_run(prepared, tmp_path, max_steps=10_000, max_time=1.2), progress=False)
    assert r.stopped_early and 0 < r.steps < 10_000
    assert resolve_checkpoint(tmp_path) == r.checkpoint and r.final_val_loss is not None


def test_resume_with_other_tokenizer_is_refused(run, plays_dir, tmp_path):
    other = tmp_path / "other"
    prepare([str(plays_dir)], other, vocab_size=600, val_fraction=0.5, progress=False)
    with pytest.raises(GptforgeError, match="tokenizer"):
        train(small_run(other, tmp_path / "r"), resume=str(run.checkpoint), progress=False)


def test_seq_len_beyond_block_is_refused(prepared, tmp_path):
    with pytest.raises(GptforgeError, match="block_size"):
        train(small_run(prepared, tmp_path, seq_len=65), progress=False)


def test_lr_schedule_shape():
    tc = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, tc) == pytest.approx(0.1)
    assert lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(60, tc) == pytest.approx(0.55)
    assert lr_at(110, tc) == pytest.approx(0.1)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 120))


def test_weight_decay_only_on_matrices():
    from gptforge.model import GPT
    from gptforge.optim import build_optimizer

    model = GPT(model_preset("tiny"))
    decay, no_decay = build_optimizer(model, TrainConfig(), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_checkpoint_from_before_the_train_state_resumes_exactly(run, prepared, tmp_path):
    """trainer_state.pt without bad_steps (written before TrainState saved it) still resumes, bit for bit."""
    old = tmp_path / "step-00000040"
    shutil.copytree(run.run_dir / "checkpoints" / "step-00000040", old)
    state = load_trainer_state(old)
    del state["bad_steps"]
    torch.save(state, old / "trainer_state.pt")
    resumed = train(small_run(prepared, tmp_path / "resumed"), resume=str(old), progress=False)
    assert resumed.steps == 60 and resumed.best_val_loss == run.best_val_loss
    a = load_file(str(run.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("verb", ["train", "distill", "finetune"])
def test_a_used_out_is_refused_naming_only_flags_the_verb_has(verb, run, prepared, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    cfg = small_run(prepared, used)
    with pytest.raises(GptforgeError, match="already holds files") as e:
        if verb == "train":
            train(cfg, progress=False)
        elif verb == "distill":
            distill(cfg, str(run.checkpoint), progress=False)
        else:
            finetune(cfg, run.checkpoint, FinetuneSpec(), data=str(prepared), progress=False)
    assert ("--resume auto" in str(e.value)) == (verb == "train") and "new --out" in str(e.value)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
