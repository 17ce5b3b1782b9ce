"""The inference engine: KV cache equals recomputation, batches equal single prompts, samplers, stops, streaming."""

import pytest
import torch
import torch.nn as nn

from gptforge import generate as G
from gptforge.config import ModelConfig, model_preset
from gptforge.errors import GptforgeError
from gptforge.engine import BatchEngine
from gptforge.generate import complete, generate, generate_steps, generate_tokens, stream, stream_batch
from gptforge.sampling import SamplingParams, apply_penalties, min_p_filter, sample, top_k_filter, top_p_filter
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer

# fp32 on CPU: the cached and recomputed paths sum the same products in a different order (SDPA over a longer,
# masked key set), so they agree to rounding, not bit for bit. 1e-5 on logprobs of magnitude ~6 is ~1e-6 relative.
ATOL = 1e-5


@pytest.fixture(scope="module", params=["tiny", "rotary"])
def model(request):
    torch.manual_seed(0)
    cfg = model_preset("tiny")
    if request.param == "rotary":  # the demo's variant: rotary positions, RMSNorm, SwiGLU, GQA, no biases
        cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=512, block_size=64,
                          pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", bias=False)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def byte_tok():
    """A byte-level BPE with no merges: every UTF-8 byte is one token, so strings split across tokens easily."""
    return Tokenizer.train(["abc"], vocab_size=264)


def tokens(steps):
    out = None
    for s in steps:
        out = out or [[] for _ in s.ids]
        for r, i in enumerate(s.ids):
            if i is not None:
                out[r].append(i)
    return out


def greedy_reference(model, ids, n, vocab=500):
    """Argmax of the full recomputation, one token at a time, and the log-softmax at every step."""
    ids, logps = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1, :vocab]
        logps.append(logits.log_softmax(-1))
        ids.append(int(logits.argmax()))
    return ids[-n:], logps


# --- the cache equals recomputation ------------------------------------------------------------------------
@pytest.mark.parametrize("prompts", [[list(range(1, 20))], [list(range(1, 20)), [7, 8], [300] * 5, [42]]],
                         ids=["single", "padded-batch"])
def test_cached_logprobs_equal_recomputation(model, prompts):
    # top_logprobs = the whole vocabulary: each step reports the full distribution the cache produced.
    p = SamplingParams(max_new_tokens=12, temperature=0, top_logprobs=500)
    steps = list(generate_steps(model, prompts, p, vocab_size=500))
    assert len(steps) == 12
    for r, prompt in enumerate(prompts):
        ref_ids, ref_logps = greedy_reference(model, prompt, 12)
        assert [s.ids[r] for s in steps] == ref_ids
        for s, ref in zip(steps, ref_logps):
            got = torch.zeros(500)
            idx, val = zip(*s.top[r])
            got[list(idx)] = torch.tensor(val)
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_static_cache_path_equals_eager(model, monkeypatch):
    # The CUDA path's cache (attention over all S slots, unwritten ones masked), run uncompiled on the CPU.
    monkeypatch.setattr(G, "compiled_step", lambda device_type: G._decode_step)
    prompts = [list(range(1, 20)), [7, 8], [42]]
    p = SamplingParams(max_new_tokens=10, temperature=0, logprobs=True)
    eager = list(generate_steps(model, prompts, p, vocab_size=500, compile=False))
    static = list(generate_steps(model, prompts, p, vocab_size=500, compile=True))
    assert [s.ids for s in static] == [s.ids for s in eager]
    lp = lambda steps: torch.tensor([s.logprobs for s in steps])
    torch.testing.assert_close(lp(static), lp(eager), atol=ATOL, rtol=0)


def test_decode_step_mask_fast_path_equals_the_general_one(model):
    """prepare(slot, None, end) for an eager one-token step gives the mask and validity of the general path."""
    cfg = model.config
    masks = []
    for real_step in (None, torch.ones(3, 1, dtype=torch.bool)):
        cache = G.KVCache(cfg, 3, 12, device=torch.device("cpu"), dtype=torch.float32, static=False)
        cols = torch.arange(5)
        real = torch.tensor([[0, 0, 1, 1, 1], [1] * 5, [0, 0, 0, 0, 1]], dtype=torch.bool)  # left-padded prompts
        cache.prepare(cols, real, end=5)
        for slot in (5, 6):
            cache.prepare(torch.tensor([slot]), real_step, end=slot + 1)
            masks.append((cache.mask.clone(), cache.valid.clone()))
    for (fast, valid_fast), (general, valid_general) in zip(masks[:2], masks[2:]):
        assert fast.shape == general.shape and torch.equal(fast, general) and torch.equal(valid_fast, valid_general)


def test_per_row_positions_match_shared_ones(model):
    idx = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        shared = model(idx, torch.arange(3))
        per_row = model(idx, torch.arange(3).expand(2, 3))
    torch.testing.assert_close(per_row, shared, atol=0, rtol=0)


def test_greedy_batch_equals_one_by_one(model):
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [5, 8, 9, 7, 9], [1]]
    p = SamplingParams(max_new_tokens=15, temperature=0)
    batch = tokens(generate_steps(model, prompts, p, vocab_size=500))
    assert batch == [tokens(generate_steps(model, [q], p, vocab_size=500))[0] for q in prompts]


def test_each_row_stops_on_its_own(model):
    prompts = [[3, 1, 4], [2, 7, 1, 8]]
    p = SamplingParams(max_new_tokens=10, temperature=0)
    free = tokens(generate_steps(model, prompts, p, vocab_size=500))
    stop = free[0][2]  # row 0 stops at (or before) its third token; row 1 runs on unless it meets the same id
    out = tokens(generate_steps(model, prompts, p, vocab_size=500, stop_ids=(stop,)))
    cut = [row.index(stop) + 1 if stop in row else 10 for row in free]
    assert out == [free[0][:cut[0]], free[1][:cut[1]]] and cut[0] <= 3 and cut[1] > cut[0]


# --- sampling ----------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(model):
    run = lambda seed: list(generate_tokens(model, [1, 2, 3], max_new_tokens=20, vocab_size=500, temperature=1.0, seed=seed))
    assert run(1) == run(1)
    assert run(1) != run(2)
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    batch = lambda: tokens(generate_steps(model, [[1, 2], [3, 4, 5]], p, vocab_size=500))
    assert batch() == batch()


def test_top_k_one_is_greedy_and_padding_never_sampled(model):
    a = list(generate_tokens(model, [5], max_new_tokens=10, vocab_size=500, temperature=1.5, top_k=1, seed=0))
    b = list(generate_tokens(model, [5], max_new_tokens=10, vocab_size=500, temperature=0))
    assert a == b
    # The padded table has 512 rows; ids 500..511 must never come out even at a very high temperature.
    p = SamplingParams(max_new_tokens=60, temperature=50.0, seed=0)
    many = sum(tokens(generate_steps(model, [[5]] * 8, p, vocab_size=500)), [])
    assert len(many) == 480 and max(many) < 500 and len(set(many)) > 200


def test_top_k_restricts_choices(model):
    with torch.no_grad():
        logits = model(torch.tensor([[7]]))[0, -1, :500]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    firsts = {next(generate_tokens(model, [7], max_new_tokens=1, vocab_size=500, top_k=3, seed=s)) for s in range(40)}
    assert firsts <= top3 and len(firsts) > 1


def logits_of(*probs):
    return torch.tensor([probs]).log()


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def test_filters_on_hand_made_distributions():
    x = logits_of(0.5, 0.2, 0.15, 0.1, 0.05)
    assert kept(top_k_filter(x, 2)) == [True, True, False, False, False]
    assert kept(top_k_filter(x, 9)) == [True] * 5
    # top-p: 0.5 < 0.6, 0.5 + 0.2 >= 0.6 -> two tokens; p = 0.5 exactly is reached by the first alone.
    assert kept(top_p_filter(x, 0.6)) == [True, True, False, False, False]
    assert kept(top_p_filter(x, 0.5)) == [True, False, False, False, False]
    assert kept(top_p_filter(x, 0.86)) == [True, True, True, True, False]
    assert kept(top_p_filter(logits_of(0.1, 0.5, 0.4), 0.7)) == [False, True, True]  # order of the vocabulary kept
    # min-p 0.3: keep p >= 0.3 * 0.5 = 0.15.
    assert kept(min_p_filter(x, 0.3)) == [True, True, True, False, False]
    assert kept(min_p_filter(x, 0.0)) == [True] * 5


def test_penalties_on_hand_made_logits():
    x = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    seen = torch.tensor([[True, True, True, False]])  # token 2 only in the prompt
    rep = apply_penalties(x, counts, seen, SamplingParams(repetition_penalty=2.0))
    assert rep.tolist() == [[1.0, -4.0, 0.5, 0.5]]
    pres = apply_penalties(x, counts, seen, SamplingParams(presence_penalty=0.5))
    assert pres.tolist() == [[1.5, -2.5, 1.0, 0.5]]
    freq = apply_penalties(x, counts, seen, SamplingParams(frequency_penalty=0.25))
    assert freq.tolist() == [[1.5, -2.25, 1.0, 0.5]]


def test_sampling_frequencies_follow_the_filtered_distribution():
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    x = logits_of(0.5, 0.3, 0.15, 0.05).expand(n, 4)
    freq = lambda ids: torch.bincount(ids, minlength=4).float() / n
    # Plain sampling at temperature 1: within 0.01 of the distribution (5 standard errors at n = 40k).
    torch.testing.assert_close(freq(sample(x, SamplingParams(temperature=1.0), gen)),
                               torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01, rtol=0)
    # top-p 0.7 keeps 0.5 and 0.3, renormalised to 0.625 / 0.375.
    torch.testing.assert_close(freq(sample(x, SamplingParams(temperature=1.0, top_p=0.7), gen)),
                               torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01, rtol=0)
    # Temperature 2 flattens: p ~ sqrt(p), renormalised.
    flat = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(freq(sample(x, SamplingParams(temperature=2.0), gen)), flat / flat.sum(), atol=0.01, rtol=0)
    assert sample(x[:3], SamplingParams(temperature=0), None).tolist() == [0, 0, 0]


def test_penalty_changes_greedy_choice(model):
    free = list(generate_tokens(model, [5, 5, 5], max_new_tokens=8, vocab_size=500, temperature=0))
    pen = list(generate_tokens(model, [5, 5, 5], max_new_tokens=8, vocab_size=500, temperature=0,
                               frequency_penalty=2.0, presence_penalty=2.0))
    assert len(set(pen)) == 8  # a penalty of 4 on any repeat outweighs these small random-weight logits
    assert len(set(free)) < 8 or free != pen


def test_logprobs_are_those_of_the_chosen_tokens(model):
    p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, logprobs=True, top_logprobs=3)
    steps = list(generate_steps(model, [[4, 2]], p, vocab_size=500))
    ids = [4, 2]
    for s in steps:
        with torch.no_grad():
            logp = model(torch.tensor([ids]))[0, -1, :500].log_softmax(-1)
        assert s.logprobs[0] == pytest.approx(float(logp[s.ids[0]]), abs=ATOL)
        top = torch.topk(logp, 3)
        assert [i for i, _ in s.top[0]] == top.indices.tolist()
        ids.append(s.ids[0])


def test_stops_on_stop_id(model):
    first = next(generate_tokens(model, [9], max_new_tokens=1, vocab_size=500, temperature=0))
    out = list(generate_tokens(model, [9], max_new_tokens=10, vocab_size=500, temperature=0, stop_ids=(first,)))
    assert out == [first]


# --- text: stop strings, UTF-8 streaming -------------------------------------------------------------------
class Scripted(nn.Module):
    """A stand-in model whose greedy continuation is a fixed text: position t predicts byte t of the script."""

    def __init__(self, tok, script: str, block_size: int = 128):
        super().__init__()
        self.config = ModelConfig(n_layer=1, n_head=1, d_model=8, vocab_size=264, block_size=block_size)
        self.ids = torch.tensor(tok.encode(script))
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, idx, pos=None, cache=None, last=None):
        pos = torch.arange(idx.shape[1]).expand_as(idx) if pos is None else pos.expand_as(idx)
        if last is not None:  # a prefill asks for one position per row, as GPT.forward takes it
            pos = pos[torch.arange(idx.shape[0]), last][:, None]
        target = self.ids[(pos + 1).clamp(max=len(self.ids) - 1)]  # (B, T): the byte after each position
        return nn.functional.one_hot(target, 320).float() * 10.0  # (B, T, V)


def test_stop_string_split_across_tokens(byte_tok):
    script = "xHello STOP world, STOP again"
    m = Scripted(byte_tok, script)
    # The prompt is the script's first byte, so the greedy continuation is the rest of it, one byte per token.
    c = complete(m, byte_tok, ["x", "x"], max_new_tokens=40, temperature=0, stop=["STOP"])
    assert [r.text for r in c] == ["Hello ", "Hello "]
    assert c[0].finish_reason == "stop" and len(c[0].token_ids) == len("Hello STOP")
    assert generate(m, byte_tok, "x", max_new_tokens=40, temperature=0, stop=["nothing", "d, S"]) == "Hello STOP worl"
    c = complete(m, byte_tok, ["x"], max_new_tokens=5, temperature=0, stop=["STOP"])[0]
    assert (c.text, c.finish_reason) == ("Hello", "length")


def test_stream_yields_valid_utf8_and_never_part_of_a_stop_string(byte_tok):
    script = "xnaïve café — STnaSTOP!"  # ï, é and — are 2-3 byte tokens each; "ST" twice before "STOP"
    m = Scripted(byte_tok, script)
    deltas = list(stream(m, byte_tok, "x", max_new_tokens=60, temperature=0, stop=["STOP"]))
    assert "".join(deltas) == "naïve café — STna"
    assert all("\ufffd" not in d and "STO" not in d for d in deltas)
    assert len(deltas) > 5  # streamed, not one piece at the end
    byte_by_byte = list(stream(m, byte_tok, "x", max_new_tokens=len(script.encode()) - 1, temperature=0))
    assert "".join(byte_by_byte) == script[1:] and all("\ufffd" not in d for d in byte_by_byte)


def test_streaming_concatenation_equals_generate(prepared):
    tok = Tokenizer.load(prepared / "tokenizer.json")
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size, block_size=64)).eval()
    prompts = ["KING", "To be, or", ""]
    opts = dict(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=5, stop=["\n\n"])
    texts = generate(m, tok, prompts, **opts)
    streamed = ["", "", ""]
    for r, delta in stream_batch(m, tok, prompts, **opts):
        streamed[r] += delta
    assert streamed == texts
    assert "".join(stream(m, tok, "KING", **opts)) == generate(m, tok, "KING", **opts)
    assert all(len(t) > 0 for t in texts)


# --- limits and bad input ----------------------------------------------------------------------------------
def test_prompt_longer_than_context_is_an_error_or_truncated(model):
    with pytest.raises(GptforgeError, match="context is 64.*truncate_prompt"):
        list(generate_tokens(model, list(range(1, 70)), max_new_tokens=5, vocab_size=500))
    out = list(generate_tokens(model, list(range(1, 70)), max_new_tokens=5, vocab_size=500, temperature=0,
                               truncate_prompt=True))
    assert out == greedy_reference(model, list(range(11, 70)), 5)[0]  # its last 64 - 5 tokens


def test_generation_stops_when_the_context_is_full(model):
    out = list(generate_tokens(model, list(range(1, 60)), max_new_tokens=20, vocab_size=500, temperature=0))
    assert out == greedy_reference(model, list(range(1, 60)), 5)[0]  # 59 + 5 = block_size 64


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"), (dict(min_p=1.0), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(stop=[""]), "stop strings"), (dict(top_logprobs=-1), "top_logprobs"),
])
def test_bad_sampling_arguments(model, kwargs, message):
    args = dict(max_new_tokens=1, vocab_size=500) | kwargs
    with pytest.raises(GptforgeError, match=message):
        list(generate_tokens(model, [1], **args))


def test_unknown_option_names_the_valid_ones(byte_tok):
    with pytest.raises(GptforgeError, match="unknown generation option.*top_pp.*valid:.*top_p"):
        generate(Scripted(byte_tok, "xy"), byte_tok, "x", top_pp=0.9)


def test_empty_prompt_token_list_is_an_error(model):
    with pytest.raises(GptforgeError, match="prompt 0 encodes to no tokens"):
        list(generate_tokens(model, [], max_new_tokens=1, vocab_size=500))


# --- CUDA --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_bf16_decode_matches_eager():
    torch.manual_seed(0)
    m = GPT(model_preset("shakespeare")).eval().cuda().to(torch.bfloat16)
    prompts = [list(range(1, 30)), [7, 8, 9]]
    p = SamplingParams(max_new_tokens=24, temperature=0, logprobs=True)
    eager = list(generate_steps(m, prompts, p, vocab_size=4096, compile=False))
    graphed = list(generate_steps(m, prompts, p, vocab_size=4096, compile=True))
    # bf16 logits differ in the last bits between the fused and eager kernels: compare the distributions.
    lp = lambda steps: torch.tensor([s.logprobs for s in steps])
    torch.testing.assert_close(lp(graphed)[:4], lp(eager)[:4], atol=0.05, rtol=0)
    assert [s.ids for s in graphed][:4] == [s.ids for s in eager][:4]
    again = list(generate_steps(m, prompts, SamplingParams(max_new_tokens=24, temperature=1.0, seed=1), vocab_size=4096))
    assert [s.ids for s in again] == [s.ids for s in
                                      generate_steps(m, prompts, SamplingParams(max_new_tokens=24, temperature=1.0, seed=1), vocab_size=4096)]


# --- the command line and gptforge.load --------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, prepared):
    """A checkpoint folder (its three files written directly) of an untrained tiny model with the prepared
    data's tokenizer: no training needed."""
    from safetensors.torch import save_file

    from gptforge.config import RunConfig

    tok = Tokenizer.load(prepared / "tokenizer.json")
    cfg = RunConfig(model=ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size, block_size=64))
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt")
    save_file(GPT(cfg.model).state_dict(), str(d / "model.safetensors"))
    cfg.save(d / "config.yaml")
    tok.save(d / "tokenizer.json")
    return d


def test_load_gives_model_and_tokenizer_ready_to_generate(checkpoint):
    import gptforge

    model, tok = gptforge.load(checkpoint)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    a = generate(model, tok, "KING", max_new_tokens=8, temperature=0)
    assert a == generate(model, tok, ["KING", "QUEEN"], max_new_tokens=8, temperature=0)[0]
    assert next(gptforge.load(checkpoint, dtype="bfloat16")[0].parameters()).dtype == torch.bfloat16
    with pytest.raises(GptforgeError, match="unknown dtype 'fp8'"):
        gptforge.load(checkpoint, dtype="fp8")


def test_cli_generate_reads_stdin_and_a_file_and_stops(checkpoint, tmp_path, monkeypatch, capsys):
    import io

    from gptforge.cli import main

    model, tok = G.load(checkpoint)
    full = generate(model, tok, "KING", max_new_tokens=20, temperature=0)
    stop = full[5:8]
    expect = "KING" + full[: full.index(stop)] + "\n"
    f = tmp_path / "prompt.txt"
    f.write_text("KING")
    assert main(["generate", str(checkpoint), "--prompt-file", str(f), "--max-new-tokens", "20",
                 "--temperature", "0", "--stop", stop, "--stop", "\u2603"]) == 0
    assert capsys.readouterr().out == expect
    monkeypatch.setattr("sys.stdin", io.StringIO("KING"))
    assert main(["generate", str(checkpoint), "--max-new-tokens", "20", "--temperature", "0", "--stop", stop]) == 0
    assert capsys.readouterr().out == expect
    assert main(["generate", str(checkpoint), "--prompt", "KING", "--top-p", "1.5"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_each_default_is_set_once_and_cli_equals_library(checkpoint, capsys):
    """The CLI's sampling flags default to SamplingParams' fields, and `gptforge generate` prints exactly what
    gptforge.generate's functions return with the same seed and no options (issue 20: four defaults)."""
    import dataclasses

    from gptforge.cli import build_parser, main

    args = build_parser().parse_args(["generate", str(checkpoint)])
    d = SamplingParams()
    flags = [f.name for f in dataclasses.fields(SamplingParams) if hasattr(args, f.name) and f.name != "stop"]
    assert len(flags) == 10 and all(getattr(args, f) == getattr(d, f) for f in flags)
    assert (not args.ignore_eos, tuple(args.stop or ())) == (d.stop_at_eos, d.stop)
    model, tok = G.load(checkpoint)
    text = generate(model, tok, "KING", seed=3)
    assert main(["generate", str(checkpoint), "--prompt", "KING", "--seed", "3"]) == 0
    assert capsys.readouterr().out == "KING" + text + "\n"
    assert "".join(stream(model, tok, "KING", seed=3)) == text == complete(model, tok, "KING", seed=3).text
    ids = tok.encode("KING")
    c = complete(model, tok, "KING", seed=3, stop_at_eos=False)
    assert list(generate_tokens(model, ids, vocab_size=tok.vocab_size, seed=3)) == c.token_ids
    assert text == generate(model, tok, "KING", **{f: getattr(d, f) for f in flags} | {"seed": 3})


# --- parity with Hugging Face GPT-2 ------------------------------------------------------------------------
def test_greedy_left_padded_batch_equals_hf_gpt2():
    """Same weights in HF GPT2 (Conv1D stores the transpose of our Linear): the same greedy tokens for a batch
    of prompts of different lengths, which HF left-pads with an attention mask as we do."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=500, block_size=64)
    ours = GPT(cfg).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    sd = {"transformer.wte.weight": ours.tok_emb.weight[:500], "transformer.wpe.weight": ours.pos_emb.weight,
          "transformer.ln_f.weight": ours.norm_f.weight, "transformer.ln_f.bias": ours.norm_f.bias}
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}
    for i in range(2):
        for theirs, mine in names.items():
            w, b = ours.get_submodule(f"blocks.{i}.{mine}").weight, ours.get_submodule(f"blocks.{i}.{mine}").bias
            sd[f"transformer.h.{i}.{theirs}.weight"] = w if theirs.startswith("ln") else w.T.contiguous()
            sd[f"transformer.h.{i}.{theirs}.bias"] = b
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [5, 8, 9, 7, 9]]
    ids = torch.tensor([[0] * (8 - len(p)) + p for p in prompts])
    mask = (torch.arange(8)[None, :] >= torch.tensor([8 - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=0)[:, 8:].tolist()
    assert tokens(generate_steps(ours, prompts, SamplingParams(max_new_tokens=12, temperature=0), vocab_size=500)) == theirs


def test_decode_layout_keeps_values_and_greedy_output(model):
    import copy

    from gptforge import native

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    moved = native.decode_layout(copy.deepcopy(model))
    up = moved.blocks[0].mlp.up
    assert isinstance(up, native.DecodeLinear) and isinstance(moved.lm_head, native.DecodeTiedHead)
    assert not any(type(m) is torch.nn.Linear for m in moved.modules())
    assert all(type(b) is native.DecodeBlock for b in moved.blocks)  # each decode step's block is one native op
    assert up.weight.shape == model.blocks[0].mlp.up.weight.shape
    assert torch.equal(up.weight, model.blocks[0].mlp.up.weight)
    p = SamplingParams(max_new_tokens=10, temperature=0, logprobs=True)
    for prompts in ([[1, 2, 3]], [[1, 2, 3], [4]]):  # one row per step, and two
        a, b = list(generate_steps(model, prompts, p, vocab_size=500)), list(generate_steps(moved, prompts, p, vocab_size=500))
        assert [s.ids for s in a] == [s.ids for s in b]
        torch.testing.assert_close(torch.tensor([s.logprobs for s in a]), torch.tensor([s.logprobs for s in b]),
                                   atol=ATOL, rtol=0)


STEP_VARIANTS = {  # the whole-step op's variants (native/step.py): each norm, MLP and position kind, GQA, soft-cap
    "llama": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=300, block_size=48, pos_encoding="rotary",
                  norm="rmsnorm", mlp="swiglu", bias=False),
    "gpt2": dict(n_layer=2, n_head=4, d_model=64, vocab_size=300, block_size=48),
    "relu2-softcap": dict(n_layer=2, n_head=2, n_kv_head=1, d_model=64, vocab_size=300, block_size=48,
                          pos_encoding="rotary", mlp="relu2", bias=False, logit_softcap=15.0, tie_embeddings=False),
}


def _step_model(variant: str, fmt: str) -> GPT:
    """A decode-layout model of STEP_VARIANTS[variant] in fmt: fp32, bf16, or int8 / int4 (int8 activations)."""
    from gptforge import native
    from gptforge.compress.quantize import quantize_model

    torch.manual_seed(0)
    model = GPT(ModelConfig(**STEP_VARIANTS[variant])).eval()
    if fmt in ("int8", "int4"):
        model = quantize_model(model, fmt, group_size=32 if fmt == "int4" else None)[0]
    return native.decode_layout(model.to(torch.bfloat16) if fmt == "bf16" else model)


@pytest.mark.parametrize("variant", STEP_VARIANTS)
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_whole_step_op_equals_the_block_path(variant, fmt, monkeypatch):
    """generate_steps runs a decode-layout model's step as one native call (csrc/step.cpp); its tokens equal the
    per-block path's, its logprobs, logits and cache writes agree (bit for bit on the CI CPU: the same ops, RMSNorm
    summed in ATen's order; the bounds allow another torch build's sum order), with left padding, for quantized
    models too (their quantized table and head run inside the op); without the op the path is the block op's."""
    from gptforge import native
    from gptforge.native.step import DecodeStep

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    model = _step_model(variant, fmt)
    atol = 2e-2 if fmt == "bf16" else ATOL  # bf16: one step of 2^-6 at |logit| ~1-2
    step = DecodeStep.of(model)
    assert step is not None
    calls, call = [], DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
    p = SamplingParams(max_new_tokens=12, temperature=0, logprobs=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    fused = list(generate_steps(model, prompts, p, vocab_size=300))
    assert len(calls) == 11  # every decode step after the prefill
    with monkeypatch.context() as m:
        m.setattr(DecodeStep, "of", classmethod(lambda cls, model: None))
        plain = list(generate_steps(model, prompts, p, vocab_size=300))
    assert [s.ids for s in fused] == [s.ids for s in plain]
    torch.testing.assert_close(torch.tensor([s.logprobs for s in fused]), torch.tensor([s.logprobs for s in plain]),
                               atol=atol, rtol=0)
    with torch.no_grad():  # one step's logits and cache writes, op against the model's forward
        caches, out = [], []
        for run in (lambda c, ids, pos: model(ids, pos, c)[:, -1], lambda c, ids, pos: step(ids, pos, c, torch.tensor([5]), 6)):
            cache, logits = G._prefill(model, prompts, 8, False)
            cache.prepare(torch.tensor([5]), None, 6)
            out.append(run(cache, logits.argmax(-1)[:, None], torch.tensor([[5], [2]])))
            caches.append(torch.cat([torch.cat([kv.k, kv.v]) for kv in cache.layers]))
    torch.testing.assert_close(out[0], out[1], atol=atol, rtol=0)
    torch.testing.assert_close(caches[0], caches[1], atol=atol, rtol=0)


@pytest.mark.parametrize("variant", ["gpt2", "relu2-softcap"])  # a tied table with positions; an untied head, soft-cap
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("activations", ["dynamic", "weight-only"])
def test_whole_step_op_embeds_and_multiplies_quantized_tables(variant, fmt, activations, monkeypatch):
    """A quantized model's token table (its rows dequantized in C++) and head (tied to the table or its own
    QuantLinear, each kind) run inside the op, no module called in a decode step, and the logits and cache writes
    equal the op's with those modules around it (QuantEmbedding's rows, the head's kernel) to the bit."""
    from gptforge import native
    from gptforge.compress.quantize import quantize_model
    from gptforge.native import step as S

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    torch.manual_seed(0)
    model = GPT(ModelConfig(**STEP_VARIANTS[variant])).eval()
    model = native.decode_layout(quantize_model(model, fmt, 32 if fmt == "int4" else None, activations=activations)[0])
    inside = S.DecodeStep.of(model)
    with monkeypatch.context() as m:
        m.setattr(S, "_table", lambda model: None)
        m.setattr(S, "_head", lambda model: None)
        around = S.DecodeStep.of(model)
    assert (inside.embed, inside.head, around.embed, around.head) == (False, False, True, True)
    calls = []
    for mod in (model.tok_emb, model.lm_head):
        mod.register_forward_hook(lambda *a: calls.append(1))
    prompts, out, caches = [[5, 6, 7, 8, 9], [10, 11]], [], []
    with torch.no_grad():
        for step in (inside, around):
            cache, logits = G._prefill(model, prompts, 8, False)
            calls.clear()
            out.append(step(logits.argmax(-1)[:, None], torch.tensor([[5], [2]]), cache, torch.tensor([5]), 6))
            caches.append(torch.cat([torch.cat([kv.k, kv.v]) for kv in cache.layers]))
            assert len(calls) == (0 if step is inside else 2)
    assert torch.equal(out[0], out[1]) and torch.equal(caches[0], caches[1])


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_whole_step_op_marks_its_slots_and_masks_itself(window, fmt):
    """The op marks each row's slot valid and builds the attention mask as KVCache.prepare does for one token per
    row: rows at their own slots (BatchEngine), invalid slots (padding, a retired sequence's) skipped, a sliding
    window; its logits, cache writes and validity equal prepare + the model's forward, and the same with one slot
    shared by every row (the static batch)."""
    from gptforge import native
    from gptforge.native.step import DecodeStep

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**STEP_VARIANTS["llama"], "sliding_window": window})).eval()
    model = native.decode_layout(model.to(torch.bfloat16) if fmt == "bf16" else model)
    step = DecodeStep.of(model)
    holes = torch.tensor([[True] * 7 + [False] * 5, [False, True, False] + [True] * 9, [True] * 12])
    ids, atol = torch.tensor([[7], [8], [9]]), 2e-2 if fmt == "bf16" else ATOL
    for slots in (torch.tensor([[7], [9], [4]]), torch.tensor([8]), None):  # None: end - 1 for every row
        end = 9 if slots is None else int(slots.max()) + 1
        pos = torch.full((3, 1), 8) if slots is None else slots.expand(3, 1)
        out, state = [], []
        with torch.no_grad():
            for own in (False, True):
                cache, _ = G._prefill(model, [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]] * 3, 12, False)
                cache.valid.copy_(holes)
                if own:
                    out.append(step(ids, pos, cache, slots, end))
                else:
                    real = None if slots is None or slots.dim() == 1 else torch.ones(3, 1, dtype=torch.bool)
                    cache.prepare(torch.tensor([8]) if slots is None else slots, real, end)  # real None: fast path
                    out.append(model(ids, pos, cache)[:, -1])
                state.append((cache.valid.clone(), torch.cat([torch.cat([kv.k, kv.v]) for kv in cache.layers])))
        torch.testing.assert_close(out[0], out[1], atol=atol, rtol=0)
        assert torch.equal(state[0][0], state[1][0])
        torch.testing.assert_close(state[0][1], state[1][1], atol=atol, rtol=0)


def test_whole_step_op_rejects_slots_outside_the_cache_and_changes_nothing():
    """A slot at or beyond `end`, or an `end` beyond the cache, is a clear error and marks no slot valid."""
    from gptforge import native
    from gptforge.native.step import DecodeStep

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    model = _step_model("llama", "fp32")
    step = DecodeStep.of(model)
    with torch.no_grad():
        cache, _ = G._prefill(model, [[5, 6, 7], [8, 9, 10]], 8, False)
        before = cache.valid.clone()
        for slots, end, msg in ((torch.tensor([3, 6]), 6, "slot 6 is outside the first 6"),
                                (torch.tensor([3]), 9, "end 9 is outside the cache's 1..8")):
            with pytest.raises(RuntimeError, match=msg):
                step(torch.tensor([1, 2]), torch.tensor([3, 3]), cache, slots, end)
            assert torch.equal(cache.valid, before)


def test_whole_step_op_takes_strided_ids():
    """ids sliced out of a wider tensor (a column of a (B, T) batch: not contiguous) give the same logits as a copy."""
    from gptforge import native
    from gptforge.native.step import DecodeStep

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    model = _step_model("llama", "fp32")
    step, prompts = DecodeStep.of(model), [[5, 6, 7, 8, 9], [10, 11]]
    wide = torch.tensor([[1, 40, 2], [3, 41, 4]])
    assert not wide[:, 1:2].is_contiguous()
    out = []
    with torch.no_grad():
        for ids in (wide[:, 1:2], wide[:, 1:2].contiguous()):
            cache, _ = G._prefill(model, prompts, 8, False)
            out.append(step(ids, torch.tensor([[5], [2]]), cache, torch.tensor([5]), 6))
    torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)


def test_whole_step_op_sizes_its_rotary_tables_to_the_cache(monkeypatch):
    """A rotary model's cos/sin tables cover the positions the generation's cache holds, not block_size's (an
    imported Llama 3 has 131,072), and its tokens equal the block path's."""
    from gptforge import native
    from gptforge.native.step import DecodeStep

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    torch.manual_seed(0)
    model = native.decode_layout(GPT(ModelConfig(**{**STEP_VARIANTS["llama"], "block_size": 65536})).eval())
    steps, call = [], DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: steps.append(self) or call(self, *a))
    p = SamplingParams(max_new_tokens=6, temperature=0)
    fused = [s.ids for s in generate_steps(model, [[5, 6, 7, 8, 9]], p, vocab_size=300)]
    assert steps and steps[0].globals[2].shape[0] == steps[0]._cache.length < 64
    with monkeypatch.context() as m:
        m.setattr(DecodeStep, "of", classmethod(lambda cls, model: None))
        assert [s.ids for s in generate_steps(model, [[5, 6, 7, 8, 9]], p, vocab_size=300)] == fused


def test_whole_step_op_runs_only_what_it_covers():
    """fp32, bf16, quantized models and adapters served per row run it; mixed dtypes, QK-norm, value embeddings,
    Linears the block op does not multiply (a quantized kernel other than the native one) and a model without the
    decode layout keep the model's own forward (DecodeStep.of is None)."""
    from gptforge import native
    from gptforge.compress.quantize import quantize_model
    from gptforge.config import LoRAConfig
    from gptforge.finetune.lora import apply_adapters, apply_lora, is_lora_key
    from gptforge.native.step import DecodeStep

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    cfg = STEP_VARIANTS["llama"]
    assert DecodeStep.of(native.decode_layout(GPT(ModelConfig(**cfg)).eval())) is not None
    assert DecodeStep.of(GPT(ModelConfig(**cfg)).eval()) is None
    assert DecodeStep.of(native.decode_layout(GPT(ModelConfig(**cfg)).eval().to(torch.bfloat16))) is not None
    mixed = GPT(ModelConfig(**cfg)).eval()
    mixed.blocks[1].to(torch.bfloat16)
    assert DecodeStep.of(native.decode_layout(mixed)) is None
    assert DecodeStep.of(native.decode_layout(GPT(ModelConfig(**cfg, qk_norm=True)).eval())) is None
    assert DecodeStep.of(native.decode_layout(GPT(ModelConfig(**cfg, value_embeds=1)).eval())) is None
    assert DecodeStep.of(native.decode_layout(quantize_model(GPT(ModelConfig(**cfg)).eval(), "int8")[0])) is not None
    dequant = quantize_model(GPT(ModelConfig(**cfg)).eval(), "int8")[0]
    for m in dequant.modules():
        if hasattr(m, "kernel"):
            m.kernel = "dequant"
    assert DecodeStep.of(native.decode_layout(dequant)) is None
    assert DecodeStep.of(native.decode_layout(GPT(ModelConfig(**cfg)).train())) is None
    served = GPT(ModelConfig(**cfg)).eval()
    lora = LoRAConfig(rank=2)
    state = {k: v for k, v in apply_lora(GPT(ModelConfig(**cfg)), lora).state_dict().items() if is_lora_key(k)}
    apply_adapters(served, [("a", lora, state)])
    assert DecodeStep.of(native.decode_layout(served)) is not None  # each row's adapter, through block_linear

# --- continuous batching (BatchEngine, the server's decoder) ---------------------------------------------------
@pytest.fixture
def one_thread():
    """Many tiny steps: on a busy 2-core machine, 2 intra-op threads made each ~100x slower than 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_engine(engine, jobs, join_every=3):
    """Add (prompt ids, params) jobs one every `join_every` steps while stepping; returns tokens, text per job."""
    pending, by_seq, toks, texts, steps = list(enumerate(jobs)), {}, {}, {}, 0
    while pending or engine.live:
        if pending and steps % join_every == 0:
            k, (ids, p) = pending.pop(0)
            by_seq[engine.add(ids, p)] = k
        for ev in engine.step():
            k = by_seq[ev.seq]
            toks.setdefault(k, []).append(ev.token)
            texts[k] = texts.get(k, "") + ev.text
        steps += 1
    return [toks[k] for k in range(len(jobs))], [texts[k] for k in range(len(jobs))]


def test_engine_with_staggered_joins_equals_complete(model, byte_tok, one_thread):
    # Greedy, seeded, and seeded with filters, penalties and logprobs: each sequence joins a running batch at a
    # different step, yet decodes exactly what `complete` decodes for it alone (same ids, same text).
    prompts = ["abc", "b", "cabbage cab", "a"]
    opts = [dict(temperature=0, max_new_tokens=12), dict(temperature=0.9, seed=3, max_new_tokens=12),
            dict(temperature=1.0, top_k=50, top_p=0.9, seed=7, presence_penalty=0.5, max_new_tokens=9,
                 top_logprobs=2, stop=("ab",))]
    jobs = [(p, o) for p in prompts for o in opts]
    engine = BatchEngine(model, byte_tok, max_batch=8)
    toks, texts = run_engine(engine, [(byte_tok.encode(p), SamplingParams(stop_at_eos=False, **o)) for p, o in jobs])
    for (p, o), t, text in zip(jobs, toks, texts):
        ref = complete(model, byte_tok, [p], stop_at_eos=False, **o)[0]
        assert t == ref.token_ids and text == ref.text
    assert engine.live == 0


def test_engine_decodes_through_the_whole_step_op(model, byte_tok, one_thread, monkeypatch):
    """A decode-layout model's BatchEngine steps run the whole-step op (csrc/step.cpp) with each row at its own
    slot, and decode what `complete` decodes for each sequence alone."""
    import copy

    from gptforge import native
    from gptforge.native.step import DecodeStep

    if not native.available():
        pytest.skip("the native kernels could not be built here")
    moved = native.decode_layout(copy.deepcopy(model))
    calls, call = [], DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, ids, *a: calls.append(len(ids)) or call(self, ids, *a))
    jobs = [(p, dict(temperature=0, max_new_tokens=10)) for p in ("abc", "b", "cabbage cab")]
    jobs.append(("a", dict(temperature=0.9, seed=3, max_new_tokens=8)))
    engine = BatchEngine(moved, byte_tok, max_batch=4)
    toks, texts = run_engine(engine, [(byte_tok.encode(p), SamplingParams(stop_at_eos=False, **o)) for p, o in jobs])
    assert max(calls) > 1  # steps of several rows, each at its own slot
    for (p, o), t, text in zip(jobs, toks, texts):
        ref = complete(moved, byte_tok, [p], stop_at_eos=False, **o)[0]
        assert t == ref.token_ids and text == ref.text


def test_engine_cancel_and_limits(model, byte_tok, one_thread):
    engine = BatchEngine(model, byte_tok, max_batch=2)
    p = SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=False)
    a, b = engine.add([1, 2, 3], p), engine.add([4, 5], p)
    with pytest.raises(GptforgeError, match="0 of 2 rows free"):
        engine.add([6], p)
    engine.step()
    assert engine.cancel(a) and not engine.cancel(a) and engine.live == 1
    # The freed row is reused; the survivor (moved into row 0) decodes on unchanged.
    c = engine.add([7, 8], p)
    out = {b: [], c: []}
    while engine.live:
        for ev in engine.step():
            out[ev.seq].append(ev.token)
    alone = tokens(generate_steps(model, [[4, 5]], p, vocab_size=byte_tok.vocab_size))[0]
    assert out[b] == alone[1:] and out[c] == tokens(generate_steps(model, [[7, 8]], p, vocab_size=byte_tok.vocab_size))[0]
    with pytest.raises(GptforgeError, match="nothing to generate"):
        engine.add(list(range(1, 65)), p)  # fills the 64-token context


def test_engine_prefills_a_wave_of_prompts_in_one_forward(model, byte_tok, one_thread):
    # Right-padded prompts of different lengths, prefilled together into a batch already running.
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [5, 8, 9, 7, 9], [1]]
    p = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False, logprobs=True)
    engine = BatchEngine(model, byte_tok, max_batch=6)
    first = engine.add([7, 7, 7], p)
    engine.step()
    seqs = engine.add_many([(q, p, ()) for q in prompts])
    out = {s: [] for s in [first] + seqs}
    while engine.live:
        for ev in engine.step():
            out[ev.seq].append(ev.token)
    for s, q in zip(seqs, prompts):
        assert out[s] == tokens(generate_steps(model, [q], p, vocab_size=byte_tok.vocab_size))[0]


def test_engine_emit_gets_the_step_events_before_its_forward(model, byte_tok, one_thread):
    engine = BatchEngine(model, byte_tok, max_batch=4)
    p = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eos=False)
    for q in ([1, 2, 3], [4], [5, 6]):
        engine.add(q, p)
    forwards = []
    inner = engine.model.forward
    engine.model.forward = lambda *a, **k: (forwards.append(1), inner(*a, **k))[1]
    try:
        while engine.live:
            seen = []
            n_before = len(forwards)

            def emit(evs):
                seen.append((list(evs), len(forwards)))

            events = engine.step(emit=emit)
            if events:  # once, with exactly the returned events, before any forward of the step's decode
                assert len(seen) == 1 and seen[0][0] == events
                assert seen[0][1] <= n_before + 1  # at most the prefill ran before it, never the decode forward
            else:
                assert seen == []
    finally:
        engine.model.forward = inner


def test_a_generation_frees_its_cache_when_it_ends_without_a_cyclic_collection(model):
    """The cache's layers refer to it weakly: no reference cycle keeps a finished generation's keys and values
    alive until the garbage collector's next full pass (repeated generate calls kept every cache before)."""
    import gc

    from gptforge.kvcache import KVCache

    p = SamplingParams(max_new_tokens=4, temperature=0)
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            list(generate_steps(model, [[1, 2, 3], [4]], p, vocab_size=500))
        live = [o for o in gc.get_objects() if isinstance(o, KVCache)]
    finally:
        gc.enable()
    assert live == []
