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
import re  # noqa: E402
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
from hrwkv7_ref import (HXA079_BIASES, TINY, HRWKV7Config, HRWKV7ForCausalLM, HRWKV7State, RMSNorm, apply_rope,  # noqa: E402
                        rope_cos_sin, sample, state_bytes)
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


def test_rope_known_values():
    # N = 4, theta = 100: frequencies [1, 100^(-2/4)] = [1, 0.1]; rotate-half pairs dims (0, 2), (1, 3):
    # out[j] = x[j] cos(p f_j) - x[j + N/2] sin(p f_j),  out[j + N/2] = x[j + N/2] cos(p f_j) + x[j] sin(p f_j)
    cos, sin = rope_cos_sin(torch.tensor([0, 1, 2]), 4, 100.0, torch.float64, "cpu")
    assert torch.equal(cos[1], torch.tensor([1, 0.1, 1, 0.1], dtype=torch.float64).cos())
    assert torch.equal(sin[2], torch.tensor([2, 0.2, 2, 0.2], dtype=torch.float64).sin())
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).expand(1, 3, 1, 4)
    out = apply_rope(x, cos, sin)[0, :, 0]
    c1, s1, c2, s2 = math.cos(1), math.sin(1), math.cos(0.1), math.sin(0.1)
    want1 = torch.tensor([1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2], dtype=torch.float64)
    assert torch.equal(out[0], x[0, 0, 0]) and rel_err(out[1], want1) < 1e-15


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


def test_two_files_copied_alone_load_a_checkpoint(tmp_path):
    # hrwkv7_ref.py + wkv_kernel.py in an empty folder load an HF checkpoint (sharded) with torch and
    # safetensors alone, and give the logits of the model that was saved
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]})
    src = _tiny_model(cfg, seed=4)
    _save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.save(src(ids)[0], tmp_path / "want.pt")
    lone = tmp_path / "lone"
    lone.mkdir()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("hrwkv7_ref.py", "wkv_kernel.py"):
        (lone / name).write_text(open(os.path.join(here, name)).read())
    script = (f"import sys, torch; sys.modules['convert'] = None\n"
              f"from hrwkv7_ref import HRWKV7ForCausalLM\n"
              f"m = HRWKV7ForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, dtype=torch.float64)\n"
              f"want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)\n"
              f"got = m(torch.tensor({ids.tolist()}))[0].detach()\n"
              f"err = ((got - want).abs().max() / want.abs().max()).item()\n"
              f"assert err < 1e-12, err\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=lone, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr


def test_device_map_with_disk_offload_gives_the_plain_logits(tmp_path):
    pytest.importorskip("accelerate")
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]})
    src = _tiny_model(cfg, seed=6).float()
    _save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "disk"}
    model = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map,
                                              offload_folder=tmp_path / "offload")
    with torch.no_grad():
        want, want_state = src(ids)
        got, state = model(ids)
        assert torch.equal(got, want)
        assert torch.equal(model(ids[:, :2], state)[0], src(ids[:, :2], want_state)[0])   # decoding on
    assert torch.equal(model.generate(ids[:1], 4, temperature=0), src.generate(ids[:1], 4, temperature=0))
    with pytest.raises(ValueError, match=r"device_map\['model.layers.0'\] = 'cuda:7': no such device"):
        HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", device_map={**device_map, "model.layers.0": "cuda:7"},
                                          offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError, match="give offload_folder"):
        HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map)


def test_bfloat16_weights_float32_compute_match_float64(tmp_path):
    # the same bf16-rounded weights, run once in float64 and once stored bf16 / computed float32
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1], "hidden_size": 64, "head_dim": 16})
    src = _tiny_model(cfg, seed=7).bfloat16()
    _save_hf(tmp_path / "ckpt", cfg, src.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(7))
    ref = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    model = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}   # stored: bf16 only
    with torch.no_grad():
        got, want = model(ids)[0], ref(ids)[0]
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5     # float32 rounding, not bf16's


def _write_tokenizer(path, vocab_size, eos):
    """A word-level tokenizer.json (the tokenizers package), a chat template and generation_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<s>", "</s>", "<unk>", "user", "assistant", "a", "b", "c"]
    vocab = {w: i for i, w in enumerate(words + [f"t{i}" for i in range(len(words), vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s>\n{% endfor %}"
                "{% if add_generation_prompt %}<s> assistant {% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>",
                                                            "eos_token": {"content": "</s>"}}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return tok


def _hub_cache(cache, repo_id, src, commit="0123456789abcdef0123456789abcdef01234567"):
    """src's files laid out as huggingface_hub's cache keeps a snapshot: refs/main holds the commit,
    snapshots/<commit>/<file> are links into ../../blobs/<sha256>."""
    import hashlib
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name in os.listdir(src):
        data = (src / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", repo / "snapshots" / commit / name)


def test_repo_id_from_the_hub_cache_and_the_chat_command(tmp_path):
    # an HF repo id resolved offline from a hub cache (sharded files as links into blobs/), by the
    # model, by convert.py and by the command users run, with the checkpoint's own chat template
    pytest.importorskip("huggingface_hub")
    pytest.importorskip("jinja2")
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]})
    src = _tiny_model(cfg, seed=8).float()
    ckpt = _save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards=3)
    tok = _write_tokenizer(ckpt, cfg.vocab_size, eos=1)
    _hub_cache(tmp_path / "hub", "owner/tiny-hxa079", ckpt)
    chat = "<s> user a b c </s>\n<s> assistant "
    ids = tok.encode(chat, add_special_tokens=False).ids
    with torch.no_grad():
        want_logits = src(torch.tensor([ids]))[0]
        want = src.generate(torch.tensor([ids]), 6, temperature=0, eos_token_id=1)[0, len(ids):].tolist()
    torch.save(want_logits, tmp_path / "want.pt")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    script = f"""
import torch, convert, hrwkv7_ref
from hrwkv7_ref import HRWKV7ForCausalLM, chat_prompt, resolve_checkpoint
assert chat_prompt(resolve_checkpoint("owner/tiny-hxa079"), "a b c") == {chat!r}
m = HRWKV7ForCausalLM.from_pretrained("owner/tiny-hxa079")
assert torch.equal(m(torch.tensor([{ids}]))[0], torch.load({str(tmp_path / "want.pt")!r}))
cfg, sd = convert.load_checkpoint("owner/tiny-hxa079")
assert cfg.transformer_layers == [1] and len(sd) == {len(src.state_dict())}
try:
    HRWKV7ForCausalLM.from_pretrained("owner/not-there")
except FileNotFoundError as e:
    print("ERROR:", e)
print("---", flush=True)
hrwkv7_ref.main(["--model", "owner/tiny-hxa079", "--prompt", "a b c", "--chat", "--temperature", "0",
                 "--max-new-tokens", "6"])   # what `python hrwkv7_ref.py --model ...` runs
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert run.returncode == 0, run.stderr
    error, cli = run.stdout.split("ERROR:")[1].split("---\n")
    assert "owner/not-there" in error and str(tmp_path / "hub") in error and "HF_HUB_OFFLINE='1'" in error
    assert cli.strip() == tok.decode(want)                           # streamed, stopped at the EOS
    assert re.search(rf"\[load .* prefill {len(ids)} tokens at .* tokens/s; decode {len(want) - 1} tokens at "
                     rf".*tokens/s\]", run.stderr)


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


def test_generate_streams_and_stops_at_eos():
    cfg = HRWKV7Config.from_dict(TINY)
    model = _tiny_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    free = model.generate(prompt, 8, temperature=0)
    eos = int(free[0, 7])                                            # row 0's third new token
    seen = []
    out = model.generate(prompt, 8, temperature=0, eos_token_id=[eos, 10 ** 6], on_token=seen.append)
    assert torch.equal(torch.cat(seen, 1), out[:, 5:])
    stop = [int((free[b, 5:] == eos).nonzero()[0]) + 1 if (free[b, 5:] == eos).any() else 8 for b in range(2)]
    assert out.shape[1] == 5 + max(stop)                             # stops when every row has ended
    for b in range(2):
        assert torch.equal(out[b, :5 + stop[b]], free[b, :5 + stop[b]])
        assert torch.all(out[b, 5 + stop[b]:] == eos)                # an ended row repeats its EOS


def test_rmsnorm_computes_in_float32_for_half_inputs():
    # activations of a few hundred: their squares overflow float16 (max 65504) unless upcast
    norm = RMSNorm(48, 1e-5)
    x = 300 * torch.randn(3, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = norm.double()(x)
    for dtype, tol in ((torch.float16, 2 ** -10), (torch.bfloat16, 2 ** -7)):   # ~ one rounding of the output
        got = norm.to(dtype)(x.to(dtype))
        assert got.dtype == dtype and rel_err(got, want) < tol, dtype


def test_sample_follows_temperature_and_top_p():
    # 40000 draws at once: frequencies against softmax(logits / temperature), renormalised over the
    # smallest set of tokens (in order of probability) whose mass reaches top_p, that set included
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0], dtype=torch.float64)
    n = 40000
    for temperature, top_p in ((0.5, 1.0), (2.0, 1.0), (1.0, 0.8), (1.0, 0.5)):
        p = torch.softmax(logits / temperature, -1)
        keep = (p.cumsum(-1) - p) < top_p                              # p is sorted here: the set, its crossing token included
        want = p * keep / (p * keep).sum()
        draws = sample(logits.expand(n, 5), temperature, top_p, torch.Generator().manual_seed(1))
        freq = torch.bincount(draws[:, 0], minlength=5).double() / n
        sigma = (want * (1 - want) / n).sqrt()
        assert torch.all((freq - want).abs() <= 5 * sigma + 1e-12), (temperature, top_p, freq, want)
    assert torch.equal(sample(logits[None], 0, 1.0, None), torch.tensor([[0]]))


def test_state_whose_cache_disagrees_with_pos_is_refused():
    cfg = HRWKV7Config.from_dict(TINY)
    model = _tiny_model(cfg)
    _, state = model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"caches 3 positions but state.pos=2"):
        model(torch.tensor([[4]]), HRWKV7State(state.layers, 2))


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

_FILE_SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
EPS_THETA = {"rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def _config_and_model(cfg_dict, seed=0):
    cfg = HRWKV7Config.from_dict(cfg_dict)
    return cfg, HRWKV7ForCausalLM(cfg).init_random(seed=seed).eval()


def _pth_name(key, flat=False, value=None):
    """HF name -> RWKV-style .pth name (the table in HXA079.md), optionally storing w0/a0/v0/k0 as [D]
    and r_k as [H*N]."""
    for old, new in [("model.embed_tokens.", "emb."), ("model.norm.", "ln_out."), ("lm_head.", "head."),
                     ("model.layers.", "blocks."), ("self_attn.", "att."), ("mlp.", "ffn."), ("gate_proj", "gate"),
                     ("up_proj", "up"), ("down_proj", "down"), ("input_layernorm", "ln1"),
                     ("post_attention_layernorm", "ln2"), ("r_norm.", "ln_r."), ("q_norm.", "ln_r."),
                     ("k_norm.", "ln_k.")]:
        key = key.replace(old, new)
    if flat and value is not None and key.rsplit(".", 1)[-1] in (*HXA079_BIASES, "r_k"):
        value = value.reshape(-1)
    return key, value


def _save_pth(model, path, flat=False):
    sd = dict(_pth_name(k, flat, v) for k, v in model.state_dict().items())
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


def _same_tensors(sd_a, sd_b):
    assert sorted(sd_a) == sorted(sd_b)
    for k in sd_a:
        a, b = sd_a[k], sd_b[k]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k


def _logits_of(model, cfg, seed=1):
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)[0]


# -----------------------------------------------------------------------------
# Round trips


@_FILE_SETTINGS
@given(gqa=st.sets(st.integers(0, 3), max_size=2), qk_norm=st.booleans(), bias=st.booleans(), tie=st.booleans(),
       flat=st.booleans(), shard_kib=st.sampled_from([None, 8, 40, 1000]))
def test_pth_to_hf_round_trip_is_exact(tmp_path_factory, gqa, qk_norm, bias, tie, flat, shard_kib):
    tmp = tmp_path_factory.mktemp("rt")
    cfg, model = _config_and_model({**TINY, "transformer_layers": sorted(gqa), "enable_qk_norm": qk_norm,
                              "attention_bias": bias, "tie_word_embeddings": tie})
    _save_pth(model, tmp / "m.pth", flat)
    if flat and not qk_norm and len(gqa) < 4:       # a flat r_k and no per-head norm: the head size must be given
        with pytest.raises(ValueError, match=r"cannot infer num_attention_heads, num_key_value_heads, head_dim"):
            load_checkpoint(tmp / "m.pth", EPS_THETA)
    got_cfg, sd = load_checkpoint(tmp / "m.pth", {**EPS_THETA, "head_dim": 12})
    assert got_cfg == cfg
    assert isinstance(sd, LazyStateDict)
    _same_tensors(dict(sd), model.state_dict())
    summary = save_checkpoint(tmp / "hf", got_cfg, sd, max_shard_bytes=shard_kib and shard_kib * 1024)
    cfg2, sd2 = load_checkpoint(tmp / "hf")
    assert cfg2 == cfg and json.loads((tmp / "hf" / "config.json").read_text()) == cfg.to_dict()
    _same_tensors(dict(sd2), model.state_dict())
    assert (len(summary["files"]) > 1) == (tmp / "hf" / "model.safetensors.index.json").exists()
    loaded = HRWKV7ForCausalLM.from_pretrained(tmp / "hf")
    assert torch.equal(_logits_of(loaded, cfg), _logits_of(model, cfg))


def test_ln_r_becomes_q_norm_in_gqa_layers_and_r_norm_in_rwkv_layers(tmp_path):
    cfg, model = _config_and_model({**TINY, "transformer_layers": [1], "enable_qk_norm": True})
    pth = _save_pth(model, tmp_path / "m.pth")
    assert "blocks.1.att.ln_r.weight" in pth and "blocks.0.att.ln_r.weight" in pth
    _, sd = load_checkpoint(tmp_path / "m.pth", EPS_THETA)
    assert torch.equal(sd["model.layers.1.self_attn.q_norm.weight"], pth["blocks.1.att.ln_r.weight"])
    assert torch.equal(sd["model.layers.0.self_attn.r_norm.weight"], pth["blocks.0.att.ln_r.weight"])
    assert torch.equal(sd["model.layers.1.self_attn.k_norm.weight"], pth["blocks.1.att.ln_k.weight"])
    assert not any("layer_architecture" in k or "head_size_record" in k for k in sd)


def test_flat_vectors_are_reshaped(tmp_path):
    cfg, model = _config_and_model(TINY)
    _save_pth(model, tmp_path / "m.pth", flat=True)
    _, sd = load_checkpoint(tmp_path / "m.pth", {**EPS_THETA, "num_attention_heads": 4})
    assert sd.ref("model.layers.0.self_attn.w0").shape == (1, 1, 48)
    assert sd["model.layers.0.self_attn.r_k"].shape == (4, 12)
    # the same in an HF file
    hf_sd = {k: (v.reshape(-1) if k.rsplit(".", 1)[-1] in (*HXA079_BIASES, "r_k") else v)
             for k, v in model.state_dict().items()}
    _save_hf(tmp_path / "hf", cfg, hf_sd)
    _, sd = load_checkpoint(tmp_path / "hf")
    _same_tensors(dict(sd), model.state_dict())


def test_sharded_layout_is_hf_format(tmp_path):
    cfg, model = _config_and_model({**TINY, "transformer_layers": [0, 3]})
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
    _same_tensors(merged, sd)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]                  # no temporary directory left


def test_dtype_cast_bf16_and_float64_loading(tmp_path):
    cfg, model = _config_and_model({**TINY, "enable_qk_norm": True, "attention_bias": True})
    _save_hf(tmp_path / "src", cfg, model.state_dict(), shards=3)
    _, sd = load_checkpoint(tmp_path / "src")
    save_checkpoint(tmp_path / "bf16", HRWKV7Config.from_dict({**cfg.to_dict(), "torch_dtype": "float32"}), sd,
                    dtype=torch.bfloat16, max_shard_bytes=50_000)
    written = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "bfloat16"   # what HF tools read, not the source's
    _, sd16 = load_checkpoint(tmp_path / "bf16")
    _same_tensors(dict(sd16), {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    m64 = HRWKV7ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.state_dict().values())
    assert all(torch.equal(p, model.state_dict()[k].to(torch.bfloat16).double()) for k, p in m64.state_dict().items())
    assert _logits_of(m64, cfg).dtype == torch.float64


def test_single_safetensors_file_config_from_arg_beside_or_shapes(tmp_path):
    cfg, model = _config_and_model({**TINY, "tie_word_embeddings": True})
    _save_hf(tmp_path / "a", cfg, model.state_dict(), write_config=False)
    f = tmp_path / "a" / "model.safetensors"
    with pytest.raises(ValueError, match=r"cannot infer rms_norm_eps, rope_theta;"):
        load_checkpoint(f)
    got, sd = load_checkpoint(f, EPS_THETA)                  # everything else from the shapes
    assert got == cfg
    got, _ = load_checkpoint(f, cfg)
    assert got == cfg
    d = {**cfg.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "my_key": [1]}
    del d["rope_theta"]                                             # as transformers >= 5 writes it
    (tmp_path / "a" / "config.json").write_text(json.dumps(d))
    got, _ = load_checkpoint(f)                                     # config.json beside it, unknown keys kept
    assert got.rope_theta == 5e5 and got.extra == {"my_key": [1]}


def test_no_rwkv_layer_needs_the_head_size(tmp_path):
    cfg, model = _config_and_model({**TINY, "transformer_layers": [0, 1, 2, 3]})
    _save_pth(model, tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"cannot infer num_attention_heads, num_key_value_heads, head_dim"):
        load_checkpoint(tmp_path / "m.pth", EPS_THETA)
    for extra in ({"num_attention_heads": 4}, {"head_dim": 12}):
        got, sd = load_checkpoint(tmp_path / "m.pth", {**EPS_THETA, **extra})
        assert (got.num_attention_heads, got.num_key_value_heads, got.head_size) == (4, 2, 12)
        _same_tensors(dict(sd), model.state_dict())


def test_cli_converts_pth_with_set_dtype_shards_and_force(tmp_path, capsys):
    cfg, model = _config_and_model(TINY)
    _save_pth(model, tmp_path / "m.pth")
    argv = [str(tmp_path / "m.pth"), str(tmp_path / "out"), "--set", "rms_norm_eps=1e-5", "--set", "rope_theta=1e4",
            "--set", "note=hello", "--dtype", "bfloat16", "--max-shard-size", "60kB"]
    summary = convert.main(argv)
    out = capsys.readouterr().out
    assert "3 RWKV + 1 GQA" in out and f"{sum(p.numel() for p in model.parameters()):,}" in out
    assert str(summary["bytes_written"]) in out.replace(",", "")
    assert summary["bytes_written"] == sum(os.path.getsize(tmp_path / "out" / f) for f in summary["files"])
    got, sd = load_checkpoint(tmp_path / "out")
    assert got.extra == {"note": "hello"} and len(summary["files"]) > 1
    _same_tensors(dict(sd), {k: v.bfloat16() for k, v in model.state_dict().items()})
    with pytest.raises(FileExistsError, match="--force"):
        convert.main(argv)
    convert.main(argv[:-4] + ["--force"])                            # float32, one file
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABS", "sub/outside.safetensors", "..", "link"])
def test_index_entry_must_be_a_bare_file_name(tmp_path, entry):
    # the rule: a bare file name of the directory; a link the directory's owner made is followed
    cfg, model = _config_and_model(TINY)
    ckpt = _save_hf(tmp_path / "ckpt", cfg, model.state_dict(), shards=2)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    moved = [k for k, f in index["weight_map"].items() if f == "model-00002-of-00002.safetensors"]
    os.rename(ckpt / "model-00002-of-00002.safetensors", tmp_path / "outside.safetensors")
    os.makedirs(ckpt / "sub")
    os.symlink(tmp_path / "outside.safetensors", ckpt / "sub" / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", ckpt / "link.safetensors")
    entry = {"ABS": str(tmp_path / "outside.safetensors"), "link": "link.safetensors"}.get(entry, entry)
    index["weight_map"].update({k: entry for k in moved})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    if entry == "link.safetensors":
        ids = torch.tensor([[1, 2, 3]])
        assert torch.equal(HRWKV7ForCausalLM.from_pretrained(ckpt)(ids)[0], model(ids)[0])
        return
    for load in (load_checkpoint, HRWKV7ForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=rf"weight_map entry '{re.escape(moved[0])}'.*not a bare file name"):
            load(ckpt)


def test_missing_unexpected_and_wrong_shape_name_the_tensor(tmp_path):
    cfg, model = _config_and_model(TINY)
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
    cfg, model = _config_and_model(TINY)
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
    cfg, model = _config_and_model(TINY)
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
    cfg, model = _config_and_model({**TINY, "transformer_layers": [2]})
    _save_pth(model, tmp_path / "m.pth")
    for override, pattern in [({"num_key_value_heads": 4}, r"num_key_value_heads=4 but the weights say 2"),
                              ({"hidden_size": 64}, r"hidden_size=64 but the weights say 48"),
                              ({"transformer_layers": [1]}, r"transformer_layers=\[1\] but the weights say \[2\]"),
                              ({"head_dim": 6}, r"head_dim=6 but the weights say 12 \(.*r_k \[4, 12\]\)"),
                              ({"num_attention_heads": 8}, r"num_attention_heads=8 but the weights say 4"),
                              ({"tie_word_embeddings": True}, r"tie_word_embeddings=True but the weights say False"),
                              ({"lora_rank_gate": 16}, r"lora_rank_gate=16 but the weights say 8")]:
        with pytest.raises(ValueError, match=pattern):
            load_checkpoint(tmp_path / "m.pth", {**EPS_THETA, **override})
    _save_hf(tmp_path / "hf", {**cfg.to_dict(), "enable_qk_norm": True}, model.state_dict())
    with pytest.raises(ValueError, match=r"enable_qk_norm=True but the weights say False"):
        load_checkpoint(tmp_path / "hf")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pth_whose_pickle_would_run_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = {"emb.weight": torch.zeros(4, 2), "blocks.0.att.r_k": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, tmp_path / "evil.pth")
    else:
        with open(tmp_path / "evil.pth", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(ValueError, match=r"evil\.pth: cannot be loaded as a weights-only torch checkpoint"):
        load_checkpoint(tmp_path / "evil.pth", EPS_THETA)
    assert not marker.exists()


def test_written_files_get_the_usual_permissions(tmp_path):
    cfg, model = _config_and_model(TINY)
    save_checkpoint(tmp_path / "out", cfg, model.state_dict(), max_shard_bytes=20_000)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path / "out"):
        assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o666 & ~umask, name
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask


def test_existing_output_is_kept_without_overwrite(tmp_path):
    cfg, model = _config_and_model(TINY)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(tmp_path / "out", cfg, model.state_dict())
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    save_checkpoint(tmp_path / "out", cfg, model.state_dict(), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failure_while_writing_leaves_nothing_half_written(tmp_path):
    cfg, model = _config_and_model(TINY)
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


def _save_teacher(path, kind, dtype=torch.bfloat16, seed=0):
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
    tc, teacher = _save_teacher(tmp_path / "teacher", kind)
    init_from_teacher(tmp_path / "teacher", tmp_path / "student", [1], seed=3, max_shard_bytes=40_000)
    cfg, sd = load_checkpoint(tmp_path / "student")
    assert (cfg.rwkv_architecture, cfg.transformer_layers, cfg.num_hidden_layers) == ("hxa079", [1], 4)
    assert cfg.attention_bias == (kind == "qwen2") and cfg.enable_qk_norm == (kind == "qwen3")
    assert cfg.tie_word_embeddings == (kind == "qwen2") and cfg.head_size == (12 if kind == "qwen3" else 8)
    assert (cfg.rms_norm_eps, cfg.rope_theta) == (1e-6, 1e6)
    assert cfg.extra["model_type"] == "hrwkv7" and cfg.extra["architectures"] == ["HRWKV7ForCausalLM"]
    assert cfg.extra["max_position_embeddings"] == 4096                # the teacher's other keys are kept
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
    assert _logits_of(student, cfg).isfinite().all()


def test_teacher_init_values_follow_the_formulas(tmp_path):
    _save_teacher(tmp_path / "teacher", "llama", dtype=torch.float32)
    init_from_teacher(tmp_path / "teacher", tmp_path / "s", [2], ranks={"lora_rank_decay": 16, "lora_rank_gate": 8},
                      qkvo_scale=(1, 1, 1, 1))
    cfg, sd = load_checkpoint(tmp_path / "s")
    _, teacher = _save_teacher(tmp_path / "again", "llama", dtype=torch.float32)
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
    tc, sd = _save_teacher(tmp_path / "t", "llama")
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

