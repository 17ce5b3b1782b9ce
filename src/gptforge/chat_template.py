"""Chat templates: render a model's Jinja chat template exactly as transformers' `apply_chat_template` does.

A model's `tokenizer_config.json` carries its conversation format as a Jinja template. We render it in the same
sandbox with the same settings (trim_blocks, lstrip_blocks, loop controls), the same helpers (`raise_exception`,
`strftime_now`, a `tojson` that does not HTML-escape, `dict`, a `namespace` that refuses private names) and the
same inputs (messages with None-valued keys dropped, reasoning aliased under its three names, tools, documents,
the special tokens as variables), so that the text, and so the token ids, equal the reference's.
A `{% generation %}...{% endgeneration %}` block marks assistant-written text; `render_spans` returns its
character spans (transformers' `return_assistant_tokens_mask`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptforge.errors import GptforgeError

# The names under which a message's reasoning may arrive; templates read the first (gpt-oss ones `thinking`).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# The spans list of the render in progress on this thread (None when spans are not being collected).
_spans: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("gptforge_chat_spans", default=None)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}`: renders body; while spans are collected, records where it went."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller) -> str:
        text = caller()
        state = _spans.get()
        if state is not None:  # the blocks yielded so far are the text before this one
            blocks, spans = state
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so a template cannot reach Python internals through it."""

    def __init__(*args, **kwargs):  # noqa: N805 (jinja's own signature trick: `self` may be a keyword)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &, '): wrong in a prompt; transformers' version is plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled in the sandbox chat templates run in; a syntax error is a GptforgeError."""
    if not isinstance(template, str):
        raise GptforgeError(f"a chat template is a Jinja string, got a {type(template).__name__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise GptforgeError(f"the chat template does not parse (line {e.lineno}: {e.message}); fix \"chat_template\" "
                            "in tokenizer_config.json (or chat_template.jinja)") from None


def plain(value: Any) -> Any:
    """`value` rebuilt from JSON types only: whatever else reaches the sandbox becomes an inert "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (a str enum, numpy's float64) lose their extra methods; __str__ & co give the plain value.
    for base, plain_value in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):
            return plain_value(value)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # a numpy scalar
        return plain(value.item())
    return f"<{type(value).__name__}>"


def _message(m: dict) -> dict:
    """A message as templates see it: keys holding None dropped (an API's content=None), reasoning aliased."""
    m = {k: v for k, v in m.items() if v is not None}
    reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
    if reasoning is not None:
        m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    return m


def _inputs(messages: list, tools: list | None, documents: list | None, add_generation_prompt: bool,
            variables: dict) -> dict:
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise GptforgeError("messages must be a list of {\"role\", \"content\"} objects")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
        raise GptforgeError("tools must be a list of JSON-schema objects ({\"type\": \"function\", \"function\": ...})")
    if documents is not None and (not isinstance(documents, list) or not all(isinstance(d, Mapping) for d in documents)):
        raise GptforgeError("documents must be a list of objects (e.g. {\"title\", \"text\"})")
    return {**plain(variables), "messages": [_message(m) for m in plain(messages)], "tools": plain(tools),
            "documents": plain(documents), "add_generation_prompt": add_generation_prompt}


def _run(template: str, inputs: dict, spans: list | None) -> str:
    compiled = compile_template(template)
    try:
        if spans is None:
            return compiled.render(**inputs)
        blocks: list[str] = []
        token = _spans.set((blocks, spans))
        try:
            for block in compiled.generate(**inputs):
                blocks.append(block)
        finally:
            _spans.reset(token)
        return "".join(blocks)
    except jinja2.TemplateError as e:  # raise_exception's message, or a runtime error in the template
        raise GptforgeError(f"the chat template refused the conversation: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise GptforgeError(f"the chat template failed on this conversation ({type(e).__name__}: {e}); check the "
                            "messages' shape, or fix \"chat_template\" in tokenizer_config.json") from None


def render(template: str, messages: list, *, add_generation_prompt: bool = False, tools: list | None = None,
           documents: list | None = None, **variables) -> str:
    """The conversation as the template writes it (transformers' `apply_chat_template(..., tokenize=False)`).

    `variables` are further template variables: the special tokens (bos_token, eos_token, ...) and any
    template options (e.g. enable_thinking)."""
    return _run(template, _inputs(messages, tools, documents, add_generation_prompt, variables), None)


def render_spans(template: str, messages: list, *, add_generation_prompt: bool = False, tools: list | None = None,
                 documents: list | None = None, **variables) -> tuple[str, list[tuple[int, int]]]:
    """`render`, and the (start, end) character spans of its `{% generation %}` blocks, in order."""
    spans: list[tuple[int, int]] = []
    text = _run(template, _inputs(messages, tools, documents, add_generation_prompt, variables), spans)
    return text, spans


def has_generation_blocks(template: str) -> bool:
    """Whether the template marks assistant text with `{% generation %}` (transformers' test, the same regex)."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
