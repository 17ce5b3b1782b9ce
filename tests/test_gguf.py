"""export-gguf: the file read back with gguf's own reader (every tensor against our weights, every metadata key),
the refusals, the output policy, and, where llama-cpp-python is installed, the file run by llama.cpp itself:
equal greedy tokens and logits within a stated bound, for f32 and q8_0, GPT-2 and Llama shapes."""

from __future__ import annotations


import gguf
import numpy as np
import pytest
import torch

from gptforge.checkpoint import write_checkpoint
from gptforge.cli import main
from gptforge.config import ModelConfig, RunConfig, TrainConfig
from gptforge.errors import GptforgeError
from gptforge.generate import generate_tokens
from gptforge.gguf_export import export_gguf
from gptforge.loader import load_checkpoint
from gptforge.model import GPT
from gptforge.tokenizer import IM_END, Tokenizer
from gptforge.train import train

try:
    import llama_cpp
except ImportError:  # the `llama` extra (make llama-cpp): llama.cpp compiled from source
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (make llama-cpp)")

SHAPES = {
    "gpt2": dict(n_layer=2, n_head=4, d_model=64, block_size=64),
    "llama": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=64, pos_encoding="rotary",
                  norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, rope_theta=5000.0, norm_eps=1e-6),
    "qwen3": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=64, pos_encoding="rotary",
                  norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True),
    "qwen2": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=64, pos_encoding="rotary",
                  norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True),
    "arcee": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=64, pos_encoding="rotary",
                  norm="rmsnorm", mlp="relu2", bias=False),
}
TEXT = "ROMEO. What light through yonder window breaks?\n  It is the east, and Juliet is the sun!"


@pytest.fixture(scope="module")
def tokenizer(prepared) -> Tokenizer:
    return Tokenizer.load(prepared / "tokenizer.json")  # a 512-token BPE trained on four plays


def random_checkpoint(tmp_path, tokenizer, arch: str, scale: float = 1.0, **over):
    """Random weights (matrices times `scale`: larger logits, decided greedy picks) with non-trivial norms and
    biases, so that a mix-up of them shows."""
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **{**SHAPES[arch], **over})
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
            else:
                p.mul_(scale)
    return write_checkpoint(tmp_path / f"ckpt-{arch}", RunConfig(model=cfg), tokenizer, model_state=model.state_dict())


def read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def field(reader, key):
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents()


def values(t) -> np.ndarray:
    """A tensor of the file as fp32 in our (rows, columns) order, dequantized by gguf's own code."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])


def rotate_half_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Written out index by index: row h*Hd + 2j + s of the result is row h*Hd + s*Hd/2 + j of `w`."""
    hd = w.shape[0] // heads
    out = torch.empty_like(w)
    for h in range(heads):
        for j in range(hd // 2):
            for s in range(2):
                out[h * hd + 2 * j + s] = w[h * hd + s * hd // 2 + j]
    return out


def expected(state: dict, cfg: ModelConfig, arch: str, n_vocab: int) -> dict[str, torch.Tensor]:
    """The GGUF tensors spelled out independently of gguf_export's table."""
    out = {"token_embd.weight": state["tok_emb.weight"][:n_vocab], "output_norm.weight": state["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"][:n_vocab]
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        out[g + "attn_norm.weight"] = state[b + "norm1.weight"]
        out[g + "ffn_norm.weight"] = state[b + "norm2.weight"]
        if arch == "gpt2":
            for ours, theirs in (("norm1", "attn_norm"), ("norm2", "ffn_norm"), ("attn.qkv", "attn_qkv"),
                                 ("attn.proj", "attn_output"), ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")):
                out[g + theirs + ".weight"] = state[b + ours + ".weight"]
                out[g + theirs + ".bias"] = state[b + ours + ".bias"]
            continue
        wq, wk, wv = state[b + "attn.qkv.weight"].split([q, kv, kv])
        if arch in ("llama", "arcee"):
            wq, wk = rotate_half_to_pairs(wq, cfg.n_head), rotate_half_to_pairs(wk, cfg.kv_heads)
        elif arch == "qwen3":
            out[g + "attn_q_norm.weight"] = state[b + "attn.q_norm.weight"]
            out[g + "attn_k_norm.weight"] = state[b + "attn.k_norm.weight"]
        out |= {g + "attn_q.weight": wq, g + "attn_k.weight": wk, g + "attn_v.weight": wv}
        if cfg.qkv_bias:
            out |= dict(zip([g + "attn_q.bias", g + "attn_k.bias", g + "attn_v.bias"],
                            state[b + "attn.qkv.bias"].split([q, kv, kv])))
        for ours, theirs in (("attn.proj", "attn_output"), ("mlp.gate", "ffn_gate"), ("mlp.up", "ffn_up"),
                             ("mlp.down", "ffn_down")):
            if b + ours + ".weight" in state:  # no gate in arcee's ReLU² MLP
                out[g + theirs + ".weight"] = state[b + ours + ".weight"]
    if arch == "gpt2":
        out |= {"position_embd.weight": state["pos_emb.weight"], "output_norm.bias": state["norm_f.bias"]}
    return out


# --- read back with gguf's reader ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "qwen3", "arcee"])
@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_tensors_read_back_equal_the_weights(tmp_path, tokenizer, arch, kind):
    ckpt = random_checkpoint(tmp_path, tokenizer, arch)
    path, name = export_gguf(ckpt, tmp_path / "m.gguf", kind)
    assert name == arch
    model, _, run = load_checkpoint(ckpt)
    want = expected(model.state_dict(), run.model, arch, tokenizer.vocab_size)
    _, tensors = read(path)
    assert set(tensors) == set(want)
    for key, w in want.items():
        got, w = values(tensors[key]), w.numpy()
        assert got.shape == w.shape, key
        err = np.abs(got - w)
        if w.ndim == 1 or key == "position_embd.weight" or kind == "f32":  # stored as f32: bit for bit
            assert tensors[key].tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, w), key
        elif kind in ("f16", "bf16"):  # one rounding: half an ulp of 11 (f16) or 8 (bf16) significant bits
            assert (err <= np.abs(w) * 2.0 ** (-11 if kind == "f16" else -8) + 1e-7).all(), key
        else:  # a block of 32 shares one f16 scale: q8_0 rounds to amax/127 steps, q4_0 to amax/8 (its top code
            # clips); the scale's own f16 rounding adds up to amax * 2^-11
            amax = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
            bound = amax * ((1 / 254 if kind == "q8_0" else 1 / 8) + 2.0 ** -11)
            assert (err.reshape(-1, 32) <= bound * 1.001 + 1e-7).all(), key
            assert tensors[key].tensor_type.name == kind.upper()


def test_metadata_and_tokenizer(tmp_path, tokenizer):
    ckpt = random_checkpoint(tmp_path, tokenizer, "llama")
    path, _ = export_gguf(ckpt, tmp_path / "m.gguf", "q8_0")
    r, _ = read(path)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **SHAPES["llama"])
    assert field(r, "general.architecture") == "llama"
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for key, want in [("context_length", 64), ("embedding_length", 64), ("block_count", 2), ("feed_forward_length",
                      cfg.mlp_width), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                      ("rope.dimension_count", 16), ("attention.key_length", 16), ("vocab_size", tokenizer.vocab_size)]:
        assert field(r, f"llama.{key}") == want, key
    assert field(r, "llama.rope.freq_base") == pytest.approx(5000.0)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(r, "tokenizer.ggml.tokens")
    assert tokens == [tokenizer.hf.id_to_token(i) for i in range(tokenizer.vocab_size)]
    types = field(r, "tokenizer.ggml.token_type")
    assert types[tokenizer.eos_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    merges = field(r, "tokenizer.ggml.merges")
    assert len(merges) == tokenizer.vocab_size - 256 - 8 and all(len(m.split(" ")) == 2 for m in merges)
    assert field(r, "tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert field(r, "tokenizer.ggml.eot_token_id") == tokenizer.hf.token_to_id(IM_END)
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in field(r, "tokenizer.chat_template")
    r2, _ = read(export_gguf(random_checkpoint(tmp_path, tokenizer, "gpt2"), tmp_path / "g.gguf", "f32")[0])
    assert field(r2, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field(r2, "general.file_type") == gguf.LlamaFileType.ALL_F32


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, tokenizer):
    over = dict(rope_theta=500000.0, rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                rope_original_context=32)
    _, tensors = read(export_gguf(random_checkpoint(tmp_path, tokenizer, "llama", **over), tmp_path / "m.gguf", "f32")[0])
    # Meta's llama3 rule, written out: wavelengths above original/low divided by the factor, below original/high
    # kept, a linear blend between; the file holds plain / scaled per pair
    inv = 500000.0 ** (-np.arange(0, 16, 2) / 16)
    ratio = 32 / (2 * np.pi / inv)
    blend = np.clip((ratio - 1.0) / (4.0 - 1.0), 0, 1)
    want = inv / ((1 - blend) * inv / 8.0 + blend * inv)
    assert np.allclose(values(tensors["rope_freqs.weight"]), want, rtol=1e-5)


def test_a_model_without_biases_gets_zero_biases_for_gpt2(tmp_path, tokenizer):
    ckpt = random_checkpoint(tmp_path, tokenizer, "gpt2", bias=False)
    _, tensors = read(export_gguf(ckpt, tmp_path / "m.gguf", "f32")[0])
    assert not values(tensors["blk.1.ffn_up.bias"]).any() and not values(tensors["output_norm.bias"]).any()
    assert values(tensors["blk.1.ffn_up.bias"]).shape == (256,)


# --- refusals and the output policy -----------------------------------------------------------------------------

@pytest.mark.parametrize("over, named", [
    (dict(mlp="gelu"), "mlp='gelu' (llama.cpp's llama needs 'swiglu')"),  # the shakespeare preset's MLP
    (dict(logit_softcap=15.0), "logit_softcap=15.0 (llama.cpp's llama architecture has no final-logit soft-cap)"),
    (dict(value_embeds=1), "value_embeds=1"),
    (dict(qk_norm=True, bias=True), "bias=True (llama.cpp's qwen3 needs False)"),
])
def test_what_llama_cpp_cannot_compute_is_refused_by_name(tmp_path, tokenizer, over, named):
    ckpt = random_checkpoint(tmp_path, tokenizer, "llama", **over)
    with pytest.raises(GptforgeError, match="cannot be exported to GGUF") as e:
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert named in str(e.value) and not (tmp_path / "m.gguf").exists()


def test_gpt2_shape_needs_plain_heads(tmp_path, tokenizer):
    ckpt = random_checkpoint(tmp_path, tokenizer, "gpt2", n_kv_head=2)
    with pytest.raises(GptforgeError, match="n_kv_head=2"):
        export_gguf(ckpt, tmp_path / "m.gguf")


def test_quantized_checkpoint_is_refused(tmp_path, tokenizer):
    from gptforge.compress.run import quantize_checkpoint

    ckpt = random_checkpoint(tmp_path, tokenizer, "llama")
    q, _ = quantize_checkpoint(ckpt, "int8", tmp_path / "q")
    with pytest.raises(GptforgeError, match="is quantized \\(int8\\); export its unquantized parent"):
        export_gguf(q, tmp_path / "m.gguf")


def test_output_policy(tmp_path, tokenizer, capsys):
    ckpt = random_checkpoint(tmp_path, tokenizer, "gpt2")
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(ckpt), "--out", str(out), "--type", "q4_0"]) == 0
    first = out.read_bytes()
    assert main(["export-gguf", str(ckpt), "--out", str(out)]) == 2  # exists: not without --overwrite
    assert "add --overwrite" in capsys.readouterr().err and out.read_bytes() == first
    assert main(["export-gguf", str(ckpt), "--out", str(out), "--overwrite"]) == 0  # ours: replaced (now f16)
    assert read(out)[1]["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("my notes")
    assert main(["export-gguf", str(ckpt), "--out", str(foreign), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is not a GGUF file that gptforge wrote" in err and err.count("\n") == 1
    assert foreign.read_text() == "my notes"
    assert main(["export-gguf", str(ckpt), "--out", str(ckpt / "model.gguf")]) == 2  # inside the input
    assert main(["export-gguf", str(ckpt), "--out", str(tmp_path)]) == 2  # a folder
    assert main(["export-gguf", str(ckpt), "--out", str(out), "--type", "q5_k"]) == 2
    assert "unknown --type 'q5_k'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


# --- llama.cpp runs the file ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A GPT-2-shaped and a Llama-shaped model trained 40 steps on the plays: predictions that follow the text, so
    that greedy tokens are a real comparison and not a coin toss between the near-equal logits of random weights."""
    out = {}
    for arch in ("gpt2", "llama"):
        cfg = ModelConfig(vocab_size=512, **SHAPES[arch])
        tc = TrainConfig(micro_batch=8, seq_len=64, max_steps=40, warmup_steps=5, lr=3e-3, eval_every=1000,
                         eval_batches=1, log_every=1000, save_every=1000, seed=1)
        run = RunConfig(model=cfg, train=tc, data=str(prepared), out=str(tmp_path_factory.mktemp(arch)))
        out[arch] = train(run, progress=False).checkpoint
    return out


@needs_llama
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind, atol", [("f32", 2e-3), ("q8_0", 0.1)])
def test_llama_cpp_runs_the_file(trained, tmp_path, arch, kind, atol):
    """Logits of every prompt position within `atol` of ours, and 32 greedy tokens equal. Measured (2026-12-05):
    max |logit difference| 8e-5 (gpt2) and 6.4e-4 (llama) in f32, the order of float sums and llama.cpp's own
    rope/norm arithmetic; 0.011 and 0.031 in q8_0, where llama.cpp also rounds the activations to 8 bits per
    block (our reference is the fp32 model); logits here span about +-5."""
    path, _ = export_gguf(trained[arch], tmp_path / "m.gguf", kind)
    model, tok, _ = load_checkpoint(trained[arch])
    ids = tok.encode(TEXT)
    # n_batch=1: tokens go in one at a time. llama-cpp-python 0.3.36's multi-token batches crash (SIGSEGV) in its
    # repacked-weight (AMX) path on this CPU for q8_0/q4_0 files, its own quantizer's output included.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=1, n_threads=1, logits_all=True, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids  # the tokenizer metadata reads as ours
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, :, :tok.vocab_size].numpy()
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    assert np.abs(ours - theirs).max() <= atol
    n = 32
    prompt = ids[:12]
    want = generate_tokens(model, prompt, vocab_size=tok.vocab_size, max_new_tokens=n, temperature=0.0)
    llm.reset()
    got = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):  # llama.cpp's greedy sampler
        got.append(t)
        if len(got) == n:
            break
    assert got == list(want)[:n]


@needs_llama
@pytest.mark.parametrize("arch, over", [("qwen2", {}), ("qwen3", {}), ("arcee", {}),
                                        ("llama", dict(rope_theta=500000.0, rope_factor=8.0, rope_original_context=16))])
def test_llama_cpp_runs_each_family(tmp_path, tokenizer, arch, over):
    """The other architectures (and Llama 3's RoPE scaling, where positions past 16 see the scaled frequencies) on
    random weights scaled up 4x: f32 logits within 2e-3 of ours and 24 greedy tokens equal."""
    ckpt = random_checkpoint(tmp_path, tokenizer, arch, scale=4.0, **over)
    path, name = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert name == arch
    model, tok, _ = load_checkpoint(ckpt)
    ids = tok.encode(TEXT)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=1, n_threads=1, logits_all=True, verbose=False)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, :, :tok.vocab_size].numpy()
    llm.eval(ids)
    assert np.abs(ours - np.array(llm.scores[:len(ids)])).max() <= 2e-3
    want = list(generate_tokens(model, ids[:8], vocab_size=tok.vocab_size, max_new_tokens=24, temperature=0.0))
    llm.reset()
    got = [t for _, t in zip(range(24), llm.generate(ids[:8], top_k=1, temp=0.0, repeat_penalty=1.0, reset=True))]
    assert got == want


@needs_llama
@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llama_cpp_splits_text_as_the_tokenizer_does(tmp_path, plays_dir, pre):
    """A BPE trained here behind each pre-tokenizer llama.cpp knows by name: llama.cpp's ids equal ours on text with
    digits, contractions, runs of spaces and newlines, and non-ASCII letters."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from gptforge.gguf_export import SPLITS
    from gptforge.tokenizer import SPECIAL_TOKENS

    hf = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    hf.pre_tokenizer = {"gpt-2": byte_level,
                        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        }.get(pre) or pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS.get(pre, "")),
                                                                                    "isolated"), byte_level])
    hf.decoder = decoders.ByteLevel()
    texts = [p.read_text() for p in sorted(plays_dir.iterdir())[:2]]
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(hf)
    cfg = ModelConfig(vocab_size=tok.vocab_size, **SHAPES["gpt2"])
    ckpt = write_checkpoint(tmp_path / "ckpt", RunConfig(model=cfg), tok, model_state=GPT(cfg).state_dict())
    path, _ = export_gguf(ckpt, tmp_path / "m.gguf", "f16")
    assert field(read(path)[0], "tokenizer.ggml.pre") == pre
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    text = ("In 1597, they'd've said: 'I'LL pay 12345 ducats'!\n\n  Café  naïve   Ωμέγα\tend 3.14159 "
            "won't WE'RE\r\n  \n" + TEXT)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)


@needs_llama
@pytest.mark.parametrize("scheme", ["normalizer", "metaspace"])
def test_llama_cpp_splits_sentencepiece_text_as_the_tokenizer_does(tmp_path, plays_dir, scheme):
    """A SentencePiece-style BPE (spaces as U+2581 with one before the text, byte fallback: Llama 2's layout, in
    either of the two ways HF writes it) goes in as llama.cpp's `llama` tokenizer: equal ids, including characters
    outside the vocabulary, which both spell as <0xNN> bytes."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if scheme == "normalizer":
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    texts = [p.read_text()[:200_000] for p in sorted(plays_dir.iterdir())[:2]]
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False))
    tok = Tokenizer(hf, {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>", "add_bos_token": True})
    cfg = ModelConfig(vocab_size=tok.vocab_size, **SHAPES["llama"])
    ckpt = write_checkpoint(tmp_path / "ckpt", RunConfig(model=cfg), tok, model_state=GPT(cfg).state_dict())
    path, _ = export_gguf(ckpt, tmp_path / "m.gguf", "f16")
    r, _ = read(path)
    assert field(r, "tokenizer.ggml.model") == "llama" and field(r, "tokenizer.ggml.add_bos_token") is True
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    text = "In 1597, they'd said: 'I'LL pay 12345 ducats'!\n\n  Caf\u00e9  na\u00efve   \u03a9\u03bc\u03ad\u03b3\u03b1 \u2603 " + TEXT
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
