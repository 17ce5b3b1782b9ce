"""The GPT: token (and position) embeddings, a stack of pre-norm blocks, a final norm and the output head.

Variants that change the math (learned vs rotary positions, LayerNorm vs RMSNorm, GELU vs SwiGLU vs ReLU²
MLP, QK-norm, logit soft-cap, a sliding attention window) are chosen once, when the model is built, as modules
(nn.Identity where a variant is off); forward passes carry no per-variant flags beyond the rotary tables (whose
frequencies Llama 3's RoPE scaling adjusts) and value embeddings.
Nothing here knows about compile, DDP, LoRA or quantization: those wrap a built model from outside.

Shapes: B batch, T sequence length, D d_model, H query heads, K key/value heads, Hd head size, V padded vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.config import ModelConfig


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def make_dropout(p: float) -> nn.Module:
    """nn.Dropout, or nn.Identity when p is 0 (the default): an eval-mode Dropout still costs a call per use,
    ~3% of a small model's decode step."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def rotary_tables(pos: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles pos * theta^(-2i/Hd) (Su et al. 2021), each (T, Hd), fp32.

    Computed per call from the positions rather than stored as buffers: it costs T*Hd multiplies, keeps the
    model free of non-persistent state (so a meta-device build loads cleanly) and accepts any positions.
    Per-row positions pos (B, T) (a left-padded batch) give tables (B, T, Hd).

    With cfg.rope_factor (Llama 3.1's "llama3" RoPE scaling, for a context longer than rope_original_context):
    frequencies whose wavelength exceeds original_context / low_freq_factor are divided by the factor, those
    shorter than original_context / high_freq_factor kept, and the ones between blended linearly.
    """
    hd = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, device=pos.device, dtype=torch.float32) / hd)  # (Hd/2,)
    if cfg.rope_factor is not None:
        ratio = cfg.rope_original_context * inv_freq / (2 * math.pi)  # original context / wavelength
        blend = ((ratio - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)).clamp(0, 1)
        inv_freq = (1 - blend) * inv_freq / cfg.rope_factor + blend * inv_freq  # (Hd/2,)
    angles = pos.float()[..., None] * inv_freq  # (..., T, Hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, Hd): the "rotate half" layout used by HF Llama
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+Hd/2}) of x (B, heads, T, Hd) by the angles in cos/sin (T, Hd) or (B, 1, T, Hd)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, Hd/2) each
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, heads, T, Hd)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query, when n_kv_head < n_head) causal attention through SDPA.

    qk_norm: queries and keys are RMS-normalised per head (a gain per head dim, shared by the heads) before
    the rotary rotation, which bounds the attention logits and allows higher learning rates (Dehghani et al.
    2023; Wortsman et al. 2023). value_gate: this layer reads a value-embedding table (GPT.value_embeds);
    its lookup `ve` (B, T, K*Hd) is added to the values, scaled by a learned gate (modded-nanogpt's value
    embeddings: token identity reaches the values of deep layers without going through the residual stream).
    """

    def __init__(self, cfg: ModelConfig, value_gate: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias  # Qwen2 biases q, k and v but not the output projection
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.value_gate = nn.Parameter(torch.empty(1)) if value_gate else None
        self.dropout = cfg.dropout
        self.resid_drop = make_dropout(cfg.dropout)
        # The attention function, chosen once: PyTorch's SDPA, or precision.widened_sdpa for CPU bf16 runs whose
        # bf16 GEMM is the slow one (precision.widen_bf16 sets it).
        self.sdpa = F.scaled_dot_product_attention

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv=None,
                ve: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask (B, 1, T, T) or (T, T) bool, when given, replaces the plain causal mask (GPT.attn_mask). kv, when
        given, is one layer's view of a KV cache (gptforge.generate.KVCache): `kv.attend` writes this call's
        keys and values into it and the queries attend to every cached position its mask allows. ve
        (B, T, K*Hd) is this layer's value-embedding lookup, None for layers without one."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        if ve is not None:
            v = v + self.value_gate * ve  # (B, T, K*Hd)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, H, T, Hd)
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)  # (B, K, T, Hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, Hd)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv is None:
            y = self.sdpa(
                q, k, v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, H, T, Hd)
        else:  # this call's keys and values join the cache; the queries attend to the cached ones its mask allows
            y = kv.attend(q, k, v)  # (B, H, T, Hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*Hd)
        return self.resid_drop(self.proj(y))


class GeluMLP(nn.Module):
    """GPT-2's MLP: D -> F -> GELU (tanh approximation, as GPT-2 was trained) -> D."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.bias)
        self.down = nn.Linear(cfg.mlp_width, cfg.d_model, bias=cfg.bias)
        self.drop = make_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x), approximate="tanh")))


class SwiGLUMLP(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.bias)
        self.down = nn.Linear(cfg.mlp_width, cfg.d_model, bias=cfg.bias)
        self.drop = make_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


class ReLU2MLP(nn.Module):
    """Primer's MLP: down(relu(up(x))^2) (So et al. 2021); the modded-nanogpt speedrun measured it faster to
    a given loss than GELU at the same width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.bias)
        self.down = nn.Linear(cfg.mlp_width, cfg.d_model, bias=cfg.bias)
        self.drop = make_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.relu(self.up(x)).square()))


MLPS = {"gelu": GeluMLP, "swiglu": SwiGLUMLP, "relu2": ReLU2MLP}


class SoftCap(nn.Module):
    """cap * tanh(logits / cap): logits stay within (-cap, cap) while small ones pass almost unchanged
    (Gemma 2, Team et al. 2024; modded-nanogpt)."""

    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(logits / self.cap)

    def extra_repr(self) -> str:
        return f"cap={self.cap}"


class CausalMask(nn.Module):
    """Which keys each query may attend to in a forward without a KV cache: None (SDPA's own is_causal path)
    unless documents are packed (doc (B, T), each token's document id), then causal within a document."""

    def forward(self, doc: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
        if doc is None:
            return None
        return (self.allowed(T, device) & (doc[:, :, None] == doc[:, None, :]))[:, None]  # (B, 1, T, T)

    def allowed(self, T: int, device: torch.device) -> torch.Tensor:
        return torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)


class SlidingWindowMask(CausalMask):
    """Causal, and each query sees only the latest `window` positions, itself included (Mistral; Beltagy et al.
    2020, Longformer), in every layer. A KV cache applies the same window in its own mask (kvcache.py)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, doc: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
        allowed = self.allowed(T, device)  # (T, T)
        return allowed if doc is None else (allowed & (doc[:, :, None] == doc[:, None, :]))[:, None]  # (B, 1, T, T)

    def allowed(self, T: int, device: torch.device) -> torch.Tensor:
        back = torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)  # (T, T): query - key
        return (back >= 0) & (back < self.window)

    def extra_repr(self) -> str:
        return f"window={self.window}"


def value_embed_layers(cfg: ModelConfig) -> dict[int, int]:
    """Layer -> value-embedding table: table i feeds layer i and layer n_layer - k + i (k = value_embeds),
    the U shape of modded-nanogpt, which shares each table between an early and a late layer."""
    k, n = cfg.value_embeds, cfg.n_layer
    return {**{i: i for i in range(k)}, **{n - k + i: i for i in range(k)}}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, value_gate: bool = False):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, value_gate)
        self.norm2 = make_norm(cfg)
        self.mlp = MLPS[cfg.mlp](cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv=None,
                ve: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, kv, ve, mask)
        return x + self.mlp(self.norm2(x))


class TiedHead(nn.Module):
    """The output head of a model with tied embeddings: logits = x @ table.weight^T, the token table's own
    parameter (Press & Wolf 2017).

    The table is held by reference, not as a child module, so its parameter appears once in a state dict (as
    `tok_emb.weight`: safetensors refuses a tensor stored twice) and a later `load_state_dict(assign=True)` or
    `.to()` of the table is seen here. Transforms that replace the table (quantization) or the matmul (the CPU
    decode layout, widened bf16) swap this module for a subclass of their own.
    """

    def __init__(self, table: nn.Embedding):
        super().__init__()
        self.__dict__["table"] = table  # not registered: the table is the model's tok_emb, saved there

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.table.weight)  # (..., D) -> (..., V)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.drop = make_dropout(cfg.dropout)
        self.attn_mask = SlidingWindowMask(cfg.sliding_window) if cfg.sliding_window is not None else CausalMask()
        self.ve_layers = value_embed_layers(cfg)
        self.value_embeds = nn.ModuleList(
            nn.Embedding(cfg.padded_vocab_size, cfg.kv_heads * cfg.head_dim) for _ in range(cfg.value_embeds))
        self.blocks = nn.ModuleList(Block(cfg, i in self.ve_layers) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = (TiedHead(self.tok_emb) if cfg.tie_embeddings
                        else nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False))
        self.softcap = SoftCap(cfg.logit_softcap) if cfg.logit_softcap is not None else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) for matrices and embeddings, zero biases, unit norms, and the
        projections that write into the residual stream scaled by 1/sqrt(2*n_layer) (Radford et al. 2019).

        zero_init_proj starts those projections (and an untied head) at zero instead, so each block begins
        as the identity and the first steps train the residual stream from the embeddings outward
        (modded-nanogpt; Zhang et al. 2019, Fixup). Value-embedding gates start at 1/2."""
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        zero = ("attn.proj.weight", "mlp.down.weight", "lm_head.weight") if self.config.zero_init_proj else ()
        for name, p in self.named_parameters():
            if name.endswith(zero):
                nn.init.zeros_(p)
            elif name.endswith("value_gate"):
                nn.init.constant_(p, 0.5)
            elif name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # norm weights
                nn.init.ones_(p)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor | None = None, cache=None,
                doc: torch.Tensor | None = None, last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T); pos (T,) or per row (B, T) are their positions, 0..T-1 by
        default. With a KV cache (gptforge.generate.KVCache, for generation) idx are only the new tokens: their
        keys and values join the cached ones, and the cache's mask says which each may attend to. doc (B, T),
        for sequences packed from several documents, is each token's document id: attention stays causal and
        within a document (finetune/data.py packs chats this way); without it (and without a sliding window) SDPA
        runs its is_causal path.
        last (B,), for a prefill, is the one position per row whose logits are wanted: (B, 1, V) are returned,
        and the head (a quarter of a small model's prefill FLOPs) skips the other positions."""
        B, T = idx.shape
        mask = self.attn_mask(doc, T, idx.device) if cache is None else None  # a cache brings its own mask
        if pos is None:
            pos = torch.arange(T, device=idx.device)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, D)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)  # (B, T, D) + (T, D) or (B, T, D)
        else:
            rope = rotary_tables(pos, self.config)  # 2 x (T, Hd) or (B, T, Hd)
            if pos.dim() == 2:
                rope = (rope[0][:, None], rope[1][:, None])  # 2 x (B, 1, T, Hd): broadcast over heads
        x = self.drop(x)
        ves = [table(idx) for table in self.value_embeds]  # (B, T, K*Hd) each; none unless value_embeds
        for i, block in enumerate(self.blocks):
            ve = ves[self.ve_layers[i]] if i in self.ve_layers else None
            x = block(x, rope, None if cache is None else cache.layers[i], ve, mask)
        if last is not None:
            x = x[torch.arange(B, device=x.device), last][:, None]  # (B, 1, D)
        x = self.norm_f(x)
        return self.softcap(self.lm_head(x))  # (B, T, V)

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameters actually allocated; `embeddings=False` leaves out token/position/value tables and the head."""
        total = sum(p.numel() for p in self.parameters())
        if embeddings:
            return total
        tables = [self.tok_emb, *self.value_embeds, self.pos_emb, self.lm_head]  # a tied head owns none
        return total - sum(p.numel() for m in tables if m is not None for p in m.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, 6N + 12*L*d*T: see ModelConfig.flops_per_token."""
        return self.config.flops_per_token(seq_len)
