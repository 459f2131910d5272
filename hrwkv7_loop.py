"""
HRWKV7 "hxa079", the whole model one token at a time, in float64: the definition a port is checked
against. It reads a config.json dict and an HF-layout state dict and imports torch only. The
equations, config keys and tensor names are SPEC.md's (the model §2, time-mix §4, WKV §5, GQA §6,
state §7, names §8); the lines below follow the code top to bottom.

    x = embed_tokens[id]                                               [C]
    for each layer i:
        h = rmsnorm(x, input_layernorm)
        x = x + (gqa(h) if i in transformer_layers else time_mix(h))
        x = x + down(silu(gate(m)) * up(m)),   m = rmsnorm(x, post_attention_layernorm)
    logits = rmsnorm(x, norm) @ lm_head^T          (embed_tokens when tie_word_embeddings)

time_mix (hxa079, SPEC.md §4), per token, at absolute position pos; head hh reads KV head hh // (H / KV):
    r = h Wr^T (+br) [H, N];   k = h Wk^T (+bk) [KV, N];   v = h Wv^T (+bv) [KV, N]
    r, k = rmsnorm(r, r_norm), rmsnorm(k, k_norm)        per head, only with enable_qk_norm
    r, k = rope(r, pos), rope(k, pos)                    rotate-half, base rope_theta
    first RWKV layer: v_first, k_first = v, k            (layer 0 need not be an RWKV layer)
    later layers:     v = v + (v_first - v) * sigmoid(h v1 v2 + v0)
                      k = k + (k_first - k) * sigmoid(h k1 k2 + k0)
    iclr = sigmoid(h a1 a2 + a0)                         [H, N]
    w_pre = -softplus(-(tanh(h w1) w2 + w0)) - 0.5       [H, N], the pre-decay, <= -0.5
    w    = -exp(w_pre)                                   [H, N], the log decay
    per head hh:  kk = k / max(|k|, 1e-12);   k = k * (1 - w_pre + iclr)
                  S  = diag(exp(w)) S - (kk * iclr) (kk^T S) + k v^T       S [K, V] = [N, N]
                  y  = S^T r * N^-0.5 + sum(r * k * r_k[hh]) * v              (the bonus: scaled k)
    out = (y * (sigmoid(h g1) g2)) Wo^T
    No token shift, no GroupNorm.

gqa (NoPE, SPEC.md §6), per token: q = h Wq^T (+bq) [H, N], k, v = h Wk^T (+bk), h Wv^T (+bv) [KV, N];
    q, k = rmsnorm(q, q_norm), rmsnorm(k, k_norm) with enable_qk_norm; NO RoPE; append k, v to the
    cache; per head  o = softmax(K_cache q * N^-0.5) V_cache;  out = o Wo^T.

State (SPEC.md §7): a dict {"per_layer": per layer S [B, H, K, V] (RWKV) or (k_cache, v_cache)
[B, KV, P, N] (GQA), "pos": P, the tokens seen}, the fields of the model's HRWKV7State. run() never
changes the state it is given.

golden/variants.py plants the known wrong variants by replacing exact lines of this file's text
(each must occur exactly once, or it raises): reformatting a line it names means updating it too.

    python hrwkv7_loop.py      # checks itself against hrwkv7_ref on a random model
"""
import math

import torch
import torch.nn.functional as F


def sizes(config: dict):
    """(C, L, H, KV, N, rope_theta, eps, GQA layer indices) from a config.json dict."""
    C, H = config["hidden_size"], config["num_attention_heads"]
    N = config.get("head_dim") or C // H
    theta = config.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):   # transformers >= 5 keeps the base here
        params = config.get(key) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(f"config {key}: rope_type {kind!r}; hxa079 uses plain RoPE")
        theta = params.get("rope_theta") if theta is None else theta
    return (C, config["num_hidden_layers"], H, config["num_key_value_heads"], N,
            float(10000.0 if theta is None else theta), config["rms_norm_eps"],
            set(config.get("transformer_layers", [])))


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rope(x, pos: int, theta: float):
    """x [B, heads, N] rotated by the angles pos * theta^(-2j/N): pairs (j, j + N/2), j < N/2."""
    N = x.shape[-1]
    j = torch.arange(N // 2, dtype=torch.float64)
    c, s = torch.cos(pos * theta ** (-2 * j / N)), torch.sin(pos * theta ** (-2 * j / N))  # [N/2]
    x1, x2 = x[..., :N // 2], x[..., N // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def linear(g, name, x):
    """x W^T (+ bias when the checkpoint has one)."""
    y = x @ g(name + ".weight").T
    return y + g(name + ".bias") if g.has(name + ".bias") else y


class Weights:
    """g(name): the state dict's tensor in float64."""

    def __init__(self, state_dict):
        self.sd = state_dict

    def __call__(self, name):
        return self.sd[name].double()

    def has(self, name):
        return name in self.sd


def wkv_step(S, r, w, k, v, a, b):
    """One token of the WKV-7 recurrence for one head. S [B, K, V]; r, w (the log decay), k, a, b [B, K];
    v [B, V].    S' = diag(exp(w)) S + b (a^T S) + k v^T,   y = S'^T r."""
    S = torch.exp(w)[:, :, None] * S + b[:, :, None] * (a[:, None, :] @ S) + k[:, :, None] * v[:, None, :]
    y = (r[:, None, :] @ S)[:, 0]                                   # [B, V]
    return y, S


def wkv7_float64(r, w, k, v, a, b, S0=None):
    """The recurrence alone, wkv_kernel's signature: r, w (the log decay), k, a, b [B, T, H, K],
    v [B, T, H, V], S0 [B, H, K, V] or None -> y [B, T, H, V], S_T [B, H, K, V], in float64."""
    r, w, k, v, a, b = (x.double() for x in (r, w, k, v, a, b))
    B, T, H, K = r.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if S0 is None else S0.double().clone()
    y = torch.empty(v.shape, dtype=torch.float64)
    for t in range(T):
        for hh in range(H):
            y[:, t, hh], S[:, hh] = wkv_step(S[:, hh], r[:, t, hh], w[:, t, hh], k[:, t, hh], v[:, t, hh],
                                             a[:, t, hh], b[:, t, hh])
    return y, S


def time_mix(p, g, h, pos, S, first, theta, eps, H, KV, N, qk_norm):
    """One hxa079 time-mix token. h [B, C]; S [B, H, N, N] (updated in place: a fresh copy);
    first: None in the first RWKV layer, else (v_first, k_first) [B, KV, N]. -> out [B, C], first."""
    B = h.shape[0]
    r = linear(g, p + "receptance", h).view(B, H, N)                # [B, H, N]
    k = linear(g, p + "key", h).view(B, KV, N)                      # [B, KV, N]
    v = linear(g, p + "value", h).view(B, KV, N)                    # [B, KV, N]
    if qk_norm:
        r, k = rms_norm(r, g(p + "r_norm.weight"), eps), rms_norm(k, g(p + "k_norm.weight"), eps)
    r, k = rope(r, pos, theta), rope(k, pos, theta)
    if first is None:
        first = (v, k)
    else:
        v = v + (first[0] - v) * torch.sigmoid(h @ g(p + "v1") @ g(p + "v2") + g(p + "v0")[0]).view(B, KV, N)
        k = k + (first[1] - k) * torch.sigmoid(h @ g(p + "k1") @ g(p + "k2") + g(p + "k0")[0]).view(B, KV, N)
    iclr = torch.sigmoid(h @ g(p + "a1") @ g(p + "a2") + g(p + "a0")[0]).view(B, H, N)
    w_pre = -F.softplus(-(torch.tanh(h @ g(p + "w1")) @ g(p + "w2") + g(p + "w0")[0])).view(B, H, N) - 0.5
    w = -torch.exp(w_pre)                                           # the log decay [B, H, N]
    y = torch.empty(B, H, N, dtype=torch.float64)
    for hh in range(H):
        k_h, v_h = k[:, hh // (H // KV)], v[:, hh // (H // KV)]      # [B, N]: the KV head of head hh
        kk = k_h / k_h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k_h = k_h * (1 - w_pre[:, hh] + iclr[:, hh])
        y_h, S[:, hh] = wkv_step(S[:, hh], r[:, hh], w[:, hh], k_h, v_h, -kk, kk * iclr[:, hh])
        y_h = y_h * N ** -0.5
        y[:, hh] = y_h + (r[:, hh] * k_h * g(p + "r_k")[hh]).sum(-1, keepdim=True) * v_h
    gate = torch.sigmoid(h @ g(p + "g1")) @ g(p + "g2")             # [B, H * N]
    return (y.reshape(B, H * N) * gate) @ g(p + "output.weight").T, first


def gqa(p, g, h, cache, eps, H, KV, N, qk_norm):
    """One NoPE GQA token. h [B, C]; cache (k, v) [B, KV, P, N] -> out [B, C], cache [B, KV, P + 1, N]."""
    B = h.shape[0]
    q = linear(g, p + "q_proj", h).view(B, H, N)                    # [B, H, N]
    k = linear(g, p + "k_proj", h).view(B, KV, N)                   # [B, KV, N]
    v = linear(g, p + "v_proj", h).view(B, KV, N)
    if qk_norm:
        q, k = rms_norm(q, g(p + "q_norm.weight"), eps), rms_norm(k, g(p + "k_norm.weight"), eps)
    cache = (torch.cat([cache[0], k[:, :, None]], 2), torch.cat([cache[1], v[:, :, None]], 2))
    o = torch.empty(B, H, N, dtype=torch.float64)
    for hh in range(H):
        keys, values = cache[0][:, hh // (H // KV)], cache[1][:, hh // (H // KV)]   # [B, P + 1, N]
        score = (keys @ q[:, hh, :, None])[..., 0] / math.sqrt(N)   # [B, P + 1]
        prob = torch.exp(score - score.max(-1, keepdim=True).values)
        o[:, hh] = ((prob / prob.sum(-1, keepdim=True))[:, None, :] @ values)[:, 0]
    return o.reshape(B, H * N) @ g(p + "o_proj.weight").T, cache


def run(config: dict, state_dict: dict, input_ids, state=None):
    """input_ids [B, T] -> (logits [B, T, n_vocab] float64, the state after the T tokens)."""
    C, L, H, KV, N, theta, eps, gqa_layers = sizes(config)
    qk_norm = bool(config.get("enable_qk_norm", False))
    g = Weights(state_dict)
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {getattr(input_ids, 'shape', input_ids)!r}")
    B, T = input_ids.shape
    if state is None:
        per_layer = [(torch.zeros(B, KV, 0, N, dtype=torch.float64),) * 2 if i in gqa_layers
                     else torch.zeros(B, H, N, N, dtype=torch.float64) for i in range(L)]
        pos0 = 0
    else:
        per_layer = [s if isinstance(s, tuple) else s.double().clone() for s in state["per_layer"]]
        pos0 = state["pos"]
    head = g("model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight")  # [n_vocab, C]
    logits = torch.empty(B, T, head.shape[0], dtype=torch.float64)
    for t in range(T):
        x = g("model.embed_tokens.weight")[input_ids[:, t]]         # [B, C]
        first = None                                                # (v_first, k_first) of this token
        for i in range(L):
            p = f"model.layers.{i}."
            h = rms_norm(x, g(p + "input_layernorm.weight"), eps)
            if i in gqa_layers:
                out, per_layer[i] = gqa(p + "self_attn.", g, h, per_layer[i], eps, H, KV, N, qk_norm)
            else:
                out, first = time_mix(p + "self_attn.", g, h, pos0 + t, per_layer[i], first, theta, eps, H, KV,
                                      N, qk_norm)
            x = x + out
            m = rms_norm(x, g(p + "post_attention_layernorm.weight"), eps)
            x = x + (F.silu(m @ g(p + "mlp.gate_proj.weight").T) * (m @ g(p + "mlp.up_proj.weight").T)) \
                @ g(p + "mlp.down_proj.weight").T
        logits[:, t] = rms_norm(x, g("model.norm.weight"), eps) @ head.T
    return logits, {"per_layer": per_layer, "pos": pos0 + T}


if __name__ == "__main__":
    from hrwkv7_ref import TINY, random_model

    model = random_model({**TINY, "transformer_layers": [0, 2], "enable_qk_norm": True, "attention_bias": True},
                         seed=1)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, ref_state = model(ids[:, :6])
        want2, ref_state = model(ids[:, 6:], ref_state)
    config, sd = cfg.to_dict(), model.state_dict()
    got, state = run(config, sd, ids[:, :6])
    got2, state = run(config, sd, ids[:, 6:], state)
    err = max((a - b).abs().max().item() / b.abs().max().item() for a, b in ((got, want), (got2, want2)))
    serr = max((a - b).abs().max().item() / b.abs().max().item()
               for s, r in zip(state["per_layer"], ref_state.per_layer)
               for a, b in zip(s if isinstance(s, tuple) else [s], r if isinstance(r, tuple) else [r]))
    print(f"hrwkv7_loop vs hrwkv7_ref (float64, GQA at layers 0 and 2, q/k norm, biases, prefill 6 + 3 "
          f"tokens): max |error| / max |value|: logits {err:.1e}, state {serr:.1e}")
    assert err < 1e-10 and serr < 1e-10
