"""Hugging Face interop: a declarative key map to and from `GPT2LMHeadModel` and `LlamaForCausalLM` folders.

Each format is a table of (our key, HF key, transform) rows per layer plus a table of config fields; import and
export read the same tables in opposite directions, so they cannot drift apart. Parity is proven by numbers in
tests/test_hf.py: logits (fp32, atol 1e-4), greedy tokens and decoded text against `transformers` itself.

Layouts that differ:
- GPT-2 stores its projections as `Conv1D`, weight (in, out): transposed against nn.Linear's (out, in).
- GPT-2 fuses q, k, v in `c_attn` in the order our `qkv` uses; Llama keeps `q_proj`, `k_proj`, `v_proj`
  apart, so they are concatenated (and split on export) along the output rows.
- Our rotary embedding rotates the pairs (x_i, x_{i+Hd/2}) ("rotate half"), which is what HF's Llama code
  does with its own q/k layout, so no permutation of q/k rows is needed (Meta's original checkpoints
  interleave pairs and are permuted by HF's conversion script; HF-format folders already are).
- Our token table is padded to a multiple of 64 rows; HF holds exactly vocab_size rows.

Export refuses, naming the field, any ModelConfig value it cannot express: fields the tables do not know
must hold their defaults (a field added to ModelConfig later is refused until a format learns it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
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
    """One weight: our key and HF key ({i}: the layer), and the transform from HF to ours (and back)."""

    ours: str
    theirs: str
    to_ours: T = _same
    to_theirs: T = _same
    when: Callable[[ModelConfig], bool] = lambda c: True


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
    Row("lm_head.weight", "lm_head.weight", when=lambda c: not c.tie_embeddings),
]
# Buffers some GPT-2 checkpoints carry (the causal mask): not weights, never mapped.
GPT2_IGNORED = re.compile(r".*attn\.(masked_)?bias$")

# --- Llama ---------------------------------------------------------------------------------------------------

LLAMA_ROWS = [
    Row("tok_emb.weight", "model.embed_tokens.weight"),
    Row("blocks.{i}.norm1.weight", "model.layers.{i}.input_layernorm.weight"),
    # qkv is q_proj, k_proj and v_proj stacked along the output rows: handled by _split/_fuse_qkv.
    Row("blocks.{i}.attn.proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    Row("blocks.{i}.attn.proj.bias", "model.layers.{i}.self_attn.o_proj.bias", when=lambda c: c.bias),
    Row("blocks.{i}.norm2.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    Row("blocks.{i}.mlp.gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    Row("blocks.{i}.mlp.up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    Row("blocks.{i}.mlp.down.weight", "model.layers.{i}.mlp.down_proj.weight"),
    Row("blocks.{i}.mlp.gate.bias", "model.layers.{i}.mlp.gate_proj.bias", when=lambda c: c.bias),
    Row("blocks.{i}.mlp.up.bias", "model.layers.{i}.mlp.up_proj.bias", when=lambda c: c.bias),
    Row("blocks.{i}.mlp.down.bias", "model.layers.{i}.mlp.down_proj.bias", when=lambda c: c.bias),
    Row("norm_f.weight", "model.norm.weight"),
    Row("lm_head.weight", "lm_head.weight", when=lambda c: not c.tie_embeddings),
]
LLAMA_QKV = ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.v_proj")
LLAMA_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Format:
    name: str  # the HF architecture
    model_type: str
    rows: list[Row]
    ignored: re.Pattern
    # ModelConfig values this format requires (a field not listed here nor in `config_keys` must keep its default)
    fixed: dict[str, Any]
    # ModelConfig field -> HF config key, for the values it carries across
    config_keys: dict[str, str]


GPT2 = Format(
    "GPT2LMHeadModel", "gpt2", GPT2_ROWS, GPT2_IGNORED,
    fixed=dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True),
    config_keys=dict(n_layer="n_layer", n_head="n_head", d_model="n_embd", d_mlp="n_inner", vocab_size="vocab_size",
                     block_size="n_positions", norm_eps="layer_norm_epsilon", tie_embeddings="tie_word_embeddings"),
)
LLAMA = Format(
    "LlamaForCausalLM", "llama", LLAMA_ROWS, LLAMA_IGNORED,
    fixed=dict(pos_encoding="rotary", norm="rmsnorm", mlp="swiglu"),
    config_keys=dict(n_layer="num_hidden_layers", n_head="num_attention_heads", n_kv_head="num_key_value_heads",
                     d_model="hidden_size", d_mlp="intermediate_size", vocab_size="vocab_size",
                     block_size="max_position_embeddings", rope_theta="rope_theta", norm_eps="rms_norm_eps",
                     tie_embeddings="tie_word_embeddings", bias="attention_bias", head_size="head_dim"),
)
FORMATS = {"GPT2LMHeadModel": GPT2, "LlamaForCausalLM": LLAMA}
# Fields every format handles without a config key: dropout is a training setting and zero_init_proj an
# initialisation, neither part of the function the weights compute.
UNIVERSAL = {"dropout", "zero_init_proj"}


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
        elif f.name not in fmt.config_keys and f.name not in UNIVERSAL and value != getattr(defaults, f.name):
            problems.append(f"{f.name}={value!r} (no {fmt.name} equivalent)")
    if fmt is GPT2:
        if cfg.kv_heads != cfg.n_head:
            problems.append(f"n_kv_head={cfg.n_kv_head} (GPT-2 has no grouped-query attention)")
        if cfg.head_dim * cfg.n_head != cfg.d_model:
            problems.append(f"head_size={cfg.head_size} (GPT-2 needs head size d_model / n_head)")
    return problems


def choose_format(cfg: ModelConfig) -> Format:
    """The HF format that expresses `cfg` exactly; else a GptforgeError naming each field in the way."""
    tried = {name: _unexpressible(cfg, fmt) for name, fmt in FORMATS.items()}
    for name, problems in tried.items():
        if not problems:
            return FORMATS[name]
    detail = "; ".join(f"as {name}: {', '.join(p)}" for name, p in tried.items())
    raise GptforgeError(f"this model cannot be exported to a Hugging Face format without changing its math ({detail})")


# --- config translation -------------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, fmt: Format, tokenizer: Tokenizer | None) -> dict[str, Any]:
    out: dict[str, Any] = {"architectures": [fmt.name], "model_type": fmt.model_type, "dtype": "float32"}
    for ours, theirs in fmt.config_keys.items():
        out[theirs] = getattr(cfg, ours)
    if fmt is GPT2:
        out.update(activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, n_ctx=cfg.block_size)
    else:
        out.update(hidden_act="silu", num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, mlp_bias=cfg.bias,
                   intermediate_size=cfg.mlp_width, attention_dropout=0.0, rope_scaling=None,
                   rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if tokenizer is not None:
        out["bos_token_id"] = out["eos_token_id"] = tokenizer.eos_id
    return out


def _get(hf: dict, key: str, where: str) -> Any:
    if key not in hf:
        raise GptforgeError(f"{where}: config.json has no {key!r}")
    return hf[key]


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> tuple[ModelConfig, Format]:
    """Our ModelConfig (and the format whose key map carries it) from an HF config.json mapping; refuses
    architectures and options we cannot reproduce. The one reading of HF config keys: import-hf and plan use it."""
    if not isinstance(hf, dict):
        raise GptforgeError(f"{where}: config.json holds {type(hf).__name__}, not a mapping of HF config keys")
    arch = (hf.get("architectures") or [None])[0]
    fmt = FORMATS.get(arch) or next((f for f in FORMATS.values() if f.model_type == hf.get("model_type")), None)
    if fmt is None:
        raise GptforgeError(f"{where}: architecture {arch or hf.get('model_type')!r} is not supported; "
                            f"supported: {', '.join(FORMATS)}")
    values: dict[str, Any] = dict(fmt.fixed)
    if fmt is GPT2:
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise GptforgeError(f"{where}: activation_function {act!r} is not supported (GPT-2 uses gelu_new, the tanh approximation)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise GptforgeError(f"{where}: non-standard attention scaling (scale_attn_by_inverse_layer_idx / scale_attn_weights) is not supported")
        for ours, theirs in GPT2.config_keys.items():
            if theirs in hf and hf[theirs] is not None:
                values[ours] = hf[theirs]
    else:
        if hf.get("hidden_act", "silu") != "silu":
            raise GptforgeError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (Llama uses silu)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise GptforgeError(f"{where}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
        if bool(hf.get("mlp_bias", False)) != bool(hf.get("attention_bias", False)):
            raise GptforgeError(f"{where}: attention_bias and mlp_bias differ; gptforge has one bias switch")
        for ours, theirs in LLAMA.config_keys.items():
            if ours == "rope_theta":
                values[ours] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
            elif theirs in hf and hf[theirs] is not None:
                values[ours] = hf[theirs]
        values.setdefault("bias", False)
        values.setdefault("tie_embeddings", False)  # LlamaConfig's default
    for key in ("n_layer", "d_model", "vocab_size"):
        _get(hf, fmt.config_keys[key], where)
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

def _expand(rows: list[Row], cfg: ModelConfig) -> list[Row]:
    out = []
    for r in rows:
        if not r.when(cfg):
            continue
        if "{i}" in r.ours:
            out += [dataclasses.replace(r, ours=r.ours.format(i=i), theirs=r.theirs.format(i=i)) for i in range(cfg.n_layer)]
        else:
            out.append(r)
    if cfg.pos_encoding != "learned":
        out = [r for r in out if not r.ours.startswith("pos_emb")]
    if not cfg.bias:
        out = [r for r in out if not r.ours.endswith(".bias")]
    return out


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig, fmt: Format) -> dict[str, torch.Tensor]:
    """Our state dict -> HF's (tensors contiguous, token table cut to vocab_size rows)."""
    out = {}
    for r in _expand(fmt.rows, cfg):
        t = r.to_theirs(state[r.ours])
        if r.ours in ("tok_emb.weight", "lm_head.weight"):
            t = t[:cfg.vocab_size]
        out[r.theirs] = t.contiguous()
    if fmt is LLAMA:
        q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        for i in range(cfg.n_layer):
            for part in ("weight", "bias") if cfg.bias else ("weight",):
                ws = state[f"blocks.{i}.attn.qkv.{part}"].split([q, kv, kv], dim=0)
                for name, w in zip(LLAMA_QKV, ws):
                    out[f"{name.format(i=i)}.{part}"] = w.contiguous()
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
        out[r.ours] = r.to_ours(take(r.theirs))
    if fmt is LLAMA:
        for i in range(cfg.n_layer):
            for part in ("weight", "bias") if cfg.bias else ("weight",):
                out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([take(f"{n.format(i=i)}.{part}") for n in LLAMA_QKV], 0)
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
    gen = {"bos_token_id": tokenizer.eos_id, "eos_token_id": ([tokenizer.eos_id, tokenizer.im_end_id]
                                                              if tokenizer.has_chat_template else tokenizer.eos_id)}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
