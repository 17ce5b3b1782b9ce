"""Scoring through the server: `/v1/completions` with `echo` (the prompt's tokens and their logprobs, the first null),
`logprobs: N`, token-id prompts and `max_tokens: 0`, against a real `gptforge serve`, compared with the model's own
log-softmax in this process; then lm-evaluation-harness's `local-completions` model against it (when installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptforge import eval as ev
from gptforge.checkpoint import write_checkpoint
from gptforge.config import ModelConfig, RunConfig
from gptforge.generate import load
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer
from serverproc import Server

TEXT = ["the quick brown fox jumps over the lazy dog. " * 40, "to be or not to be, that is the question. " * 40]




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = Tokenizer.train(TEXT, vocab_size=320)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size, block_size=256)
    torch.manual_seed(0)
    return write_checkpoint(tmp_path_factory.mktemp("evalserve") / "tiny", RunConfig(model=cfg), tok,
                            model_state=GPT(cfg).state_dict())


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = Server(ckpt, tmp_path_factory.mktemp("log") / "server.log", "--model-name", "tiny", "--max-prefill-tokens", "16")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def ref(ckpt):
    return load(ckpt, device="cpu")


@torch.no_grad()
def log_softmax(model, tok, ids: list[int]) -> torch.Tensor:
    return F.log_softmax(model(torch.tensor([ids]))[0, :, :tok.vocab_size].float(), -1)  # (L, V)


def test_echo_logprobs_equal_the_models_log_softmax(server, ref):
    model, tok = ref
    prompt = "the quick brown fox jumps over"
    r = server.complete(prompt=prompt, echo=True, max_tokens=0, logprobs=3)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    ids = tok.encode(prompt)
    lp = choice["logprobs"]
    logp = log_softmax(model, tok, ids)
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert lp["tokens"] == [tok.decode([i]) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [len(tok.decode(ids[:k])) for k in range(len(ids))]
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(float(logp[t - 1, ids[t]]), abs=1e-4)
        vals, alts = logp[t - 1].topk(3)
        expect = {}  # token strings as keys: ids that decode alike (partial UTF-8) share one, as in OpenAI's format
        for i, v in zip(alts.tolist(), vals.tolist()):
            expect.setdefault(tok.decode([i]), v)
        top = lp["top_logprobs"][t]
        assert list(top) == list(expect) and list(top.values()) == pytest.approx(list(expect.values()), abs=1e-4)


def test_token_id_prompts_equal_text_prompts_and_batch(server, ref):
    _, tok = ref
    texts = ["to be or not to be", "the lazy dog. the quick brown fox"]
    by_text = server.complete(prompt=texts, echo=True, max_tokens=0, logprobs=2).json()["choices"]
    by_ids = server.complete(prompt=[tok.encode(t) for t in texts], echo=True, max_tokens=0, logprobs=2).json()["choices"]
    one = server.complete(prompt=tok.encode(texts[1]), echo=True, max_tokens=0, logprobs=2).json()["choices"]
    assert [c["index"] for c in by_ids] == [0, 1]
    for a, b in zip(by_text, by_ids):
        assert a["text"] == b["text"] and a["logprobs"] == b["logprobs"]
    assert one[0]["logprobs"]["token_logprobs"] == pytest.approx(by_ids[1]["logprobs"]["token_logprobs"][:], abs=1e-5)


def test_lm_eval_request_shape_reads_one_token_past_the_prompt(server, ref):
    """lm-eval's local-completions sends echo, logprobs 1, max_tokens 1, temperature 0 and sums
    token_logprobs[ctxlen:-1]: the prompt's entries plus the one greedy token."""
    model, tok = ref
    ids = tok.encode("to be or not to be, that is")
    r = server.complete(prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0, seed=1234)
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    logp = log_softmax(model, tok, ids)
    assert lp["token_logprobs"][-1] == pytest.approx(float(logp[-1].max()), abs=1e-4)
    assert list(lp["top_logprobs"][-1].values()) == [lp["token_logprobs"][-1]]
    plain = server.complete(prompt=ids, max_tokens=1, temperature=0).json()["choices"][0]["text"]
    assert r.json()["choices"][0]["text"] == tok.decode(ids) + plain


def test_echo_with_generation_and_bad_requests(server, ref):
    _, tok = ref
    plain = server.complete(prompt="the quick", max_tokens=5, temperature=0, logprobs=1).json()["choices"][0]
    echoed = server.complete(prompt="the quick", max_tokens=5, temperature=0, logprobs=1, echo=True).json()["choices"][0]
    assert echoed["text"] == "the quick" + plain["text"]
    n = len(tok.encode("the quick"))
    assert echoed["logprobs"]["token_logprobs"][n:] == plain["logprobs"]["token_logprobs"]
    assert server.complete(prompt="the quick", echo=True, stream=True).status_code == 400
    assert server.complete(prompt="the quick", max_tokens=0).status_code == 400  # 0 only scores, with echo
    no_lp = server.complete(prompt="the quick", echo=True, max_tokens=0).json()["choices"][0]
    assert no_lp["text"] == "the quick" and no_lp["logprobs"] is None


def test_checkpoint_tokenizer_loads_in_transformers_offline(ckpt, ref, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    _, tok = ref
    text = "to be or not to be, that is the question.\n the lazy dog"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text) and hf.eos_token_id == tok.eos_id


MC = [{"query": "the quick brown", "choices": ["fox", "dog jumps over", "be"], "gold": 0},
      {"query": "to be or not", "choices": ["to be", "the lazy dog. the", "fox"], "gold": 1},
      {"query": "that is the", "choices": ["question", "quick"], "gold": 1},
      {"query": "jumps over the", "choices": ["lazy dog", "brown fox jumps", "or", "not"], "gold": 3}]
CLOZE = [{"text": "the quick brown fox"}, {"text": "to be or not to be"}, {"text": "that is the question."}]
GEN = [{"context": "the quick brown", "answer": "fox"}, {"context": "to be or not to", "answer": "be"}]
YAML = {  # lm-eval's task format, each reading a local jsonl file
    "mc": "output_type: multiple_choice\ndoc_to_text: \"{{query}}\"\ndoc_to_choice: \"{{choices}}\"\n"
          "doc_to_target: \"{{gold}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "cloze": "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
             "doc_to_target: \"{{' ' + text.split(' ')[-1]}}\"\nmetric_list:\n  - metric: acc\n",
    "gen": "output_type: generate_until\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{answer}}\"\n"
           "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 16\n  do_sample: false\n"
           "metric_list:\n  - metric: exact_match\n",
}


def test_lm_eval_scores_against_the_server_as_the_built_in_eval_does(server, ckpt, ref, tmp_path):
    """lm-evaluation-harness's local-completions model, unchanged, on a task of each kind; its accuracies and
    per-request log-likelihoods equal the built-in `gptforge eval`'s on the same files."""
    if shutil.which("lm_eval") is None and importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (pip install 'gptforge[eval]')")
    model, tok = ref
    for name, records in (("mc", MC), ("cloze", CLOZE), ("gen", GEN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp_path / f"{name}.yaml").write_text(
            f"task: gf_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/{name}.jsonl\n"
            f"test_split: test\n{YAML[name]}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,tokenizer={ckpt},max_retries=1"
    r = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
                        "--tasks", "gf_mc,gf_cloze,gf_gen", "--include_path", str(tmp_path), "--output_path",
                        str(tmp_path / "out"), "--log_samples"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    for name in ("mc", "cloze", "gen"):
        ours = ev.evaluate_task(model, tok, ev.read_task_file(tmp_path / f"{name}.jsonl"), block_size=256).metrics
        theirs = results[f"gf_{name}"]
        if name == "mc":
            assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
        else:
            assert theirs[("exact_match" if name == "gen" else "acc") + ",none"] == ours["acc"]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_gf_mc_*.jsonl") for line in f.open()]
    for s in samples:
        for k, choice in enumerate(s["doc"]["choices"]):
            reqs = [ev.encode_pair(tok, s["doc"]["query"], " " + choice)]
            (ll, _), = ev.loglikelihoods(model, reqs, vocab_size=tok.vocab_size, block_size=256)
            assert float(s["resps"][k][0][0]) == pytest.approx(ll, abs=1e-4)
