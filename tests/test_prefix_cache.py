"""Automatic prefix caching (prefix_cache.py, BatchEngine): a prompt's cached blocks are copied, the rest prefilled,
and what is decoded equals what the engine decodes without the cache: greedy and seeded, alone and batched,
partial-block hits, whole-prompt hits, eviction; through the real server too, with usage's cached_tokens."""

from __future__ import annotations

import random

import pytest
import torch

from gptforge.config import ModelConfig, RunConfig
from gptforge.engine import BatchEngine
from gptforge.errors import GptforgeError
from gptforge.kvcache import KVCache
from gptforge.model import GPT
from gptforge.prefix_cache import BLOCK, PrefixCache
from gptforge.sampling import SamplingParams
from gptforge.tokenizer import Tokenizer

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, stop_at_eos=False, logprobs=True)
SEEDED = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=50, seed=5, stop_at_eos=False, logprobs=True)


@pytest.fixture(scope="module", params=["learned", "rotary"])
def model(request):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=264, block_size=256)
    if request.param == "rotary":  # the demo's variant: rotary positions, RMSNorm, SwiGLU, GQA, no biases
        cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=264, block_size=256,
                          pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", bias=False)
    torch.set_num_threads(1)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["abc"], vocab_size=264)  # bytes only: ids are whatever the tests write


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 256) for _ in range(n)]


SYSTEM = ids(0, 40)  # a shared opening: two whole blocks and 8 tokens


def drive(engine: BatchEngine, waves: list[list[tuple[list[int], SamplingParams]]]):
    """Each wave added at once (add_many), then stepped until it is done: tokens, logprobs and cached_tokens
    per sequence, in the order added."""
    toks, lps, cached, order = {}, {}, {}, []
    for wave in waves:
        order += engine.add_many([(p, sp, ()) for p, sp in wave])
        while engine.live:
            for ev in engine.step():
                toks.setdefault(ev.seq, []).append(ev.token)
                lps.setdefault(ev.seq, []).append(ev.logprob)
                cached[ev.seq] = ev.cached_tokens
    return [toks[s] for s in order], [lps[s] for s in order], [cached[s] for s in order]


def same(a, b):
    """The same ids, and the same distributions to float rounding (a cached key was computed in another chunk)."""
    assert a[0] == b[0]
    diff = max(abs(x - y) for xs, ys in zip(a[1], b[1]) for x, y in zip(xs, ys))
    assert diff < 1e-4, diff


# --- the store ------------------------------------------------------------------------------------------------
def filled_cache(model, tokens: list[int]) -> KVCache:
    """A one-row cache holding `tokens`, prefilled in one forward."""
    cache = KVCache(model.config, 1, model.config.block_size, device=torch.device("cpu"), dtype=torch.float32,
                    static=False)
    cache.prepare(torch.arange(len(tokens)), None, end=len(tokens))
    with torch.no_grad():
        model(torch.tensor([tokens]), torch.arange(len(tokens)), cache)
    return cache


def test_blocks_are_keyed_by_the_whole_prefix(model):
    a = SYSTEM + ids(1, 20)  # 60 tokens: 3 whole blocks
    cache = filled_cache(model, a)
    pc = PrefixCache(1024)
    pc.insert(a, cache, 0)
    assert pc.tokens == 3 * BLOCK
    assert pc.match(a, len(a)) == 48 and pc.match(a, 47) == 32 and pc.match(a[:20], 20) == 16
    changed = list(a)
    changed[20] += 1  # inside block 1: block 0 still matches
    assert pc.match(changed, 60) == 16
    changed = list(a)
    changed[0] += 1  # block 0 differs: blocks 1 and 2, though the same tokens, belong to another prefix
    assert pc.match(changed, 60) == 0
    parts = pc.lookup(a, 40)  # what comes back is the row's keys and values, bit for bit
    assert [p.shape[2] for p in parts] == [32, 32]
    for got, want in zip(parts, cache.span(0, 0, 32)):
        assert torch.equal(got, want)
    assert pc.hit_tokens == 32


def test_the_lru_bound_evicts_tails_first_and_keeps_no_orphan(model):
    x, y, z = SYSTEM + ids(2, 30), ids(3, 40), ids(4, 40)  # 4, 2 and 2 blocks
    pc = PrefixCache(5 * BLOCK)
    pc.insert(x, filled_cache(model, x), 0)
    pc.insert(y, filled_cache(model, y), 0)  # 6 > 5: x's last block goes (a leaf), never its head
    assert pc.tokens <= 5 * BLOCK and pc.match(x, 70) == 3 * BLOCK and pc.match(y, 40) == 2 * BLOCK
    pc.lookup(x, 70)  # x used again: y is now the least recently used
    pc.insert(z, filled_cache(model, z), 0)
    assert pc.match(y, 40) == 0 and pc.match(x, 70) == 3 * BLOCK and pc.match(z, 40) == 2 * BLOCK
    assert pc.tokens == 5 * BLOCK
    for e in pc.blocks.values():  # every block's parent is still there: nothing unreachable is kept
        assert e.parent is None or e.parent.key in pc.blocks


# --- the engine -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [None, 5])
def test_cache_on_decodes_what_cache_off_decodes(model, tok, budget):
    turn1 = SYSTEM + ids(5, 20)  # 60 tokens: 3 whole blocks; with its reply's 7 fed ids, 4
    waves = [
        [(turn1, GREEDY)],  # a miss
        [(SYSTEM + ids(6, 25), GREEDY), (SYSTEM + ids(7, 3), SEEDED)],  # partial hits: 32 of the 40 shared tokens
        [(SYSTEM + ids(8, 30), SEEDED), (SYSTEM + ids(8, 30), GREEDY), (ids(9, 20), GREEDY)],  # a batch, one miss
        [(SYSTEM[:32], GREEDY)],  # a prompt wholly cached: its last token is still prefilled (16 of 32 reused)
        [(SYSTEM[:33], SEEDED)],  # 32 reused, 1 prefilled
    ]
    off = drive(BatchEngine(model, tok, max_batch=4, max_prefill_tokens=budget), waves)
    on = BatchEngine(model, tok, max_batch=4, max_prefill_tokens=budget, prefix_cache_tokens=4096)
    got = drive(on, waves)
    same(got, off)
    assert off[2] == [0] * 8
    # The second of two equal prompts in one wave waits one forward, then takes 64 tokens the first computed.
    assert got[2] == [0, 32, 32, 32, 64, 0, 16, 32]
    # A chat's next turn: the last conversation resent whole, the reply it got included, then a new message.
    reply = got[0][0]
    turn2 = turn1 + reply[:-1] + ids(10, 12)  # the reply's last id was sampled, never fed: not in the cache
    again = drive(on, [[(turn2, GREEDY)]])
    same(again, drive(BatchEngine(model, tok, max_batch=4, max_prefill_tokens=budget), [[(turn2, GREEDY)]]))
    assert again[2] == [(len(turn1) + len(reply) - 1) // BLOCK * BLOCK] == [64]  # the reply's blocks too


def test_a_batch_sharing_a_prefix_prefills_it_once(model, tok):
    engine = BatchEngine(model, tok, max_batch=4, prefix_cache_tokens=4096)
    forwards = []
    inner = engine.model.forward
    engine.model.forward = lambda idx, *a, **k: (forwards.append(tuple(idx.shape)), inner(idx, *a, **k))[1]
    try:
        engine.add_many([(SYSTEM + ids(11 + i, 20), GREEDY, ()) for i in range(3)])
    finally:
        engine.model.forward = inner
    # The first prompt alone (60 tokens), then the two others together, each from slot 32 (their own tokens
    # start at 40: block 2 differs): 28 tokens each.
    assert forwards == [(1, 60), (2, 28)]
    assert [s.cached for s in engine.rows] == [0, 32, 32]


def test_eviction_keeps_outputs_exact(model, tok):
    p = [ids(20 + i, 45) for i in range(4)]  # 45 tokens, 52 with the reply fed: 3 blocks each
    prompts = p + [p[3], p[2], p[0]]  # the bound holds two of them: the latest two
    waves = [[(p, GREEDY)] for p in prompts]
    off = drive(BatchEngine(model, tok, max_batch=2), waves)
    engine = BatchEngine(model, tok, max_batch=2, prefix_cache_tokens=6 * BLOCK)
    got = drive(engine, waves)
    same(got, off)
    assert engine.prefix.tokens <= 6 * BLOCK
    assert got[2] == [0, 0, 0, 0, 32, 32, 0]  # p3 and p2 hit (at most 44 of 45 tokens: 2 blocks); p0 is gone


def test_bad_bound_is_a_clear_error(model, tok):
    with pytest.raises(GptforgeError, match="prefix_cache_tokens must be >= 0"):
        BatchEngine(model, tok, max_batch=2, prefix_cache_tokens=-1)


# --- through the server ---------------------------------------------------------------------------------------
def test_the_server_reports_cached_tokens_and_answers_as_without_the_cache(tmp_path_factory):
    from serverproc import Server

    from gptforge.checkpoint import write_checkpoint

    text = ["the quick brown fox jumps over the lazy dog. " * 40, "to be or not to be, that is the question. " * 40]
    tok = Tokenizer.train(text, vocab_size=320)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=384, block_size=512)
    torch.manual_seed(0)
    ckpt = write_checkpoint(tmp_path_factory.mktemp("pc") / "tiny", RunConfig(model=cfg), tok,
                            model_state=GPT(cfg).state_dict())
    logs = tmp_path_factory.mktemp("log")
    system = {"role": "system", "content": "you answer as the fox would, over the lazy dog, to be or not. " * 3}
    turn1 = [system, {"role": "user", "content": "the quick brown fox?"}]

    def session(server) -> list:
        client, out = server.client(), []
        for kw in ({"temperature": 0}, {"temperature": 0.9, "seed": 3}):  # a miss, then the same prompt: a hit
            r = client.chat.completions.create(model="tiny", messages=turn1, max_tokens=12, **kw)
            usage = r.usage
            out.append((r.choices[0].message.content, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens))
        turn2 = turn1 + [{"role": "assistant", "content": out[0][0]}, {"role": "user", "content": "and the dog?"}]
        chunks = list(client.chat.completions.create(model="tiny", messages=turn2, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        out.append(("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), usage.prompt_tokens,
                    usage.prompt_tokens_details.cached_tokens))
        r = client.completions.create(model="tiny", prompt=system["content"] + " lazy", max_tokens=10, n=2,
                                      temperature=0.8, seed=9)  # two choices of one prompt: counted once
        out.append(([c.text for c in r.choices], r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
        return out

    results, metric = [], []
    for i, args in enumerate([("--max-prefill-tokens", "8"), ("--prefix-cache-tokens", "0")]):
        server = Server(ckpt, logs / f"server{i}.log", "--model-name", "tiny", *args)
        try:
            results.append(session(server))
            metric.append(server.metric("gptforge_prompt_tokens_cached_total"))
        finally:
            assert server.stop() == 0
    on, off = results
    assert [r[:2] for r in on] == [r[:2] for r in off]  # the same texts and prompt counts
    assert [r[2] for r in off] == [0, 0, 0, 0]
    first, again, turn2, choices = on
    assert first[2] == 0 and again[2] == (again[1] - 1) // BLOCK * BLOCK > 0  # all but the last partial block
    assert turn2[2] >= first[1] // BLOCK * BLOCK  # the whole first turn at least
    assert 0 < choices[2] < choices[1]
    # /metrics counts each sequence's: the two choices of the last request apart
    assert metric == [again[2] + turn2[2] + choices[2], 0]


def test_a_sliding_window_model_decodes_the_same(tok):
    # Mistral's window: the copied keys sit at their positions, and the mask hides those out of the window.
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=264, block_size=256,
                            pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", bias=False, sliding_window=24)).eval()
    waves = [[(SYSTEM + ids(30, 20), GREEDY)], [(SYSTEM + ids(31, 9), SEEDED), (SYSTEM + ids(30, 20), GREEDY)]]
    got = drive(BatchEngine(model, tok, max_batch=2, prefix_cache_tokens=1024), waves)
    same(got, drive(BatchEngine(model, tok, max_batch=2), waves))
    assert got[2] == [0, 32, 48]


def test_each_lora_adapter_has_its_own_blocks(tmp_path):
    # Keys and values depend on a row's adapter: the same prompt through the base and an adapter shares nothing.
    from test_serve_adapters import CFG, TEXT, make_adapter

    from gptforge.checkpoint import write_checkpoint
    from gptforge.config import LoRAConfig
    from gptforge.serve.adapters import load_with_adapters

    tok = Tokenizer.train(TEXT, vocab_size=320)
    torch.manual_seed(0)
    base = write_checkpoint(tmp_path / "base", RunConfig(model=CFG), tok, model_state=GPT(CFG).state_dict())
    a = make_adapter(tmp_path / "a", base, tok, LoRAConfig(rank=4, alpha=8.0), seed=1)
    model, tok, aset = load_with_adapters(base, [("a", str(a))], "cpu", "float32")
    prompt = tok.encode(TEXT[0][:150])
    assert len(prompt) > 2 * BLOCK

    def run(prefix_cache_tokens: int):
        engine = BatchEngine(model, tok, 2, prefix_cache_tokens=prefix_cache_tokens, adapters=aset)
        out = []
        for rows in ([-1, 0], [0, -1]):
            seqs = engine.add_many([(prompt, GREEDY, ())] * 2, adapters=rows)
            got = {s: [] for s in seqs}
            cached = {}
            while engine.live:
                for ev in engine.step():
                    got[ev.seq].append(ev.token)
                    cached[ev.seq] = ev.cached_tokens
            out.append(([got[s] for s in seqs], [cached[s] for s in seqs]))
        return out

    on, off = run(4096), run(0)
    assert [t for t, _ in on] == [t for t, _ in off]
    assert on[0][0][0] != on[0][0][1]  # the adapter changes what is decoded
    hit = (len(prompt) - 1) // BLOCK * BLOCK
    assert [c for _, c in on] == [[0, 0], [hit, hit]]  # each adapter's own blocks, none of the other's
