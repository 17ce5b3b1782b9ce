"""Adapters per request (`gptforge serve BASE --adapter NAME=LORA_CKPT`): LoRA fine-tunes of the base stacked into
one model, each batch row taking its own adapter. A row decodes exactly what its adapter loaded alone (merged by
gptforge.loader) decodes, and a base row what the base decodes, whatever its batch-mates use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from gptforge.checkpoint import write_checkpoint
from gptforge.config import FinetuneConfig, LoRAConfig, ModelConfig, RunConfig
from gptforge.engine import BatchEngine
from gptforge.errors import GptforgeError
from gptforge.finetune.lora import apply_lora, is_lora_key
from gptforge.generate import load
from gptforge.loader import load_checkpoint
from gptforge.model import GPT
from gptforge.sampling import SamplingParams
from gptforge.serve import ServeConfig, create_app
from gptforge.serve.adapters import load_with_adapters
from gptforge.tokenizer import Tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog. " * 40, "to be or not to be, that is the question. " * 40]
CFG = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=384, block_size=128, tie_embeddings=False)
PROMPTS = ["the quick", "to be or not", "the lazy dog", "question", "fox jumps over the", "to be"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)


def make_adapter(dest: Path, base: Path, tok: Tokenizer, lora: LoRAConfig, seed: int, cfg: ModelConfig = CFG) -> Path:
    """A LoRA checkpoint of `base` as `gptforge finetune --method lora` writes one, with random (non-zero) B."""
    torch.manual_seed(seed)
    model = apply_lora(GPT(cfg), lora)
    state = {k: (torch.randn_like(v) * 0.2 if k.endswith("lora_b") else v) for k, v in model.state_dict().items()
             if is_lora_key(k)}
    run = RunConfig(model=cfg, finetune=FinetuneConfig(method="lora", lora=lora, base=str(base)))
    return write_checkpoint(dest, run, tok, model_state=state)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    tok = Tokenizer.train(TEXT, vocab_size=320)
    torch.manual_seed(0)
    base = write_checkpoint(root / "base", RunConfig(model=CFG), tok, model_state=GPT(CFG).state_dict())
    # different ranks, alphas and targets (the head too): the stacked layout pads and zero-fills
    a = make_adapter(root / "a", base, tok, LoRAConfig(rank=4, alpha=8.0), seed=1)
    b = make_adapter(root / "b", base, tok, LoRAConfig(rank=8, alpha=16.0, targets=("qkv", "up", "lm_head")), seed=2)
    return base, {"a": a, "b": b}


@pytest.fixture(scope="module")
def served(ckpts):
    torch.set_num_threads(1)
    base, adapters = ckpts
    return load_with_adapters(base, list((n, str(p)) for n, p in adapters.items()), "cpu", "float32")


def alone(path: Path, prompt_ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the prompt's last logits of a checkpoint loaded on its own (an adapter: merged)."""
    model, tok = load(path)
    engine = BatchEngine(model, tok, 1)
    seq = engine.add(prompt_ids, GREEDY)
    out = []
    while engine.live:
        out += [ev.token for ev in engine.step() if ev.seq == seq]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids]))[0, -1, : tok.vocab_size]
    return out, logits


@pytest.mark.parametrize("budget", [None, 5])
def test_a_mixed_batch_decodes_what_each_adapter_decodes_alone(ckpts, served, budget):
    base, paths = ckpts
    model, tok, aset = served
    rows = [-1, 0, 1, 0, 1, -1]  # base, a, b, a, b, base
    engine = BatchEngine(model, tok, len(rows), max_prefill_tokens=budget, adapters=aset)
    ids = [tok.encode(p) for p in PROMPTS]
    seqs = engine.add_many([(p, GREEDY, ()) for p in ids], adapters=rows)
    got = {s: [] for s in seqs}
    while engine.live:
        for ev in engine.step():
            got[ev.seq].append(ev.token)
    refs = {-1: base, 0: paths["a"], 1: paths["b"]}
    for s, r, p in zip(seqs, rows, ids):
        tokens, _ = alone(refs[r], p)
        assert got[s] == tokens, (r, tok.decode(got[s]), tok.decode(tokens))
    # the adapters change the model: the same prompt decodes otherwise through each
    p = ids[0]
    assert len({tuple(alone(refs[r], p)[0]) for r in refs}) == 3


def test_logits_per_row_equal_merged_and_unmerged_adapters_within_1e5(ckpts, served):
    base, paths = ckpts
    model, tok, aset = served
    p = tok.encode(PROMPTS[4])
    rows = [-1, 0, 1]
    with torch.no_grad(), aset.use(rows):
        mixed = model(torch.tensor([p] * 3))[:, -1, : tok.vocab_size]  # (3, V)
    for i, (r, path) in enumerate(zip(rows, [base, paths["a"], paths["b"]])):
        _, ref = alone(path, p)
        torch.testing.assert_close(mixed[i], ref, atol=1e-5, rtol=0)
    # unmerged: the LoRA modules themselves, as fine-tuning runs them
    ref_model, _, _ = load_checkpoint(base)
    apply_lora(ref_model, LoRAConfig(rank=8, alpha=16.0, targets=("qkv", "up", "lm_head")))
    ref_model.load_state_dict(load_file(str(paths["b"] / "model.safetensors")), strict=False)
    with torch.no_grad():
        unmerged = ref_model(torch.tensor([p]))[0, -1, : tok.vocab_size]
    torch.testing.assert_close(mixed[2], unmerged, atol=1e-5, rtol=0)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-2  # and the adapter does change the logits


def test_server_lists_adapters_routes_requests_and_refuses_unknown_models(ckpts, served):
    base, paths = ckpts
    model, tok, aset = served
    app = create_app(model, tok, ServeConfig(max_batch=4), "base", aset)
    with TestClient(app) as c:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=c, max_retries=0)
        cards = client.models.list().data
        assert [m.id for m in cards] == ["base", "a", "b"]
        assert c.get("/v1/models/a").json()["parent"] == "base"
        for name, path in [("base", base), ("a", paths["a"]), ("b", paths["b"])]:
            r = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.model == name
            assert r.choices[0].text == tok.decode(alone(path, tok.encode(PROMPTS[1]))[0])
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="c", prompt="x", max_tokens=2)
        assert e.value.body["code"] == "model_not_found" and "'base', 'a', 'b'" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="a", prompt="x", max_tokens=1, echo=True, logprobs=1)
        assert e.value.body["code"] == "unsupported"
        # embeddings follow the adapter too
        vecs = {m: client.embeddings.create(model=m, input=PROMPTS[0]).data[0].embedding for m in ("base", "a")}
        assert max(abs(x - y) for x, y in zip(vecs["base"], vecs["a"])) > 1e-3


def test_adapters_of_another_base_or_not_lora_are_refused_in_one_line(ckpts, tmp_path):
    base, paths = ckpts
    tok = Tokenizer.load(base / "tokenizer.json")
    other = make_adapter(tmp_path / "other", base, tok, LoRAConfig(rank=4),
                         seed=3, cfg=ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=384, block_size=64,
                                                 tie_embeddings=False))
    with pytest.raises(GptforgeError, match="model config differs .*block_size 64 vs the base's 128"):
        load_with_adapters(base, [("o", str(other))], "cpu", "float32")
    with pytest.raises(GptforgeError, match="not a LoRA fine-tune"):
        load_with_adapters(base, [("o", str(base))], "cpu", "float32")
    r = subprocess.run([sys.executable, "-m", "gptforge", "serve", str(base), "--adapter", f"o={other}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --adapter o=") and r.stderr.count("\n") == 1, r.stderr
