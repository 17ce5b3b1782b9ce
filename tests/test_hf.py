"""Hugging Face interop proven by numbers: import-hf and export-hf against `transformers` itself (offline, tiny
random models): logits (fp32, atol 1e-4), greedy tokens, decoded text; and what cannot be expressed is refused."""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM)

from gptforge.checkpoint import write_checkpoint  # noqa: E402
from gptforge.config import ModelConfig, RunConfig, model_preset  # noqa: E402
from gptforge.errors import GptforgeError  # noqa: E402
from gptforge.generate import complete  # noqa: E402
from gptforge.hf import choose_format  # noqa: E402
from gptforge.interop import export_hf, import_hf  # noqa: E402
from gptforge.loader import load_checkpoint  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.tokenizer import Tokenizer  # noqa: E402

ATOL = 1e-4
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["the quick brown fox jumps over the lazy dog; hello world. " * 40], 300)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def ours_logits(model, ids, vocab):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, :, :vocab]


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def ours_greedy(model, tok, n):
    return complete(model, tok, [PROMPT], max_new_tokens=n, temperature=0.0, stop_at_eos=False)[0]


def assert_same_model(hf_model, ours, tok):
    ids = tok.encode(PROMPT)
    torch.testing.assert_close(ours_logits(ours, ids, tok.vocab_size), hf_logits(hf_model, ids), atol=ATOL, rtol=0)
    c = ours_greedy(ours, tok, 12)
    assert c.token_ids == hf_greedy(hf_model, ids, 12)
    assert c.text == tok.decode(c.token_ids)


@pytest.mark.parametrize("weights, tokenizer_files", [("safetensors", "vocab+merges"), ("bin", "tokenizer.json")])
def test_import_gpt2_equals_transformers(tmp_path, tok, weights, tokenizer_files):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=tok.vocab_size, n_positions=64,
                                    bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)).eval()
    hf.save_pretrained(tmp_path / "hf")
    if weights == "bin":  # the older pickle format (transformers 5 writes safetensors only), read weights_only
        torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
        (tmp_path / "hf" / "model.safetensors").unlink()
    if tokenizer_files == "vocab+merges":
        tok.hf.model.save(str(tmp_path / "hf"))  # GPT-2's own files: vocab.json + merges.txt
    else:
        tok.save(tmp_path / "hf" / "tokenizer.json")
    assert (tmp_path / "hf" / ("model.safetensors" if weights == "safetensors" else "pytorch_model.bin")).is_file()
    ours, ours_tok, cfg = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt"))
    assert ours_tok.encode(PROMPT) == tok.encode(PROMPT)
    assert cfg.model.n_layer == 2 and cfg.model.pos_encoding == "learned"
    assert_same_model(hf, ours, tok)


def test_export_gpt2_loads_in_transformers(tmp_path, tok):
    cfg = dataclasses.replace(model_preset("gpt2"), n_layer=2, n_head=4, d_model=32, vocab_size=tok.vocab_size,
                              block_size=64)
    torch.manual_seed(1)
    ours = GPT(cfg).eval()
    ckpt = write_checkpoint(tmp_path / "ckpt", RunConfig(model=cfg), tok, model_state=ours.state_dict())
    out, arch = export_hf(ckpt, tmp_path / "hf")
    assert arch == "GPT2LMHeadModel"
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert_same_model(hf, ours, tok)
    at = AutoTokenizer.from_pretrained(out)
    assert at(PROMPT)["input_ids"] == tok.encode(PROMPT)
    assert at.decode(tok.encode(PROMPT)) == PROMPT
    # The chat template travels with the tokenizer and renders exactly as ours does.
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = at.apply_chat_template(msgs, tokenize=False)
    assert at(rendered)["input_ids"] == tok.encode_chat(msgs)[0]
    assert at.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("tied", [False, True])
def test_export_llama_preset_loads_in_transformers_and_round_trips(tmp_path, tok, tied):
    # The llama-1b preset's variant (RoPE theta 5e5, RMSNorm, SwiGLU, 4:1 GQA, no biases), shrunk.
    cfg = dataclasses.replace(model_preset("llama-1b"), n_layer=2, n_head=8, n_kv_head=2, d_model=64, d_mlp=96,
                              vocab_size=tok.vocab_size, block_size=64, tie_embeddings=tied)
    torch.manual_seed(2)
    ours = GPT(cfg).eval()
    ckpt = write_checkpoint(tmp_path / "ckpt", RunConfig(model=cfg), tok, model_state=ours.state_dict())
    out, arch = export_hf(ckpt, tmp_path / "hf")
    assert arch == "LlamaForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, LlamaForCausalLM) and hf.config.num_key_value_heads == 2
    assert_same_model(hf, ours, tok)
    back, _, back_cfg = load_checkpoint(import_hf(out, tmp_path / "back"))
    assert back_cfg.model == cfg
    for k, v in ours.state_dict().items():  # the padding rows above vocab_size are not HF's to keep
        n = tok.vocab_size if k in ("tok_emb.weight", "lm_head.weight") else None
        assert torch.equal(back.state_dict()[k][:n], v[:n]), k


def test_import_llama_from_transformers(tmp_path, tok):
    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=64,
                                      rms_norm_eps=1e-5)).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    ours, _, cfg = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt"))
    assert cfg.model.mlp == "swiglu" and cfg.model.kv_heads == 2 and not cfg.model.tie_embeddings
    assert_same_model(hf, ours, tok)


def test_export_refuses_what_it_cannot_express(tmp_path, tok):
    with pytest.raises(GptforgeError, match=r"mlp='gelu'.*LlamaForCausalLM needs 'swiglu'"):
        choose_format(model_preset("shakespeare"))  # rotary + GELU: neither GPT-2 nor Llama
    gqa_gpt2 = dataclasses.replace(model_preset("tiny"), n_kv_head=2)
    with pytest.raises(GptforgeError, match="n_kv_head=2"):
        choose_format(gqa_gpt2)
    # A field the key map has never heard of is refused as soon as it leaves its default.
    Extended = dataclasses.make_dataclass("Extended", [("new_knob", bool, dataclasses.field(default=False))],
                                          bases=(ModelConfig,))
    assert choose_format(Extended(**dataclasses.asdict(model_preset("tiny")))).name == "GPT2LMHeadModel"
    with pytest.raises(GptforgeError, match=r"new_knob=True \(no GPT2LMHeadModel equivalent\)"):
        choose_format(Extended(**dataclasses.asdict(model_preset("tiny")), new_knob=True))


def test_import_refuses_unsupported_architecture(tmp_path):
    hf = tmp_path / "hf"  # the output may not sit inside the folder read (outputs.check_out)
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(GptforgeError, match=r"'BertForMaskedLM' is not supported; supported: GPT2LMHeadModel, LlamaForCausalLM"):
        import_hf(hf, tmp_path / "out")
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "activation_function": "relu",
                                                "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 300}))
    with pytest.raises(GptforgeError, match="activation_function 'relu' is not supported"):
        import_hf(hf, tmp_path / "out")
