"""Which grammar library constrains sampling: llguidance, xgrammar and outlines-core on the demo tokenizer.

    python benchmarks/grammar_libs.py            # ~1 min; one JSON object on the last line

The demo's tokenizer (a 4096-token byte-level BPE trained on the bundled plays, as benchmarks/serve_load.py
builds it) is handed to each library; then, for each of three grammars (JSON mode, a JSON schema with nested
objects / arrays / enums / required fields, a regex), a valid output is tokenized and walked token by token, as
a decode loop does: compute the mask of allowed next tokens into a bitmask, then advance with the token.
Reported per library and grammar: the one-time set-up (tokenizer import) and grammar compile, and the mean
and median microseconds per token of mask + advance (one process, after one warm-up walk; each walk is
repeated 20 times). The libraries are imported inside their own functions on purpose: the import time
(xgrammar pulls triton) is part of what is measured.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from gptforge.corpora import load_corpus
from gptforge.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["king", "queen", "fool", "ghost"]},
        "lines": {"type": "array", "items": {"type": "string"}},
        "home": {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
                 "required": ["city", "year"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "lines", "home"],
    "additionalProperties": False,
}
DOC = {"name": "Hamlet, Prince of Denmark", "age": 30, "role": "ghost",
       "lines": ["To be, or not to be: that is the question", "The rest is silence."],
       "home": {"city": "Elsinore", "year": 1601}}
REGEX = r"[A-Z][a-z]+ (of|the) [A-Z][a-z]+, act [IVX]+, scene [0-9]{1,2}"
REGEX_TEXT = "Hamlet the Dane, act III, scene 1"
REPEATS = 20


def demo_tokenizer() -> Tokenizer:
    return Tokenizer.train([d.text for d in load_corpus("shakespeare")[:8]], vocab_size=4096)


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """Each id's bytes: the byte-level alphabet read back, special tokens as their UTF-8 text."""
    from tokenizers import pre_tokenizers  # the byte <-> symbol table of byte-level BPE
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # GPT-2's table: printable bytes map to themselves, the others to 256 + their rank among the unprintable.
    printable = [b for b in range(256) if chr(b) in alphabet and (33 <= b <= 126 or 161 <= b <= 172 or b >= 174)]
    back = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in back.values():
            back[chr(256 + n)] = b
            n += 1
    specials = {t.content for t in tok.hf.get_added_tokens_decoder().values()}
    out = []
    for i in range(tok.vocab_size):
        s = tok.hf.id_to_token(i)
        out.append(s.encode() if s in specials else bytes(back[c] for c in s))
    return out


def walk(step, tokens: list[int]) -> list[float]:
    """Seconds per token of `step(token)` (mask, then advance) over `tokens`, REPEATS times after a warm-up."""
    times = []
    for r in range(REPEATS + 1):
        t0 = time.perf_counter()
        reset = step(None)
        for t in tokens:
            reset(t)
        if r:
            times.append((time.perf_counter() - t0) / len(tokens))
    return times


def bench_llguidance(tok: Tokenizer, cases: dict) -> dict:
    t0 = time.perf_counter()
    import llguidance  # not llguidance.torch: its import compiles a kernel with torch.compile (~4 s)
    lltok = llguidance.LLTokenizer(tok.hf.to_str(), eos_token=tok.eos_id)
    out = {"setup_s": time.perf_counter() - t0}
    mask = torch.zeros(1, (tok.vocab_size + 31) // 32, dtype=torch.int32)
    for name, (kind, spec, tokens) in cases.items():
        t0 = time.perf_counter()
        grammar = {"json": llguidance.LLMatcher.grammar_from_json_schema,
                   "regex": llguidance.LLMatcher.grammar_from_regex}[kind](spec)
        m = llguidance.LLMatcher(lltok, grammar)
        assert not m.is_error(), m.get_error()
        compile_s = time.perf_counter() - t0

        def start(_, m=m):
            m.reset()

            def one(t):
                m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
                assert (int(mask[0, t // 32]) >> (t % 32)) & 1, f"llguidance masked out token {t}"
                assert m.consume_token(t), m.get_error()
            return one
        out[name] = {"compile_s": compile_s, "us_per_token": walk(start, tokens)}
    return out


def bench_xgrammar(tok: Tokenizer, cases: dict) -> dict:
    t0 = time.perf_counter()
    import xgrammar as xgr
    info = xgr.TokenizerInfo(token_bytes(tok), xgr.VocabType.BYTE_LEVEL, vocab_size=tok.vocab_size,
                             stop_token_ids=[tok.eos_id])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    out = {"setup_s": time.perf_counter() - t0}
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    for name, (kind, spec, tokens) in cases.items():
        t0 = time.perf_counter()
        compiled = (compiler.compile_json_schema(json.dumps(spec)) if kind == "json"
                    else compiler.compile_regex(spec))
        m = xgr.GrammarMatcher(compiled)
        compile_s = time.perf_counter() - t0

        def start(_, m=m):
            m.reset()

            def one(t):
                m.fill_next_token_bitmask(mask, 0)
                assert (int(mask[0, t // 32]) >> (t % 32)) & 1, f"xgrammar masked out token {t}"
                assert m.accept_token(t)
            return one
        out[name] = {"compile_s": compile_s, "us_per_token": walk(start, tokens)}
    return out


def bench_outlines(tok: Tokenizer, cases: dict) -> dict:
    t0 = time.perf_counter()
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    vocab: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes(tok)):
        if i != tok.eos_id:
            vocab.setdefault(b, []).append(i)
    vocabulary = Vocabulary(tok.eos_id, vocab)
    out = {"setup_s": time.perf_counter() - t0}
    mask = torch.zeros(1, (tok.vocab_size + 31) // 32, dtype=torch.int32)
    for name, (kind, spec, tokens) in cases.items():
        t0 = time.perf_counter()
        regex = build_regex_from_schema(json.dumps(spec)) if kind == "json" else spec
        index = Index(regex, vocabulary)  # the whole automaton over the vocabulary, built up front
        compile_s = time.perf_counter() - t0
        guide = Guide(index)

        def start(_, guide=guide):
            guide.reset()

            def one(t):
                guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
                assert (int(mask[0, t // 32]) >> (t % 32)) & 1, f"outlines-core masked out token {t}"
                guide.advance(t, return_tokens=False)
            return one
        out[name] = {"compile_s": compile_s, "us_per_token": walk(start, tokens)}
    return out


def main() -> None:
    torch.set_num_threads(1)
    tok = demo_tokenizer()
    doc = json.dumps(DOC)
    # JSON mode: outlines-core has no "any JSON value" grammar of its own; an object with free properties is
    # the closest schema all three accept.
    cases = {"json_object": ("json", {"type": "object"}, tok.encode(doc)),
             "json_schema": ("json", SCHEMA, tok.encode(doc)),
             "regex": ("regex", REGEX, tok.encode(REGEX_TEXT))}
    results = {}
    for name, fn in [("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar),
                     ("outlines-core", bench_outlines)]:
        try:
            r = fn(tok, cases)
        except Exception as e:  # a library that cannot take a grammar is a result too
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"{name}: {results[name]['error']}", file=sys.stderr)
            continue
        for case in cases:
            ts = r[case].pop("us_per_token")
            r[case].update(mean_us=1e6 * statistics.mean(ts), median_us=1e6 * statistics.median(ts),
                           tokens=len(cases[case][2]))
            print(f"{name:14s} {case:12s} compile {r[case]['compile_s'] * 1e3:8.1f} ms  mask+advance "
                  f"{r[case]['median_us']:7.1f} us/token (median of {REPEATS})", file=sys.stderr)
        print(f"{name:14s} setup {r['setup_s']:.2f} s", file=sys.stderr)
        results[name] = r
    print(json.dumps(results))


if __name__ == "__main__":
    main()
