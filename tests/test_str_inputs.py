"""The str-vs-list trap (issue 19 item 8): every public function that takes a list of texts, paths or prompts
refuses a lone string with a clear GptforgeError (iterating it would take each character as one item), and
every one that takes one text refuses a list; `complete` and `generate` take a string as one prompt."""

import pytest
import torch

from gptforge.compress.evaluate import eval_checkpoints
from gptforge.config import ModelConfig
from gptforge.data import prepare, read_sources
from gptforge.engine import BatchEngine
from gptforge.errors import GptforgeError
from gptforge.eval import evaluate_tasks, prompt_logprobs
from gptforge.finetune.run import classify_texts, predict
from gptforge.generate import Completion, complete, generate, generate_steps, generate_tokens, stream, stream_batch
from gptforge.model import GPT
from gptforge.sampling import SamplingParams
from gptforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["abc"], vocab_size=264)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, vocab_size=264, block_size=32)).eval()


GREEDY = dict(max_new_tokens=4, temperature=0)

# (function, a call with the wrong kind of argument, what the message says)
CASES = {
    "stream_batch": (lambda m, t: list(stream_batch(m, t, "abc", **GREEDY)), "single string.*use the one-prompt"),
    "generate(list of ids)": (lambda m, t: generate(m, t, [1, 2, 3], **GREEDY), "one list of token ids; wrap it"),
    "complete(list of ids)": (lambda m, t: complete(m, t, [1, 2, 3], **GREEDY), "one list of token ids; wrap it"),
    "stream(list of texts)": (lambda m, t: list(stream(m, t, ["a", "b"], **GREEDY)), "a list of str"),
    "generate_steps": (lambda m, t: list(generate_steps(m, [1, 2], SamplingParams(**GREEDY), vocab_size=264)),
                       "one list of token ids"),
    "generate_tokens": (lambda m, t: list(generate_tokens(m, "abc", vocab_size=264, **GREEDY)),
                        "prompt 0 must be token ids.*got a str"),
    "BatchEngine.add": (lambda m, t: BatchEngine(m, t, 2).add("abc", SamplingParams(**GREEDY)),
                        "prompt 0 must be token ids"),
    "Tokenizer.train": (lambda m, t: Tokenizer.train("some text", vocab_size=300), "texts must be a list"),
    "Tokenizer.encode": (lambda m, t: t.encode(["abc"]), "encode takes one string.*encode_batch"),
    "Tokenizer.encode_batch": (lambda m, t: t.encode_batch("abc"), "encode_batch's texts must be a list"),
    "Tokenizer.decode": (lambda m, t: t.decode("abc"), "decode takes token ids"),
    "Tokenizer.decode_stream": (lambda m, t: list(t.decode_stream("abc")), "decode_stream takes token ids"),
    "finetune.predict": (lambda m, t: predict(m, t, "abc"), "predict's texts must be a list"),
    "finetune.classify_texts": (lambda m, t: classify_texts("no-such-ckpt", texts="abc"), "texts must be a list"),
    "eval_checkpoints": (lambda m, t: eval_checkpoints("runs/x", "data"), "paths must be a list"),
    "eval.evaluate_tasks": (lambda m, t: evaluate_tasks("no-such-ckpt", "hellaswag"), "specs must be a list"),
    "eval.prompt_logprobs": (lambda m, t: prompt_logprobs(m, [1, 2, 3], vocab_size=264), "wrap one: \\[ids\\]"),
    "data.prepare": (lambda m, t: prepare("shakespeare", "unused-out"), "sources must be a list"),
    "data.read_sources": (lambda m, t: read_sources("shakespeare"), "sources must be a list"),
}


@pytest.mark.parametrize("name", CASES)
def test_the_wrong_kind_of_argument_is_a_clear_error(name, model, tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and no relative path may exist
    call, message = CASES[name]
    with pytest.raises(GptforgeError, match=message):
        call(model, tok)
    assert list(tmp_path.iterdir()) == []


def test_a_string_is_one_prompt_for_complete_and_generate(model, tok):
    one = complete(model, tok, "ab", **GREEDY)
    assert isinstance(one, Completion) and one == complete(model, tok, ["ab"], **GREEDY)[0]
    assert generate(model, tok, "ab", **GREEDY) == one.text == generate(model, tok, ["ab"], **GREEDY)[0]
    # A prompt may be token ids: a list or a tuple, inside a list for the batch functions.
    ids = tok.encode("ab")
    assert complete(model, tok, [ids], **GREEDY)[0] == complete(model, tok, [tuple(ids)], **GREEDY)[0] == one
    assert "".join(stream(model, tok, ids, **GREEDY)) == one.text
