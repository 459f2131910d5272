"""
Property tests: every fast form against the definition, the model against an independent
float64 implementation of the spec, and bad input against clear errors.

    pytest -q test_ref.py              (profile "ci": bounded examples, ~minutes on 2 cores)
    HYPOTHESIS_PROFILE=dev pytest ...   (more examples)
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hrwkv7_ref import (TINY, HRWKV7Config, HRWKV7ForCausalLM, HRWKV7State, apply_rope, rope_cos_sin,
                        state_bytes)
from wkv_kernel import wkv7, wkv7_naive

settings.register_profile("ci", max_examples=10, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def rel_err(x, y):
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()


# -----------------------------------------------------------------------------
# The naive loop against values computed by hand


def test_naive_loop_hand_example():
    # B=H=1, K=V=2, T=2, zero initial state.
    # t=1: S_1 = k_1 v_1^T (S_0 = 0)                      = [[1, 2], [0, 0]]
    #      y_1 = S_1^T r_1, r_1 = [1, 1]                   = [1, 2]
    # t=2: decay e^w = [1/2, 1/4]; a_2 = [1, 0]; b_2 = [0, 1]; k_2 = [0, 1]; v_2 = [3, 4]
    #      a^T S_1 = [1, 2];  b (a^T S_1) = [[0, 0], [1, 2]]
    #      diag(e^w) S_1 = [[1/2, 1], [0, 0]];  k v^T = [[0, 0], [3, 4]]
    #      S_2 = [[1/2, 1], [4, 6]];  y_2 = S_2^T r_2, r_2 = [2, 1]  = [5, 8]
    d = torch.float64
    r = torch.tensor([[1, 1], [2, 1]], dtype=d)
    w = torch.log(torch.tensor([[1, 1], [0.5, 0.25]], dtype=d))
    k = torch.tensor([[1, 0], [0, 1]], dtype=d)
    v = torch.tensor([[1, 2], [3, 4]], dtype=d)
    a = torch.tensor([[0, 0], [1, 0]], dtype=d)
    b = torch.tensor([[0, 0], [0, 1]], dtype=d)
    y, S = wkv7_naive(*(x[None, :, None, :] for x in (r, w, k, v, a, b)))
    assert torch.equal(y[0, :, 0], torch.tensor([[1, 2], [5, 8]], dtype=d))
    assert torch.equal(S[0, 0], torch.tensor([[0.5, 1], [4, 6]], dtype=d))
    # continuing from S_2 with one more token equals running three tokens at once
    r3 = torch.tensor([[[[0.5, -1.0]]]], dtype=d)
    y3, S3 = wkv7_naive(r3, torch.zeros_like(r3), r3, r3, r3, r3, S)
    y_all, S_all = wkv7_naive(*(torch.cat([x[None, :, None, :], r3], 1) if x is not w else
                                torch.cat([x[None, :, None, :], torch.zeros_like(r3)], 1)
                                for x in (r, w, k, v, a, b)))
    assert torch.equal(y_all[:, 2:], y3) and torch.equal(S_all, S3)


def test_naive_state_dtype():
    x = torch.randn(1, 3, 2, 4, dtype=torch.bfloat16)
    y, S = wkv7_naive(x, -x.float().abs().bfloat16(), x, x, x, x)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    y, S = wkv7_naive(*(t.double() for t in (x, -x.float().abs(), x, x, x, x)))
    assert y.dtype == S.dtype == torch.float64


# -----------------------------------------------------------------------------
# An independent float64 implementation of HXA079.md, token by token and head by head,
# reading the weights straight from the state dict.


def _oracle_logits(sd, cfg, ids):
    g = lambda name: sd[name].double()  # noqa: E731
    C, H, KV, N, L = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size,
                      cfg.num_hidden_layers)
    eps = cfg.rms_norm_eps

    def rms(x, wt):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * wt

    def rope(x, p):  # x [h, N]
        half = N // 2
        out = torch.empty_like(x)
        for j in range(half):
            ang = p / cfg.rope_theta ** (2 * j / N)
            c, s = math.cos(ang), math.sin(ang)
            out[:, j] = x[:, j] * c - x[:, j + half] * s
            out[:, j + half] = x[:, j + half] * c + x[:, j] * s
        return out

    def lin(x, pre, name):
        y = x @ g(f"{pre}{name}.weight").T
        return y + g(f"{pre}{name}.bias") if f"{pre}{name}.bias" in sd else y

    B, T = ids.shape
    out = torch.empty(B, T, cfg.vocab_size, dtype=torch.float64)
    for bi in range(B):
        S = {i: torch.zeros(H, N, N, dtype=torch.float64) for i in range(L)}
        cache = {i: ([], []) for i in range(L)}
        for t in range(T):
            x = g("model.embed_tokens.weight")[ids[bi, t]]
            first = None
            for i in range(L):
                pre = f"model.layers.{i}.self_attn."
                h = rms(x, g(f"model.layers.{i}.input_layernorm.weight"))
                if i in cfg.transformer_layers:
                    q, k, v = (lin(h, pre, n).view(-1, N) for n in ("q_proj", "k_proj", "v_proj"))
                    if cfg.enable_qk_norm:
                        q, k = rms(q, g(pre + "q_norm.weight")), rms(k, g(pre + "k_norm.weight"))
                    cache[i][0].append(k)
                    cache[i][1].append(v)
                    Ks, Vs = torch.stack(cache[i][0]), torch.stack(cache[i][1])  # [t+1, KV, N]
                    o = torch.empty(H, N, dtype=torch.float64)
                    for hh in range(H):
                        kvh = hh // (H // KV)
                        sc = Ks[:, kvh] @ q[hh] / math.sqrt(N)
                        p = torch.exp(sc - sc.max())
                        o[hh] = (p / p.sum()) @ Vs[:, kvh]
                    att = o.reshape(-1) @ g(pre + "o_proj.weight").T
                else:
                    r = lin(h, pre, "receptance").view(H, N)
                    k = lin(h, pre, "key").view(KV, N)
                    v = lin(h, pre, "value").view(KV, N)
                    if cfg.enable_qk_norm:
                        r, k = rms(r, g(pre + "r_norm.weight")), rms(k, g(pre + "k_norm.weight"))
                    r, k = rope(r, t), rope(k, t)
                    if first is None:
                        first = (v, k)
                    else:
                        v = v + (first[0] - v) * torch.sigmoid(h @ g(pre + "v1") @ g(pre + "v2")
                                                               + g(pre + "v0").reshape(-1)).view(KV, N)
                        k = k + (first[1] - k) * torch.sigmoid(h @ g(pre + "k1") @ g(pre + "k2")
                                                               + g(pre + "k0").reshape(-1)).view(KV, N)
                    aa = torch.sigmoid(h @ g(pre + "a1") @ g(pre + "a2") + g(pre + "a0").reshape(-1)).view(H, N)
                    ww = (torch.tanh(h @ g(pre + "w1")) @ g(pre + "w2") + g(pre + "w0").reshape(-1)).view(H, N)
                    ww = -F.softplus(-ww) - 0.5
                    gate = (torch.sigmoid(h @ g(pre + "g1")) @ g(pre + "g2")).view(H, N)
                    y = torch.empty(H, N, dtype=torch.float64)
                    for hh in range(H):
                        kh, vh = k[hh // (H // KV)], v[hh // (H // KV)]
                        kk = kh / max(kh.norm().item(), 1e-12)
                        kh = kh * (1 - ww[hh] + aa[hh])
                        Sh = S[i][hh]
                        Sh = (torch.diag(torch.exp(-torch.exp(ww[hh]))) @ Sh
                              + torch.outer(kk * aa[hh], (-kk) @ Sh) + torch.outer(kh, vh))
                        S[i][hh] = Sh
                        y[hh] = Sh.T @ r[hh] / math.sqrt(N) + (r[hh] * kh * g(pre + "r_k")[hh]).sum() * vh
                    att = (y * gate).reshape(-1) @ g(pre + "output.weight").T
                x = x + att
                m = rms(x, g(f"model.layers.{i}.post_attention_layernorm.weight"))
                mp = f"model.layers.{i}.mlp."
                x = x + (F.silu(m @ g(mp + "gate_proj.weight").T) * (m @ g(mp + "up_proj.weight").T)) \
                    @ g(mp + "down_proj.weight").T
            head = g("model.embed_tokens.weight") if cfg.tie_word_embeddings else g("lm_head.weight")
            out[bi, t] = rms(x, g("model.norm.weight")) @ head.T
    return out


@st.composite
def tiny_configs(draw):
    KV = draw(st.sampled_from([1, 2]))
    H = KV * draw(st.sampled_from([1, 2]))
    N = draw(st.sampled_from([4, 6, 8]))          # 6: not a power of two
    L = draw(st.integers(1, 4))
    layers = draw(st.sampled_from(["none", "all", "some", "first"]))
    gqa = {"none": [], "all": list(range(L)), "first": [0],
           "some": draw(st.lists(st.integers(0, L - 1), unique=True, max_size=L))}[layers]
    return HRWKV7Config.from_dict(dict(
        vocab_size=37, hidden_size=draw(st.sampled_from([8, 12])), num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, head_dim=N, intermediate_size=16, transformer_layers=gqa,
        enable_qk_norm=draw(st.booleans()), attention_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()), rope_theta=draw(st.sampled_from([10.0, 1e4, 8e6])),
        lora_rank_decay=3, lora_rank_iclr=2, lora_rank_value_residual_mix=2, lora_rank_key_residual_mix=2,
        lora_rank_gate=4))


def _tiny_model(cfg, seed=0):
    return HRWKV7ForCausalLM(cfg).double().init_random(seed=seed).eval()


@given(cfg=tiny_configs(), T=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
@settings(max_examples=6)
def test_model_matches_independent_oracle(cfg, T, seed):
    model = _tiny_model(cfg, seed)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, _ = model(ids)
    want = _oracle_logits(model.state_dict(), cfg, ids)
    assert rel_err(logits, want) < 1e-10


@given(cfg=tiny_configs(), T=st.integers(2, 20), data=st.data())
def test_parallel_equals_split_equals_stepwise(cfg, T, data):
    model = _tiny_model(cfg, data.draw(st.integers(0, 2 ** 16)))
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    splits = sorted(data.draw(st.lists(st.integers(1, T - 1), unique=True, max_size=3)))
    with torch.no_grad():
        full, st_full = model(ids)
        parts, state = [], None
        for lo, hi in zip([0] + splits, splits + [T]):
            lg, state = model(ids[:, lo:hi], state)
            parts.append(lg)
        steps, st_step = [], None
        for t in range(T):
            lg, st_step = model(ids[:, t:t + 1], st_step)
            steps.append(lg)
    assert rel_err(torch.cat(parts, 1), full) < 1e-10
    assert rel_err(torch.cat(steps, 1), full) < 1e-10
    assert state.pos == st_step.pos == st_full.pos == T
    for s1, s2 in zip(st_full.layers, state.layers):
        for a, b in zip(s1 if isinstance(s1, tuple) else [s1], s2 if isinstance(s2, tuple) else [s2]):
            assert a.shape == b.shape and rel_err(b, a) < 1e-10


def test_state_is_not_mutated_and_dtype_is_kept():
    cfg = HRWKV7Config.from_dict(TINY)
    model = _tiny_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    _, state = model(ids)
    before = [s.clone() if torch.is_tensor(s) else tuple(t.clone() for t in s) for s in state.layers]
    model(ids, state)
    model(ids[:, :1], state)
    for s, b in zip(state.layers, before):
        for x, y in zip(s if isinstance(s, tuple) else [s], b if isinstance(b, tuple) else [b]):
            assert torch.equal(x, y)
    assert all((s.dtype if torch.is_tensor(s) else s[0].dtype) == torch.float64 for s in state.layers)


def test_first_rwkv_layer_is_not_layer_zero_when_layer_zero_is_gqa():
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [0, 2]})
    model = HRWKV7ForCausalLM(cfg)
    firsts = [i for i, layer in enumerate(model.model.layers) if not layer.is_gqa and layer.self_attn.is_first]
    assert firsts == [1]


# -----------------------------------------------------------------------------
# GQA with its cache == plain causal attention written independently


@given(H_per_KV=st.sampled_from([1, 2, 3]), KV=st.sampled_from([1, 2]), T=st.integers(1, 7),
       P=st.integers(0, 5), qk_norm=st.booleans())
def test_gqa_cache_equals_plain_causal_attention(H_per_KV, KV, T, P, qk_norm):
    H, N = KV * H_per_KV, 6
    cfg = HRWKV7Config.from_dict({**TINY, "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": N,
                                  "hidden_size": 12, "enable_qk_norm": qk_norm, "transformer_layers": [0]})
    layer = _tiny_model(cfg).model.layers[0].self_attn
    x = torch.randn(2, P + T, 12, dtype=torch.float64)
    with torch.no_grad():
        _, cache = layer(x[:, :P], None) if P else (None, None)
        out, (kc, vc) = layer(x[:, P:], cache)
        # independent: full sequence, explicit loops over query positions
        q = layer.q_proj(x).view(2, P + T, H, N)
        k = layer.k_proj(x).view(2, P + T, KV, N)
        v = layer.v_proj(x).view(2, P + T, KV, N)
        if qk_norm:
            q, k = layer.q_norm(q), layer.k_norm(k)
        o = torch.zeros(2, T, H, N, dtype=torch.float64)
        for t in range(T):
            for h in range(H):
                s = torch.einsum("bn,bjn->bj", q[:, P + t, h], k[:, :P + t + 1, h // H_per_KV]) / math.sqrt(N)
                o[:, t, h] = torch.einsum("bj,bjn->bn", torch.softmax(s, -1), v[:, :P + t + 1, h // H_per_KV])
        want = layer.o_proj(o.reshape(2, T, H * N))
    assert rel_err(out, want) < 1e-12
    assert kc.shape == (2, KV, P + T, N) and torch.allclose(kc, k.transpose(1, 2))


# -----------------------------------------------------------------------------
# RoPE


@given(N=st.sampled_from([2, 6, 24, 96]), p=st.integers(0, 40000), d=st.integers(0, 300),
       theta=st.sampled_from([1e4, 8e6]))
def test_rope_preserves_norm_and_depends_on_relative_position(N, p, d, theta):
    gen = torch.Generator().manual_seed(p)
    q, k = torch.randn(2, 1, 1, 1, N, dtype=torch.float64, generator=gen)
    pos = torch.tensor([p, p + d, 7, 7 + d])
    cos, sin = rope_cos_sin(pos, N, theta, torch.float64, "cpu")
    rq = apply_rope(q.expand(1, 4, 1, N), cos, sin)[0, :, 0]
    rk = apply_rope(k.expand(1, 4, 1, N), cos, sin)[0, :, 0]
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(4), rtol=1e-12)
    # score(q at p+d, k at p) == score(q at 7+d, k at 7)
    assert abs((rq[1] @ rk[0]) - (rq[3] @ rk[2])) < 1e-9 * q.norm() * k.norm()


# -----------------------------------------------------------------------------
# Config


def test_config_round_trip_keeps_unknown_keys(tmp_path):
    d = {**TINY, "torch_dtype": "bfloat16", "architectures": ["HRWKV7ForCausalLM"], "some_future_key": {"a": 1}}
    cfg = HRWKV7Config.from_dict(d)
    out = cfg.to_dict()
    assert {k: out[k] for k in d} == d                       # every key kept, defaults filled in
    assert HRWKV7Config.from_dict(out) == cfg
    (tmp_path / "config.json").write_text(json.dumps(out))
    assert HRWKV7Config.from_json(tmp_path / "config.json") == cfg
    assert HRWKV7Config.from_dict({k: v for k, v in TINY.items() if k != "head_dim"}).head_size == 12


@pytest.mark.parametrize("change, field", [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": None, "hidden_size": 50}, "head_dim"),
    ({"head_dim": 0}, "head_dim"),
    ({"transformer_layers": [4]}, "transformer_layers"),
    ({"transformer_layers": [-1]}, "transformer_layers"),
    ({"lora_rank_gate": 0}, "lora_rank_gate"),
    ({"vocab_size": 2.5}, "vocab_size"),
    ({"rwkv_architecture": "x070"}, "rwkv_architecture"),
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        HRWKV7Config.from_dict({**TINY, **change})


# -----------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_clear_errors():
    cfg = HRWKV7Config.from_dict(TINY)
    model = _tiny_model(cfg)
    with pytest.raises(ValueError, match="token id 128"):
        model(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.tensor([[1.0, 2.0]]))
    _, state = model(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.tensor([[1]]), state)
    other = _tiny_model(HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]}))
    with pytest.raises(ValueError, match="layer 1 is GQA"):
        other(torch.tensor([[1], [2]]), state)
    with pytest.raises(ValueError, match="float32"):
        model.float()(torch.tensor([[1], [2]]), state)


def test_wkv_bad_inputs():
    x = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="k has shape"):
        wkv7(x, x, x[:, :2], x, x, x)
    with pytest.raises(ValueError, match="state has shape"):
        wkv7(x, x, x, x, x, x, torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="unknown impl"):
        wkv7(x, x, x, x, x, x, impl="fast")


# -----------------------------------------------------------------------------
# Loading


def _save_hf(model, cfg, path, shards=1):
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"))
        return
    keys = sorted(sd)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s::shards]}
        save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_from_pretrained_float64_matches_oracle(tmp_path, shards):
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [0, 3], "enable_qk_norm": True,
                                  "attention_bias": True})
    src = _tiny_model(cfg, seed=3)
    _save_hf(src, cfg, tmp_path / "ckpt", shards)
    model = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        logits, state = model(ids)
    assert all((s.dtype if torch.is_tensor(s) else s[0].dtype) == torch.float64 for s in state.layers)
    assert rel_err(logits, _oracle_logits(src.state_dict(), cfg, ids)) < 1e-10


def test_from_pretrained_names_bad_tensors(tmp_path):
    cfg = HRWKV7Config.from_dict(TINY)
    src = _tiny_model(cfg)
    _save_hf(src, cfg, tmp_path / "ok")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "ok" / "model.safetensors"))
    for what, mutate in [("missing tensor model.layers.1.self_attn.w1", lambda d: d.pop("model.layers.1.self_attn.w1")),
                         ("unexpected tensor model.layers.1.self_attn.extra",
                          lambda d: d.__setitem__("model.layers.1.self_attn.extra", torch.zeros(1))),
                         ("model.norm.weight", lambda d: d.__setitem__("model.norm.weight", torch.ones(5)))]:
        bad = dict(sd)
        mutate(bad)
        d = tmp_path / what.split()[-1]
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg.to_dict()))
        save_file(bad, str(d / "model.safetensors"))
        with pytest.raises(ValueError, match=what.replace(".", r"\.")):
            HRWKV7ForCausalLM.from_pretrained(d)


# -----------------------------------------------------------------------------
# Generation and memory accounting


def test_generate_greedy_equals_argmax_of_full_forward():
    cfg = HRWKV7Config.from_dict(TINY)
    model = _tiny_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])
    a = model.generate(prompt, 5, temperature=0.8, top_p=0.9, seed=1)
    assert torch.equal(a, model.generate(prompt, 5, temperature=0.8, top_p=0.9, seed=1))


def test_state_bytes_formula_matches_a_real_state():
    cfg = HRWKV7Config.from_dict(TINY)
    model = HRWKV7ForCausalLM(cfg).init_random()
    with torch.no_grad():
        _, state = model(torch.randint(0, cfg.vocab_size, (3, 7)))
    rwkv, kv = state_bytes(cfg, 7, batch=3, kv_bytes=4, state_bytes_per=4)
    assert state.nbytes() == {"rwkv_state": rwkv, "kv_cache": kv}
