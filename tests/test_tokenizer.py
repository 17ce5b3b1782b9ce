import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hftok
from gptforge.data import TokenData, prepare
from gptforge.errors import GptforgeError
from gptforge.text import TextRow, prompt_ids
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


# --- any tokenizer.json, with the settings of the files beside it -------------------------------------------

SPM_SPECIALS = ["<unk>", "<s>", "</s>"]
SHAPES = {
    # name: (tokenizer, tokenizer_config.json)
    "llama2": (lambda: hftok.sentencepiece(SPM_SPECIALS, legacy=True),
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}),
    "mistral": (lambda: hftok.sentencepiece(SPM_SPECIALS, legacy=False),
                {"bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
                 "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True}}),
    "gemma": (lambda: hftok.gemma(["<unk>", "<bos>", "<eos>", "<pad>"]),
              {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}),
    "unigram": (lambda: hftok.unigram(SPM_SPECIALS), {"bos_token": "<s>", "eos_token": "</s>"}),
    "llama3": (lambda: hftok.byte_level(["<|begin_of_text|>", "<|end_of_text|>"], bos="<|begin_of_text|>"),
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
}
TEXTS = ["Hello world, the fox ✓ 漢字!", "  two leading spaces and a trailing one ", "fox\n\n\tdog", "", "Ünïcödé 😀 x",
         "</s> and <s> inside text", "def add(a, b):\n    return a + b\n"]


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request, tmp_path_factory):
    """(name, ours, transformers'), both loaded from one HF folder."""
    transformers = pytest.importorskip("transformers")
    build, config = SHAPES[request.param]
    folder = hftok.hf_folder(tmp_path_factory.mktemp(request.param), build(), config)
    return request.param, Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)


def test_hf_tokenizers_encode_decode_like_transformers(shape):
    name, ours, theirs = shape
    assert ours.start_ids == ((ours.bos_id,) if name != "unigram" else ())
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text, start=True) == ids, (name, text)
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], (name, text)
        # Byte fallback loses nothing, with two exceptions these tokenizers have in transformers too: Llama 2's
        # legacy normalizer adds a space after a special token; Metaspace does not add its space before a text that
        # starts with one, yet the decoder strips one.
        if not (name == "llama2" and "<s>" in text) and not (name in ("mistral", "unigram") and text[:1] == " "):
            assert ours.decode(ours.encode(text)) == text, (name, text)
        assert ours.decode(ids) == theirs.decode(ids), (name, text)
    assert ours.eos_id == theirs.eos_token_id and ours.bos_id == theirs.bos_token_id
    assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else ours.eos_id)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=12), max_size=5))
def test_streaming_equals_decode_for_every_shape(shape, words):
    """Incremental decoding (decode_stream, TextRow) hands out exactly decode's text: SentencePiece's decoder drops
    a text's first space and byte fallback splits characters over ids, so a piece decoded alone would be wrong."""
    _, ours, _ = shape
    text = " ".join(words)
    ids = ours.encode(text, start=True)
    assert "".join(ours.decode_stream(ids)) == ours.decode(ids)
    row = TextRow(ours, ())
    assert "".join(row.add(i) for i in ids) + row.flush() == ours.decode(ids)


def test_stream_holds_split_characters_and_spaces(shape):
    name, ours, _ = shape
    ids = ours.encode("a ✓ b")
    deltas = list(ours.decode_stream(ids))
    assert "".join(deltas) == "a ✓ b" and "\ufffd" not in "".join(deltas)
    assert any(d.startswith(" ") for d in deltas[1:])  # the spaces survive piecewise decoding
    stream = ours.stream_decoder()
    cut = [stream.step(i) for i in ours.encode("✓")]
    assert "".join(cut) + stream.flush() == "✓"


def test_prompt_ids_start_with_bos_where_the_tokenizer_puts_one(shape):
    name, ours, _ = shape
    assert prompt_ids(ours, "hi") == [*ours.start_ids, *ours.encode("hi")]
    assert prompt_ids(ours, "") == list(ours.start_ids or [ours.eos_id])


def test_settings_from_special_tokens_map_and_generation_config(tmp_path):
    tok = hftok.sentencepiece(SPM_SPECIALS)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    t = Tokenizer.load(tmp_path)
    assert (t.eos_id, t.eos_ids, t.bos_id, t.pad_id, t.start_ids) == (2, (2, 0), 1, 2, (1,))
    assert t.hf_config(64)["gptforge_stop_tokens"] == ["<unk>"]  # generation_config's extra end ids travel along
    # No post-processor: the config's add_bos_token decides.
    tok.post_processor = None
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>",
                                                                "add_bos_token": True}))
    assert Tokenizer.load(tmp_path).start_ids == (1,)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    t = Tokenizer.load(tmp_path)
    assert t.render_chat([{"role": "user", "content": "x"}]) == "<s>x"


def test_trained_tokenizer_keeps_its_settings_through_save(tok, tmp_path):
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == EOS and "chat_template" in cfg and "model_max_length" not in cfg
    again = Tokenizer.load(tmp_path)
    assert (again.eos_ids, again.bos_id, again.start_ids, again.fingerprint) == ((0,), 0, (), tok.fingerprint)
    assert again.chat_stop_ids == (tok.im_end_id, tok.eos_id)


def test_bad_hf_tokenizer_files_are_one_line_errors(tmp_path):
    tok = hftok.sentencepiece(SPM_SPECIALS)
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(GptforgeError, match="names no end-of-sequence token.*eos_token") as e:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    with pytest.raises(GptforgeError, match="eos_token '<|eot|>' is not in tokenizer.json's vocabulary"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(GptforgeError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": "{% if %}"}))
    t = Tokenizer.load(tmp_path)
    with pytest.raises(GptforgeError, match="chat template does not parse"):
        t.encode_chat([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(GptforgeError, match="not a valid tokenizer.json") as e:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(e.value)


def test_unused_settings_and_sentencepiece_model_alone(tmp_path):
    """A pad or bos token the vocabulary lacks is left unused (pad falls back to EOS); a folder with only
    SentencePiece's tokenizer.model names the conversion."""
    hftok.hf_folder(tmp_path / "a", hftok.sentencepiece(SPM_SPECIALS), {"eos_token": "</s>", "pad_token": "<pad>",
                                                                         "bos_token": "<bos>"})
    t = Tokenizer.load(tmp_path / "a")
    assert (t.pad_id, t.bos_id, t.start_ids) == (t.eos_id, None, (1,))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(GptforgeError, match="tokenizer.model but no tokenizer.json.*save_pretrained"):
        Tokenizer.load(tmp_path / "b")


def test_prepare_with_an_hf_sentencepiece_tokenizer(tmp_path):
    """prepare loads an HF folder's tokenizer with its settings: each document is written as the tokenizer starts
    a sequence (BOS), its ids, then its EOS, and the shards decode back to the documents."""
    folder = hftok.hf_folder(tmp_path / "hf", hftok.sentencepiece(SPM_SPECIALS),
                             {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages[0].content }}"})
    docs = ["The quick brown fox ✓.", "Who art thou?", "漢字 and more\n\ntext"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([str(tmp_path / "c.jsonl")], tmp_path / "data", tokenizer=str(folder), val_fraction=0.0, progress=False)
    data = TokenData(tmp_path / "data")
    tok = data.tokenizer()
    assert (tok.eos_id, tok.start_ids, tok.chat_template) == (2, (1,), "{{ messages[0].content }}")
    ids = np.concatenate(data.shards("train")).tolist()
    assert ids == [i for d in docs for i in (1, *tok.encode(d), 2)]
    segments = np.split(np.array(ids), np.flatnonzero(np.array(ids) == 2)[:-1] + 1)
    assert [tok.decode(seg[1:-1].tolist()) for seg in segments] == docs
