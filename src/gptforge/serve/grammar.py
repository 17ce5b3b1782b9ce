"""Constrained decoding for the server: the grammars behind `response_format` (JSON mode, a JSON schema), the
`guided_regex` / `guided_choice` / `guided_json` extensions and forced tool calls, compiled by llguidance and
enforced token by token through sampling.Constraint.

llguidance was chosen by measurement (benchmarks/grammar_libs.py, docs/BENCHMARKS.md): on the demo tokenizer its
mask costs under 10 us a token, as the others', it compiles a schema in milliseconds (outlines-core needs 10-22 s
to index free-form JSON) and installs as one 8 MB wheel with no dependencies (xgrammar pulls triton, 1 GB). It
reads our tokenizer.json as it is, so every tokenizer the checkpoint format holds works, and it names the schema
keywords it does not implement, which the server answers as a 400.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import torch

from gptforge.tokenizer import Tokenizer

try:
    import llguidance
except ImportError:  # the `structured` extra; requests that need it get a 501 naming it
    llguidance = None

EXTRA = "structured"
# Compact JSON (",", ":" and no free whitespace): an untrained model given free whitespace spends its tokens
# on it; a fixed layout also makes the output independent of how much of it the model likes.
_JSON_OPTIONS = {"whitespace_flexible": False}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for schema and function names


class GrammarError(Exception):
    """A request's constraint cannot be compiled: `status` 400 (its fault, naming `param`) or 501 (no library)."""

    def __init__(self, message: str, param: str, status: int = 400, code: str = "invalid_schema"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def available() -> bool:
    return llguidance is not None


def _require(param: str) -> None:
    if llguidance is None:
        raise GrammarError(f"'{param}' needs the grammar library llguidance, which is not installed; "
                           f"pip install 'gptforge[{EXTRA}]'", param, status=501, code="not_installed")


def json_schema_grammar(schema: Any, param: str) -> str:
    """The grammar of JSON texts valid under `schema` (a dict, or true for any JSON value)."""
    _require(param)
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"'{param}' must be a JSON Schema object, got {json.dumps(schema)[:60]}", param)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"'{param}' is not a usable JSON schema: {e}", param) from None


def regex_grammar(pattern: Any, param: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError(f"'{param}' must be a non-empty regular expression string", param, code="invalid_value")
    _require(param)
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def choice_grammar(choices: Any, param: str) -> str:
    """Exactly one of the strings in `choices`."""
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
        raise GrammarError(f"'{param}' must be a non-empty array of non-empty strings", param, code="invalid_value")
    _require(param)
    # Lark string literals take JSON's escapes.
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def response_format_grammar(rf: Any) -> str | None:
    """OpenAI's `response_format`: None for {"type": "text"}, else the grammar of its JSON output."""
    if not isinstance(rf, dict):
        raise GrammarError("'response_format' must be an object such as {\"type\": \"json_object\"}",
                           "response_format", code="invalid_type")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, "response_format")
    if kind != "json_schema":
        raise GrammarError(f"'response_format.type' must be text, json_object or json_schema, got "
                           f"{json.dumps(kind)[:40]}", "response_format.type", code="invalid_value")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise GrammarError("'response_format.json_schema' must be an object {name, schema, strict}",
                           "response_format.json_schema", code="invalid_type")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise GrammarError("'response_format.json_schema.name' must be 1-64 letters, digits, _ or -",
                           "response_format.json_schema.name", code="invalid_value")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise GrammarError("'response_format.json_schema.strict' must be a boolean",
                           "response_format.json_schema.strict", code="invalid_type")
    # strict or not, the output is held to the schema: there is no cheaper "best effort" to fall back to
    return json_schema_grammar(spec.get("schema", {}), "response_format.json_schema.schema")


def tool_call_grammar(functions: list[tuple[str, dict]], many: bool) -> str:
    """The Hermes / Qwen call format, one or (`many`) several calls of the given (name, parameters schema)
    functions: <tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>, calls separated by a newline."""
    _require("tools")
    shapes = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
               "required": ["name", "arguments"], "additionalProperties": False} for name, params in functions]
    call = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
    call = {**call, "x-guidance": _JSON_OPTIONS}
    start = 'start: call ("\\n" call)*' if many else "start: call"
    return llguidance.LLMatcher.grammar_from_lark(
        f'{start}\ncall: "<tool_call>\\n" %json {json.dumps(call)} "\\n</tool_call>"\n')


class Grammars:
    """One tokenizer's grammar checks and matchers. The tokenizer is handed to llguidance once, on first use."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self._ll = None
        # The ids llguidance allows once the grammar accepts: every id that ends a sequence on either endpoint
        # (Matcher then keeps only the sequence's own).
        chat = tokenizer.chat_stop_ids if tokenizer.has_chat_template else ()
        self.ends = list(dict.fromkeys([*tokenizer.eos_ids, *chat]))

    @property
    def ll(self):
        if self._ll is None:
            self._ll = llguidance.LLTokenizer(self.tok.hf.to_str(), n_vocab=self.tok.vocab_size, eos_token=self.ends)
        return self._ll

    def compile(self, grammar: str, param: str):
        """`grammar` compiled against this tokenizer: a matcher at its start, which `matcher` copies for each
        sequence (a copy takes ~20 us, a compile milliseconds); a 400 naming the problem (an unsupported schema
        keyword, a bad regex) if it does not compile."""
        compiled = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if compiled.is_error():
            raise GrammarError(f"'{param}': {compiled.get_error().strip()}", param)
        return compiled

    def matcher(self, compiled, stop_ids: tuple[int, ...]) -> Matcher:
        """A sequence's own Matcher, from `compile`'s result."""
        return Matcher(compiled.deep_copy(), stop_ids, self.ends)


class Matcher:
    """A sampling.Constraint over an llguidance matcher. The sequence's own stop ids are allowed exactly when the
    grammar accepts (the ids llguidance would allow then are the tokenizer-wide ones, which differ by endpoint).

    The mask is computed when the step asks for it, not overlapped with the forward: it takes a few microseconds
    on the demo tokenizer, and handing it to a worker thread measured slower on 2 busy cores (docs/BENCHMARKS.md)."""

    def __init__(self, matcher, stop_ids: tuple[int, ...], ends: list[int]):
        self.m, self.stops, self.ends = matcher, stop_ids, ends

    def fill_mask(self, out: torch.Tensor) -> None:
        self.m.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * out.element_size())
        words = out.numpy().view(np.uint32)
        for t in self.ends:
            words[t // 32] &= ~np.uint32(1 << (t % 32))
        if self.m.is_accepting():
            for t in self.stops:
                words[t // 32] |= np.uint32(1 << (t % 32))

    def advance(self, token: int) -> None:
        self.m.consume_token(token)

    @property
    def finished(self) -> bool:
        return self.m.is_stopped()
