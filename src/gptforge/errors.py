"""The one exception type for input a user can fix.

The CLI prints its message (which names the problem and the fix) and exits with status 2, without a
traceback unless `--debug` is given. Anything else that escapes is a bug and keeps its traceback.
"""


class GptforgeError(Exception):
    """Bad input: a missing file, a malformed config or data line, a mismatched tokenizer, ..."""


def not_one_string(value, what: str):
    """`value` unchanged, unless it is one string where a list of them is expected: iterating it would take
    each character as an item (issue 19: `complete(model, tok, "text")` ran one prompt per character)."""
    if isinstance(value, (str, bytes)):
        shown = value[:40]
        raise GptforgeError(f"{what} must be a list, got a single string {shown!r}; pass a list: [{shown!r}]")
    return value
