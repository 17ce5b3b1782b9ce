"""The `gptforge` command: one subcommand per verb, each a thin function over the library.

Each verb is two functions side by side: `_VERB_parser` adds its flags and `cmd_VERB` calls the library. Flags that
set a typed config's field are built from that dataclass (add_field_flags): the default and the help text live in
the field, once, for the library and the command alike (gptforge.settings holds each verb's). Only config.py and
settings.py are imported at the top, and they are torch-free, so `gptforge --help` starts fast; each command imports
the library it runs.

Bad input raises GptforgeError, printed here as one line without a traceback (exit 2); `--debug` shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from pathlib import Path

from gptforge import __version__
from gptforge.config import MODEL_PRESETS, LoRAConfig
from gptforge.errors import GptforgeError
from gptforge.settings import (CURATE_SEED, DEDUP_STEPS, INT4_GROUP_SIZE, INT4_GROUP_SIZES, KV_DTYPE, LOAD_DEVICE,
                               LOAD_DTYPE, KVDtype,
                               RULES, TEXT_FIELD, BenchConfig, CurateConfig, DemoConfig, DistillConfig, EvalConfig,
                               ExportGgufConfig,
                               FinetuneSpec, PlanConfig, PrepareConfig, PruneConfig, SamplingParams, ServeConfig,
                               parse_rules)

CKPT_HELP = "a checkpoint folder, or a run directory (its latest checkpoint)"


# --- flags built from typed configs ----------------------------------------------------------------------------

def _flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` that its verb offers as flags: those whose metadata holds help."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.metadata.get("flag", True)]


def _shown(value: typing.Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _field_help(f: dataclasses.Field, is_bool: bool) -> str:
    """The field's help, with "(default X)" from the field itself unless the help speaks of its default."""
    text = f.metadata["help"]
    if "{default}" in text:
        return text.replace("{default}", _shown(f.default))
    if is_bool or f.default is None or f.default is dataclasses.MISSING or "default" in text:
        return text
    return f"{text} (default {_shown(f.default)})"


def _list_of(kind: type):
    """An argparse type: `a,b,c` -> a tuple of `kind`."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    parse.__name__ = f"{kind.__name__} list"
    return parse


class _Append(argparse.Action):
    """A repeatable flag whose values gather in a tuple (argparse's "append" needs a list default)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, (*(getattr(namespace, self.dest) or ()), values))


def add_field_flags(p: argparse.ArgumentParser, cls: type, prefix: str = "", defaults: bool = True) -> None:
    """A --flag for each flag field of dataclass `cls` (`--PREFIX-NAME`), typed from its annotation, its help from
    the field's metadata. A flag not given reads the field's default, or None with `defaults=False` (for a verb
    where "not given" means another source decides, as plan's run config)."""
    hints = typing.get_type_hints(cls)
    for f in _flag_fields(cls):
        tp = hints[f.name]
        default = f.default if defaults and f.default is not dataclasses.MISSING else None
        kw: dict[str, typing.Any] = {"default": default, "help": _field_help(f, tp is bool)}
        if tp is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(tp) is typing.Literal:  # checked by the dataclass, which names the choices
            kw["metavar"] = "{" + ",".join(typing.get_args(tp)) + "}"
        elif typing.get_origin(tp) is tuple and f.metadata.get("repeat"):  # --flag A --flag B
            kw.update(action=_Append, type=typing.get_args(tp)[0], metavar=f.metadata.get("metavar"))
        elif typing.get_origin(tp) is tuple:
            kw["type"], kw["metavar"] = _list_of(typing.get_args(tp)[0]), "A,B,..."
        else:
            kw["type"] = next(t for t in typing.get_args(tp) or (tp,) if t is not type(None))  # int | None -> int
        p.add_argument("--" + (prefix + f.name).replace("_", "-"), **kw)


def field_values(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, typing.Any]:
    """The flag fields of `cls` that hold a value, by field name (those left None keep the dataclass's default)."""
    return {f.name: getattr(args, prefix + f.name) for f in _flag_fields(cls)
            if getattr(args, prefix + f.name, None) is not None}


def _overwrite_flag(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing --out if it is a {kind} gptforge wrote (never any other folder)")


def _load_flags(p: argparse.ArgumentParser, dtype_note: str = "", threads_note: str = "") -> None:
    """--device, --dtype and --threads of the verbs that load a model to decode with it."""
    p.add_argument("--device", default=LOAD_DEVICE, help=f"auto, cpu, cuda or mps (default {LOAD_DEVICE})")
    p.add_argument("--dtype", default=LOAD_DTYPE, choices=["auto", "float32", "bfloat16", "float16"],
                   help=f"weights' dtype (default {LOAD_DTYPE}): auto is bfloat16 on CUDA, float32 elsewhere{dtype_note}")
    p.add_argument("--threads", type=int, help=f"CPU threads for matmuls (default: all cores){threads_note}")


def _set_threads(threads: int | None) -> None:
    """--threads, when given: torch's intra-op threads."""
    if threads is None:
        return
    import torch

    if threads < 1:
        raise GptforgeError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


# --- prepare and curate ----------------------------------------------------------------------------------------

def _prepare_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("prepare", parents=[common], help="tokenize a corpus into train/val token shards",
                       description="Read text files, folders, globs, JSONL, parquet, Arrow, datasets folders, stdin or a "
                                   "bundled corpus as streams; train or load a tokenizer; write train/val token shards "
                                   "and meta.json.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="text files, folders (searched recursively), globs, .jsonl, .parquet or .arrow files (.gz/.zst too), "
                        "datasets save_to_disk folders, - for stdin, or a bundled corpus name (shakespeare)")
    p.add_argument("--out", required=True, help="directory to write the shards, tokenizer.json and meta.json into")
    p.add_argument("--tokenizer", help="use this tokenizer.json (or a folder with it, or with GPT-2's vocab.json + merges.txt)")
    # --vocab-size ... --shard-tokens: PrepareConfig's fields; left None when not given (--vocab-size then means
    # "train a tokenizer", which --tokenizer excludes)
    add_field_flags(p, PrepareConfig, defaults=False)
    include = next(f for f in dataclasses.fields(PrepareConfig) if f.name == "include")  # repeatable: not a field flag
    p.add_argument("--include", action="append", metavar="PATTERN", help=_field_help(include, False))
    _overwrite_flag(p, "prepared-data folder")
    p.add_argument("--curate", action="store_true",
                   help="first run gptforge curate's default steps (quality rules, dedup, PII redaction) on the documents")
    p.add_argument("--dedup", action="store_true", help="first drop exact and near-duplicate documents and boilerplate lines")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> None:
    from rich.console import Console

    from gptforge.data import prepare

    if args.tokenizer is not None and args.vocab_size is not None:
        raise GptforgeError("give either --tokenizer (use an existing one) or --vocab-size (train a new one), not both")
    settings = PrepareConfig(**field_values(args, PrepareConfig), include=tuple(args.include or ()))
    stats = prepare(args.sources, args.out, tokenizer=args.tokenizer, **dataclasses.asdict(settings),
                    progress=not args.no_progress, overwrite=args.overwrite, curate=_prepare_curate(args, settings.seed))
    console = Console(stderr=True)
    for w in stats.warnings:  # soft_wrap: a path in a warning stays on one line in logs (rich wraps at 80 there)
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    empty = f" ({stats.empty_documents:,} empty left out)" if stats.empty_documents else ""
    print(f"documents: train {stats.documents['train']:,}, val {stats.documents['val']:,}{empty}")
    print(f"tokens:    train {stats.tokens['train']:,}, val {stats.tokens['val']:,}")
    print(f"bytes/token {stats.bytes_per_token:.2f}; tokenized {stats.bytes / 1e6:.1f} MB in {stats.seconds:.2f} s "
          f"({stats.mb_per_s:.2f} MB/s, {stats.encoder}); tokenizer {'loaded' if args.tokenizer else 'trained'} in "
          f"{stats.tokenizer_seconds:.1f} s")
    print(f"wrote {args.out}/meta.json, tokenizer.json and the shards; next: gptforge train --data {args.out} --out runs/NAME")


def _prepare_curate(args: argparse.Namespace, seed: int):
    """prepare's --curate (every default step) or --dedup (only the duplicates), as data.prepare's hook."""
    from gptforge.curate import curate_documents

    if args.curate and args.dedup:
        raise GptforgeError("give either --curate (filters, dedup and PII) or --dedup (duplicates only), not both")
    if not (args.curate or args.dedup):
        return None
    cfg = CurateConfig() if args.curate else CurateConfig(rules=(), pii=())

    def hook(docs):
        kept, report = curate_documents(docs, cfg, seed=seed)
        summary = {k: v for k, v in report.to_dict().items() if k not in ("samples", "histograms")}
        print(report.format(), file=sys.stderr)
        return kept, summary
    return hook


def _curate_parser(sub, common: argparse.ArgumentParser) -> None:
    """`gptforge curate`'s flags: one per threshold of CurateConfig (its defaults and help live there)."""
    p = sub.add_parser("curate", parents=[common], help="deduplicate, filter, redact and mix a corpus, with a report",
                       description="Read the sources prepare reads; drop exact and near duplicates, boilerplate lines "
                                   "and documents failing the quality rules; redact PII; mix sources by weight; write "
                                   "JSONL shards that gptforge prepare reads, meta.json, report.json and signals.png.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="as for prepare (files, folders, globs, .jsonl, shakespeare); NAME=PATH names a source for --mix")
    p.add_argument("--out", help="folder to write the curated corpus and its report into")
    _overwrite_flag(p, "curated-corpus folder")
    p.add_argument("--dry-run", action="store_true", help="measure and report, write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--mix", help="source weights: NAME=W,NAME=W or a YAML file of name: weight (up/down-sampling whole documents)")
    p.add_argument("--seed", type=int, default=CURATE_SEED,
                   help=f"seed of mixing and of the removed-document samples (default {CURATE_SEED})")
    p.add_argument("--keep", action="append", metavar="TEXT[,TEXT]", help="strings never redacted (repeatable)")
    p.add_argument("--rules", help=f"quality rules: a list replaces the default set, +name/-name edit it; rules: {', '.join(RULES)}")
    p.add_argument("--dedup", help=f"dedup steps (default all: {', '.join(DEDUP_STEPS)}; 'none' for none)")
    p.add_argument("--pii", help=f"PII kinds to redact (default all: {', '.join(CurateConfig.pii)}; 'none' for none)")
    p.add_argument("--text-field", default=TEXT_FIELD, help=f"JSONL field that holds the text (default: {TEXT_FIELD})")
    p.add_argument("--workers", type=int, help="processes (default: one per core)")
    p.add_argument("--tokenizer", help="count each source's tokens with this tokenizer.json (meta.json); --mix then weighs tokens, not bytes")
    add_field_flags(p, CurateConfig)  # --jaccard ... --max-perplexity: its thresholds
    p.set_defaults(func=cmd_curate)


def cmd_curate(args: argparse.Namespace) -> None:
    import json

    from gptforge.curate import curate

    if args.dry_run == (args.out is not None):
        raise GptforgeError("give --out DIR to write the curated corpus, or --dry-run to only measure (not both)")
    thresholds = field_values(args, CurateConfig)
    pii = CurateConfig.pii
    cfg = CurateConfig(rules=parse_rules(args.rules), dedup=parse_rules(args.dedup, DEDUP_STEPS, "dedup step", DEDUP_STEPS),
                       pii=parse_rules(args.pii, pii, "PII kind", pii),
                       keep=tuple(k for item in args.keep or () for k in item.split(",") if k), **thresholds)
    report = curate(args.sources, args.out, cfg, mix=args.mix, seed=args.seed, text_field=args.text_field,
                    workers=args.workers, overwrite=args.overwrite, tokenizer=args.tokenizer)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(report.format())
    t = report.seconds["total"]
    mb = sum(s["bytes_in"] for s in report.sources.values()) / 1e6
    print(f"{mb:.1f} MB in {t:.1f} s ({mb / max(t, 1e-9):.1f} MB/s)")
    if args.out:
        print(f"wrote {args.out}/curated_*.jsonl, meta.json, report.json and signals.png; next: gptforge prepare {args.out} --out data/NAME")


# --- train -----------------------------------------------------------------------------------------------------

def _train_parser(sub, common: argparse.ArgumentParser) -> None:
    """train's own flags; every model and loop setting is a `--model.FIELD` / `--train.FIELD` override of the
    typed ModelConfig / TrainConfig (config.build_run_config), whose defaults live there."""
    p = sub.add_parser("train", parents=[common], help="train a model on prepared shards",
                       description="Train a GPT. Settings come from a preset, then --config, then overrides of "
                                   "the form --model.FIELD VALUE or --train.FIELD VALUE (e.g. --train.lr 3e-4).")
    p.add_argument("--config", help="YAML file with model:, train:, data: and out: sections")
    p.add_argument("--model", choices=list(MODEL_PRESETS), metavar="PRESET",
                   help=f"model preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--data", help="directory written by gptforge prepare")
    p.add_argument("--out", help="run directory for checkpoints and metrics.jsonl")
    p.add_argument("--resume", metavar="CKPT|auto",
                   help="continue a run exactly from a checkpoint, or from the newest valid one in --out with 'auto'")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="run N processes on this machine through torchrun (DDP, or FSDP with --train.parallel fsdp)")
    p.add_argument("--init-from", metavar="CKPT",
                   help="start a new run from a checkpoint's weights and model config, with a fresh optimizer (fine-tuning)")
    p.set_defaults(func=cmd_train)


def _torchrun(args: argparse.Namespace) -> None:
    """Launch ourselves under torchrun, one node, N processes, same arguments minus --nproc."""
    import subprocess

    from gptforge.distributed import torchrun_command

    argv = sys.argv[1:] if args.argv is None else args.argv
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    code = subprocess.call(torchrun_command(args.nproc, rest))
    if code:
        raise GptforgeError(f"distributed training failed (exit status {code}); each rank's error is above")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    import os

    if args.nproc is not None and "RANK" not in os.environ:
        return _torchrun(args)

    from gptforge.config import build_run_config
    from gptforge.train import train

    cfg = build_run_config(args.config, args.model, overrides)
    if args.data is not None:
        cfg = dataclasses.replace(cfg, data=args.data)
    if args.out is not None:
        cfg = dataclasses.replace(cfg, out=args.out)
    result = train(cfg, resume=args.resume, init_from=args.init_from, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for the job
    how = "" if result.stopped_by == "max_steps" else f" (stopped by {result.stopped_by})"
    print(f"trained to step {result.steps}{how}: {result.tokens:,} tokens in {result.seconds:.0f} s ({result.tokens_per_s:,.0f} tokens/s)")
    if result.skipped_steps:
        print(f"{result.skipped_steps} step(s) skipped for a non-finite loss or gradient")
    if result.first_val_loss is not None and result.final_val_loss is not None:
        print(f"val loss {result.first_val_loss:.4f} -> {result.final_val_loss:.4f} "
              f"(perplexity {math.exp(result.first_val_loss):.1f} -> {math.exp(result.final_val_loss):.1f})")
    elif result.final_val_loss is not None:
        print(f"val loss {result.final_val_loss:.4f} (perplexity {math.exp(result.final_val_loss):.1f})")
    print(f"checkpoint: {result.checkpoint}\nmetrics: {result.run_dir / 'metrics.jsonl'}; tensorboard --logdir {result.run_dir / 'tb'}")


# --- generate and serve ----------------------------------------------------------------------------------------

def _generate_parser(sub, common: argparse.ArgumentParser) -> None:
    """generate's sampling flags are SamplingParams' fields: one default for gptforge.generate and the CLI."""
    p = sub.add_parser("generate", parents=[common], help="sample text from a checkpoint",
                       description="Continue a prompt with a trained model, printing text as it is generated.")
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument("--prompt", help="prompt text (else --prompt-file, else standard input, else empty)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    add_field_flags(p, SamplingParams)  # --max-new-tokens ... --seed, --truncate-prompt
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the output contains TEXT (left out of it); repeat for several")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--chat", action="store_true",
                   help="an interactive chat: each line of standard input is a user turn, rendered with the "
                        "checkpoint's chat template (from gptforge finetune --task chat)")
    p.add_argument("--system", help="with --chat: the system message that opens the conversation")
    _load_flags(p, dtype_note=" (faster on CPUs without AMX)",
                threads_note="; 1 is much faster on a machine busy with other work")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step on CPU too (always on CUDA): faster per token, ~30 s to compile")
    p.add_argument("--kv-dtype", default=KV_DTYPE, choices=typing.get_args(KVDtype),
                   help=f"how the KV cache stores keys and values (default {KV_DTYPE}: the weights' dtype, bf16 for an "
                        "int8/int4 model); bf16 or int8 take less memory at a little perplexity (docs/generate.md)")
    p.add_argument("--verbose", action="store_true",
                   help="print to stderr which kernel runs each matrix product (decode steps and the prompt)")
    p.set_defaults(func=cmd_generate)


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
    from gptforge.generate import load, stream

    if args.chat and (args.prompt is not None or args.prompt_file is not None):
        raise GptforgeError("--chat reads each turn from standard input; leave out --prompt / --prompt-file")
    if args.system is not None and not args.chat:
        raise GptforgeError("--system is the system message of a --chat session; add --chat")
    prompt = "" if args.chat else _read_prompt(args)
    _set_threads(args.threads)
    model, tokenizer = load(args.checkpoint, device=args.device, dtype=args.dtype)
    if args.verbose:
        from gptforge.compress.quantize import matmul_paths

        prompt_rows = max(1, len(tokenizer.encode(prompt)))
        for what, rows in (("decode step", 1), (f"prompt ({prompt_rows} rows)", prompt_rows)):
            paths = ", ".join(f"{n} {p}" for p, n in matmul_paths(model, rows).items())
            print(f"matmuls, {what}: {paths}", file=sys.stderr)
    options = field_values(args, SamplingParams) | {"stop": tuple(args.stop or ()),
                                                    "compile": True if args.compile else None,
                                                    "kv_dtype": args.kv_dtype}
    if args.ignore_eos:
        options["stop_at_eos"] = False
    if args.chat:
        return _chat(model, tokenizer, args.system, options)
    sys.stdout.write(prompt)
    for delta in stream(model, tokenizer, prompt, **options):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _chat(model, tokenizer, system: str | None, options: dict) -> None:
    """An interactive session: each line of standard input is a user turn; the reply streams until the model
    ends its turn (its template's end-of-turn token, e.g. <|im_end|>), and the whole conversation is the next
    turn's prompt (the model's own chat template, as fine-tuning and the server use it). Ends at end of input."""
    from gptforge.generate import stream

    if not tokenizer.has_chat_template:
        tokenizer.encode_chat([])  # raises the error that names the fix
    messages = [{"role": "system", "content": system}] if system else []
    options = {**options, "stop": (*options["stop"], tokenizer.decode([tokenizer.im_end_id]))}
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tokenizer.encode_chat_ids(messages, add_generation_prompt=True)
        reply = []
        sys.stdout.write("assistant> ")
        for delta in stream(model, tokenizer, ids, **options):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _serve_parser(sub, common: argparse.ArgumentParser) -> None:
    """serve's flags are ServeConfig's fields (--host ... --shutdown-timeout), then how the model loads."""
    p = sub.add_parser("serve", parents=[common], help="serve a checkpoint over the OpenAI HTTP API",
                       description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health, /metrics) with continuous batching, streaming, limits and metrics. "
                                   "See docs/serve.md.")
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    add_field_flags(p, ServeConfig)
    _load_flags(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from gptforge.serve import serve

    _set_threads(args.threads)
    values = field_values(args, ServeConfig)
    values["api_key"] = values.get("api_key") or os.environ.get("GPTFORGE_API_KEY") or None
    serve(args.checkpoint, ServeConfig(**values), device=args.device, dtype=args.dtype)


# --- checkpoints: consolidate, quantize, prune, distill, finetune, classify, import-hf, export-hf, export-gguf ---

def _consolidate_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("consolidate", parents=[common], help="turn a sharded (FSDP) checkpoint into single files",
                       description="Gather a checkpoint saved by an FSDP run (dcp/ shards) into model.safetensors and "
                                   "a trainer_state.pt whose optimizer is keyed by parameter name.")
    p.add_argument("checkpoint", metavar="CKPT", help="a sharded checkpoint folder, or a run directory (its latest)")
    p.add_argument("--out", help="folder to write (default: consolidated-NAME next to the checkpoint)")
    _overwrite_flag(p, "checkpoint")
    p.set_defaults(func=cmd_consolidate)


def cmd_consolidate(args: argparse.Namespace) -> None:
    from gptforge.checkpoint import consolidate

    dest = consolidate(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {dest} (model.safetensors + trainer_state.pt); it loads, generates and resumes like any checkpoint")


def _quantize_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("quantize", parents=[common], help="weight-only int8/int4 quantization or a bf16/fp16 cast",
                       description="Quantize every Linear and the (tied) output head of a checkpoint, weight-only: "
                                   "int8 per output channel, or int4 in groups along the input. Writes the same "
                                   "checkpoint format; generate and eval load it unchanged. See docs/compress.md.")
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument("--method", required=True, help="int8, int4, bf16 or fp16")
    p.add_argument("--group-size", type=int, help="int4: input columns sharing one scale, "
                                                  f"{', '.join(map(str, INT4_GROUP_SIZES))} (default {INT4_GROUP_SIZE})")
    p.add_argument("--activations", choices=["dynamic", "weight-only"],
                   help="int8/int4 on CPU: dynamic (default) also quantizes each row's activations to int8 when "
                        "multiplying, on the integer dot-product instructions; weight-only keeps them fp32")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    _overwrite_flag(p, "checkpoint")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> None:
    from gptforge.compress.run import quantize_checkpoint

    dest, section = quantize_checkpoint(args.checkpoint, args.method, args.out, args.group_size, overwrite=args.overwrite,
                                        activations=args.activations)
    size = (dest / "model.safetensors").stat().st_size
    print(f"wrote {dest} ({section['quantization']}, model.safetensors {size / 1e6:.2f} MB); "
          f"compare: gptforge eval {args.checkpoint} {dest} --data DIR")


def _prune_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("prune", parents=[common], help="unstructured, N:M or structured pruning",
                       description="magnitude / wanda zero the smallest-scoring weights of every block Linear (wanda "
                                   "weighs them by calibration activations from --data); structured removes whole "
                                   "heads and MLP channels and writes a smaller dense model.")
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument("--method", required=True, help="magnitude, wanda or structured")
    p.add_argument("--sparsity", type=float, help="share of weights (or heads and channels, for structured) to remove, in (0, 1)")
    p.add_argument("--pattern", metavar="N:M", help="keep N of every M consecutive weights, e.g. 2:4 (magnitude, wanda)")
    p.add_argument("--data", help="prepared data: calibration batches (wanda, structured) and recovery training")
    add_field_flags(p, PruneConfig)  # --recover-steps
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    _overwrite_flag(p, "checkpoint (and its OUT-recover run)")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> None:
    from gptforge.compress.run import prune_checkpoint

    dest, section, result = prune_checkpoint(args.checkpoint, args.method, args.out, args.sparsity, args.pattern,
                                             args.data, **field_values(args, PruneConfig),
                                             progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote {dest}: {section['pruning']}")
    if result is not None and result.final_val_loss is not None:
        print(f"recovery: {result.steps} steps, val loss {result.first_val_loss:.4f} -> {result.final_val_loss:.4f}")


def _distill_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("distill", parents=[common], help="train a student on a teacher's logits",
                       description="The training loop with a distillation objective: T^2 * KL(teacher || student) at "
                                   "temperature T mixed with cross-entropy. Overrides as in train: --train.FIELD VALUE.")
    p.add_argument("--teacher", required=True, metavar="CKPT", help="the teacher checkpoint (its tokenizer must be the data's)")
    p.add_argument("--student", required=True, metavar="PRESET|CONFIG", help="a model preset name or a YAML run config")
    p.add_argument("--data", required=True, help="directory written by gptforge prepare")
    p.add_argument("--out", required=True, help="run directory for the student's checkpoints and metrics")
    add_field_flags(p, DistillConfig)  # --temperature, --kl-weight, --ce-weight
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace, overrides: list[str]) -> None:
    from gptforge.compress.distill import distill
    from gptforge.config import build_run_config

    student = args.student
    preset, config = (student, None) if student in MODEL_PRESETS else (None, student)
    cfg = dataclasses.replace(build_run_config(config, preset, overrides), data=args.data, out=args.out)
    dcfg = DistillConfig(**field_values(args, DistillConfig))
    result = distill(cfg, args.teacher, dcfg, progress=not args.no_progress)
    print(f"distilled {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s; "
          f"val objective {result.final_val_loss:.4f}\ncheckpoint: {result.checkpoint}\n"
          f"compare: gptforge eval {args.teacher} {result.checkpoint} --data {args.data}")


def _finetune_parser(sub, common: argparse.ArgumentParser) -> None:
    """finetune's flags are FinetuneSpec's fields and, as --lora-*, LoRAConfig's (defaults and help live there)."""
    p = sub.add_parser("finetune", parents=[common], help="fine-tune a checkpoint: full or LoRA; text, chat or classify",
                       description="Fine-tune CKPT through the training loop. --task lm reads prepared shards, chat a "
                                   "JSONL of {\"messages\": [...]} (loss on assistant tokens, packed), classify a JSONL "
                                   "of {\"text\", \"label\"}. Overrides as in train: --train.FIELD VALUE. See docs/finetune.md.")
    p.add_argument("checkpoint", metavar="CKPT", help="the base checkpoint (ours, or from gptforge import-hf)")
    p.add_argument("--data", required=True, help="lm: a directory from gptforge prepare; chat / classify: a JSONL file")
    p.add_argument("--out", required=True, help="run directory for checkpoints and metrics")
    p.add_argument("--val-data", help="chat / classify: a validation JSONL (default: hold out --val-fraction of --data)")
    add_field_flags(p, FinetuneSpec)  # --method, --task, --val-fraction
    add_field_flags(p, LoRAConfig, prefix="lora_")  # --lora-rank, --lora-alpha, --lora-dropout, --lora-targets
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> None:
    from gptforge.config import build_run_config
    from gptforge.finetune.run import finetune, format_confusion

    cfg = dataclasses.replace(build_run_config(None, None, overrides), out=args.out)
    lora = LoRAConfig(**field_values(args, LoRAConfig, prefix="lora_"))
    spec = FinetuneSpec(**field_values(args, FinetuneSpec), lora=lora)
    r = finetune(cfg, args.checkpoint, spec, data=args.data, val_data=args.val_data, progress=not args.no_progress)
    t = r.train
    print(f"{args.method} fine-tuning ({args.task}): {r.trainable_params:,} of {r.total_params:,} parameters trained "
          f"({100 * r.trainable_params / r.total_params:.2f}%), AdamW state {r.optimizer_state_bytes / 2**20:.2f} MiB")
    print(f"{t.steps} steps, {t.tokens:,} tokens in {t.seconds:.0f} s ({t.tokens_per_s:,.0f} tokens/s)")
    if t.first_val_loss is not None and t.final_val_loss is not None:
        print(f"val loss {t.first_val_loss:.4f} -> {t.final_val_loss:.4f}")
    if r.classify is not None:
        print(format_confusion(r.classify))
    size = (t.checkpoint / "model.safetensors").stat().st_size
    print(f"checkpoint: {t.checkpoint} (model.safetensors {size / 1e6:.2f} MB{', the adapter only' if args.method == 'lora' else ''})")


def _classify_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("classify", parents=[common], help="predict labels with a classifier checkpoint",
                       description="Label texts with a checkpoint from gptforge finetune --task classify; with a "
                                   "labelled --input, also accuracy and the confusion matrix.")
    p.add_argument("checkpoint", metavar="CKPT", help="a classifier checkpoint folder or run directory")
    p.add_argument("--text", action="append", help="a text to classify (repeatable)")
    p.add_argument("--input", help="a JSONL of {\"text\"} or {\"text\", \"label\"} lines")
    p.add_argument("--json", action="store_true", help="print predictions (and the report) as JSON")
    p.set_defaults(func=cmd_classify)


def cmd_classify(args: argparse.Namespace) -> None:
    import json

    from gptforge.finetune.run import classify_texts, format_confusion

    if args.text and args.input:
        raise GptforgeError("give either --text or --input, not both")
    out = classify_texts(args.checkpoint, args.text, args.input)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for p in out["predictions"]:
        print(f"{p['label']}\t{p['probability']:.3f}\t{p['text'][:80]}")
    if "report" in out:
        print(format_confusion(out["report"]))


def _import_hf_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("import-hf", parents=[common], help="convert a local Hugging Face model folder",
                       description="Read config.json, model.safetensors (or pytorch_model.bin, loaded with "
                                   "weights_only=True) and tokenizer.json (or vocab.json + merges.txt) from a local "
                                   "folder and write a gptforge checkpoint. Supported: GPT-2, Llama (incl. Llama 3 "
                                   "RoPE scaling), Qwen2/2.5, Qwen3, Mistral, Phi-3; what a family needs and gptforge "
                                   "lacks is refused naming the config key. See docs/interop.md.")
    p.add_argument("folder", metavar="DIR", help="a Hugging Face model folder (e.g. from save_pretrained)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    _overwrite_flag(p, "checkpoint")
    p.set_defaults(func=cmd_import_hf)


def cmd_import_hf(args: argparse.Namespace) -> None:
    from gptforge.interop import import_hf

    dest = import_hf(args.folder, args.out, overwrite=args.overwrite)
    print(f"wrote {dest}; try: gptforge generate {dest} --prompt \"Hello\"")


def _export_hf_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export-hf", parents=[common], help="write a checkpoint as a Hugging Face folder",
                       description="GPT-2-style models (learned positions, LayerNorm, GELU) become GPT2LMHeadModel, "
                                   "Llama-style ones (rotary, RMSNorm, SwiGLU) LlamaForCausalLM, or Qwen2 (q/k/v "
                                   "biases), Qwen3 (q/k norms), Mistral (sliding window); anything else is refused "
                                   "naming the field. LoRA adapters are merged into their base first. See docs/interop.md.")
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument("--out", required=True, help="folder to write config.json, model.safetensors and the tokenizer into")
    p.add_argument("--architecture", help="the HF class to write, e.g. Phi3ForCausalLM (default: the first of GPT2, "
                                          "Llama, Qwen2, Qwen3, Mistral, Phi3 that expresses the model)")
    _overwrite_flag(p, "Hugging Face export")
    p.set_defaults(func=cmd_export_hf)


def cmd_export_hf(args: argparse.Namespace) -> None:
    from gptforge.interop import export_hf

    dest, arch = export_hf(args.checkpoint, args.out, overwrite=args.overwrite, architecture=args.architecture)
    print(f"wrote {dest} ({arch}: config.json, model.safetensors, tokenizer.json, tokenizer_config.json); "
          f"load with transformers.AutoModelForCausalLM.from_pretrained({str(dest)!r})")


def _export_gguf_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export-gguf", parents=[common], help="write a checkpoint as a GGUF file for llama.cpp",
                       description="GPT-2-style models become llama.cpp's gpt2 architecture, Llama-style ones llama "
                                   "(qwen3 with --model.qk_norm); the tokenizer and chat template go in the file. "
                                   "Anything llama.cpp cannot compute is refused naming the field. See "
                                   "docs/export-gguf.md.")
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument("--out", required=True, help="the .gguf file to write")
    add_field_flags(p, ExportGgufConfig)  # --type
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out if it is a GGUF file gptforge wrote (never any other file)")
    p.set_defaults(func=cmd_export_gguf)


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from gptforge.gguf_export import export_gguf

    settings = ExportGgufConfig(**field_values(args, ExportGgufConfig))
    dest, arch = export_gguf(args.checkpoint, args.out, settings.type, overwrite=args.overwrite)
    print(f"wrote {dest} ({arch}, {settings.type}, {dest.stat().st_size / 1e6:.2f} MB); "
          f"run it: llama-cli -m {dest}, or llama_cpp.Llama(model_path={str(dest)!r})")


# --- measure: eval, plan, bench, report, demo -----------------------------------------------------------------

def _eval_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("eval", parents=[common], help="compare checkpoints (perplexity, bits/byte, KL, speed); score tasks",
                       description="With --data, one table over the same validation windows: parameters, file size, "
                                   "val loss, perplexity, bits per byte, and vs the first checkpoint Δ perplexity, "
                                   "mean KL and top-1 agreement; then batch-1 greedy decode tokens/s and the loaded "
                                   "weights' bytes. With --task, benchmark accuracy (acc, acc_norm as lm-eval defines "
                                   "them) and the mean centered accuracy; see docs/eval.md.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints; the first is the reference")
    p.add_argument("--data", help="directory written by gptforge prepare (its val split is used)")
    p.add_argument("--task", action="append", metavar="NAME|FILE",
                   help="a benchmark task (repeatable): shakespeare-next-line, hellaswag, arc-easy, arc-challenge, "
                        "piqa, lambada (local files; see docs/eval.md) or a jsonl file")
    add_field_flags(p, EvalConfig)  # --limit ... --decode-tokens
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from gptforge.compress.evaluate import eval_checkpoints, print_table

    _set_threads(args.threads)
    if args.data is None and not args.task:
        raise GptforgeError("give --data DIR (the validation table) or --task NAME|FILE (benchmark tasks), or both")
    s = EvalConfig(**field_values(args, EvalConfig))
    if args.data is not None:
        rows = eval_checkpoints(args.checkpoints, args.data, batches=s.batches, batch_size=s.batch_size,
                                seq_len=s.seq_len, decode_tokens=s.decode_tokens)
        print(json.dumps(rows, indent=2)) if args.json else print_table(rows)
    if args.task:
        from gptforge.eval import evaluate_tasks, print_task_table

        for ckpt in args.checkpoints:
            result = evaluate_tasks(ckpt, args.task, limit=s.limit, shots=s.shots, seed=s.seed)
            print(json.dumps(result, indent=2)) if args.json else print_task_table(result)


def _plan_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plan", parents=[common], help="estimate memory, time and cost of a run before starting it",
                       description="Per-device memory (weights, gradients, optimizer, activations, overhead), FLOPs, "
                                   "tokens/s, time and cost of a token budget, and KV-cache/decode figures, from "
                                   "arithmetic alone (no GPU needed). See docs/plan.md.")
    p.add_argument("model", metavar="MODEL",
                   help="a run to plan as train would run it: a YAML run config, a checkpoint or run directory, a "
                        "model preset (train's defaults) or a Hugging Face config.json; the flags below override it")
    # --seq-len ... --mfu: PlanConfig's fields, spelled as TrainConfig's; one not given leaves the run's value
    add_field_flags(p, PlanConfig, defaults=False)
    p.add_argument("--tokens", default="chinchilla",
                   help="training budget: a count like 300B or 2e9, run = the run's own (train.max_steps or "
                        "max_tokens, whichever stops it first), or chinchilla = 20 per parameter (default)")
    p.add_argument("--recommend", action="store_true",
                   help="also recommend micro-batch, accumulation, checkpointing/FSDP and the cheapest hardware")
    p.add_argument("--deadline", type=float, metavar="HOURS",
                   help="with --recommend: the cheapest listed hardware that trains the budget within this many hours")
    p.add_argument("--measure", action="store_true",
                   help="also run a few real optimizer steps of this configuration here and compare memory and "
                        "throughput with the plan")
    p.add_argument("--device", help="with --measure: cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--steps", type=int, default=BenchConfig.steps,
                   help=f"with --measure: timed optimizer steps after a warm-up (default {BenchConfig.steps}, as bench)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> None:
    import json

    from gptforge.plan import load_run_config, make_plan, parse_tokens, plan_config_from_run, print_plan, recommend

    if args.deadline is not None and not args.recommend:
        raise GptforgeError("--deadline is read by --recommend; add --recommend")
    given = field_values(args, PlanConfig)
    if args.measure and "hardware" not in given:  # --measure compares with the device it runs on
        from gptforge.hardware import device_hardware, resolve_device

        given["hardware"] = device_hardware(resolve_device(args.device)).name
    run_budget = args.tokens.lower() == "run"  # the run's max_steps / max_tokens
    pc = plan_config_from_run(load_run_config(args.model), run_budget,
                              tokens=None if run_budget else parse_tokens(args.tokens), **given)
    plan = make_plan(pc)
    if args.recommend:
        plan.recommendation = recommend(pc, plan.hardware, args.deadline)
    rows = None
    if args.measure:
        from gptforge.bench import measure_plan, print_rows, rows_as_dicts

        rows = measure_plan(pc, args.device, args.steps)
    if args.json:
        print(json.dumps({**plan.to_dict(), **({"measured": rows_as_dicts(rows)} if rows else {})}, indent=2))
        return
    print_plan(plan)
    if rows:
        print_rows(rows, f"{args.model} on {args.device or 'this device'}: plan vs {args.steps} measured steps "
                         "(error = (plan - measured) / measured)")


def _bench_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[common], help="measure this device and a model on it against the plan",
                       description="Peak matmul FLOP/s, copy bandwidth, a training step (tokens/s, MFU, peak memory) "
                                   "and batch-1 decode, each next to gptforge plan's prediction with the error in %%.")
    p.add_argument("model", metavar="MODEL", nargs="?", default="shakespeare",
                   help="preset, YAML run config, checkpoint or HF config.json to build (default shakespeare)")
    add_field_flags(p, BenchConfig)  # --device ... --mfu
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    import json

    from gptforge.bench import bench, print_rows, rows_as_dicts
    from gptforge.plan import load_model_config

    cfg = load_model_config(args.model)
    rows = bench(cfg, **field_values(args, BenchConfig))
    if args.json:
        print(json.dumps(rows_as_dicts(rows), indent=2))
    else:
        print_rows(rows, f"{args.model} on {args.device}: plan vs measurement (error = (plan - measured) / measured)")


def _report_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("report", parents=[common], help="plot runs' metrics (PNG) on an HTML page with their configs",
                       description="Loss and val loss, LR, grad norm, tokens/s (and MFU when logged) over steps from "
                                   "each RUN_DIR/metrics.jsonl; several runs share each plot.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by gptforge train")
    p.add_argument("--out", help="folder for the PNGs and index.html (default: FIRST_RUN_DIR/report, replaced on each run)")
    p.add_argument("--task", metavar="NAME|FILE", help="also plot this eval task's accuracy on each checkpoint kept "
                                                       "(docs/eval.md), e.g. shakespeare-next-line")
    p.add_argument("--limit", type=int, help="with --task: score only its first N examples")
    _overwrite_flag(p, "report folder")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> None:
    from gptforge.report import report

    page = report(args.runs, args.out, overwrite=args.overwrite, task=args.task, limit=args.limit)
    print(f"wrote {page} and its PNG plots")


def _demo_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="prepare, train and sample on the bundled Shakespeare",
                       description="The whole flow on the bundled corpus in a few minutes on a laptop CPU.")
    add_field_flags(p, DemoConfig)  # --out, --minutes
    _overwrite_flag(p, "demo folder (data/ and run/)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from gptforge.demo import run_demo

    r = run_demo(**field_values(args, DemoConfig), progress=not args.no_progress, overwrite=args.overwrite)
    print()
    print(f"trained {r.steps} steps, {r.tokens:,} tokens in {r.train_seconds:.0f} s "
          f"({r.tokens / max(r.train_seconds, 1e-9):,.0f} tokens/s, {r.precision})")
    print(f"val loss {r.first_val_loss:.3f} -> {r.final_val_loss:.3f}   "
          f"perplexity {math.exp(r.first_val_loss):.0f} -> {math.exp(r.final_val_loss):.1f}")
    print(f"{r.task['name']} accuracy {r.task['before']:.1%} -> {r.task['after']:.1%} (chance {r.task['chance']:.0%})")
    print("\n--- sample " + "-" * 50)
    print(r.sample)
    print("-" * 61)
    print(f"\ndemo took {r.total_seconds / 60:.1f} min. checkpoint: {r.checkpoint}")
    print(f"logs: {r.run_dir / 'metrics.jsonl'}   data: {Path(args.out) / 'data'}")
    print(f'next: gptforge generate {r.run_dir} --prompt "**ROMEO**" --max-new-tokens 300')


# --- the command -----------------------------------------------------------------------------------------------

# The verbs in the order `gptforge --help` lists them.
VERB_PARSERS = (_prepare_parser, _curate_parser, _train_parser, _generate_parser, _serve_parser, _consolidate_parser,
                _demo_parser, _plan_parser, _bench_parser, _report_parser, _quantize_parser, _prune_parser,
                _distill_parser, _eval_parser, _import_hf_parser, _export_hf_parser, _export_gguf_parser,
                _finetune_parser, _classify_parser)


def build_parser() -> argparse.ArgumentParser:
    """The `gptforge` parser: every verb's subparser, each with the common --debug and --no-progress."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    common.add_argument("--no-progress", action="store_true", help="no progress bars (plain log lines only)")

    parser = argparse.ArgumentParser(prog="gptforge", description="Train, compress and serve GPT-style models.")
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in VERB_PARSERS:
        add(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    debug = getattr(args, "debug", False)
    try:
        if args.verb in ("train", "distill", "finetune"):
            args.func(args, extra)
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.func(args)
    except GptforgeError as e:
        if debug:
            raise
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (permissions, a file where a folder should be, ...): the user's to fix
        if debug:
            raise
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}:{where} (run with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def one_line(message: str) -> str:
    """An error message as one line, however its parts were written."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
