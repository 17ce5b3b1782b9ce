"""The OpenAI-compatible server: a real `gptforge serve` process on a free loopback port, driven by the official
`openai` client (and raw httpx for malformed requests). Texts are compared with the in-process engine, so the
server is shown to add scheduling and accounting, not a decoder of its own."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptforge.checkpoint import write_checkpoint
from gptforge.config import ModelConfig, RunConfig
from gptforge.engine import BatchEngine
from gptforge.errors import GptforgeError
from gptforge.generate import complete, load
from gptforge.model import GPT
from gptforge.sampling import SamplingParams
from gptforge.serve import ServeConfig
from gptforge.tokenizer import EOS, Tokenizer
from serverproc import KEY, Server

TEXT = ["the quick brown fox jumps over the lazy dog. " * 40, "to be or not to be, that is the question. " * 40]


def make_checkpoint(dest: Path, tokenizer: Tokenizer, cfg: ModelConfig) -> Path:
    torch.manual_seed(0)
    return write_checkpoint(dest, RunConfig(model=cfg), tokenizer, model_state=GPT(cfg).state_dict())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny 2-layer model with a long context (long generations stay cheap) and a chat-capable tokenizer."""
    tok = Tokenizer.train(TEXT, vocab_size=320)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=384, block_size=1024)
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", tok, cfg)




@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    # A prefill budget smaller than most prompts: every test below also runs through chunked prefill.
    s = Server(ckpt, tmp_path_factory.mktemp("log") / "server.log", "--model-name", "tiny", "--api-key", KEY,
               "--max-batch", "8", "--max-prefill-tokens", "3")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def engine_ref(ckpt):
    """The same checkpoint in this process, for what the engine decodes alone."""
    torch.set_num_threads(1)
    return load(ckpt)


def ask(client, prompt="the quick", **kw):
    kw = {"max_tokens": 20, "temperature": 0, **kw}
    return client.completions.create(model="tiny", prompt=prompt, **kw)


def ask_stream(client, prompt="the quick", **kw):
    kw = {"max_tokens": 20, "temperature": 0, **kw}
    texts, finish = {}, {}
    for chunk in client.completions.create(model="tiny", prompt=prompt, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish


# --- endpoints and fields -----------------------------------------------------------------------------------
def test_models_health_and_a_greedy_completion_equal_to_the_engine(server, engine_ref):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    model, tok = engine_ref
    r = ask(client, "the quick", max_tokens=24)
    ref = complete(model, tok, ["the quick"], max_new_tokens=24, temperature=0)[0]
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(tok.encode("the quick"))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    texts, finish = ask_stream(client, "the quick", max_tokens=24)
    assert texts == {0: ref.text} and finish == {0: ref.finish_reason}


def test_seeded_sampling_is_reproducible_and_n_choices_use_seed_plus_index(server, engine_ref):
    client = server.client()
    opts = dict(temperature=1.0, top_p=0.95, max_tokens=24, seed=11, presence_penalty=0.3)
    a, b = ask(client, "to be", **opts), ask(client, "to be", **opts)
    assert a.choices[0].text == b.choices[0].text
    model, tok = engine_ref
    ref = complete(model, tok, ["to be"], max_new_tokens=24, temperature=1.0, top_p=0.95, seed=11,
                   presence_penalty=0.3)[0]
    assert a.choices[0].text == ref.text
    assert ask(client, "to be", **{**opts, "seed": 12}).choices[0].text != a.choices[0].text
    many = ask(client, "to be", n=3, **opts)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [ask(client, "to be", **{**opts, "seed": 11 + j}).choices[0].text
                                              for j in range(3)]
    assert many.usage.prompt_tokens == a.usage.prompt_tokens  # the prompt counts once
    texts, _ = ask_stream(client, "to be", n=3, **opts)
    assert [texts[i] for i in range(3)] == [c.text for c in many.choices]


def test_stop_strings_cut_the_text_streaming_or_not(server):
    client = server.client()
    full = ask(client, "lazy dog", max_tokens=40).choices[0].text
    stop = full[12:14]
    want = full[: full.find(stop)]
    r = ask(client, "lazy dog", max_tokens=40, stop=[stop, "\x00never"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert ask_stream(client, "lazy dog", max_tokens=40, stop=stop) == ({0: want}, {0: "stop"})


def test_logprobs_and_token_prompts(server, engine_ref):
    client = server.client()
    model, tok = engine_ref
    r = ask(client, "the quick", max_tokens=6, logprobs=2)
    ref = complete(model, tok, ["the quick"], max_new_tokens=6, temperature=0, logprobs=True, top_logprobs=2)[0]
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert [len(t) for t in lp.top_logprobs] == [2] * 6  # (distinct token strings)
    assert "".join(lp.tokens) == r.choices[0].text
    # A prompt given as token ids decodes the same as its text.
    assert ask(client, tok.encode("the quick"), max_tokens=6).choices[0].text == r.choices[0].text


def test_chat_streaming_and_not(server):
    client = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "to be or not"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                       logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length") and r.object == "chat.completion"
    tok = Tokenizer.load(server_ckpt(server) / "tokenizer.json")
    assert r.usage.prompt_tokens == len(tok.encode_chat(messages, add_generation_prompt=True)[0])
    assert len(c.logprobs.content) == r.usage.completion_tokens - (c.finish_reason == "stop")
    assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices


def server_ckpt(server) -> Path:
    return Path(server.proc.args[4])


# --- continuous batching ------------------------------------------------------------------------------------
def test_concurrent_requests_produce_the_same_text_as_alone(server):
    client = server.client()
    prompts = ["the quick", "to be or", "question", "lazy", "brown fox jumps", "that is", "dog. to", "o"]
    greedy = dict(max_tokens=30)
    alone = [ask(client, p, **greedy).choices[0].text for p in prompts]
    seeded = ask(client, "the", temperature=0.9, seed=5, max_tokens=30).choices[0].text
    steps_before = server.metric("gptforge_decode_steps_total")
    tokens_before = server.metric("gptforge_completion_tokens_total")

    def one(i):
        if i == len(prompts):
            return ask(client, "the", temperature=0.9, seed=5, max_tokens=30).choices[0].text
        if i % 2:
            return ask_stream(client, prompts[i], **greedy)[0][0]
        return ask(client, prompts[i], **greedy).choices[0].text

    with ThreadPoolExecutor(len(prompts) + 1) as pool:
        together = list(pool.map(one, range(len(prompts) + 1)))
    assert together == alone + [seeded]
    # They shared decode steps: fewer steps than tokens generated.
    steps = server.metric("gptforge_decode_steps_total") - steps_before
    tokens = server.metric("gptforge_completion_tokens_total") - tokens_before
    assert steps < tokens / 2, (steps, tokens)


def test_client_disconnect_mid_stream_frees_its_slot(server):
    client = server.client()
    cancelled = server.metric('gptforge_sequences_finished_total{reason="cancelled"}')
    stream = client.completions.create(model="tiny", prompt="the", max_tokens=1000, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    for _ in range(100):
        if server.metric("gptforge_batch_live") == 0:
            break
        time.sleep(0.05)
    assert server.metric("gptforge_batch_live") == 0
    assert server.metric('gptforge_sequences_finished_total{reason="cancelled"}') == cancelled + 1
    assert ask(client, max_tokens=3).usage.completion_tokens == 3


# --- chunked prefill: the scheduler's prefill budget (BatchEngine max_prefill_tokens) --------------------------
class PrefillSpy:
    """Records the (rows, width) of every prefill forward an engine runs, and the step it ran in."""

    def __init__(self, engine):
        self.forwards: list[tuple[int, int, int]] = []  # (step, rows, width)
        self.steps = 0
        model, prefill = engine.model, engine._prefill
        self.inside = False

        def spy_model(idx, pos, cache, **kw):
            if self.inside:
                self.forwards.append((self.steps, *idx.shape))
            return model(idx, pos, cache, **kw)

        def spy_prefill(budget):
            self.inside = True
            try:
                prefill(budget)
            finally:
                self.inside = False

        engine.model, engine._prefill = spy_model, spy_prefill


def drive(engine, waves, spy=None):
    """Add each wave (a list of (ids, params)) at its step while stepping; tokens and logprobs per sequence, in
    the order added, and whether a row retired while another was partly prefilled."""
    order, toks, lps, retired_mid_prefill, step = [], {}, {}, False, 0
    while waves or engine.live:
        if waves and waves[0][0] == step:
            order += engine.add_many([(ids, p, ()) for ids, p in waves.pop(0)[1]])
        events = engine.step()
        for ev in events:
            toks.setdefault(ev.seq, []).append(ev.token)
            lps.setdefault(ev.seq, []).append(ev.logprob)
        # A step prefills, then retires: a prompt still partly prefilled after it was so during the retire.
        partial = bool(engine.filling) and engine.filling[0].length > 0
        retired_mid_prefill |= partial and any(ev.finish_reason for ev in events)
        step += 1
        if spy:
            spy.steps = step
    return [toks[s] for s in order], [lps[s] for s in order], retired_mid_prefill


def engine_waves(tok):
    """Two sequences decoding (one for 60 tokens, one for 5: it retires while the wave below is half
    prefilled), then a wave of four prompts of 20 to 150 tokens, greedy and seeded, then one more prompt."""
    text = TEXT[0] + TEXT[1]
    greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False, logprobs=True)
    seeded = SamplingParams(max_new_tokens=9, temperature=0.9, top_k=40, seed=11, stop_at_eos=False, logprobs=True)
    long = SamplingParams(max_new_tokens=60, temperature=0, stop_at_eos=False, logprobs=True)
    short = SamplingParams(max_new_tokens=5, temperature=0.8, seed=2, stop_at_eos=False, logprobs=True)
    ids = [tok.encode(text[i * 37: i * 37 + n]) for i, n in enumerate([9, 12, 400, 160, 600, 80, 250])]
    return [(0, [(ids[0], long), (ids[1], short)]),
            (1, [(ids[2], greedy), (ids[3], seeded), (ids[4], short), (ids[5], greedy)]),
            (4, [(ids[6], seeded)])]


def waves_0(tok):
    return engine_waves(tok)[0][1]


@pytest.mark.parametrize("budget", [1, 7, 32])
def test_chunked_prefill_decodes_what_a_whole_prefill_decodes(engine_ref, budget):
    model, tok = engine_ref
    whole_toks, whole_lps, _ = drive(BatchEngine(model, tok, max_batch=8), engine_waves(tok))
    chunked = BatchEngine(model, tok, max_batch=8, max_prefill_tokens=budget)
    toks, lps, retired_mid_prefill = drive(chunked, engine_waves(tok))
    assert toks == whole_toks  # the same ids, greedy and seeded
    diff = max(abs(a - b) for xs, ys in zip(lps, whole_lps) for a, b in zip(xs, ys))
    assert diff < 1e-4, diff  # and the same distributions: chunks attend to the cached ones
    assert retired_mid_prefill  # the partly prefilled row moved down with the decoding rows, intact
    # And each sequence decodes what it decodes alone.
    for (_, wave) in [w for w in engine_waves(tok)]:
        for ids, p in wave:
            alone = complete(model, tok, [ids], **{f.name: getattr(p, f.name) for f in
                                                  dataclasses.fields(p)})[0].token_ids
            assert alone in toks


def test_the_prefill_budget_is_respected_per_step(engine_ref):
    model, tok = engine_ref
    budget = 16
    engine = BatchEngine(model, tok, max_batch=8, max_prefill_tokens=budget)
    spy = PrefillSpy(engine)
    waves = engine_waves(tok)
    prompt_tokens = sum(len(ids) for _, wave in waves[1:] for ids, _ in wave)
    drive(engine, waves, spy)
    first, *rest = spy.forwards
    # The first two arrive when nothing decodes: prefilled whole, in one forward, whatever the budget.
    assert first == (0, 2, max(len(ids) for ids, _ in waves_0(tok)))
    steps = [s for s, _, _ in rest]
    assert len(steps) == len(set(steps))  # at most one prefill forward per step...
    assert all(rows * width <= budget for _, rows, width in rest)  # ...of at most `budget` positions
    assert prompt_tokens > 300 and len(rest) >= prompt_tokens / budget  # so the wave took at least 20 steps
    assert sum(rows * width for _, rows, width in rest) <= 1.2 * prompt_tokens  # little of it padding


def test_the_budget_spreads_a_wave_of_prompts_over_steps(engine_ref):
    # Eight 24-token prompts join a running sequence: with no budget one forward of 8 x 24 positions stalls
    # it; with a budget of 24, each step prefills one prompt, and the first one decodes a step later.
    model, tok = engine_ref
    p = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False)
    prompts = [tok.encode(TEXT[i % 2][i: i + 200])[:24] for i in range(8)]
    for budget, forwards in [(None, [(1, 8, 24)]), (24, [(s, 1, 24) for s in range(1, 9)])]:
        engine = BatchEngine(model, tok, max_batch=9, max_prefill_tokens=budget)
        engine.add([1, 2, 3], p)
        engine.step()  # it decodes: from now on the budget applies
        spy = PrefillSpy(engine)
        live = []
        for step in range(1, 10):
            spy.steps = step
            if step == 1:
                engine.add_many([(q, p, ()) for q in prompts])
            live.append(len(engine.step()))
        assert spy.forwards == forwards
        assert live == ([9] * 9 if budget is None else [2, 3, 4, 5, 6, 7, 8, 9, 9])


def test_cancelling_a_sequence_mid_prefill_frees_its_row(engine_ref):
    model, tok = engine_ref
    p = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eos=False)
    engine = BatchEngine(model, tok, max_batch=2, max_prefill_tokens=4)
    a = engine.add([5, 6, 7], p)
    engine.step()
    b = engine.add(tok.encode(TEXT[0][:60]), p)
    engine.step()
    assert engine.filling[0].id == b and 0 < engine.filling[0].length < len(engine.filling[0].prompt)
    assert engine.free == 0 and engine.cancel(b) and engine.free == 1 and not engine.cancel(b)
    c = engine.add([9, 8], p)  # takes the row b had half written
    out = {a: [], c: []}
    while engine.live:
        for ev in engine.step():
            out[ev.seq].append(ev.token)
    assert out[c] == complete(model, tok, [[9, 8]], max_new_tokens=6, temperature=0, stop_at_eos=False)[0].token_ids
    assert len(out[a]) == 4


def test_prefill_budget_must_be_positive(engine_ref):
    model, tok = engine_ref
    with pytest.raises(GptforgeError, match="max_prefill_tokens must be >= 1"):
        BatchEngine(model, tok, max_batch=2, max_prefill_tokens=0)
    with pytest.raises(GptforgeError, match="--max-prefill-tokens"):
        ServeConfig(max_prefill_tokens=0)


# --- errors: the right status and body, and the server keeps serving -----------------------------------------
@pytest.mark.parametrize("path, body, key, status, param, code", [
    ("/v1/completions", '{"model": "tiny", "prompt": ', KEY, 400, None, "invalid_json"),
    ("/v1/completions", "[1, 2]", KEY, 400, None, "invalid_json"),
    ("/v1/completions", {"prompt": "x"}, KEY, 400, "model", "missing_field"),
    ("/v1/completions", {"model": "tiny"}, KEY, 400, "prompt", "missing_field"),
    ("/v1/chat/completions", {"model": "tiny"}, KEY, 400, "messages", "missing_field"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, KEY, 400, "temperature", "invalid_type"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": True}, KEY, 400, "max_tokens", "invalid_type"),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, KEY, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"model": "tiny", "prompt": [99999]}, KEY, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, KEY, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, KEY, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}, KEY, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 600, "max_tokens": 500}, KEY, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 1100}, KEY, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, KEY, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, KEY, 400, "stop", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, KEY, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"1": 5}}, KEY, 400, "logit_bias", "unsupported"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, KEY, 400,
     "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, KEY, 400, "messages", "invalid_type"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, KEY, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": "tiny", "prompt": "x"}, "wrong", 401, None, "invalid_api_key"),
    ("/v1/completions", {"model": "tiny", "prompt": "x"}, None, 401, None, "invalid_api_key"),
    ("/v1/nowhere", {}, KEY, 404, None, "not_found"),  # issue 19: no error answer has a null code
])
def test_bad_requests_get_the_right_status_and_error_body(server, path, body, key, status, param, code):
    r = server.post(path, body, key)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code
    assert ask(server.client(), max_tokens=2).usage.completion_tokens == 2  # still serving


def test_openai_client_raises_its_typed_errors(server):
    with pytest.raises(openai.AuthenticationError):
        ask(server.client(key="nope"))
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024"):
        ask(server.client(), "x", max_tokens=1024)


def test_metrics_count_requests_tokens_and_latencies(server):
    before = server.metric('gptforge_requests_total{endpoint="/v1/completions",status="200"}')
    tokens = server.metric("gptforge_completion_tokens_total")
    ttft = server.metric("gptforge_time_to_first_token_seconds_count")
    ask(server.client(), max_tokens=5)
    for name in ("a", "b"):  # one label for the route, however many names are asked for
        assert httpx.get(f"{server.url}/v1/models/{name}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert server.metric('gptforge_requests_total{endpoint="/v1/completions",status="200"}') == before + 1
    assert server.metric("gptforge_completion_tokens_total") == tokens + 5
    assert server.metric("gptforge_time_to_first_token_seconds_count") == ttft + 1
    assert server.metric('gptforge_requests_total{endpoint="/v1/models/{name:path}",status="404"}') >= 2
    text = httpx.get(server.url + "/metrics").text
    for family in ("gptforge_inter_token_latency_seconds_bucket", "gptforge_batch_size_bucket", "gptforge_queue_depth"):
        assert family in text


# --- limits: a 1-row server with a short deadline, a small body limit and no chat template --------------------
@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A slower model (so a generation outlasts the deadline) behind a tokenizer without chat tokens."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(hf)
    assert not tok.has_chat_template
    cfg = ModelConfig(n_layer=8, n_head=4, d_model=256, vocab_size=320, block_size=2048)
    path = make_checkpoint(tmp_path_factory.mktemp("limited") / "plain", tok, cfg)
    s = Server(path, tmp_path_factory.mktemp("log") / "limited.log", "--max-batch", "1", "--max-queue", "1",
               "--request-timeout", "2.0", "--max-body-bytes", "2000")
    yield s
    assert s.stop() == 0


def test_no_chat_template_and_body_too_large(limited):
    r = limited.post("/v1/chat/completions", {"model": "plain", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
    r = limited.post("/v1/completions", {"model": "plain", "prompt": "x" * 3000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = limited.post("/v1/completions", {"model": "plain", "prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_full_queue_gets_429_and_the_deadline_cancels(limited):
    client = limited.client()
    # A holds the only row; B waits in the queue (its only place); C finds the queue full.
    stream = client.completions.create(model="plain", prompt="the", max_tokens=2000, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    b = {}
    thread = threading.Thread(target=lambda: b.update(r=limited.post(
        "/v1/completions", {"model": "plain", "prompt": "to", "max_tokens": 1})))
    thread.start()
    for _ in range(100):
        if httpx.get(limited.url + "/health").json()["waiting"] == 1:
            break
        time.sleep(0.02)
    r = limited.post("/v1/completions", {"model": "plain", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
    # A outlives --request-timeout 2: the stream ends with OpenAI's error event, which the client raises.
    with pytest.raises(openai.APIError, match="request-timeout"):
        for _ in it:
            pass
    thread.join()
    assert b["r"].status_code in (200, 504)  # B either ran once A's row was freed, or its own deadline came first
    assert limited.metric('gptforge_sequences_finished_total{reason="timeout"}') >= 1
    assert limited.metric("gptforge_batch_live") == 0
    r = limited.post("/v1/completions", {"model": "plain", "prompt": "x", "max_tokens": 2000, "ignore_eos": True})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_client_that_gives_up_on_a_non_streamed_answer_frees_its_slot(limited):
    cancelled = limited.metric('gptforge_sequences_finished_total{reason="cancelled"}')
    with pytest.raises(httpx.ReadTimeout):  # the client stops waiting long before 2000 tokens or the deadline
        limited.post("/v1/completions", {"model": "plain", "prompt": "a", "max_tokens": 2000, "ignore_eos": True},
                     timeout=0.2)
    for _ in range(100):
        if limited.metric("gptforge_batch_live") == 0:
            break
        time.sleep(0.02)
    assert limited.metric('gptforge_sequences_finished_total{reason="cancelled"}') == cancelled + 1
    assert limited.metric("gptforge_batch_live") == 0


# --- shutdown -----------------------------------------------------------------------------------------------
def test_sigterm_finishes_in_flight_streams_then_exits_cleanly(ckpt, tmp_path):
    s = Server(ckpt, tmp_path / "log", "--shutdown-timeout", "20")
    try:
        stream = s.client().completions.create(model="tiny", prompt="the", max_tokens=300, stream=True,
                                               extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        s.proc.send_signal(signal.SIGTERM)
        finish = None
        for chunk in it:  # the stream in flight runs to its end
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        assert s.proc.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health")
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
        s.log.close()


def test_sigterm_answers_requests_on_open_keep_alive_connections(ckpt, tmp_path):
    # Issue 19: a request on a keep-alive connection opened before SIGTERM gets its answer or the documented
    # 503 JSON (with Connection: close), never a connection closed without a response.
    s = Server(ckpt, tmp_path / "log", "--shutdown-timeout", "20")
    held = [httpx.Client(base_url=s.url, timeout=30, limits=httpx.Limits(max_connections=1)) for _ in range(4)]
    body = {"model": "tiny", "prompt": "the", "max_tokens": 2}
    try:
        assert all(c.get("/health").status_code == 200 for c in held)  # each holds an idle open connection
        stream = s.client().completions.create(model="tiny", prompt="the", max_tokens=300, stream=True,
                                               extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        s.proc.send_signal(signal.SIGTERM)
        answers = [held[0].post("/v1/completions", json=body)]  # at once: served or refused, either is fine
        time.sleep(0.3)  # past uvicorn's 0.1 s tick: the server drains now
        answers += [c.post("/v1/completions", json=body) for c in held[1:]]
        for r in answers:
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "shutting_down" and r.headers["connection"] == "close"
        assert [r.status_code for r in answers[1:]] == [503] * 3
        finish = None
        for chunk in it:  # the stream in flight still runs to its end
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        assert s.proc.wait(timeout=30) == 0
    finally:
        for c in held:
            c.close()
        if s.proc.poll() is None:
            s.proc.kill()
        s.log.close()


def test_accepted_connections_have_nagle_off():
    """The listening socket names IPPROTO_TCP, so asyncio (uvicorn's transport) sets TCP_NODELAY on every accepted
    connection. With proto 0 it did not, and Nagle held each response's second write for the client's delayed
    ACK: every request took ~44 ms more (measured: a 1-token completion 48 ms -> 4 ms)."""
    import asyncio
    import socket

    from gptforge.serve.app import _bind

    sock = _bind("127.0.0.1", 0)
    seen = []

    async def main():
        def on_connect(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert seen and seen[0] != 0
