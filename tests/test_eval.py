"""Task scoring (`gptforge eval --task`): readers, lm-eval's acc / acc_norm by hand, few-shot prompts, malformed
files with file:line, the shipped task, bits per byte."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptforge import eval as ev
from gptforge.checkpoint import write_checkpoint
from gptforge.config import ModelConfig, RunConfig
from gptforge.data import BatchSampler, TokenData, prepare
from gptforge.errors import GptforgeError
from gptforge.loader import load_checkpoint
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog. " * 20, "to be or not to be, that is the question. " * 20]


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer.train(TEXT, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=tok.vocab_size, block_size=64)
    return GPT(cfg).eval(), tok, cfg


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@torch.no_grad()
def ll_by_hand(model, tok, context: str, continuation: str, vocab: int) -> float:
    """One unbatched forward of context + continuation, summing the continuation's log-softmax entries."""
    ctx, cont = ev.encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(ids[:, :-1])[0, :, :vocab].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_choice_acc_and_acc_norm_equal_a_hand_computation(tiny, tmp_path):
    model, tok, cfg = tiny
    recs = [{"query": "the quick brown", "choices": ["fox", "dog jumps over", "be"], "gold": 0},
            {"query": "to be or not", "choices": ["to be", "the lazy dog. the", "fox"], "gold": 1},
            {"query": "that is the", "choices": ["question", "quick"], "gold": 1},
            {"query": "jumps over the", "choices": ["lazy dog", "brown fox jumps", "or", "not"], "gold": 3}]
    task = ev.read_task_file(write_jsonl(tmp_path / "t.jsonl", recs))
    assert task.kind == "choice" and task.chance == pytest.approx((1 / 3 + 1 / 3 + 1 / 2 + 1 / 4) / 4)
    res = ev.evaluate_task(model, tok, task, block_size=cfg.block_size)
    acc = acc_norm = 0
    for r in recs:
        lls = [ll_by_hand(model, tok, r["query"], " " + c, tok.vocab_size) for c in r["choices"]]
        acc += max(range(len(lls)), key=lambda i: (lls[i], -i)) == r["gold"]
        norm = [ll / len(c) for ll, c in zip(lls, r["choices"])]  # characters of the choice, no leading space
        acc_norm += max(range(len(norm)), key=lambda i: (norm[i], -i)) == r["gold"]
    assert res.metrics["acc"] == acc / 4 and res.metrics["acc_norm"] == acc_norm / 4
    assert res.centered == pytest.approx((acc_norm / 4 - task.chance) / (1 - task.chance))


def test_batched_loglikelihoods_equal_one_by_one(tiny):
    model, tok, cfg = tiny
    pairs = [("the quick", " brown fox"), ("to be or not to be, that", " is the question."), ("a", " b"),
             ("x " * 80, " lazy dog")]  # the last one is longer than the context: its start is cut
    reqs = [ev.encode_pair(tok, c, x) for c, x in pairs]
    batched = ev.loglikelihoods(model, reqs, vocab_size=tok.vocab_size, block_size=cfg.block_size, batch_tokens=100)
    for (c, x), (ll, _) in zip(pairs[:3], batched):
        assert ll == pytest.approx(ll_by_hand(model, tok, c, x, tok.vocab_size), abs=1e-4)
    ctx, cont = reqs[3]
    seq = (ctx + cont)[-(cfg.block_size + 1):]
    logp = F.log_softmax(model(torch.tensor([seq[:-1]]))[0, -len(cont):, :tok.vocab_size], -1)
    assert batched[3][0] == pytest.approx(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_shared_context_scoring_equals_one_row_per_choice(tiny, pos_encoding):
    """Each context once, its continuations against its KV cache: the same numbers as a row per request."""
    _, tok, _ = tiny
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=tok.vocab_size, block_size=64,
                      pos_encoding=pos_encoding)
    model = GPT(cfg).eval()
    questions = [("the quick", [" brown fox", " dog", " lazy dog. the quick brown fox jumps"]),
                 ("to be or not to be, that is the", [" question.", " fox", " be or not to be"]),
                 ("the quick bro", ["wn fox", "wn", "ther"]),  # BPE merges the context's last token
                 ("a", [" b", " lazy"]), ("", ["the", "to be"]),  # a one-token context; an empty one (EOS)
                 ("to be or not, the lazy fox jumps " * 6,  # longer than the model's context: cut
                  [" lazy dog", " lazy fox", " the quick brown fox jumps over the lazy dog. to be or not"]),
                 ("jumps over", [" the lazy dog"])]  # a context of its own
    ctx, _ = ev.encode_pair(tok, "the quick bro", "wn fox")
    assert tok.encode("the quick brown fox")[:len(ctx)] != ctx  # the merge is really there
    reqs = [ev.encode_pair(tok, c, x) for c, xs in questions for x in xs]
    assert len(reqs[13][0]) > cfg.block_size and len(reqs[13][1]) == len(reqs[14][1]) != len(reqs[15][1])
    for batch_tokens in (None, 40):  # one batch; many (the first request alone is over budget)
        kw = dict(vocab_size=tok.vocab_size, block_size=cfg.block_size, batch_tokens=batch_tokens)
        shared = ev.loglikelihoods(model, reqs, **kw)
        whole = ev.loglikelihoods(model, reqs, share_context=False, **kw)
        assert [g for _, g in shared] == [g for _, g in whole]
        assert max(abs(a - b) for (a, _), (b, _) in zip(shared, whole)) < 1e-5
    assert any(g for _, g in whole) and not all(g for _, g in whole)  # the greedy flags are not all one value


def test_encode_pair_moves_trailing_spaces_like_lm_eval(tiny):
    _, tok, _ = tiny
    assert ev.encode_pair(tok, "the quick ", "brown") == ev.encode_pair(tok, "the quick", " brown")
    assert ev.encode_pair(tok, "", "the")[0] == [tok.eos_id]


def test_cloze_and_generation(tiny, tmp_path):
    model, tok, cfg = tiny
    cloze = ev.read_task_file(write_jsonl(tmp_path / "lambada.jsonl", [{"text": "the quick brown fox"}]))
    assert cloze.kind == "cloze" and cloze.examples[0].context == "the quick brown" and cloze.examples[0].choices == ["fox"]
    res = ev.evaluate_task(model, tok, cloze, block_size=cfg.block_size)
    ctx, cont = ev.encode_pair(tok, "the quick brown", " fox")
    logits = model(torch.tensor([ctx + cont[:-1]]))[0, len(ctx) - 1:, :tok.vocab_size]
    assert res.metrics["acc"] == float(logits.argmax(-1).tolist() == cont)
    gen = ev.read_task_file(write_jsonl(tmp_path / "gen.jsonl", [{"context": "the quick", "answer": "brown"}]))
    from gptforge.generate import complete
    out = complete(model, tok, "the quick", max_new_tokens=32, temperature=0.0, stop=("\n",)).text
    assert gen.kind == "generate"
    assert ev.evaluate_task(model, tok, gen, block_size=cfg.block_size).metrics["acc"] == float(out.strip() == "brown")


def test_public_formats(tmp_path):
    hs = ev.read_task_file(write_jsonl(tmp_path / "hs.jsonl", [{
        "activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he", "label": 2,
        "endings": ["eats it.", "[header] sings.", "bakes  bread.", "leaves."]}]))
    assert hs.examples[0].context == "Baking: A man mixes flour. He" and hs.examples[0].choices[1:3] == [" sings.", "bakes bread."]
    arc = ev.read_task_file(write_jsonl(tmp_path / "arc.jsonl", [{
        "id": "x", "answerKey": "C", "question": {"stem": "Which is a gas?", "choices": [
            {"text": "ice", "label": "A"}, {"text": "rock", "label": "B"}, {"text": "steam", "label": "C"}]}}]))
    assert arc.examples[0].context == "Question: Which is a gas?\nAnswer:" and arc.examples[0].gold == 2
    arc_hf = ev.read_task_file(write_jsonl(tmp_path / "arc2.jsonl", [{
        "question": "Q?", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "2"}]))
    assert arc_hf.examples[0].gold == 1
    piqa = write_jsonl(tmp_path / "valid.jsonl", [{"goal": "open a jar", "sol1": "twist", "sol2": "bite"}] * 2)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    assert [e.gold for e in ev.read_task_file(piqa).examples] == [0, 1]


@pytest.mark.parametrize("records, where, message", [
    ([{"query": "q", "choices": ["a", "b"], "gold": 0}, {"query": "q", "choices": ["a", "b"]}], 2, "missing field 'gold'"),
    ([{"query": "q", "choices": ["a", "b"], "gold": 2}], 1, "out of range"),
    ([{"query": "q", "choices": ["a"], "gold": 0}, "", {"query": "q", "choices": [], "gold": 0}], 3, "non-empty list"),
    ([{"query": "q", "choices": ["a"], "gold": 0}, "{not json"], 2, "not valid JSON"),
    ([{"goal": "g", "sol1": "a", "sol2": "b"}], 1, "no label"),
    ([{"ctx_a": "c", "ctx_b": "d", "activity_label": "x", "endings": ["a", "b"], "label": ""}], 1, "unlabelled"),
    ([{"question": "Q?", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}], 1, "answerKey 'B'"),
    ([{"foo": 1}], 1, "unknown task format"),
])
def test_malformed_task_files_name_file_and_line(tmp_path, records, where, message):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(GptforgeError, match=rf"bad\.jsonl:{where}: .*{message}"):
        ev.read_task_file(path)


def test_missing_named_task_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv(ev.DATA_ENV, str(tmp_path))
    with pytest.raises(GptforgeError, match=rf"{tmp_path}/hellaswag/hellaswag_val.jsonl: download it from"):
        ev.load_task("hellaswag")
    with pytest.raises(GptforgeError, match="neither a file nor a known task"):
        ev.load_task("nope.jsonl")


def test_fewshot_prompts_are_deterministic(tmp_path):
    recs = [{"query": f"q{i}", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(10)]
    task = ev.read_task_file(write_jsonl(tmp_path / "t.jsonl", recs))
    a = [ev.fewshot_context(task, i, 3, seed=7) for i in range(10)]
    assert a == [ev.fewshot_context(task, i, 3, seed=7) for i in range(10)]
    assert a != [ev.fewshot_context(task, i, 3, seed=8) for i in range(10)]
    parts = a[4].split("\n\n")
    assert len(parts) == 4 and parts[-1] == "q4" and "q4 " not in a[4]
    assert all(p.split(" ")[1] == recs[int(p.split(" ")[0][1:])]["choices"][recs[int(p[1:].split(" ")[0])]["gold"]]
               for p in parts[:3])
    with pytest.raises(GptforgeError, match="only 9 other examples"):
        ev.fewshot_context(task, 0, 10, seed=0)


def test_shakespeare_next_line_is_deterministic_and_from_held_out_plays():
    defaults = inspect.signature(prepare).parameters
    assert (defaults["val_fraction"].default, defaults["seed"].default) == (ev.SPLIT_FRACTION, ev.SPLIT_SEED)
    a, b = ev.shakespeare_next_line(seed=1, n=40), ev.shakespeare_next_line(seed=1, n=40)
    assert a == b and a != ev.shakespeare_next_line(seed=2, n=40)
    assert a.kind == "choice" and a.chance == 0.25 and len(a.examples) == 40
    for ex in a.examples:
        assert len(ex.choices) == 4 and ex.context.startswith("**") and ex.context.endswith("\n")
        assert len(set(ex.choices)) == 4
        right = ex.choices[ex.gold].split(" ")
        for wrong in ex.choices:  # the right line's words, the first in place, the others reordered
            assert wrong.split(" ")[0] == right[0] and sorted(wrong.split(" ")) == sorted(right)


def test_bits_per_byte_counts_the_bytes_of_the_targets(prepared):
    data = TokenData(prepared)
    tok = data.tokenizer()
    lengths = ev.token_byte_lengths(tok)
    assert lengths[tok.eos_id] == 0
    ids = tok.encode("Wherefore art thou, Romeo? — naïve")
    assert int(lengths[ids].sum()) == len("Wherefore art thou, Romeo? — naïve".encode())
    sampler = BatchSampler(data.shards("val"), 2, 32, seed=0)
    _, y = sampler.batch(0)
    expect = sum(len(tok.decode([t for t in row if t != tok.eos_id]).encode()) for row in y.tolist())
    assert ev.window_bytes(sampler, 1, lengths) == (y.numel(), expect)
    assert ev.bits_per_byte(2.0, 100, 300) == pytest.approx(200 / math.log(2) / 300)


def test_evaluate_tasks_on_a_checkpoint(tiny, tmp_path):
    model, tok, cfg = tiny
    ckpt = write_checkpoint(tmp_path / "ck", RunConfig(model=cfg), tok, model_state=model.state_dict())
    f = write_jsonl(tmp_path / "t.jsonl", [{"query": "the quick", "choices": ["fox", "be"], "gold": 0}] * 5)
    out = ev.evaluate_tasks(str(ckpt), [str(f), str(f)], limit=3)
    assert [r["examples"] for r in out["tasks"]] == [3, 3]
    assert out["core"] == pytest.approx(out["tasks"][0]["centered"])


def test_eval_table_reports_bits_per_byte_of_the_val_windows(prepared, tmp_path):
    from gptforge.compress.evaluate import eval_checkpoints
    from gptforge.train import EVAL_SEED

    data = TokenData(prepared)
    tok = data.tokenizer()
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=tok.vocab_size, block_size=32)
    ckpt = write_checkpoint(tmp_path / "ck", RunConfig(model=cfg), tok, model_state=GPT(cfg).state_dict())
    (row,) = eval_checkpoints([str(ckpt)], str(prepared), batches=2, batch_size=2, decode_tokens=0)
    _, n_bytes = ev.window_bytes(BatchSampler(data.shards("val"), 2, 32, seed=EVAL_SEED), 2, ev.token_byte_lengths(tok))
    assert row["val_bpb"] == pytest.approx(row["val_loss"] * row["eval_tokens"] / math.log(2) / n_bytes)
    assert 0 < row["val_bpb"] < 20


def test_training_logs_val_bits_per_byte(prepared, tmp_path):
    import dataclasses

    from gptforge.config import TrainConfig, model_preset
    from gptforge.train import EVAL_SEED, train

    tc = TrainConfig(micro_batch=2, seq_len=32, max_steps=2, warmup_steps=1, eval_every=2, eval_batches=2,
                     log_every=1, save_every=100)
    cfg = RunConfig(model=dataclasses.replace(model_preset("tiny"), block_size=32), train=tc, data=str(prepared),
                    out=str(tmp_path / "run"))
    result = train(cfg, progress=False)
    evals = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "val_bpb" in e]
    data = TokenData(prepared)
    n, n_bytes = ev.window_bytes(BatchSampler(data.shards("val"), 2, 32, seed=EVAL_SEED), 2,
                                 ev.token_byte_lengths(data.tokenizer()))
    assert len(evals) == 2 and n == 2 * 2 * 32
    for e in evals:
        assert e["val_bpb"] == pytest.approx(e["val_loss"] * n / math.log(2) / n_bytes)
    # gptforge report --task: the task's score on each checkpoint the run kept, plotted beside the loss
    pytest.importorskip("matplotlib")
    from gptforge.report import report, task_scores

    f = write_jsonl(tmp_path / "t.jsonl", [{"query": "the", "choices": ["king", "queen"], "gold": i % 2} for i in range(4)])
    points = task_scores(result.run_dir, str(f))
    model, tok, run_cfg = load_checkpoint(result.checkpoint)
    expect = ev.evaluate_task(model, tok, ev.read_task_file(f), block_size=run_cfg.model.block_size).score
    assert points == [{"step": 2, "task_score": expect}]
    page = report([result.run_dir], tmp_path / "report", task=str(f))
    assert (page.parent / "task.png").is_file() and "task.png" in page.read_text()
