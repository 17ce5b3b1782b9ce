"""Tiny tokenizers in the shapes real models ship, built here (no download), and HF folders around them.

byte_level: GPT-2 / Qwen / Llama 3 (ByteLevel pre-tokenizer and decoder; optionally a post-processor adding BOS).
sentencepiece: Llama 2 / Mistral / Phi-3 (BPE with byte fallback, the legacy normalizer that prepends and
replaces spaces with U+2581, a decoder that strips the first space, a post-processor adding <s>).
gemma: BPE with byte fallback, spaces replaced but none prepended, <bos> added.
unigram: a Unigram model with byte fallback behind the Metaspace pre-tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away into the woods.",
    "Who art thou? A friend, my lord, who comes to see your father's house and the garden beyond it.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five\n",
    "What is the weather in Paris today? It is sunny, with a light wind from the west and 21 degrees.",
    "Tools: get_weather(city) returns the temperature; call it with a JSON object of arguments.",
] * 20
BYTES = [f"<0x{b:02X}>" for b in range(256)]
SPM = "\u2581"


def _with_specials(tok: Tokenizer, special: list[str], plain: list[str] = ()) -> Tokenizer:
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if plain:  # added but not special, as Qwen's <tool_call>
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return tok


def byte_level(special: list[str], plain: list[str] = (), bos: str | None = None, vocab: int = 400) -> Tokenizer:
    """A byte-level BPE; `bos`: a post-processor puts it before every encoded text (Llama 3)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok = _with_specials(tok, [], plain)
    if bos is not None:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    return tok


def _spm_bpe(special: list[str], vocab: int) -> tuple[dict, list]:
    """vocab and merges of a BPE trained on U+2581-joined words, with the 256 byte tokens after the specials."""
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence([normalizers.Prepend(SPM), normalizers.Replace(" ", SPM)])
    base.pre_tokenizer = pre_tokenizers.Split(SPM, behavior="merged_with_next")
    base.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=vocab, show_progress=False))
    learned = json.loads(base.to_str())["model"]
    ordered = [*special, *BYTES, *(t for t in sorted(learned["vocab"], key=learned["vocab"].get)
                                   if t not in special and t not in BYTES)]
    return {t: i for i, t in enumerate(ordered)}, [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                    for m in learned["merges"]]


def sentencepiece(special: list[str], bos: str = "<s>", vocab: int = 600, legacy: bool = True) -> Tokenizer:
    """Llama 2 / Mistral-style: special[0] is <unk>; `legacy` prepends U+2581 in the normalizer (Llama 2), else the
    Metaspace pre-tokenizer does it (prepend_scheme "first", as newer conversions)."""
    vocab_map, merges = _spm_bpe(special, vocab)
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=merges, unk_token=special[0], byte_fallback=True,
                               fuse_unk=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPM), normalizers.Replace(" ", SPM)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPM, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab_map[bos])])
    return _with_specials(tok, special)


def gemma(special: list[str], vocab: int = 600) -> Tokenizer:
    """Gemma-style: spaces become U+2581 (none prepended), byte fallback, <bos> (special[1]) added."""
    vocab_map, merges = _spm_bpe(special, vocab)
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=merges, unk_token=special[0], byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", SPM)
    tok.decoder = decoders.Sequence([decoders.Replace(SPM, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single=f"{special[1]} $A", pair=f"{special[1]} $A $B",
                                                       special_tokens=[(special[1], vocab_map[special[1]])])
    return _with_specials(tok, special)


def unigram(special: list[str], vocab: int = 300) -> Tokenizer:
    """A Unigram model with byte fallback behind Metaspace (special[0] is <unk>)."""
    base = Tokenizer(models.Unigram())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM, prepend_scheme="always")
    base.train_from_iterator(CORPUS, trainer=trainers.UnigramTrainer(vocab_size=vocab, special_tokens=special,
                                                                     unk_token=special[0], show_progress=False))
    pieces = json.loads(base.to_str())["model"]["vocab"]
    pieces = pieces[:len(special)] + [[b, 0.0] for b in BYTES] + [p for p in pieces[len(special):] if p[0] not in BYTES]
    tok = Tokenizer(models.Unigram([tuple(p) for p in pieces], unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM, prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.Replace(SPM, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return _with_specials(tok, special)


def hf_folder(path: Path, tok: Tokenizer, config: dict, generation: dict | None = None) -> Path:
    """A folder as a model repository ships it: tokenizer.json, tokenizer_config.json, generation_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path
