import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gptforge.config import MODEL_PRESETS, ModelConfig, model_preset
from gptforge.model import GPT

VARIANTS = {
    "gpt2-like": dict(),
    "llama-like": dict(pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False),
    "rotary-mha": dict(pos_encoding="rotary"),
}


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(model_preset("tiny"), **kw)


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_param_count_matches_formula_for_every_preset(name):
    cfg = model_preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.num_params(embeddings=False) == cfg.num_params(embeddings=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_count_matches_formula_for_variants(variant):
    cfg = tiny(**VARIANTS[variant])
    assert GPT(cfg).num_params() == cfg.num_params()


def test_known_sizes():
    # GPT-2 small is 124M with its 50257-row table (HF model card); padding to 50304 adds 47*768 parameters.
    cfg = model_preset("gpt2")
    assert cfg.padded_vocab_size == 50304
    assert cfg.num_params() - 47 * 768 == 124_439_808
    # The Llama-style preset has the shape of Llama 3.2 1B: 1.236B parameters (tied head).
    assert model_preset("llama-1b").num_params() == 1_235_814_400


def test_flops_per_token_formula():
    cfg = model_preset("gpt2")
    n = cfg.num_params(embeddings=False) + cfg.padded_vocab_size * cfg.d_model
    assert cfg.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
    assert cfg.flops_per_token() == cfg.flops_per_token(cfg.block_size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    """Changing token t never changes the logits at positions before t."""
    model = GPT(tiny(**VARIANTS[variant])).eval()
    idx = torch.randint(0, 512, (2, 32))
    t = 17
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 512
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gqa_equals_mha_with_repeated_heads():
    """A GQA model equals the MHA model whose k/v heads are its own, each repeated n_head/n_kv_head times."""
    gqa_cfg = tiny(n_kv_head=2, pos_encoding="rotary")
    gqa = GPT(gqa_cfg).eval()
    mha = GPT(dataclasses.replace(gqa_cfg, n_kv_head=None)).eval()
    state = gqa.state_dict()
    hd, H, K = gqa_cfg.head_dim, gqa_cfg.n_head, 2
    for i in range(gqa_cfg.n_layer):
        for suffix in ("weight", "bias"):
            w = state[f"blocks.{i}.attn.qkv.{suffix}"]
            q, k, v = w.split([H * hd, K * hd, K * hd])
            rep = lambda t: t.unflatten(0, (K, hd)).repeat_interleave(H // K, 0).flatten(0, 1)
            state[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), rtol=1e-5, atol=1e-5)


def test_init_follows_gpt2():
    cfg = model_preset("tiny")
    model = GPT(dataclasses.replace(cfg, n_layer=8, d_model=256))
    std = lambda p: p.detach().float().std().item()
    assert abs(std(model.blocks[0].attn.qkv.weight) - 0.02) < 0.002
    assert abs(std(model.blocks[0].mlp.down.weight) - 0.02 / 4) < 0.0005  # 1/sqrt(2 * 8 layers)
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.all(model.norm_f.weight == 1)


def test_rejects_sequence_longer_than_block():
    model = GPT(model_preset("tiny"))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("variant", VARIANTS)
def test_overfits_one_batch(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant]))
    x = torch.randint(0, 512, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_invalid_shapes_are_named():
    from gptforge.errors import GptforgeError

    with pytest.raises(GptforgeError, match="divisible"):
        ModelConfig(d_model=100, n_head=3)
    with pytest.raises(GptforgeError, match="n_kv_head"):
        ModelConfig(n_head=12, n_kv_head=5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_last_position_logits_equal_the_full_forward(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant])).eval()
    idx = torch.randint(0, model.config.vocab_size, (3, 11))
    last = torch.tensor([10, 4, 0])
    with torch.no_grad():
        full = model(idx)
        picked = model(idx, last=last)
    assert picked.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(picked[:, 0], full[torch.arange(3), last], rtol=1e-5, atol=1e-5)


# The state-dict keys of the `tiny` preset as checkpoints wrote them before the head became a module (commit
# 218c5f9): a tied model has no lm_head.weight, an untied one has it.
TINY_KEYS_BEFORE_HEAD_MODULE = ["tok_emb.weight", "pos_emb.weight"] + [
    f"blocks.{i}.{k}" for i in range(2) for k in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.up.weight", "mlp.up.bias", "mlp.down.weight", "mlp.down.bias")
] + ["norm_f.weight", "norm_f.bias"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_head_module_keeps_checkpoint_keys_and_logits(tmp_path, tied):
    """The head is a module (a TiedHead sharing tok_emb's parameter, or a Linear): state dict keys are those of
    checkpoints written before, a safetensors file round-trips onto a meta-device model, the tie survives
    load_state_dict(assign=True), and the logits are the final norm's output times the table (or lm_head)."""
    from safetensors.torch import load_file, save_file

    from gptforge.model import TiedHead

    torch.manual_seed(0)
    cfg = tiny(tie_embeddings=tied)
    model = GPT(cfg).eval()
    assert list(model.state_dict()) == TINY_KEYS_BEFORE_HEAD_MODULE + ([] if tied else ["lm_head.weight"])
    assert isinstance(model.lm_head, TiedHead) == tied
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # refuses a tensor stored twice
    with torch.device("meta"):
        loaded = GPT(cfg)
    loaded.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True)
    loaded.eval()
    if tied:
        assert loaded.lm_head.table is loaded.tok_emb and not list(loaded.lm_head.parameters())
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    normed = []
    loaded.norm_f.register_forward_hook(lambda m, i, out: normed.append(out))
    with torch.no_grad():
        logits = loaded(idx)
    head = loaded.tok_emb.weight if tied else loaded.lm_head.weight
    assert torch.equal(logits, F.linear(normed[0], head))
    with torch.no_grad():
        assert torch.equal(logits, model(idx))
