"""Today's small open families through import-hf and export-hf, proven against `transformers` itself: a random
tiny model of each family (built with transformers' config classes, no download) is imported and must give the
same logits (fp32, atol 1e-4) and greedy tokens; exported back, transformers must load it as the same class with
the same logits. The KV-cache decode (on the native block where it runs) must equal a forward without cache, with
a sliding window shorter than the prompt. What a family needs and we lack is refused naming the config key."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from gptforge import native  # noqa: E402
from gptforge.checkpoint import write_checkpoint  # noqa: E402
from gptforge.config import ModelConfig, RunConfig  # noqa: E402
from gptforge.errors import GptforgeError  # noqa: E402
from gptforge.generate import complete, decode_layout  # noqa: E402
from gptforge.hf import choose_format, model_config_from_hf  # noqa: E402
from gptforge.interop import export_hf, import_hf  # noqa: E402
from gptforge.loader import load_checkpoint  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.native.layout import DecodeBlock  # noqa: E402
from gptforge.plan import param_shapes  # noqa: E402
from gptforge.tokenizer import Tokenizer  # noqa: E402

ATOL = 1e-4
PROMPT = "the quick brown fox jumps over the lazy dog"
NEW = 10
SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["the quick brown fox jumps over the lazy dog; hello world. " * 40], 300)


def family(name, tok):
    """(HF model class, config) of a tiny random model of each family, with what makes the family itself."""
    v = dict(SHAPE, vocab_size=tok.vocab_size, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=None)
    return {
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**v, tie_word_embeddings=True)),  # q/k/v biases, tied like Qwen2.5-0.5B
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(**v, head_dim=16)),  # per-head q/k norms, head size 16 != 32 / 4
        "mistral": (MistralForCausalLM, MistralConfig(**v, sliding_window=4)),  # a window shorter than the prompt
        "phi3": (Phi3ForCausalLM, Phi3Config(**v, sliding_window=5)),  # fused qkv_proj and gate_up_proj
        "llama3": (LlamaForCausalLM, LlamaConfig(**{**v, "max_position_embeddings": 128}, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))),  # wavelengths 6 (kept), 63 (blended), 628 and 6283 (scaled)
    }[name]


def random_hf(cls, config, seed):
    """A model whose every parameter is random (HF starts biases at 0 and norms at 1, which hides a mixed-up key)."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits(model, ids, vocab=None):
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.logits[0] if vocab is None else out[0, :, :vocab]


def hf_greedy(model, ids, n=NEW):
    """transformers' greedy tokens, argmax of its full forward each step (its generate() with min_new_tokens
    would suppress the end-of-text token, which ours may pick with stop_at_eos off)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(logits(model, ids)[-1].argmax()))
    return ids[-n:]


def max_delta(ours, hf, ids, vocab):
    return (logits(ours, ids, vocab) - logits(hf, ids)).abs().max().item()


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral", "phi3", "llama3"])
def test_family_imports_and_exports_with_transformers_parity(tmp_path, tok, name):
    cls, config = family(name, tok)
    hf = random_hf(cls, config, seed=len(name))
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    ours, _, run = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt"))
    ids = tok.encode(PROMPT)
    assert len(ids) > 5  # longer than the Mistral and Phi-3 windows
    # Import: the same logits over the prompt and the same greedy continuation (ours decodes with the KV cache).
    assert max_delta(ours, hf, ids, tok.vocab_size) < ATOL
    greedy = hf_greedy(hf, ids)
    assert complete(ours, tok, [ids], max_new_tokens=NEW, temperature=0.0, stop_at_eos=False)[0].token_ids == greedy
    assert max_delta(ours, hf, ids + greedy, tok.vocab_size) < ATOL  # past the window, without a cache
    # Export: transformers loads the same class and computes the same function.
    arch = cls.__name__
    out, written = export_hf(tmp_path / "ckpt", tmp_path / "out", architecture=arch)
    assert written == arch
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is cls
    assert max_delta(ours, back, ids + greedy, tok.vocab_size) < ATOL
    assert hf_greedy(back, ids) == greedy
    # plan's counts: the parameters transformers allocates (ours pads the vocabulary rows to a multiple of 64).
    cfg = run.model
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    assert cfg.num_params() - padding == sum(p.numel() for p in hf.parameters())
    assert param_shapes(cfg) == [(n, tuple(p.shape)) for n, p in GPT(cfg).named_parameters()]
    # Re-imported, the config is the same one.
    assert load_checkpoint(import_hf(out, tmp_path / "again"))[2].model == run.model


def family_config(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_mlp=48, vocab_size=300, block_size=64,
                pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("fields, arch", [
    (dict(), "LlamaForCausalLM"),
    (dict(qkv_bias=True), "Qwen2ForCausalLM"),
    (dict(qkv_bias=True, sliding_window=8), "Qwen2ForCausalLM"),
    (dict(qk_norm=True, head_size=16), "Qwen3ForCausalLM"),
    (dict(sliding_window=8), "MistralForCausalLM"),
    (dict(rope_factor=8.0, rope_original_context=32), "LlamaForCausalLM"),
])
def test_export_chooses_the_family_that_expresses_the_model(tmp_path, tok, fields, arch):
    cfg = family_config(vocab_size=tok.vocab_size, **fields)
    assert choose_format(cfg).name == arch
    torch.manual_seed(5)
    ours = GPT(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = write_checkpoint(tmp_path / "ckpt", RunConfig(model=cfg), tok, model_state=ours.state_dict())
    out, written = export_hf(ckpt, tmp_path / "hf")
    assert written == arch
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    ids = tok.encode(PROMPT * 2)  # 20+ tokens: past the window of 8
    assert max_delta(ours, hf, ids, tok.vocab_size) < ATOL
    assert model_config_from_hf(json.loads((out / "config.json").read_text()))[0] == cfg


def test_cache_decode_equals_forward_without_cache_past_the_window(tok):
    """Greedy decode through the KV cache (native decode block on CPU where it is built, PyTorch otherwise) picks
    the tokens a forward over the whole text without a cache picks, for a window of 3 and prompts of 10+ tokens,
    alone and batched with left padding (the cache's window counts slots, which padding shifts)."""
    for fields in (dict(sliding_window=3), dict(qkv_bias=True, sliding_window=3), dict(qk_norm=True, head_size=16),
                   dict(rope_factor=4.0, rope_original_context=16)):
        cfg = family_config(vocab_size=tok.vocab_size, **fields)
        torch.manual_seed(7)
        model = GPT(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)  # larger weights: tokens that depend on what attention sees
        model = decode_layout(model)
        assert all(isinstance(b, DecodeBlock) for b in model.blocks) == native.available()
        prompts = [tok.encode(PROMPT), tok.encode("hello world. the lazy dog")]
        alone = [complete(model, tok, [p], max_new_tokens=NEW, temperature=0.0, stop_at_eos=False)[0].token_ids
                 for p in prompts]
        batched = [c.token_ids for c in complete(model, tok, prompts, max_new_tokens=NEW, temperature=0.0,
                                                 stop_at_eos=False)]
        assert batched == alone, fields
        for p, new in zip(prompts, alone):
            full = torch.tensor([p + new])
            with torch.no_grad():
                picks = model(full)[0, len(p) - 1:-1, :tok.vocab_size].argmax(-1).tolist()
            assert picks == new, fields


def test_engine_rows_at_their_own_slots_decode_as_alone_with_a_window(tok):
    """The serving engine (each row at its own slots, sequences joining a running batch) decodes a windowed model
    exactly as `complete` does each prompt alone."""
    from gptforge.engine import BatchEngine
    from gptforge.generate import SamplingParams

    torch.manual_seed(10)
    model = GPT(family_config(vocab_size=tok.vocab_size, sliding_window=3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model = decode_layout(model)
    prompts = [tok.encode(PROMPT), tok.encode("hello world. the lazy dog"), tok.encode("the fox")]
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW, stop_at_eos=False)
    engine = BatchEngine(model, tok, max_batch=3)
    out: dict[int, list[int]] = {}
    seqs = [engine.add(prompts[0], params)]
    for prompt in prompts[1:]:
        for ev in engine.step() + engine.step():  # the next prompt joins two steps later
            out.setdefault(ev.seq, []).append(ev.token)
        seqs.append(engine.add(prompt, params))
    while engine.live:
        for ev in engine.step():
            out.setdefault(ev.seq, []).append(ev.token)
    for seq, prompt in zip(seqs, prompts):
        alone = complete(model, tok, [prompt], max_new_tokens=NEW, temperature=0.0, stop_at_eos=False)[0].token_ids
        assert out[seq] == alone


def test_sliding_window_changes_what_attention_sees():
    """The window is real: a model with window 3 gives the same logits as without for the first 3 positions and
    different ones after (the test above would pass for a window that was never applied)."""
    cfg = family_config()
    torch.manual_seed(8)
    full = GPT(cfg).eval()
    windowed = GPT(family_config(sliding_window=3)).eval()
    windowed.load_state_dict(full.state_dict())
    idx = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        a, b = full(idx), windowed(idx)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert (a[:, 3:] - b[:, 3:]).abs().amax(-1).min() > 1e-4
    # Packed documents: the window and the document boundary both hold.
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    mask = windowed.attn_mask(doc, 8, idx.device)[0, 0]  # (T, T)
    q, k = torch.arange(8)[:, None], torch.arange(8)[None]
    assert torch.equal(mask, (k <= q) & (q - k < 3) & (doc[0][:, None] == doc[0][None]))


def write_config(tmp_path, config: dict):
    (tmp_path / "hf").mkdir(exist_ok=True)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    return tmp_path / "hf"


LLAMA_LIKE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300, intermediate_size=48)


@pytest.mark.parametrize("arch, extra, message", [
    ("LlamaForCausalLM", dict(rope_parameters=dict(rope_type="yarn", factor=4.0)),
     r"rope_type 'yarn' is not supported for LlamaForCausalLM \(supported: default, llama3\)"),
    ("Phi3ForCausalLM", dict(rope_scaling=dict(type="longrope", short_factor=[1.0], long_factor=[1.0])),
     r"rope_type 'longrope' is not supported for Phi3ForCausalLM \(supported: default\)"),
    ("Phi3ForCausalLM", dict(partial_rotary_factor=0.5), r"partial_rotary_factor 0.5 is not supported"),
    ("LlamaForCausalLM", dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=False), r"attention_bias and mlp_bias differ"),
    ("Qwen3ForCausalLM", dict(attention_bias=True), r"attention_bias true is not supported for Qwen3ForCausalLM"),
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
     r"layer_types mixes sliding and full attention layers \(max_window_layers=1\)"),
    ("MistralForCausalLM", dict(layer_types=["sliding_attention", "full_attention"]), r"layer_types mixes sliding"),
    ("Gemma3ForCausalLM", dict(), r"Gemma3ForCausalLM is not supported: post-attention .*query_pre_attn_scalar"),
])
def test_import_refuses_each_unsupported_field(tmp_path, arch, extra, message):
    folder = write_config(tmp_path, dict(LLAMA_LIKE, architectures=[arch], **extra))
    with pytest.raises(GptforgeError, match=message):
        import_hf(folder, tmp_path / "out")


def test_gemma2_from_transformers_is_refused_naming_its_fields(tmp_path, tok):
    config = Gemma2Config(**dict(SHAPE, vocab_size=tok.vocab_size, head_dim=8))
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(GptforgeError, match=r"Gemma2ForCausalLM is not supported: attention logit soft-capping "
                                            r"\(attn_logit_softcapping\)"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_export_refuses_an_architecture_that_cannot_express_the_model(tmp_path):
    with pytest.raises(GptforgeError, match=r"as Phi3ForCausalLM: qkv_bias=True \(no Phi3ForCausalLM equivalent\)"):
        choose_format(family_config(qkv_bias=True), "Phi3ForCausalLM")
    with pytest.raises(GptforgeError, match=r"as LlamaForCausalLM: sliding_window=8 \(no LlamaForCausalLM equiv"):
        choose_format(family_config(sliding_window=8), "LlamaForCausalLM")
    with pytest.raises(GptforgeError, match=r"unknown Hugging Face architecture 'Gemma2ForCausalLM'; choose one of: "
                                            r"GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM"):
        choose_format(family_config(), "Gemma2ForCausalLM")


def test_structured_pruning_keeps_the_kept_heads_qkv_biases():
    """compress.prune.shrink slices Qwen2's q/k/v biases with the heads it keeps (they exist without `bias`)."""
    from gptforge.compress.prune import shrink, structured_plan

    torch.manual_seed(9)
    model = GPT(family_config(qkv_bias=True, d_mlp=128)).eval()
    small = shrink(model, structured_plan(model, 0.5, channel_multiple=16))
    assert small.config.qkv_bias and small.blocks[0].attn.qkv.bias.shape[0] < model.blocks[0].attn.qkv.bias.shape[0]
    assert small(torch.randint(0, 300, (1, 8))).isfinite().all()


@pytest.mark.parametrize("name, cls, config_cls", [("llama3", LlamaForCausalLM, LlamaConfig),
                                                   ("mistral", MistralForCausalLM, MistralConfig)])
def test_real_shaped_tokenizer_travels_through_import_and_export(tmp_path, name, cls, config_cls):
    """A folder as the family ships it (Llama 3's byte-level BPE with BOS and three end ids, Mistral's
    SentencePiece; chat templates in tokenizer_config.json): import, generate from a BOS-started prompt as
    transformers does, export; AutoTokenizer on the export gives the same ids and chat rendering, and the
    exported generation_config stops at every end id."""
    import hftok
    from test_chat_template import FAMILIES
    from transformers import AutoTokenizer

    make, tok_config, generation, _ = FAMILIES[name]
    hf_tok = make()
    folder = hftok.hf_folder(tmp_path / "hf", hf_tok, tok_config, generation)
    config = config_cls(**dict(SHAPE, vocab_size=hf_tok.get_vocab_size(), pad_token_id=None))
    random_hf(cls, config, seed=11).save_pretrained(folder)
    ours, tok, _ = load_checkpoint(import_hf(folder, tmp_path / "ckpt"))
    ids = tok.encode("The quick brown fox", start=True)
    assert ids[0] == tok.bos_id
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert max_delta(ours, hf, ids, tok.vocab_size) < ATOL
    assert complete(ours, tok, ["The quick brown fox"], max_new_tokens=NEW, temperature=0.0,
                    stop_at_eos=False)[0].token_ids == hf_greedy(hf, ids)
    out, _ = export_hf(tmp_path / "ckpt", tmp_path / "out")
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs("The quick brown fox")["input_ids"] == ids
    msgs = [{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": "A friend."}]
    assert theirs.apply_chat_template(msgs, tokenize=False) == tok.render_chat(msgs)
    gen = json.loads((out / "generation_config.json").read_text())
    ends = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert gen["bos_token_id"] == tok.bos_id and set(tok.chat_stop_ids) == set(ends)


def test_plan_counts_the_new_fields():
    """qkv_bias adds the q/k/v biases to the parameter count; a window shorter than the context bounds the
    attention FLOPs (12 L d T with T the tokens a query sees)."""
    plain, biased = family_config(), family_config(qkv_bias=True)
    assert biased.num_params() - plain.num_params() == 2 * (4 + 2 * 2) * 8  # 2 layers x (H + 2K) * Hd
    assert biased.num_params() == sum(p.numel() for p in GPT(biased).parameters())
    windowed = family_config(sliding_window=8)
    assert plain.flops_per_token(64) - windowed.flops_per_token(64) == 12 * 2 * 32 * (64 - 8)
    assert windowed.flops_per_token(4) == plain.flops_per_token(4)


# config.json of the released models (keys that matter kept; no weights), with their published parameter counts.
REAL_CONFIGS = {
    "qwen2.5-0.5b": (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", hidden_size=896,
                          intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          max_position_embeddings=32768, max_window_layers=24, rms_norm_eps=1e-06,
                          rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False,
                          tie_word_embeddings=True, vocab_size=151936), 494032768),
    "qwen3-0.6b": (dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, head_dim=128,
                        hidden_act="silu", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=40960,
                        max_window_layers=28, rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000,
                        sliding_window=None, use_sliding_window=False, tie_word_embeddings=True, vocab_size=151936),
                   596049920),
    "phi-3-mini-4k": (dict(architectures=["Phi3ForCausalLM"], model_type="phi3", attention_bias=False,
                           hidden_act="silu", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           original_max_position_embeddings=4096, pad_token_id=32000, rms_norm_eps=1e-05,
                           rope_scaling=None, rope_theta=10000.0, sliding_window=2047, tie_word_embeddings=False,
                           vocab_size=32064), 3821079552),
    "mistral-7b-v0.1": (dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu",
                             hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-05,
                             rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, vocab_size=32000),
                        7241732096),
    "llama-3.2-1b": (dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, head_dim=64,
                          hidden_act="silu", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                          mlp_bias=False, rms_norm_eps=1e-05, rope_theta=500000.0, tie_word_embeddings=True,
                          vocab_size=128256, rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                                               original_max_position_embeddings=8192,
                                                               rope_type="llama3")), 1235814400),
}



@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_released_configs_map_to_the_variant_and_count_their_parameters(name):
    """Each family's real config.json reads as the right variant, and `gptforge plan`'s count of the model it
    builds equals the released model's parameter count (vocabulary padding aside)."""
    hf, published = REAL_CONFIGS[name]
    cfg, fmt = model_config_from_hf(hf)
    assert fmt.name == hf["architectures"][0]
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    assert cfg.num_params() - padding == published
    variant = {"qwen2.5-0.5b": dict(qkv_bias=True, sliding_window=None), "qwen3-0.6b": dict(qk_norm=True, head_dim=128),
               "phi-3-mini-4k": dict(sliding_window=2047), "mistral-7b-v0.1": dict(sliding_window=4096),
               "llama-3.2-1b": dict(rope_factor=32.0, rope_original_context=8192, tie_embeddings=True)}[name]
    assert {k: getattr(cfg, k) for k in variant} == variant
