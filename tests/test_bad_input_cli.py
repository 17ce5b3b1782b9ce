"""The CLI bad-input matrix (issue 19): every verb, fed bad paths, existing files and folders as --out, the same
path in and out, missing and malformed files, mismatched vocabularies and out-of-range numbers. Each case must exit
with status 2, name the problem, print no traceback, and leave every file of a prepared tree byte-identical (and
create none). docs/bad_input.md holds the table with its counts per verb; keep the two in step.

The CLI runs in-process (gptforge.cli.main) so that the whole table takes seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import save_checkpoint, write_checkpoint
from gptforge.cli import main
from gptforge.compress.run import quantize_checkpoint
from gptforge.config import RunConfig, TrainConfig, model_preset
from gptforge.data import TokenData, prepare
from gptforge.interop import export_hf
from gptforge.model import GPT

# (verb, argv with {W} for the prepared tree, text the message must hold). Exit status 2 for every row.
CASES = [
    # prepare
    ("prepare", "prepare {W}/no-such.txt --out {W}/new", "source not found"),
    ("prepare", "prepare {W}/src --out {W}/file.txt", "existing file"),
    ("prepare", "prepare {W}/src --out {W}/precious", "--overwrite"),
    ("prepare", "prepare {W}/src --out {W}/precious --overwrite", "not a prepared-data folder"),
    ("prepare", "prepare {W}/src --out {W}/ckpt --overwrite", "not a prepared-data folder"),
    ("prepare", "prepare {W}/src --out {W}/src --overwrite", "is the input"),
    ("prepare", "prepare {W}/src --out {W}/src/inner", "inside the input"),
    ("prepare", "prepare {W}/src/a.txt --out {W}/src", "holds the input"),
    ("prepare", "prepare {W}/src --out /proc/gptforge-x", "cannot write"),
    ("prepare", "prepare {W}/src --out {W}/file.txt/sub", "is a file"),
    ("prepare", "prepare {W}/src --out {W}/new --tokenizer {W}/data/tokenizer.json --vocab-size 300", "not both"),
    ("prepare", "prepare {W}/bad.jsonl --out {W}/new", "not valid JSON"),
    ("prepare", "prepare {W}/nofield.jsonl --out {W}/new", "no 'text' field"),
    ("prepare", "prepare {W}/empty.txt --out {W}/new", "empty corpus"),
    ("prepare", "prepare {W}/nomatch-*.txt --out {W}/new", "matches no files"),
    ("prepare", "prepare {W}/src --out {W}/new --tokenizer {W}/no-such-tokenizer.json", "no-such-tokenizer.json"),
    ("prepare", "prepare {W}/src --out {W}/new --vocab-size 100", "vocab"),
    ("prepare", "prepare {W}/src --out {W}/new --val-fraction 1.5", "val"),
    ("prepare", "prepare {W}/src --out {W}/new --shard-tokens 0", "shard"),
    # train
    ("train", "train --model tiny --out {W}/new", "--data"),
    ("train", "train --model tiny --data {W}/precious --out {W}/new", "not a prepared data directory"),
    ("train", "train --model tiny --data {W}/data --out {W}/run", "--resume auto"),
    ("train", "train --model tiny --data {W}/data --out {W}/precious --resume auto", "not a gptforge run directory"),
    ("train", "train --model tiny --data {W}/data --out {W}/file.txt", "existing file"),
    ("train", "train --model tiny --data {W}/data --out {W}/data", "is the input"),
    ("train", "train --model tiny --data {W}/data --out {W}/data/run", "inside the input"),
    ("train", "train --model tiny --data {W}/data --out {W}/new --train.lrr 1", "did you mean 'lr'"),
    ("train", "train --model tiny --data {W}/data --out {W}/new --train.lr abc", "lr"),
    ("train", "train --model tiny --data {W}/data --out {W}/new --train.micro_batch 0", "micro_batch"),
    ("train", "train --model tiny --data {W}/data --out {W}/new --train.seq_len 4096", "block_size"),
    ("train", "train --config {W}/bad.yaml --data {W}/data --out {W}/new", "bad.yaml"),
    ("train", "train --config {W}/badkey.yaml --data {W}/data --out {W}/new", "n_layers"),
    ("train", "train --config {W}/no-such.yaml --data {W}/data --out {W}/new", "no-such.yaml"),
    ("train", "train --model tiny --data {W}/data --out {W}/new --resume {W}/ckpt --init-from {W}/ckpt", "not both"),
    ("train", "train --model tiny --data {W}/data --out {W}/new --resume {W}/no-such", "not found"),
    ("train", "train --model tiny --data {W}/data --out {W}/new --init-from {W}/q", "quantized"),
    ("train", "train --model tiny --data {W}/other --out {W}/new --init-from {W}/ckpt", "tokenizer"),
    ("train", "train --model nope --data {W}/data --out {W}/new", "invalid choice"),
    # generate
    ("generate", "generate {W}/no-such --prompt hi", "checkpoint not found"),
    ("generate", "generate {W}/precious --prompt hi", "holds no checkpoint"),
    ("generate", "generate {W}/truncated --prompt hi", "model.safetensors"),
    ("generate", "generate {W}/ckpt --prompt hi --prompt-file {W}/file.txt", "not both"),
    ("generate", "generate {W}/ckpt --prompt-file {W}/no-such.txt", "prompt file not found"),
    ("generate", "generate {W}/ckpt --prompt hi --threads 0", "--threads"),
    ("generate", "generate {W}/ckpt --prompt hi --temperature -1", "temperature"),
    ("generate", "generate {W}/ckpt --prompt hi --top-p 1.5", "top_p"),
    # serve
    ("serve", "serve {W}/no-such", "checkpoint not found"),
    ("serve", "serve {W}/precious", "holds no checkpoint"),
    # consolidate
    ("consolidate", "consolidate {W}/ckpt", "already a single-file checkpoint"),
    ("consolidate", "consolidate {W}/no-such", "checkpoint not found"),
    # demo
    ("demo", "demo --out {W}/file.txt", "existing file"),
    ("demo", "demo --out {W}/precious", "--overwrite"),
    ("demo", "demo --out {W}/precious --overwrite", "not a demo folder"),
    ("demo", "demo --out {W}/ckpt --overwrite", "not a demo folder"),
    # plan and bench
    ("plan", "plan tiny --deadline 3", "--recommend"),
    ("plan", "plan {W}/no-such.yaml", "no-such.yaml"),
    ("plan", "plan tiny --tokens lots", "lots"),
    ("bench", "bench {W}/no-such.yaml", "no-such.yaml"),
    # report
    ("report", "report {W}/no-such", "run directory not found"),
    ("report", "report {W}/precious", "no metrics.jsonl"),
    ("report", "report {W}/badrun", "not a JSON line"),
    ("report", "report {W}/run --out {W}/file.txt", "existing file"),
    ("report", "report {W}/run --out {W}/run", "is the input"),
    ("report", "report {W}/run --out {W}/precious", "--overwrite"),
    ("report", "report {W}/run --out {W}/precious --overwrite", "not a report folder"),
    # quantize
    ("quantize", "quantize {W}/ckpt --method int3 --out {W}/new", "int3"),
    ("quantize", "quantize {W}/ckpt --method int4 --group-size 7 --out {W}/new", "group"),
    ("quantize", "quantize {W}/no-such --method int8 --out {W}/new", "checkpoint not found"),
    ("quantize", "quantize {W}/ckpt --method int8 --out {W}/file.txt", "existing file"),
    ("quantize", "quantize {W}/ckpt --method int8 --out {W}/precious", "--overwrite"),
    ("quantize", "quantize {W}/ckpt --method int8 --out {W}/precious --overwrite", "not a checkpoint folder"),
    ("quantize", "quantize {W}/ckpt --method int8 --out {W}/ckpt --overwrite", "is the input"),
    ("quantize", "quantize {W}/run --method int8 --out {W}/run --overwrite", "is the input"),
    ("quantize", "quantize {W}/run --method int8 --out {W}/run/q", "inside the input"),
    ("quantize", "quantize {W}/q --method int8 --out {W}/new", "already quantized"),
    # prune
    ("prune", "prune {W}/ckpt --method snip --sparsity 0.5 --out {W}/new", "snip"),
    ("prune", "prune {W}/ckpt --method magnitude --sparsity 1.5 --out {W}/new", "sparsity"),
    ("prune", "prune {W}/ckpt --method wanda --sparsity 0.5 --out {W}/new", "needs --data"),
    ("prune", "prune {W}/ckpt --method magnitude --sparsity 0.5 --recover-steps -1 --out {W}/new", "--recover-steps"),
    ("prune", "prune {W}/ckpt --method magnitude --sparsity 0.5 --out {W}/ckpt --overwrite", "is the input"),
    ("prune", "prune {W}/ckpt --method magnitude --sparsity 0.5 --out {W}/precious", "--overwrite"),
    ("prune", "prune {W}/ckpt --method wanda --sparsity 0.5 --data {W}/other --out {W}/new", "tokenizer"),
    ("prune", "prune {W}/ckpt --method magnitude --pattern 5:4 --out {W}/new", "5:4"),
    # distill
    ("distill", "distill --teacher {W}/no-such --student tiny --data {W}/data --out {W}/new", "not found"),
    ("distill", "distill --teacher {W}/ckpt --student {W}/no-such.yaml --data {W}/data --out {W}/new", "no-such.yaml"),
    ("distill", "distill --teacher {W}/ckpt --student tiny --data {W}/other --out {W}/new", "tokenizer"),
    ("distill", "distill --teacher {W}/ckpt --student tiny --data {W}/data --out {W}/run", "new --out"),
    ("distill", "distill --teacher {W}/ckpt --student tiny --data {W}/data --out {W}/file.txt", "existing file"),
    ("distill", "distill --teacher {W}/ckpt --student tiny --data {W}/data --out {W}/new --temperature 0", "temperature"),
    # eval
    ("eval", "eval {W}/no-such --data {W}/data", "checkpoint not found"),
    ("eval", "eval {W}/ckpt --data {W}/precious", "not a prepared data directory"),
    ("eval", "eval {W}/ckpt --data {W}/other", "tokenizer"),
    ("eval", "eval {W}/ckpt --data {W}/data --batches 0", "batches"),
    # import-hf
    ("import-hf", "import-hf {W}/precious --out {W}/new", "not a Hugging Face model folder"),
    ("import-hf", "import-hf {W}/hf --out {W}/hf --overwrite", "is the input"),
    ("import-hf", "import-hf {W}/hf --out {W}/hf/inner", "inside the input"),
    ("import-hf", "import-hf {W}/hf --out {W}/precious", "--overwrite"),
    ("import-hf", "import-hf {W}/hf --out {W}/file.txt", "existing file"),
    ("import-hf", "import-hf {W}/badhf --out {W}/new", "not valid JSON"),
    ("import-hf", "import-hf {W}/hf --out {W}/hf2 --overwrite", "not a checkpoint folder"),
    # export-hf
    ("export-hf", "export-hf {W}/ckpt --out {W}/precious", "--overwrite"),
    ("export-hf", "export-hf {W}/ckpt --out {W}/precious --overwrite", "not a Hugging Face export"),
    ("export-hf", "export-hf {W}/ckpt --out {W}/ckpt --overwrite", "is the input"),
    ("export-hf", "export-hf {W}/ckpt --out {W}/file.txt", "existing file"),
    ("export-hf", "export-hf {W}/q --out {W}/new", "quantized"),
    ("export-hf", "export-hf {W}/no-such --out {W}/new", "checkpoint not found"),
    # export-gguf
    ("export-gguf", "export-gguf {W}/no-such --out {W}/new.gguf", "checkpoint not found"),
    ("export-gguf", "export-gguf {W}/ckpt --out {W}/file.txt", "--overwrite"),
    ("export-gguf", "export-gguf {W}/ckpt --out {W}/file.txt --overwrite", "not a GGUF"),
    ("export-gguf", "export-gguf {W}/ckpt --out {W}/precious", "folder"),
    ("export-gguf", "export-gguf {W}/ckpt --out {W}/ckpt/model.gguf", "inside the input"),
    ("export-gguf", "export-gguf {W}/q --out {W}/new.gguf", "quantized"),
    ("export-gguf", "export-gguf {W}/truncated --out {W}/new.gguf", "truncated"),
    ("export-gguf", "export-gguf {W}/ckpt --out {W}/new.gguf --type q5_k", "unknown --type"),
    # finetune
    ("finetune", "finetune {W}/no-such --data {W}/data --out {W}/new", "checkpoint not found"),
    ("finetune", "finetune {W}/ckpt --data {W}/data --out {W}/precious", "new --out"),
    ("finetune", "finetune {W}/ckpt --data {W}/data --out {W}/ckpt", "is the input"),
    ("finetune", "finetune {W}/ckpt --data {W}/data --out {W}/file.txt", "existing file"),
    ("finetune", "finetune {W}/ckpt --data {W}/data --out {W}/new --method qlora", "qlora"),
    ("finetune", "finetune {W}/ckpt --data {W}/data --out {W}/new --task summarize", "summarize"),
    ("finetune", "finetune {W}/ckpt --data {W}/bad.jsonl --out {W}/new --task chat", "bad.jsonl"),
    ("finetune", "finetune {W}/ckpt --data {W}/nofield.jsonl --out {W}/new --task classify", "nofield.jsonl"),
    ("finetune", "finetune {W}/ckpt --data {W}/other --out {W}/new", "tokenizer"),
    ("finetune", "finetune {W}/ckpt --data {W}/data --out {W}/new --lora-rank 0 --method lora", "rank"),
    # classify
    ("classify", "classify {W}/ckpt --text hi --input {W}/nofield.jsonl", "not both"),
    ("classify", "classify {W}/ckpt --text hi", "classifier"),
    ("classify", "classify {W}/no-such --text hi", "not found"),
]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def all_paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def world(prepared, tmp_path_factory) -> Path:
    """One tree every case runs against: prepared data (and data with another tokenizer), a checkpoint, a
    quantized and a truncated one, a run, an HF export, a folder of the user's notes, and malformed files."""
    w = tmp_path_factory.mktemp("world")
    shutil.copytree(prepared, w / "data")
    tok = TokenData(prepared).tokenizer()
    cfg = RunConfig(model=dataclasses.replace(model_preset("tiny"), vocab_size=tok.vocab_size),
                    train=TrainConfig(micro_batch=2, seq_len=32, tensorboard=False))
    torch.manual_seed(0)
    state = GPT(cfg.model).state_dict()
    write_checkpoint(w / "ckpt", cfg, tok, model_state=state)
    quantize_checkpoint(str(w / "ckpt"), "int8", str(w / "q"))
    shutil.copytree(w / "ckpt", w / "truncated")
    (w / "truncated" / "model.safetensors").write_bytes((w / "ckpt" / "model.safetensors").read_bytes()[:1000])
    save_checkpoint(w / "run", 2, dataclasses.replace(cfg, data=str(w / "data"), out=str(w / "run")), tok,
                    {"step": 2}, keep=3, model_state=state)
    cfg.save(w / "run" / "config.yaml")
    (w / "run" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 6.0 - s}) + "\n" for s in (1, 2)))
    (w / "badrun").mkdir()
    (w / "badrun" / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{not json\n')
    export_hf(w / "ckpt", w / "hf")
    shutil.copytree(w / "hf", w / "hf2")
    shutil.copytree(w / "hf", w / "badhf")
    (w / "badhf" / "config.json").write_text("{ not json")
    (w / "precious").mkdir()
    (w / "precious" / "notes.txt").write_text("my notes\n")
    (w / "file.txt").write_text("hi\n")
    (w / "src").mkdir()
    (w / "src" / "a.txt").write_text("Some words to tokenize.\n\n" * 100)
    (w / "src" / "b.txt").write_text("Other words to tokenize.\n\n" * 100)
    prepare([str(w / "src")], w / "other", vocab_size=300, val_fraction=0.5, progress=False)
    (w / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (w / "nofield.jsonl").write_text('{"body": "no text field here"}\n')
    (w / "empty.txt").write_text("")
    (w / "bad.yaml").write_text("model: [unclosed\n  train: {\n")
    (w / "badkey.yaml").write_text("model:\n  n_layers: 2\n")
    return w


@pytest.fixture(scope="module")
def before(world) -> tuple[dict[str, str], set[str]]:
    return tree_hashes(world), all_paths(world)


@pytest.mark.parametrize("verb, argv, needle", CASES, ids=[f"{i:03d}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input(verb, argv, needle, world, before, capsys):
    args = [a.replace("{W}", str(world)) for a in argv.split()]
    assert args[0] == verb
    try:
        code = main([*args, "--no-progress"])
    except SystemExit as e:  # argparse's own errors (usage line + message), exit 2
        code = e.code
    out, err = capsys.readouterr()
    hashes, paths = before
    created = all_paths(world) - paths
    for p in sorted(created, key=len):  # keep the next cases' tree clean; this one fails below
        shutil.rmtree(world / p, ignore_errors=True) if (world / p).is_dir() else (world / p).unlink(missing_ok=True)
    assert not created, f"created {sorted(created)}"
    assert code == 2, f"exit {code}\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    assert needle.replace("{W}", str(world)) in err, err
    if "usage:" not in err:  # ours: exactly one line
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert tree_hashes(world) == hashes  # every file as it was, and (above) none created: no temp or half outputs


def test_matrix_covers_every_verb_and_is_large_enough():
    from gptforge.cli import build_parser

    verbs = set(next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices)
    counts = Counter(c[0] for c in CASES)
    assert len(CASES) >= 60
    assert verbs - set(counts) <= {"curate"}, verbs - set(counts)  # curate's own table lives in test_curate.py
