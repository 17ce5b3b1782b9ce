import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptforge.errors import GptforgeError
from gptforge.tokenizer import EOS, SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def tok(plays_dir) -> Tokenizer:
    texts = [p.read_text() for p in sorted(plays_dir.iterdir())]
    return Tokenizer.train(texts, vocab_size=600)


def test_trained_vocab_and_special_tokens(tok):
    assert tok.vocab_size == 600
    assert tok.eos_id == 0
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.encode(EOS) == [tok.eos_id]
    # Merges were learned: common English compresses below one byte per token.
    text = "To be, or not to be, that is the question."
    assert len(tok.encode(text)) < len(text.encode()) / 2


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_roundtrip_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_stream_deltas_join_to_decode(tok, text):
    ids = tok.encode(text)
    assert "".join(tok.decode_stream(ids)) == tok.decode(ids) == text


def test_save_load_keeps_fingerprint(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.fingerprint == tok.fingerprint
    assert again.encode("Wherefore art thou") == tok.encode("Wherefore art thou")
    other = Tokenizer.train(["a different corpus entirely"] * 10, vocab_size=300)
    assert other.fingerprint != tok.fingerprint


def test_gpt2_vocab_and_merges_files(tok, tmp_path):
    """A folder with GPT-2-style vocab.json + merges.txt loads offline and encodes like the original BPE."""
    tok.hf.model.save(str(tmp_path))  # writes vocab.json and merges.txt, the layout GPT-2 ships
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    gpt2 = Tokenizer.load(tmp_path)
    text = "My lord, I came to see your father's funeral. Ünïcödé ✓"
    assert gpt2.encode(text) == tok.encode(text)
    assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.eos_id == json.loads((tmp_path / "vocab.json").read_text())[EOS]


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(GptforgeError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(GptforgeError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(GptforgeError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path / "broken.json")
    with pytest.raises(GptforgeError, match="neither"):
        Tokenizer.load(tmp_path)


def test_chat_template_and_assistant_mask(tok, tmp_path):
    """ChatML rendering; the mask covers assistant content and its closing marker, token by token."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
            {"role": "assistant", "content": "A friend."}]
    ids, mask = tok.encode_chat(msgs)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n"
                               "<|im_start|>assistant\nA friend.<|im_end|>\n")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A friend.<|im_end|>"
    assert sum(mask) == len(tok.encode("A friend.")) + 1 and mask[-1] is False  # the trailing newline is not learnt
    prompt, pmask = tok.encode_chat(msgs[:2], add_generation_prompt=True)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n") and not any(pmask)
    assert tok.im_end_id == SPECIAL_TOKENS.index("<|im_end|>")
    with pytest.raises(GptforgeError, match="unknown role 'wizard'"):
        tok.encode_chat([{"role": "wizard", "content": "x"}])
    with pytest.raises(GptforgeError, match="message 0"):
        tok.encode_chat([{"role": "user"}])
    # A GPT-2-style tokenizer (vocab.json + merges.txt) has no chat template until the markers are added.
    tok.hf.model.save(str(tmp_path))
    gpt2 = Tokenizer.load(tmp_path)
    assert not gpt2.has_chat_template
    with pytest.raises(GptforgeError, match="no chat template"):
        gpt2.encode_chat(msgs)
    gpt2.add_chat_tokens()
    assert gpt2.has_chat_template and gpt2.decode(gpt2.encode_chat(msgs)[0]) == tok.decode(ids)
