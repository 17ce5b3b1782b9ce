"""The `import-hf` and `export-hf` verbs: a Hugging Face folder to a gptforge checkpoint and back.

hf.py holds the declarative key maps and the HF files' reading and writing; these verbs add what a command
needs around them: the output policy (outputs.check_out, a staged write) and, for export, a checkpoint loaded
through gptforge.loader (LoRA merged, pruned shapes), which is why they live above the loader's layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.checkpoint import read_config, resolve_checkpoint, write_checkpoint
from gptforge.config import RunConfig
from gptforge.errors import GptforgeError
from gptforge.hf import choose_format, from_hf_state, model_config_from_hf, read_hf_weights, to_hf_state, write_hf_folder
from gptforge.loader import load_checkpoint
from gptforge.model import GPT
from gptforge.outputs import check_out, staged
from gptforge.tokenizer import Tokenizer


def import_hf(folder: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert a local HF folder (config.json, weights, tokenizer) into a gptforge checkpoint folder at `out`
    (outputs.check_out: never the folder read; `overwrite` replaces only an earlier checkpoint)."""
    src = Path(folder)
    check_out(out, "checkpoint", overwrite=overwrite, inputs=[src])
    if not (src / "config.json").is_file():
        raise GptforgeError(f"{src} is not a Hugging Face model folder (no config.json)")
    try:
        hf = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise GptforgeError(f"{src / 'config.json'}: not valid JSON ({e})") from None
    cfg, fmt = model_config_from_hf(hf, str(src))
    tokenizer = Tokenizer.load(src)  # tokenizer.json, or vocab.json + merges.txt
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GptforgeError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size} rows")
    state = from_hf_state(read_hf_weights(src), cfg, fmt, str(src))
    with torch.device("meta"):
        model = GPT(cfg)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise GptforgeError(f"{src}: weights do not fit config.json ({e})") from None
    return write_checkpoint(Path(out), RunConfig(model=cfg), tokenizer, model_state=model.state_dict())


def export_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False,
              architecture: str | None = None) -> tuple[Path, str]:
    """Write a checkpoint as an HF folder that `AutoModelForCausalLM` and `AutoTokenizer` load offline.

    Returns (folder, architecture): `architecture` (e.g. "Phi3ForCausalLM") when given, else the first family
    of hf.FORMATS that expresses the model; either way a model it cannot express is refused naming the field.
    A LoRA checkpoint is merged into its base first (gptforge.loader does it).
    `out` follows outputs.check_out (`overwrite` replaces only an earlier export); written via a temporary folder.
    """
    dest = check_out(out, "hf", overwrite=overwrite, inputs=[checkpoint])
    ckpt = resolve_checkpoint(checkpoint)
    run = read_config(ckpt)
    if run.compression is not None and run.compression.quantized:
        method = run.compression.quantization.method
        raise GptforgeError(f"{ckpt} is quantized ({method}); export its unquantized parent (HF folders hold float weights)")
    cfg = run.model
    fmt = choose_format(cfg, architecture)
    model, tokenizer, _ = load_checkpoint(ckpt)
    state = to_hf_state({k: v.float() for k, v in model.state_dict().items()}, cfg, fmt)
    with staged(dest, "Hugging Face export", need=sum(v.numel() * v.element_size() for v in state.values())) as tmp:
        write_hf_folder(tmp, state, cfg, fmt, tokenizer)
    return dest, fmt.name
