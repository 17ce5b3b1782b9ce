"""OpenAI's HTTP protocol: the error shape, bounded body parsing, request validation into engine jobs, and the
response and stream-chunk shapes. Nothing here touches the engine, a socket or a thread.

Every answer that is not a 2xx is `APIError.body()`: {"error": {"message", "type", "param", "code"}} with a
non-null `code`, so the official client raises its typed exceptions and a caller can branch on the code.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from gptforge.engine import SeqEvent
from gptforge.errors import GptforgeError
from gptforge.sampling import SamplingParams
from gptforge.settings import ServeConfig
from gptforge.text import prompt_ids
from gptforge.tokenizer import Tokenizer

from .grammar import GrammarError, Grammars, response_format_grammar, tool_call_grammar
from .grammar import available as grammar_available
from .grammar import choice_grammar, json_schema_grammar, regex_grammar
from .tools import ToolError, ToolSpec, parse_tools, render_messages, split_calls

# OpenAI's documented defaults (API reference of /v1/completions and /v1/chat/completions) for a field a
# request leaves out. The server keeps these rather than SamplingParams' library defaults, so an OpenAI client
# gets here what it gets there. `max_tokens` is 16 for completions (chat: the rest of the context). The
# extensions (top_k, min_p, repetition_penalty) default to off.
OPENAI_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0,
                                   "frequency_penalty": 0.0, "n": 1, "completion_max_tokens": 16,
                                   "top_k": None, "min_p": 0.0, "repetition_penalty": 1.0}
MAX_JSON_DEPTH = 32  # a real request nests 4 levels (messages -> message -> content parts -> part)
MAX_STOP = 16  # OpenAI allows 4; more cost nothing here but the text scan
MAX_LOGPROBS = 20


# --- errors ------------------------------------------------------------------------------------------------
_ERROR_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout"}
# The code an error gets when its raiser names none: an error answer never carries "code": null.
_DEFAULT_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                  413: "request_too_large", 422: "invalid_request", 429: "rate_limit_exceeded", 499: "client_closed",
                  500: "internal_error", 503: "shutting_down", 504: "timeout"}


class APIError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}, as the OpenAI API does."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code or _DEFAULT_CODES.get(status, "error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def json(self) -> str:
        """The body as JSON text, ASCII only: a message quoting a client's invalid string still encodes."""
        return json.dumps(self.body())


# --- bounded parsing: size (by the reader), depth and string validity before anything else --------------------
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a surrogate half is written in JSON text


def _json_depth(raw: bytes) -> int:
    """How deep the body's arrays and objects nest, read off its brackets outside strings (no parsing, so a
    body of 100,000 `[` costs a scan, not a recursion)."""
    shape = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if len(shape) <= MAX_JSON_DEPTH:
        return len(shape)  # an upper bound, and within the limit
    opening = np.frombuffer(shape, np.uint8)
    steps = np.where((opening == ord("[")) | (opening == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _bad_string(v: Any, path: str) -> str | None:
    """The path of the first string (or object key) in `v` that is not valid Unicode (a lone surrogate
    half), or None."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(v, list):
        for i, x in enumerate(v):
            if isinstance(x, (str, list, dict)) and (bad := _bad_string(x, f"{path}[{i}]")):
                return bad
    elif isinstance(v, dict):
        for k, x in v.items():
            here = f"{path}.{k}" if path else k
            if bad := _bad_string(k, f"{here} (a key)") or _bad_string(x, here):
                return bad
    return None


def parse_body(raw: bytes) -> dict:
    """A request body (already bounded in size) as a JSON object, checked for depth and string validity;
    400 otherwise. Invalid UTF-8, NaN and Infinity are not JSON."""
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"the body nests arrays/objects {depth} levels deep; at most {MAX_JSON_DEPTH} are "
                            "accepted", code="json_too_deep")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw) and (path := _bad_string(body, "")):
        raise APIError(400, f"'{path}' holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), "
                            "which is not valid Unicode text; send well-formed UTF-8", param=path.split(" ")[0],
                       code="invalid_string")
    return body


# --- fields ------------------------------------------------------------------------------------------------
_MISSING = object()
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object"}
_NUM = (int, float)


def _field(body: dict, name: str, kinds: tuple, default: Any = None, check=None, rule: str = "") -> Any:
    """body[name] if present (null counts as absent), checked for type and range; 400 naming it otherwise."""
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    # bool is an int in Python, but `true` is not a valid max_tokens.
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        want = " or ".join(_TYPE_NAMES[k] for k in kinds if k in _TYPE_NAMES)
        raise APIError(400, f"'{name}' must be {want}, got {json.dumps(v)[:60]}", param=name, code="invalid_type")
    if check is not None and not check(v):
        raise APIError(400, f"'{name}' must be {rule}, got {json.dumps(v)[:60]}", param=name, code="invalid_value")
    return v


# The sampling fields: name, JSON types, valid when, the rule as the error states it.
_SAMPLING = [("temperature", _NUM, lambda v: 0 <= v <= 2, "in [0, 2]"),
             ("top_p", _NUM, lambda v: 0 < v <= 1, "in (0, 1]"),
             ("top_k", (int,), lambda v: v >= 1, ">= 1"),
             ("min_p", _NUM, lambda v: 0 <= v < 1, "in [0, 1)"),
             ("presence_penalty", _NUM, lambda v: -2 <= v <= 2, "in [-2, 2]"),
             ("frequency_penalty", _NUM, lambda v: -2 <= v <= 2, "in [-2, 2]"),
             ("repetition_penalty", _NUM, lambda v: v > 0, "> 0")]
# Constrained output: OpenAI's response_format, and vLLM's extensions (a regex, a fixed choice, a schema).
_GUIDED = {"guided_regex": regex_grammar, "guided_choice": choice_grammar, "guided_json": json_schema_grammar}
_COMMON_FIELDS = {"model", "max_tokens", "stop", "n", "seed", "stream", "stream_options", "logprobs", "user",
                  "ignore_eos", "response_format", *_GUIDED} | {name for name, *_ in _SAMPLING}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                                 "parallel_tool_calls"}
_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Parsed:
    """A validated request: its prompts (token ids) and what each of its choices decodes with."""

    chat: bool
    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]  # one per choice: choice i * n + j is prompt i's j-th
    stop_ids: tuple[int, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None  # completions: top alternatives per token; chat: top_logprobs (None: no logprobs)
    user: str | None = None
    model: str = ""  # the model id asked for: the base's or an adapter's (the response names it back)
    adapter: int = -1  # the --adapter it names (index in their order), -1: the base
    echo: bool = False  # completions: the prompt comes back first, with its tokens' logprobs (the first null)
    grammar: Any = None  # the compiled grammar every choice follows (grammar.Grammars.compile), None: free text
    tools: ToolSpec | None = None  # chat: the functions offered, and how the answer is read for calls


class RequestParser:
    """Turns a request body into a Parsed against this model's tokenizer, context and the server's limits."""

    def __init__(self, tokenizer: Tokenizer, block_size: int, cfg: ServeConfig, model_name: str,
                 adapters: tuple[str, ...] = ()):
        self.tok, self.block, self.cfg, self.name = tokenizer, block_size, cfg, model_name
        self.adapters = list(adapters)  # the LoRA adapters' model ids, in --adapter order
        self.max_prompt = min(cfg.max_prompt_tokens or block_size - 1, block_size - 1)
        self.max_tokens = min(cfg.max_tokens or block_size, block_size)
        self.grammars = Grammars(tokenizer)

    def model(self, body: dict) -> int:
        """The adapter the request's model names: its index among --adapter, -1 for the base."""
        name = _field(body, "model", (str,))
        if name is None:
            raise APIError(400, "'model' is required", param="model", code="missing_field")
        if name == self.name:
            return -1
        if name in self.adapters:
            return self.adapters.index(name)
        served = ", ".join(f"'{m}'" for m in [self.name, *self.adapters])
        raise APIError(404, f"the model '{name}' does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    def completion(self, body: dict) -> Parsed:
        self._known(body, _COMPLETION_FIELDS)
        self.model(body)
        prompt = body.get("prompt", _MISSING)
        if prompt is _MISSING or prompt is None:
            raise APIError(400, "'prompt' is required", param="prompt", code="missing_field")
        prompts = self._prompts(prompt)
        echo = _field(body, "echo", (bool,), False)
        if echo and _field(body, "stream", (bool,), False):
            raise APIError(400, "'echo' with 'stream' is not supported; ask without 'stream'", param="echo",
                           code="unsupported")
        score_only = echo and body.get("max_tokens") == 0  # the legacy API's way to score a prompt
        if _field(body, "suffix", (str,)) is not None:
            raise APIError(400, "'suffix' is not supported (no fill-in-the-middle)", param="suffix", code="unsupported")
        logprobs = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS, f"in 0..{MAX_LOGPROBS}")
        n = self._n(body)
        if _field(body, "best_of", (int,), n) != n:
            raise APIError(400, "'best_of' other than n is not supported", param="best_of", code="unsupported")
        stop_ids = () if _field(body, "ignore_eos", (bool,), False) else self.tok.eos_ids
        parsed = self._finish({**body, "max_tokens": None} if score_only else body, False, prompts, n, stop_ids,
                              logprobs, OPENAI_DEFAULTS["completion_max_tokens"])
        parsed.echo = echo
        parsed.grammar = self._grammar(body)
        if score_only:
            parsed.params = [replace(p, max_new_tokens=0) for p in parsed.params]
        return parsed

    def chat(self, body: dict) -> Parsed:
        self._known(body, _CHAT_FIELDS)
        self.model(body)
        messages = body.get("messages", _MISSING)
        if messages is _MISSING or messages is None:
            raise APIError(400, "'messages' is required", param="messages", code="missing_field")
        if not self.tok.has_chat_template:
            raise APIError(400, f"the model '{self.name}' has no chat template (its tokenizer lacks the "
                                "<|im_start|>/<|im_end|> tokens); use /v1/completions, or fine-tune it for chat",
                           param="messages", code="no_chat_template")
        try:
            tools = parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
        except ToolError as e:
            raise APIError(400, e.message, param=e.param, code=e.code) from None
        ids = self._chat_ids(messages, tools)
        forced = tools is not None and tools.called
        if forced and any(body.get(k) is not None and body.get(k) != {"type": "text"}
                          for k in ("response_format", *_GUIDED)):
            raise APIError(400, "a forced tool call ('tool_choice' required or a named function) cannot be "
                                "combined with 'response_format' or a guided_* field", param="tool_choice",
                           code="invalid_value")
        grammar = self._grammar(body)
        if tools is not None:
            self._check_parameters(tools)
        if forced:
            grammar = self._tool_grammar(tools)
        if _field(body, "logprobs", (bool,), False):
            logprobs = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= MAX_LOGPROBS,
                              f"in 0..{MAX_LOGPROBS}")
        else:
            if _field(body, "top_logprobs", (int,)) is not None:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs",
                               code="invalid_value")
            logprobs = None
        if body.get("max_completion_tokens") is not None:
            body = {**body, "max_tokens": _field(body, "max_completion_tokens", (int,))}
        ignore_eos = _field(body, "ignore_eos", (bool,), False)
        stop_ids = () if ignore_eos else self.tok.chat_stop_ids  # end of turn, and every end-of-sequence id
        parsed = self._finish(body, True, [ids], self._n(body), stop_ids, logprobs, None)
        parsed.grammar, parsed.tools = grammar, tools
        return parsed

    def _grammar(self, body: dict) -> Any:
        """The grammar of the request's response_format or guided_* field (at most one), checked against the
        tokenizer; a 400 names what cannot be compiled (an unsupported schema keyword, a bad regex)."""
        given = [k for k in ("response_format", *_GUIDED) if body.get(k) is not None]
        if len(given) > 1:
            raise APIError(400, f"{' and '.join(given)} both constrain the output; send one of them",
                           param=given[1], code="invalid_value")
        if not given:
            return None
        name = given[0]
        try:
            grammar = response_format_grammar(body[name]) if name == "response_format" else \
                _GUIDED[name](body[name], name)
            where = "response_format.json_schema.schema" if name == "response_format" and \
                body[name].get("type") == "json_schema" else name
            return None if grammar is None else self.grammars.compile(grammar, where)
        except GrammarError as e:
            raise APIError(e.status, e.message, param=e.param, code=e.code) from None

    def _check_parameters(self, tools: ToolSpec) -> None:
        """Each function's parameters compile as a JSON schema (a 400 names the function and the keyword), so
        a request is refused alike whether or not this answer forces a call. Without the grammar library the
        schemas are not checked, and only a forced call needs it (a 501)."""
        if not grammar_available() and not tools.called:
            return
        for i, params in enumerate(tools.functions.values()):
            where = f"tools[{i}].function.parameters"
            try:
                self.grammars.compile(json_schema_grammar(params, where), where)
            except GrammarError as e:
                raise APIError(e.status, e.message, param=e.param, code=e.code) from None

    def _tool_grammar(self, tools: ToolSpec) -> Any:
        """The grammar of a forced answer: calls of the functions tool_choice allows (several when required
        and parallel)."""
        try:
            grammar = tool_call_grammar([(n, tools.functions[n]) for n in tools.called],
                                        many=tools.parallel and tools.choice == "required")
            return self.grammars.compile(grammar, "tools")
        except GrammarError as e:
            raise APIError(e.status, e.message, param=e.param, code=e.code) from None

    def _chat_ids(self, messages: Any, tools: ToolSpec | None = None) -> list[int]:
        """The conversation in the chat template, each message checked first (400 naming the message). Tools
        go through the model's template when it renders them (it mentions `tools`), else through
        tools.render_messages' ChatML layout."""
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty array of {role, content} objects", param="messages",
                           code="invalid_type")
        flat = [self._message(i, m) for i, m in enumerate(messages)]
        template = getattr(self.tok, "chat_template", None) or ""
        try:
            if "tools" in template:  # a tools-aware template (an imported Qwen, Hermes, Llama 3.1...)
                for m in flat:  # templates take the arguments as an object, not as OpenAI's JSON string
                    for c in m.get("tool_calls", ()):
                        c.update(type="function", function={"name": c["name"], "arguments": c["arguments"]})
                return self.tok.encode_chat_ids(flat, add_generation_prompt=True,
                                                tools=tools.tools_json if tools else None)
            return self.tok.encode_chat_ids(render_messages(flat, tools), add_generation_prompt=True)
        except GptforgeError as e:  # checked above; a last line of defence
            raise APIError(400, str(e), param="messages", code="invalid_value") from None

    def _message(self, i: int, m: Any) -> dict:
        """messages[i] checked: {role, content} plus an assistant's tool_calls ({name, arguments} each, the
        arguments parsed) or a tool result's tool_call_id."""
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:  # (a non-string role is never in it)
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}, got "
                                f"{json.dumps(role)[:40]}", param="messages", code="invalid_value")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content", code="unsupported")
            content = "".join(p["text"] for p in content)
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""  # an assistant turn that only calls tools
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or an array of text parts, got "
                                f"{json.dumps(content)[:40]}", param=f"messages[{i}].content",
                           code="invalid_type")
        out: dict = {"role": role, "content": content}
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise APIError(400, f"messages[{i}].tool_call_id must be the string id of the call this answers",
                               param=f"messages[{i}].tool_call_id", code="missing_field")
            out["tool_call_id"] = m["tool_call_id"]
        if calls is not None:
            out["tool_calls"] = [self._past_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in
                                 enumerate(calls if isinstance(calls, list) else [calls])]
        return out

    @staticmethod
    def _past_call(where: str, c: Any) -> dict:
        fn = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)):
            raise APIError(400, f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                "\"arguments\": a JSON string}}}}", param=where, code="invalid_type")
        try:
            arguments = json.loads(fn["arguments"])
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise APIError(400, f"{where}.function.arguments must be a JSON object in a string, got "
                                f"{fn['arguments'][:40]!r}", param=f"{where}.function.arguments", code="invalid_value")
        return {"id": c.get("id"), "name": fn["name"], "arguments": arguments}

    def _known(self, body: dict, allowed: set[str]) -> None:
        extra = sorted(k for k, v in body.items() if k not in allowed and v is not None)
        if extra:
            raise APIError(400, f"unsupported parameter(s): {', '.join(extra)}", param=extra[0], code="unsupported")

    def _n(self, body: dict) -> int:
        return _field(body, "n", (int,), OPENAI_DEFAULTS["n"], lambda v: 1 <= v <= self.cfg.max_n,
                      f"in 1..{self.cfg.max_n}")

    def _prompts(self, prompt: Any) -> list[list[int]]:
        vocab = self.tok.vocab_size
        if isinstance(prompt, str):
            return [prompt_ids(self.tok, prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [prompt_ids(self.tok, p) for p in prompt]
            if all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in prompt):
                return [list(prompt)]
            if all(isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                                     for i in p) for p in prompt):
                return [list(p) for p in prompt]
        raise APIError(400, f"'prompt' must be a string, an array of strings, or token ids in 0..{vocab - 1} "
                            "(an array, or an array of arrays)", param="prompt", code="invalid_type")

    def _max_tokens(self, body: dict, longest: int, default_max: int | None) -> int:
        if longest > self.max_prompt:
            raise APIError(400, f"the prompt is {longest} tokens; this server accepts at most {self.max_prompt} "
                                f"(the model's context is {self.block})", param="prompt",
                           code="context_length_exceeded")
        room = self.block - longest
        max_tokens = _field(body, "max_tokens", (int,), None, lambda v: v >= 1, ">= 1")
        if max_tokens is None:
            return min(default_max or room, room, self.max_tokens)
        if max_tokens > self.max_tokens:
            raise APIError(400, f"'max_tokens' is {max_tokens}; this server allows at most {self.max_tokens}",
                           param="max_tokens", code="invalid_value")
        if max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.block} tokens, but you requested "
                                f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} for the completion); "
                                "shorten the prompt or lower max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    def _finish(self, body: dict, chat: bool, prompts: list[list[int]], n: int, stop_ids: tuple[int, ...],
                logprobs: int | None, default_max: int | None) -> Parsed:
        max_tokens = self._max_tokens(body, max(len(p) for p in prompts), default_max)
        if len(prompts) * n > self.cfg.max_queue:
            raise APIError(400, f"{len(prompts) * n} choices in one request; this server queues at most "
                                f"{self.cfg.max_queue}", param="n", code="invalid_value")
        stop = _field(body, "stop", (str, list), ())
        stop = (stop,) if isinstance(stop, str) else stop
        if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, f"'stop' must be a non-empty string or an array of at most {MAX_STOP} of them",
                           param="stop", code="invalid_value")
        seed = _field(body, "seed", (int,), None, lambda v: -2**63 <= v < 2**64, "a 64-bit integer")
        stream_options = _field(body, "stream_options", (dict,), {})
        base = {name: _field(body, name, kinds, OPENAI_DEFAULTS[name], check, rule)
                for name, kinds, check, rule in _SAMPLING}
        base = {k: float(v) if isinstance(v, (int, float)) and k != "top_k" else v for k, v in base.items()}
        base.update(max_new_tokens=max_tokens, stop=tuple(stop),
                    stop_at_eos=False,  # stop ids are passed to the engine explicitly
                    logprobs=logprobs is not None, top_logprobs=logprobs or 0)
        # Choice j of a seeded request draws from seed + j: n different samples, reproducible together.
        params = [SamplingParams(**base, seed=None if seed is None else (seed + j) % 2**64)
                  for _ in prompts for j in range(n)]
        return Parsed(chat, prompts, n, params, stop_ids, _field(body, "stream", (bool,), False),
                      _field(stream_options, "include_usage", (bool,), False), logprobs, _field(body, "user", (str,)),
                      model=body["model"], adapter=self.model(body))


# --- responses ---------------------------------------------------------------------------------------------
class Shaper:
    """The OpenAI response body, or the stream's SSE chunks, of one request."""

    def __init__(self, tokenizer: Tokenizer, req: Parsed, model_name: str):
        self.tok, self.req = tokenizer, req
        self.chat = req.chat
        self.head = {"id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24],
                     "created": int(time.time()), "model": model_name}
        self.object = "chat.completion" if req.chat else "text_completion"
        self.echo: list | None = None  # per choice, its prompt's eval.PromptScores when the request echoes
        self.chunk_object = "chat.completion.chunk" if req.chat else "text_completion"

    def _logprob_entry(self, ev: SeqEvent) -> dict:
        text = self.tok.decode([ev.token])
        return {"token": text, "logprob": ev.logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := self.tok.decode([i])), "logprob": v, "bytes": list(t.encode())}
                                 for i, v in ev.top or []]}

    def _legacy_logprobs(self, events: list[SeqEvent], offset: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for ev in events:
            text = self.tok.decode([ev.token])
            out["tokens"].append(text)
            out["token_logprobs"].append(ev.logprob)
            out["top_logprobs"].append({self.tok.decode([i]): v for i, v in (ev.top or [])})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def _logprobs(self, events: list[SeqEvent], offset: int) -> dict:
        if self.chat:
            return {"content": [self._logprob_entry(ev) for ev in events]}
        return self._legacy_logprobs(events, offset)

    def usage(self, completion_tokens: int, cached_tokens: int = 0) -> dict:
        """cached_tokens: of the prompt tokens, those read from the prefix cache (engine.SeqEvent)."""
        prompt = sum(len(p) for p in self.req.prompts)  # each prompt once, however many choices it has
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}

    def _echoed(self, i: int, text: str, lp: dict | None) -> tuple[str, dict | None]:
        """Choice i's prompt before its text and, with logprobs, its tokens before the generated ones: the first
        token's logprob and alternatives are null, as in OpenAI's legacy API."""
        prompt, scores = self.req.prompts[i // self.req.n], self.echo[i]
        pieces = [self.tok.decode([t]) for t in prompt]
        head = self.tok.decode(prompt)
        if lp is None:
            return head + text, None
        offsets = [sum(len(p) for p in pieces[:k]) for k in range(len(pieces))]
        tops: list[dict | None] = [None]
        for alts in scores.top:  # ids that decode alike (partial UTF-8) share a key: the most likely keeps it
            tops.append({})
            for t, v in alts:
                tops[-1].setdefault(self.tok.decode([t]), v)
        return head + text, {"tokens": pieces + lp["tokens"],
                             "token_logprobs": [None, *scores.logprobs, *lp["token_logprobs"]],
                             "top_logprobs": tops + lp["top_logprobs"],
                             "text_offset": offsets + [len(head) + o for o in lp["text_offset"]]}

    def response(self, texts: list[str], finish: list[str | None], events: list[list[SeqEvent]],
                 completion_tokens: int, cached_tokens: int = 0) -> dict:
        """The whole answer: `events` per choice are the tokens whose logprobs are reported (no stop ids)."""
        choices = []
        for i, (text, reason, evs) in enumerate(zip(texts, finish, events)):
            lp = None if self.req.logprobs is None else self._logprobs(evs, 0)
            if self.echo is not None:
                text, lp = self._echoed(i, text, lp)
            if self.chat:
                message: dict = {"role": "assistant", "content": text}
                if self.req.tools is not None and self.req.tools.parses:
                    message["content"], calls = split_calls(text, self.req.tools)
                    if calls:
                        message["tool_calls"] = calls
                        reason = "tool_calls" if reason == "stop" else reason
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": lp})
        return {**self.head, "object": self.object, "choices": choices,
                "usage": self.usage(completion_tokens, cached_tokens)}

    @staticmethod
    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def opening(self, choices: int) -> list[str]:
        """Chat streams open each choice with the assistant role; completion streams open with nothing."""
        if not self.chat:
            return []
        return [self.sse({**self.head, "object": self.chunk_object, "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
            for i in range(choices)]

    def chunk(self, index: int, text: str | None, finish: str | None, events: list[SeqEvent], offset: int) -> str:
        """One choice's text delta (or its finish), with the logprobs of the tokens that made it."""
        if self.chat:
            ch = {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                  "finish_reason": finish}
        else:
            ch = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        if self.req.logprobs is not None and events:
            ch["logprobs"] = self._logprobs(events, offset)
        payload = {**self.head, "object": self.chunk_object, "choices": [ch]}
        if self.req.include_usage:
            payload["usage"] = None
        return self.sse(payload)

    def tool_call_chunks(self, index: int, k: int, call: dict) -> list[str]:
        """Choice `index`'s k-th call, as OpenAI streams one: its id and name (arguments ""), then the
        arguments (here whole: they are sent once the call is complete and known to be one)."""
        fn = call["function"]
        head = {"index": k, "id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}
        return [self.sse({**self.head, "object": self.chunk_object, "choices": [
            {"index": index, "delta": {"tool_calls": [delta]}, "logprobs": None, "finish_reason": None}]})
            for delta in (head, {"index": k, "function": {"arguments": fn["arguments"]}})]

    def closing(self, completion_tokens: int, cached_tokens: int = 0) -> list[str]:
        """The usage chunk when asked for, then [DONE]."""
        usage = [self.sse({**self.head, "object": self.chunk_object, "choices": [],
                           "usage": self.usage(completion_tokens, cached_tokens)})] if self.req.include_usage else []
        return usage + ["data: [DONE]\n\n"]

    def error_event(self, e: APIError) -> str:
        """A stream's status is already sent: an error ends it as an event, as OpenAI's streams do."""
        return self.sse(e.body())
