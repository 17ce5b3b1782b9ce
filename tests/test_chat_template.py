"""Chat templates rendered as transformers renders them, and assistant-only masks that stay exact, for templates
in the shapes of today's model families (written here, modelled on Qwen2.5 with tools, Llama 3, Mistral, Gemma,
Phi-3 and SmolLM2's ChatML), over tokenizers built here in the matching styles (tests/hftok.py)."""

from __future__ import annotations

import enum
import json

import numpy as np
import pytest
import torch

import hftok
from gptforge import load
from gptforge.chat_template import render, render_spans
from gptforge.checkpoint import write_checkpoint
from gptforge.config import ModelConfig, RunConfig
from gptforge.errors import GptforgeError
from gptforge.finetune.data import IGNORE_INDEX, chat_example
from gptforge.finetune.run import finetune
from gptforge.generate import stream
from gptforge.model import GPT
from gptforge.serve.protocol import RequestParser
from gptforge.settings import FinetuneSpec, ServeConfig
from gptforge.tokenizer import Tokenizer
from test_finetune import train_cfg, write_chats

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- else %}
        {{- 'You are a helpful assistant.\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call functions. Their signatures:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nReply with <tool_call>{\\"name\\": ..., \\"arguments\\": ...}</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first)
          or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for call in message.tool_calls %}
            {%- if call.function is defined %}
                {%- set call = call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + call.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to these functions (JSON):\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = """{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {{- raise_exception('System role not supported') }}
{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
        {%- set role = 'model' %}
    {%- else %}
        {%- set role = message['role'] %}
    {%- endif %}
    {{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\\n' }}
{%- endif %}
"""

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# ChatML with the assistant text marked, as templates written for return_assistant_tokens_mask do
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|eom_id|>"]
GEMMA_SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
PHI3_SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]

FAMILIES = {
    # name: (tokenizer, tokenizer_config.json, generation_config.json, the end-of-turn token)
    "smollm2": (lambda: hftok.byte_level(CHATML_SPECIALS),
                {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
                 "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}, None, "<|im_end|>"),
    "qwen2.5": (lambda: hftok.byte_level(CHATML_SPECIALS, plain=["<tool_call>", "</tool_call>"]),
                {"chat_template": QWEN, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
                {"eos_token_id": [2, 0]}, "<|im_end|>"),
    "llama3": (lambda: hftok.byte_level(LLAMA3_SPECIALS, bos="<|begin_of_text|>"),
               {"chat_template": LLAMA3, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               {"bos_token_id": 0, "eos_token_id": [1, 5, 4]}, "<|eot_id|>"),
    "mistral": (lambda: hftok.sentencepiece(["<unk>", "<s>", "</s>"], legacy=False),
                {"chat_template": MISTRAL, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "add_bos_token": True}, None, "</s>"),
    "gemma": (lambda: hftok.gemma(GEMMA_SPECIALS),
              {"chat_template": GEMMA, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
               "unk_token": "<unk>"}, {"eos_token_id": [2, 5]}, "<end_of_turn>"),
    "phi3": (lambda: hftok.sentencepiece(PHI3_SPECIALS),
             {"chat_template": PHI3, "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
              "pad_token": "<|endoftext|>"}, None, "<|end|>"),
}


SYSTEM = {"role": "system", "content": "Be brief; answer in one line."}
TURNS = [{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": "A friend, my lord."},
         {"role": "user", "content": "What is the weather in Paris? ✓ 漢字"},
         {"role": "assistant", "content": "It is sunny, with wind from the west."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city <now> & here, \"quoted\" and naïve",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_TURNS = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": "{\"temp\": 21}"},
              {"role": "assistant", "content": "It is 21 degrees in Paris."}]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, our Tokenizer, transformers' tokenizer): both loaded from the same HF folder."""
    name = request.param
    build, config, generation, _ = FAMILIES[name]
    folder = hftok.hf_folder(tmp_path_factory.mktemp(name), build(), config, generation)
    return name, Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)


def conversations(name: str) -> list[tuple[list, dict]]:
    """(messages, apply_chat_template options) that the family's template accepts."""
    system = name not in ("mistral", "gemma")  # their templates refuse a system message
    out = [(TURNS[:1], {"add_generation_prompt": True}), (TURNS, {}), (TURNS[:3], {"add_generation_prompt": True})]
    if system:
        out += [([SYSTEM, *TURNS], {}), ([SYSTEM, *TURNS[:1]], {"add_generation_prompt": True})]
    if name == "qwen2.5":
        out += [(TOOL_TURNS, {"tools": TOOLS}), (TOOL_TURNS[:3], {"tools": TOOLS, "add_generation_prompt": True}),
                ([SYSTEM, *TURNS[:1]], {"tools": TOOLS, "add_generation_prompt": True})]
    if name == "llama3":
        out += [([SYSTEM, *TURNS], {"tools": TOOLS}), (TURNS[:1], {"date_string": "26 Jul 2024"})]
    return out


def test_render_and_ids_equal_transformers(family):
    name, ours, theirs = family
    for messages, options in conversations(name):
        text = theirs.apply_chat_template(messages, tokenize=False, **options)
        assert ours.render_chat(messages, **options) == text, (name, options)
        ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, **options)["input_ids"]
        assert ours.encode_chat(messages, **options)[0] == ids == ours.encode_chat_ids(messages, **options), \
            (name, options)


def test_assistant_mask_is_the_assistant_text_and_its_end_of_turn(family):
    name, ours, _ = family
    end = FAMILIES[name][3]
    for messages, options in conversations(name):
        if options.get("add_generation_prompt"):
            continue
        ids, mask = ours.encode_chat(messages, **options)
        learned = [ours.decode([i for i, m in zip(ids, mask) if m])]
        want = "".join((" " if name == "mistral" else "") + m["content"] + end
                       for m in messages if m["role"] == "assistant" and m.get("content"))
        if name == "qwen2.5" and options.get("tools"):  # the tool call, as the template writes it, is learnt too
            want = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
                    + want)
        # (SentencePiece's decoder drops the first space of a text: Mistral's turns start with one.)
        assert learned == [want[1:] if name == "mistral" else want], (name, options)
        # The masked ids are the tokens of exactly that text, so a model learns the text and the stop, no layout.
        assert sum(mask) == len(ours.encode(want)), (name, options)


def test_sft_targets_are_the_assistant_turns(family):
    """finetune's chat examples learn exactly the assistant turns (and their ends) under the model's template."""
    name, ours, _ = family
    messages, options = (TOOL_TURNS, {"tools": TOOLS}) if name == "qwen2.5" else (TURNS, {})
    x, y = chat_example(ours, messages, "here", options.get("tools"))
    ids, mask = ours.encode_chat(messages, **options)
    assert x == ids[:-1] and [t for t in y if t != IGNORE_INDEX] == [i for i, m in zip(ids[1:], mask[1:]) if m]
    assert ours.decode([t for t in y if t != IGNORE_INDEX]).endswith(
        "It is " + ("21 degrees in Paris." if name == "qwen2.5" else "sunny, with wind from the west.")
        + FAMILIES[name][3])


def test_end_of_turn_and_stop_ids(family):
    name, ours, theirs = family
    end = FAMILIES[name][3]
    assert ours.im_end_id == theirs.convert_tokens_to_ids(end)
    assert ours.im_end_id in ours.chat_stop_ids and ours.eos_id in ours.chat_stop_ids
    assert ours.eos_id == theirs.eos_token_id
    generation = FAMILIES[name][2]
    if generation:  # generation_config.json's end ids all stop generation
        assert set(generation["eos_token_id"]) <= set(ours.eos_ids)
    assert ours.bos_id == theirs.bos_token_id


def test_checkpoint_round_trip_keeps_template_and_ids(family, tmp_path):
    """What a checkpoint stores (tokenizer.json + hf_config) loads back with the same template, ids and stops,
    and transformers reads the same folder the same way."""
    name, ours, theirs = family
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(ours.hf_config(128)))
    ours.hf.save(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (again.chat_template, again.eos_ids, again.bos_id, again.start_ids, again.chat_stop_ids) == \
        (ours.chat_template, ours.eos_ids, ours.bos_id, ours.start_ids, ours.chat_stop_ids)
    messages, options = conversations(name)[1]
    assert again.encode_chat(messages, **options) == ours.encode_chat(messages, **options)
    reread = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reread.apply_chat_template(messages, tokenize=False, **options) == \
        theirs.apply_chat_template(messages, tokenize=False, **options)


def test_generation_blocks_give_transformers_assistant_mask(tmp_path):
    folder = hftok.hf_folder(tmp_path, hftok.byte_level(CHATML_SPECIALS),
                             {"chat_template": CHATML_GENERATION, "eos_token": "<|im_end|>"})
    ours, theirs = Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)
    messages = [SYSTEM, *TURNS]
    out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = ours.encode_chat(messages)
    assert ids == out["input_ids"] and [int(m) for m in mask] == out["assistant_masks"]
    assert ours.decode([i for i, m in zip(ids, mask) if m]) == (
        "A friend, my lord.<|im_end|>It is sunny, with wind from the west.<|im_end|>")
    text, spans = render_spans(CHATML_GENERATION, messages)
    assert [text[s:e] for s, e in spans] == ["A friend, my lord.<|im_end|>",
                                             "It is sunny, with wind from the west.<|im_end|>"]


def test_sandbox_helpers_match_transformers(tmp_path):
    """tojson without HTML escaping and with its options, namespace, dict, loop controls, strftime_now, None-valued
    keys dropped from messages: the same text as apply_chat_template."""
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}"
                "{% endif %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=True) }}"
                "{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}{{ strftime_now('%Y') | length }}{{ tools | tojson }}"
                "{{ eos_token }}{{ documents | tojson }}")
    folder = hftok.hf_folder(tmp_path, hftok.byte_level(CHATML_SPECIALS), {"chat_template": template,
                                                                            "eos_token": "<|im_end|>"})
    ours, theirs = Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)
    messages = [SYSTEM, {"role": "user", "content": "<b>&'naïve'</b>", "name": None}]
    docs = [{"title": "Paris", "text": "Sunny & warm"}]
    want = theirs.apply_chat_template(messages, tokenize=False, tools=TOOLS, documents=docs)
    assert ours.render_chat(messages, tools=TOOLS, documents=docs) == want
    assert "<b>&'naïve'</b>" in want and '"name": null' not in want and want.count("<|im_end|>") == 1


def test_bad_templates_and_messages_are_one_line_errors(tmp_path):
    with pytest.raises(GptforgeError, match="roles must alternate"):
        render(MISTRAL, [TURNS[1]], bos_token="<s>", eos_token="</s>")
    with pytest.raises(GptforgeError, match="does not parse.*chat_template"):
        render("{% for m in messages %}{{ m.content }", TURNS)
    with pytest.raises(GptforgeError, match="SecurityError|refused"):
        render("{{ messages.__class__.__mro__ }}{% set ns = namespace() %}{% set ns._x = 1 %}", TURNS)
    with pytest.raises(GptforgeError, match="failed on this conversation"):
        render("{{ messages[0]['content'] + 1 }}", TURNS)
    folder = hftok.hf_folder(tmp_path / "g", hftok.gemma(GEMMA_SPECIALS), {"chat_template": GEMMA, "eos_token": "<eos>",
                                                                            "bos_token": "<bos>"})
    tok = Tokenizer.load(folder)
    with pytest.raises(GptforgeError, match="System role not supported") as e:
        tok.encode_chat([SYSTEM, *TURNS])
    assert "\n" not in str(e.value)
    with pytest.raises(GptforgeError, match="message 1: needs a string"):
        tok.encode_chat([TURNS[0], {"role": "assistant"}])


def test_chat_finetune_and_generate_use_the_checkpoints_own_template(tmp_path):
    """A checkpoint whose tokenizer came from an HF folder (Llama 3 shape): chat SFT learns in its template (no
    ChatML markers added), the run's checkpoint carries template, BOS and stop tokens, and a chat prompt rendered
    from it streams until the template's end-of-turn token."""
    build, config, generation, end = FAMILIES["llama3"]
    tok = Tokenizer.load(hftok.hf_folder(tmp_path / "hf", build(), config, generation))
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size, block_size=128)
    torch.manual_seed(0)
    base = write_checkpoint(tmp_path / "base", RunConfig(model=cfg), tok, model_state=GPT(cfg).state_dict())
    r = finetune(train_cfg(tmp_path / "run", steps=4, seq_len=128), base, FinetuneSpec("full", "chat"),
                 data=str(write_chats(tmp_path / "c.jsonl", 12)), progress=False)
    model, again = load(r.train.checkpoint)
    assert again.vocab_size == tok.vocab_size and again.chat_template == LLAMA3
    assert (again.eos_ids, again.start_ids, again.im_end_id) == (tok.eos_ids, tok.start_ids, tok.hf.token_to_id(end))
    theirs = transformers.AutoTokenizer.from_pretrained(r.train.checkpoint)
    messages = [{"role": "user", "content": "after two"}]
    ids = again.encode_chat(messages, add_generation_prompt=True)[0]
    assert ids == theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    out = "".join(stream(model, again, ids, max_new_tokens=8, temperature=0, stop=(end,)))
    assert end not in out


# Qwen3's shape: reasoning is written only in the turns after the last user message; earlier turns lose it.
QWEN3 = """{%- set ns = namespace(last_query=-1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' and ns.last_query < 0 %}
        {%- set ns.last_query = messages | length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if loop.index0 > ns.last_query and message.reasoning_content %}
            {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- message.content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def test_mask_when_later_turns_rewrite_earlier_ones(tmp_path):
    folder = hftok.hf_folder(tmp_path, hftok.byte_level(CHATML_SPECIALS),
                             {"chat_template": QWEN3, "eos_token": "<|im_end|>"})
    ours, theirs = Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)
    messages = [TURNS[0], {**TURNS[1], "reasoning_content": "A greeting."}, TURNS[2],
                {**TURNS[3], "reasoning_content": "Look outside."}]
    ids, mask = ours.encode_chat(messages)
    assert ids == theirs.apply_chat_template(messages, return_dict=True)["input_ids"]
    assert "A greeting." not in ours.decode(ids)  # the first turn's reasoning is dropped once a user follows
    assert ours.decode([i for i, m in zip(ids, mask) if m]) == (
        "A friend, my lord.<|im_end|><think>\nLook outside.\n</think>\n\nIt is sunny, with wind from the west.<|im_end|>")
    with pytest.raises(GptforgeError, match="message 1: .*differently.*generation"):
        ours.encode_chat([TURNS[0], {"role": "assistant", "content": "", "reasoning_content": "x"}, TURNS[2]])


@pytest.mark.parametrize("name", ["qwen2.5", "llama3"])
def test_server_requests_use_the_template_and_its_stops(name, tmp_path):
    """/v1/chat/completions renders the model's template (tools included) into apply_chat_template's ids and stops
    at the end of turn and every end id; /v1/completions' text prompt gets the tokenizer's BOS."""
    build, config, generation, _ = FAMILIES[name]
    folder = hftok.hf_folder(tmp_path, build(), config, generation)
    ours, theirs = Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)
    parser = RequestParser(ours, 4096, ServeConfig(), "m")
    messages = [SYSTEM, TURNS[0]]
    chat = parser.chat({"model": "m", "messages": messages, "tools": TOOLS})
    assert chat.prompts == [theirs.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True,
                                                       return_dict=True)["input_ids"]]
    assert chat.stop_ids == ours.chat_stop_ids and len(chat.stop_ids) >= 2
    completion = parser.completion({"model": "m", "prompt": "hello"})
    assert completion.prompts == [theirs("hello")["input_ids"]] and completion.stop_ids == ours.eos_ids


def test_inputs_reach_the_sandbox_as_plain_json():
    """Rich objects are rebuilt from JSON types (a str enum is its value, a numpy scalar its number); anything
    else is an inert "<TypeName>", as transformers does."""
    class Role(str, enum.Enum):
        USER = "user"

    template = "{{ messages[0].role }}|{{ messages[0].n + 1 }}|{{ messages[0].x }}|{{ flag }}"
    got = render(template, [{"role": Role.USER, "n": np.int64(2), "x": object()}], flag=np.bool_(False))
    assert got == "user|3|<object>|False"
