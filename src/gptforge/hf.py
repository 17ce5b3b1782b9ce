"""Hugging Face interop: declarative key maps to and from the families' `*ForCausalLM` folders.

Families: GPT-2 (`GPT2LMHeadModel`), Llama (incl. Llama 3 RoPE scaling), Qwen2/Qwen2.5 (q/k/v biases), Qwen3
(per-head q/k RMSNorm, head size not d_model/heads), Mistral (sliding-window attention) and Phi-3 (fused qkv and
gate/up projections). Each format is a table of (our keys, HF keys, transform) rows per layer plus the ModelConfig
fields it carries; import and export read the same tables in opposite directions, so they cannot drift apart.
Parity is proven by numbers in tests/test_hf.py and tests/test_families.py: logits (fp32, atol 1e-4), greedy
tokens and decoded text against `transformers` itself.

Layouts that differ:
- GPT-2 stores its projections as `Conv1D`, weight (in, out): transposed against nn.Linear's (out, in).
- GPT-2 and Phi-3 fuse q, k, v in the order our `qkv` uses; the Llama-like families keep `q_proj`, `k_proj`,
  `v_proj` apart, so they are stacked (and split on export) along the output rows. Phi-3 fuses gate and up
  (`gate_up_proj`, gate first), which we keep apart.
- Our rotary embedding rotates the pairs (x_i, x_{i+Hd/2}) ("rotate half"), which is what HF's Llama code
  does with its own q/k layout, so no permutation of q/k rows is needed (Meta's original checkpoints
  interleave pairs and are permuted by HF's conversion script; HF-format folders already are).
- Our token table is padded to a multiple of 64 rows; HF holds exactly vocab_size rows.

Export refuses, naming the field, any ModelConfig value it cannot express: fields a format does not carry
must hold their defaults (a field added to ModelConfig later is refused until a format learns it). Import
refuses, naming the HF config key, what our model cannot compute (Gemma's soft-capped attention, YaRN, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptforge.config import ModelConfig
from gptforge.errors import GptforgeError
from gptforge.tokenizer import HF_CONFIG_FILE, Tokenizer

T = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transpose(t: torch.Tensor) -> torch.Tensor:  # Conv1D (in, out) <-> Linear (out, in)
    return t.t().contiguous()


@dataclass(frozen=True)
class Row:
    """One weight: our key and HF key ({i}: the layer), and the transform from HF to ours (and back).

    A key may be a tuple of keys on one side: those tensors are one tensor of the other side stacked along
    the output rows, in that order (Llama's q_proj/k_proj/v_proj are our qkv; Phi-3's gate_up_proj is our
    gate and up); `split` gives their row counts."""

    ours: str | tuple[str, ...]
    theirs: str | tuple[str, ...]
    to_ours: T = _same
    to_theirs: T = _same
    when: Callable[[ModelConfig], bool] = lambda c: True
    split: Callable[[ModelConfig], list[int]] | None = None


def _qkv_rows(c: ModelConfig) -> list[int]:
    return [c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]


def _has_bias(c: ModelConfig) -> bool:
    return c.bias


def _has_qkv_bias(c: ModelConfig) -> bool:
    return c.bias or c.qkv_bias


def _untied(c: ModelConfig) -> bool:
    return not c.tie_embeddings


# --- GPT-2 ---------------------------------------------------------------------------------------------------

GPT2_ROWS = [
    Row("tok_emb.weight", "transformer.wte.weight"),
    Row("pos_emb.weight", "transformer.wpe.weight"),
    Row("blocks.{i}.norm1.weight", "transformer.h.{i}.ln_1.weight"),
    Row("blocks.{i}.norm1.bias", "transformer.h.{i}.ln_1.bias"),
    Row("blocks.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", _transpose, _transpose),
    Row("blocks.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias"),
    Row("blocks.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", _transpose, _transpose),
    Row("blocks.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
    Row("blocks.{i}.norm2.weight", "transformer.h.{i}.ln_2.weight"),
    Row("blocks.{i}.norm2.bias", "transformer.h.{i}.ln_2.bias"),
    Row("blocks.{i}.mlp.up.weight", "transformer.h.{i}.mlp.c_fc.weight", _transpose, _transpose),
    Row("blocks.{i}.mlp.up.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    Row("blocks.{i}.mlp.down.weight", "transformer.h.{i}.mlp.c_proj.weight", _transpose, _transpose),
    Row("blocks.{i}.mlp.down.bias", "transformer.h.{i}.mlp.c_proj.bias"),
    Row("norm_f.weight", "transformer.ln_f.weight"),
    Row("norm_f.bias", "transformer.ln_f.bias"),
    Row("lm_head.weight", "lm_head.weight", when=_untied),
]
# Buffers some GPT-2 checkpoints carry (the causal mask): not weights, never mapped.
GPT2_IGNORED = re.compile(r".*attn\.(masked_)?bias$")

# --- Llama and the families that share its layout (Qwen2, Qwen3, Mistral) ----------------------------------

_L = "model.layers.{i}."
_QKV = tuple(f"{_L}self_attn.{n}_proj" for n in "qkv")
LLAMA_ROWS = [
    Row("tok_emb.weight", "model.embed_tokens.weight"),
    Row("blocks.{i}.norm1.weight", _L + "input_layernorm.weight"),
    Row("blocks.{i}.attn.qkv.weight", tuple(k + ".weight" for k in _QKV), split=_qkv_rows),
    Row("blocks.{i}.attn.qkv.bias", tuple(k + ".bias" for k in _QKV), split=_qkv_rows, when=_has_qkv_bias),
    Row("blocks.{i}.attn.q_norm.weight", _L + "self_attn.q_norm.weight", when=lambda c: c.qk_norm),  # Qwen3
    Row("blocks.{i}.attn.k_norm.weight", _L + "self_attn.k_norm.weight", when=lambda c: c.qk_norm),
    Row("blocks.{i}.attn.proj.weight", _L + "self_attn.o_proj.weight"),
    Row("blocks.{i}.attn.proj.bias", _L + "self_attn.o_proj.bias", when=_has_bias),
    Row("blocks.{i}.norm2.weight", _L + "post_attention_layernorm.weight"),
    Row("blocks.{i}.mlp.gate.weight", _L + "mlp.gate_proj.weight"),
    Row("blocks.{i}.mlp.up.weight", _L + "mlp.up_proj.weight"),
    Row("blocks.{i}.mlp.down.weight", _L + "mlp.down_proj.weight"),
    Row("blocks.{i}.mlp.gate.bias", _L + "mlp.gate_proj.bias", when=_has_bias),
    Row("blocks.{i}.mlp.up.bias", _L + "mlp.up_proj.bias", when=_has_bias),
    Row("blocks.{i}.mlp.down.bias", _L + "mlp.down_proj.bias", when=_has_bias),
    Row("norm_f.weight", "model.norm.weight"),
    Row("lm_head.weight", "lm_head.weight", when=_untied),
]
# Phi-3: Llama's layout with q/k/v fused as `qkv_proj` (our order) and gate/up as `gate_up_proj`; no biases.
PHI3_ROWS = [
    Row("tok_emb.weight", "model.embed_tokens.weight"),
    Row("blocks.{i}.norm1.weight", _L + "input_layernorm.weight"),
    Row("blocks.{i}.attn.qkv.weight", _L + "self_attn.qkv_proj.weight"),
    Row("blocks.{i}.attn.proj.weight", _L + "self_attn.o_proj.weight"),
    Row("blocks.{i}.norm2.weight", _L + "post_attention_layernorm.weight"),
    Row(("blocks.{i}.mlp.gate.weight", "blocks.{i}.mlp.up.weight"), _L + "mlp.gate_up_proj.weight",
        split=lambda c: [c.mlp_width, c.mlp_width]),
    Row("blocks.{i}.mlp.down.weight", _L + "mlp.down_proj.weight"),
    Row("norm_f.weight", "model.norm.weight"),
    Row("lm_head.weight", "lm_head.weight", when=_untied),
]
LLAMA_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Format:
    name: str  # the HF architecture
    model_type: str
    rows: list[Row]
    ignored: re.Pattern
    # ModelConfig values this format requires (a field not listed here, in `config_keys` nor in `carried` must
    # keep its default)
    fixed: dict[str, Any]
    # ModelConfig field -> HF config key, for the values it carries across one to one
    config_keys: dict[str, str]
    # ModelConfig fields carried by the format's own reading and writing below (_read_*, _write_*)
    carried: frozenset[str] = field(default_factory=frozenset)


_ROPE_SCALING = frozenset({"rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context"})
_LLAMA_KEYS = dict(n_layer="num_hidden_layers", n_head="num_attention_heads", n_kv_head="num_key_value_heads",
                   d_model="hidden_size", d_mlp="intermediate_size", vocab_size="vocab_size",
                   block_size="max_position_embeddings", norm_eps="rms_norm_eps", tie_embeddings="tie_word_embeddings",
                   head_size="head_dim")
_LLAMA_FIXED = dict(pos_encoding="rotary", norm="rmsnorm", mlp="swiglu")

GPT2 = Format(
    "GPT2LMHeadModel", "gpt2", GPT2_ROWS, GPT2_IGNORED,
    fixed=dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True),
    config_keys=dict(n_layer="n_layer", n_head="n_head", d_model="n_embd", d_mlp="n_inner", vocab_size="vocab_size",
                     block_size="n_positions", norm_eps="layer_norm_epsilon", tie_embeddings="tie_word_embeddings"),
)
LLAMA = Format("LlamaForCausalLM", "llama", LLAMA_ROWS, LLAMA_IGNORED, fixed=_LLAMA_FIXED,
               config_keys=dict(_LLAMA_KEYS, bias="attention_bias"), carried=frozenset({"rope_theta"}) | _ROPE_SCALING)
QWEN2 = Format("Qwen2ForCausalLM", "qwen2", LLAMA_ROWS, LLAMA_IGNORED, fixed=dict(_LLAMA_FIXED, bias=False, qkv_bias=True),
               config_keys=_LLAMA_KEYS, carried=frozenset({"rope_theta", "sliding_window"}) | _ROPE_SCALING)
QWEN3 = Format("Qwen3ForCausalLM", "qwen3", LLAMA_ROWS, LLAMA_IGNORED, fixed=dict(_LLAMA_FIXED, bias=False, qk_norm=True),
               config_keys=_LLAMA_KEYS, carried=frozenset({"rope_theta", "sliding_window"}) | _ROPE_SCALING)
MISTRAL = Format("MistralForCausalLM", "mistral", LLAMA_ROWS, LLAMA_IGNORED, fixed=dict(_LLAMA_FIXED, bias=False),
                 config_keys=dict(_LLAMA_KEYS, sliding_window="sliding_window"),
                 carried=frozenset({"rope_theta"}) | _ROPE_SCALING)
# Phi-3's config accepts only plain RoPE (or its longrope, which we lack): no llama3 scaling.
PHI3 = Format("Phi3ForCausalLM", "phi3", PHI3_ROWS, LLAMA_IGNORED, fixed=dict(_LLAMA_FIXED, bias=False),
              config_keys=dict(_LLAMA_KEYS, sliding_window="sliding_window"), carried=frozenset({"rope_theta"}))
# Export tries them in this order and writes the first that expresses the model (a Phi-3 import, whose math is
# Llama's or Mistral's, exports as one of those unless export-hf --architecture names Phi3ForCausalLM).
FORMATS = {f.name: f for f in (GPT2, LLAMA, QWEN2, QWEN3, MISTRAL, PHI3)}
# Fields every format handles without a config key: dropout is a training setting and zero_init_proj an
# initialisation, neither part of the function the weights compute.
UNIVERSAL = {"dropout", "zero_init_proj"}
# Families we know and refuse, with what stands in the way (import-hf names them rather than "not supported").
REFUSED = {
    "GemmaForCausalLM": "(1 + w) RMSNorm gains, the sqrt(d_model) embedding scale and a GeGLU MLP (hidden_activation) "
                        "have no gptforge model variant",
    "Gemma2ForCausalLM": "attention logit soft-capping (attn_logit_softcapping), post-attention and post-feedforward "
                         "norms, (1 + w) RMSNorm gains, a GeGLU MLP (hidden_activation) and alternating local/global "
                         "layers (layer_types) have no gptforge model variant",
    "Gemma3ForCausalLM": "post-attention and post-feedforward norms, (1 + w) RMSNorm gains, a GeGLU MLP "
                         "(hidden_activation), query_pre_attn_scalar and alternating local/global layers with their "
                         "own rope_local_base_freq (layer_types) have no gptforge model variant",
}
REFUSED["Gemma3ForConditionalGeneration"] = REFUSED["Gemma3ForCausalLM"]


# --- checking what a format can express ----------------------------------------------------------------------

def _unexpressible(cfg: ModelConfig, fmt: Format) -> list[str]:
    """Fields of `cfg` that `fmt` cannot carry: a fixed value that differs, or an unknown field off its default."""
    problems = []
    defaults = type(cfg)()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in fmt.fixed:
            if value != fmt.fixed[f.name]:
                problems.append(f"{f.name}={value!r} ({fmt.name} needs {fmt.fixed[f.name]!r})")
        elif fmt is GPT2 and f.name in ("n_kv_head", "head_size"):
            continue  # checked by their derived values below: set explicitly to the plain-MHA value is fine
        elif (f.name not in fmt.config_keys and f.name not in fmt.carried and f.name not in UNIVERSAL
              and value != getattr(defaults, f.name)):
            problems.append(f"{f.name}={value!r} (no {fmt.name} equivalent)")
    if fmt is GPT2:
        if cfg.kv_heads != cfg.n_head:
            problems.append(f"n_kv_head={cfg.n_kv_head} (GPT-2 has no grouped-query attention)")
        if cfg.head_dim * cfg.n_head != cfg.d_model:
            problems.append(f"head_size={cfg.head_size} (GPT-2 needs head size d_model / n_head)")
    return problems


def choose_format(cfg: ModelConfig, architecture: str | None = None) -> Format:
    """The HF format that expresses `cfg` exactly (the named `architecture`, else the first of FORMATS that
    does); else a GptforgeError naming each field in the way."""
    if architecture is not None and architecture not in FORMATS:
        raise GptforgeError(f"unknown Hugging Face architecture {architecture!r}; choose one of: {', '.join(FORMATS)}")
    names = [architecture] if architecture is not None else list(FORMATS)
    tried = {name: _unexpressible(cfg, FORMATS[name]) for name in names}
    for name, problems in tried.items():
        if not problems:
            return FORMATS[name]
    detail = "; ".join(f"as {name}: {', '.join(p)}" for name, p in tried.items())
    raise GptforgeError(f"this model cannot be exported to a Hugging Face format without changing its math ({detail})")


# --- config translation -------------------------------------------------------------------------------------

def _write_rope(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.rope_factor is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_context}


def hf_config(cfg: ModelConfig, fmt: Format, tokenizer: Tokenizer | None) -> dict[str, Any]:
    out: dict[str, Any] = {"architectures": [fmt.name], "model_type": fmt.model_type, "dtype": "float32"}
    for ours, theirs in fmt.config_keys.items():
        out[theirs] = getattr(cfg, ours)
    if fmt is GPT2:
        out.update(activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, n_ctx=cfg.block_size)
    else:
        out.update(hidden_act="silu", num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                   intermediate_size=cfg.mlp_width, attention_dropout=0.0, rope_scaling=None,
                   rope_parameters=_write_rope(cfg), pad_token_id=None)
    if fmt is LLAMA:
        out["mlp_bias"] = cfg.bias
    if fmt in (QWEN2, QWEN3):  # one window for every layer: max_window_layers 0 makes them all sliding
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   max_window_layers=0 if cfg.sliding_window is not None else cfg.n_layer,
                   layer_types=[_LAYER_TYPE[cfg.sliding_window is not None]] * cfg.n_layer)
    if fmt is QWEN3:
        out["attention_bias"] = False
    if fmt is PHI3:
        out.update(original_max_position_embeddings=cfg.block_size, resid_pdrop=0.0, embd_pdrop=0.0)
    if tokenizer is not None:
        out["bos_token_id"], out["eos_token_id"] = _bos(tokenizer), tokenizer.eos_id
    return out


def _bos(tokenizer: Tokenizer) -> int:
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id  # ours have no BOS: GPT-2's habit


_LAYER_TYPE = {True: "sliding_attention", False: "full_attention"}


def _get(hf: dict, key: str, where: str) -> Any:
    if key not in hf:
        raise GptforgeError(f"{where}: config.json has no {key!r}")
    return hf[key]


def _read_gpt2(hf: dict[str, Any], where: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise GptforgeError(f"{where}: activation_function {act!r} is not supported (GPT-2 uses gelu_new, the tanh approximation)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise GptforgeError(f"{where}: non-standard attention scaling (scale_attn_by_inverse_layer_idx / scale_attn_weights) is not supported")
    return {}


def _read_rope(hf: dict[str, Any], fmt: Format, where: str) -> dict[str, Any]:
    """rope_theta and the llama3 scaling fields from rope_parameters (transformers 5) or rope_scaling (older)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    supported = ["default", "llama3"] if _ROPE_SCALING <= fmt.carried else ["default"]
    if rope_type not in supported:
        raise GptforgeError(f"{where}: rope_parameters rope_type {rope_type!r} is not supported for {fmt.name} "
                            f"(supported: {', '.join(supported)})")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise GptforgeError(f"{where}: partial_rotary_factor {partial} is not supported (gptforge rotates the whole head)")
    out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rope_type == "llama3":
        out.update(rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_context=int(rope["original_max_position_embeddings"]))
    return out


def _read_qwen_window(hf: dict[str, Any], where: str) -> int | None:
    """Qwen2/3's window: `sliding_window` on the layers layer_types (or max_window_layers) marks as sliding,
    when use_sliding_window is on. gptforge applies one window to every layer, so a mix is refused."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    n = _get(hf, "num_hidden_layers", where)
    types = hf.get("layer_types") or [_LAYER_TYPE[window is not None and i >= hf.get("max_window_layers", 28)]
                                      for i in range(n)]
    if window is None or set(types) == {"full_attention"}:
        return None
    if set(types) != {"sliding_attention"}:
        raise GptforgeError(f"{where}: layer_types mixes sliding and full attention layers (max_window_layers="
                            f"{hf.get('max_window_layers')}); gptforge applies one sliding_window to every layer")
    return window


def _read_llama_like(hf: dict[str, Any], fmt: Format, where: str) -> dict[str, Any]:
    """The values of a Llama-like config that are not one-to-one keys, and the refusals of what we cannot compute."""
    if hf.get("hidden_act", "silu") != "silu":
        raise GptforgeError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported ({fmt.name} uses silu)")
    values = _read_rope(hf, fmt, where)
    if fmt is LLAMA:
        if bool(hf.get("mlp_bias", False)) != bool(hf.get("attention_bias", False)):
            raise GptforgeError(f"{where}: attention_bias and mlp_bias differ; gptforge has one bias switch "
                                "(and qkv_bias for q/k/v only)")
        values["bias"] = bool(hf.get("attention_bias", False))
    if fmt is QWEN3 and hf.get("attention_bias"):
        raise GptforgeError(f"{where}: attention_bias true is not supported for Qwen3ForCausalLM (biases on q/k/v "
                            "and o_proj but not the MLP); gptforge has bias (every Linear) and qkv_bias (q/k/v only)")
    if fmt in (QWEN2, QWEN3):
        values["sliding_window"] = _read_qwen_window(hf, where)
    if fmt in (MISTRAL, PHI3) and hf.get("layer_types") and len(set(hf["layer_types"])) > 1:
        raise GptforgeError(f"{where}: layer_types mixes sliding and full attention layers; gptforge applies one "
                            "sliding_window to every layer")
    return values


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> tuple[ModelConfig, Format]:
    """Our ModelConfig (and the format whose key map carries it) from an HF config.json mapping; refuses
    architectures and options we cannot reproduce. The one reading of HF config keys: import-hf and plan use it."""
    if not isinstance(hf, dict):
        raise GptforgeError(f"{where}: config.json holds {type(hf).__name__}, not a mapping of HF config keys")
    arch = (hf.get("architectures") or [None])[0]
    if arch in REFUSED:
        raise GptforgeError(f"{where}: {arch} is not supported: {REFUSED[arch]}; supported: {', '.join(FORMATS)}")
    fmt = FORMATS.get(arch) or next((f for f in FORMATS.values() if f.model_type == hf.get("model_type")), None)
    if fmt is None:
        raise GptforgeError(f"{where}: architecture {arch or hf.get('model_type')!r} is not supported; "
                            f"supported: {', '.join(FORMATS)}")
    for key in ("n_layer", "d_model", "vocab_size"):
        _get(hf, fmt.config_keys[key], where)
    values: dict[str, Any] = dict(fmt.fixed)
    values.update(_read_gpt2(hf, where) if fmt is GPT2 else _read_llama_like(hf, fmt, where))
    for ours, theirs in fmt.config_keys.items():
        if theirs in hf and hf[theirs] is not None:
            values[ours] = hf[theirs]
    if fmt is not GPT2:
        values.setdefault("tie_embeddings", False)  # the Llama-like configs' default
    if values.get("head_size") is not None and values["head_size"] * values["n_head"] == values["d_model"]:
        values["head_size"] = None
    if values.get("n_kv_head") == values.get("n_head"):
        values["n_kv_head"] = None
    values.setdefault("tie_embeddings", True)
    try:
        return ModelConfig(**values), fmt
    except TypeError as e:
        raise GptforgeError(f"{where}: config.json has a value of the wrong type ({e})") from None


# --- weights ----------------------------------------------------------------------------------------------

def _keys(k: str | tuple[str, ...]) -> tuple[str, ...]:
    return (k,) if isinstance(k, str) else k


def _expand(rows: list[Row], cfg: ModelConfig) -> list[Row]:
    out = []
    for r in rows:
        if not r.when(cfg) or (r.ours == "pos_emb.weight" and cfg.pos_encoding != "learned"):
            continue
        if "{i}" in str(r.ours):
            out += [dataclasses.replace(r, ours=tuple(k.format(i=i) for k in _keys(r.ours)),
                                        theirs=tuple(k.format(i=i) for k in _keys(r.theirs))) for i in range(cfg.n_layer)]
        else:
            out.append(dataclasses.replace(r, ours=_keys(r.ours), theirs=_keys(r.theirs)))
    return out


def _restack(tensors: list[torch.Tensor], parts: int, r: Row, cfg: ModelConfig) -> list[torch.Tensor]:
    """`tensors` stacked along the rows, cut into `parts` tensors by `r.split` (one part: the stack itself)."""
    whole = tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)
    return [whole] if parts == 1 else list(whole.split(r.split(cfg), dim=0))


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig, fmt: Format) -> dict[str, torch.Tensor]:
    """Our state dict -> HF's (tensors contiguous, token table cut to vocab_size rows)."""
    out = {}
    for r in _expand(fmt.rows, cfg):
        ours = [state[k][:cfg.vocab_size] if k in ("tok_emb.weight", "lm_head.weight") else state[k] for k in r.ours]
        for key, t in zip(r.theirs, _restack(ours, len(r.theirs), r, cfg)):
            out[key] = r.to_theirs(t).contiguous()
    return out


def from_hf_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, fmt: Format, where: str) -> dict[str, torch.Tensor]:
    """HF state dict -> ours; every HF weight must be used and every one of ours found."""
    hf_state = {("transformer." + k if fmt is GPT2 and not k.startswith(("transformer.", "lm_head.")) else k): v
                for k, v in hf_state.items()}
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in hf_state:
            raise GptforgeError(f"{where}: weight {key!r} is missing from the checkpoint")
        used.add(key)
        return hf_state[key].float()

    for r in _expand(fmt.rows, cfg):
        theirs = [r.to_ours(take(k)) for k in r.theirs]
        try:
            out.update(zip(r.ours, _restack(theirs, len(r.ours), r, cfg)))
        except RuntimeError as e:  # a fused tensor whose rows do not add up to the config's
            raise GptforgeError(f"{where}: {', '.join(r.theirs)} do not fit config.json ({e})") from None
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # a tied head saved anyway (some exports do) is the embedding itself
    leftover = sorted(k for k in hf_state if k not in used and not fmt.ignored.match(k))
    if leftover:
        raise GptforgeError(f"{where}: weights the {fmt.name} key map does not know: {', '.join(leftover[:5])}"
                            f"{' ...' if len(leftover) > 5 else ''}")
    for key in ("tok_emb.weight", "lm_head.weight"):  # pad the vocabulary rows to our multiple of 64 with zeros
        if key in out:
            t = out[key]
            if t.shape[0] != cfg.vocab_size:
                raise GptforgeError(f"{where}: {key} has {t.shape[0]} rows but vocab_size is {cfg.vocab_size}")
            out[key] = torch.cat([t, t.new_zeros(cfg.padded_vocab_size - t.shape[0], t.shape[1])])
    return out


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """An HF folder's weights by HF key: model.safetensors, its sharded index, or pytorch_model.bin (weights_only)."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(folder / f)))
        return state
    if (folder / "pytorch_model.bin").is_file():
        try:  # weights_only: a pickle from the internet must not run code
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise GptforgeError(f"{folder / 'pytorch_model.bin'}: cannot load with weights_only=True ({e})") from None
    raise GptforgeError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def write_hf_folder(dest: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, fmt, tokenizer: Tokenizer) -> None:
    """Write an HF-keyed state, its config.json, the tokenizer files and generation_config.json into `dest`."""
    from safetensors.torch import save_file

    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(hf_config(cfg, fmt, tokenizer), indent=2) + "\n")
    os.chmod(dest / "model.safetensors", (dest / "config.json").stat().st_mode & 0o777)  # not safetensors' 0600
    tokenizer.save(dest / "tokenizer.json")
    (dest / HF_CONFIG_FILE).write_text(json.dumps(tokenizer.hf_config(cfg.block_size), indent=2) + "\n")
    # Every id that ends generation: the tokenizer's end ids (Llama 3's <|end_of_text|>, <|eot_id|>, ...) and,
    # for a chat model, its end-of-turn token.
    ends = list(dict.fromkeys([*tokenizer.eos_ids, *([tokenizer.im_end_id] if tokenizer.has_chat_template else [])]))
    gen = {"bos_token_id": _bos(tokenizer), "eos_token_id": ends if len(ends) > 1 else ends[0]}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
