"""Tool calling on /v1/chat/completions: the request's `tools` and `tool_choice` checked, the conversation (tool
results and earlier calls included) rendered for a ChatML model, and the model's calls read back out of its text,
whole or as a stream.

The call format is the one Hermes and Qwen models are trained on: each call is
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, a tool's result comes back in a user turn as
`<tool_response>\\n...\\n</tool_response>`, and the tools are listed as JSON lines in the system message. A
forced call (`tool_choice` "required" or a named function) is generated under grammar.tool_call_grammar, so it
is a valid call of an offered function whatever the model; with "auto" the model decides, and only well-formed
calls of offered functions count as calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


class ToolError(Exception):
    """A malformed `tools` / `tool_choice` / tool message: a 400 naming `param`."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass
class ToolSpec:
    """What a request offers and asks: its functions (name -> parameters schema), in order, and the choice."""

    functions: dict[str, dict]
    tools_json: list[dict]  # the tools as rendered to the model
    choice: str = "auto"  # auto | none | required | function
    forced: str | None = None  # the function's name when choice is "function"
    parallel: bool = True
    called: list[str] = field(default_factory=list)  # names the grammar allows (forced calls)

    @property
    def parses(self) -> bool:
        """Whether the output is read for calls."""
        return self.choice != "none"


def parse_tools(tools: Any, tool_choice: Any, parallel: Any) -> ToolSpec | None:
    """The request's tool fields checked (None when it offers none and asks for none)."""
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    if tools is None:
        if tool_choice not in (None, "none"):
            raise ToolError("'tool_choice' needs 'tools': the request offers no function to call", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise ToolError("'tools' must be a non-empty array of {\"type\": \"function\", \"function\": {...}}",
                        "tools", "invalid_type")
    functions: dict[str, dict] = {}
    rendered = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ToolError(f"'{where}' must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}", where,
                            "invalid_type")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"'{where}.function.name' must be 1-64 letters, digits, _ or -, got "
                            f"{json.dumps(name)[:40]}", f"{where}.function.name")
        if name in functions:
            raise ToolError(f"'{where}.function.name': the function '{name}' is offered twice",
                            f"{where}.function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"'{where}.function.parameters' must be a JSON Schema object",
                            f"{where}.function.parameters", "invalid_type")
        if not isinstance(fn.get("description", ""), str):
            raise ToolError(f"'{where}.function.description' must be a string", f"{where}.function.description",
                            "invalid_type")
        functions[name] = params
        rendered.append({"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters")
                                                           if k in fn}})
    spec = ToolSpec(functions, rendered, parallel=True if parallel is None else parallel)
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        spec.choice = tool_choice or "auto"
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in functions:
            raise ToolError(f"'tool_choice' names the function {json.dumps(name)[:60]}, which is not in 'tools' "
                            f"(offered: {', '.join(functions)})", "tool_choice")
        spec.choice, spec.forced = "function", name
    else:
        raise ToolError("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                        "\"function\": {\"name\": ...}}", "tool_choice")
    if spec.choice == "required":
        spec.called = list(functions)
    elif spec.choice == "function":
        spec.called = [spec.forced]
    return spec


def render_messages(messages: list[dict], spec: ToolSpec | None) -> list[dict]:
    """The checked messages (role, content, and tool_calls / tool_call_id where given) as plain ChatML turns
    {role, content} for Tokenizer.encode_chat: the tools listed in the system message, an assistant's calls in
    its turn, the tools' results in user turns (consecutive results share one)."""
    out: list[dict] = []
    if spec is not None:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in spec.tools_json)
        block = ("# Tools\n\nYou can call the functions listed below, one JSON signature per line, inside "
                 f"<tools></tools>:\n<tools>\n{listing}\n</tools>\n\nTo call one, answer with a JSON object "
                 f"holding its name and arguments between the tags {OPEN} and {CLOSE}:\n{OPEN}\n"
                 f'{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}\n{CLOSE}')
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        if m["role"] == "tool":
            result = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [f"{OPEN}\n{json.dumps({'name': c['name'], 'arguments': c['arguments']}, ensure_ascii=False)}"
                     f"\n{CLOSE}" for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([m["content"]] if m["content"] else []) + calls)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def tool_call(name: str, arguments: Any) -> dict:
    """One entry of a message's `tool_calls`: arguments as a JSON string, as OpenAI sends them."""
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def read_call(body: str, spec: ToolSpec) -> dict | None:
    """The call written between the tags, if it is a JSON object naming an offered function with object
    arguments; None otherwise (the text then stays content)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(obj, dict) and obj.get("name") in spec.functions and isinstance(obj.get("arguments", {}), dict)):
        return None
    return tool_call(obj["name"], obj.get("arguments", {}))


def split_calls(text: str, spec: ToolSpec) -> tuple[str | None, list[dict]]:
    """A whole answer's content and calls. Content is the text outside the calls, without the whitespace that
    separates it from them; None when there are calls and no other text. Without `parallel`, the first call."""
    content, calls, pos = [], [], 0
    for m in _CALL.finditer(text):
        call = read_call(m[1], spec)
        if call is None:
            continue
        content.append(text[pos:m.start()].rstrip())
        calls.append(call)
        pos = m.end()
        text_after = text[pos:]
        pos += len(text_after) - len(text_after.lstrip())
    content.append(text[pos:])
    if not spec.parallel:
        calls = calls[:1]
    joined = "".join(content)
    return (joined or None) if calls else joined, calls


class CallStream:
    """split_calls, incrementally: feed text as it streams; get content pieces to send now and calls as each
    one closes. The content sent adds up to split_calls' content."""

    def __init__(self, spec: ToolSpec):
        self.spec, self.buf, self.calls, self.sent = spec, "", 0, 0  # calls read, calls handed out
        self.after_call = False  # drop the whitespace that follows a call

    def feed(self, text: str) -> list[tuple[str, Any]]:
        """("content", str) and ("call", (k, dict)) items, in order: k counts this answer's calls from 0."""
        self.buf += text
        out: list[tuple[str, Any]] = []
        while True:
            if self.after_call:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return out
                self.after_call = False
            start = self.buf.find(OPEN)
            if start < 0:
                # hold what could be the start of a tag, and trailing whitespace (a call may follow it)
                keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                             if OPEN.startswith(self.buf[-k:])), 0)
                head = self.buf[:len(self.buf) - keep]
                send = head.rstrip()
                if send:
                    out.append(("content", send))
                self.buf = head[len(send):] + self.buf[len(self.buf) - keep:]
                return out
            end = self.buf.find(CLOSE, start)
            if end < 0:
                if self.buf[:start].rstrip():
                    out.append(("content", self.buf[:start].rstrip()))
                    self.buf = self.buf[len(self.buf[:start].rstrip()):]
                return out
            call = read_call(self.buf[start + len(OPEN):end], self.spec)
            if call is None:  # not a call: its text is content like any other
                head, self.buf = self.buf[:end + len(CLOSE)], self.buf[end + len(CLOSE):]
                out.append(("content", head))
                continue
            if self.buf[:start].rstrip():
                out.append(("content", self.buf[:start].rstrip()))
            self.buf = self.buf[end + len(CLOSE):]
            self.after_call = True
            if self.spec.parallel or not self.calls:
                out.append(("call", (self.sent, call)))
                self.sent += 1
            self.calls += 1

    def close(self) -> list[tuple[str, Any]]:
        """What is still held: an unfinished call or trailing whitespace is content after all."""
        rest, self.buf = self.buf, ""
        return [("content", rest)] if rest else []
