"""`gptforge prepare` throughput on the bundled corpus vs plain HF `tokenizers` batch encoding.

Both encode the same 38 plays with the same trained 4096-token BPE; the peer is one `encode_batch` call over
the whole documents (what a user would write), ours is the chunked, batched path of `gptforge prepare`
(tokenizing and writing shards, not reading or tokenizer training). Alternating processes, 3 each.

    python benchmarks/prepare_throughput.py            # prints a JSON summary
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def one_run(which: str, tokenizer: str) -> None:
    from gptforge.corpora import load_corpus
    from gptforge.data import prepare
    from gptforge.tokenizer import Tokenizer

    docs = load_corpus("shakespeare")
    n_bytes = sum(len(d.text.encode()) for d in docs)
    if which == "gptforge":
        with tempfile.TemporaryDirectory() as out:
            stats = prepare(["shakespeare"], out, tokenizer=tokenizer, val_fraction=0.05, progress=False)
        print(json.dumps({"mb_per_s": stats.mb_per_s, "bytes": stats.bytes}))
    else:
        tok = Tokenizer.load(tokenizer)
        t0 = time.perf_counter()
        tok.hf.encode_batch([d.text for d in docs], add_special_tokens=False)
        dt = time.perf_counter() - t0
        print(json.dumps({"mb_per_s": n_bytes / 1e6 / dt, "bytes": n_bytes}))


def main() -> None:
    from alternate import alternate

    from gptforge.data import prepare

    with tempfile.TemporaryDirectory() as d:
        prepare(["shakespeare"], d, vocab_size=4096, progress=False)  # train the tokenizer once
        tok = str(Path(d) / "tokenizer.json")
        me = [sys.executable, __file__, "--one"]
        res = alternate({"gptforge": me + ["gptforge", tok], "hf_encode_batch": me + ["hf", tok]}, "mb_per_s")
    res["ratio"] = res["gptforge"]["median"] / res["hf_encode_batch"]["median"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one_run(sys.argv[2], sys.argv[3])
    else:
        main()
