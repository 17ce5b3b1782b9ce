"""Tool calling on a real `gptforge serve`, driven by the official `openai` client: forced calls (`tool_choice`
"required" or a named function) are generated under the call grammar, so even an untrained model always answers
with a valid call of an offered function whose arguments validate against its schema; calls round-trip (the
assistant's call and the tool's result sent back); streams carry the same calls as whole answers. How a model's
own text is read for calls ("auto") is tested on written texts, split at every point for the stream parser."""

from __future__ import annotations

import json

import pytest

from gptforge.serve.tools import CLOSE as CLOSE_TAG
from gptforge.serve.tools import OPEN as OPEN_TAG
from gptforge.serve.tools import CallStream, parse_tools, render_messages, split_calls
from gptforge.tokenizer import Tokenizer
from serverproc import Server
from test_serve import TEXT, make_checkpoint

pytest.importorskip("llguidance", reason="the grammar library: pip install 'gptforge[structured]'")
jsonschema = pytest.importorskip("jsonschema", reason="the independent validator: pip install 'gptforge[test]'")

from gptforge.config import ModelConfig  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
LOOKUP = {"type": "object", "properties": {"page": {"type": "integer", "minimum": 1, "maximum": 99},
                                           "exact": {"type": "boolean"},
                                           "words": {"type": "array", "items": {"enum": ["to", "be"]}, "maxItems": 3}},
          "required": ["page", "exact", "words"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "lookup", "description": "Find words on a page",
                                           "parameters": LOOKUP}}]
SCHEMAS = {"get_weather": WEATHER, "lookup": LOOKUP}
ASK = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "what is the weather?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = Tokenizer.train(TEXT, vocab_size=320)
    # 2048 positions: the tool listing is ~1,000 tokens of this 320-token vocabulary
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=384, block_size=2048)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("tools") / "tiny", tok, cfg)
    s = Server(ckpt, tmp_path_factory.mktemp("log") / "server.log", "--model-name", "tiny", "--max-batch", "8")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client(None)


def check_call(call, names=tuple(SCHEMAS)) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def test_required_is_always_a_valid_call_of_an_offered_function(client):
    seen = set()
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=3,
                                           seed=seed, temperature=1.0, max_tokens=300)
        for c in r.choices:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            assert c.message.tool_calls
            for call in c.message.tool_calls:
                check_call(call)
                seen.add(call.function.name)
    assert seen == set(SCHEMAS)  # the grammar offers both: an untrained model picks each some time


def test_a_named_function_is_the_one_called(client):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, seed=seed, temperature=1.0,
                                           tool_choice={"type": "function", "function": {"name": "lookup"}},
                                           max_tokens=300, n=2)
        for c in r.choices:
            assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
            check_call(c.message.tool_calls[0], ("lookup",))


def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, seed=seed, temperature=1.0, max_tokens=300)
        assert len(r.choices[0].message.tool_calls) == 1
        check_call(r.choices[0].message.tool_calls[0])


def test_streamed_calls_equal_the_whole_answer(client):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", seed=5, temperature=1.0,
              max_tokens=300)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += d.function.name or "" if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == whole.finish_reason == "tool_calls" and content == ""
    assert [(calls[k]["name"], calls[k]["arguments"]) for k in sorted(calls)] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_a_call_and_its_result_round_trip(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, seed=1, max_tokens=300,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    turn = first.choices[0].message.model_dump(exclude_none=True)
    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}
    again = client.chat.completions.create(model="tiny", messages=[*ASK, turn, result], tools=TOOLS, seed=1,
                                           max_tokens=20, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the call and the result are in the prompt: it grew by at least their text's tokens
    assert again.usage.prompt_tokens > first.usage.prompt_tokens + 10
    no_tools = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, temperature=0)
    assert no_tools.choices[0].message.tool_calls is None


def test_tool_choice_none_leaves_the_text_alone(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8,
                                       temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


# --- reading calls out of text, and rendering them in ----------------------------------------------------------
SPEC = parse_tools(TOOLS, "auto", None)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}\n</tool_call>'
TEXTS = [
    "no calls at all ",
    CALL,
    "Let me check.\n" + CALL + "\n" + CALL.replace("Rome", "Oslo") + "\n",
    "before <tool_call>\nnot json\n</tool_call> after",
    "<tool_call>{\"name\": \"unknown\", \"arguments\": {}}</tool_call>" + CALL,
    "cut off <tool_call>\n{\"name\": \"get_wea",
    "text <tool_c",
]


@pytest.mark.parametrize("text", TEXTS)
def test_the_stream_parser_equals_the_whole_text_parser_at_every_split(text):
    content, calls = split_calls(text, SPEC)
    expected = (content or "", [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1, 7):
            s = CallStream(SPEC)
            parts = s.feed(text[:a]) + s.feed(text[a:b]) + s.feed(text[b:]) + s.close()
            got = ("".join(v for k, v in parts if k == "content"),
                   [(v[1]["function"]["name"], v[1]["function"]["arguments"]) for k, v in parts if k == "call"])
            assert got == expected, (a, b)


def test_calls_are_read_out_of_text():
    content, calls = split_calls(TEXTS[2], SPEC)
    assert content == "Let me check." and [json.loads(c["function"]["arguments"])["city"] for c in calls] == \
        ["Rome", "Oslo"]
    assert split_calls(TEXTS[3], SPEC) == (TEXTS[3], [])  # not JSON: stays text
    assert split_calls(CALL, parse_tools(TOOLS, "auto", False))[1][0]["function"]["name"] == "get_weather"
    content, calls = split_calls(TEXTS[2], parse_tools(TOOLS, "auto", False))
    assert len(calls) == 1 and content == "Let me check."


def test_default_rendering_lists_tools_calls_and_results():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "name": "get_weather",
                                                                 "arguments": {"city": "Rome", "unit": "C"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]
    out = render_messages(msgs, SPEC)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "lookup"' in out[0]["content"]
    assert out[2]["content"] == CALL.replace('"Rome", "unit": "C"', '"Rome", "unit": "C"')
    assert out[3]["content"] == "<tool_response>\n21 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"


def test_a_tools_aware_template_renders_the_request(tmp_path):
    """A checkpoint whose template renders tools (Qwen2.5's) gets the tools, the past call and the result
    through it, exactly as the template renders them from transformers-style messages."""
    import hftok
    from test_chat_template import CHATML_SPECIALS, QWEN

    from gptforge.serve import RequestParser, ServeConfig

    tok = Tokenizer.load(hftok.hf_folder(tmp_path, hftok.byte_level(CHATML_SPECIALS, plain=[OPEN_TAG, CLOSE_TAG]),
                                         {"chat_template": QWEN, "eos_token": "<|im_end|>",
                                          "pad_token": "<|endoftext|>", "bos_token": None}))
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Rome", "unit": "C"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21"}]
    parsed = RequestParser(tok, 8192, ServeConfig(), "m").chat({"model": "m", "messages": messages, "tools": TOOLS})
    expected = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}}]},
                {"role": "tool", "content": "21"}]
    assert tok.decode(parsed.prompts[0]) == tok.render_chat(expected, add_generation_prompt=True,
                                                            tools=SPEC.tools_json)
    assert "<tools>" in tok.decode(parsed.prompts[0]) and '"Rome"' in tok.decode(parsed.prompts[0])
