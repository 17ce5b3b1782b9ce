"""/v1/embeddings: the vectors are the served model's own final-norm hidden states, pooled and normalised (checked
against a forward hook on the model's final norm, one input at a time), through the official `openai` client
(which asks for base64 by default) and raw JSON alike."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.serve import ServeConfig, create_app
from gptforge.serve.embeddings import embed, encoder
from gptforge.tokenizer import Tokenizer

TEXTS = ["the quick brown fox", "jumps over the lazy dog. the end", "a", "the quick brown fox jumps over " * 5]


@pytest.fixture(scope="module")
def parts():
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog. " * 20], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=320, block_size=64)).eval()
    return model, tok


def reference(model, ids: list[int], pooling: str) -> np.ndarray:
    """One input alone: the final norm's output, captured by a hook, pooled and normalised."""
    seen = []
    hook = model.norm_f.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.tensor([ids]))
    hook.remove()
    h = seen[0][0]  # (T, D)
    v = h.mean(0) if pooling == "mean" else h[-1]
    return F.normalize(v, dim=-1).numpy()


def app_client(model, tok, pooling: str = "mean", **cfg) -> TestClient:
    return TestClient(create_app(model, tok, ServeConfig(embedding_pooling=pooling, **cfg), "tiny"))


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_vectors_equal_the_model_one_input_at_a_time(parts, pooling):
    model, tok = parts
    with app_client(model, tok, pooling) as c:
        r = c.post("/v1/embeddings", json={"model": "tiny", "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    ids = [tok.encode(t) for t in TEXTS]
    assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    assert body["model"] == "tiny" and body["object"] == "list"
    for d, x in zip(body["data"], ids):
        v = np.array(d["embedding"], dtype=np.float32)
        assert v.shape == (32,)
        np.testing.assert_allclose(v, reference(model, x, pooling), atol=1e-5)
        assert abs(np.linalg.norm(v) - 1) < 1e-5
    # mean and last pool differently: the flag is real
    other = "last" if pooling == "mean" else "mean"
    assert np.abs(np.array(body["data"][1]["embedding"]) - reference(model, ids[1], other)).max() > 1e-3


def test_small_batches_give_the_same_vectors(parts):
    model, tok = parts
    seqs = [tok.encode(t) for t in TEXTS]
    whole = embed(encoder(model), seqs, "mean")
    split = embed(encoder(model), seqs, "mean", batch_tokens=8)  # one or two inputs per forward
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)
    assert model.lm_head is not None and type(model.lm_head).__name__ != "Identity"  # the model keeps its head


def test_openai_client_base64_float_dimensions_and_token_inputs(parts):
    model, tok = parts
    with app_client(model, tok) as c:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=c, max_retries=0)
        ids = [tok.encode(t) for t in TEXTS[:2]]
        res = client.embeddings.create(model="tiny", input=TEXTS[:2])  # the client asks for base64 and decodes it
        got = np.array([d.embedding for d in res.data], dtype=np.float32)
        for v, x in zip(got, ids):
            np.testing.assert_allclose(v, reference(model, x, "mean"), atol=1e-5)
        assert res.usage.prompt_tokens == sum(map(len, ids))
        # explicit float, and token ids (one list, or a list of lists) give the same vectors
        as_float = client.embeddings.create(model="tiny", input=ids, encoding_format="float")
        np.testing.assert_array_equal(np.array([d.embedding for d in as_float.data], dtype=np.float32), got)
        one = client.embeddings.create(model="tiny", input=ids[1], encoding_format="float")
        np.testing.assert_allclose(np.array(one.data[0].embedding, dtype=np.float32), got[1], atol=1e-6)  # batched
        # raw base64: little-endian float32 bytes of the same numbers
        raw, plain = (c.post("/v1/embeddings", json={"model": "tiny", "input": TEXTS[0], "encoding_format": f}).json()
                      for f in ("base64", "float"))
        decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(plain["data"][0]["embedding"], dtype=np.float32))
        # dimensions: the first N components, normalised again
        short = client.embeddings.create(model="tiny", input=TEXTS[0], dimensions=8)
        v = np.array(short.data[0].embedding)
        np.testing.assert_allclose(v, got[0][:8] / np.linalg.norm(got[0][:8]), atol=1e-6)
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="tiny", input=TEXTS[0], dimensions=33)
        assert e.value.body["code"] == "invalid_value" and "1..32" in e.value.body["message"]
        with pytest.raises(openai.NotFoundError) as e:
            client.embeddings.create(model="other", input="x")
        assert e.value.body["code"] == "model_not_found"


def test_api_key_is_required_when_set(parts):
    model, tok = parts
    with app_client(model, tok, api_key="k") as c:
        assert c.post("/v1/embeddings", json={"model": "tiny", "input": "x"}).status_code == 401
        ok = c.post("/v1/embeddings", json={"model": "tiny", "input": "x"}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
