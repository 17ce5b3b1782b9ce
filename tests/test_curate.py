"""`gptforge curate`: every rule at both sides of its threshold, dedup keeps exactly the first of each group,
redaction leaves the text around it byte for byte, mixing meets its weights, bad input is one clear line."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal

import numpy as np
import pytest

from gptforge.cli import main
from gptforge.corpora import Document, load_corpus
from gptforge.curate import CurateConfig, curate, curate_documents, parse_rules
from gptforge.curate.dedup import MinHasher, near_duplicate_groups, normalized_words, shingles, word_hashes, word_ids
from gptforge.curate.filters import LanguageIdentifier, c4_clean, first_failure, measure
from gptforge.curate.mix import parse_mix, plan_copies
from gptforge.curate.pii import find_pii, redact
from gptforge.data import TokenData
from gptforge.errors import GptforgeError

RNG = random.Random(0)
VOCAB = sorted({w for w in normalized_words(load_corpus("shakespeare")[0].text) if len(w) >= 3})


def words(n: int, seed: int = 0) -> list[str]:
    """n distinct real words (no repeated n-grams), mean length about 5."""
    return random.Random(seed).sample(VOCAB, n)


def fails(text: str, rule: str, **thresholds) -> bool:
    cfg = CurateConfig(rules=(rule,), **thresholds)
    return first_failure(measure(text)[0], cfg) == rule


# --- each rule on both sides of its threshold ----------------------------------------------------------------

def test_length():
    assert fails(" ".join(words(49)), "length") and not fails(" ".join(words(50)), "length")
    assert fails(" ".join(words(60)), "length", max_words=59) and not fails(" ".join(words(59)), "length", max_words=59)


def test_mean_word_length():
    two = " ".join(f"{a}{b}" for a in "abcdefgh" for b in "abcdefgh")  # mean 2.0
    three = " ".join(f"{a}{b}c" for a in "abcdefgh" for b in "abcdefgh")  # mean 3.0
    assert measure(three)[0]["mean_word_length"] == 3.0
    assert fails(two, "mean_word_length") and not fails(three, "mean_word_length")
    assert fails(three, "mean_word_length", max_mean_word_length=2.9)


def test_symbol_ratio():
    w = words(100)
    at = " ".join(w[:90] + ["#"] * 10)  # 10 '#' in 100 words: exactly 0.1
    over = " ".join(w[:89] + ["#"] * 11)
    assert measure(at)[0]["symbol_ratio"] == pytest.approx(0.1)
    assert not fails(at, "symbol_ratio") and fails(over, "symbol_ratio")


def test_alnum_ratio():
    half = "ab" * 50 + " " + "!?" * 50  # 100 letters, 100 symbols
    assert measure(half)[0]["alnum_ratio"] == 0.5
    assert not fails(half, "alnum_ratio") and fails(half + "!", "alnum_ratio")


def test_bullet_and_ellipsis_lines():
    w = words(60)
    lines = [" ".join(w[i * 6:(i + 1) * 6]) for i in range(10)]
    nine = "\n".join(["• " + ln for ln in lines[:9]] + lines[9:])
    ten = "\n".join("• " + ln for ln in lines)
    assert not fails(nine, "bullet_lines") and fails(ten, "bullet_lines")
    three = "\n".join([ln + "..." for ln in lines[:3]] + lines[3:])
    four = "\n".join([ln + "..." for ln in lines[:4]] + lines[4:])
    assert not fails(three, "ellipsis_lines") and fails(four, "ellipsis_lines")


def test_alpha_words():
    w = words(8)
    assert not fails(" ".join(w + ["12", "--"]), "alpha_words")  # 8 of 10
    assert fails(" ".join(w[:7] + ["12", "--", "3.5"]), "alpha_words")  # 7 of 10


def test_stop_words():
    w = [x for x in words(80) if x not in ("the", "and", "that", "have", "with")]
    assert fails(" ".join(w + ["the"]), "stop_words") and not fails(" ".join(w + ["the", "and"]), "stop_words")


def test_dup_lines():
    w = words(70)
    uniq = [" ".join(w[i * 7:(i + 1) * 7]) for i in range(10)]
    three = "\n".join(uniq[:7] + [uniq[0]] * 3)  # 3 of 10 lines repeat an earlier one
    four = "\n".join(uniq[:6] + [uniq[0]] * 4)
    loose = dict(max_dup_line_chars=1.0)
    assert measure(three)[0]["dup_line_fraction"] == pytest.approx(0.3)
    assert not fails(three, "dup_lines", **loose) and fails(four, "dup_lines", **loose)
    assert fails(three, "dup_lines", max_dup_line_chars=0.29)


def test_dup_paragraphs():
    w = words(70)
    paras = [" ".join(w[i * 7:(i + 1) * 7]) for i in range(10)]
    three = "\n\n".join(paras[:7] + [paras[1]] * 3)
    four = "\n\n".join(paras[:6] + [paras[1]] * 4)
    loose = dict(max_dup_para_chars=1.0)
    assert not fails(three, "dup_paragraphs", **loose) and fails(four, "dup_paragraphs", **loose)


def test_top_ngrams():
    w = words(100)
    text = " ".join(w + ["alpha", "beta"] * 10)
    s = measure(text)[0]
    chars = sum(map(len, w)) + 10 * 9
    assert s["top_2gram"] == pytest.approx(10 * 9 / chars)  # 'alpha beta' x 10 of all word characters
    assert not fails(text, "top_ngrams", max_top_ngram=(s["top_2gram"], 1, 1))
    assert fails(text, "top_ngrams", max_top_ngram=(s["top_2gram"] - 1e-6, 1, 1))


def test_dup_ngrams():
    w = words(200)
    text = " ".join(w[:100] + w[:20] + w[100:])  # 20 words repeated: they and their first copy are covered
    s = measure(text)[0]
    covered = 2 * sum(map(len, w[:20]))
    assert s["dup_5gram"] == pytest.approx(covered / (sum(map(len, w)) + sum(map(len, w[:20]))))
    assert s["dup_10gram"] == s["dup_5gram"]  # a 20-word repeat holds every n <= 20
    assert not fails(" ".join(w), "dup_ngrams")
    assert fails(text, "dup_ngrams") and not fails(text, "dup_ngrams", max_dup_ngram=(s["dup_5gram"],) * 6)


def test_c4_line_rules():
    cfg = CurateConfig(rules=("c4",))
    good = "This line ends well.\nThis one too, it does!\nAnd a third, fine.\n"
    assert c4_clean(good + "a menu line\nAccept our cookie policy now.\n", cfg) == good
    assert c4_clean(good + "x = {1: 2}.\n", cfg) is None  # a curly brace: C4's guard against code
    assert c4_clean(good + "Lorem ipsum dolor sit amet.\n", cfg) is None
    assert c4_clean("Only one sentence here.\n", cfg) is None
    assert c4_clean("Only one sentence here.\n", dataclasses.replace(cfg, c4_min_sentences=1)) is not None


@pytest.mark.skipif(LanguageIdentifier is None, reason="py3langid not installed")
def test_language():
    en = "The quick brown fox jumps over the lazy dog while the children watch from the window of the house."
    fr = "Le renard brun rapide saute par-dessus le chien paresseux pendant que les enfants regardent par la fenêtre."
    kept, report = curate_documents([Document("en", en), Document("fr", fr)], CurateConfig(rules=("language",), dedup=()))
    assert [d.name for d in kept] == ["en"] and report.removed["language"]["documents"] == 1
    kept, _ = curate_documents([Document("fr", fr)], CurateConfig(rules=("language",), dedup=(), languages=("fr",)))
    assert [d.name for d in kept] == ["fr"]


def test_rules_spec():
    assert parse_rules("length,dup_lines") == ("length", "dup_lines")
    assert "c4" in parse_rules("+c4") and "dup_ngrams" not in parse_rules("-dup_ngrams")
    assert parse_rules("none") == ()
    with pytest.raises(GptforgeError, match="unknown rule 'lenght'"):
        parse_rules("lenght")
    with pytest.raises(GptforgeError, match="unknown rule"):
        CurateConfig(rules=("nope",))
    with pytest.raises(GptforgeError, match="either rules by name"):
        parse_rules("length,+c4")


# --- dedup ---------------------------------------------------------------------------------------------------

def _edited(text: str, n_edits: int, seed: int) -> str:
    w = text.split()
    rng = random.Random(seed)
    for _ in range(n_edits):
        w[rng.randrange(len(w))] = rng.choice(VOCAB)
    return " ".join(w)


def _planted() -> tuple[list[Document], list[int]]:
    """Groups of (original, exact copy with case/space changes, near copy with 1% words edited), shuffled in,
    and distinct documents; returns the docs and each doc's group (-1: a single)."""
    originals = [" ".join(words(400, seed=s)) for s in range(6)]
    docs, group = [], []
    for g, t in enumerate(originals):
        for variant in (t, "  " + t.upper().replace(" ", "\n", 3), _edited(t, 4, g)):
            docs.append(Document(f"g{g}-{len(docs)}", variant))
            group.append(g)
    for s in range(6, 12):
        docs.append(Document(f"single{s}", " ".join(words(400, seed=s))))
        group.append(-1)
    order = list(range(len(docs)))
    RNG.shuffle(order)
    return [docs[i] for i in order], [group[i] for i in order]


def test_dedup_keeps_exactly_the_first_of_each_group_and_is_deterministic():
    docs, group = _planted()
    cfg = CurateConfig(rules=(), pii=())
    kept, report = curate_documents(docs, cfg, workers=1)
    first = {}
    for d, g in zip(docs, group):
        first.setdefault(g, d.name) if g >= 0 else None
    expected = [d.name for d, g in zip(docs, group) if g < 0 or first[g] == d.name]
    assert [d.name for d in kept] == expected
    assert report.removed["exact"]["documents"] == 6 and report.removed["near"]["documents"] == 6
    again, _ = curate_documents(docs, cfg, workers=2)
    assert again == kept


def test_near_duplicate_threshold():
    base = " ".join(words(500, seed=3))
    hasher = MinHasher(256, backend="numpy")
    for edits, similar in ((2, True), (60, False)):  # ~0.98 vs ~0.5 Jaccard of word 5-grams
        other = _edited(base, edits, 1)
        sets = [shingles(word_hashes(*word_ids(normalized_words(t))), 5) for t in (base, other)]
        true_j = len(np.intersect1d(*sets)) / len(np.union1d(*sets))
        labels = near_duplicate_groups(hasher.signatures(sets), 0.8)
        assert (labels[1] == 0) == similar == (true_j >= 0.8)


def test_boilerplate_line_kept_where_first_seen():
    line = "Copyright 2026 The Example Project. All rights reserved worldwide, always."
    docs = [Document(f"d{i}", f"{' '.join(words(80, seed=i))}\n{line}\n") for i in range(4)]
    kept, report = curate_documents(docs, CurateConfig(rules=(), pii=()), workers=1)
    assert [line in d.text for d in kept] == [True, False, False, False]
    assert report.boilerplate["lines"] == 3 and report.boilerplate["distinct"] == 1
    assert kept[1].text == " ".join(words(80, seed=1)) + "\n"


# --- privacy -------------------------------------------------------------------------------------------------

PII_TEXT = ("Write to ada.lovelace@example.org or call (555) 123-4567 / +44 20 7946 0958. The server is at 10.0.4.21 "
            "and fe80::1ff:fe23:4567:890a.\napi_key = \"a1b2c3d4e5f6g7h8i9j0\"\nAWS AKIAIOSFODNN7EXAMPLE done.\n"
            "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD9\n-----END RSA PRIVATE KEY-----\nbye")


def test_redaction_round_trips_the_text_around_it():
    out, spans = redact(PII_TEXT)
    assert [s.kind for s in spans] == ["email", "phone", "phone", "ip", "ip", "key", "key", "private_key"]
    # put the originals back where the placeholders are: the surrounding bytes must be untouched
    restored = out
    for s in spans:
        restored = restored.replace({"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "key": "<KEY>",
                                     "private_key": "<PRIVATE_KEY>"}[s.kind], s.original, 1)
    assert restored == PII_TEXT
    assert "<EMAIL>" in out and "<IP_ADDRESS>" in out and "ada" not in out and "MIIB" not in out


def test_no_redaction_in_prose_or_code():
    prose = load_corpus("shakespeare")[0].text[:20000]
    code = ("def f(a, b):\n    return a @ b.T + x[1::2]  # version 3.11.2, 2026-12-05\n"
            "token = self._tokenizer_for_model_name\npassword = getpass()\nstd::vector<int> v; m.group(1)\n"
            "@property\ndef name(self): return 'x@y'\n")
    assert find_pii(prose) == [] and find_pii(code) == []


def test_keep_list_and_kinds():
    text = "mail root@localhost.com or ops@example.com from 127.0.0.1"
    out, _ = redact(text, keep=("root@localhost.com", "127.0.0.1"))
    assert out == "mail root@localhost.com or <EMAIL> from 127.0.0.1"
    assert redact(text, kinds=("ip",))[0] == "mail root@localhost.com or ops@example.com from <IP_ADDRESS>"


# --- mixing --------------------------------------------------------------------------------------------------

def test_mix_weights_met_within_sampling_error():
    rng = np.random.default_rng(0)
    sizes = {"books": rng.integers(500, 1500, 3000), "code": rng.integers(100, 300, 3000)}
    weights = {"books": 0.3, "code": 0.7}  # books down-sampled, code up-sampled ~2.3x
    copies = plan_copies(sizes, weights, seed=1)
    got = {k: float((sizes[k] * copies[k]).sum()) for k in sizes}
    share = got["code"] / sum(got.values())
    # sampling error of the fractional copies: sd of the code total / the total, about 0.002 here
    assert abs(share - 0.7) < 0.01
    assert copies["code"].min() >= 2 and copies["books"].max() <= 1
    assert all((plan_copies(sizes, weights, seed=1)[k] == copies[k]).all() for k in sizes)
    assert any((plan_copies(sizes, weights, seed=2)[k] != copies[k]).any() for k in sizes)


def test_mix_parse_errors(tmp_path):
    assert parse_mix("a=3,b=1", ["a", "b"]) == {"a": 0.75, "b": 0.25}
    with pytest.raises(GptforgeError, match="the weight of 'b' is 'lots', not a number"):
        parse_mix("a=1,b=lots", ["a", "b"])
    with pytest.raises(GptforgeError, match="not NAME=WEIGHT"):
        parse_mix("a=1,b", ["a", "b"])
    with pytest.raises(GptforgeError, match="not a source"):
        parse_mix("a=1,c=1", ["a", "b"])
    with pytest.raises(GptforgeError, match="no weight to the source 'b'"):
        parse_mix("a=1", ["a", "b"])
    bad = tmp_path / "mix.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(GptforgeError, match="not valid YAML"):
        parse_mix(str(bad), ["a"])
    bad.write_text("- a\n- b\n")
    with pytest.raises(GptforgeError, match="must be a mapping"):
        parse_mix(str(bad), ["a", "b"])
    good = tmp_path / "good.yaml"
    good.write_text("a: 1\nb: 3\n")
    assert parse_mix(str(good), ["a", "b"]) == {"a": 0.25, "b": 0.75}


# --- the verb ------------------------------------------------------------------------------------------------

def _corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs, _ = _planted()
    with open(src / "web.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text + "\nContact: ada@example.org"}) + "\n")
    (src / "notes.txt").write_text(" ".join(words(300, seed=99)))
    return src


def test_curate_writes_shards_meta_and_report(tmp_path):
    src = _corpus(tmp_path)
    out = tmp_path / "out"
    report = curate([f"web={src / 'web.jsonl'}", f"notes={src / 'notes.txt'}"], out,
                    CurateConfig(rules=("length",)), mix="web=0.5,notes=0.5", seed=3, workers=1)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"]["web"]["documents_in"] == 24 and meta["sources"]["web"]["documents_out"] == 12
    lines = [json.loads(x) for x in (out / "curated_00000.jsonl").read_text().splitlines()]
    assert all("<EMAIL>" in r["text"] for r in lines if r["source"] == "web")
    assert report.pii["email"] == 12 and abs(report.mix["notes"]["share"] - 0.5) < 0.1
    assert json.loads((out / "report.json").read_text())["removed"]["exact"]["documents"] == 6
    with pytest.raises(GptforgeError, match="already exists and is not empty"):
        curate([str(src / "notes.txt")], out)


def test_tokens_per_source_and_mix_by_tokens(tmp_path, prepared):
    src = _corpus(tmp_path)
    out = tmp_path / "out"
    report = curate([f"web={src / 'web.jsonl'}", f"notes={src / 'notes.txt'}"], out, CurateConfig(rules=()),
                    mix="web=1,notes=1", workers=1, tokenizer=prepared / "tokenizer.json")
    meta = json.loads((out / "meta.json").read_text())
    tok = TokenData(prepared).tokenizer()
    kept = [json.loads(x) for x in (out / "curated_00000.jsonl").read_text().splitlines()]
    notes = sum(len(tok.encode(r["text"])) for r in kept if r["source"] == "notes")
    assert meta["sources"]["notes"]["mix"]["tokens"] == notes  # the one notes document, written r times
    assert meta["sources"]["notes"]["tokens_out"] == len(tok.encode(" ".join(words(300, seed=99))))
    assert report.mix["web"]["tokens"] == sum(len(tok.encode(r["text"])) for r in kept if r["source"] == "web")


def test_cli_dry_run_json_and_bad_input(tmp_path, capsys):
    src = _corpus(tmp_path)
    assert main(["curate", str(src), "--dry-run", "--json", "--rules", "length", "--workers", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["removed"]["exact"]["documents"] == 6 and list(tmp_path.iterdir()) == [src]
    for args, message in ((["--rules", "lenght"], "error: unknown rule 'lenght'"),
                          (["--mix", "src=heavy"], "error: --mix: the weight of 'src' is 'heavy', not a number"),
                          (["--dedup", "fuzzy"], "error: unknown dedup step 'fuzzy'")):
        assert main(["curate", str(src), "--out", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        main(["curate", str(src), "--out", str(tmp_path / "o"), "--min-words", "ten"])
    assert e.value.code == 2 and "invalid int value: 'ten'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prepare_dedup_option(tmp_path, capsys):
    src = _corpus(tmp_path)
    assert main(["prepare", str(src / "web.jsonl"), "--out", str(tmp_path / "data"), "--dedup", "--vocab-size", "300",
                 "--no-progress"]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 12
    assert meta["curate"]["removed"]["exact"]["documents"] == 6


def _die(batch):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dead_worker_is_an_error_not_a_hang(monkeypatch):
    from gptforge.curate import pipeline

    monkeypatch.setattr(pipeline, "_measure", _die)  # the forked workers see it
    docs = [Document(str(i), f"word{i} " * 300_000) for i in range(4)]  # 4 batches: the pool is used
    with pytest.raises(GptforgeError, match="worker process died"):
        curate_documents(docs, workers=2)


def test_perplexity_rule(prepared, tmp_path):
    import math

    import torch

    from gptforge.checkpoint import write_checkpoint
    from gptforge.config import RunConfig, TrainConfig, model_preset
    from gptforge.curate.perplexity import PerplexityScorer
    from gptforge.model import GPT

    tok = TokenData(prepared).tokenizer()
    cfg = RunConfig(model=dataclasses.replace(model_preset("tiny"), vocab_size=tok.vocab_size, block_size=64),
                    train=TrainConfig(tensorboard=False))
    torch.manual_seed(1)
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, tok, model_state=GPT(cfg.model).state_dict())
    text = " ".join(words(120))
    ppl = PerplexityScorer(str(ckpt))(text)
    ids = [tok.eos_id] + tok.encode(text)  # the same number by hand: mean next-token loss over 64-token windows
    torch.manual_seed(1)
    model = GPT(cfg.model).eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(torch.tensor(ids[s:s + 65])[None, :-1])[0],
                                                    torch.tensor(ids[s + 1:s + 65]), reduction="sum")
                  for s in range(0, min(len(ids) - 1, 256), 64)]
    n = min(len(ids) - 1, 256)
    assert ppl == pytest.approx(math.exp(float(sum(losses)) / n), rel=1e-4)
    docs = [Document("a", text)]
    keep = CurateConfig(rules=("perplexity",), dedup=(), perplexity_model=str(ckpt), max_perplexity=ppl * 1.01)
    drop = dataclasses.replace(keep, max_perplexity=ppl * 0.99)
    assert len(curate_documents(docs, keep, workers=1)[0]) == 1
    kept, report = curate_documents(docs, drop, workers=1)
    assert kept == [] and report.removed["perplexity"]["documents"] == 1
