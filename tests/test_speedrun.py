"""The speedrun fields (QK-norm, ReLU², zero-init projections, logit soft-cap, value embeddings) and Muon:
each changes what it claims, every combination builds and trains, the KV cache still equals recomputation,
and a Muon run resumes exactly."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gptforge.config import ModelConfig, RunConfig, TrainConfig, model_preset
from gptforge.errors import GptforgeError
from gptforge.model import GPT, ReLU2MLP
from gptforge.optim import Muon, MuonAdamW, build_optimizer, muon_params
from gptforge.train import train

FIELDS = dict(qk_norm=True, mlp="relu2", zero_init_proj=True, tie_embeddings=False, logit_softcap=15.0, value_embeds=1)


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(model_preset("tiny"), **kw)


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Reference quintic Newton-Schulz iteration (Jordan et al. 2024), in float64: X <- aX + (bA + cA^2)X
    with A = XX^T, started from G / ||G||_F, on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def test_speedrun_preset_counts_and_defaults_unchanged():
    cfg = model_preset("speedrun")
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == cfg.num_params() and model.num_params(embeddings=False) == cfg.num_params(embeddings=False)
    # A default config builds exactly the modules it built before these fields existed.
    names = [n for n, _ in GPT(tiny()).named_parameters()]
    assert not any("norm" in n and "attn" in n for n in names) and not any("value" in n for n in names)


@pytest.mark.parametrize("combo", [c for r in range(len(FIELDS) + 1) for c in itertools.combinations(FIELDS, r)],
                         ids=lambda c: "+".join(c) or "none")
def test_every_combination_builds_counts_and_trains(combo):
    cfg = tiny(**{k: FIELDS[k] for k in combo}, n_layer=2)
    model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.num_params(embeddings=False) == cfg.num_params(embeddings=False)
    opt = build_optimizer(model, TrainConfig(lr=3e-3, optimizer="muon" if len(combo) % 2 else "adamw"), "cpu")
    x = torch.randint(0, 512, (4, 32))
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_qk_norm_normalises_queries_and_keys():
    model = GPT(tiny(qk_norm=True)).eval()
    seen = {}
    attn = model.blocks[0].attn
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    attn.k_norm.register_forward_hook(lambda m, i, o: seen.setdefault("k", o))
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 16)))
    for t in seen.values():  # (B, T, heads, Hd), unit gain at init: every head's vector has RMS 1
        assert torch.allclose(t.pow(2).mean(-1).sqrt(), torch.ones(()), atol=1e-3)


def test_soft_cap_bounds_logits_and_keeps_small_ones():
    cfg = tiny(logit_softcap=5.0)
    model = GPT(cfg).eval()
    plain = GPT(dataclasses.replace(cfg, logit_softcap=None)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.tok_emb.weight.mul_(50)  # large logits
        plain.tok_emb.weight.mul_(50)
        idx = torch.randint(0, 512, (2, 16))
        capped, raw = model(idx), plain(idx)
    assert raw.abs().max() > 20 and capped.abs().max() <= 5.0
    assert torch.allclose(capped, 5.0 * torch.tanh(raw / 5.0), atol=1e-5)


def test_relu2_mlp_is_relu_squared():
    mlp = ReLU2MLP(tiny(mlp="relu2"))
    x = torch.randn(3, 64)
    assert torch.allclose(mlp(x), mlp.down(F.relu(mlp.up(x)) ** 2))


def test_zero_init_projections_make_blocks_identity():
    model = GPT(tiny(zero_init_proj=True, tie_embeddings=False))
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.down.weight.any()
    assert not model.lm_head.weight.any()
    with torch.no_grad():
        assert not model(torch.randint(0, 512, (1, 8))).any()  # zero head: uniform prediction, loss = ln V


def test_value_embeddings_feed_first_and_last_layers():
    cfg = tiny(n_layer=4, value_embeds=1)
    model = GPT(cfg)
    assert model.ve_layers == {0: 0, 3: 0}
    assert [b.attn.value_gate is not None for b in model.blocks] == [True, False, False, True]
    # The table reaches the logits: changing it changes the output, with the gates as its only path.
    idx = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        before = model(idx)
        model.value_embeds[0].weight.add_(1.0)
        assert not torch.allclose(before, model(idx))
        for b in model.blocks:
            if b.attn.value_gate is not None:
                b.attn.value_gate.zero_()
        gated_off = model(idx)
        model.value_embeds[0].weight.add_(1.0)
        assert torch.equal(gated_off, model(idx))
    with pytest.raises(GptforgeError, match="value_embeds"):
        tiny(n_layer=2, value_embeds=2)


def test_kv_cache_equals_recomputation_for_speedrun_fields():
    """Greedy decoding through the KV cache (left-padded batch) gives the tokens and log-probabilities of
    full recomputation, with every speedrun field on."""
    from gptforge.generate import SamplingParams, generate_steps

    model = GPT(tiny(**FIELDS, n_layer=2, pos_encoding="rotary")).eval()
    with torch.no_grad():  # give the zero-initialised projections some weight so every path matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [list(range(1, 20)), [7, 8], [300] * 5]
    steps = list(generate_steps(model, prompts, SamplingParams(max_new_tokens=8, temperature=0, top_logprobs=500),
                                vocab_size=500))
    for r, prompt in enumerate(prompts):
        ids = list(prompt)
        for s in steps:
            with torch.no_grad():
                ref = model(torch.tensor([ids]))[0, -1, :500].log_softmax(-1)
            assert s.ids[r] == int(ref.argmax())
            got = torch.zeros(500)
            idx, val = zip(*s.top[r])
            got[list(idx)] = torch.tensor(val)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
            ids.append(s.ids[r])


@pytest.mark.parametrize("impl", ["torch", "gptforge"])
def test_muon_update_is_orthogonalised_newton_schulz(impl):
    """One step from zero momentum moves a matrix by -lr * scale * NS(G): torch's (bf16 iteration) and ours
    (fp32 on CPU) both match the float64 reference iteration, and the update is orthogonal to tolerance."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(96, 32))
    g = torch.randn(96, 32) * torch.linspace(0.1, 3.0, 32)  # a spread-out spectrum
    cls = torch.optim.Muon if impl == "torch" else Muon
    opt = cls([w], lr=1.0, momentum=0.0, weight_decay=0.0, nesterov=False)
    w.grad = g.clone()
    opt.step()
    update = -w.detach().double() / (96 / 32) ** 0.5  # the "original" scale sqrt(max(1, rows / cols))
    ref = newton_schulz(g)
    assert (update - ref).abs().max() < (0.02 if impl == "torch" else 1e-5)
    s_g, s_u = torch.linalg.svdvals(g.double()), torch.linalg.svdvals(update)
    assert s_g.max() / s_g.min() > 5  # the gradient's singular values spread over 5x and more ...
    assert s_u.min() > 0.6 and s_u.max() < 1.25  # ... the update's lie in the quintic's band around 1
    gram = update.T @ update  # orthogonal to tolerance: U^T U within that band of the identity
    assert (gram - torch.eye(32, dtype=gram.dtype)).abs().max() < 0.6


def test_our_muon_steps_like_torchs():
    """Momentum, Nesterov, weight decay and the lr scale follow torch.optim.Muon over several steps; only the
    iteration's precision differs (fp32 here, bf16 in torch)."""
    torch.manual_seed(0)
    grads = [torch.randn(32, 80) for _ in range(4)]
    ws = []
    for cls in (torch.optim.Muon, Muon):
        w = torch.nn.Parameter(torch.ones(32, 80))
        opt = cls([w], lr=0.02, momentum=0.9, weight_decay=0.1)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        ws.append(w.detach())
        assert set(opt.state[w]) == {"momentum_buffer"}
    assert (ws[0] - ws[1]).abs().max() < 2e-3 and (ws[1] - 1).abs().max() > 0.02


def test_muon_goes_to_hidden_matrices_only():
    model = GPT(tiny(tie_embeddings=False, value_embeds=1, qk_norm=True))
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05), "cpu")
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    assert muon == muon_params(model) and len(muon) == 2 * 4  # qkv, proj, up, down per block
    assert not any(n.startswith(("tok_emb", "lm_head", "value_embeds")) for n in muon)
    adamw = [names[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
    assert sorted(muon + adamw) == sorted(names.values())
    assert [g["lr_scale"] for g in opt.param_groups if "lr_scale" in g] == [50.0]


def small_run(data, out, **train_kw) -> RunConfig:
    tc = TrainConfig(micro_batch=8, seq_len=64, max_steps=30, warmup_steps=3, lr=3e-3, eval_every=15,
                     eval_batches=2, log_every=5, save_every=20, keep_last=2, seed=3, optimizer="muon",
                     muon_lr=0.03, tensorboard=False)
    return RunConfig(model=tiny(**FIELDS), train=dataclasses.replace(tc, **train_kw), data=str(data), out=str(out))


def test_muon_speedrun_run_resumes_exactly(prepared, tmp_path):
    """Resuming a Muon + speedrun-fields run from step 20 reproduces the uninterrupted weights at step 30."""
    full = train(small_run(prepared, tmp_path / "full"), progress=False)
    assert full.final_val_loss < full.first_val_loss - 0.5
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000020"
    resumed = train(small_run(prepared, tmp_path / "resumed"), resume=str(ckpt), progress=False)
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_speedrun_values_are_named():
    with pytest.raises(GptforgeError, match="logit_softcap"):
        tiny(logit_softcap=0.0)
    with pytest.raises(GptforgeError, match="muon_lr"):
        TrainConfig(muon_lr=0.0)


@pytest.mark.parametrize("field", ["qk_norm", "mlp", "zero_init_proj", "logit_softcap", "value_embeds"])
def test_hf_export_refuses_fields_it_cannot_express(field):
    hf = pytest.importorskip("gptforge.hf")
    cfg = tiny(**{field: FIELDS[field]}, n_layer=2)
    if field == "zero_init_proj":  # an initialisation only: the trained weights are plain GPT-2 weights
        assert hf.choose_format(cfg) is hf.GPT2
        return
    with pytest.raises(GptforgeError, match=field):
        hf.choose_format(cfg)


def test_structured_pruning_refuses_value_embeddings():
    from gptforge.compress.prune import structured_plan

    with pytest.raises(GptforgeError, match="value_embeds"):
        structured_plan(GPT(tiny(n_layer=2, value_embeds=1)), 0.5)
