"""
Property tests: every fast form against the definition, the model against an independent
float64 implementation of the spec, and bad input against clear errors.

    pytest -q test_ref.py              (profile "ci": bounded examples, ~minutes on 2 cores)
    HYPOTHESIS_PROFILE=dev pytest ...   (more examples)
"""

import os

# The Triton kernels run in Triton's CPU interpreter unless HRWKV7_TEST_CUDA=1 (then on the GPU,
# and the GPU-only tests run too). The interpreter must be chosen before triton is imported.
WANT_CUDA = os.environ.get("HRWKV7_TEST_CUDA") == "1"
if not WANT_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import convert  # noqa: E402
import wkv_kernel  # noqa: E402
from convert import (LazyStateDict, TensorRef, default_lora_ranks, hxa079_init, init_from_teacher, load_checkpoint,  # noqa: E402
                     parse_size, save_checkpoint)
from hrwkv7_ref import TINY, HRWKV7Config, HRWKV7ForCausalLM, apply_rope, rope_cos_sin, state_bytes  # noqa: E402
from wkv_kernel import (IMPLS, MAX_FACTORED_SPAN, TRITON_CHUNK, TRITON_MAX_FACTORED_SPAN, _load_fla_dplr_naive,  # noqa: E402
                        pick_impl, wkv7, wkv7_chunked, wkv7_naive, wkv7_triton)

settings.register_profile("ci", max_examples=10, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def rel_err(x, ref):
    """max |x - ref| / max |ref| (a norm-wise relative error, so tiny entries don't dominate)."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300)).item()


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
    H, KV, N, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, cfg.num_hidden_layers
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


@pytest.mark.parametrize("shards", [1, 3])
def test_from_pretrained_float64_matches_oracle(tmp_path, shards):
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [0, 3], "enable_qk_norm": True,
                                  "attention_bias": True})
    src = _tiny_model(cfg, seed=3)
    _save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards)
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
    _save_hf(tmp_path / "ok", cfg, src.state_dict())
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


# =============================================================================
# convert.py: exact round trips (.pth -> HF -> load, sharded, cast), teacher initialisation,
# and every bad input refused with an error that names it. Synthetic tiny checkpoints only.

_CONV_SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_CONV_EPS_THETA = {"rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def _conv_model(cfg_dict, seed=0):
    cfg = HRWKV7Config.from_dict(cfg_dict)
    return cfg, HRWKV7ForCausalLM(cfg).init_random(seed=seed).eval()


def _conv_pth_name(key, flat=False, value=None):
    """HF name -> RWKV-style .pth name (the table in HXA079.md), optionally storing w0/a0/v0/k0 as [D]
    and r_k as [H*N]."""
    for old, new in [("model.embed_tokens.", "emb."), ("model.norm.", "ln_out."), ("lm_head.", "head."),
                     ("model.layers.", "blocks."), ("self_attn.", "att."), ("mlp.", "ffn."), ("gate_proj", "gate"),
                     ("up_proj", "up"), ("down_proj", "down"), ("input_layernorm", "ln1"),
                     ("post_attention_layernorm", "ln2"), ("r_norm.", "ln_r."), ("q_norm.", "ln_r."),
                     ("k_norm.", "ln_k.")]:
        key = key.replace(old, new)
    if flat and value is not None and key.rsplit(".", 1)[-1] in ("w0", "a0", "v0", "k0", "r_k"):
        value = value.reshape(-1)
    return key, value


def _conv_pth(model, path, flat=False):
    sd = dict(_conv_pth_name(k, flat, v) for k, v in model.state_dict().items())
    cfg = model.config
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_gqa(i):
            sd[f"blocks.{i}.att.layer_architecture"] = torch.tensor(78.0)
            sd[f"blocks.{i}.att.head_size_record"] = torch.tensor(float(cfg.head_size))
    torch.save(sd, path)
    return sd


def _save_hf(path, cfg, sd, shards=1, write_config=True):
    """An HF directory written with safetensors' own writer (independent of convert.py)."""
    path.mkdir(parents=True, exist_ok=True)
    if write_config:
        (path / "config.json").write_text(json.dumps(cfg.to_dict() if isinstance(cfg, HRWKV7Config) else cfg))
    sd = {k: v.contiguous() for k, v in sd.items()}
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"))
        return path
    keys, weight_map = sorted(sd), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in keys[s::shards]}, str(path / name))
        weight_map.update({k: name for k in keys[s::shards]})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _conv_equal(sd_a, sd_b):
    assert sorted(sd_a) == sorted(sd_b)
    for k in sd_a:
        a, b = sd_a[k], sd_b[k]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k


def _conv_logits(model, cfg, seed=1):
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)[0]


# -----------------------------------------------------------------------------
# Round trips


@_CONV_SETTINGS
@given(gqa=st.sets(st.integers(0, 3), max_size=2), qk_norm=st.booleans(), bias=st.booleans(), tie=st.booleans(),
       flat=st.booleans(), shard_kib=st.sampled_from([None, 8, 40, 1000]))
def test_pth_to_hf_round_trip_is_exact(tmp_path_factory, gqa, qk_norm, bias, tie, flat, shard_kib):
    tmp = tmp_path_factory.mktemp("rt")
    cfg, model = _conv_model({**TINY, "transformer_layers": sorted(gqa), "enable_qk_norm": qk_norm,
                              "attention_bias": bias, "tie_word_embeddings": tie})
    _conv_pth(model, tmp / "m.pth", flat)
    if flat and not qk_norm and len(gqa) < 4:       # a flat r_k and no per-head norm: the head size must be given
        with pytest.raises(ValueError, match=r"cannot infer num_attention_heads, num_key_value_heads, head_dim"):
            load_checkpoint(tmp / "m.pth", _CONV_EPS_THETA)
    got_cfg, sd = load_checkpoint(tmp / "m.pth", {**_CONV_EPS_THETA, "head_dim": 12})
    assert got_cfg == cfg
    assert isinstance(sd, LazyStateDict)
    _conv_equal(dict(sd), model.state_dict())
    summary = save_checkpoint(tmp / "hf", got_cfg, sd, max_shard_bytes=shard_kib and shard_kib * 1024)
    cfg2, sd2 = load_checkpoint(tmp / "hf")
    assert cfg2 == cfg and json.loads((tmp / "hf" / "config.json").read_text()) == cfg.to_dict()
    _conv_equal(dict(sd2), model.state_dict())
    assert (len(summary["files"]) > 1) == (tmp / "hf" / "model.safetensors.index.json").exists()
    loaded = HRWKV7ForCausalLM.from_pretrained(tmp / "hf")
    assert torch.equal(_conv_logits(loaded, cfg), _conv_logits(model, cfg))


def test_ln_r_becomes_q_norm_in_gqa_layers_and_r_norm_in_rwkv_layers(tmp_path):
    cfg, model = _conv_model({**TINY, "transformer_layers": [1], "enable_qk_norm": True})
    pth = _conv_pth(model, tmp_path / "m.pth")
    assert "blocks.1.att.ln_r.weight" in pth and "blocks.0.att.ln_r.weight" in pth
    _, sd = load_checkpoint(tmp_path / "m.pth", _CONV_EPS_THETA)
    assert torch.equal(sd["model.layers.1.self_attn.q_norm.weight"], pth["blocks.1.att.ln_r.weight"])
    assert torch.equal(sd["model.layers.0.self_attn.r_norm.weight"], pth["blocks.0.att.ln_r.weight"])
    assert torch.equal(sd["model.layers.1.self_attn.k_norm.weight"], pth["blocks.1.att.ln_k.weight"])
    assert not any("layer_architecture" in k or "head_size_record" in k for k in sd)


def test_flat_vectors_are_reshaped(tmp_path):
    cfg, model = _conv_model(TINY)
    _conv_pth(model, tmp_path / "m.pth", flat=True)
    _, sd = load_checkpoint(tmp_path / "m.pth", {**_CONV_EPS_THETA, "num_attention_heads": 4})
    assert sd.ref("model.layers.0.self_attn.w0").shape == (1, 1, 48)
    assert sd["model.layers.0.self_attn.r_k"].shape == (4, 12)
    # the same in an HF file
    hf_sd = {k: (v.reshape(-1) if k.endswith(("w0", "a0", "v0", "k0", "r_k")) else v)
             for k, v in model.state_dict().items()}
    _save_hf(tmp_path / "hf", cfg, hf_sd)
    _, sd = load_checkpoint(tmp_path / "hf")
    _conv_equal(dict(sd), model.state_dict())


def test_sharded_layout_is_hf_format(tmp_path):
    cfg, model = _conv_model({**TINY, "transformer_layers": [0, 3]})
    limit = 30_000
    summary = save_checkpoint(tmp_path / "out", cfg, model.state_dict(), max_shard_bytes=limit)
    n = len(summary["files"])
    assert n > 2 and summary["files"] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    sd = model.state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(summary["files"])
    merged = {}
    for f in summary["files"]:
        part = load_file(str(tmp_path / "out" / f))                 # safetensors' own reader
        assert sum(t.numel() * t.element_size() for t in part.values()) <= limit or len(part) == 1
        with safe_open(str(tmp_path / "out" / f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
        merged.update(part)
    _conv_equal(merged, sd)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]                  # no temporary directory left


def test_dtype_cast_bf16_and_float64_loading(tmp_path):
    cfg, model = _conv_model({**TINY, "enable_qk_norm": True, "attention_bias": True})
    _save_hf(tmp_path / "src", cfg, model.state_dict(), shards=3)
    _, sd = load_checkpoint(tmp_path / "src")
    save_checkpoint(tmp_path / "bf16", cfg, sd, dtype=torch.bfloat16, max_shard_bytes=50_000)
    _, sd16 = load_checkpoint(tmp_path / "bf16")
    _conv_equal(dict(sd16), {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    m64 = HRWKV7ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.state_dict().values())
    assert all(torch.equal(p, model.state_dict()[k].to(torch.bfloat16).double()) for k, p in m64.state_dict().items())
    assert _conv_logits(m64, cfg).dtype == torch.float64


def test_single_safetensors_file_config_from_arg_beside_or_shapes(tmp_path):
    cfg, model = _conv_model({**TINY, "tie_word_embeddings": True})
    _save_hf(tmp_path / "a", cfg, model.state_dict(), write_config=False)
    f = tmp_path / "a" / "model.safetensors"
    with pytest.raises(ValueError, match=r"cannot infer rms_norm_eps, rope_theta;"):
        load_checkpoint(f)
    got, sd = load_checkpoint(f, _CONV_EPS_THETA)                  # everything else from the shapes
    assert got == cfg
    got, _ = load_checkpoint(f, cfg)
    assert got == cfg
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg.to_dict(), "rope_theta": 5e5, "my_key": [1]}))
    got, _ = load_checkpoint(f)                                     # config.json beside it, unknown keys kept
    assert got.rope_theta == 5e5 and got.extra == {"my_key": [1]}


def test_no_rwkv_layer_needs_the_head_size(tmp_path):
    cfg, model = _conv_model({**TINY, "transformer_layers": [0, 1, 2, 3]})
    _conv_pth(model, tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"cannot infer num_attention_heads, num_key_value_heads, head_dim"):
        load_checkpoint(tmp_path / "m.pth", _CONV_EPS_THETA)
    for extra in ({"num_attention_heads": 4}, {"head_dim": 12}):
        got, sd = load_checkpoint(tmp_path / "m.pth", {**_CONV_EPS_THETA, **extra})
        assert (got.num_attention_heads, got.num_key_value_heads, got.head_size) == (4, 2, 12)
        _conv_equal(dict(sd), model.state_dict())


def test_cli_converts_pth_with_set_dtype_shards_and_force(tmp_path, capsys):
    cfg, model = _conv_model(TINY)
    _conv_pth(model, tmp_path / "m.pth")
    argv = [str(tmp_path / "m.pth"), str(tmp_path / "out"), "--set", "rms_norm_eps=1e-5", "--set", "rope_theta=1e4",
            "--set", "note=hello", "--dtype", "bfloat16", "--max-shard-size", "60kB"]
    summary = convert.main(argv)
    out = capsys.readouterr().out
    assert "3 RWKV + 1 GQA" in out and f"{sum(p.numel() for p in model.parameters()):,}" in out
    assert str(summary["bytes_written"]) in out.replace(",", "")
    assert summary["bytes_written"] == sum(os.path.getsize(tmp_path / "out" / f) for f in summary["files"])
    got, sd = load_checkpoint(tmp_path / "out")
    assert got.extra == {"note": "hello"} and len(summary["files"]) > 1
    _conv_equal(dict(sd), {k: v.bfloat16() for k, v in model.state_dict().items()})
    with pytest.raises(FileExistsError, match="--force"):
        convert.main(argv)
    convert.main(argv[:-4] + ["--force"])                            # float32, one file
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABS", "link.safetensors"])
def test_index_entry_outside_the_directory_is_refused(tmp_path, entry):
    cfg, model = _conv_model(TINY)
    ckpt = _save_hf(tmp_path / "ckpt", cfg, model.state_dict(), shards=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "outside.safetensors"))
    if entry == "ABS":
        entry = str(tmp_path / "outside.safetensors")
    if entry == "link.safetensors":
        os.symlink(tmp_path / "outside.safetensors", ckpt / entry)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = entry
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map entry 'model\.norm\.weight'.*(points outside|not a relative)"):
        load_checkpoint(ckpt)


def test_missing_unexpected_and_wrong_shape_name_the_tensor(tmp_path):
    cfg, model = _conv_model(TINY)
    sd = model.state_dict()
    bad = {k: v for k, v in sd.items() if k != "model.layers.3.mlp.up_proj.weight"}
    bad["model.layers.0.self_attn.bonus"] = torch.zeros(3)
    bad["model.norm.weight"] = torch.ones(47)
    _save_hf(tmp_path / "bad", cfg, bad)
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path / "bad")
    msg = str(e.value)
    assert "missing tensor model.layers.3.mlp.up_proj.weight" in msg
    assert "unexpected tensor model.layers.0.self_attn.bonus" in msg
    assert "model.norm.weight: checkpoint (47,) vs model (48,)" in msg
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.3\.mlp\.up_proj\.weight"):
        save_checkpoint(tmp_path / "out", cfg, bad)
    assert not (tmp_path / "out").exists()


def test_integer_or_bool_weights_are_refused(tmp_path):
    cfg, model = _conv_model(TINY)
    sd = dict(model.state_dict())
    sd["model.layers.1.self_attn.w1"] = sd["model.layers.1.self_attn.w1"].to(torch.int32)
    sd["model.norm.weight"] = sd["model.norm.weight"] > 0
    _save_hf(tmp_path / "ints", cfg, sd)
    with pytest.raises(ValueError, match=r"(?s)cannot be cast.*model\.layers\.1\.self_attn\.w1: torch\.int32.*"
                                         r"model\.norm\.weight: torch\.bool"):
        load_checkpoint(tmp_path / "ints")
    with pytest.raises(ValueError, match=r"model\.norm\.weight: torch\.bool"):
        save_checkpoint(tmp_path / "out", cfg, sd)


def test_truncated_or_corrupt_safetensors_names_the_file(tmp_path):
    cfg, model = _conv_model(TINY)
    ckpt = _save_hf(tmp_path / "ckpt", cfg, model.state_dict(), shards=3)
    shard = ckpt / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors: not a valid safetensors file"):
        load_checkpoint(ckpt)
    shard.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors: not a valid safetensors file"):
        load_checkpoint(ckpt)


def test_config_contradicting_the_weights_names_field_and_values(tmp_path):
    cfg, model = _conv_model({**TINY, "transformer_layers": [2]})
    _conv_pth(model, tmp_path / "m.pth")
    for override, pattern in [({"num_key_value_heads": 4}, r"num_key_value_heads=4 but the weights say 2"),
                              ({"hidden_size": 64}, r"hidden_size=64 but the weights say 48"),
                              ({"transformer_layers": [1]}, r"transformer_layers=\[1\] but the weights say \[2\]"),
                              ({"head_dim": 6}, r"head_dim=6 but the weights say 12 \(.*r_k \[4, 12\]\)"),
                              ({"num_attention_heads": 8}, r"num_attention_heads=8 but the weights say 4"),
                              ({"tie_word_embeddings": True}, r"tie_word_embeddings=True but the weights say False"),
                              ({"lora_rank_gate": 16}, r"lora_rank_gate=16 but the weights say 8")]:
        with pytest.raises(ValueError, match=pattern):
            load_checkpoint(tmp_path / "m.pth", {**_CONV_EPS_THETA, **override})
    _save_hf(tmp_path / "hf", {**cfg.to_dict(), "enable_qk_norm": True}, model.state_dict())
    with pytest.raises(ValueError, match=r"enable_qk_norm=True but the weights say False"):
        load_checkpoint(tmp_path / "hf")


class _ConvEvil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pth_whose_pickle_would_run_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = {"emb.weight": torch.zeros(4, 2), "blocks.0.att.r_k": _ConvEvil(marker)}
    if how == "torch.save":
        torch.save(payload, tmp_path / "evil.pth")
    else:
        with open(tmp_path / "evil.pth", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(ValueError, match=r"evil\.pth: cannot be loaded as a weights-only torch checkpoint"):
        load_checkpoint(tmp_path / "evil.pth", _CONV_EPS_THETA)
    assert not marker.exists()


def test_existing_output_is_kept_without_overwrite(tmp_path):
    cfg, model = _conv_model(TINY)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(tmp_path / "out", cfg, model.state_dict())
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    save_checkpoint(tmp_path / "out", cfg, model.state_dict(), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failure_while_writing_leaves_nothing_half_written(tmp_path):
    cfg, model = _conv_model(TINY)
    sd = dict(model.state_dict())

    def boom():
        raise OSError("disk went away")
    key = "model.layers.3.mlp.down_proj.weight"
    sd[key] = TensorRef(tuple(sd[key].shape), torch.float32, boom, key)
    with pytest.raises(OSError, match="disk went away"):
        save_checkpoint(tmp_path / "out", cfg, sd, max_shard_bytes=20_000)
    assert os.listdir(tmp_path) == []
    # an existing checkpoint survives a failed overwrite
    save_checkpoint(tmp_path / "out", cfg, model.state_dict())
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "out", cfg, sd, overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before and os.listdir(tmp_path) == ["out"]
    # a source shard damaged after the (lazy) load: the error names it, nothing is written
    _save_hf(tmp_path / "src", cfg, model.state_dict(), shards=2)
    _, lazy = load_checkpoint(tmp_path / "src")
    shard = tmp_path / "src" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors: not a valid safetensors file"):
        save_checkpoint(tmp_path / "new", cfg, lazy)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


# -----------------------------------------------------------------------------
# Initialisation from a teacher


def _conv_teacher(path, kind, dtype=torch.bfloat16, seed=0):
    """A tiny Llama / Qwen2 (q/k/v biases, no flag, tied) / Qwen3 (q_norm/k_norm, head_dim != C/H) checkpoint."""
    C, L, H, KV, I, V = 32, 4, 4, 2, 48, 40
    N = 12 if kind == "qwen3" else C // H
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(dtype)  # noqa: E731
    tied = kind == "qwen2"
    sd = {"model.embed_tokens.weight": r(V, C), "model.norm.weight": 1 + r(C)}
    if not tied:
        sd["lm_head.weight"] = r(V, C)
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + r(C), p + "post_attention_layernorm.weight": 1 + r(C),
                   p + "self_attn.q_proj.weight": r(H * N, C), p + "self_attn.k_proj.weight": r(KV * N, C),
                   p + "self_attn.v_proj.weight": r(KV * N, C), p + "self_attn.o_proj.weight": r(C, H * N),
                   p + "mlp.gate_proj.weight": r(I, C), p + "mlp.up_proj.weight": r(I, C),
                   p + "mlp.down_proj.weight": r(C, I)})
        if kind == "qwen2":
            sd.update({p + "self_attn.q_proj.bias": r(H * N), p + "self_attn.k_proj.bias": r(KV * N),
                       p + "self_attn.v_proj.bias": r(KV * N)})
        if kind == "qwen3":
            sd.update({p + "self_attn.q_norm.weight": 1 + r(N), p + "self_attn.k_norm.weight": 1 + r(N)})
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    tc = {"architectures": [arch], "model_type": kind, "hidden_size": C, "num_hidden_layers": L,
          "num_attention_heads": H, "num_key_value_heads": KV, "intermediate_size": I, "vocab_size": V,
          "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": tied, "max_position_embeddings": 4096,
          "torch_dtype": "bfloat16"}
    if kind == "llama":
        tc["attention_bias"] = False
    if kind == "qwen3":
        tc["head_dim"] = N
    _save_hf(path, tc, sd, shards=2)
    return tc, sd


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_init_from_teacher(tmp_path, kind):
    tc, teacher = _conv_teacher(tmp_path / "teacher", kind)
    init_from_teacher(tmp_path / "teacher", tmp_path / "student", [1], seed=3, max_shard_bytes=40_000)
    cfg, sd = load_checkpoint(tmp_path / "student")
    assert (cfg.rwkv_architecture, cfg.transformer_layers, cfg.num_hidden_layers) == ("hxa079", [1], 4)
    assert cfg.attention_bias == (kind == "qwen2") and cfg.enable_qk_norm == (kind == "qwen3")
    assert cfg.tie_word_embeddings == (kind == "qwen2") and cfg.head_size == (12 if kind == "qwen3" else 8)
    assert (cfg.rms_norm_eps, cfg.rope_theta) == (1e-6, 1e6)
    assert cfg.extra["model_type"] == kind and cfg.extra["max_position_embeddings"] == 4096
    A = cfg.num_attention_heads * cfg.head_size
    assert {k: getattr(cfg, k) for k in default_lora_ranks(A)} == default_lora_ranks(A)
    shapes = {k: tuple(v.shape) for k, v in HRWKV7ForCausalLM(cfg).state_dict().items()}
    assert {k: sd.ref(k).shape for k in sd} == shapes and all(sd.ref(k).dtype == torch.bfloat16 for k in sd)
    scale = {"receptance": ("q_proj", 0.5), "key": ("k_proj", 0.5), "value": ("v_proj", 0.3),
             "output": ("o_proj", 0.5), "r_norm": ("q_norm", 1), "k_norm": ("k_norm", 1)}
    for key in sd:
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        name = key.split(".")[4] if ".self_attn." in key else None
        if name is None or layer == "1":                           # copied bit for bit
            assert torch.equal(sd[key], teacher[key]), key
        elif name in scale:
            src, s = scale[name]
            expect = (teacher[key.replace(name, src)].float() * s).bfloat16()
            assert torch.equal(sd[key], expect), key
    student = HRWKV7ForCausalLM.from_pretrained(tmp_path / "student")
    assert _conv_logits(student, cfg).isfinite().all()


def test_teacher_init_values_follow_the_formulas(tmp_path):
    _conv_teacher(tmp_path / "teacher", "llama", dtype=torch.float32)
    init_from_teacher(tmp_path / "teacher", tmp_path / "s", [2], ranks={"lora_rank_decay": 16, "lora_rank_gate": 8},
                      qkvo_scale=(1, 1, 1, 1))
    cfg, sd = load_checkpoint(tmp_path / "s")
    _, teacher = _conv_teacher(tmp_path / "again", "llama", dtype=torch.float32)
    for old, new in [("q_proj", "receptance"), ("k_proj", "key"), ("v_proj", "value"), ("o_proj", "output")]:
        p = "model.layers.0.self_attn."
        assert torch.equal(sd[f"{p}{new}.weight"], teacher[f"{p}{old}.weight"])
    assert (cfg.lora_rank_decay, cfg.lora_rank_gate, cfg.lora_rank_iclr) == (16, 8, 32)
    A, N, L = 32, 8, 4
    for layer in (0, 3):
        p = f"model.layers.{layer}.self_attn."
        w0, a0 = sd[p + "w0"][0, 0].double(), sd[p + "a0"][0, 0].double()
        ratio = layer / (L - 1)
        # channel 0: zigzag -1, linear -0.5; channel A-1: zigzag +1, linear +0.5
        assert w0[0].item() == pytest.approx(-6 + 0.5 - 2.5, abs=1e-6)
        assert w0[-1].item() == pytest.approx(-6 + 6 + 0.5 + 2.5, abs=1e-6)
        zigzag9 = -(5 / 7) ** 2                                    # channel 9: (9 mod 8) = 1, z = (1 - 3.5) / 3.5
        expect = -6 + 6 * (9 / 31) ** (1 + ratio ** 0.3) + 0.5 + 2.5 * zigzag9
        assert w0[9].item() == pytest.approx(expect, abs=1e-6)
        assert a0[0].item() == pytest.approx(-0.19 - 0.3 - 0.2, abs=1e-6)
        assert a0[-1].item() == pytest.approx(-0.19 + 0.3 + 0.2, abs=1e-6)
        assert torch.all(sd[p + "v0"] == torch.tensor(0.73)) and torch.all(sd[p + "k0"] == torch.tensor(0.73))
        assert torch.all(sd[p + "r_k"] == torch.tensor(-0.04)) and sd[p + "r_k"].shape == (4, N)
        for z in ("w1", "a1", "v1", "k1", "g1"):
            assert not sd[p + z].any()
        for m, rows, cols in [("w2", 16, A), ("a2", 32, A), ("v2", 32, 16), ("k2", 32, 16), ("g2", 8, A)]:
            w = sd[p + m].double()
            assert w.shape == (rows, cols)
            gram, eye = (w.T @ w, torch.eye(cols)) if rows > cols else (w @ w.T, torch.eye(rows))
            gain = (rows / cols) if rows > cols else 1.0
            assert torch.allclose(gram, 0.01 * gain * eye.double(), atol=1e-6), m
    assert not torch.equal(sd["model.layers.0.self_attn.w2"], sd["model.layers.3.self_attn.w2"])
    # the seed decides the random matrices, and nothing else does
    assert torch.equal(hxa079_init("g2", 3, cfg, seed=5), hxa079_init("g2", 3, cfg, seed=5))
    assert not torch.equal(hxa079_init("g2", 3, cfg, seed=5), hxa079_init("g2", 3, cfg, seed=6))


def test_teacher_problems_and_cli(tmp_path, capsys):
    assert default_lora_ranks(6144) == {"lora_rank_decay": 320, "lora_rank_iclr": 128,
                                        "lora_rank_value_residual_mix": 96, "lora_rank_key_residual_mix": 96,
                                        "lora_rank_gate": 384}
    tc, sd = _conv_teacher(tmp_path / "t", "llama")
    convert.main(["from-teacher", str(tmp_path / "t"), str(tmp_path / "s"), "--transformer-layers", "1,3",
                  "--seed", "2"])
    assert "2 RWKV + 2 GQA  (RGRG" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "s")[0].transformer_layers == [1, 3]
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    _save_hf(tmp_path / "obias", tc, sd)
    with pytest.raises(ValueError, match="o_proj biases"):
        init_from_teacher(tmp_path / "obias", tmp_path / "x", [1])
    del sd["model.layers.0.self_attn.o_proj.bias"]
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(5, 32)
    sd["model.vision.weight"] = torch.zeros(2)
    _save_hf(tmp_path / "bad", tc, sd)
    with pytest.raises(ValueError, match=r"(?s)model\.layers\.2\.mlp\.up_proj\.weight has shape \(5, 32\), expected "
                                         r"\(48, 32\).*model\.vision\.weight has no place"):
        init_from_teacher(tmp_path / "bad", tmp_path / "x", [1])
    with pytest.raises(ValueError, match=r"lacks rope_theta"):
        _save_hf(tmp_path / "nocfg", {k: v for k, v in tc.items() if k != "rope_theta"}, {})
        init_from_teacher(tmp_path / "nocfg", tmp_path / "x", [1])
    assert not (tmp_path / "x").exists()


# =============================================================================
# wkv7_chunked, the chunked parallel form, against the naive loop (the definition), and the naive
# loop against fla-core's independent reference when it is installed.

_CHUNK_SETTINGS = dict(deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _chunk_inputs(seed, B, T, H, N, dtype=torch.float64, decay="hxa079", ab="model", with_state=True):
    """r, w, k, v, a, b [B, T, H, N] and the initial state [B, H, N, N] (or None).

    decay: "hxa079"  w = -exp(-0.5 - softplus(z)), the model's range [-e^-0.5, 0) = [-0.607, 0)
           "strong"  w uniform in [-30, 0]
           "mixed"   hxa079, except a burst of strong decay somewhere in the sequence
    ab:    "model"   a = -kk, b = kk * iclr with kk unit-norm and iclr in (0, 1), as hxa079 calls it
           "generic" a, b uniform in [-1, 1] / sqrt(N), unrelated to each other and to k
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=g, dtype=torch.float64)  # noqa: E731
    uni = lambda: torch.rand(B, T, H, N, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rnd(), rnd(), rnd()
    if decay == "strong":
        w = -30 * uni()
    else:
        w = -torch.exp(-0.5 - F.softplus(rnd()))
        if decay == "mixed":
            t0 = int(torch.randint(0, T, (1,), generator=g))
            w[:, t0:t0 + 8] = -30 * uni()[:, t0:t0 + 8]
    if ab == "model":
        kk = F.normalize(rnd(), dim=-1)
        a, b = -kk, kk * torch.sigmoid(rnd())
    else:
        a, b = (2 * uni() - 1) * N ** -0.5, (2 * uni() - 1) * N ** -0.5
    S0 = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) if with_state else None
    xs = [x.to(dtype) for x in (r, w, k, v, a, b)]
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    return xs, (None if S0 is None else S0.to(sd))


_chunk_case = dict(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 2),
    T=st.integers(1, 100),
    H=st.integers(1, 3),
    N=st.sampled_from([2, 8, 16, 24, 64, 96]),
    chunk=st.sampled_from([4, 16, 32, 64]),
    decay=st.sampled_from(["hxa079", "strong", "mixed"]),
    ab=st.sampled_from(["model", "generic"]),
    with_state=st.booleans(),
    max_span=st.sampled_from([None, None, 0.0, 5.0]),
)


@contextlib.contextmanager
def _chunk_max_span(dtype, max_span):
    """Temporarily move the factored/pairwise threshold: 0 sends every chunk down the pairwise
    path, a small value mixes both paths in one call even at the model's decays (and float64,
    whose default threshold 600 the test decays rarely reach), None leaves it as is."""
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    saved = MAX_FACTORED_SPAN[sd]
    if max_span is not None:
        MAX_FACTORED_SPAN[sd] = max_span
    try:
        yield
    finally:
        MAX_FACTORED_SPAN[sd] = saved


def _chunk_small(N, T, H, B):
    """Keep the big head sizes to short, thin cases so the whole file stays fast."""
    return N <= 24 or T * H * B <= 120


# -----------------------------------------------------------------------------
# chunked == naive


# tolerances: float64 ~1e-10 (a few hundred roundings of 1e-16); float32 ~1e-4 (the loop itself
# runs in float32 here, and the chunked sums round differently)
_CHUNK_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=20, **_CHUNK_SETTINGS)
@given(**_chunk_case)
def test_chunked_matches_naive(dtype, seed, B, T, H, N, chunk, decay, ab, with_state, max_span):
    if not _chunk_small(N, T, H, B):
        T = max(1, 120 // (H * B))
    xs, S0 = _chunk_inputs(seed, B, T, H, N, dtype, decay, ab, with_state)
    y_ref, S_ref = wkv7_naive(*xs, S0)
    with _chunk_max_span(dtype, max_span):
        y, S = wkv7_chunked(*xs, S0, chunk_size=chunk)
    assert y.dtype == S.dtype == dtype and y.shape == y_ref.shape and S.shape == S_ref.shape
    assert torch.isfinite(y).all() and torch.isfinite(S).all()
    assert rel_err(y, y_ref) < _CHUNK_TOL[dtype]
    assert rel_err(S, S_ref) < _CHUNK_TOL[dtype]


@settings(max_examples=15, **_CHUNK_SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 80), N=st.sampled_from([8, 24, 64]),
       chunk=st.sampled_from([16, 64]), decay=st.sampled_from(["hxa079", "mixed"]))
def test_chunked_bf16_inputs(seed, T, N, chunk, decay):
    # The oracle: the naive loop in float64 on the same bf16-rounded inputs. The chunked form
    # computes in float32 (error ~1e-6 of max|y|, the float32 tolerance 1e-4 covers it) and
    # rounds y to bf16: 8 significant bits, relative rounding error <= 2^-8 of each entry.
    xs, S0 = _chunk_inputs(seed, 1, T, 2, N, torch.bfloat16, decay, "model", True)
    y_ref, S_ref = wkv7_naive(*(x.double() for x in xs), S0.double())
    y, S = wkv7_chunked(*xs, S0, chunk_size=chunk)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    tol = 2.0 ** -8 * y_ref.abs() + 1e-4 * y_ref.abs().max()
    assert ((y.double() - y_ref).abs() <= tol).all()
    assert rel_err(S, S_ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("span_factor", [0.99, 1.01])
def test_chunked_at_the_factored_span_threshold(dtype, span_factor):
    # The second chunk decays by just under the threshold (the largest factors the factored
    # product ever sees) or just over it (the pairwise path, next to a factored first chunk).
    C, N = 16, 24
    xs, S0 = _chunk_inputs(7, 1, 2 * C, 2, N, dtype, "hxa079", "model", True)
    span = span_factor * MAX_FACTORED_SPAN[dtype]
    w = xs[1].clone()
    w[:, C:, :, 0] = -span / C                         # channel 0 of the second chunk decays by `span`
    xs[1] = w
    y_ref, S_ref = wkv7_naive(*xs, S0)
    y, S = wkv7_chunked(*xs, S0, chunk_size=C)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert rel_err(y, y_ref) < tol and rel_err(S, S_ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_extreme_decay_is_finite_and_exact(dtype):
    # w = -30 from token 64 on: those 64-token chunks decay by e^-1920, far below any float
    # (the state keeps only the last token's write and the a/b correction), next to a first
    # chunk at the model's decays. Values and gradients: finite and equal to the naive loop's.
    xs, S0 = _chunk_inputs(3, 1, 150, 2, 16, dtype, "hxa079", "model", True)
    xs[1][:, 64:] = -30.0
    g = torch.Generator().manual_seed(4)
    proj_y, proj_S = torch.randn(xs[3].shape, generator=g), torch.randn(S0.shape, generator=g)

    def run(f):
        leaves = [x.clone().requires_grad_() for x in (*xs, S0)]
        y, S = f(*leaves)
        loss = (y.to(proj_y.dtype) * proj_y).sum() + (S.to(proj_S.dtype) * proj_S).sum()
        return y, S, torch.autograd.grad(loss, leaves)

    y_ref, S_ref, g_ref = run(wkv7_naive)
    y, S, g_chunk = run(lambda *x: wkv7_chunked(*x, chunk_size=64))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.isfinite(y).all() and torch.isfinite(S).all()
    assert rel_err(y, y_ref) < tol and rel_err(S, S_ref) < tol
    for name, a, b in zip(("r", "w", "k", "v", "a", "b", "state"), g_chunk, g_ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("seed", range(4))
def test_chunked_float32_strong_decay_is_as_accurate_as_the_loop(seed):
    # Against a float64 oracle the float32 naive loop is off by ~2e-7 (of max|y|) at w in
    # [-30, 0]. The chunked form must not lose more than a few float32 ulps of the chunk's
    # decays: e.g. taking g_C - g_s as a difference of two cumulative sums of size ~1000
    # would cost ~1000 * 6e-8 = 6e-5, hence the decays to the chunk end summed from the end.
    xs, S0 = _chunk_inputs(seed, 1, 128, 2, 16, torch.float32, "strong", "model", True)
    y_ref, S_ref = wkv7_naive(*(x.double() for x in xs), S0.double())
    y, S = wkv7_chunked(*xs, S0, chunk_size=64)
    assert rel_err(y, y_ref) < 5e-6 and rel_err(S, S_ref) < 5e-6


def test_chunked_split_sequence_equals_whole():
    # Running [0, t) then [t, T) from the carried state equals one call over [0, T).
    xs, S0 = _chunk_inputs(11, 2, 77, 2, 8)
    y, S = wkv7_chunked(*xs, S0, chunk_size=16)
    y1, S1 = wkv7_chunked(*(x[:, :30] for x in xs), S0, chunk_size=16)
    y2, S2 = wkv7_chunked(*(x[:, 30:] for x in xs), S1, chunk_size=16)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-12 and rel_err(S2, S) < 1e-12


def test_chunked_empty_sequence_and_bad_chunk_size():
    xs, S0 = _chunk_inputs(0, 1, 5, 2, 8)
    y, S = wkv7_chunked(*(x[:, :0] for x in xs), S0)
    assert y.shape == (1, 0, 2, 8) and torch.equal(S, S0) and S is not S0
    with pytest.raises(ValueError, match="chunk_size"):
        wkv7_chunked(*xs, S0, chunk_size=0)


# -----------------------------------------------------------------------------
# gradients


@settings(max_examples=12, **_CHUNK_SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 40), H=st.integers(1, 2), N=st.sampled_from([2, 8]),
       chunk=st.sampled_from([4, 8, 16]), decay=st.sampled_from(["hxa079", "strong", "mixed"]),
       ab=st.sampled_from(["model", "generic"]), max_span=st.sampled_from([None, 0.0, 5.0]))
def test_chunked_gradients_match_naive(seed, T, H, N, chunk, decay, ab, max_span):
    xs, S0 = _chunk_inputs(seed, 1, T, H, N, torch.float64, decay, ab, True)
    g = torch.Generator().manual_seed(seed + 1)
    proj_y = torch.randn(1, T, H, N, generator=g, dtype=torch.float64)
    proj_S = torch.randn(1, H, N, N, generator=g, dtype=torch.float64)

    def grads(f):
        leaves = [x.clone().requires_grad_() for x in (*xs, S0)]
        y, S = f(*leaves)
        return torch.autograd.grad((y * proj_y).sum() + (S * proj_S).sum(), leaves)

    g_ref = grads(wkv7_naive)
    with _chunk_max_span(torch.float64, max_span):
        g_chunk = grads(lambda *x: wkv7_chunked(*x, chunk_size=chunk))
    for name, a, b in zip(("r", "w", "k", "v", "a", "b", "state"), g_chunk, g_ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-8, name


# -----------------------------------------------------------------------------
# the dispatcher


def test_dispatcher_runs_chunked():
    assert IMPLS["chunked"] is wkv7_chunked
    xs, S0 = _chunk_inputs(5, 2, 50, 3, 16)
    y_n, S_n = wkv7(*xs, S0, impl="naive")
    y_c, S_c = wkv7(*xs, S0, impl="chunked")
    assert rel_err(y_c, y_n) < 1e-10 and rel_err(S_c, S_n) < 1e-10
    assert pick_impl(xs[0]) == "chunked" and pick_impl(xs[0][:, :1]) == "naive"
    y_a, S_a = wkv7(*xs, S0)
    assert torch.equal(y_a, y_c) and torch.equal(S_a, S_c)


# -----------------------------------------------------------------------------
# the naive loop against an independent implementation: fla-core's dplr_recurrence


@pytest.mark.parametrize("decay", ["hxa079", "strong"])
def test_naive_matches_fla_dplr_recurrence(decay):
    dplr = _load_fla_dplr_naive()
    if dplr is None:
        pytest.skip("fla-core is not installed")
    # dplr_recurrence computes in float32, in the [B, H, T, K] layout, with q scaled by K**-0.5
    # and the state S_t = S_{t-1} * exp(gk_t) + k v^T + beta (alpha^T S_{t-1}): ours with
    # q = r * sqrt(K), alpha = a, beta = b, gk = w.
    B, T, H, N = 2, 40, 3, 16
    xs, S0 = _chunk_inputs(21, B, T, H, N, torch.float32, decay, "model", True)
    r, w, k, v, a, b = xs
    q, w_, k_, v_, a_, b_ = (x.transpose(1, 2).contiguous() for x in (r * N ** 0.5, w, k, v, a, b))
    y_fla, S_fla = dplr.dplr_recurrence(q, k_, v_, a_, b_, w_, initial_state=S0.clone())
    y, S = wkv7_naive(*xs, S0)
    assert rel_err(y, y_fla.transpose(1, 2)) < 1e-5
    assert rel_err(S, S_fla) < 1e-5


# -----------------------------------------------------------------------------
# chunked: the chunks go through in segments of about CHUNKED_SEGMENT_ELEMENTS numbers per tensor,
# carrying the state between segments; any segment size gives the naive loop's values and gradients


def _chunk_seg_inputs(seed, B, T, H, N, decay):
    """float64 r, w, k, v, a, b [B, T, H, N] drawn like hxa079's (a = -kk, b = kk * iclr), and S_0.
    decay "hxa079": w in [-e^-0.5, 0); "mixed": that, with a burst of w in [-30, 0]."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rnd(), rnd(), rnd()
    w = -torch.exp(-0.5 - F.softplus(rnd()))
    if decay == "mixed":
        t0 = int(torch.randint(0, T, (1,), generator=g))
        w[:, t0:t0 + 8] = -30 * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)[:, t0:t0 + 8]
    kk = F.normalize(rnd(), dim=-1)
    S0 = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    return [r, w, k, v, -kk, kk * torch.sigmoid(rnd())], S0


@contextlib.contextmanager
def _chunk_segment_elements(n):
    saved = wkv_kernel.CHUNKED_SEGMENT_ELEMENTS
    wkv_kernel.CHUNKED_SEGMENT_ELEMENTS = n
    try:
        yield
    finally:
        wkv_kernel.CHUNKED_SEGMENT_ELEMENTS = saved


# 1: one chunk per segment; 3000: a few chunks per segment at these sizes; default: usually one segment
_chunk_segment_sizes = st.sampled_from([1, 3000, None])


@settings(max_examples=15, **_CHUNK_SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), T=st.integers(1, 120), H=st.integers(1, 3),
       N=st.sampled_from([2, 8, 24]), chunk=st.sampled_from([4, 16, 32]),
       decay=st.sampled_from(["hxa079", "mixed"]), segment=_chunk_segment_sizes)
def test_chunked_segments_match_naive(seed, B, T, H, N, chunk, decay, segment):
    xs, S0 = _chunk_seg_inputs(seed, B, T, H, N, decay)
    y_ref, S_ref = wkv7_naive(*xs, S0)
    with _chunk_segment_elements(segment or wkv_kernel.CHUNKED_SEGMENT_ELEMENTS):
        y, S = wkv7_chunked(*xs, S0, chunk_size=chunk)
    assert y.shape == y_ref.shape and y.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


def test_chunked_segments_float32_one_chunk_each_vs_one_segment():
    # float32 at the bench's head shape: one chunk per segment against all chunks in one
    # segment (two different groupings of the same products) and against the naive loop.
    xs, S0 = _chunk_seg_inputs(2, 1, 300, 2, 64, "hxa079")
    xs, S0 = [x.float() for x in xs], S0.float()
    y_ref, S_ref = wkv7_naive(*xs, S0)
    with _chunk_segment_elements(1):
        y1, S1 = wkv7_chunked(*xs, S0)
    with _chunk_segment_elements(2 ** 30):
        y2, S2 = wkv7_chunked(*xs, S0)
    for y, S in ((y1, S1), (y2, S2)):
        assert rel_err(y, y_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4
    assert rel_err(y1, y2) < 1e-5


@settings(max_examples=8, **_CHUNK_SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 40), chunk=st.sampled_from([4, 8]),
       decay=st.sampled_from(["hxa079", "mixed"]), segment=_chunk_segment_sizes)
def test_chunked_segments_gradients_match_naive(seed, T, chunk, decay, segment):
    xs, S0 = _chunk_seg_inputs(seed, 1, T, 2, 8, decay)
    g = torch.Generator().manual_seed(seed + 1)
    proj_y = torch.randn(1, T, 2, 8, generator=g, dtype=torch.float64)
    proj_S = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64)

    def grads(f):
        leaves = [x.clone().requires_grad_() for x in (*xs, S0)]
        y, S = f(*leaves)
        return torch.autograd.grad((y * proj_y).sum() + (S * proj_S).sum(), leaves)

    g_ref = grads(wkv7_naive)
    with _chunk_segment_elements(segment or wkv_kernel.CHUNKED_SEGMENT_ELEMENTS):
        g_chunk = grads(lambda *x: wkv7_chunked(*x, chunk_size=chunk))
    for name, a, b in zip(("r", "w", "k", "v", "a", "b", "state"), g_chunk, g_ref):
        assert rel_err(a, b) < 1e-8, name


# =============================================================================
# The model with each WKV form, and the compiled form against the loop


def test_model_logits_with_chunked_equal_naive():
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [0]})
    model = _tiny_model(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.wkv_impl = "naive"
        want, st_want = model(ids)
        model.wkv_impl = "chunked"
        got, st_got = model(ids)
    assert rel_err(got, want) < 1e-10
    assert all(rel_err(a, b) < 1e-10 for a, b in zip(st_got.layers[1:], st_want.layers[1:]))


@settings(max_examples=5)
@given(B=st.integers(1, 2), T=st.integers(1, 90), H=st.integers(1, 2), with_state=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_compiled_matches_naive_float32(B, T, H, with_state, seed):
    # One head size, chunk size and dtype: T and B*H are dynamic, so this compiles once.
    from wkv_kernel import wkv7_compiled
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    r, k, v = rnd(B, T, H, 24), rnd(B, T, H, 24), rnd(B, T, H, 24)
    w = -torch.exp(-0.5 - F.softplus(rnd(B, T, H, 24)))             # hxa079's log decays
    kk = F.normalize(rnd(B, T, H, 24), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, 24, generator=gen)
    S0 = rnd(B, H, 24, 24) if with_state else None
    y, S = wkv7_compiled(r, w, k, v, a, b, S0, chunk_size=16)
    y64, S64 = wkv7_naive(*(x.double() for x in (r, w, k, v, a, b)), None if S0 is None else S0.double())
    assert y.dtype == torch.float32 and S.dtype == torch.float32
    assert rel_err(y.double(), y64) < 1e-4 and rel_err(S.double(), S64) < 1e-4


# =============================================================================
# wkv7_triton (the Triton forward kernels) against wkv7_naive run in float64 on the same inputs.

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if WANT_CUDA and HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (WANT_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton, and TRITON_INTERPRET=1 (CPU) or HRWKV7_TEST_CUDA=1 (GPU)")
needs_cuda = pytest.mark.skipif(not (WANT_CUDA and HAS_CUDA), reason="GPU test: set HRWKV7_TEST_CUDA=1 on a CUDA machine")

HXA079_W_MIN = -torch.exp(torch.tensor(-0.5)).item()   # hxa079's log decay -exp(w), w <= -0.5: in [-0.61, 0)


def make_inputs(B, T, H, K, V, *, seed, w_min=HXA079_W_MIN, model_like=True, with_state=True):
    """float64 inputs: model-like a = -kk, b = kk * iclr (or free a, b) and w uniform in [w_min, 0)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    r, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    if model_like:
        kk = F.normalize(rnd(B, T, H, K), dim=-1)
        iclr = torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
        a, b = -kk, kk * iclr
    else:
        a, b = 0.3 * rnd(B, T, H, K), 0.3 * rnd(B, T, H, K)
    w = torch.rand(B, T, H, K, generator=gen, dtype=torch.float64) * w_min   # in (w_min, 0]
    state = rnd(B, H, K, V) if with_state else None
    return (r, w, k, v, a, b), state


def run_both(inputs, state, dtype, **kw):
    """(y, S) of the kernel on `inputs` cast to dtype, and of the float64 loop on the same cast values."""
    xs = [x.to(dtype) for x in inputs]
    s32 = None if state is None else state.float()
    y, S = wkv7_triton(*(x.to(DEVICE) for x in xs), None if s32 is None else s32.to(DEVICE), **kw)
    y_ref, S_ref = wkv7_naive(*(x.double() for x in xs), None if s32 is None else s32.double())
    assert y.dtype == dtype and S.dtype == torch.float32
    assert y.shape == y_ref.shape and S.shape == S_ref.shape
    return (y.cpu(), S.cpu()), (y_ref, S_ref)


def assert_close_rel(got, ref, rtol, scale_tol, what):
    """|got - ref| <= rtol |ref| + scale_tol max|ref|, elementwise (the second term covers
    entries near 0 whose error comes from O(max) terms that cancelled)."""
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs()
    bound = rtol * ref.abs() + scale_tol * ref.abs().max().clamp_min(1e-30)
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: |err| {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
                                  f"(ref {ref.flatten()[worst]:.3g}, max|ref| {ref.abs().max():.3g})")


# float32: the kernels compute in float32 with IEEE dots; observed errors are ~1e-6 of max|ref|
F32_TOL = dict(rtol=1e-4, scale_tol=1e-5)


@needs_triton
@settings(deadline=None, max_examples=8)
@given(B=st.integers(1, 2), T=st.integers(1, 2 * TRITON_CHUNK + 5), H=st.integers(1, 2),
       K=st.sampled_from([24, 64, 96]), V_is_K=st.booleans(), path=st.sampled_from(["auto", "chunked", "recurrent"]),
       with_state=st.booleans(), model_like=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_float32_matches_naive(B, T, H, K, V_is_K, path, with_state, model_like, seed):
    """Shapes incl. head sizes 24/64/96 and V != K, T not a multiple of the chunk, both kernels."""
    V = K if V_is_K else 24
    inputs, state = make_inputs(B, T, H, K, V, seed=seed, model_like=model_like, with_state=with_state)
    (y, S), (y_ref, S_ref) = run_both(inputs, state, torch.float32, path=path)
    assert_close_rel(y, y_ref, what="y", **F32_TOL)
    assert_close_rel(S, S_ref, what="S_T", **F32_TOL)


# bfloat16 / float16 inputs: the reference runs on the very same rounded inputs, and the kernel
# computes in float32, so the only extra error is y's final rounding to nearest in the input
# dtype: at most half an ulp, i.e. 2^-8 (bf16, 8 significant bits) / 2^-11 (fp16, 11 bits) of
# |y|. The float32 arithmetic adds ~1e-6 of max|y|, covered by scale_tol. (A truncating
# conversion, up to a whole ulp, fails this.) The state is returned in float32: float32 tolerances.
LOW_TOL = {torch.bfloat16: dict(rtol=2**-8, scale_tol=1e-5), torch.float16: dict(rtol=2**-11, scale_tol=1e-5)}


@needs_triton
@settings(deadline=None, max_examples=4)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]), T=st.sampled_from([1, 5, TRITON_CHUNK + 3]),
       K=st.sampled_from([64, 96]), seed=st.integers(0, 2**31 - 1))
def test_half_inputs_match_naive(dtype, T, K, seed):
    inputs, state = make_inputs(1, T, 2, K, K, seed=seed)
    (y, S), (y_ref, S_ref) = run_both(inputs, state, dtype)
    assert_close_rel(y, y_ref, what=f"y ({dtype})", **LOW_TOL[dtype])
    assert_close_rel(S, S_ref, what="S_T", **F32_TOL)


@needs_triton
def test_decode_after_prefill_equals_one_pass():
    """Prefill by the chunked kernel, then T == 1 steps (auto: the recurrent kernel), state carried."""
    inputs, state = make_inputs(1, 2 * TRITON_CHUNK + 3, 2, 64, 64, seed=1)
    xs = [x.float().to(DEVICE) for x in inputs]
    y_ref, S_ref = wkv7_naive(*(x.double() for x in xs), state.float().double())
    P = 2 * TRITON_CHUNK
    y, S = wkv7_triton(*(x[:, :P] for x in xs), state.float().to(DEVICE))
    ys = [y]
    for t in range(P, xs[0].shape[1]):
        y, S = wkv7_triton(*(x[:, t:t + 1] for x in xs), S)
        ys.append(y)
    assert_close_rel(torch.cat(ys, 1).cpu(), y_ref, what="y", **F32_TOL)
    assert_close_rel(S.cpu(), S_ref, what="S_T", **F32_TOL)


@needs_triton
def test_non_contiguous_inputs_and_state_untouched():
    (r, w, k, v, a, b), state = make_inputs(1, 20, 2, 24, 24, seed=2)
    inputs = [x.float().transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE) for x in (r, w, k, v, a, b)]
    assert not inputs[0].is_contiguous()
    s0 = state.float().to(DEVICE)
    s0_copy = s0.clone()
    y, S = wkv7_triton(*inputs, s0)
    y_ref, S_ref = wkv7_naive(*(x.double() for x in inputs), s0.double())
    assert torch.equal(s0, s0_copy)
    assert_close_rel(y.cpu(), y_ref.cpu(), what="y", **F32_TOL)
    assert_close_rel(S.cpu(), S_ref.cpu(), what="S_T", **F32_TOL)


@needs_triton
def test_empty_sequence():
    (r, w, k, v, a, b), state = make_inputs(1, 0, 2, 24, 24, seed=3)
    y, S = wkv7_triton(*(x.float().to(DEVICE) for x in (r, w, k, v, a, b)), state.float().to(DEVICE))
    assert y.shape == (1, 0, 2, 24) and torch.equal(S.cpu(), state.float())


# --- strong decay -------------------------------------------------------------------------
# A chunk whose total decay span max_k(-g_C) exceeds TRITON_MAX_FACTORED_SPAN takes the
# pairwise branch. At w = -30 per step the span of a chunk is 480: the factored split about
# g_C / 2 would need exp(240) (overflow: inf, then NaN), so exactness here shows the branch.

EDGE_W = -TRITON_MAX_FACTORED_SPAN / TRITON_CHUNK                       # span exactly at the threshold


@needs_triton
@pytest.mark.parametrize("w_case", ["uniform_-30", "mixed_chunks", "edge_factored", "edge_pairwise", "hard_reset"])
def test_strong_decay_is_exact(w_case):
    T = 2 * TRITON_CHUNK + 5
    inputs, state = make_inputs(1, T, 1, 24, 24, seed=4)
    r, w, k, v, a, b = inputs
    if w_case == "uniform_-30":
        w = w / HXA079_W_MIN * -30.0                                     # in (-30, 0]
    elif w_case == "mixed_chunks":                                       # weak, strong, weak+strong tokens
        w = w.clone()
        w[:, TRITON_CHUNK:2 * TRITON_CHUNK] = -30.0
        w[:, 2 * TRITON_CHUNK + 2] = -30.0
    elif w_case == "edge_factored":                                      # span 60: the factored path's limit
        w = torch.full_like(w, EDGE_W)
    elif w_case == "edge_pairwise":                                      # just over it: pairwise
        w = torch.full_like(w, EDGE_W * 1.01)
    elif w_case == "hard_reset":                                         # exp(w) == 0 in float32 on some tokens
        w = w.clone()
        w[:, 3::7] = -1e4
    (y, S), (y_ref, S_ref) = run_both((r, w, k, v, a, b), state, torch.float32, path="chunked")
    assert_close_rel(y, y_ref, what="y", **F32_TOL)
    assert_close_rel(S, S_ref, what="S_T", **F32_TOL)


# --- refused inputs -------------------------------------------------------------------------

@needs_triton
def test_requires_grad_raises():
    (r, w, k, v, a, b), _ = make_inputs(1, 3, 1, 24, 24, seed=5)
    xs = [x.float().to(DEVICE) for x in (r, w, k, v, a, b)]
    xs[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        wkv7_triton(*xs)
    with torch.no_grad():                                                # no graph wanted: allowed
        wkv7_triton(*xs)


@needs_triton
def test_float64_raises():
    (r, w, k, v, a, b), _ = make_inputs(1, 3, 1, 24, 24, seed=6)
    with pytest.raises(ValueError, match="float64"):
        wkv7_triton(*(x.to(DEVICE) for x in (r, w, k, v, a, b)))


@needs_triton
def test_dispatcher_runs_it():
    inputs, state = make_inputs(1, 3, 1, 24, 24, seed=10)
    xs = [x.float().to(DEVICE) for x in inputs]
    y, S = wkv7(*xs, state.float().to(DEVICE), impl="triton")
    y_ref, S_ref = wkv7_triton(*xs, state.float().to(DEVICE))
    assert torch.equal(y, y_ref) and torch.equal(S, S_ref)


def test_module_imports_without_triton():
    """wkv_kernel imports triton only on the first wkv7_triton call."""
    code = "import sys, wkv_kernel; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_triton
def test_bad_path_raises():
    (r, w, k, v, a, b), _ = make_inputs(1, 3, 1, 24, 24, seed=7)
    with pytest.raises(ValueError, match="path"):
        wkv7_triton(*(x.float().to(DEVICE) for x in (r, w, k, v, a, b)), path="fast")


# --- the compiled kernels (no GPU needed to compile) -------------------------------------------

COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import wkv_kernel as m
m._load_triton()
assert not m._interpreted
sig = {n: "*bf16" for n in ("r_ptr", "w_ptr", "k_ptr", "v_ptr", "a_ptr", "b_ptr", "y_ptr")}
sig.update(s0_ptr="*fp32", sT_ptr="*fp32", T="i32")
const = dict(H=64, K=96, V=96, BK=128, BV=m.TRITON_BV, HAS_S0=True)
for fn, extra in ((m._wkv7_fwd_recurrent_kernel, {}),
                  (m._wkv7_fwd_chunked_kernel, dict(C=m.TRITON_CHUNK, MAX_SPAN=m.TRITON_MAX_FACTORED_SPAN))):
    c = {**const, **extra}
    triton.compile(ASTSource(fn, {**sig, **{n: "constexpr" for n in c}}, c), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=m.TRITON_NUM_WARPS))
print("ok")
"""


@needs_triton
def test_kernels_compile_for_sm90():
    """The interpreter does not type-check control flow the way the compiler does: compile both
    kernels (bf16, head size 96) for an H100 target down to PTX, in a process without the
    interpreter. Needs triton's NVIDIA backend, not a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# --- GPU only ---------------------------------------------------------------------------------

@needs_triton
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_long_sequence(dtype):
    """Model shapes (head size 96), a long prefill."""
    inputs, state = make_inputs(2, 1000, 4, 96, 96, seed=8)
    (y, S), (y_ref, S_ref) = run_both(inputs, state, dtype)
    tol = F32_TOL if dtype == torch.float32 else LOW_TOL[dtype]
    assert_close_rel(y, y_ref, what="y", **tol)
    assert_close_rel(S, S_ref, what="S_T", **F32_TOL)


@needs_triton
@needs_cuda
def test_cuda_strong_decay():
    inputs, state = make_inputs(1, 300, 2, 64, 64, seed=9, w_min=-30.0)
    (y, S), (y_ref, S_ref) = run_both(inputs, state, torch.float32)
    assert_close_rel(y, y_ref, what="y", **F32_TOL)
    assert_close_rel(S, S_ref, what="S_T", **F32_TOL)
