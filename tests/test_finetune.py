"""Fine-tuning: assistant-only loss masks, packing without cross-attention, LoRA (identity at start, adapters
only, merged == unmerged, small checkpoints), chat SFT and classification through the one loop, bad input."""

import dataclasses
import json
import random

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptforge.checkpoint import write_checkpoint
from gptforge.cli import main
from gptforge.config import ModelConfig, RunConfig, TrainConfig
from gptforge.errors import GptforgeError
from gptforge.finetune.data import ChatData, ClassifyData, chat_example, pack
from gptforge.finetune.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from gptforge.finetune.run import FinetuneSpec, classify_texts, finetune
from gptforge.loader import load_checkpoint
from gptforge.model import GPT
from gptforge.tokenizer import EOS, Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog; add one two three four five six seven eight nine. good bad "


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 40], 320)


def tiny(tok, **kw):
    return ModelConfig(**{**dict(n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size, block_size=64), **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    torch.manual_seed(0)
    cfg = tiny(tok)
    return write_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", RunConfig(model=cfg), tok,
                            model_state=GPT(cfg).state_dict())


def train_cfg(out, steps=20, **kw):
    return RunConfig(out=str(out), train=TrainConfig(**{**dict(
        max_steps=steps, micro_batch=4, seq_len=64, lr=3e-3, warmup_steps=2, eval_every=steps, save_every=steps,
        tensorboard=False, device="cpu", log_every=5), **kw}))


WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_chats(path, n=60, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a = rng.randrange(9)
            msgs = [{"role": "user", "content": f"after {WORDS[a]}"}, {"role": "assistant", "content": WORDS[(a + 1) % 9]}]
            if rng.random() < 0.5:
                msgs = [{"role": "system", "content": "count"}] + msgs
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def write_labelled(path, n=160, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            y = rng.random() < 0.5
            words = [rng.choice(["good", "quick"] if y else ["bad", "lazy"]) for _ in range(2)]
            words += [rng.choice(["the", "fox", "dog", "over"]) for _ in range(4)]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": "pos" if y else "neg"}) + "\n")
    return path


# --- chat data ---------------------------------------------------------------------------------------------

def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"},
            {"role": "assistant", "content": "jumps over"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "the dog"}]
    ids, mask = tok.encode_chat(msgs)
    x, y = chat_example(tok, msgs, "here")
    assert x == ids[:-1] and len(y) == len(x)
    for i, t in enumerate(y):  # token by token: a target exactly where the next token is assistant-written
        assert t == (ids[i + 1] if mask[i + 1] else -100)
    learned = [t for t in y if t != -100]
    assert tok.decode(learned) == "jumps over<|im_end|>the dog<|im_end|>"


def test_packing_never_attends_across_conversations(tok):
    convs = [chat_example(tok, [{"role": "user", "content": u}, {"role": "assistant", "content": a}], "x")
             for u, a in (("the fox", "jumps"), ("one two three", "four five"), ("good", "bad dog"))]
    idx, tgt, pos, doc = pack(convs, 128, tok.eos_id)
    assert idx.shape[0] == 1 and set(doc[0].tolist()) == {-1, 0, 1, 2}
    for cfg in (tiny(tok, block_size=128), tiny(tok, block_size=128, pos_encoding="rotary", norm="rmsnorm", mlp="swiglu",
                                                   n_kv_head=2, bias=False)):
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        with torch.no_grad():
            packed = model(torch.from_numpy(idx), pos=torch.from_numpy(pos), doc=torch.from_numpy(doc))[0]
            at = 0
            for x, _ in convs:
                alone = model(torch.tensor([x]))[0]
                torch.testing.assert_close(packed[at:at + len(x)], alone, atol=1e-5, rtol=0)
                at += len(x)
            # Without the document mask the later conversations do see the earlier ones.
            leaky = model(torch.from_numpy(idx), pos=torch.from_numpy(pos))[0]
            assert (leaky[len(convs[0][0]):at] - packed[len(convs[0][0]):at]).abs().max() > 1e-3
    # targets of a packed row are each conversation's own, never the next conversation's first token
    assert tgt[0].tolist()[:len(convs[0][1])] == convs[0][1]


def test_bad_chat_input_names_file_and_line(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    with pytest.raises(GptforgeError, match=r"bad\.jsonl:2: not valid JSON"):
        ChatData(bad, tok)
    bad.write_text('\n{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(GptforgeError, match=r"bad\.jsonl:2: message 0: unknown role 'robot'; use one of system, user, assistant"):
        ChatData(bad, tok)


def test_unseen_label_is_refused(tmp_path, tok):
    train = write_labelled(tmp_path / "train.jsonl", 20)
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "the fox", "label": "pos"}\n{"text": "the dog", "label": "meh"}\n')
    with pytest.raises(GptforgeError, match=r"val\.jsonl:2: label 'meh' was not seen in training; known labels: neg, pos"):
        ClassifyData(train, tok, val_path=val)


# --- LoRA ----------------------------------------------------------------------------------------------------

def test_lora_starts_as_identity_trains_only_adapters_and_merges_exactly(tok):
    torch.manual_seed(0)
    model = GPT(tiny(tok, mlp="swiglu", tie_embeddings=False)).eval()
    x = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        before = model(x)
    apply_lora(model, LoRAConfig(rank=4, targets="qkv,proj,gate,up,down,lm_head"))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 5 + 1
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - before).abs().max() > 1e-3  # the adapters did learn something
        merged = merge_lora(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_chat_sft_full_and_lora_through_the_loop(tmp_path, tok, base):
    data = write_chats(tmp_path / "chat.jsonl")
    full = finetune(train_cfg(tmp_path / "full"), base, FinetuneSpec("full", "chat"), data=str(data), progress=False)
    lora = finetune(train_cfg(tmp_path / "lora", lr=1e-2), base, FinetuneSpec("lora", "chat", LoRAConfig(rank=4)),
                    data=str(data), progress=False)
    assert full.train.final_val_loss < full.train.first_val_loss - 1.0
    assert lora.train.final_val_loss < lora.train.first_val_loss - 0.1
    assert lora.trainable_params < full.trainable_params / 5
    assert lora.optimizer_state_bytes == 8 * lora.trainable_params
    # The LoRA checkpoint holds the adapter only; loading it merges it onto the base it names.
    saved = load_file(str(lora.train.checkpoint / "model.safetensors"))
    assert set(saved) and all(k.endswith((".lora_a", ".lora_b")) for k in saved)
    assert sum(v.numel() for v in saved.values()) == lora.trainable_params
    merged, _, cfg = load_checkpoint(lora.train.checkpoint)
    assert cfg.finetune.method == "lora" and cfg.finetune.base == str(base.resolve())
    unmerged, _, _ = load_checkpoint(base)
    apply_lora(unmerged, LoRAConfig(rank=4))
    unmerged.load_state_dict(saved, strict=False)
    x = torch.randint(0, tok.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged.eval()(x), atol=1e-5, rtol=0)


def test_chat_on_a_tokenizer_without_chat_tokens_adds_them_and_resizes(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TEXT * 40], trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    plain = Tokenizer(hf)
    assert not plain.has_chat_template
    cfg = dataclasses.replace(tiny(plain), vocab_size=plain.vocab_size)
    torch.manual_seed(0)
    ckpt = write_checkpoint(tmp_path / "plain", RunConfig(model=cfg), plain, model_state=GPT(cfg).state_dict())
    r = finetune(train_cfg(tmp_path / "run", steps=6), ckpt, FinetuneSpec("full", "chat"),
                 data=str(write_chats(tmp_path / "c.jsonl", 20)), progress=False)
    model, t, c = load_checkpoint(r.train.checkpoint)
    assert t.has_chat_template and t.vocab_size == plain.vocab_size + 2 == c.model.vocab_size
    emb = model.tok_emb.weight
    assert not torch.equal(emb[t.vocab_size - 1], emb[t.vocab_size - 2])  # the two markers are told apart


# --- classification ---------------------------------------------------------------------------------------------

def test_classification_reaches_high_accuracy(tmp_path, tok, base, capsys):
    data = write_labelled(tmp_path / "cls.jsonl")
    r = finetune(train_cfg(tmp_path / "cls", steps=30), base, FinetuneSpec("full", "classify"), data=str(data),
                 progress=False)
    rep = r.classify
    assert rep["labels"] == ["neg", "pos"] and rep["n"] == 16
    assert rep["accuracy"] >= 0.95
    assert sum(map(sum, rep["confusion"])) == 16
    out = classify_texts(r.train.checkpoint, ["good quick fox", "bad lazy dog"])
    assert [p["label"] for p in out["predictions"]] == ["pos", "neg"]
    with pytest.raises(GptforgeError, match="is a classifier, not a language model"):
        load_checkpoint(r.train.checkpoint)
    # The verb: predictions and, for labelled input, accuracy and the confusion matrix.
    assert main(["classify", str(r.train.checkpoint), "--input", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "confusion" in printed


def test_cli_lora_finetune_then_export_hf_merges(tmp_path, tok, base, capsys):
    transformers = pytest.importorskip("transformers")
    data = write_chats(tmp_path / "chat.jsonl", 30)
    code = main(["finetune", str(base), "--method", "lora", "--task", "chat", "--data", str(data),
                 "--out", str(tmp_path / "run"), "--lora-rank", "4", "--no-progress", "--train.max_steps", "6",
                 "--train.micro_batch", "4", "--train.seq_len", "64", "--train.lr", "1e-2", "--train.tensorboard", "false",
                 "--train.device", "cpu", "--train.warmup_steps", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "lora fine-tuning (chat)" in printed and "the adapter only" in printed
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    ours, _, _ = load_checkpoint(tmp_path / "run")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tok.encode_chat([{"role": "user", "content": "after two"}], add_generation_prompt=True)[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(torch.tensor([ids]))[0, :, :tok.vocab_size], hf(torch.tensor([ids])).logits[0],
                                   atol=1e-4, rtol=0)
