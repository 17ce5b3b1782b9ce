"""Structured output on a real `gptforge serve`, driven by the official `openai` client: `response_format` JSON mode
and JSON schemas, `guided_regex` and `guided_choice`, on both endpoints, streamed and not. The model is an untrained
2-layer one: whatever it says, the grammar (llguidance) must hold every choice to the schema, which `jsonschema`,
a validator independent of the grammar library, checks."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gptforge.serve import RequestParser, ServeConfig
from gptforge.serve import grammar as grammar_mod
from gptforge.serve.protocol import APIError
from gptforge.tokenizer import Tokenizer
from serverproc import Server
from test_serve import TEXT, make_checkpoint

llguidance = pytest.importorskip("llguidance", reason="the grammar library: pip install 'gptforge[structured]'")
jsonschema = pytest.importorskip("jsonschema", reason="the independent validator: pip install 'gptforge[test]'")

from gptforge.config import ModelConfig  # noqa: E402

# Bounded schemas (maxLength, maximum, maxItems): an untrained model rarely closes a free string by itself.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["king", "queen", "fool"]},
        "alive": {"type": "boolean"},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "alive", "home"],
    "additionalProperties": False,
}
LISTS = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 9}, "maxItems": 3},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
    },
    "required": ["tags", "scores", "note"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
              "minItems": 2, "maxItems": 2}},
        "required": ["c"], "additionalProperties": False}}, "required": ["b"], "additionalProperties": False},
        "ok": {"const": True}},
    "required": ["a", "ok"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "lists": LISTS, "nested": NESTED}
MESSAGES = [{"role": "user", "content": "to be or not to be"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = Tokenizer.train(TEXT, vocab_size=320)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=384, block_size=1024)
    return make_checkpoint(tmp_path_factory.mktemp("structured") / "tiny", tok, cfg)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    # A small prefill budget: constrained rows share steps with rows still prefilling.
    s = Server(ckpt, tmp_path_factory.mktemp("log") / "server.log", "--model-name", "tiny",
               "--max-batch", "8", "--max-prefill-tokens", "8")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client(None)


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def stream_chat(client, **kw) -> tuple[str, str]:
    text, finish = "", None
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def test_json_mode_parses_on_both_endpoints(client):
    for seed in range(4):
        chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=300, seed=seed,
                                              response_format={"type": "json_object"}, temperature=1.5)
        done = client.completions.create(model="tiny", prompt="the quick", max_tokens=300, seed=seed,
                                         extra_body={"response_format": {"type": "json_object"}}, temperature=1.5)
        for text, finish in ((chat.choices[0].message.content, chat.choices[0].finish_reason),
                             (done.choices[0].text, done.choices[0].finish_reason)):
            if finish == "stop":  # a free-form object can be cut by max_tokens ("length"): see docs/serve.md
                assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_output_always_validates(client, name):
    schema = SCHEMAS[name]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=400, n=4, seed=3,
                                       temperature=1.0, response_format=schema_format(schema))
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), schema)
    done = client.completions.create(model="tiny", prompt="to be", max_tokens=400, n=2, seed=4, temperature=1.0,
                                     extra_body={"response_format": schema_format(schema)})
    for c in done.choices:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


def test_streaming_equals_non_streaming(client):
    kw = dict(max_tokens=400, seed=11, temperature=1.0, response_format=schema_format(PERSON))
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, **kw).choices[0]
    text, finish = stream_chat(client, **kw)
    assert (text, finish) == (whole.message.content, whole.finish_reason)
    jsonschema.validate(json.loads(text), PERSON)


def test_regex_and_choice_are_honoured(client):
    pattern = r"[0-9]{3}-[a-c]{2,4}( act [IVX]+)?"
    choices = ["yes", "no", "a \"quoted\" maybe"]
    for seed in range(3):
        r = client.completions.create(model="tiny", prompt="the quick", max_tokens=30, seed=seed, temperature=1.0,
                                      n=2, extra_body={"guided_regex": pattern})
        for c in r.choices:
            assert re.fullmatch(pattern, c.text), c.text
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, seed=seed, n=3,
                                           temperature=1.0, extra_body={"guided_choice": choices})
        for c in r.choices:
            assert c.message.content in choices and c.finish_reason == "stop"


def test_max_tokens_mid_json_is_length(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, seed=0,
                                       response_format=schema_format(PERSON))
    c = r.choices[0]
    text = c.message.content  # a prefix of the schema's layout, cut off: not JSON yet
    assert c.finish_reason == "length" and text and ('{"name":"'.startswith(text) or text.startswith('{"name":"'))
    with pytest.raises(ValueError):
        json.loads(text)


def test_a_batch_mixes_constrained_and_free_rows(client):
    """Free requests decode exactly as alone while constrained ones share their batch."""
    free = dict(model="tiny", prompt="to be or not", max_tokens=24, temperature=0)
    alone = client.completions.create(**free).choices[0].text
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.completions.create, **free) for _ in range(3)]
        futures += [pool.submit(client.chat.completions.create, model="tiny", messages=MESSAGES, max_tokens=400,
                                seed=s, temperature=1.0, response_format=schema_format(LISTS)) for s in range(3)]
        results = [f.result() for f in futures]
    assert [r.choices[0].text for r in results[:3]] == [alone] * 3
    for r in results[3:]:
        jsonschema.validate(json.loads(r.choices[0].message.content), LISTS)


def test_an_unsupported_schema_is_a_400_naming_it(server):
    cases = [
        (schema_format({"type": "object", "not": {"required": ["a"]}}), "not"),
        (schema_format({"type": "strin"}), "strin"),
        (schema_format({"$ref": "#/definitions/missing"}), "missing"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
        ({"type": "yaml"}, "yaml"),
    ]
    for rf, word in cases:
        r = server.post("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "response_format": rf},
                        key=None)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert word in err["message"] and err["param"].startswith("response_format") and err["code"], err
    r = server.complete(prompt="x", guided_regex="[a-")
    assert r.status_code == 400 and "regex" in r.json()["error"]["message"]
    r = server.complete(prompt="x", guided_regex="[a-z]", guided_choice=["a"])
    assert r.status_code == 400 and "send one" in r.json()["error"]["message"]


def test_eos_is_allowed_only_where_the_grammar_accepts():
    tok = Tokenizer.train(TEXT, vocab_size=320)
    grammars = grammar_mod.Grammars(tok)
    m = grammars.matcher(grammars.compile(grammar_mod.regex_grammar("[0-9]+", "r"), "r"), (tok.eos_id,))
    mask = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)

    def allowed(i: int) -> bool:
        return bool((int(mask[i // 32]) >> (i % 32)) & 1)

    m.fill_mask(mask)
    digits = [i for i in range(tok.vocab_size) if tok.decode([i]).isdigit()]
    assert not allowed(tok.eos_id) and all(allowed(i) for i in digits)
    assert not allowed(tok.encode("the")[0])
    m.advance(digits[0])
    m.fill_mask(mask)
    assert allowed(tok.eos_id) and not allowed(tok.im_end_id) and not m.finished


def test_without_the_library_a_request_names_the_extra(monkeypatch):
    tok = Tokenizer.train(TEXT, vocab_size=320)
    parser = RequestParser(tok, 64, ServeConfig(), "tiny")
    monkeypatch.setattr(grammar_mod, "llguidance", None)
    for body in ({"response_format": {"type": "json_object"}}, {"guided_choice": ["a"]}):
        with pytest.raises(APIError) as e:
            parser.completion({"model": "tiny", "prompt": "x", **body})
        assert e.value.status == 501 and "gptforge[structured]" in e.value.message
    assert parser.completion({"model": "tiny", "prompt": "x", "response_format": {"type": "text"}}).grammar is None


def test_token_bitmask_masks_exactly_the_zero_bits_per_row():
    from gptforge.sampling import SamplingParams, TokenPicker, apply_token_bitmask, policy_groups
    gen = torch.Generator().manual_seed(0)
    V = 70  # not a multiple of 32: the last word's spare bits are ignored
    allowed = torch.rand(3, V, generator=gen) < 0.3
    words = torch.zeros(3, 3, dtype=torch.int64)
    for r, i in allowed.nonzero().tolist():
        words[r, i // 32] |= 1 << (i % 32)
    bitmask = (words - (words >= 2**31).long() * 2**32).to(torch.int32)
    logits = torch.randn(3, V, generator=gen)
    out = apply_token_bitmask(logits, bitmask)
    assert torch.equal(out.isfinite(), allowed) and torch.equal(out[allowed], logits[allowed])
    picker = TokenPicker(3, V, torch.device("cpu"))
    picker.bitmask[:] = bitmask
    greedy = policy_groups([SamplingParams(temperature=0)] * 3)
    ids = picker.pick(logits, greedy, None, [1])  # row 1 constrained, rows 0 and 2 free
    assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()
    assert ids[1] == logits[1].masked_fill(~allowed[1], float("-inf")).argmax()
