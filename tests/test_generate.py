import pytest
import torch

from gptforge.config import model_preset
from gptforge.errors import GptforgeError
from gptforge.generate import generate_tokens
from gptforge.model import GPT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(model_preset("tiny")).eval()


def greedy_reference(model, ids, n):
    """Argmax of the full recomputation, one token at a time."""
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids[-64:]]))[0, -1, :500]
        ids.append(int(logits.argmax()))
    return ids[-n:]


def test_greedy_matches_reference_beyond_block_size(model):
    prompt = list(range(1, 60))
    out = list(generate_tokens(model, prompt, max_new_tokens=12, vocab_size=500, temperature=0))
    assert out == greedy_reference(model, prompt, 12)


def test_seeded_sampling_is_reproducible(model):
    run = lambda seed: list(generate_tokens(model, [1, 2, 3], max_new_tokens=20, vocab_size=500, temperature=1.0, seed=seed))
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_one_is_greedy_and_padding_never_sampled(model):
    a = list(generate_tokens(model, [5], max_new_tokens=10, vocab_size=500, temperature=1.5, top_k=1, seed=0))
    b = list(generate_tokens(model, [5], max_new_tokens=10, vocab_size=500, temperature=0))
    assert a == b
    # The padded table has 512 rows; ids 500..511 must never come out even at a very high temperature.
    many = list(generate_tokens(model, [5], max_new_tokens=300, vocab_size=500, temperature=50.0, seed=0))
    assert max(many) < 500 and len(set(many)) > 100


def test_top_k_restricts_choices(model):
    with torch.no_grad():
        logits = model(torch.tensor([[7]]))[0, -1, :500]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    firsts = {next(generate_tokens(model, [7], max_new_tokens=1, vocab_size=500, top_k=3, seed=s)) for s in range(40)}
    assert firsts <= top3 and len(firsts) > 1


def test_stops_on_stop_id(model):
    first = next(generate_tokens(model, [9], max_new_tokens=1, vocab_size=500, temperature=0))
    out = list(generate_tokens(model, [9], max_new_tokens=10, vocab_size=500, temperature=0, stop_ids=(first,)))
    assert out == [first]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_arguments(model, kwargs, message):
    args = dict(max_new_tokens=1, vocab_size=500) | kwargs
    with pytest.raises(GptforgeError, match=message):
        list(generate_tokens(model, [1], **args))
