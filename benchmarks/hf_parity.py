"""Logits parity with `transformers` per family: max |Δlogit| after import-hf and after export-hf, and greedy tokens.

For each family a random model is built with transformers' own config class (4 layers, d_model 64, every
parameter random, biases and norm gains included; no download), saved with save_pretrained, imported with
`import_hf`, and compared in fp32 over a 48-token text (past the sliding windows of 8): the largest absolute
difference of any logit, and whether 16 greedy tokens (ours through the KV cache and, on CPU, the native decode
block; theirs by argmax of the full forward) are equal. The imported checkpoint is then exported with `export_hf`
(the same architecture), loaded back with AutoModelForCausalLM and compared with the original. Target (issue 22):
max |Δlogit| <= 1e-4 and equal greedy tokens for every family, both ways.

    python benchmarks/hf_parity.py            # a table, then a JSON summary
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import transformers as tf

from gptforge.generate import complete
from gptforge.interop import export_hf, import_hf
from gptforge.loader import load_checkpoint
from gptforge.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog; hello world. " * 4
NEW = 16


def families(vocab: int, eos: int) -> dict[str, tuple[type, object]]:
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 max_position_embeddings=256, rms_norm_eps=1e-6, vocab_size=vocab, bos_token_id=eos, eos_token_id=eos,
                 pad_token_id=None)
    llama3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=128)
    return {
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(n_layer=4, n_head=8, n_embd=64, n_positions=256, vocab_size=vocab,
                                                   bos_token_id=eos, eos_token_id=eos)),
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**shape)),
        "llama3-rope": (tf.LlamaForCausalLM, tf.LlamaConfig(**shape, rope_parameters=llama3)),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**shape, tie_word_embeddings=True)),
        "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**shape, head_dim=16)),
        "mistral-window8": (tf.MistralForCausalLM, tf.MistralConfig(**shape, sliding_window=8)),
        "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(**shape)),
    }


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def hf_greedy(model, ids: list[int]) -> list[int]:
    ids = list(ids)
    for _ in range(NEW):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[-NEW:]


def one_family(name: str, cls: type, config, tok: Tokenizer, work: Path) -> dict:
    torch.manual_seed(sum(map(ord, name)))
    hf = cls(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(work / name / "hf")
    tok.save(work / name / "hf" / "tokenizer.json")
    ours, _, _ = load_checkpoint(import_hf(work / name / "hf", work / name / "ckpt"))
    ids = tok.encode(TEXT)
    with torch.no_grad():
        ours_logits = ours(torch.tensor([ids]))[0, :, :tok.vocab_size]
    reference = hf_logits(hf, ids)
    greedy = hf_greedy(hf, ids[:24])
    ours_greedy = complete(ours, tok, [ids[:24]], max_new_tokens=NEW, temperature=0.0, stop_at_eos=False)[0].token_ids
    out, arch = export_hf(work / name / "ckpt", work / name / "export", architecture=cls.__name__)
    back = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    return {"family": name, "architecture": arch, "tokens": len(ids),
            "import_max_abs_dlogit": (ours_logits - reference).abs().max().item(),
            "export_max_abs_dlogit": (hf_logits(back, ids) - reference).abs().max().item(),
            "greedy_equal": ours_greedy == greedy, "export_greedy_equal": hf_greedy(back, ids[:24]) == greedy,
            "export_class": type(back).__name__}


def main() -> None:
    tf.logging.set_verbosity_error()
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog; hello world. " * 40], 300)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cls, config) in families(tok.vocab_size, tok.eos_id).items():
            rows.append(one_family(name, cls, config, tok, Path(tmp)))
    print(f"{'family':<16} {'architecture':<20} {'import max|Δ|':>14} {'export max|Δ|':>14}  greedy (import/export)")
    for r in rows:
        print(f"{r['family']:<16} {r['architecture']:<20} {r['import_max_abs_dlogit']:>14.2e} "
              f"{r['export_max_abs_dlogit']:>14.2e}  {r['greedy_equal']}/{r['export_greedy_equal']}")
    ok = all(r["import_max_abs_dlogit"] <= 1e-4 and r["export_max_abs_dlogit"] <= 1e-4 and r["greedy_equal"]
             and r["export_greedy_equal"] and r["export_class"] == r["architecture"] for r in rows)
    print(json.dumps({"torch": torch.__version__, "transformers": tf.__version__, "target_met": ok, "rows": rows}))


if __name__ == "__main__":
    main()
