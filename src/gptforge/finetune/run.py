"""`gptforge finetune`: a base checkpoint + a method (full | lora) + a task (lm | chat | classify), run through
the one training loop, `gptforge.train.train`, with the task's data source, loss and model transform.

What a fine-tuned checkpoint records in config.yaml's `finetune:` section, and how it loads:
  method full, task lm/chat   a plain checkpoint (every weight), loads anywhere.
  method lora                 model.safetensors holds only the adapter (lora_a/lora_b, and the class head);
                              `finetune.base` names the base checkpoint; gptforge.loader merges them.
  task classify               the GPT's output head is a (classes, d_model) matrix read at the text's last
                              token; `finetune.labels` names the classes. Loaded by `gptforge.loader.load_classifier`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.checkpoint import resolve_checkpoint, write_checkpoint
from gptforge.config import FinetuneConfig, RunConfig
from gptforge.errors import GptforgeError, not_one_string
from gptforge.finetune.data import (IGNORE_INDEX, ChatData, ClassifyBatch, ClassifyData, PackedBatch, collate,
                                    encode_text, eval_batches_for, read_labelled)
from gptforge.loader import apply_finetune, load_checkpoint, load_classifier
from gptforge.model import GPT
from gptforge.settings import FinetuneSpec
from gptforge.tokenizer import Tokenizer
from gptforge.train import claim_run_dir, next_token_loss, train


# --- losses for the loop: loss_fn(model, x, y) -> (summed loss, number of targets) ---------------------------

def chat_loss(model: nn.Module, x: PackedBatch, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on assistant tokens of packed conversations (attention kept within each)."""
    logits = model(x.idx, pos=x.pos, doc=x.doc)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (y != IGNORE_INDEX).sum()


def class_logits(model: nn.Module, x: ClassifyBatch) -> torch.Tensor:
    """(B, C): the class head read at each row's last real token (its closing EOS)."""
    out = model(x.idx)  # (B, T, C): the output head is the class head
    return out[torch.arange(out.shape[0], device=out.device), x.last]  # (B, C)


def classify_loss(model: nn.Module, x: ClassifyBatch, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.cross_entropy(class_logits(model, x).float(), y, reduction="sum"), y.new_tensor(y.numel())


# --- model transforms -----------------------------------------------------------------------------------------

def resize_vocab(model: GPT, vocab_size: int, seed: int = 0) -> GPT:
    """A copy of `model` whose token table (and untied head) has room for `vocab_size` tokens.

    New rows start at the mean of the existing ones plus small noise (Hewitt 2021, "Initializing new word
    embeddings"): near what the model already reads, yet distinct, so new markers are told apart."""
    old = model.config.vocab_size
    cfg = dataclasses.replace(model.config, vocab_size=vocab_size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for key in ("tok_emb.weight", "lm_head.weight"):
        if key not in state:
            continue
        t = state[key]
        grown = t.new_zeros(cfg.padded_vocab_size, t.shape[1])
        grown[:old] = t[:old]
        mean, std = t[:old].float().mean(0), t[:old].float().std() * 0.1
        grown[old:vocab_size] = (mean + std * torch.randn(vocab_size - old, t.shape[1], generator=g)).to(t.dtype)
        state[key] = grown
    with torch.device("meta"):
        new = GPT(cfg)
    new.load_state_dict(state, assign=True)
    return new


def model_transform(section: FinetuneConfig):
    """The function train() applies to the loaded base (prepare_model): the transforms the section names."""
    return lambda model: apply_finetune(model, section)


# --- classification reports -------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, tokenizer: Tokenizer, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Class probabilities (N, C) for texts."""
    texts = not_one_string(texts, "predict's texts")
    seq_len = model.config.block_size
    out = []
    for i in range(0, len(texts), batch_size):
        batch = collate([encode_text(tokenizer, t, seq_len) for t in texts[i:i + batch_size]], tokenizer.eos_id)
        out.append(class_logits(model, batch.to(next(model.parameters()).device)).float().softmax(-1).cpu())
    return torch.cat(out)


def confusion(pred: list[int], gold: list[int], n: int) -> list[list[int]]:
    m = [[0] * n for _ in range(n)]
    for p, g in zip(pred, gold):
        m[g][p] += 1
    return m


def classify_report(model: nn.Module, tokenizer: Tokenizer, labels: list[str], texts: list[str],
                    gold: list[str]) -> dict[str, Any]:
    """Accuracy and confusion matrix (rows: true label, columns: predicted) of a classifier on labelled texts."""
    pred = predict(model, tokenizer, texts).argmax(-1).tolist()
    g = [labels.index(x) for x in gold]
    acc = sum(p == t for p, t in zip(pred, g)) / max(1, len(g))
    return {"accuracy": acc, "n": len(g), "labels": labels, "confusion": confusion(pred, g, len(labels))}


def format_confusion(report: dict[str, Any]) -> str:
    labels = report["labels"]
    w = max(8, *(len(x) for x in labels)) + 2
    lines = [f"accuracy {report['accuracy']:.3f} on {report['n']} examples; confusion (rows true, columns predicted):",
             " " * w + "".join(f"{x:>{w}}" for x in labels)]
    for lab, row in zip(labels, report["confusion"]):
        lines.append(f"{lab:<{w}}" + "".join(f"{v:>{w}}" for v in row))
    return "\n".join(lines)


# --- the verb ----------------------------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    train: Any  # gptforge.train.TrainResult
    trainable_params: int
    total_params: int
    optimizer_state_bytes: int  # AdamW: two fp32 moments per trainable parameter
    classify: dict[str, Any] | None = None


def finetune(cfg: RunConfig, base: str | Path, spec: FinetuneSpec, *, data: str, val_data: str | None = None,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune checkpoint `base` on `data` (a prepared directory for lm, a JSONL for chat and classify),
    writing the run to `cfg.out`. `cfg.train` holds the loop's settings; the model comes from `base`."""
    if cfg.out is None:
        raise GptforgeError("finetune needs --out DIR")
    claim_run_dir(Path(cfg.out), None, (base, data, val_data), verb="finetune")  # before base/ is written into it
    base_ckpt = resolve_checkpoint(base)
    base_model, tokenizer, base_cfg = load_checkpoint(base_ckpt)
    if base_cfg.finetune is not None and base_cfg.finetune.classifier:
        raise GptforgeError(f"{base_ckpt} is a classifier; fine-tune its base language model instead")
    init_from = base_ckpt
    seq_len = min(cfg.train.seq_len or base_cfg.model.block_size, base_cfg.model.block_size)
    source, loss_fn, labels = None, next_token_loss, None
    if spec.task == "chat" and not tokenizer.has_chat_template:
        # The ChatML markers join the vocabulary; the model's table grows to match, saved as a new base.
        tokenizer.add_chat_tokens()
        resized = resize_vocab(base_model, tokenizer.vocab_size)
        init_from = write_checkpoint(Path(cfg.out) / "base", dataclasses.replace(base_cfg, model=resized.config),
                                     tokenizer, model_state=resized.state_dict())
    if spec.task == "lm":
        cfg = dataclasses.replace(cfg, data=data)
    elif spec.task == "chat":
        source = ChatData(data, tokenizer, val_path=val_data, val_fraction=spec.val_fraction, seed=cfg.train.seed)
        loss_fn = chat_loss
        n_val = len(source.packed("val", seq_len)[0]) if source.splits["val"] else 0
        cfg = dataclasses.replace(cfg, data=str(data))
    else:
        source = ClassifyData(data, tokenizer, val_path=val_data, val_fraction=spec.val_fraction, seed=cfg.train.seed)
        loss_fn = classify_loss
        labels = source.labels
        n_val = len(source.splits["val"])
        cfg = dataclasses.replace(cfg, data=str(data))
    if source is not None and n_val:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, eval_batches=eval_batches_for(n_val, cfg.train.micro_batch)))
    lora = spec.method == "lora"
    section = FinetuneConfig(spec.method, spec.task, labels=labels, lora=spec.lora if lora else None,
                             base=str(Path(init_from).resolve()) if lora else None)
    cfg = dataclasses.replace(cfg, finetune=section, compression=base_cfg.compression)
    prepare = model_transform(section) if spec.method == "lora" or spec.task == "classify" else None

    # Counted on a copy with the transform applied, exactly as the loop will build it.
    counted = model_transform(section)(resize_vocab(base_model, tokenizer.vocab_size)) if prepare else base_model
    trainable = sum(p.numel() for p in counted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in counted.parameters())
    del base_model, counted
    result = train(cfg, init_from=str(init_from), loss_fn=loss_fn, progress=progress, source=source,
                   prepare_model=prepare, claimed=True)
    report = None
    if spec.task == "classify" and source.splits["val"]:
        model, tok, _ = load_classifier(result.checkpoint)
        val = source.splits["val"]
        report = classify_report(model, tok, source.labels, [t for _, t, _ in val], [lab for _, _, lab in val])
    return FinetuneResult(result, trainable, total, 8 * trainable, report)


def classify_texts(path: str | Path, texts: list[str] | None = None, input_file: str | None = None) -> dict[str, Any]:
    """Predictions of a classifier checkpoint for texts or a JSONL file (with labels: accuracy + confusion)."""
    not_one_string(texts, "classify_texts' texts")
    model, tokenizer, cfg = load_classifier(path)
    labels = cfg.finetune.labels
    gold = None
    if input_file is not None:
        recs, _ = read_labelled(input_file, labels)
        texts = [t for _, t, _ in recs]
        if all(lab is not None for _, _, lab in recs):
            gold = [lab for _, _, lab in recs]
    if not texts:
        raise GptforgeError("nothing to classify: give --text TEXT (repeatable) or --input FILE.jsonl")
    probs = predict(model, tokenizer, texts)
    out: dict[str, Any] = {"predictions": [
        {"text": t, "label": labels[int(p.argmax())], "probability": round(float(p.max()), 4)} for t, p in zip(texts, probs)]}
    if gold is not None:
        out["report"] = classify_report(model, tokenizer, labels, texts, gold)
    return out
