"""The `gptforge` command: one subcommand per verb, each a thin function over the library.

Bad input raises GptforgeError, printed here as one line without a traceback (exit 2); `--debug` shows it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from gptforge import __version__
from gptforge.config import MODEL_PRESETS
from gptforge.errors import GptforgeError


def cmd_prepare(args: argparse.Namespace) -> None:
    from rich.console import Console

    from gptforge.data import prepare

    if args.tokenizer is not None and args.vocab_size is not None:
        raise GptforgeError("give either --tokenizer (use an existing one) or --vocab-size (train a new one), not both")
    stats = prepare(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size or 4096,
                    val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
                    shard_tokens=args.shard_tokens, progress=not args.no_progress)
    console = Console(stderr=True)
    for w in stats.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    print(f"documents: train {stats.documents['train']:,}, val {stats.documents['val']:,}")
    print(f"tokens:    train {stats.tokens['train']:,}, val {stats.tokens['val']:,}")
    print(f"bytes/token {stats.bytes_per_token:.2f}; tokenized {stats.bytes / 1e6:.1f} MB in {stats.seconds:.2f} s "
          f"({stats.mb_per_s:.2f} MB/s); tokenizer {'loaded' if args.tokenizer else 'trained'} in {stats.tokenizer_seconds:.1f} s")
    print(f"wrote {args.out}/meta.json, tokenizer.json and the shards; next: gptforge train --data {args.out} --out runs/NAME")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    import dataclasses

    from gptforge.config import build_run_config
    from gptforge.train import train

    cfg = build_run_config(args.config, args.model, overrides)
    if args.data is not None:
        cfg = dataclasses.replace(cfg, data=args.data)
    if args.out is not None:
        cfg = dataclasses.replace(cfg, out=args.out)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s ({result.tokens_per_s:,.0f} tokens/s)")
    if result.final_val_loss is not None:
        print(f"val loss {result.first_val_loss:.4f} -> {result.final_val_loss:.4f} "
              f"(perplexity {math.exp(result.first_val_loss):.1f} -> {math.exp(result.final_val_loss):.1f})")
    print(f"checkpoint: {result.checkpoint}\nlog: {result.run_dir / 'metrics.jsonl'}")


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise GptforgeError("give either --prompt or --prompt-file, not both")
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        p = Path(args.prompt_file)
        if not p.is_file():
            raise GptforgeError(f"prompt file not found: {p}")
        return p.read_text(encoding="utf-8", errors="replace")
    if not sys.stdin.isatty():
        return sys.stdin.read()
    return ""


def cmd_generate(args: argparse.Namespace) -> None:
    from gptforge.checkpoint import load_checkpoint
    from gptforge.generate import stream
    from gptforge.train import resolve_device

    prompt = _read_prompt(args)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    sys.stdout.write(prompt)
    for delta in stream(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, seed=args.seed):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_demo(args: argparse.Namespace) -> None:
    from gptforge.demo import run_demo

    r = run_demo(args.out, args.minutes, progress=not args.no_progress)
    print()
    print(f"trained {r.steps} steps, {r.tokens:,} tokens in {r.train_seconds:.0f} s "
          f"({r.tokens / max(r.train_seconds, 1e-9):,.0f} tokens/s, {r.precision})")
    print(f"val loss {r.first_val_loss:.3f} -> {r.final_val_loss:.3f}   "
          f"perplexity {math.exp(r.first_val_loss):.0f} -> {math.exp(r.final_val_loss):.1f}")
    print("\n--- sample " + "-" * 50)
    print(r.sample)
    print("-" * 61)
    print(f"\ndemo took {r.total_seconds / 60:.1f} min. checkpoint: {r.checkpoint}")
    print(f"logs: {r.run_dir / 'metrics.jsonl'}   data: {Path(args.out) / 'data'}")
    print(f'next: gptforge generate {r.run_dir} --prompt "**ROMEO**" --max-new-tokens 300')


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    common.add_argument("--no-progress", action="store_true", help="no progress bars (plain log lines only)")

    parser = argparse.ArgumentParser(prog="gptforge", description="Train, compress and serve GPT-style models.")
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("prepare", parents=[common], help="tokenize a corpus into train/val token shards",
                       description="Read text files, folders, globs, JSONL or a bundled corpus; train or load a "
                                   "byte-level BPE tokenizer; write train/val token shards and meta.json.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="text files, folders (searched recursively), globs, .jsonl files, or a bundled corpus name (shakespeare)")
    p.add_argument("--out", required=True, help="directory to write the shards, tokenizer.json and meta.json into")
    p.add_argument("--tokenizer", help="use this tokenizer.json (or a folder with it, or with GPT-2's vocab.json + merges.txt)")
    p.add_argument("--vocab-size", type=int, help="train a new byte-level BPE of this many tokens (default 4096)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation (default 0.05)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the document split (default 1337)")
    p.add_argument("--text-field", default="text", help="JSONL field that holds the text (default: text)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="most tokens per shard file (default 100M)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", parents=[common], help="train a model on prepared shards",
                       description="Train a GPT. Settings come from a preset, then --config, then overrides of "
                                   "the form --model.FIELD VALUE or --train.FIELD VALUE (e.g. --train.lr 3e-4).")
    p.add_argument("--config", help="YAML file with model:, train:, data: and out: sections")
    p.add_argument("--model", choices=list(MODEL_PRESETS), metavar="PRESET",
                   help=f"model preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--data", help="directory written by gptforge prepare")
    p.add_argument("--out", help="run directory for checkpoints and metrics.jsonl")
    p.add_argument("--resume", metavar="CKPT|auto", help="continue from a checkpoint, or the latest one in --out with 'auto'")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", parents=[common], help="sample text from a checkpoint",
                       description="Continue a prompt with a trained model, printing text as it is generated.")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint folder, or a run directory (its latest checkpoint)")
    p.add_argument("--prompt", help="prompt text (else --prompt-file, else standard input, else empty)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (default 200)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", parents=[common], help="prepare, train and sample on the bundled Shakespeare",
                       description="The whole flow on the bundled corpus in a few minutes on a laptop CPU.")
    p.add_argument("--out", default="runs/demo", help="directory for the data and the run (default runs/demo)")
    p.add_argument("--minutes", type=float, default=6.0, help="training time budget in minutes (default 6)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    debug = getattr(args, "debug", False)
    try:
        if args.verb == "train":
            args.func(args, extra)
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.func(args)
    except GptforgeError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
