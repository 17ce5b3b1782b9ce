"""The text side of the decode policy, written once for both schedules: prompts in (text or token ids, fitted
to the context), text out (ids decoded incrementally into whole UTF-8 characters, stop ids and stop strings
ending a sequence, a stop string never handed out, not even in part).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from gptforge.errors import GptforgeError
from gptforge.settings import SamplingParams
from gptforge.tokenizer import Tokenizer


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids: text is encoded, token ids (a list or tuple of ints, e.g. a chat rendered by
    Tokenizer.encode_chat) are taken as they are. Text starts a sequence, so it gets the tokenizer's BOS where it
    puts one (Llama, Gemma, Mistral). An empty text starts a new document: the model saw EOS (or BOS) before every
    document in training."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, start=True) if prompt else list(tokenizer.start_ids or [tokenizer.eos_id])
    if isinstance(prompt, (list, tuple)) and _token_ids(prompt):
        return list(prompt)
    raise GptforgeError(f"a prompt is a string or a list of token ids (ints), got {_kind(prompt)}")


def _token_ids(ids: Sequence) -> bool:
    return all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids)


def _kind(value: object) -> str:
    if isinstance(value, (list, tuple)):
        inner = sorted({type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {', '.join(inner) or 'nothing'}"
    return f"a {type(value).__name__}"


def prompt_list(prompts: Sequence, what: str = "prompts") -> list:
    """A batch of prompts as a list, refusing a lone string: `list("text")` would be one prompt per character.
    (A lone list of ints is refused too, as a batch of one-token prompts is never what was meant.)"""
    if isinstance(prompts, (str, bytes)):
        raise GptforgeError(f"{what} is a list of prompts, got a single string; pass [{prompts[:20]!r}...] "
                            "or use the one-prompt function (generate, stream)")
    prompts = list(prompts)
    if prompts and _token_ids(prompts):
        raise GptforgeError(f"{what} is a list of prompts, got one list of token ids; wrap it: [ids]")
    return prompts


def fit_prompts(prompts: list[list[int]], p: SamplingParams, block_size: int) -> list[list[int]]:
    """The prompts (token-id lists) as they fit the context: a too-long one is an error, or with truncate_prompt
    keeps its end."""
    out = []
    for i, ids in enumerate(prompts):
        if isinstance(ids, (str, bytes)) or not _token_ids(ids):
            raise GptforgeError(f"prompt {i} must be token ids (a list of ints), got {_kind(ids)}; encode text "
                                "first (Tokenizer.encode), or use generate/stream/complete, which take text")
        if not ids:
            raise GptforgeError(f"prompt {i} encodes to no tokens")
        if len(ids) > block_size:
            if not p.truncate_prompt:
                raise GptforgeError(f"prompt {i} is {len(ids)} tokens but the model's context is {block_size}; "
                                    "shorten it, or pass truncate_prompt=True (--truncate-prompt) to keep its end")
            # Leave room for the new tokens too, as long as at least one prompt token remains.
            ids = ids[-max(1, block_size - p.max_new_tokens):]
        out.append(list(ids))
    return out


def stop_ids(tokenizer: Tokenizer, p: SamplingParams, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The ids that end a sequence: `extra` (a server's end-of-turn marker), and the end-of-sequence ids (EOS;
    generation_config.json may name several) unless stop_at_eos is off."""
    eos = tuple(i for i in tokenizer.eos_ids if i not in extra) if p.stop_at_eos else ()
    return (*extra, *eos)


class TextRow:
    """The decoded text of one sequence as its ids arrive: complete UTF-8 only, stop strings cut off.

    Ids are decoded incrementally by the tokenizer's StreamDecoder (a short window from the last point where the
    text was whole, no dangling UTF-8 byte), not from the start every time.
    """

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.tok, self.stops = tokenizer, stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""  # decoded so far, complete characters only
        self.stream = tokenizer.stream_decoder()  # holds the ids not yet decoded to complete characters
        self.emitted = 0  # characters of text handed out
        self.stopped = False

    def take(self, i: int, stop_ids: tuple[int, ...]) -> tuple[str, bool]:
        """Take the next id: the text now safe to hand out, and whether the sequence has ended (at a stop id,
        which is never decoded into the text, or at a stop string)."""
        if i in stop_ids:
            return self.flush(), True
        delta = self.add(i)
        return delta, self.stopped

    def add(self, i: int) -> str:
        """Take one id; return the text that is now safe to hand out."""
        piece = self.stream.step(i)
        if not piece:  # the id ended inside a multi-byte character: wait for the rest
            return ""
        start = max(0, len(self.text) - self.longest)
        self.text += piece
        hits = [j for j in (self.text.find(s, start) for s in self.stops) if j >= 0]
        if hits:  # a stop string may straddle ids: it is searched for in the text, not in the ids
            self.text, self.stopped = self.text[: min(hits)], True
            return self.flush()
        # Hold back a tail that could still grow into a stop string.
        hold = next((k for k in range(min(len(self.text), max(self.longest, 1) - 1), 0, -1)
                     if any(s.startswith(self.text[-k:]) for s in self.stops)), 0)
        safe = len(self.text) - hold
        out, self.emitted = self.text[self.emitted: safe], max(self.emitted, safe)
        return out

    def flush(self) -> str:
        """The rest of the text, once the sequence has finished."""
        if not self.stopped:  # ended inside a character: the replacement char is the truth
            self.text += self.stream.flush()
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
