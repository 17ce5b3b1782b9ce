"""fastencode: tiktoken reproduces a byte-level BPE's ids exactly, and declines the tokenizers it cannot."""

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from gptforge.corpora import load_corpus
from gptforge.fastencode import agrees, fast_encoder
from gptforge.tokenizer import EOS, SPECIAL_TOKENS, Tokenizer

pytest.importorskip("tiktoken")

# Text that exercises every branch of the split pattern: contractions, letters/numbers/other runs with and
# without a leading space, whitespace runs (before a word, at the end, mixed tabs, CRLF, Unicode spaces), scripts
# and emoji (multi-byte, and merges across bytes), invalid-looking replacement characters, special tokens inside
# words, and a long run (one pre-token of thousands of bytes).
VARIED = [
    "It's, we'll, they've, I'm, you'd, she'S, don't -- 'quoted' words.",
    "  two leading spaces\n\n\n  indented\tand\ttabs\t\t\nCRLF line\r\nend with spaces   ",
    "numbers 1234567890 3.14159 -42 1e10 ١٢٣ 一二三 ⅷ",
    "héllo wörld, naïve café; Ελληνικά; русский текст; עברית; العربية; हिन्दी; 日本語のテキスト; 한국어",
    "emoji 🎉🎉 👩‍👩‍👧 flags 🇫🇷 and symbols ∑∫√ ≠ ≤ ≥ → ⇒ ©®™",
    "\u00a0nbsp\u2028line sep\u3000ideographic\u0085nel \u200bzero width\ufeffbom \u202f narrow",
    f"before{EOS}after <|im_start|>user\nhi<|im_end|>\n<|reserved_5|><|endoftext|>{EOS}",
    "x" * 3000 + " " + "ab" * 1500 + "\n" * 50 + " " * 70 + "z",
    "def f(a, b):\n    return a**2 + b  # comment\n\n\nclass K:\n\tpass\n",
    "\ufffd\ufffd broken \ufffd bytes",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def trained():
    plays = [d.text for d in load_corpus("shakespeare")[:2]]
    return Tokenizer.train(plays + VARIED * 3, vocab_size=1200)


def test_trained_bpe_encodes_identically(trained):
    fast = fast_encoder(trained, threads=2)
    assert fast is not None
    plays = [d.text for d in load_corpus("shakespeare")[4:6]]
    texts = VARIED + [t[:20000] for t in plays]
    for text, ids in zip(texts, trained.encode_batch(texts)):
        got = fast.encode(text)
        assert got.dtype == np.uint32 and got.tolist() == ids, text[:40]
    batch = fast.encode_batch(texts * 3)  # threads, runs of texts: order kept
    assert [b.tolist() for b in batch] == trained.encode_batch(texts * 3)
    assert agrees(trained, fast, texts)
    # special tokens inside text are their ids, as HF matches added tokens
    assert fast.encode(f"a{EOS}b").tolist() == trained.encode(f"a{EOS}b")
    assert trained.eos_id in fast.encode(f"a{EOS}b").tolist()
    fast.close()


def test_gpt2_style_tokenizer_without_our_specials(trained):
    # A tokenizer trained with the special tokens added after training (ids above the merges, as GPT-2's 50256)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(VARIED * 5, trainer=trainers.BpeTrainer(
        vocab_size=500, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens([EOS])
    tok = Tokenizer(hf)
    fast = fast_encoder(tok)
    assert fast is not None and tok.eos_id == tok.vocab_size - 1  # after the merges
    assert [fast.encode(t).tolist() for t in VARIED] == tok.encode_batch(VARIED)


def _bpe(pre, normalizer=None, byte_fallback=False) -> Tokenizer:
    hf = HFTokenizer(models.BPE(byte_fallback=byte_fallback))
    hf.pre_tokenizer = pre
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.train_from_iterator(VARIED * 5, trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                                                   show_progress=False))
    return Tokenizer(hf)


def test_declines_what_tiktoken_cannot_reproduce(trained):
    # SentencePiece-style (Metaspace, a normalizer, byte fallback): HF tokenizers stays in charge
    assert fast_encoder(_bpe(pre_tokenizers.Metaspace(), normalizers.NFKC(), byte_fallback=True)) is None
    assert fast_encoder(_bpe(pre_tokenizers.Whitespace())) is None
    prefixed = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=True))  # GPT-2's split, but a space put first
    assert fast_encoder(prefixed) is None
    # a merge list out of id order: tiktoken's rank order would merge differently
    import json

    spec = json.loads(trained.hf.to_str())
    merges = spec["model"]["merges"]
    merges[10], merges[11] = merges[11], merges[10]
    swapped = Tokenizer(HFTokenizer.from_str(json.dumps(spec)))
    assert fast_encoder(swapped) is None
