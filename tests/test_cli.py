"""The command line: its verbs and flags (listed here so that adding one is a deliberate act) and its errors."""

import argparse
import subprocess
import sys

import pytest

from gptforge import __version__
from gptforge.cli import build_parser, main

COMMON = {"--debug", "--no-progress", "-h", "--help"}
EXPECTED = {
    "prepare": {"--out", "--tokenizer", "--vocab-size", "--val-fraction", "--seed", "--text-field", "--dataset-split",
                "--shard-tokens", "--include",
                "--overwrite", "--curate", "--dedup"},
    "curate": {"--out", "--overwrite", "--dry-run", "--json", "--mix", "--seed", "--keep", "--rules", "--dedup", "--pii",
               "--text-field", "--workers", "--tokenizer", "--jaccard", "--num-perm", "--shingle-words", "--boilerplate-min-chars",
               "--boilerplate-min-docs", "--min-words", "--max-words", "--min-mean-word-length", "--max-mean-word-length",
               "--max-symbol-ratio", "--min-alnum-ratio", "--max-bullet-lines", "--max-ellipsis-lines",
               "--min-alpha-words", "--min-stop-words", "--max-dup-line-fraction", "--max-dup-line-chars",
               "--max-dup-para-fraction", "--max-dup-para-chars", "--max-top-ngram", "--max-dup-ngram",
               "--c4-min-line-words", "--c4-min-sentences", "--languages", "--min-language-score",
               "--perplexity-model", "--max-perplexity"},
    "train": {"--config", "--model", "--data", "--out", "--resume", "--init-from", "--nproc"},
    "generate": {"--prompt", "--prompt-file", "--max-new-tokens", "--temperature", "--top-k", "--seed", "--device",
                 "--top-p", "--min-p", "--repetition-penalty", "--presence-penalty", "--frequency-penalty", "--stop",
                 "--ignore-eos", "--truncate-prompt", "--dtype", "--compile", "--threads", "--chat", "--system",
                 "--kv-dtype", "--verbose"},
    "serve": {"--host", "--port", "--model-name", "--api-key", "--max-batch", "--max-queue", "--max-prompt-tokens",
              "--max-prefill-tokens", "--prefix-cache-tokens", "--kv-dtype", "--max-tokens", "--max-body-bytes", "--request-timeout", "--shutdown-timeout",
              "--adapter", "--embedding-pooling", "--device", "--dtype", "--threads"},
    "demo": {"--out", "--minutes", "--overwrite"},
    "consolidate": {"--out", "--overwrite"},
    "plan": {"--seq-len", "--micro-batch", "--global-batch", "--precision", "--optimizer", "--checkpointing",
             "--attention", "--parallel", "--fsdp-strategy", "--world-size", "--nodes", "--hardware", "--tokens",
             "--mfu", "--recommend", "--deadline", "--measure", "--device", "--steps", "--json"},
    "bench": {"--device", "--precision", "--micro-batch", "--seq-len", "--steps", "--decode-tokens", "--hardware",
              "--mfu", "--json"},
    "report": {"--out", "--task", "--limit", "--overwrite"},
    "quantize": {"--method", "--group-size", "--activations", "--out", "--overwrite"},
    "prune": {"--method", "--sparsity", "--pattern", "--data", "--recover-steps", "--out", "--overwrite"},
    "distill": {"--teacher", "--student", "--data", "--out", "--temperature", "--kl-weight", "--ce-weight"},
    "eval": {"--data", "--task", "--limit", "--shots", "--seed", "--batches", "--batch-size", "--seq-len", "--decode-tokens", "--threads", "--json"},
    "import-hf": {"--out", "--overwrite"},
    "export-hf": {"--out", "--overwrite", "--architecture"},
    "export-gguf": {"--out", "--type", "--overwrite"},
    "finetune": {"--data", "--out", "--method", "--task", "--val-data", "--val-fraction", "--lora-rank", "--lora-alpha",
                 "--lora-dropout", "--lora-targets"},
    "classify": {"--text", "--input", "--json"},
}


def subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_verbs_and_flags_are_exactly_these():
    verbs = subcommands(build_parser())
    assert set(verbs) == set(EXPECTED)
    for verb, sub in verbs.items():
        flags = {s for a in sub._actions for s in a.option_strings}
        assert flags == EXPECTED[verb] | COMMON, verb
        for a in sub._actions:
            assert a.help, f"{verb} {a.option_strings or a.dest} has no help text"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["prepare", "no/such/file.txt", "--out", "OUT"], "source not found"),
    (["train", "--data", "no/such/dir", "--out", "OUT"], "not a prepared data directory"),
    (["train", "--model", "tiny", "--train.lrr", "1"], "did you mean 'lr'"),
    (["generate", "no/such/ckpt"], "checkpoint not found"),
    (["serve", "no/such/ckpt"], "checkpoint not found"),
    (["serve", "no/such/ckpt", "--max-batch", "0"], "--max-batch) must be >= 1"),
    (["quantize", "no/such/ckpt", "--method", "int3", "--out", "OUT"], "unknown quantization method"),
    (["prune", "no/such/ckpt", "--method", "magnitude", "--sparsity", "1.5", "--out", "OUT"], "--sparsity must be in (0, 1)"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ")


def test_debug_shows_the_traceback(tmp_path):
    r = run_cli("prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "GptforgeError" in r.stderr


def test_prepare_train_generate_through_the_cli(plays_dir, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    r = run_cli("prepare", str(plays_dir), "--out", str(data), "--vocab-size", "400", "--val-fraction", "0.25", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "MB/s" in r.stdout and "bytes/token" in r.stdout
    r = run_cli("train", "--model", "tiny", "--data", str(data), "--out", str(run), "--no-progress",
                "--train.max_steps", "20", "--train.micro_batch", "4", "--train.seq_len", "32", "--train.eval_batches", "2")
    assert r.returncode == 0, r.stderr
    assert "val loss" in r.stdout and "checkpoint:" in r.stdout
    r = run_cli("generate", str(run), "--prompt", "KING", "--max-new-tokens", "10", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("KING")
    again = run_cli("generate", str(run), "--prompt", "KING", "--max-new-tokens", "10", "--seed", "1")
    assert again.stdout == r.stdout
    r = run_cli("generate", str(run), "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr


def test_checkpoint_with_wrong_tokenizer_for_data(plays_dir, tmp_path, prepared):
    """A checkpoint resumed on shards made with another tokenizer is refused by fingerprint."""
    data = tmp_path / "d"
    assert run_cli("prepare", str(plays_dir), "--out", str(data), "--vocab-size", "300", "--no-progress").returncode == 0
    run = tmp_path / "run"
    assert run_cli("train", "--model", "tiny", "--data", str(prepared), "--out", str(run), "--no-progress",
                   "--train.max_steps", "2", "--train.seq_len", "32", "--train.eval_batches", "1").returncode == 0
    r = run_cli("train", "--model", "tiny", "--data", str(data), "--out", str(run), "--resume", "auto", "--no-progress")
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_generate_chat_session(prepared, tmp_path, capsys, monkeypatch):
    """--chat: each stdin line is a user turn rendered with the ChatML template; the replies are exactly
    stream() over Tokenizer.encode_chat of the conversation so far (greedy), the first reply in the second prompt."""
    import dataclasses
    import io

    import torch

    from gptforge.checkpoint import write_checkpoint
    from gptforge.cli import main
    from gptforge.config import RunConfig, model_preset
    from gptforge.data import TokenData
    from gptforge.generate import load, stream
    from gptforge.model import GPT

    tok = TokenData(prepared).tokenizer()
    cfg = RunConfig(model=dataclasses.replace(model_preset("tiny"), vocab_size=tok.vocab_size))
    torch.manual_seed(0)
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, tok, model_state=GPT(cfg.model).state_dict())
    monkeypatch.setattr("sys.stdin", io.StringIO("Who art thou?\nAnd then?\n"))
    assert main(["generate", str(ckpt), "--chat", "--system", "Be brief.", "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    model, tok = load(ckpt)
    messages = [{"role": "system", "content": "Be brief."}]
    expected = []
    for turn in ("Who art thou?", "And then?"):
        messages.append({"role": "user", "content": turn})
        ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
        reply = "".join(stream(model, tok, ids, max_new_tokens=6, temperature=0.0, stop=("<|im_end|>",)))
        messages.append({"role": "assistant", "content": reply})
        expected.append(f"assistant> {reply}\n")
    assert out == "".join(expected)
    assert main(["generate", str(ckpt), "--system", "x"]) == 2  # --system without --chat


def test_help_imports_no_torch_and_every_verb_formats_its_help():
    """The parser is built from config.py and settings.py alone (torch-free), so `gptforge --help` and `gptforge VERB --help`
    start without importing torch, the server's or the plots' libraries."""
    code = ("import sys\nfrom gptforge.cli import build_parser\nparser = build_parser()\nparser.format_help()\n"
            "for sub in next(a for a in parser._actions if a.choices and 'serve' in a.choices).choices.values():\n"
            "    sub.format_help()\n"
            "print(sorted(m for m in ('torch', 'fastapi', 'matplotlib', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, cls, prefix", [
    (["serve", "CKPT"], "ServeConfig", ""),
    (["generate", "CKPT"], "SamplingParams", ""),
    (["eval", "CKPT"], "EvalConfig", ""),
    (["bench"], "BenchConfig", ""),
    (["demo"], "DemoConfig", ""),
    (["distill", "--teacher", "T", "--student", "tiny", "--data", "D", "--out", "O"], "DistillConfig", ""),
    (["finetune", "CKPT", "--data", "D", "--out", "O"], "FinetuneSpec", ""),
    (["finetune", "CKPT", "--data", "D", "--out", "O"], "LoRAConfig", "lora_"),
    (["curate", "SRC"], "CurateConfig", ""),
    (["prune", "CKPT", "--method", "magnitude", "--out", "O"], "PruneConfig", ""),
])
def test_flag_defaults_are_the_config_fields(argv, cls, prefix):
    """A verb's flags built from a typed config read its fields' defaults (the one place they are written), and
    reading the flags back gives the dataclass's own default instance."""
    import dataclasses

    from gptforge import config, settings
    from gptforge.cli import field_values

    cls = getattr(settings, cls, None) or getattr(config, cls)
    args = build_parser().parse_known_args(argv)[0]
    flagged = [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.metadata.get("flag", True)]
    assert flagged and all(hasattr(args, prefix + f.name) for f in flagged)
    assert all(getattr(args, prefix + f.name) == f.default for f in flagged)
    assert cls(**field_values(args, cls, prefix)) == cls()


def test_plain_flag_defaults_are_the_library_defaults():
    """Flags not built from a dataclass still read the one default the library function has."""
    import inspect

    from gptforge.compress.run import prune_checkpoint
    from gptforge.curate import curate
    from gptforge.generate import load
    from gptforge.serve.app import serve

    parser = build_parser()
    cur = parser.parse_args(["curate", "SRC", "--dry-run"])
    sig = inspect.signature(curate).parameters
    assert (cur.seed, cur.text_field) == (sig["seed"].default, sig["text_field"].default) == (0, "text")
    prune = parser.parse_args(["prune", "CKPT", "--method", "magnitude", "--out", "O"])
    assert prune.recover_steps == inspect.signature(prune_checkpoint).parameters["recover_steps"].default == 0
    for verb, fn in (("generate", load), ("serve", serve)):
        args = parser.parse_args([verb, "CKPT"])
        sig = inspect.signature(fn).parameters
        assert (args.device, args.dtype) == (sig["device"].default, sig["dtype"].default) == ("auto", "auto")
