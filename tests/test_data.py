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


# --- arrow files and datasets folders ------------------------------------------------------------------------

def _write_arrow(path, table, *, stream=True, batch_rows=3):
    """An Arrow IPC file as `datasets` writes it (the stream format, several record batches), or the file format."""
    pa = pytest.importorskip("pyarrow")
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)


def _save_to_disk(folder, table, files=2):
    """A folder laid out as datasets' Dataset.save_to_disk lays it out: arrow shards listed in state.json."""
    folder.mkdir(parents=True)
    names, rows = [], table.num_rows
    for k in range(files):
        names.append(f"data-{k:05d}-of-{files:05d}.arrow")
        _write_arrow(folder / names[-1], table.slice(k * rows // files, (k + 1) * rows // files - k * rows // files))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names], "_split": None}))
    (folder / "dataset_info.json").write_text("{}")


@pytest.mark.parametrize("stream", [True, False])
def test_arrow_file_round_trip(tmp_path, small_tokenizer, stream):
    pa = pytest.importorskip("pyarrow")
    plain = tmp_path / "c.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in _TEXTS))
    f = tmp_path / "data.arrow"
    _write_arrow(f, pa.table({"id": list(range(len(_TEXTS))), "text": _TEXTS}), stream=stream)
    _prepare_same(tmp_path, small_tokenizer, [plain], [f])
    docs, _ = read_sources([str(f)])
    assert [d.text for d in docs] == _TEXTS and docs[4].name == f"{f}:4"
    with pytest.raises(GptforgeError, match=r"data.arrow: no column 'body'; columns: id, text; choose one with --text-field"):
        read_sources([str(f)], text_field="body")
    with pytest.raises(GptforgeError, match=r"column 'id' holds int64, not text"):
        read_sources([str(f)], text_field="id")
    f.write_bytes(b"not arrow at all")
    with pytest.raises(GptforgeError, match=r"data.arrow: not a readable Arrow IPC file"):
        read_sources([str(f)])


def test_save_to_disk_folders_and_splits(tmp_path, small_tokenizer):
    pa = pytest.importorskip("pyarrow")
    plain = tmp_path / "c.jsonl"
    plain.write_text("".join(json.dumps({"content": t}) + "\n" for t in _TEXTS))
    table = pa.table({"content": _TEXTS, "n": list(range(len(_TEXTS)))})
    _save_to_disk(tmp_path / "ds", table)
    _prepare_same(tmp_path, small_tokenizer, [plain], [tmp_path / "ds"], text_field="content")
    # a DatasetDict: one Dataset folder per split; train by default, --dataset-split for another
    dd = tmp_path / "dd"
    _save_to_disk(dd / "train", table.slice(0, 8))
    _save_to_disk(dd / "test", table.slice(8), files=1)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    docs, _ = read_sources([str(dd)], text_field="content")
    assert [d.text for d in docs] == _TEXTS[:8]
    docs, _ = read_sources([str(dd)], text_field="content", dataset_split="test")
    assert [d.text for d in docs] == _TEXTS[8:]
    with pytest.raises(GptforgeError, match=r"dd is a datasets DatasetDict without a 'validation' split; splits: train, test; choose one with --dataset-split"):
        read_sources([str(dd)], text_field="content", dataset_split="validation")
    (dd / "test" / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(GptforgeError, match=r"the dataset's file data-00000-of-00001.arrow is missing"):
        read_sources([str(dd)], dataset_split="test")


def test_real_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": _TEXTS, "label": [i % 2 for i in range(len(_TEXTS))]})
    ds.save_to_disk(str(tmp_path / "one"), num_shards=3)
    datasets.DatasetDict({"train": ds.select(range(5)), "validation": ds.select(range(5, 12))}).save_to_disk(str(tmp_path / "dd"))
    assert [d.text for d in read_sources([str(tmp_path / "one")])[0]] == _TEXTS
    assert [d.text for d in read_sources([str(tmp_path / "dd")])[0]] == _TEXTS[:5]
    assert [d.text for d in read_sources([str(tmp_path / "dd")], dataset_split="validation")[0]] == _TEXTS[5:]


# --- odd files: every reader warns as the text path does ----------------------------------------------------------

def test_odd_files_warn_alike_in_every_reader(tmp_path):
    """An empty document, invalid UTF-8 and a huge single line: the same documents and the same warnings (with
    each reader's file name) from text files, JSONL, gzip, parquet and arrow."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    huge = " ".join(f"w{i % 997}" for i in range(300_000))  # 1.7 MB, no newline
    raw = [b"", "caf\xe9 na\xefve".encode("latin-1"), huge.encode(), b"ok"]
    want_texts = ["caf\ufffd na\ufffdve", huge, "ok"]
    # text files: one per document
    tdir = tmp_path / "txt"
    tdir.mkdir()
    for i, r in enumerate(raw):
        (tdir / f"d{i}.txt").write_bytes(r)
    (tmp_path / "gz").mkdir()
    for i, r in enumerate(raw):
        (tmp_path / "gz" / f"d{i}.txt.gz").write_bytes(gzip.compress(r))
    column = pa.array(raw, type=pa.binary())  # invalid UTF-8 needs a binary column
    pq.write_table(pa.table({"text": column}), tmp_path / "t.parquet", row_group_size=2)
    _write_arrow(tmp_path / "t.arrow", pa.table({"text": column}), batch_rows=2)
    jsonl = tmp_path / "t.jsonl"  # JSON cannot hold invalid UTF-8 escaped, but the file's bytes can be invalid
    jsonl.write_bytes(b"".join(b'{"text": "' + r + b'"}\n' for r in raw))
    for source, names in [(tdir, [f"{tdir}/d{i}.txt" for i in range(4)]),
                          (tmp_path / "gz", [f"{tmp_path}/gz/d{i}.txt.gz" for i in range(4)]),
                          (jsonl, [f"{jsonl}:{i + 1}" for i in range(4)]),
                          (tmp_path / "t.parquet", [f"{tmp_path}/t.parquet:{i}" for i in range(4)]),
                          (tmp_path / "t.arrow", [f"{tmp_path}/t.arrow:{i}" for i in range(4)])]:
        docs, warnings = read_sources([str(source)])
        assert [d.text for d in docs] == want_texts, source
        bad_file = names[1] if source.is_dir() else str(source)
        assert warnings == [f"{bad_file}: not valid UTF-8; 2 invalid byte sequence(s) replaced with U+FFFD",
                            f"1 empty document(s) left out: {names[0]}"], source


# --- streaming: the split, the encoders, memory ---------------------------------------------------------------

def test_streaming_prepare_splits_and_encodes_as_split_documents(tmp_path, plays_dir, prepared):
    """prepare's val shard is split_documents' val documents, tokenized; tiktoken and HF tokenizers write the same
    bytes."""
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(read_sources([str(plays_dir)])[0]):
        for k, part in enumerate(doc.text.split("\n\n\n")[:6]):
            (src / f"{i}_{k:02d}.txt").write_text(part)
    tok = TokenData(prepared).tokenizer()
    a = prepare([str(src)], tmp_path / "a", tokenizer=prepared, val_fraction=0.3, seed=5, progress=False)
    b = prepare([str(src)], tmp_path / "b", tokenizer=prepared, val_fraction=0.3, seed=5, progress=False, fast=False)
    pytest.importorskip("tiktoken")
    assert (a.encoder, b.encoder) == ("tiktoken", "tokenizers")
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b") and a.tokens == b.tokens
    train, val = split_documents(read_sources([str(src)])[0], 0.3, seed=5)
    assert a.documents == {"train": len(train), "val": len(val)}
    want = np.concatenate([np.asarray(tok.encode(d.text) + [tok.eos_id]) for d in val])
    np.testing.assert_array_equal(np.concatenate(TokenData(tmp_path / "a").shards("val")), want)


def test_huge_line_is_cut_for_threads_and_encodes_the_same(prepared):
    tok = TokenData(prepared).tokenizer()
    line = "".join(f"{w} " if i % 7 else f"{w}, 'tis {i}; " for i, w in enumerate(["word", "Über", "x=1", "(a)", "  b"] * 4000))
    chunks = _chunks(line, 2000)
    assert len(chunks) > 20 and "".join(chunks) == line  # cut at spaces: no newline in it
    for fast in (True, False):
        ids = next(tokenize_documents(tok, [Document("x", line)], chunk_chars=2000, batch_chars=8000, fast=fast))
        assert ids.tolist() == tok.encode(line) + [tok.eos_id]


_PEAK_SCRIPT = """
import json, resource, sys
from gptforge.data import prepare
stats = prepare([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], progress=False, shard_tokens=1 << 20)
peak_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"peak_kb": peak_kb, "bytes": stats.bytes, "tokens": stats.tokens}))
"""


def test_memory_does_not_grow_with_the_corpus(tmp_path, small_tokenizer):
    """Peak RSS of prepare (in a fresh process) on a 3 MB and a 12 MB corpus differ by far less than the 9 MB of
    text between them (a bound of 2.5 MB, which the larger corpus exceeds almost fivefold): documents stream from
    the source to the shards, a batch of about 1 MB of text at a time. (Holding the documents, as prepare did
    until it streamed, grows the peak by more than the text.)"""
    import subprocess

    def corpus(name, mb):
        f = tmp_path / f"{name}.jsonl"
        rng = np.random.default_rng(0)
        words = np.array([f"w{i}" for i in range(300)])
        lines = [json.dumps({"text": " ".join(words[rng.integers(0, 300, 500)])}) + "\n" for _ in range(200)]
        with open(f, "w") as out:
            while out.tell() < mb * 1_000_000:
                out.writelines(lines)
        return f

    peaks = {}
    for name, mb in (("small", 3), ("large", 12)):
        r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(corpus(name, mb)), str(tmp_path / f"out_{name}"),
                            str(small_tokenizer)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        peaks[name] = json.loads(r.stdout)
    grown_mb = (peaks["large"]["peak_kb"] - peaks["small"]["peak_kb"]) / 1024
    text_mb = (peaks["large"]["bytes"] - peaks["small"]["bytes"]) / 1e6
    assert text_mb > 8.5 and grown_mb < 2.5, (grown_mb, peaks)


def test_parquet_shards_feed_train(tmp_path, plays_dir, capsys):
    """A folder of parquet shards -> `gptforge prepare` -> train, nothing in between (the loss falls)."""
    import dataclasses

    from gptforge.cli import main
    from gptforge.config import RunConfig, TrainConfig, model_preset
    from gptforge.train import train

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    plays = [p.read_text() for p in sorted(plays_dir.iterdir())[:2]]
    for k, play in enumerate(plays):
        scenes = play.split("\n\n\n")
        pq.write_table(pa.table({"id": list(range(len(scenes))), "content": scenes}),
                       shards / f"train-{k:05d}-of-{len(plays):05d}.parquet", row_group_size=16)
    data = tmp_path / "data"
    assert main(["prepare", str(shards), "--text-field", "content", "--vocab-size", "400", "--out", str(data), "--no-progress"]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == sum(len(p.split("\n\n\n")) for p in plays)
    tc = TrainConfig(micro_batch=8, seq_len=32, max_steps=20, warmup_steps=3, lr=3e-3, eval_every=20, eval_batches=2,
                     log_every=10, save_every=20, seed=0)
    result = train(RunConfig(model=model_preset("tiny"), train=tc, data=str(data), out=str(tmp_path / "run")), progress=False)
    assert result.steps == 20 and result.final_val_loss < result.first_val_loss - 0.5


def test_encoder_falls_back_to_hf_tokenizers(tmp_path, monkeypatch, small_tokenizer):
    """Without tiktoken, or when tiktoken's ids differ from HF's on the first batch, prepare encodes with HF
    tokenizers (the latter with a warning) and writes the same shards."""
    import gptforge.data as data
    import gptforge.fastencode as fastencode

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _TEXTS))
    ref = prepare([str(src)], tmp_path / "ref", tokenizer=small_tokenizer, progress=False, fast=False)
    monkeypatch.setattr(fastencode, "tiktoken", None)
    a = prepare([str(src)], tmp_path / "a", tokenizer=small_tokenizer, progress=False)
    assert a.encoder == "tokenizers" and not a.warnings
    monkeypatch.undo()
    pytest.importorskip("tiktoken")
    monkeypatch.setattr(data, "agrees", lambda *args: False)
    b = prepare([str(src)], tmp_path / "b", tokenizer=small_tokenizer, progress=False)
    assert b.encoder == "tokenizers" and any("tiktoken's ids differed" in w for w in b.warnings)
    assert _shards(tmp_path / "ref") == _shards(tmp_path / "a") == _shards(tmp_path / "b")
