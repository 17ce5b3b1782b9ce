"""`gptforge curate` against its targets, on real text: the bundled plays (cut at scenes) and the standard
library of the Python running this (its .py files outside test folders).

    python benchmarks/curate.py dedup     # planted exact + near duplicates: precision / recall at Jaccard 0.8,
                                          # MinHash backends (numpy, rensa, datasketch) timed A B C A B C
    python benchmarks/curate.py pii       # planted PII: recall; every redaction in the unplanted text, listed
    python benchmarks/curate.py speed     # dedup + filters (no PII) on 1 and 2 worker processes, MB/s
    python benchmarks/curate.py memory    # peak RSS of any process on a corpus and one 4x larger
    python benchmarks/curate.py train     # the same model, the same tokens: 30% junk + duplicates vs curated first
    python benchmarks/curate.py all

Every part prints a JSON summary and writes it to --out (default runs/curate_bench/PART.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from gptforge.corpora import Document, load_corpus  # noqa: E402
from gptforge.curate.dedup import (MinHasher, _components, exact_groups, exact_key, normalized_words,  # noqa: E402
                                   shingles, similar_pairs, word_hashes, word_ids)

ROOT = Path(__file__).resolve().parent.parent
JACCARD = 0.8
POSITIVE_RATES = (0.002, 0.005, 0.01, 0.02)  # words edited in a planted near copy: true Jaccard ~0.98 .. ~0.82
NEGATIVE_RATES = (0.05, 0.08, 0.12)  # ~0.6 .. ~0.4: similar documents that are not near-duplicates


def real_docs() -> list[Document]:
    """The plays cut at scene headings, and the standard library's modules (outside test folders)."""
    docs = []
    for play in load_corpus("shakespeare"):
        for i, scene in enumerate(re.split(r"\n(?=### )", play.text)):
            if len(scene.split()) >= 50:
                docs.append(Document(f"{play.name}#{i}", scene))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(stdlib.rglob("*.py")):
        rel = str(f.relative_to(stdlib))
        if "site-packages" in rel or "test" in rel.split("/")[0] or "/test" in rel or "idle_test" in rel:
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text.split()) >= 50:
            docs.append(Document(f"stdlib/{rel}", text))
    return docs


def edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    """At each word, with probability `rate`: substitute it, insert a word before it, or delete it."""
    out = []
    for p in re.split(r"(\s+)", text):
        if p and not p.isspace() and rng.random() < rate:
            op = rng.randrange(3)
            if op == 0:
                out.append(rng.choice(vocab))
            elif op == 1:
                out.append(rng.choice(vocab) + " " + p)
            continue  # op 2: deleted
        out.append(p)
    return "".join(out)


def shingle_set(text: str) -> np.ndarray:
    return np.unique(shingles(word_hashes(*word_ids(normalized_words(text))), 5))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / max(1, len(a) + len(b) - inter)


def planted_corpus(seed: int = 0, copies: int = 400):
    """Real documents plus, for `copies` of them, an exact copy (case and spacing changed), and near copies
    edited at each positive and negative rate. Returns (docs, planted [(original, copy, kind, rate)])."""
    rng = random.Random(seed)
    base = real_docs()
    vocab = sorted({w for d in base[:200] for w in d.text.split() if w.isalpha()})
    docs = list(base)
    planted = []
    for i in rng.sample(range(len(base)), copies):
        t = base[i].text
        cased = t.upper() if t.upper().lower() == t.lower() else t  # (not where upper() is lossy: ß -> SS)
        docs.append(Document(f"exact-of-{i}", cased.replace("\n", "\n ", 5)))
        planted.append((i, len(docs) - 1, "exact", 0.0))
        rate = rng.choice(POSITIVE_RATES + NEGATIVE_RATES)
        docs.append(Document(f"edit{rate}-of-{i}", edit(t, rate, rng, vocab)))
        planted.append((i, len(docs) - 1, "near", rate))
    return docs, planted


def bench_dedup(args) -> dict:
    docs, planted = planted_corpus()
    sets = [shingle_set(d.text) for d in docs]
    mb = sum(len(d.text.encode()) for d in docs) / 1e6
    shingle_path = Path(args.out) / "shingles.npz"
    np.savez(shingle_path, *[shingles(word_hashes(*word_ids(normalized_words(d.text))), 5) for d in docs])
    result = {"documents": len(docs), "mb": mb, "planted_pairs": len(planted), "backends": {}}
    # exact: every planted exact copy, and nothing else, shares its original's key
    keys = np.array([exact_key(normalized_words(d.text)) for d in docs], dtype=np.uint64)
    first = exact_groups(keys)
    exact_found = sum(first[c] == first[o] for o, c, k, _ in planted if k == "exact")
    result["exact"] = {"planted": sum(k == "exact" for _, _, k, _ in planted), "found": int(exact_found),
                       "other_docs_merged": int(sum(first[i] != i for i in range(len(docs)))) - int(exact_found)}
    true_j = {(o, c): jaccard(sets[o], sets[c]) for o, c, k, _ in planted if k == "near"}
    result["planted_true_jaccard"] = {str(r): [round(min(j for (o, c), j in true_j.items() if docs[c].name.startswith(f"edit{r}-")), 3),
                                               round(max(j for (o, c), j in true_j.items() if docs[c].name.startswith(f"edit{r}-")), 3)]
                                      for r in POSITIVE_RATES + NEGATIVE_RATES
                                      if any(docs[c].name.startswith(f"edit{r}-") for _, c in true_j)}
    backends = ["numpy", "rensa"] + (["datasketch"] if _has("datasketch") else [])
    me = [sys.executable, __file__, "--one-minhash"]
    from alternate import alternate
    speed = alternate({b: me + [b, str(shingle_path), str(mb)] for b in backends}, "mb_per_s", rounds=args.rounds)
    for b in backends:
        sig = np.load(Path(args.out) / f"sig_{b}.npy")
        result["backends"][b] = {"mb_per_s": speed[b], **_quality(sig, docs, sets, planted, true_j)}
    return result


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _quality(sig: np.ndarray, docs, sets, planted, true_j) -> dict:
    """Pair precision of the accepted LSH pairs (true Jaccard >= 0.8) over all documents, recall of the planted
    near copies with true Jaccard >= 0.8 (same group as their original), false merges of planted ones below."""
    u, v = similar_pairs(sig, JACCARD)
    pairs = {(min(a, b), max(a, b)) for a, b in zip(u.tolist(), v.tolist())}
    exact_pairs = {p for p in pairs if exact_key(normalized_words(docs[p[0]].text)) == exact_key(normalized_words(docs[p[1]].text))}
    near_pairs = pairs - exact_pairs
    correct = sum(jaccard(sets[a], sets[b]) >= JACCARD for a, b in near_pairs)
    labels = _components(np.arange(len(docs)), u, v)
    pos = [(o, c) for (o, c), j in true_j.items() if j >= JACCARD]
    neg = [(o, c) for (o, c), j in true_j.items() if j < JACCARD]
    found = sum(labels[o] == labels[c] for o, c in pos)
    merged = sum(labels[o] == labels[c] for o, c in neg)
    return {"near_pairs_accepted": len(near_pairs), "precision": correct / max(1, len(near_pairs)),
            "planted_positive": len(pos), "recall": found / max(1, len(pos)),
            "planted_negative": len(neg), "negatives_merged": int(merged)}


def one_minhash(backend: str, path: str, mb: float) -> None:
    data = np.load(path)
    sets = [data[k] for k in sorted(data.files, key=lambda k: int(k.split("_")[1]))]
    t0 = time.perf_counter()
    if backend == "datasketch":
        from datasketch import MinHash
        sig = []
        for s in sets:  # datasketch's own permutations over our shingle hashes (its hashfunc is given the ints)
            m = MinHash(num_perm=128, hashfunc=lambda x: x, seed=1)
            m.update_batch((s & np.uint64(0xFFFFFFFF)).tolist())
            sig.append(m.hashvalues.astype(np.uint32))
        sig = np.stack(sig)
    else:
        sig = MinHasher(128, seed=0, backend=backend).signatures(sets)
    dt = time.perf_counter() - t0
    np.save(Path(path).parent / f"sig_{backend}.npy", sig)
    print(json.dumps({"mb_per_s": mb / dt, "seconds": dt}))


# --- PII -------------------------------------------------------------------------------------------------------

def pii_items(rng: random.Random) -> list[tuple[str, str]]:
    """(kind, string) in the formats people write them."""
    a = "abcdefghijklmnopqrstuvwxyz"
    an = a + a.upper() + "0123456789"
    name = lambda: "".join(rng.choice(a) for _ in range(rng.randint(3, 8)))  # noqa: E731
    rnd = lambda chars, n: "".join(rng.choice(chars) for _ in range(n))  # noqa: E731
    d = lambda n: rnd("0123456789", n)  # noqa: E731
    emails = [f"{name()}.{name()}@{name()}.com", f"{name()}_{name()}+news@mail.{name()}.co.uk", f"{name()}{d(2)}@{name()}.io",
              f"{name().capitalize()}.{name().capitalize()}@{name().upper()}.ORG"]
    phones = [f"({rng.randint(2, 9)}{d(2)}) {d(3)}-{d(4)}", f"{rng.randint(2, 9)}{d(2)}-{d(3)}-{d(4)}",
              f"{rng.randint(2, 9)}{d(2)}.{d(3)}.{d(4)}", f"+1 {rng.randint(2, 9)}{d(2)} {d(3)} {d(4)}",
              f"+44 20 {d(4)} {d(4)}", f"+33 {rng.randint(1, 9)} {d(2)} {d(2)} {d(2)} {d(2)}", f"+49 30 {d(6)}",
              f"+81-3-{d(4)}-{d(4)}"]
    ips = [".".join(str(rng.randint(1, 254)) for _ in range(4)),
           ":".join(rnd("0123456789abcdef", 4) for _ in range(8)),
           f"2001:db8::{rnd('0123456789abcdef', 4)}:{rnd('0123456789abcdef', 3)}", f"fe80::{rnd('0123456789abcdef', 4)}:{rnd('0123456789abcdef', 4)}"]
    keys = ["AKIA" + rnd("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", 16), "ghp_" + rnd(an, 36),
            f"xoxb-{d(12)}-{rnd(an, 24)}", "sk-" + rnd(an, 40), "AIza" + rnd(an + "_-", 35),
            f"eyJ{rnd(an, 20)}.eyJ{rnd(an, 30)}.{rnd(an + '_-', 43)}"]
    out = [("email", x) for x in emails] + [("phone", x) for x in phones] + [("ip", x) for x in ips] + [("key", x) for x in keys]
    out.append(("assigned", rnd(an, 12) + d(4) + rnd(an, 8)))
    out.append(("private_key", "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(rnd(an + "+/", 64) for _ in range(4))
                + "\n-----END RSA PRIVATE KEY-----"))
    return out


def bench_pii(args) -> dict:
    from gptforge.curate.pii import find_pii

    rng = random.Random(1)
    docs = real_docs()
    natural = []
    for d in docs:
        natural += [(d.name, s.kind, s.original, d.text[max(0, s.start - 40):s.end + 20]) for s in find_pii(d.text)]
    planted, found, by_kind, missed = 0, 0, {}, []
    for i in rng.sample(range(len(docs)), 300):
        text = docs[i].text
        items = rng.sample(pii_items(rng), 6)
        spaces = [m.start() for m in re.finditer(r" ", text)]
        positions = sorted(rng.sample(spaces, min(len(spaces), len(items))), reverse=True)  # back to front
        for pos, (kind, item) in zip(positions, items):
            piece = {"assigned": f' api_key = "{item}" ', "private_key": f"\n{item}\n"}.get(kind, f" {item} ")
            text = text[:pos] + piece + text[pos:]
        originals = {s.original for s in find_pii(text)}
        for kind, item in items[:len(positions)]:
            ok = item in originals
            planted += 1
            found += ok
            k = by_kind.setdefault(kind, [0, 0])
            k[0] += 1
            k[1] += ok
            if not ok:
                missed.append((kind, item))
    return {"planted": planted, "recall": found / planted, "by_kind": {k: {"planted": a, "found": b} for k, (a, b) in by_kind.items()},
            "missed": missed[:20],
            "redactions_in_unplanted_text": {"plays": sum(n.startswith("shakespeare") for n, *_ in natural),
                                             "stdlib": sum(n.startswith("stdlib") for n, *_ in natural)},
            "sample_of_unplanted_redactions": [dict(zip(("doc", "kind", "text", "context"), x)) for x in
                                               random.Random(2).sample(natural, min(25, len(natural)))]}


# --- speed and memory --------------------------------------------------------------------------------------

def write_corpus(path: Path, scale: int, seed: int = 0) -> float:
    """The planted corpus as JSONL, `scale` times over (each repeat lightly edited): MB written."""
    docs, _ = planted_corpus(seed)
    rng = random.Random(seed)
    vocab = sorted({w for d in docs[:200] for w in d.text.split() if w.isalpha()})
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in range(scale):
            for d in docs:
                text = d.text if r == 0 else edit(d.text, 0.01, rng, vocab)
                line = json.dumps({"text": text}) + "\n"
                size += len(line.encode())
                f.write(line)
    return size / 1e6


def one_curate(path: str, workers: int) -> None:
    from gptforge.curate import CurateConfig, curate

    def cpu() -> float:  # this process and its finished children (the pool's workers): user + system seconds
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    c0 = cpu()
    report = curate([path], None, CurateConfig(pii=()), workers=workers)
    cpu_s = cpu() - c0
    mb = sum(s["bytes_in"] for s in report.sources.values()) / 1e6
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    # On a shared machine wall time measures the neighbours too; MB per CPU-second is what the run itself cost
    print(json.dumps({"mb": mb, "mb_per_s": mb / report.seconds["total"], "mb_per_cpu_s": mb / cpu_s,
                      "cpu_seconds": cpu_s, "seconds": report.seconds,
                      "peak_rss_mb": peak / 1024, "removed": {k: v["documents"] for k, v in report.removed.items()}}))


def bench_speed(args) -> dict:
    from alternate import measure

    path = Path(args.out) / "corpus.jsonl"
    mb = write_corpus(path, 1)
    me = [sys.executable, __file__, "--one-curate", str(path)]
    runs: dict[str, list[dict]] = {"2 workers": [], "1 worker": []}
    for r in range(args.rounds):  # A B A B ...: each process reports wall and CPU throughput
        for name, w in (("2 workers", "2"), ("1 worker", "1")):
            runs[name].append(measure(me + [w]))
            print(f"round {r + 1} {name}: {runs[name][-1]['mb_per_s']:.2f} MB/s, "
                  f"{runs[name][-1]['mb_per_cpu_s']:.2f} MB/CPU-s", file=sys.stderr, flush=True)
    out = {"corpus_mb": mb}
    for name, rs in runs.items():
        out[name] = {k: {"runs": [x[k] for x in rs], "median": statistics.median(x[k] for x in rs)}
                     for k in ("mb_per_s", "mb_per_cpu_s")}
        out[name]["last"] = rs[-1]
    return out


def bench_memory(args) -> dict:
    out = {}
    for scale in (1, args.memory_scale):
        path = Path(args.out) / f"corpus_x{scale}.jsonl"
        mb = write_corpus(path, scale)
        r = subprocess.run([sys.executable, __file__, "--one-curate", str(path), "2"], capture_output=True, text=True, check=True)
        out[f"x{scale}"] = {"corpus_mb": mb, **json.loads(r.stdout.splitlines()[-1])}
        path.unlink()
    return out


# --- training on junk vs curated -----------------------------------------------------------------------------

JUNK_SHARE = 0.30


def junk_doc(rng: random.Random, vocab: list[str]) -> str:
    """One document of the kinds quality rules exist for: keyword spam, symbol soup, navigation menus, tables."""
    kind = rng.randrange(4)
    if kind == 0:
        phrase = " ".join(rng.sample(["buy", "cheap", "best", "price", "online", "free", "shipping", "deal", "now"], 4))
        return " ".join([phrase] * rng.randint(40, 120))
    if kind == 1:
        return "".join(rng.choice("#$%&*@!~^|<>{}[]0123456789abcdef ") for _ in range(rng.randint(800, 3000)))
    if kind == 2:
        items = ["Home", "About Us", "Contact", "Privacy Policy", "Login", "Sign up", "Cart", "Terms of Use"]
        return "\n".join(" | ".join(rng.sample(items, 5)) for _ in range(rng.randint(30, 80)))
    return "\n".join(" ".join(str(rng.randint(0, 9999)) for _ in range(8)) for _ in range(rng.randint(40, 120)))


def dirty_corpus(clean: list[Document], seed: int = 0) -> list[Document]:
    """clean + exact copies (10%), edited near copies (8%) and junk documents (12%): 30% of the bytes, shuffled."""
    rng = random.Random(seed)
    vocab = sorted({w for d in clean[:100] for w in d.text.split() if w.isalpha()})
    total = sum(len(d.text) for d in clean) / (1 - JUNK_SHARE)
    out = list(clean)
    for share, make in ((0.10, lambda d: d.text), (0.08, lambda d: edit(d.text, 0.01, rng, vocab)),
                        (0.12, lambda d: junk_doc(rng, vocab))):
        added = 0
        while added < share * total:
            text = make(rng.choice(clean))
            out.append(Document(f"planted{len(out)}", text))
            added += len(text)
    rng.shuffle(out)
    return out


def _with_val(data: Path, heldout: Path) -> None:
    """Give a prepared folder the held-out clean text (prepared with the same tokenizer) as its val split."""
    import shutil

    meta = json.loads((data / "meta.json").read_text())
    held = json.loads((heldout / "meta.json").read_text())["splits"]["train"]
    for i, shard in enumerate(held["shards"]):
        shutil.copy(heldout / shard["file"], data / f"val_{i:05d}.bin")
    meta["splits"]["val"] = {**held, "shards": [{"file": f"val_{i:05d}.bin", "tokens": s["tokens"]} for i, s in enumerate(held["shards"])]}
    (data / "meta.json").write_text(json.dumps(meta, indent=2))


def bench_train(args) -> dict:
    import shutil

    from gptforge.config import RunConfig, TrainConfig, model_preset
    from gptforge.curate import CurateConfig, curate_documents
    from gptforge.data import prepare
    from gptforge.train import train

    work = Path(args.out) / "train"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plays = load_corpus("shakespeare")
    held, kept = plays[::10], [p for i, p in enumerate(plays) if i % 10]
    clean = [Document(f"{p.name}#{i}", sc) for p in kept for i, sc in enumerate(re.split(r"\n(?=### )", p.text)) if sc.strip()]
    dirty = dirty_corpus(clean)
    t0 = time.perf_counter()
    curated, report = curate_documents(dirty, CurateConfig())
    curate_s = time.perf_counter() - t0

    def write(name, docs):
        src = work / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
        return str(src)

    prepare([write("clean", clean)], work / "tok", vocab_size=1024, val_fraction=0, progress=False)
    tok = str(work / "tok" / "tokenizer.json")
    prepare([write("heldout", held)], work / "heldout", tokenizer=tok, val_fraction=0, progress=False)
    result = {"documents": {"clean": len(clean), "dirty": len(dirty), "curated": len(curated)},
              "mb": {"clean": sum(len(d.text.encode()) for d in clean) / 1e6, "dirty": sum(len(d.text.encode()) for d in dirty) / 1e6,
                     "curated": sum(len(d.text.encode()) for d in curated) / 1e6},
              "curate_seconds": curate_s, "removed": {k: v["documents"] for k, v in report.removed.items()},
              "runs": {}}
    clean_names = {d.text for d in clean}
    result["clean_documents_removed"] = len(clean_names - {d.text for d in curated})
    model = dataclasses.replace(model_preset("tiny"), vocab_size=1024, block_size=128)
    for name, docs in (("dirty", dirty), ("curated", curated)):
        data = work / f"data_{name}"
        prepare([write(name, docs)], data, tokenizer=tok, val_fraction=0, progress=False)
        _with_val(data, work / "heldout")
        for seed in range(args.seeds):
            tc = TrainConfig(micro_batch=16, seq_len=128, max_steps=args.steps, lr=3e-3, warmup_steps=20, eval_every=args.steps,
                             eval_batches=40, log_every=50, save_every=10**9, save_best=False, tensorboard=False,
                             precision="fp32", seed=seed, keep_last=1)
            r = train(RunConfig(model=model, train=tc, data=str(data), out=str(work / f"run_{name}_{seed}")), progress=False)
            result["runs"].setdefault(name, []).append({"seed": seed, "val_loss": r.final_val_loss, "tokens": r.tokens,
                                                        "seconds": r.seconds})
    for name in ("dirty", "curated"):
        result[f"{name}_val_loss_median"] = statistics.median(x["val_loss"] for x in result["runs"][name])
    return result


PARTS = {"dedup": bench_dedup, "pii": bench_pii, "speed": bench_speed, "memory": bench_memory, "train": bench_train}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=[*PARTS, "all"])
    ap.add_argument("--out", default=str(ROOT / "runs" / "curate_bench"))
    ap.add_argument("--rounds", type=int, default=3, help="alternating processes per variant (speed, dedup)")
    ap.add_argument("--memory-scale", type=int, default=4, help="the larger memory corpus, in copies of the first")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run (train)")
    ap.add_argument("--seeds", type=int, default=2, help="training runs per corpus (train)")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for part in PARTS if args.part == "all" else [args.part]:
        t0 = time.perf_counter()
        res = PARTS[part](args)
        res["bench_seconds"] = time.perf_counter() - t0
        (Path(args.out) / f"{part}.json").write_text(json.dumps(res, indent=2, default=str))
        print(json.dumps({part: res}, indent=2, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one-minhash":
        one_minhash(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--one-curate":
        one_curate(sys.argv[2], int(sys.argv[3]))
    else:
        main()
