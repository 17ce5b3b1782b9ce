"""How close `gptforge plan` is to measurement, configuration by configuration.

On any machine: activation bytes predicted vs the distinct storages autograd saves (saved_tensors_hooks) and
model-state bytes vs the tensors held after one AdamW (and one Muon+AdamW) step. On CUDA, in addition: the predicted peak vs
torch.cuda.max_memory_allocated over a real training step (second micro-batch of an accumulated step), and
whether the "fits" verdict would have been wrong on the unsafe side.

    python benchmarks/plan_accuracy.py            # CPU: hooks and model states
    python benchmarks/plan_accuracy.py --cuda     # also peaks on the current GPU
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from gptforge.config import ModelConfig, TrainConfig, model_preset
from gptforge.distributed import apply_activation_checkpointing
from gptforge.hardware import get_hardware
from gptforge.model import GPT
from gptforge.optim import build_optimizer
from gptforge.plan import PlanConfig, activation_bytes, memory, model_state_bytes

GPT2ISH = ModelConfig(n_layer=4, n_head=8, d_model=256, vocab_size=4096, block_size=256)
LLAMAISH = ModelConfig(n_layer=4, n_head=8, n_kv_head=2, d_model=256, vocab_size=4096, block_size=256,
                       pos_encoding="rotary", norm="rmsnorm", mlp="swiglu", bias=False)


def eager_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    h, kv, t = q.size(1), k.size(1), q.size(-2)
    if kv != h:
        k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(att, dim=-1) @ v


def build(cfg, precision, ckpt, device):
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    return apply_activation_checkpointing(model) if ckpt else model


def loss_of(model, idx, precision):
    with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return F.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten(), reduction="sum")


def hooks_bytes(cfg, b, t, precision, ckpt, device):
    model = build(cfg, precision, ckpt, device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    idx = torch.randint(0, cfg.vocab_size, (b, t), device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss_of(model, idx, precision)
    return sum(seen.values())


def state_bytes(cfg, precision, device, optimizer="adamw"):
    model = build(cfg, precision, False, device)
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer), device.type)
    loss_of(model, torch.randint(0, cfg.vocab_size, (2, 16), device=device), precision).backward()
    opt.step()
    tensors = [t for p in model.parameters() for t in (p, p.grad)]
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def cuda_peak(cfg, b, t, precision, ckpt, device):
    """max_memory_allocated over the second micro-batch of an accumulated AdamW step (gradients held)."""
    model = build(cfg, precision, ckpt, device)
    opt = build_optimizer(model, TrainConfig(), "cuda")
    idx = torch.randint(0, cfg.vocab_size, (b, t), device=device)
    for _ in range(2):  # step 1 creates the optimizer states
        for _ in range(2):
            loss_of(model, idx, precision).backward()
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss_of(model, idx, precision).backward()
    loss_of(model, idx, precision).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cuda", action="store_true", help="also measure peak memory on the current CUDA device")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    cases = [(GPT2ISH, 4, 256, p, a, c) for p in ("fp32", "bf16", "bf16-pure") for a, c in
             (("sdpa", False), ("eager", False), ("sdpa", True))]
    cases += [(LLAMAISH, 4, 256, p, a, c) for p in ("fp32", "bf16") for a, c in
              (("sdpa", False), ("eager", False), ("sdpa", True))]
    print("| model | B x T | precision | attention | ckpt | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    sdpa = F.scaled_dot_product_attention
    worst = 0.0
    for cfg, b, t, prec, attn, ckpt in cases:
        F.scaled_dot_product_attention = eager_attention if attn == "eager" else sdpa
        measured = hooks_bytes(cfg, b, t, prec, ckpt, cpu)
        F.scaled_dot_product_attention = sdpa
        predicted = activation_bytes(cfg, b, t, prec, attn, ckpt, device="cpu").saved
        err = (predicted - measured) / measured
        worst = max(worst, abs(err))
        name = "llama-like" if cfg is LLAMAISH else "gpt2-like"
        print(f"| {name} | {b} x {t} | {prec} | {attn} | {'yes' if ckpt else 'no'} | {predicted / 2**20:.2f} | "
              f"{measured / 2**20:.2f} | {err:+.1%} |")
    print(f"\nactivations: worst |error| {worst:.1%} over {len(cases)} configurations\n")
    print("| model | optimizer | precision | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|")
    for cfg, name in ((GPT2ISH, "gpt2-like"), (LLAMAISH, "llama-like")):
        for opt in ("adamw", "muon"):
            for prec in ("fp32", "bf16", "bf16-pure"):
                s = model_state_bytes(cfg, prec, opt)
                predicted, measured = s.weights + s.gradients + s.optimizer, state_bytes(cfg, prec, cpu, opt)
                print(f"| {name} | {opt} | {prec} | {predicted / 2**20:.3f} | {measured / 2**20:.3f} | "
                      f"{(predicted - measured) / measured:+.2%} |")
    if args.cuda:
        dev = torch.device("cuda")
        hw = get_hardware("h100-sxm")
        print("\n| model | B x T | precision | ckpt | predicted peak GiB | max_memory_allocated GiB | error |")
        print("|---|---|---|---|---|---|---|")
        for cfg, b, t, prec, ckpt in [(model_preset("gpt2"), 8, 1024, "bf16", False),
                                      (model_preset("gpt2"), 16, 1024, "bf16", False),
                                      (model_preset("gpt2"), 16, 1024, "bf16", True),
                                      (model_preset("gpt2"), 8, 1024, "fp32", False),
                                      (model_preset("gpt2-medium"), 8, 1024, "bf16", False),
                                      (model_preset("llama-1b"), 2, 2048, "bf16", True),
                                      (model_preset("llama-1b"), 4, 1024, "bf16-pure", False)]:
            pc = PlanConfig(cfg, seq_len=t, micro_batch=b, global_batch=2 * b, precision=prec, checkpointing=ckpt)
            predicted = memory(pc, hw).peak_allocated
            measured = cuda_peak(cfg, b, t, prec, ckpt, dev)
            print(f"| {cfg.n_layer}L/{cfg.d_model} | {b} x {t} | {prec} | {'yes' if ckpt else 'no'} | "
                  f"{predicted / 2**30:.2f} | {measured / 2**30:.2f} | {(predicted - measured) / measured:+.1%} |")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
