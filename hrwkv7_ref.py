"""
HRWKV7 "hxa079": a hybrid of RWKV-7-style linear-attention blocks and a few softmax GQA blocks
without position encoding (OpenMOSE's HRWKV7-Reka-Flash3.1-Preview), in one file.

    x = embed(input_ids)
    for each layer:  x = x + mix(rmsnorm(x));  x = x + mlp(rmsnorm(x))
    logits = lm_head(rmsnorm(x))

`mix` is an hxa079 time-mix (RWKV7TimeMix) on most layers and a NoPE GQA attention
(GQAAttention) on the layers listed in `config.transformer_layers`; `mlp` is SwiGLU.
The equations, the tensor names and shapes, the config keys and where the official engine
differs are in SPEC.md; the docstrings below repeat the equations each piece computes.

The parameter names are the HF checkpoint's names (`model.layers.3.self_attn.w1`, ...), so a
checkpoint loads with `load_state_dict` and nothing is renamed at run time.

State (HRWKV7State): per RWKV layer a WKV matrix [B, H, N, N] (fixed size), per GQA layer a
key/value cache [B, KV, T_past, N] (grows with the context), and the position offset.
`forward(input_ids, state) -> (logits, new_state)` never mutates the state it was given.

Reading order: the config; the building blocks; the hxa079 time-mix; NoPE GQA attention; the
hybrid model, its state, forward and generation. Below the "Loading" banner: config.json
formats, the safetensors reader and `from_pretrained` (local directories, HF repo ids,
device_map, compute_dtype); then the memory formulas and the presets; then the demo.

    python hrwkv7_ref.py          # a self-check on a tiny random model (no download)
    python hrwkv7_cli.py --model DIR_OR_REPO_ID --prompt "..."    # run a checkpoint (hrwkv7_cli.py)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from wkv_kernel import state_dtype, wkv7

# -----------------------------------------------------------------------------
# Config


@dataclass
class HRWKV7Config:
    """The HF `config.json` of an hxa079 checkpoint (SPEC.md §3). Unknown keys are kept in `extra`."""
    vocab_size: int = 256                    # n_vocab
    hidden_size: int = 64                    # C
    num_hidden_layers: int = 4               # L
    num_attention_heads: int = 4             # H
    num_key_value_heads: int = 2             # KV
    head_dim: Optional[int] = None           # N (None: hidden_size // num_attention_heads)
    intermediate_size: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    transformer_layers: list = field(default_factory=list)   # indices of the GQA layers
    enable_qk_norm: bool = False
    attention_bias: bool = False
    lora_rank_decay: int = 8
    lora_rank_iclr: int = 8
    lora_rank_value_residual_mix: int = 8
    lora_rank_key_residual_mix: int = 8
    lora_rank_gate: int = 16
    rwkv_architecture: str = "hxa079"
    extra: dict = field(default_factory=dict)  # any other config.json key, kept for round trips

    def __post_init__(self):
        self.transformer_layers = sorted(int(i) for i in self.transformer_layers)
        self.validate()

    # derived sizes
    @property
    def head_size(self) -> int:              # N
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def is_gqa(self, i: int) -> bool:
        return i in self.transformer_layers

    @property
    def first_rwkv_layer(self) -> Optional[int]:
        return next((i for i in range(self.num_hidden_layers) if not self.is_gqa(i)), None)

    @property
    def layer_kinds(self) -> str:
        """The layer pattern, one letter per layer: R = RWKV (hxa079 time-mix), G = NoPE GQA."""
        return "".join("G" if self.is_gqa(i) else "R" for i in range(self.num_hidden_layers))

    def validate(self):
        def bad(name, why):
            raise ValueError(f"HRWKV7Config.{name}: {why}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "lora_rank_decay", "lora_rank_iclr",
                     "lora_rank_value_residual_mix", "lora_rank_key_residual_mix", "lora_rank_gate"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                bad(name, f"must be a positive integer, got {val!r}")
        H, KV = self.num_attention_heads, self.num_key_value_heads
        if H % KV != 0:
            bad("num_key_value_heads", f"num_attention_heads={H} is not a multiple of num_key_value_heads={KV}")
        if self.head_dim is None:
            if self.hidden_size % H != 0:
                bad("head_dim", f"absent, and hidden_size={self.hidden_size} is not divisible by "
                                f"num_attention_heads={H}")
        elif not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim <= 0:
            bad("head_dim", f"must be a positive integer or absent, got {self.head_dim!r}")
        if self.head_size % 2 != 0:
            bad("head_dim", f"RoPE rotates pairs of dimensions: head size {self.head_size} must be even")
        L = self.num_hidden_layers
        if any(not 0 <= i < L for i in self.transformer_layers):
            bad("transformer_layers", f"{self.transformer_layers} has an index outside [0, {L})")
        if len(set(self.transformer_layers)) != len(self.transformer_layers):
            bad("transformer_layers", f"{self.transformer_layers} repeats an index")
        if not self.rms_norm_eps > 0:
            bad("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            bad("rope_theta", f"must be > 0, got {self.rope_theta!r}")
        if self.rwkv_architecture != "hxa079":
            bad("rwkv_architecture", f"this implementation computes 'hxa079', got {self.rwkv_architecture!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "HRWKV7Config":
        """From a config.json dict. The RoPE base may be `rope_theta` or inside `rope_parameters` /
        `rope_scaling` (see fold_rope_keys, under Loading)."""
        d = fold_rope_keys(d, where)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {key: val for key, val in d.items() if key in known}
        extra = {key: val for key, val in d.items() if key not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path, overrides: Optional[dict] = None) -> "HRWKV7Config":
        """From a config.json file; `overrides` replace its keys."""
        return cls.from_dict(override_config(read_json(path), overrides, str(path)), where=str(path))

    def to_dict(self) -> dict:
        """The config.json dict: head_dim always written, the RoPE base both as `rope_theta` and as
        transformers >= 5 writes it (`rope_parameters`)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["head_dim"] = self.head_size
        d["transformer_layers"] = list(d["transformer_layers"])
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return {**self.extra, **d}


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim, computed in >= float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions, N: int, theta: float, dtype, device):
    """cos, sin [T, N] for rotate-half RoPE: angle[t, j] = pos_t * theta^(-2j/N), j < N/2, repeated twice.
    Angles are formed in float64 so large positions stay exact, then cast to the model dtype."""
    inv_freq = theta ** (-torch.arange(0, N, 2, dtype=torch.float64, device=device) / N)  # [N/2]
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]                        # [T, N/2]
    ang = torch.cat([ang, ang], dim=-1)                                                   # [T, N]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, h, N] -> x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


def repeat_kv(x, n_rep: int):
    """[B, T, KV, N] -> [B, T, KV * n_rep, N]; head h reads KV head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))"""

    def __init__(self, C: int, I: int):
        super().__init__()
        self.gate_proj = nn.Linear(C, I, bias=False)
        self.up_proj = nn.Linear(C, I, bias=False)
        self.down_proj = nn.Linear(I, C, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -----------------------------------------------------------------------------
# The hxa079 time-mix

# hxa079's own parameters beside the projections and norms: the biases [1, 1, D] of its four paths,
# the low-rank matrices (stored [in, out], used as x @ w1 @ w2) whose rank is the config field
# named here, and the bonus r_k [H, N]
HXA079_BIASES = ("w0", "a0", "v0", "k0")
HXA079_LORA = {"w1": "lora_rank_decay", "w2": "lora_rank_decay", "a1": "lora_rank_iclr", "a2": "lora_rank_iclr",
               "v1": "lora_rank_value_residual_mix", "v2": "lora_rank_value_residual_mix",
               "k1": "lora_rank_key_residual_mix", "k2": "lora_rank_key_residual_mix",
               "g1": "lora_rank_gate", "g2": "lora_rank_gate"}
HXA079_PARAMS = (*HXA079_BIASES, *HXA079_LORA, "r_k")


class RWKV7TimeMix(nn.Module):
    """
    hxa079 time-mix (SPEC.md §4), per token (x is the normed hidden state, shapes per head):

        r = x Wr^T (+br)   [H, N];   k = x Wk^T (+bk)   [KV, N];   v = x Wv^T (+bv)   [KV, N]
        r, k = rmsnorm(r), rmsnorm(k)                    (only with enable_qk_norm)
        r, k = rope(r, pos), rope(k, pos)                (absolute position)
        first RWKV layer: v_first, k_first = v, k
        later layers:     v += (v_first - v) * sigmoid(x v1 v2 + v0)
                          k += (k_first - k) * sigmoid(x k1 k2 + k0)
        k, v = repeat each KV head H/KV times
        iclr = sigmoid(x a1 a2 + a0)                     in-context learning rate
        kk = k / max(||k||, 1e-12)
        w_pre = -softplus(-(tanh(x w1) w2 + w0)) - 0.5  pre-decay (<= -0.5)
        w  = -exp(w_pre)                                 log decay, in [-exp(-0.5), 0)
        k  = k * (1 - w_pre + iclr)
        y  = WKV(r, w, k, v, a = -kk, b = kk * iclr) * N^-0.5   (SPEC.md §5)
        y += sum(r * k * r_k) * v                        per-head bonus (uses the scaled k)
        out = (y * (sigmoid(x g1) g2)) Wo^T
    The per-token decay factor is exp(w) = exp(-exp(w_pre)). No token shift, no GroupNorm. The
    decay path (w_pre and w) is computed in at least float32 whatever the weights' dtype: a
    bfloat16 rounding of w_pre near -5 would move w by up to 1.6%; the WKV kernels take a float32
    w beside bf16/fp16 inputs.
    """

    def __init__(self, cfg: HRWKV7Config, layer_id: int):
        super().__init__()
        C, H, KV, N = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        A, D = H * N, KV * N                                            # widths of r (w, a, g) and of k, v
        self.H, self.KV, self.N = H, KV, N
        self.is_first = layer_id == cfg.first_rwkv_layer
        self.receptance = nn.Linear(C, A, bias=cfg.attention_bias)
        self.key = nn.Linear(C, D, bias=cfg.attention_bias)
        self.value = nn.Linear(C, D, bias=cfg.attention_bias)
        self.output = nn.Linear(A, C, bias=False)
        if cfg.enable_qk_norm:
            self.r_norm = RMSNorm(N, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(N, cfg.rms_norm_eps)
        Rw, Ra, Rv, Rk, Rg = (getattr(cfg, HXA079_LORA[name]) for name in ("w1", "a1", "v1", "k1", "g1"))
        param = lambda *shape: nn.Parameter(torch.zeros(*shape))  # noqa: E731  (filled by init or a checkpoint)
        self.w0, self.w1, self.w2 = param(1, 1, A), param(C, Rw), param(Rw, A)
        self.a0, self.a1, self.a2 = param(1, 1, A), param(C, Ra), param(Ra, A)
        self.v0, self.v1, self.v2 = param(1, 1, D), param(C, Rv), param(Rv, D)
        self.k0, self.k1, self.k2 = param(1, 1, D), param(C, Rk), param(Rk, D)
        self.g1, self.g2 = param(C, Rg), param(Rg, A)
        self.r_k = param(H, N)

    def forward(self, x, cos, sin, S, v_first, k_first, wkv_impl="auto"):
        """x [B, T, C], RoPE tables cos, sin [T, N], S: the WKV state [B, H, N, N] (None: zeros),
        v_first, k_first [B, T, KV, N] of the first RWKV layer (None in that layer)
        -> out [B, T, C], the new S, v_first, k_first."""
        B, T, _ = x.shape
        H, KV, N = self.H, self.KV, self.N
        r = self.receptance(x).view(B, T, H, N)                          # [B, T, H, N]
        k = self.key(x).view(B, T, KV, N)                                # [B, T, KV, N]
        v = self.value(x).view(B, T, KV, N)                              # [B, T, KV, N]
        if hasattr(self, "r_norm"):
            r, k = self.r_norm(r), self.k_norm(k)
        r, k = apply_rope(r, cos, sin), apply_rope(k, cos, sin)
        if self.is_first:
            v_first, k_first = v, k
        else:
            v = v + (v_first - v) * torch.sigmoid(x @ self.v1 @ self.v2 + self.v0).view(B, T, KV, N)
            k = k + (k_first - k) * torch.sigmoid(x @ self.k1 @ self.k2 + self.k0).view(B, T, KV, N)
        k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)             # [B, T, H, N]
        iclr = torch.sigmoid(x @ self.a1 @ self.a2 + self.a0).view(B, T, H, N)
        kk = F.normalize(k, dim=-1, eps=1e-12)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))          # the decay path in >= float32
        w_pre = -F.softplus(-(torch.tanh(xf @ self.w1.to(xf.dtype)) @ self.w2.to(xf.dtype) + self.w0.to(xf.dtype))) - 0.5
        w_pre = w_pre.view(B, T, H, N)                                  # pre-decay, <= -0.5
        k = (k * (1 - w_pre + iclr)).to(x.dtype)
        w = -torch.exp(w_pre)                                           # log decay [B, T, H, N], >= float32
        y, S = wkv7(r, w, k, v, -kk, kk * iclr, S, impl=wkv_impl)       # [B, T, H, N], [B, H, N, N]
        y = y * N ** -0.5
        y = y + (r * k * self.r_k).sum(-1, keepdim=True) * v
        g = torch.sigmoid(x @ self.g1) @ self.g2                        # [B, T, A]
        return self.output(y.reshape(B, T, H * N) * g), S, v_first, k_first


# -----------------------------------------------------------------------------
# NoPE GQA attention


def causal_attention_reference(q, k, v):
    """o = softmax(q k^T * N^-0.5 + mask) v, the definition, materialising every score.
    q [B, H, T, N] (the T new queries), k, v [B, KV, P+T, N] (P cached keys and values, then the T
    new ones); head h reads KV head h // (H / KV); mask[i, j] = -inf where j > P + i (query i sees
    keys j <= P + i). Computed in >= float32 and returned in q's dtype. Memory O(H T (P+T)): for
    tests and short inputs."""
    B, H, T, N = q.shape
    KV, n_keys = k.shape[1], k.shape[2]
    P = n_keys - T                                                      # cached positions
    dt = torch.promote_types(q.dtype, torch.float32)
    kr = k.to(dt).repeat_interleave(H // KV, dim=1)                     # [B, H, P+T, N]
    vr = v.to(dt).repeat_interleave(H // KV, dim=1)                     # [B, H, P+T, N]
    att = (q.to(dt) @ kr.transpose(-1, -2)) * N ** -0.5                 # [B, H, T, P+T]
    i = torch.arange(T, device=q.device)[:, None] + P
    j = torch.arange(n_keys, device=q.device)[None, :]
    att = att.masked_fill(j > i, float("-inf"))
    return (torch.softmax(att, dim=-1) @ vr).to(q.dtype)               # [B, H, T, N]


def causal_attention(q, k, v, block_elements: int = 2 ** 22):
    """causal_attention_reference(q, k, v) through F.scaled_dot_product_attention (grouped heads with
    enable_gqa=True, flash kernels on CUDA and the CPU), in memory linear in the context.
    q [B, H, T, N], k, v [B, KV, P+T, N] -> o [B, H, T, N].
      T == 1 (a decode step): one call, no mask (the new query sees every key).
      P == 0 (a fresh prefill): one call, is_causal=True (top-left == end alignment when P == 0).
      P > 0 and T > 1 (a prefill after a cache): blocks of bq = block_elements // (P + T) queries
        (at least 1), block [t0, t1) over the keys [0, P + t1) with an additive mask (-inf where
        j > P + i, broadcast over batch and heads); all blocks' masks are views of one [bq, P + T]
        tensor, the only memory this path adds (see attention_transient_bytes)."""
    B, H, T, N = q.shape
    n_keys = k.shape[2]                                                 # P + T
    P = n_keys - T                                                      # cached positions
    if T == 1 or P == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
    bq = max(1, min(T, block_elements // n_keys))                       # queries per block
    # One mask for every block: mask[i, j] = -inf where j > n_keys - bq + i. Block [t0, t1) (queries
    # P + t0 ..., keys [0, P + t1)) takes its last t1 - t0 rows and last P + t1 columns, a view.
    mask = torch.full((bq, n_keys), float("-inf"), dtype=q.dtype, device=q.device).triu_(n_keys - bq + 1)
    o = torch.empty_like(q)                                             # [B, H, T, N]
    for t0 in range(0, T, bq):
        t1 = min(T, t0 + bq)
        o[:, :, t0:t1] = F.scaled_dot_product_attention(
            q[:, :, t0:t1], k[:, :, :P + t1], v[:, :, :P + t1],
            attn_mask=mask[bq - (t1 - t0):, n_keys - (P + t1):], enable_gqa=True)
    return o


class GQAAttention(nn.Module):
    """Causal softmax attention (SPEC.md §6), grouped KV heads, no position encoding, with a KV cache:
        o = softmax(q k^T * N^-0.5 + causal mask) v   over [cached keys, new keys]
    computed by causal_attention (scaled_dot_product_attention, memory linear in the context),
    which the tests hold to causal_attention_reference, the formula written out.
    Which SDPA kernel runs: on a CPU with torch >= 2.9 its flash kernel in every case (float64,
    float32, bfloat16 with float32 scores and softmax); with older torch on a CPU, and for float32 on
    CUDA, SDPA falls back to its math kernel, which materialises the scores of a fresh prefill
    (exact still, but O(T^2) memory)."""

    def __init__(self, cfg: HRWKV7Config):
        super().__init__()
        C, H, KV, N = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        self.H, self.KV, self.N = H, KV, N
        self.q_proj = nn.Linear(C, H * N, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, KV * N, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, KV * N, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * N, C, bias=False)
        if cfg.enable_qk_norm:
            self.q_norm = RMSNorm(N, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(N, cfg.rms_norm_eps)

    def forward(self, x, cache):
        """x [B, T, C], cache (k, v) [B, KV, P, N] or None -> out [B, T, C], (k, v) [B, KV, P+T, N]."""
        B, T, _ = x.shape
        H, KV, N = self.H, self.KV, self.N
        q = self.q_proj(x).view(B, T, H, N)
        k = self.k_proj(x).view(B, T, KV, N)
        v = self.v_proj(x).view(B, T, KV, N)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H, T, N], [B, KV, T, N]
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # [B, KV, P+T, N]
        o = causal_attention(q, k, v)                                       # [B, H, T, N]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * N)), (k, v)


# -----------------------------------------------------------------------------
# The hybrid model


class DecoderLayer(nn.Module):
    """One block: an hxa079 time-mix or a NoPE GQA attention (self_attn), then SwiGLU (mlp)."""

    def __init__(self, cfg: HRWKV7Config, layer_id: int):
        super().__init__()
        self.is_gqa = cfg.is_gqa(layer_id)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GQAAttention(cfg) if self.is_gqa else RWKV7TimeMix(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, layer_state, v_first, k_first, wkv_impl="auto"):
        """x = x + mix(rmsnorm(x));  x = x + mlp(rmsnorm(x)).  layer_state: this layer's part of the
        state (None: empty); cos, sin, v_first, k_first: the RWKV layers' RoPE tables and first-layer
        values/keys. -> x, the layer's new state, v_first, k_first."""
        h = self.input_layernorm(x)
        if self.is_gqa:
            out, layer_state = self.self_attn(h, layer_state)
        else:
            out, layer_state, v_first, k_first = self.self_attn(h, cos, sin, layer_state, v_first, k_first,
                                                                 wkv_impl)
        x = x + out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, layer_state, v_first, k_first


@dataclass
class HRWKV7State:
    """Everything the model carries between calls (SPEC.md §7).
    per_layer[i] is the WKV state S [B, H, N, N] (rows: key dimension, columns: value dimension) for
    an RWKV layer, the cache (k, v) [B, KV, P, N] for a GQA layer, or None (empty: no token yet);
    pos is P, the number of tokens already seen (the RoPE offset of the RWKV layers)."""
    per_layer: list
    pos: int = 0

    def nbytes(self) -> dict:
        rwkv = sum(s.numel() * s.element_size() for s in self.per_layer if torch.is_tensor(s))
        kv = sum(t.numel() * t.element_size() for s in self.per_layer if isinstance(s, tuple) for t in s)
        return {"rwkv_state": rwkv, "kv_cache": kv}


class HRWKV7Model(nn.Module):
    """embed -> the decoder layers -> final RMSNorm (SPEC.md §2), carrying the state."""

    def __init__(self, cfg: HRWKV7Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, state: HRWKV7State, wkv_impl="auto"):
        """input_ids [B, T], state (checked) -> x [B, T, C] after the final norm, the state after the T
        tokens. Positions are absolute: state.pos, ..., state.pos + T - 1."""
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids)                                # [B, T, C]
        pos = torch.arange(state.pos, state.pos + T, device=x.device)
        cos, sin = rope_cos_sin(pos, self.config.head_size, self.config.rope_theta, x.dtype, x.device)  # [T, N]
        v_first = k_first = None
        per_layer = []
        for layer, layer_state in zip(self.layers, state.per_layer):
            x, layer_state, v_first, k_first = layer(x, cos, sin, layer_state, v_first, k_first, wkv_impl)
            per_layer.append(layer_state)
        return self.norm(x), HRWKV7State(per_layer, state.pos + T)


class HRWKV7ForCausalLM(nn.Module):
    """HRWKV7Model + lm_head (or the tied embedding): ids and state in, logits and the new state out."""

    def __init__(self, config: HRWKV7Config):
        super().__init__()
        self.config = config
        self.model = HRWKV7Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.wkv_impl = "auto"   # the `impl` of every wkv_kernel.wkv7 call ("auto": chosen per call)
        self.compiled_decode = None   # run() compiled for one-token calls, by compile_decode()

    # ---- weights

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.1):
        """Random weights for tests and the demo (not the training initialisation): N(0, std^2) for
        the projections, embeddings and head; norm weights 1 + N(0, 0.01); the biases w0, a0, v0, k0
        N(0, 1); the low-rank matrices and r_k N(0, 0.09). Drawn in float64 from a generator seeded
        with `seed`, then cast to the parameters' dtype."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                val = 1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            elif name.rsplit(".", 1)[-1] in HXA079_BIASES:
                val = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            elif name.rsplit(".", 1)[-1] in HXA079_PARAMS:
                val = 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:
                val = std * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(val.to(p.dtype))
        return self

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", config=None, *, revision=None,
                        compute_dtype=None, device_map=None, offload_folder=None, progress=False,
                        compile: bool = False) -> "HRWKV7ForCausalLM":
        """Load an HF-layout checkpoint (a directory or an HF repo id): load_pretrained, under Loading.
        compile=True: then compile_decode()."""
        model = load_pretrained(path, dtype, device, config, revision=revision, compute_dtype=compute_dtype,
                                device_map=device_map, offload_folder=offload_folder, progress=progress,
                                model_class=cls)
        return model.compile_decode() if compile else model

    @property
    def dtype(self):
        """The dtype the model computes in (and keeps its KV caches in): its weights' dtype, or the
        compute_dtype it was loaded with."""
        embed = self.model.embed_tokens
        return getattr(embed, "compute_dtype", embed.weight.dtype)

    # ---- state

    def state_layout(self, batch_size: int) -> list:
        """Per layer ("RWKV", WKV state shape, dtype) or ("GQA", cache shape with no positions yet, dtype)."""
        cfg = self.config
        H, KV, N = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        return [("GQA", (batch_size, KV, 0, N), self.dtype) if cfg.is_gqa(i) else
                ("RWKV", (batch_size, H, N, N), state_dtype(self.dtype)) for i in range(cfg.num_hidden_layers)]

    def check_inputs(self, input_ids, state: Optional[HRWKV7State], check_ids: bool = True) -> HRWKV7State:
        """Refuse, with a ValueError naming what is wrong, before any work: input_ids that are not an
        integer tensor [B, T] with T >= 1 and every id in [0, vocab_size) (one host sync; skipped when
        check_ids is False), and a state whose layers do not match this model's layer kinds, shapes,
        dtypes and batch size B, or whose caches disagree with state.pos. Returns the state (an empty
        one for None)."""
        n_vocab = self.config.vocab_size
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError("input_ids must be an integer tensor [B, T], got "
                             + (f"{input_ids.dtype} {tuple(input_ids.shape)}" if torch.is_tensor(input_ids)
                                else type(input_ids).__name__))
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids has no tokens (T == 0)")
        if check_ids and not bool(((input_ids >= 0) & (input_ids < n_vocab)).all()):
            bad = input_ids[(input_ids < 0) | (input_ids >= n_vocab)][0].item()
            raise ValueError(f"input_ids contains token id {bad}, outside [0, vocab_size={n_vocab})")
        layout = self.state_layout(B)
        if state is None:                                               # each layer starts empty
            return HRWKV7State([None] * len(layout), 0)
        if not isinstance(state, HRWKV7State):
            raise ValueError(f"state must be an HRWKV7State, got {type(state).__name__}")
        if len(state.per_layer) != len(layout):
            raise ValueError(f"state.per_layer has {len(state.per_layer)} entries, the model has "
                             f"{len(layout)} layers")
        for i, (s, (kind, want, dtype)) in enumerate(zip(state.per_layer, layout)):
            if s is None:
                if kind == "GQA" and state.pos != 0:
                    raise ValueError(f"state.per_layer[{i}] (GQA) holds no cache but state.pos={state.pos}")
                continue
            if (kind == "GQA") != isinstance(s, tuple):
                raise ValueError(f"state.per_layer[{i}]: layer {i} is {kind}, the state holds the other kind")
            for got in s if kind == "GQA" else [s]:
                if got.dim() != len(want) or got.shape[0] != B:
                    raise ValueError(f"state.per_layer[{i}] ({kind}) has shape {tuple(got.shape)}: batch size "
                                     f"{got.shape[0] if got.dim() else '?'}, but input_ids has batch size {B}")
                got_shape, want_shape = tuple(got.shape), want
                if kind == "GQA":                                       # the cache length may be anything
                    got_shape, want_shape = got_shape[:2] + got_shape[3:], want[:2] + want[3:]
                if got_shape != want_shape or got.dtype != dtype:
                    raise ValueError(f"state.per_layer[{i}] ({kind}) has shape {tuple(got.shape)} {got.dtype}, "
                                     f"expected {want} {dtype} (batch size {B})")
            if kind == "GQA" and s[0].shape[2] != state.pos:
                raise ValueError(f"state.per_layer[{i}] caches {s[0].shape[2]} positions but state.pos={state.pos}")
        return state

    # ---- forward

    def forward(self, input_ids, state: Optional[HRWKV7State] = None, *, check_ids: bool = True):
        """input_ids [B, T] -> logits [B, T, n_vocab], the state after the T tokens. `state` (None: empty) is
        read, never changed. check_ids=False skips the token-id range check, the one host sync of a
        call (generate passes it for the tokens it drew itself)."""
        state = self.check_inputs(input_ids, state, check_ids)
        if input_ids.shape[1] == 1 and self.compiled_decode is not None:
            return self.compiled_decode(input_ids, state)
        return self.run(input_ids, state)

    def run(self, input_ids, state: HRWKV7State):
        """forward without the input checks."""
        x, state = self.model(input_ids, state, self.wkv_impl)          # [B, T, C]
        if self.config.tie_word_embeddings:
            logits = linear_in(x, self.model.embed_tokens.weight)      # [B, T, n_vocab]
        else:
            logits = self.lm_head(x)                                    # [B, T, n_vocab]
        return logits, state

    def compile_decode(self, **compile_kwargs) -> "HRWKV7ForCausalLM":
        """Run every one-token call (a decode step) through torch.compile(run), as gpt-fast does;
        prefill stays eager. dynamic=True: the caches' length and state.pos change every step and are
        compiled as symbols, so one graph serves every step after the first two calls. The first
        compile takes a minute or two on a CPU (with a C++ compiler). It pays where a step is bound by
        per-op overhead (a small model) or by the cast of compute_dtype, which inductor fuses into the
        products; for a large float32 or bfloat16 model it gains little (`python bench_model.py
        --compile`). Returns self."""
        self.compiled_decode = torch.compile(self.run, dynamic=True, **compile_kwargs)
        return self

    # ---- generation

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 seed: Optional[int] = None, state: Optional[HRWKV7State] = None, eos_token_id=None,
                 on_token=None):
        """Parallel prefill of input_ids [B, T], then one token at a time through the state.
        temperature == 0 is greedy; top_p < 1 samples from the smallest set of tokens whose
        probability reaches top_p. Draws come from a generator of their own, seeded with `seed`
        (None: a fresh random seed); torch's global RNG is neither used nor reseeded. Stops early
        once every sequence has produced one of eos_token_id (an int or a list; a finished sequence
        is padded with its EOS token). on_token(ids [B, 1]) is called with each new token as soon as
        it is drawn; when it returns True, generation ends there. Returns [B, T + new tokens]."""
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        device = input_ids.device
        eos = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=device).reshape(-1)
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()                                                  # this generator only
        else:
            gen.manual_seed(seed)
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=device)
        logits, state = self(input_ids, state)
        for step in range(max_new_tokens):
            nxt = sample(logits[:, -1], temperature, top_p, gen)          # [B, 1]
            nxt = torch.where(done, out[-1][:, -1:], nxt)                 # a finished sequence repeats its EOS
            out.append(nxt)
            stop = on_token is not None and bool(on_token(nxt))
            done |= torch.isin(nxt, eos)
            if stop or step + 1 == max_new_tokens or (len(eos) and bool(done.all())):
                break
            logits, state = self(nxt, state, check_ids=False)             # drawn in [0, n_vocab): no range check
        return torch.cat(out, dim=1)


def sample(logits, temperature: float, top_p: float, gen) -> torch.Tensor:
    """logits [B, n_vocab] -> token ids [B, 1]."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p                                # tokens before the mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
    return torch.multinomial(probs, 1, generator=gen)


# #############################################################################
# Loading: config.json formats, the safetensors reader, from_pretrained (local directories, HF repo
# ids, device_map, compute_dtype). Third-party packages beside torch are imported where they are used.


def read_json(path, default: Optional[dict] = None) -> dict:
    """The JSON object in the file `path`. A missing file is a FileNotFoundError, or `default` when one
    is given; anything else that is not a JSON object is a ValueError naming the path."""
    if default is not None and not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a JSON object ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def fold_rope_keys(d: dict, where: str = "config") -> dict:
    """A copy of the HF config dict d with its RoPE base under `rope_theta` alone, wherever the file
    keeps it: `rope_theta` (transformers < 5), `rope_parameters.rope_theta` (transformers >= 5) or
    `rope_scaling.rope_theta` (some files in between); `rope_parameters` and `rope_scaling` are
    dropped once read. This model computes plain RoPE: a rope_type other than "default" (llama3,
    yarn, dynamic, linear, ...) is a ValueError naming it and `where`, as are two places that
    disagree."""
    found = {}
    if d.get("rope_theta") is not None:
        found["rope_theta"] = d["rope_theta"]
    for key in ("rope_parameters", "rope_scaling"):
        p = d.get(key)
        if p is None:
            continue
        if not isinstance(p, dict) or any(isinstance(v, dict) for v in p.values()):
            raise ValueError(f"{where}: {key} = {p!r} is not one set of RoPE parameters")
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{where}: {key} has rope_type {kind!r}; this model computes plain RoPE "
                             f"(rope_type 'default') only")
        if p.get("rope_theta") is not None:
            found[f"{key}.rope_theta"] = p["rope_theta"]
    if len({float(v) for v in found.values()}) > 1:
        raise ValueError(f"{where}: the RoPE base is given twice, differently: {found}")
    d = {key: val for key, val in d.items() if key not in ("rope_parameters", "rope_scaling")}
    if found:
        d["rope_theta"] = float(next(iter(found.values())))
    return d


def override_config(d: dict, overrides: Optional[dict], where: str = "config") -> dict:
    """config dict d with the keys of `overrides` replacing its own. Each one's RoPE base is read
    first (fold_rope_keys), so an overriding rope_theta replaces a file's rope_parameters too."""
    return {**fold_rope_keys(d, where), **fold_rope_keys(overrides or {}, "overrides")}


def open_safetensors_file(path):
    """safe_open(path) (a context manager; the header read, nothing else), or a ValueError naming the
    path when the file is missing, truncated, has a corrupt header or is not safetensors."""
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None


@contextlib.contextmanager
def open_safetensors(ckpt_dir):
    """Open the safetensors files of an HF checkpoint directory, each once, and read their headers:
    yields {tensor name: (file path, shape, open file)}; the files stay open (memory-mapped, nothing
    read but the headers) until the block ends. The files are model.safetensors, or the shards named
    by model.safetensors.index.json. An index entry must be a bare file name of the directory (no
    separator, no "..", not absolute); links in the directory are followed (the HF hub cache keeps
    each file as a link into ../../blobs). The index and the shards must agree. Raises a ValueError
    naming the file or the entry."""
    ckpt_dir = os.fspath(ckpt_dir)
    single = os.path.join(ckpt_dir, "model.safetensors")
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(single):
        weight_map = None
    elif os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: not a safetensors index with a weight_map")
        for name, file in weight_map.items():
            if (not isinstance(file, str) or file in ("", ".", "..") or os.path.basename(file) != file
                    or "/" in file or "\\" in file):
                raise ValueError(f"{index}: weight_map entry {name!r}: {file!r} is not a bare file name "
                                 f"in {ckpt_dir}")
    else:
        raise FileNotFoundError(f"{ckpt_dir}: neither model.safetensors nor model.safetensors.index.json")
    out, problems = {}, []
    with contextlib.ExitStack() as stack:
        for file in ["model.safetensors"] if weight_map is None else sorted(set(weight_map.values())):
            full = os.path.join(ckpt_dir, file)
            f = stack.enter_context(open_safetensors_file(full))
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            for name, shape in shapes.items():
                if weight_map is not None and weight_map.get(name) != file:
                    problems.append(f"{file} holds {name}, which the index maps to {weight_map.get(name)!r}")
                out[name] = (full, shape, f)
        problems += [f"the index maps {name} to {file}, which does not hold it"
                     for name, file in (weight_map or {}).items() if name not in out]
        if problems:
            raise ValueError(f"{index} disagrees with its shards:\n  " + "\n  ".join(sorted(problems)))
        yield out


def check_state_dict(model: nn.Module, shapes: dict, where: str = "checkpoint"):
    """Raise a ValueError naming every missing, unexpected or wrong-shaped tensor.
    shapes: {name: shape} of what is to be loaded into model."""
    want = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    wrong = [f"{key}: checkpoint {tuple(shapes[key])} vs model {want[key]}"
             for key in sorted(set(want) & set(shapes)) if tuple(shapes[key]) != want[key]]
    problems = ([f"missing tensor {key}" for key in missing] + [f"unexpected tensor {key}" for key in unexpected]
                + [f"wrong shape {w}" for w in wrong])
    if problems:
        raise ValueError(f"{where} does not match the config:\n  " + "\n  ".join(problems))


# Files an HF repo id is resolved to: what loading, tokenizing and generating read, nothing else
CHECKPOINT_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def resolve_checkpoint(path_or_repo, revision=None) -> str:
    """A path that exists, as it is; else an HF repo id ("owner/name") resolved with huggingface_hub
    to its snapshot directory in the HF cache (downloading CHECKPOINT_FILES only, when online).
    HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE are honoured (huggingface_hub reads them)."""
    path = os.fspath(path_or_repo)
    if os.path.exists(path):
        return path
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is None:
        raise FileNotFoundError(f"{path}: no such file or directory, and not an HF repo id (owner/name)")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise ImportError(f"{path} is not a local path; to resolve it as an HF repo id install huggingface_hub "
                          f"(pip install huggingface_hub)") from None
    try:
        return snapshot_download(path, revision=revision, allow_patterns=CHECKPOINT_FILES)
    except Exception as e:
        where = (f"{path}" + (f" at revision {revision}" if revision else "") + f": not found in the HF cache "
                 f"{constants.HF_HUB_CACHE} (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r})")
        raise FileNotFoundError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def check_device(device, what: str = "device") -> torch.device:
    """torch.device(device), or a ValueError naming `what` when it is not a device, or not one here."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what} = {device!r} is not a device") from None
    n_cuda = torch.cuda.device_count()
    if d.type == "meta" or (d.type == "cuda" and (d.index or 0) >= n_cuda) or (
            d.type not in ("cpu", "cuda") and not getattr(torch, d.type, None)):
        raise ValueError(f"{what} = {device!r}: no such device here (CUDA devices: {n_cuda})")
    return d


def read_tensors(tensors: dict, dtype, device, progress=False) -> dict:
    """{name: tensor} read from open_safetensors' open files, file by file, each tensor cast to dtype
    on device as soon as it is read."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tensors), desc="loading tensors", unit="tensor")
    state_dict = {}
    for name, (_, _, f) in sorted(tensors.items(), key=lambda item: item[1][0]):
        state_dict[name] = f.get_tensor(name).to(dtype=dtype, device=device)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return state_dict


def dispatch_checkpoint(model: nn.Module, ckpt_dir, device_map, dtype, offload_folder=None) -> nn.Module:
    """Load ckpt_dir into `model` (built on the meta device) placed by `device_map` ("auto" or
    {module name: device}), with accelerate: infer_auto_device_map keeps each DecoderLayer whole,
    load_checkpoint_and_dispatch reads the shards, casts to dtype, offloads "disk" modules to
    offload_folder and hooks every placed module so its inputs move to its device."""
    try:
        from accelerate import infer_auto_device_map, load_checkpoint_and_dispatch
    except ImportError:
        raise ImportError("device_map places layers with accelerate, which is not installed "
                          "(pip install accelerate)") from None
    if device_map == "auto":
        device_map = infer_auto_device_map(model, no_split_module_classes=["DecoderLayer"], dtype=dtype)
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map must be 'auto' or a dict {{module name: device}}, got {device_map!r}")
    for name, dev in device_map.items():
        if dev == "disk":
            if offload_folder is None:
                raise ValueError(f"device_map sends {name!r} to disk: give offload_folder (a directory to write to)")
            continue
        check_device(dev, f"device_map[{name!r}]")
    return load_checkpoint_and_dispatch(model, os.fspath(ckpt_dir), device_map=device_map, dtype=dtype,
                                        offload_folder=offload_folder, no_split_module_classes=["DecoderLayer"])


def linear_in(x, weight, bias=None, block_bytes: int = 2 ** 20):
    """y = x W^T (+ b) in x's dtype, for a weight W [out, in] stored in x's dtype (then F.linear) or
    in another one (compute_dtype: e.g. bfloat16 W, float32 x), without a copy of W in x's dtype:
      - eager: W is cast a block of rows at a time into one reused buffer of about block_bytes, which
        stays in the cache, and multiplied there:   y[:, o0:o1] = x W[o0:o1]^T;
        so W is read from memory once, in its stored dtype;
      - compiled, for at most 4 rows of x (a decode step): y[m, o] = sum_i x[m, i] W[o, i] as one
        reduction, into which inductor fuses the cast.
    A bfloat16 number is exact in float32: the same numbers as F.linear(x, W.to(x.dtype), b) up to
    the order of float32 additions. Under autograd (an input that requires grad), that plain cast."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    n_out, n_in = weight.shape
    x2 = x.reshape(-1, n_in)                                            # [M, in]
    if torch.compiler.is_compiling() and x2.shape[0] <= 4:
        y = (x2[:, None, :] * weight.to(x.dtype)[None]).sum(-1)        # [M, out]
    else:
        rows = max(1, block_bytes // (n_in * x.element_size()))        # rows of W per block
        yt = torch.empty(n_out, x2.shape[0], dtype=x.dtype, device=x.device)       # y^T [out, M]
        buf = torch.empty(min(rows, n_out), n_in, dtype=x.dtype, device=x.device)  # [rows, in]
        for o0 in range(0, n_out, rows):
            o1 = min(n_out, o0 + rows)
            torch.mm(buf[:o1 - o0].copy_(weight[o0:o1]), x2.t(), out=yt[o0:o1])   # W[o0:o1] x^T  [rows, M]
        y = yt.t()                                                      # [M, out]
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n_out)                              # [..., out]


class _Cast(nn.Module):
    """A parametrization: the stored tensor, read as `dtype`."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored):
        return stored.to(self.dtype)


class _CastLinear(nn.Linear):
    """nn.Linear computing in self.compute_dtype with its weight kept in its stored dtype (linear_in)."""

    def forward(self, x):
        return linear_in(x.to(self.compute_dtype), self.weight, self.bias, self.block_bytes)


class _CastEmbedding(nn.Embedding):
    """nn.Embedding whose table stays in its stored dtype: the rows looked up are cast to compute_dtype."""

    def forward(self, input_ids):
        return F.embedding(input_ids, self.weight).to(self.compute_dtype)  # [B, T, C]


def compute_in(model: nn.Module, dtype, block_bytes: int = 2 ** 20) -> nn.Module:
    """Keep every parameter stored as it is (e.g. bfloat16), but compute in `dtype` (e.g. float32),
    with no copy of the weights in `dtype`:
      - nn.Linear (the projections, the head): through linear_in, each weight read in its stored
        dtype and cast a block of rows at a time into a reused buffer of about block_bytes (1 MiB:
        the fastest of 256 KiB to 4 MiB on a CPU with a 2 MiB L2 per core);
      - nn.Embedding: the rows looked up, then cast;
      - every other parameter (norms, hxa079's biases and low-rank matrices, r_k: small): cast when
        a module reads it (a torch parametrization).
    The Linear and Embedding modules become subclasses that only replace forward, so the parameter
    names (the checkpoint's) do not change."""
    from torch.nn.utils import parametrize
    for module in list(model.modules()):
        if type(module) in (nn.Linear, nn.Embedding):
            module.__class__ = _CastLinear if type(module) is nn.Linear else _CastEmbedding
            module.compute_dtype, module.block_bytes = dtype, block_bytes
        else:
            for name, _ in list(module.named_parameters(recurse=False)):
                parametrize.register_parametrization(module, name, _Cast(dtype), unsafe=True)
    return model


def load_pretrained(path, dtype=torch.float32, device="cpu", config=None, *, revision=None, compute_dtype=None,
                    device_map=None, offload_folder=None, progress=False, model_class=None):
    """HRWKV7ForCausalLM.from_pretrained. Load an HF-layout checkpoint: config.json + model.safetensors,
    or the shards a model.safetensors.index.json names. `path` is a directory, or an HF repo id
    ("owner/name", at `revision`) resolved through the HF cache (see resolve_checkpoint). `config`
    (a dict or an HRWKV7Config) overrides keys of config.json. Names and shapes are checked against
    the config before any tensor is read; each tensor is then read and cast to `dtype` on `device`,
    one at a time. (Other formats, .pth among them, and incomplete config.json files: convert.py.)

    compute_dtype: keep the weights in `dtype` (e.g. bfloat16) but compute in compute_dtype (e.g.
        float32), with no copy of the weights in compute_dtype (compute_in).
    device_map: "auto" or {module name: device} ("cpu", "disk", 0, "cuda:1", ...): layers placed
        across devices with accelerate (its device-map inference, dispatch and disk offload to
        `offload_folder`); `device` is then unused. Each layer's state stays on its layer's device.
    progress: a tqdm bar while the tensors load."""
    if device_map is not None and compute_dtype is not None:
        raise ValueError("from_pretrained: compute_dtype is not supported together with device_map")
    if device_map is None:
        device = check_device(device)
    path = resolve_checkpoint(path, revision)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    config = HRWKV7Config.from_json(cfg_path, config.to_dict() if isinstance(config, HRWKV7Config) else config)
    with torch.device("meta"):
        model = (model_class or HRWKV7ForCausalLM)(config)
    with open_safetensors(path) as tensors:                             # {name: (file, shape, open file)}
        check_state_dict(model, {name: shape for name, (_, shape, _) in tensors.items()}, where=path)
        if device_map is not None:
            return dispatch_checkpoint(model, path, device_map, dtype, offload_folder).eval()
        state_dict = read_tensors(tensors, dtype, device, progress)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if compute_dtype is not None and compute_dtype != dtype:
        compute_in(model, compute_dtype)
    return model.eval()


# -----------------------------------------------------------------------------
# Memory (state + KV cache, the attention's transient memory) and the presets


def state_bytes(cfg: HRWKV7Config, context: int, batch: int = 1, dtype=torch.bfloat16):
    """Bytes of (RWKV states, GQA KV caches) after `context` tokens of a model in `dtype`: the WKV
    state is [H, N, N] in state_dtype(dtype) per RWKV layer, the cache 2 x [KV, context, N] in
    dtype per GQA layer."""
    H, KV, N = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    n_gqa = len(cfg.transformer_layers)
    rwkv = (cfg.num_hidden_layers - n_gqa) * batch * H * N * N * state_dtype(dtype).itemsize
    kv = n_gqa * batch * 2 * KV * context * N * dtype.itemsize
    return rwkv, kv


def attention_transient_bytes(new_tokens: int, context: int, dtype_bytes: int = 4,
                              block_elements: int = 2 ** 22) -> int:
    """Bytes causal_attention allocates per call beyond q, k, v and its output, when `new_tokens`
    queries attend over `context` keys (context = cached + new): after a cache, the one additive
    mask [bq, context] in the model dtype, bq = min(new_tokens, block_elements // context) (at least
    1), so at most max(block_elements, context) numbers whatever the context; nothing for a fresh
    prefill or a decode step. The same for any batch and number of heads (the mask is broadcast).
    Not counted: the flash kernel's per-thread tiles (on a CPU, float32 [q_split, kv_split] scores
    and [q_split, N] accumulators per thread, about 1-3 MB on 2 threads)."""
    if new_tokens == 1 or new_tokens == context:
        return 0
    bq = max(1, min(new_tokens, block_elements // context))
    return bq * context * dtype_bytes


# HRWKV7-Reka-Flash3.1-Preview: the teacher's shapes, and the GQA layers and q/k norms of its training
# configs (RWKVInside configs/reka_flash3.1_hybrid_l6*.yaml at commit ae22207: transformer_layers
# [8, 15, 22, 29, 36, 43], disable_qk_norm True)
REKA_FLASH_31 = dict(
    vocab_size=100352, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
    num_key_value_heads=8, head_dim=96, intermediate_size=19648, rms_norm_eps=1e-5, rope_theta=8e6,
    transformer_layers=[8, 15, 22, 29, 36, 43], enable_qk_norm=False)

TINY = dict(vocab_size=128, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=12, intermediate_size=96, transformer_layers=[2], lora_rank_decay=8, lora_rank_iclr=8,
            lora_rank_value_residual_mix=4, lora_rank_key_residual_mix=4, lora_rank_gate=8)


def random_model(config=TINY, seed: int = 0, dtype=torch.float64) -> HRWKV7ForCausalLM:
    """A random model of `config` (an HRWKV7Config or a config.json dict) in eval mode, its weights
    drawn by init_random(seed) in float64, then rounded to `dtype`: what the demo, the tests and
    the benchmarks run."""
    cfg = config if isinstance(config, HRWKV7Config) else HRWKV7Config.from_dict(config)
    return HRWKV7ForCausalLM(cfg).to(dtype).init_random(seed=seed).eval()


# -----------------------------------------------------------------------------
# Demo


def demo():
    t0 = time.perf_counter()
    model = random_model(TINY, seed=0)
    cfg = model.config
    print(f"tiny random hxa079 model, float64: layers {cfg.layer_kinds} (R = RWKV, G = NoPE GQA), "
          f"C={cfg.hidden_size} H={cfg.num_attention_heads} KV={cfg.num_key_value_heads} N={cfg.head_size}")
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(ids)
        a, st = model(ids[:, :10])
        b, _ = model(ids[:, 10:], st)
        split = torch.cat([a, b], dim=1)
        st, steps = None, []
        for t in range(ids.shape[1]):
            lg, st = model(ids[:, t:t + 1], st)
            steps.append(lg)
        stepwise = torch.cat(steps, dim=1)
    scale = full.abs().max().item()
    print(f"  max |parallel - split prefill (10+14)| / max|logits| = {(full - split).abs().max().item() / scale:.1e}")
    print(f"  max |parallel - token-by-token|        / max|logits| = {(full - stepwise).abs().max().item() / scale:.1e}")
    out = model.generate(ids[:1, :8], max_new_tokens=8, temperature=0)
    print(f"  greedy generation from 8 prompt tokens: {out[0, 8:].tolist()}")

    big = HRWKV7Config.from_dict(REKA_FLASH_31)
    n_gqa = len(big.transformer_layers)
    ctx = 32768
    rwkv, kv = state_bytes(big, ctx)
    all_gqa = state_bytes(HRWKV7Config.from_dict({**REKA_FLASH_31, "transformer_layers": list(range(44))}), ctx)[1]
    gib = 2 ** 30
    print(f"Reka-Flash-3.1 hybrid, layers {big.layer_kinds} (GQA at {', '.join(map(str, big.transformer_layers))}),")
    print(f"  at {ctx} tokens, batch 1 (RWKV state float32, KV cache bfloat16):")
    print(f"  hybrid ({big.num_hidden_layers - n_gqa} RWKV + {n_gqa} GQA): RWKV states {rwkv / gib:.3f} GiB + "
          f"KV cache {kv / gib:.3f} GiB = {(rwkv + kv) / gib:.3f} GiB")
    print(f"  all 44 layers GQA:       KV cache {all_gqa / gib:.3f} GiB  ({all_gqa / (rwkv + kv):.1f}x the hybrid)")
    extra = attention_transient_bytes(8192, ctx, dtype_bytes=2)
    print(f"  while prefilling: + {extra / 2 ** 20:.0f} MiB of attention mask for the last 8192 of {ctx} tokens "
          f"after a cache (0 for a fresh prefill or a decode step)")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    assert (full - split).abs().max() / scale < 1e-9 and (full - stepwise).abs().max() / scale < 1e-9


if __name__ == "__main__":
    import sys
    if sys.argv[1:]:                                                    # the command line is hrwkv7_cli.py
        print("error: hrwkv7_ref.py runs the demo and takes no arguments; to run a checkpoint: "
              "python hrwkv7_cli.py --model DIR_OR_REPO_ID (the hrwkv7 command)", file=sys.stderr)
        sys.exit(2)
    demo()
