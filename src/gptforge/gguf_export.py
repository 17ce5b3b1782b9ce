"""The `export-gguf` verb: a checkpoint as one GGUF file that llama.cpp (and what builds on it: llama-cpp-python,
ollama, LM Studio) loads, written with the `gguf` package (llama.cpp's own writer and quantizers).

Like hf.py, the weights go through a declarative table: (GGUF tensor name, our state-dict key) rows per
architecture, {i} the layer. The architecture is chosen from the model's fields, never its name:
- learned positions, LayerNorm, GELU -> llama.cpp's `gpt2` (fused qkv, as ours);
- rotary, RMSNorm, SwiGLU -> `llama`; `qwen3` when queries and keys are RMS-normalised per head (qk_norm);
  `qwen2` when only q, k and v carry biases (qkv_bias); `arcee` for a ReLU² MLP.
  (Rotary + RMSNorm + a plain GELU MLP, the `shakespeare` preset's, has no llama.cpp architecture: refused.)
Anything else (value embeddings, a logit soft-cap, a sliding window shorter than the context, a field
this table does not know) is refused with the field named. Layouts that differ from ours:
- llama.cpp's `llama` (and `arcee`) architecture rotates adjacent pairs (x_2j, x_2j+1); ours (and HF's) rotates (x_j, x_j+Hd/2).
  The q and k rows of each head are permuted so that llama.cpp's pairs are our pairs: the same permutation
  llama.cpp's convert_hf_to_gguf.py applies to HF Llama folders. `qwen2`/`qwen3` rotate halves as we do.
- llama.cpp's `gpt2` needs every bias and LayerNorm bias: a model trained without them gets zeros (same function).
- Llama 3's RoPE scaling (rope_factor) becomes llama.cpp's `rope_freqs.weight`: a divisor per rotary pair.
- Our token table is padded to a multiple of 64 rows; GGUF holds exactly the tokenizer's tokens (ids above it are
  never sampled by gptforge either).
Types: f32, f16, bf16 cast every matrix; q8_0 and q4_0 quantize every matrix whose rows are a multiple of 32 wide
(else f16, as convert_hf_to_gguf.py does); vectors (norms, biases) and the position table stay f32.
The tokenizer goes in as llama.cpp's `gpt2` BPE (byte-level: tokens, token types, merges, the pre-tokenizer's
llama.cpp name) or `llama` (SentencePiece BPE with byte fallback: tokens, scores from the merge ranks, types), with
its special ids and chat template. Parity with llama.cpp: tests/test_gguf.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge.checkpoint import read_config, resolve_checkpoint
from gptforge.config import ModelConfig
from gptforge.errors import GptforgeError
from gptforge.loader import load_checkpoint
from gptforge.model import rotary_tables
from gptforge.outputs import check_out_file, staged_file
from gptforge.settings import ExportGgufConfig
from gptforge.tokenizer import CHATML_TEMPLATE, Tokenizer

try:
    import gguf  # the `gguf` extra: llama.cpp's own Python writer, reader and quantizers (pure Python + numpy)
except ImportError:
    gguf = None

# --type -> (the matrices' GGMLQuantizationType, general.file_type's LlamaFileType), by their names in `gguf`
TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
BLOCKED = ("Q8_0", "Q4_0")  # the types of 32-wide blocks with a scale each
MARKER = "gptforge.version"  # a key llama.cpp ignores: how --overwrite recognises a GGUF file gptforge wrote


def _version() -> str:
    try:
        return version("gptforge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# --- architectures ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    name: str  # general.architecture, as llama.cpp spells it
    fixed: dict[str, Any]  # ModelConfig values this architecture needs
    rows: tuple[tuple[str, str], ...]  # (GGUF tensor, our key); {i}: the layer; q/k/v are our qkv's row blocks
    permute_qk: bool = False  # llama.cpp rotates adjacent pairs here: permute q/k rows (module docstring)
    zero_bias: bool = False  # llama.cpp requires the biases: a model without them gets zeros


def _block(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((f"blk.{{i}}.{g}", f"blocks.{{i}}.{o}") for g, o in pairs)


def _with_bias(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((f"{g}.{p}", f"{o}.{p}") for g, o in pairs for p in ("weight", "bias"))


GPT2 = Arch(
    "gpt2", dict(pos_encoding="learned", norm="layernorm", mlp="gelu", qk_norm=False),
    (("token_embd.weight", "tok_emb.weight"), ("position_embd.weight", "pos_emb.weight"),
     *_with_bias(("output_norm", "norm_f")), ("output.weight", "lm_head.weight"),
     *_block(*_with_bias(("attn_norm", "norm1"), ("attn_qkv", "attn.qkv"), ("attn_output", "attn.proj"),
                         ("ffn_norm", "norm2"), ("ffn_up", "mlp.up"), ("ffn_down", "mlp.down")))),
    zero_bias=True,
)
_ROTARY_ROWS = (
    ("token_embd.weight", "tok_emb.weight"), ("output_norm.weight", "norm_f.weight"), ("output.weight", "lm_head.weight"),
    *_block(("attn_norm.weight", "norm1.weight"), ("ffn_norm.weight", "norm2.weight"),
            *_with_bias(("attn_q", "attn.q"), ("attn_k", "attn.k"), ("attn_v", "attn.v"), ("attn_output", "attn.proj"),
                        ("ffn_gate", "mlp.gate"), ("ffn_up", "mlp.up"), ("ffn_down", "mlp.down"))),
)
LLAMA = Arch("llama", dict(pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=False), _ROTARY_ROWS,
             permute_qk=True)
# Qwen2: biases on q, k and v only (qkv_bias), rotate-half rope as ours
QWEN2 = Arch("qwen2", dict(pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=False, bias=False,
                           qkv_bias=True), _ROTARY_ROWS)
QWEN3 = Arch("qwen3", dict(pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False),
             _ROTARY_ROWS + _block(("attn_q_norm.weight", "attn.q_norm.weight"), ("attn_k_norm.weight", "attn.k_norm.weight")))
# Arcee (AFM): Llama's attention with a ReLU² MLP, up -> relu^2 -> down (our mlp relu2 without qk_norm)
ARCEE = Arch("arcee", dict(pos_encoding="rotary", norm="rmsnorm", mlp="relu2", qk_norm=False), _ROTARY_ROWS,
             permute_qk=True)
ARCHES = (GPT2, LLAMA, QWEN2, QWEN3, ARCEE)

# Fields each architecture carries in its metadata (or, for dropout and zero_init_proj, that do not change the
# function the weights compute). Any other field must hold its default: a field added later is refused until
# this table learns it.
CARRIED = {"n_layer", "n_head", "n_kv_head", "d_model", "d_mlp", "vocab_size", "block_size", "rope_theta", "norm_eps",
           "bias", "tie_embeddings", "head_size", "dropout", "zero_init_proj", "pos_encoding", "norm", "mlp", "qk_norm",
           "qkv_bias", "sliding_window", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
           "rope_original_context"}
WHY = {"logit_softcap": "llama.cpp's {arch} architecture has no final-logit soft-cap",
       "value_embeds": "llama.cpp has no value-embedding tables"}


def _problems(cfg: ModelConfig, arch: Arch) -> list[str]:
    defaults = type(cfg)()
    out = [f"{k}={getattr(cfg, k, None)!r} (llama.cpp's {arch.name} needs {v!r})" for k, v in arch.fixed.items()
           if getattr(cfg, k, None) != v]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in CARRIED and value != getattr(defaults, f.name):
            out.append(f"{f.name}={value!r} ({WHY.get(f.name, 'no GGUF equivalent').format(arch=arch.name)})")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < cfg.block_size:  # a window as long as the context changes nothing
        out.append(f"sliding_window={window} (llama.cpp's {arch.name} attends to the whole context, here "
                   f"block_size {cfg.block_size})")
    if arch in (GPT2, QWEN2) and cfg.head_dim * cfg.n_head != cfg.d_model:
        out.append(f"head size {cfg.head_dim} (llama.cpp's {arch.name} needs d_model / n_head)")
    if arch is GPT2 and cfg.kv_heads != cfg.n_head:
        out.append(f"n_kv_head={cfg.kv_heads} (llama.cpp's gpt2 has no grouped-query attention)")
    return out


def choose_arch(cfg: ModelConfig) -> Arch:
    """The llama.cpp architecture that computes what `cfg` computes; else a GptforgeError naming each field in the
    way (for the architecture its position encoding points to)."""
    if cfg.pos_encoding == "learned":
        arch = GPT2
    elif cfg.qk_norm:
        arch = QWEN3
    elif cfg.mlp == "relu2":
        arch = ARCEE
    else:
        arch = QWEN2 if getattr(cfg, "qkv_bias", False) and not cfg.bias else LLAMA
    problems = _problems(cfg, arch)
    if not problems:
        return arch
    raise GptforgeError(f"this model cannot be exported to GGUF without changing its math: {'; '.join(problems)}")


# --- weights --------------------------------------------------------------------------------------------------

def _permute_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from "rotate half" (j pairs with j + Hd/2) to adjacent pairs (2j, 2j+1):
    new row 2j + s of a head is old row s * Hd/2 + j. Works for a weight (rows, D) and a bias (rows,)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: Arch,
                 n_vocab: int) -> dict[str, torch.Tensor]:
    """Our state dict (float) -> {GGUF tensor name: fp32 tensor}, in the table's order. Every weight of ours must
    be used: one the table does not know is refused rather than dropped."""
    state = dict(state)
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layer):  # qkv's row blocks under names of their own
        for part in ("weight", "bias"):
            if arch is not GPT2 and (key := f"blocks.{i}.attn.qkv.{part}") in state:
                wq, wk, wv = state.pop(key).split([q, kv, kv], dim=0)
                if arch.permute_qk:
                    wq, wk = _permute_pairs(wq, cfg.n_head), _permute_pairs(wk, cfg.kv_heads)
                state |= {f"blocks.{i}.attn.q.{part}": wq, f"blocks.{i}.attn.k.{part}": wk, f"blocks.{i}.attn.v.{part}": wv}
    out: dict[str, torch.Tensor] = {}
    used = set()
    rows = [r for r in arch.rows if "{i}" not in r[0]]  # the model's own tensors, then each layer's
    rows += [(g.format(i=i), o.format(i=i)) for i in range(cfg.n_layer) for g, o in arch.rows if "{i}" in g]
    for name, ours in rows:
        if ours in state:
            t = state[ours]
            used.add(ours)
        elif ours.endswith(".bias") and arch.zero_bias:
            t = torch.zeros(state[ours.removesuffix(".bias") + ".weight"].shape[0])
        else:
            continue  # optional in llama.cpp and absent here: a tied head, biases of a bias-free model
        if ours in ("tok_emb.weight", "lm_head.weight"):
            t = t[:n_vocab]
        out[name] = t.float().contiguous()
    if cfg.pos_encoding == "rotary" and cfg.rope_factor is not None:
        out["rope_freqs.weight"] = rope_freq_factors(cfg)
    leftover = sorted(set(state) - used)
    if leftover:
        raise GptforgeError(f"weights the GGUF {arch.name} table does not map: {', '.join(leftover[:5])}")
    return out


def rope_freq_factors(cfg: ModelConfig) -> torch.Tensor:
    """Llama 3's RoPE scaling as llama.cpp takes it: one divisor per rotary pair (`rope_freqs.weight`), the plain
    frequency over the scaled one. Read off our own rotary tables at position 1 (angle = frequency), so the file
    carries exactly the scaling the model computes."""
    def freqs(c: ModelConfig) -> torch.Tensor:
        cos, sin = rotary_tables(torch.ones(1), c)
        return torch.atan2(sin, cos)[0, :c.head_dim // 2].double()  # (Hd/2,): each pair's angle per position

    return (freqs(dataclasses.replace(cfg, rope_factor=None)) / freqs(cfg)).float()


def encode_tensor(name: str, t: torch.Tensor, qtype: str) -> tuple[np.ndarray, str]:
    """A tensor's bytes and the type (a GGMLQuantizationType name) it is stored as: vectors and the position table
    F32, the matrices `qtype` (Q8_0 / Q4_0 where their rows split into whole 32-wide blocks, else F16)."""
    a = t.numpy()
    if a.ndim == 1 or name == "position_embd.weight" or qtype == "F32":
        return a, "F32"
    if qtype in BLOCKED and a.shape[-1] % 32:
        qtype = "F16"
    if qtype == "F16":
        return a.astype(np.float16), "F16"
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype]), qtype  # BF16 too: as uint8 bytes


# --- tokenizer ------------------------------------------------------------------------------------------------

# The regexes that split text before byte-level BPE, as tokenizer.json writes them, by llama.cpp's name for them.
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _byte_level(p: dict, regex: bool) -> bool:
    return p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex and not p.get("add_prefix_space")


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json: GPT-2's regex inside ByteLevel (`gpt-2`; after
    single digits split off, `smollm`), or a known Split regex followed by a regex-free ByteLevel."""
    pre = pre or {}
    if _byte_level(pre, True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
            and _byte_level(parts[1], True)):
        return "smollm"
    if len(parts) == 2 and parts[0].get("type") == "Split" and _byte_level(parts[1], False):
        pattern = parts[0].get("pattern", {}).get("Regex")
        for name, regex in SPLITS.items():
            if pattern == regex:
                return name
    raise GptforgeError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent that "
                        f"gptforge knows (GPT-2's byte-level regex, or a Split of {', '.join(SPLITS)})")


def _tokens(spec: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Every id's text and llama.cpp token type: the model's vocabulary NORMAL (byte-fallback pieces <0xNN> BYTE,
    the unknown piece UNKNOWN), added special tokens CONTROL, other added ones USER_DEFINED, ids past the tokenizer
    (none: n_vocab is its size) UNUSED."""
    model = spec["model"]
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if model.get("byte_fallback"):
        for i, text in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", text):
                types[i] = gguf.TokenType.BYTE
            elif text == model.get("unk_token"):
                types[i] = gguf.TokenType.UNKNOWN
    return tokens, types


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _add_byte_level(w: gguf.GGUFWriter, spec: dict, n_vocab: int) -> None:
    """Byte-level BPE as llama.cpp's `gpt2` tokenizer model: tokens, types, merges and the pre-tokenizer's name."""
    norm = (spec.get("normalizer") or {}).get("type")
    if norm not in (None, "NFC"):  # NFC (Qwen2's) changes no text already in NFC, as nearly all text is
        raise GptforgeError(f"the tokenizer normalizes text ({norm}); llama.cpp's gpt2 tokenizer does not, so their "
                            "token ids would differ")
    tokens, types = _tokens(spec, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(spec["model"]))


def _space_prefix(spec: dict) -> bool | None:
    """SentencePiece's whitespace handling, as HF converts it: spaces become "▁" and one is put before the text
    (a Prepend + Replace normalizer, or a Metaspace pre-tokenizer that does not split). True/False: whether the
    prefix is added; None: some other scheme llama.cpp's SentencePiece tokenizer does not have."""
    norm, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm else []
    kinds = [(n.get("type"), n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content")) for n in steps]
    if not pre and kinds in ([("Prepend", "▁", None, None), ("Replace", None, " ", "▁")],
                             [("Replace", None, " ", "▁")]):
        return len(kinds) == 2
    if not norm and pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" and not pre.get("split", True):
        return pre.get("prepend_scheme", "always") != "never"
    return None


def _add_sentencepiece(w: gguf.GGUFWriter, spec: dict, n_vocab: int) -> None:
    """A SentencePiece BPE converted by HF (byte fallback, "▁" for spaces: Llama 2, Mistral, TinyLlama) as
    llama.cpp's `llama` tokenizer model. That tokenizer merges the adjacent pair whose result scores highest, so each
    token scores minus the rank of the merge that first makes it: the order HF's merges apply."""
    prefix = _space_prefix(spec)
    if prefix is None:
        raise GptforgeError("the tokenizer's SentencePiece whitespace scheme (normalizer "
                            f"{(spec.get('normalizer') or {}).get('type')}, pre-tokenizer "
                            f"{(spec.get('pre_tokenizer') or {}).get('type')}) has no llama.cpp equivalent")
    tokens, types = _tokens(spec, n_vocab)
    index = {t: i for i, t in enumerate(tokens)}
    scores = [0.0] * n_vocab
    for rank, merge in reversed(list(enumerate(_merges(spec["model"])))):  # the first merge making a token wins
        i = index.get(merge.replace(" ", ""))
        if i is not None:
            scores[i] = -float(rank)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(prefix)
    if (unk := spec["model"].get("unk_token")) in index:
        w.add_unk_token_id(index[unk])


def add_tokenizer(w: gguf.GGUFWriter, tokenizer: Tokenizer, n_vocab: int) -> None:
    """The tokenizer as llama.cpp's `gpt2` (byte-level BPE) or `llama` (SentencePiece BPE with byte fallback)
    tokenizer model, its special ids, and the chat template (llama-cpp-python renders it for chat completions)."""
    spec = json.loads(tokenizer.hf.to_str())
    model, decoder = spec.get("model", {}), (spec.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and decoder == "ByteLevel":
        _add_byte_level(w, spec, n_vocab)
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        _add_sentencepiece(w, spec, n_vocab)
    else:
        raise GptforgeError(f"the tokenizer is a {model.get('type')} model with a {decoder} decoder; GGUF export "
                            "handles byte-level BPE (llama.cpp's gpt2 tokenizer) and SentencePiece BPE with byte "
                            "fallback (llama.cpp's llama tokenizer)")
    # Our own tokenizers prepend nothing (bos = eos, as export-hf writes); an imported one may start with a BOS
    bos, start = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "start_ids", ())
    w.add_bos_token_id(tokenizer.eos_id if bos is None else bos)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_add_bos_token(bool(start))
    w.add_add_eos_token(False)
    if tokenizer.has_chat_template:
        w.add_eot_token_id(tokenizer.im_end_id)
        w.add_chat_template(getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE)


# --- the file -------------------------------------------------------------------------------------------------

def add_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, arch: Arch, n_vocab: int) -> None:
    """The architecture's hyper-parameters, under llama.cpp's `{arch}.*` keys."""
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_width)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_vocab_size(n_vocab)
    if arch is GPT2:
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)


def is_gptforge_gguf(path: Path) -> bool:
    """A GGUF file that export-gguf wrote (it carries our marker key): the only kind --overwrite replaces."""
    try:
        return gguf is not None and gguf.GGUFReader(path).get_field(MARKER) is not None
    except Exception:  # not GGUF at all: the reader raises on a foreign magic or a truncated header
        return False


def export_gguf(checkpoint: str | Path, out: str | Path, gguf_type: str = ExportGgufConfig.type,
                overwrite: bool = False) -> tuple[Path, str]:
    """Write a checkpoint as one GGUF file for llama.cpp; returns (file, architecture).

    `gguf_type` is f32, f16, bf16, q8_0 or q4_0 (TYPES). A LoRA checkpoint is merged into its base first (the loader does
    it); an int8/int4 checkpoint is refused (export its float parent: llama.cpp quantizes with its own formats).
    `out` follows outputs.check_out_file: an existing file is replaced only with `overwrite` and only if this
    function wrote it; the file appears whole or not at all.
    """
    if gguf_type not in TYPES:
        raise GptforgeError(f"unknown --type {gguf_type!r}; use one of {', '.join(TYPES)}")
    if gguf is None:
        raise GptforgeError("export-gguf needs the gguf package: pip install 'gptforge[gguf]'")
    dest = check_out_file(out, "a GGUF file", is_gptforge_gguf, overwrite=overwrite, inputs=[checkpoint])
    ckpt = resolve_checkpoint(checkpoint)
    run = read_config(ckpt)
    if run.compression is not None and run.compression.quantized:
        raise GptforgeError(f"{ckpt} is quantized ({run.compression.quantization.method}); export its unquantized "
                            f"parent and choose --type q8_0 or q4_0 (llama.cpp's own quantized formats)")
    cfg = run.model
    arch = choose_arch(cfg)
    model, tokenizer, _ = load_checkpoint(ckpt)
    n_vocab = tokenizer.vocab_size
    tensors = gguf_tensors({k: v.float() for k, v in model.state_dict().items()}, cfg, arch, n_vocab)
    qtype, file_type = TYPES[gguf_type]
    need = sum(t.numel() * 4 for t in tensors.values())
    with staged_file(dest, "GGUF file", need=need) as tmp:
        w = gguf.GGUFWriter(tmp, arch.name)
        w.add_type("model")
        w.add_name(ckpt.name)
        w.add_string(MARKER, _version())
        add_hparams(w, cfg, arch, n_vocab)
        w.add_file_type(int(gguf.LlamaFileType[file_type]))
        if qtype in BLOCKED:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, tokenizer, n_vocab)
        for name, t in tensors.items():
            data, stored = encode_tensor(name, t, qtype)
            raw = gguf.GGMLQuantizationType[stored] if data.dtype == np.uint8 else None  # bytes of blocks or bf16
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return dest, arch.name
