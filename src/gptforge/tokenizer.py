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

from gptforge.errors import GptforgeError

EOS = "<|endoftext|>"
# Ids 0..7 of a trained tokenizer: EOS, two chat-turn markers (ChatML style) and five held in reserve.
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"] + [f"<|reserved_{i}|>" for i in range(3, 8)]
TOKENIZER_FILE = "tokenizer.json"


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
        hf.train_from_iterator(texts, trainer=trainer)
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

    # --- the interface ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The true number of token ids, special tokens included (the model pads its table above this)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; HF tokenizers spreads the batch over all cores."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text as ids arrive, holding back bytes until they complete a UTF-8 character."""
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

    @property
    def fingerprint(self) -> str:
        """A short hash of the vocabulary, merges and special tokens: equal fingerprints encode identically."""
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
