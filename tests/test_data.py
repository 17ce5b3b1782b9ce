import gzip
import io
import json
import sys

import numpy as np
import pytest

from gptforge.corpora import Document
from gptforge.data import (BatchSampler, ShardWriter, TokenData, _chunks, prepare, read_sources, split_documents,
                           token_dtype, tokenize_documents)
from gptforge.errors import GptforgeError
from gptforge.tokenizer import Tokenizer


def test_dtype_choice():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128256) == np.uint32


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_shard_write_read_roundtrip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    high = np.iinfo(dtype).max
    arrays = [rng.integers(0, high, size=n, dtype=np.int64) for n in (5, 17, 1, 40)]
    w = ShardWriter(tmp_path, "train", np.dtype(dtype), shard_tokens=16)
    for a in arrays:
        w.write(a)
    w.close()
    assert [s["tokens"] for s in w.shards] == [16, 16, 16, 15]
    back = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.dtype(dtype).newbyteorder("<")) for s in w.shards])
    np.testing.assert_array_equal(back, np.concatenate(arrays))


def test_prepared_dir_reads_back(prepared):
    data = TokenData(prepared)
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["format"] == "gptforge.tokens" and meta["version"] == 1 and meta["dtype"] == "uint16"
    assert meta["tokenizer_fingerprint"] == data.tokenizer().fingerprint
    train = data.shards("train")
    assert sum(len(s) for s in train) == meta["splits"]["train"]["tokens"] > 100_000
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 2
    # Documents are separated by EOS: one per document.
    eos = data.meta["eos_id"]
    assert sum(int((s == eos).sum()) for s in train) == 2
    # The shard holds exactly what the tokenizer makes of the text.
    tok = data.tokenizer()
    assert tok.decode(train[0][:200].tolist()) == tok.decode(tok.encode(tok.decode(train[0][:200].tolist())))


def test_split_is_by_document_and_deterministic():
    docs = [Document(f"d{i}", f"text {i}") for i in range(40)]
    a = split_documents(docs, 0.1, seed=3)
    b = split_documents(docs, 0.1, seed=3)
    c = split_documents(docs, 0.1, seed=4)
    assert a == b and a != c
    train, val = a
    assert len(val) == 4 and len(train) == 36
    assert {d.name for d in train}.isdisjoint(d.name for d in val)


def test_single_document_is_cut_at_blank_lines():
    text = "\n\n".join(f"paragraph {i} with some words" for i in range(500))
    train, val = split_documents([Document("one", text)], 0.1, seed=0)
    assert len(val) >= 1 and len(train) >= 1
    assert "".join(d.text for d in sorted(train + val, key=lambda d: int(d.name.split("#")[1]))) == text


def test_chunked_encoding_equals_whole_document(plays_dir):
    text = next(plays_dir.iterdir()).read_text()
    tok = Tokenizer.train([text], vocab_size=700)
    chunks = _chunks(text, 2000)
    assert len(chunks) > 10 and "".join(chunks) == text
    ids = next(tokenize_documents(tok, [Document("x", text)], chunk_chars=2000))
    assert ids.tolist() == tok.encode(text) + [tok.eos_id]


def test_sampler_is_determined_by_its_state(prepared):
    shards = TokenData(prepared).shards("train")
    a = BatchSampler(shards, batch_size=4, seq_len=32, seed=7)
    first = [next(a) for _ in range(5)]
    for x, y in first:
        assert x.shape == y.shape == (4, 32)
        assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())  # y is x shifted by one
    state = a.state_dict()
    later = [next(a) for _ in range(3)]
    b = BatchSampler(shards, batch_size=4, seq_len=32, seed=0)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(later, [next(b) for _ in range(3)]):
        assert x1.equal(x2) and y1.equal(y2)
    c = BatchSampler(shards, batch_size=4, seq_len=32, seed=8)
    assert not next(c)[0].equal(first[0][0])
    with pytest.raises(GptforgeError, match="batch_size"):
        BatchSampler(shards, batch_size=2, seq_len=32).load_state_dict(state)


def test_sampler_rejects_split_shorter_than_window():
    with pytest.raises(GptforgeError, match="seq_len"):
        BatchSampler([np.zeros(10, dtype=np.uint16)], batch_size=1, seq_len=10)


# --- sources and bad input ---------------------------------------------------------------------------------

def test_sources_folder_glob_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x00")
    (tmp_path / "c.jsonl").write_text('{"text": "gamma"}\n\n{"text": "delta", "x": 1}\n')
    docs, warnings = read_sources([str(tmp_path)])
    assert sorted(d.text for d in docs) == ["alpha", "beta", "delta", "gamma"]
    docs, _ = read_sources([str(tmp_path / "**" / "*.md")])
    assert [d.text for d in docs] == ["beta"]
    assert not warnings


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(GptforgeError, match=r"bad.jsonl:2: not valid JSON"):
        read_sources([str(f)])
    f.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(GptforgeError, match=r"bad.jsonl:2: no 'text' field"):
        read_sources([str(f)])
    f.write_text('{"body": "x"}\n')
    docs, _ = read_sources([str(f)], text_field="body")
    assert [d.text for d in docs] == ["x"] and docs[0].name.endswith("bad.jsonl:1")


def test_invalid_utf8_is_replaced_and_reported(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café au lait".encode("latin-1"))
    docs, warnings = read_sources([str(f)])
    assert docs[0].text == "caf\ufffd au lait"
    assert len(warnings) == 1 and "latin1.txt" in warnings[0] and "1 invalid" in warnings[0]


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(GptforgeError, match="source not found"):
        read_sources([str(tmp_path / "nope.txt")])
    with pytest.raises(GptforgeError, match="matches no files"):
        read_sources([str(tmp_path / "*.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GptforgeError, match="empty corpus"):
        read_sources([str(tmp_path / "empty.txt")])
    with pytest.raises(GptforgeError, match="no text files"):
        (tmp_path / "d").mkdir()
        read_sources([str(tmp_path / "d")])


def test_prepare_with_given_tokenizer_and_rerun(tmp_path, prepared):
    src = tmp_path / "t.txt"
    src.write_text("Now is the winter of our discontent\n\nMade glorious summer by this sun of York.\n" * 50)
    out = tmp_path / "d"
    stats = prepare([str(src)], out, tokenizer=prepared / "tokenizer.json", val_fraction=0.1, progress=False)
    assert TokenData(out).fingerprint == TokenData(prepared).fingerprint
    assert stats.tokens["train"] > 0 and stats.tokens["val"] > 0
    (out / "train_00099.bin").write_bytes(b"stale")
    with pytest.raises(GptforgeError, match="--overwrite"):  # an existing output is replaced only when asked
        prepare([str(src)], out, tokenizer=prepared / "tokenizer.json", progress=False)
    assert (out / "train_00099.bin").exists()
    prepare([str(src)], out, tokenizer=prepared / "tokenizer.json", progress=False, overwrite=True)
    assert not (out / "train_00099.bin").exists()


def test_truncated_shard_is_detected(tmp_path, prepared):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    f = copy / "train_00000.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(GptforgeError, match="truncated"):
        TokenData(copy).shards("train")
    with pytest.raises(GptforgeError, match="not a prepared data directory"):
        TokenData(tmp_path)


# --- compressed, parquet, --include and stdin sources ---------------------------------------------------------

_TEXTS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(40)) + "\nsecond line\n"
          for i in range(12)]


def _shards(out) -> list[bytes]:
    meta = json.loads((out / "meta.json").read_text())
    return [(out / s["file"]).read_bytes() for split in ("train", "val") for s in meta["splits"][split]["shards"]]


def _prepare_same(tmp_path, tokenizer, plain: list, other: list, **kw):
    """prepare both source lists with one tokenizer; assert equal documents, tokens and shard bytes."""
    a = prepare([str(p) for p in plain], tmp_path / "a", tokenizer=tokenizer, progress=False, val_fraction=0.2, **kw)
    b = prepare([str(p) for p in other], tmp_path / "b", tokenizer=tokenizer, progress=False, val_fraction=0.2, **kw)
    assert a.documents == b.documents and a.documents["train"] + a.documents["val"] == len(_TEXTS)
    assert a.tokens == b.tokens and a.tokens["train"] > 100
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b")
    return b


@pytest.fixture
def small_tokenizer(tmp_path):
    path = tmp_path / "tok.json"
    Tokenizer.train(_TEXTS, vocab_size=300).save(path)
    return path


@pytest.mark.parametrize("suffix", [".txt.gz", ".md.gz", ".txt.zst"])
def test_compressed_text_round_trip(tmp_path, small_tokenizer, suffix):
    if suffix.endswith(".zst"):
        zstandard = pytest.importorskip("zstandard")
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    for i, t in enumerate(_TEXTS):
        (plain / f"d{i:02d}.txt").write_text(t)
        data = t.encode()
        (packed / f"d{i:02d}{suffix}").write_bytes(gzip.compress(data) if suffix.endswith(".gz")
                                                     else zstandard.ZstdCompressor().compress(data))
    _prepare_same(tmp_path, small_tokenizer, [plain], [packed])  # a folder picks up the compressed files


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_jsonl_round_trip(tmp_path, small_tokenizer, suffix):
    lines = "".join(json.dumps({"text": t}) + "\n" for t in _TEXTS).encode()
    plain = tmp_path / "c.jsonl"
    plain.write_bytes(lines)
    packed = tmp_path / f"c{suffix}"
    if suffix.endswith(".zst"):
        packed.write_bytes(pytest.importorskip("zstandard").ZstdCompressor().compress(lines))
    else:
        packed.write_bytes(gzip.compress(lines))
    _prepare_same(tmp_path, small_tokenizer, [plain], [packed])
    docs, _ = read_sources([str(packed)])
    assert docs[3].name == f"{packed}:4" and docs[3].text == _TEXTS[3]


def test_compressed_warnings_match_text_path(tmp_path):
    (tmp_path / "latin1.txt.gz").write_bytes(gzip.compress("café au lait\nnaïve".encode("latin-1")))
    (tmp_path / "empty.txt.gz").write_bytes(gzip.compress(b""))
    docs, warnings = read_sources([str(tmp_path)])
    assert [d.text for d in docs] == ["caf\ufffd au lait\nna\ufffdve"]
    assert any("latin1.txt.gz" in w and "2 invalid" in w for w in warnings)
    assert any("1 empty document(s)" in w and "empty.txt.gz" in w for w in warnings)


def test_corrupt_gz_is_one_line_error(tmp_path):
    f = tmp_path / "bad.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-20])  # truncated
    with pytest.raises(GptforgeError, match="bad.jsonl.gz: not a valid gzip file") as e:
        read_sources([str(f)])
    assert "\n" not in str(e.value)
    f.write_bytes(b"not gzip at all")
    with pytest.raises(GptforgeError, match="bad.jsonl.gz: not a valid gzip file"):
        read_sources([str(f)])


def test_parquet_round_trip_file_and_folder(tmp_path, small_tokenizer):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    plain = tmp_path / "c.jsonl"
    plain.write_text("".join(json.dumps({"body": t}) + "\n" for t in _TEXTS))
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):  # two files, each of several row groups
        half = _TEXTS[k * 6:(k + 1) * 6]
        pq.write_table(pa.table({"id": list(range(6)), "body": half}), shards / f"part{k}.parquet", row_group_size=2)
    assert pq.ParquetFile(shards / "part0.parquet").num_row_groups == 3
    _prepare_same(tmp_path, small_tokenizer, [plain], [shards], text_field="body")
    docs, _ = read_sources([str(shards / "part1.parquet")], text_field="body")
    assert [d.text for d in docs] == _TEXTS[6:] and docs[0].name.endswith("part1.parquet:0")


def test_parquet_missing_column_names_the_choices(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["hello"]}), f)
    with pytest.raises(GptforgeError, match=r"x.parquet: no column 'text'; columns: id, body; choose one with --text-field"):
        read_sources([str(f)])
    with pytest.raises(GptforgeError, match=r"column 'id' holds int64, not text"):
        read_sources([str(f)], text_field="id")


def test_include_patterns_choose_a_folders_files(tmp_path, small_tokenizer):
    tree = tmp_path / "src"
    for rel in ("pkg/a.py", "pkg/sub/b.py", "pkg/sub/deeper/c.py", "top.py", "README.md", "pkg/data.json", ".hidden/h.py"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(f"# {rel}\nprint({rel!r})\n")
    docs, _ = read_sources([str(tree)], include=["*.py"])
    assert [d.name for d in docs] == [str(tree / r) for r in ("pkg/a.py", "pkg/sub/b.py", "pkg/sub/deeper/c.py", "top.py")]
    docs, _ = read_sources([str(tree)], include=["*.py", "*.json"])
    assert len(docs) == 5
    docs, _ = read_sources([str(tree)], include=["pkg/sub/*"])  # a pattern with '/' matches the path below the folder
    assert [d.name for d in docs] == [str(tree / "pkg/sub/b.py"), str(tree / "pkg/sub/deeper/c.py")]
    docs, _ = read_sources([str(tree)])  # the default: text files only
    assert [d.name for d in docs] == [str(tree / "README.md")]
    with pytest.raises(GptforgeError, match=r"no files matching --include \*.rs"):
        read_sources([str(tree)], include=["*.rs"])
    stats = prepare([str(tree)], tmp_path / "out", tokenizer=small_tokenizer, include=("*.py",), progress=False)
    assert stats.documents["train"] + stats.documents["val"] == 4


def test_dash_reads_stdin(tmp_path, monkeypatch, small_tokenizer):
    text = "\n".join(_TEXTS)  # blank lines: the one document is cut there for the split
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode() + b"\xff")))
    docs, warnings = read_sources(["-"])
    assert [d.name for d in docs] == ["<stdin>"] and docs[0].text == text + "\ufffd"
    assert warnings == ["<stdin>: not valid UTF-8; 1 invalid byte sequence(s) replaced with U+FFFD"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))  # a text stream without .buffer
    plain = tmp_path / "all.txt"
    plain.write_text(text)
    a = prepare([str(plain)], tmp_path / "a", tokenizer=small_tokenizer, progress=False)
    b = prepare(["-"], tmp_path / "b", tokenizer=small_tokenizer, progress=False)
    assert a.tokens == b.tokens and _shards(tmp_path / "a") == _shards(tmp_path / "b")


def test_zst_without_zstandard_names_the_extra(tmp_path, monkeypatch):
    import gptforge.data as data

    monkeypatch.setattr(data, "zstandard", None)
    f = tmp_path / "c.jsonl.zst"
    f.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(GptforgeError, match=r"c.jsonl.zst: reading .zst files needs the zstandard package: pip install 'gptforge\[zstd\]'"):
        read_sources([str(f)])
