"""The one exception type for input a user can fix.

The CLI prints its message (which names the problem and the fix) and exits with status 2, without a
traceback unless `--debug` is given. Anything else that escapes is a bug and keeps its traceback.
"""


class GptforgeError(Exception):
    """Bad input: a missing file, a malformed config or data line, a mismatched tokenizer, ..."""
