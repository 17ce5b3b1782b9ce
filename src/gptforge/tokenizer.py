"""One tokenizer interface (`encode`, `decode`, `eos_id`, `vocab_size`) over a byte-level BPE from HF `tokenizers`.

Byte-level BPE maps every UTF-8 byte to a symbol before merging, so any text encodes without unknown tokens
and decodes back exactly. Trained tokenizers carry `<|endoftext|>` (the document separator) and a few more
special tokens reserved for chat templates, so that fine-tuning never has to resize the vocabulary for them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptforge.errors import GptforgeError, not_one_string

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Ids 0..7 of a trained tokenizer: EOS, two chat-turn markers (ChatML style) and five held in reserve.
SPECIAL_TOKENS = [EOS, IM_START, IM_END] + [f"<|reserved_{i}|>" for i in range(3, 8)]
CHAT_ROLES = ("system", "user", "assistant")
TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
# encode_chat's layout as a Jinja template, for transformers' apply_chat_template
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '"
    + IM_END + "' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """A byte-level BPE tokenizer; build one with `train`, `load` or `from_gpt2_files`."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        eos = hf.token_to_id(EOS)
        if eos is None:
            raise GptforgeError(f"tokenizer has no {EOS} token; gptforge separates documents with it")
        self.eos_id: int = eos

    # --- construction -----------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE of `vocab_size` tokens (special tokens included) on an iterator of texts."""
        floor = 256 + len(SPECIAL_TOKENS)
        if vocab_size < floor:
            raise GptforgeError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least {floor} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
            show_progress=False,
        )
        hf.train_from_iterator(not_one_string(texts, "Tokenizer.train's texts"), trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json`, or a folder holding one (or GPT-2's `vocab.json` + `merges.txt`)."""
        p = Path(path)
        if p.is_dir():
            if (p / TOKENIZER_FILE).is_file():
                p = p / TOKENIZER_FILE
            elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
                return cls.from_gpt2_files(p / "vocab.json", p / "merges.txt")
            else:
                raise GptforgeError(f"{p} holds neither {TOKENIZER_FILE} nor vocab.json + merges.txt")
        if not p.is_file():
            raise GptforgeError(f"tokenizer not found: {p} (give a tokenizer.json or a folder with vocab.json + merges.txt)")
        try:
            return cls(HFTokenizer.from_file(str(p)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise GptforgeError(f"{p}: not a valid tokenizer.json ({e})") from None

    @classmethod
    def from_gpt2_files(cls, vocab: str | Path, merges: str | Path) -> Tokenizer:
        """GPT-2's own BPE from its `vocab.json` and `merges.txt` (offline: the files must be local)."""
        for f in (vocab, merges):
            if not Path(f).is_file():
                raise GptforgeError(f"GPT-2 tokenizer file not found: {f}")
        try:
            hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise GptforgeError(f"cannot read GPT-2 BPE files {vocab}, {merges}: {e}") from None
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([EOS])  # already id 50256 in GPT-2's vocab: marks it special, adds nothing
        return cls(hf)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (to `path`, or into it when it is a folder); returns the file written."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        self.hf.save(str(p))
        return p

    def hf_config(self, model_max_length: int) -> dict:
        """The content of `tokenizer_config.json`: beside tokenizer.json, it lets transformers' AutoTokenizer load
        the folder offline (export-hf's folders; every checkpoint, which lm-evaluation-harness reads this way)."""
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS, "unk_token": EOS,
               "model_max_length": model_max_length, "clean_up_tokenization_spaces": False, "add_prefix_space": False}
        if self.has_chat_template:
            cfg["chat_template"] = CHATML_TEMPLATE
        return cfg

    # --- the interface ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The true number of token ids, special tokens included (the model pads its table above this)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise GptforgeError(f"Tokenizer.encode takes one string, got a {type(text).__name__}; "
                                "for a list of texts use encode_batch")
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; HF tokenizers spreads the batch over all cores."""
        texts = list(not_one_string(texts, "Tokenizer.encode_batch's texts"))
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        if isinstance(ids, (str, bytes)):
            raise GptforgeError("Tokenizer.decode takes token ids (a list of ints), got a string")
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text as ids arrive, holding back bytes until they complete a UTF-8 character."""
        if isinstance(ids, (str, bytes)):
            raise GptforgeError("Tokenizer.decode_stream takes token ids (ints), got a string")
        seen: list[int] = []
        emitted = ""
        for i in ids:
            seen.append(i)
            text = self.decode(seen)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
                continue
            yield text[len(emitted):]
            emitted = text
        if len(seen) and (text := self.decode(seen)) != emitted:
            yield text[len(emitted):]

    # --- chat template ----------------------------------------------------------------------------------
    # One template, ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message. A tokenizer has it exactly
    # when both markers are special tokens of its vocabulary: trained tokenizers always do; an imported GPT-2
    # tokenizer gains them through `add_chat_tokens` (and its model through an embedding resize).
    @property
    def has_chat_template(self) -> bool:
        return all(self._special_id(t) is not None for t in (IM_START, IM_END))

    def _special_id(self, token: str) -> int | None:
        specials = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        return self.hf.token_to_id(token) if token in specials else None

    @property
    def im_end_id(self) -> int:
        """The id that ends a chat turn: generation for a chat stops there."""
        self._require_chat()
        return self.hf.token_to_id(IM_END)

    def add_chat_tokens(self) -> int:
        """Add the ChatML markers as special tokens where missing; returns how many ids were added."""
        before = self.vocab_size
        self.hf.add_special_tokens([t for t in (IM_START, IM_END) if self._special_id(t) is None])
        return self.vocab_size - before

    def _require_chat(self) -> None:
        if not self.has_chat_template:
            raise GptforgeError(f"this tokenizer has no chat template (no {IM_START}/{IM_END} special tokens); "
                                "fine-tune it for chat first: gptforge finetune --task chat adds them")

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation in ChatML, and for each id whether it is assistant-written.

        The assistant mask covers an assistant message's content and its closing marker (so that a model trained
        on it learns to stop), never the role header. `add_generation_prompt` ends with an open assistant turn.
        """
        self._require_chat()
        if not isinstance(messages, list) or not messages:
            raise GptforgeError("messages must be a non-empty list of {\"role\", \"content\"} objects")
        ids: list[int] = []
        mask: list[bool] = []

        def put(text: str, assistant: bool) -> None:
            part = self.hf.encode(text, add_special_tokens=False).ids if text else []
            ids.extend(part)
            mask.extend([assistant] * len(part))

        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise GptforgeError(f"message {i}: needs a string \"role\" and a string \"content\"")
            if m["role"] not in CHAT_ROLES:
                raise GptforgeError(f"message {i}: unknown role {m['role']!r}; use one of {', '.join(CHAT_ROLES)}")
            is_assistant = m["role"] == "assistant"
            put(f"{IM_START}{m['role']}\n", False)
            put(f"{m['content']}{IM_END}", is_assistant)
            put("\n", False)
        if add_generation_prompt:
            put(f"{IM_START}assistant\n", False)
        return ids, mask

    @property
    def fingerprint(self) -> str:
        """A short hash of the vocabulary, merges and special tokens: equal fingerprints encode identically."""
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
