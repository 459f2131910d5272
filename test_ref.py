"""
The equivalence proofs, headline first: the model equals the per-token definition hrwkv7_loop over
drawn configs; one prefill equals the same tokens split and token by token; every WKV form equals
the float64 loop (the kernel suite); GQA attention equals its definition; the model and the loop
reproduce the golden vectors, and each known wrong variant planted in them is caught by name;
transformers' own models as an external reference. Loading, checkpoints, convert.py, the command
lines and the installed package are test_loading.py's.

    python -m pytest -q test_ref.py                      (profile "ci": bounded examples)
    HYPOTHESIS_PROFILE=dev python -m pytest -q test_ref.py   (more examples)
    python -m pytest -q test_ref.py --wkv-impl package.module:function   (your kernel, conftest.py)
    HRWKV7_TEST_CUDA=1 python -m pytest -q test_ref.py   (the Triton kernels on a GPU, conftest.py)

The WKV kernel suite (the tests taking a `kernel` argument) runs the same properties on each of the
project's forms, or, with --wkv-impl, on any function with wkv_kernel's signature
f(r, w, k, v, a, b, S0) -> (y, S_T), e.g. fla_adapter:fla_dplr_recurrence. The properties are
plain functions (check_matches_loop, check_gradients) that take the kernel as an argument.
conftest.py sets the environment (TRITON_INTERPRET=1: the Triton kernels in Triton's CPU
interpreter) before this file imports wkv_kernel, and holds what both test files share: `rel`
(golden/check.py's max |x - ref| / max |ref|), checkpoint writers and the teachers. The tiny random
model is hrwkv7_ref.random_model. This file imports the kernel, the model and the loop; a section
that needs more (golden/, convert.py, transformers, fla-core) imports it there.

Contents (each section starts with a banner "# ===...", then "# <number>  <title>"):

1     The model equals hrwkv7_loop, the definition, over drawn configs
1.1     Drawn configs (tiny_configs, drawn_configs); the model against the loop: a prefill, a split
        with the state carried, the state itself; v_first/k_first from the first RWKV layer
1.2     The loop itself: imports torch only, leaves the state it is given alone, refuses what it
        does not compute, checks itself
2     Parallel == split == token by token: drawn configs in float64; a 4096-token prefill on the
      fast attention path in float32; the state not mutated, its dtype kept
3     The WKV kernel suite (wkv_kernel.py)
3.1     WKV inputs: Case, wkv_inputs and the hypothesis strategy `cases`
3.2     Tolerances: assert_close, the bound of each dtype and why
3.3     The properties: check_matches_loop (y, S_T, dtypes, the state left untouched, a split
        call), check_gradients (every input's gradient)
3.4     The kernels the suite runs on: the project's forms, or --wkv-impl; a refusal inside what a
        form claims (its documented dtypes, its backward) fails, any other refusal is a skip
3.5     The kernel suite: test_matches_loop, test_state_carries, test_gradients
3.6     The suite catches planted errors (wrong kernels, and a refusal inside a kernel's claims)
3.7     The definition: the naive loop on a hand-computed example, its dtypes, bad input, float32
        decay beside half inputs, against fla-core's recurrence (fla_adapter.py)
3.8     wkv7_chunked: tunables, the factored/pairwise threshold, extreme decays, empty input, the
        dispatcher; the model's logits with it, the model's float32 decay path beside bfloat16
3.9     wkv7_triton in Triton's interpreter: both paths, strong decays, decode after prefill,
        refusals, imports without triton, compiles for sm_90
3.10    wkv7_triton on a GPU only
4     GQA attention against its definition, and the other parts of the model
4.1     GQA with its cache against causal attention written with loops
4.2     causal_attention (SDPA) against causal_attention_reference, bf16 scores in float32,
        bounded masks
4.3     RoPE: known values, norm kept, relative positions; RMSNorm in float32 for half inputs;
        linear_in (compute_dtype's product) against the cast product, eager and under compile
5     The golden vectors and the named variants (golden/, imported in this section)
5.1     The golden vectors: what the loop and the model compute now, rebuilt byte for byte by
        golden/make_golden.py (--only writes what it names and nothing else); the WKV vectors
        against wkv7_naive and wkv7_chunked, as torch and as NumPy kernels
5.2     Known wrong variants (golden/variants.py), each planted in the loop or the model and caught
        by name, on the prefill logits and on the split logits
5.3     The checker's command line (golden/check.py)
6     transformers as an external reference (skipped when transformers is not installed)
6.1     NoPE equivalence: an all-GQA student against transformers with position_ids = 0
6.2     A hybrid student decodes token by token like its parallel forward
6.3     RoPE against transformers' rotary embedding
6.4     Config handling with transformers-written files (rope_parameters, refused rope types,
        sliding windows)
"""


import ast
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import runpy
import subprocess
import sys
import tempfile
import warnings
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hrwkv7_loop
import hrwkv7_ref
import wkv_kernel
from conftest import HERE, TEACHER_KINDS, WANT_CUDA, make_teacher, read_json, rel
from hrwkv7_ref import (TINY, HRWKV7Config, HRWKV7ForCausalLM, HRWKV7State, RMSNorm, apply_rope,
                        attention_transient_bytes, causal_attention, causal_attention_reference, random_model,
                        rope_cos_sin)
from wkv_kernel import (HAS_TRITON, IMPLS, TRITON_INTERPRETED, pick_impl, state_dtype, wkv7, wkv7_chunked,
                        wkv7_compiled, wkv7_naive, wkv7_triton)


# =================================================================================================
# 1  The model equals hrwkv7_loop, the definition, over drawn configs
# hrwkv7_loop.py is the whole model one token at a time in float64, written from SPEC.md apart from
# hrwkv7_ref (its own loops, RoPE, softmax attention and WKV step). The model must equal it on any
# config the strategy draws: GQA nowhere, everywhere, at layer 0 or anywhere; q/k norms, biases,
# tied heads, one KV head, head sizes that are not powers of two, both ways a config.json writes
# the RoPE base.


# =================================================================================================
# 1.1  Drawn configs, and the model against the loop


def state_tensors(per_layer) -> list:
    """The tensors of a state's per-layer list (the model's state.per_layer or the loop's
    state["per_layer"]), in order: each RWKV layer's S, each GQA layer's k and v caches."""
    return [t for s in per_layer for t in (s if isinstance(s, tuple) else (s,))]


@st.composite
def tiny_configs(draw):
    """Tiny HRWKV7Configs: GQA nowhere, everywhere, at layer 0 or anywhere; q/k norms, biases, tied
    heads, one KV head, head sizes 6 and 24 (not powers of two), hidden size H * N or not."""
    KV = draw(st.sampled_from([1, 2]))
    H = KV * draw(st.sampled_from([1, 2]))
    N = draw(st.sampled_from([4, 6, 8, 24]))      # 6, 24: not powers of two
    L = draw(st.integers(1, 4))
    layers = draw(st.sampled_from(["none", "all", "some", "first"]))
    gqa = {"none": [], "all": list(range(L)), "first": [0],
           "some": draw(st.lists(st.integers(0, L - 1), unique=True, max_size=L))}[layers]
    return HRWKV7Config.from_dict(dict(
        vocab_size=37, hidden_size=draw(st.sampled_from([8, 12, H * N])), num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, head_dim=N, intermediate_size=16, transformer_layers=gqa,
        enable_qk_norm=draw(st.booleans()), attention_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()), rope_theta=draw(st.sampled_from([10.0, 1e4, 8e6])),
        lora_rank_decay=3, lora_rank_iclr=2, lora_rank_value_residual_mix=2, lora_rank_key_residual_mix=2,
        lora_rank_gate=4))


@st.composite
def drawn_configs(draw):
    """(tiny_configs' config, its config.json dict written the ways files write it: head_dim absent
    when hidden_size = H * N, the RoPE base in rope_parameters alone or as rope_theta alone)."""
    cfg = draw(tiny_configs())
    H, N = cfg.num_attention_heads, cfg.head_size
    d = cfg.to_dict()
    if d["hidden_size"] == H * N and draw(st.booleans()):
        del d["head_dim"]
    if draw(st.booleans()):
        del d["rope_theta"]                        # the base in rope_parameters alone
    else:
        del d["rope_parameters"]
    return cfg, d


@given(cfgs=drawn_configs(), T=st.integers(2, 8), seed=st.integers(0, 2 ** 16), data=st.data())
@settings(max_examples=12, deadline=None)
def test_loop_equals_model(cfgs, T, seed, data):
    """hrwkv7_loop (the definition) == hrwkv7_ref in float64: a prefill, then a split with the state
    carried (logits and the state after it, in HRWKV7State's layout)."""
    cfg, config = cfgs
    model = random_model(cfg, seed)
    sd = model.state_dict()
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    cut = data.draw(st.integers(1, T - 1))
    with torch.no_grad():
        want, _ = model(ids)
        _, st_a = model(ids[:, :cut])
        want_b, st_b = model(ids[:, cut:], st_a)
    assert rel(hrwkv7_loop.run(config, sd, ids)[0], want) < 1e-12
    _, loop_a = hrwkv7_loop.run(config, sd, ids[:, :cut])
    got_b, loop_b = hrwkv7_loop.run(config, sd, ids[:, cut:], loop_a)
    assert rel(got_b, want_b) < 1e-12
    assert loop_b["pos"] == st_b.pos == T
    for i, (s, r) in enumerate(zip(loop_b["per_layer"], st_b.per_layer)):
        assert isinstance(s, tuple) == isinstance(r, tuple) == cfg.is_gqa(i)
    for x, y in zip(state_tensors(loop_b["per_layer"]), state_tensors(st_b.per_layer), strict=True):
        assert x.shape == y.shape and rel(x, y) < 1e-12


def oracle_logits(sd, cfg, ids):
    """float64 logits [B, T, V] of the loop (the oracle) with state dict `sd` and HRWKV7Config `cfg`
    on ids [B, T], a fresh prefill."""
    return hrwkv7_loop.run(cfg.to_dict(), sd, ids)[0]


@given(cfg=tiny_configs(), T=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
@settings(max_examples=6, deadline=None)
def test_model_matches_independent_oracle(cfg, T, seed):
    """The model's prefill logits == the loop's on a config as HRWKV7Config.to_dict writes it (1e-10:
    float64 roundings only)."""
    model = random_model(cfg, seed)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, _ = model(ids)
    want = oracle_logits(model.state_dict(), cfg, ids)
    assert rel(logits, want) < 1e-10


def test_first_rwkv_layer_is_not_layer_zero_when_layer_zero_is_gqa():
    """v_first/k_first come from the first RWKV layer, not from layer 0 when layer 0 is GQA (the
    variant first_from_layer0, section 5.2)."""
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [0, 2]})
    model = HRWKV7ForCausalLM(cfg)
    firsts = [i for i, layer in enumerate(model.model.layers) if not layer.is_gqa and layer.self_attn.is_first]
    assert firsts == [1]


# =================================================================================================
# 1.2  The loop itself: torch only, its state left alone, its refusals, its own check


def test_loop_imports_torch_and_the_standard_library_only():
    tree = ast.parse(open(os.path.join(HERE, "hrwkv7_loop.py")).read())
    top = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    names = {alias.name.split(".")[0] for n in ast.walk(ast.Module(top, [])) if isinstance(n, ast.Import)
             for alias in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(ast.Module(top, [])) if isinstance(n, ast.ImportFrom)}
    assert names <= {"torch", "math"}, names


def test_loop_never_changes_the_state_it_is_given():
    """run() from a state (GQA at layers 0 and 2 with q/k norms and biases: caches and WKV states)
    leaves that state's tensors as they were."""
    model = random_model({**TINY, "transformer_layers": [0, 2], "enable_qk_norm": True, "attention_bias": True},
                         seed=2)
    config, sd = model.config.to_dict(), model.state_dict()
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    _, state = hrwkv7_loop.run(config, sd, ids[:, :3])
    before = [t.clone() for t in state_tensors(state["per_layer"])]
    hrwkv7_loop.run(config, sd, ids[:, 3:5], state)
    after = state_tensors(state["per_layer"])
    assert len(before) == len(after) == 6 and all(torch.equal(b, a) for b, a in zip(before, after))


def test_loop_refuses_what_it_does_not_compute():
    config = {**HRWKV7Config.from_dict(TINY).to_dict(), "rope_theta": None}
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        hrwkv7_loop.run({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 8e6}}, {},
                        torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"integer tensor \[B, T\]"):
        hrwkv7_loop.run(config, {}, torch.zeros(1, 2))


def test_loop_main_checks_itself(capsys):
    runpy.run_path(os.path.join(HERE, "hrwkv7_loop.py"), run_name="__main__")
    assert "hrwkv7_loop vs hrwkv7_ref" in capsys.readouterr().out


# =================================================================================================
# 2  Parallel == split == token by token
# One prefill, the same tokens in pieces with the state carried, and one token at a time give the
# same logits and the same state (float64 to 1e-10; float32 on the fast attention path to 1e-5).


@given(cfg=tiny_configs(), T=st.integers(2, 20), data=st.data())
def test_parallel_equals_split_equals_stepwise(cfg, T, data):
    model = random_model(cfg, data.draw(st.integers(0, 2 ** 16)))
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
    assert rel(torch.cat(parts, 1), full) < 1e-10
    assert rel(torch.cat(steps, 1), full) < 1e-10
    assert state.pos == st_step.pos == st_full.pos == T
    for a, b in zip(state_tensors(st_full.per_layer), state_tensors(state.per_layer), strict=True):
        assert a.shape == b.shape and rel(b, a) < 1e-10


def test_model_4096_whole_equals_split_equals_token_by_token(monkeypatch):
    """On the fast path, float32: a 4096-token prefill == 3000 tokens (fresh prefill: is_causal) +
    1088 (after a cache: the blocked path, 1088 queries over 4088 keys in 2 blocks) + 8 tokens one
    at a time (decode: no mask), the state carried; logits to 1e-5 relative, the caches too."""
    sdpa, calls = F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], k.shape[2], attn_mask is not None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = random_model(HRWKV7Config.from_dict(TINY)).float()
    ids = torch.randint(0, model.config.vocab_size, (1, 4096), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, state = model(ids)
        a, st = model(ids[:, :3000])
        b, st = model(ids[:, 3000:4088], st)
        steps = []
        for t in range(4088, 4096):
            lg, st = model(ids[:, t:t + 1], st)
            steps.append(lg)
    assert calls == [(4096, 4096, False, True), (3000, 3000, False, True), (1026, 4026, True, False),
                     (62, 4088, True, False)] + [(1, n, False, False) for n in range(4089, 4097)]
    assert rel(torch.cat([a, b] + steps, dim=1), whole) < 1e-5
    assert st.pos == state.pos == 4096
    for x, y in zip(state_tensors(st.per_layer), state_tensors(state.per_layer), strict=True):
        assert x.shape == y.shape and rel(x, y) < 1e-5


def test_compiled_decode_equals_eager():
    """compile_decode (torch.compile of the one-token call, dynamic shapes): after an eager prefill,
    8 decode steps (the GQA cache grows at each) give the eager logits and states, float32 to 1e-5."""
    model = random_model(TINY, seed=3, dtype=torch.float32)
    compiled = random_model(TINY, seed=3, dtype=torch.float32).compile_decode()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    frames = torch._dynamo.utils.counters["stats"]["calls_captured"]
    with torch.no_grad():
        _, s_eager = model(ids[:, :4])
        s_comp = s_eager
        for t in range(4, 12):
            want, s_eager = model(ids[:, t:t + 1], s_eager)
            got, s_comp = compiled(ids[:, t:t + 1], s_comp)
            assert rel(got, want) < 1e-5 and s_comp.pos == s_eager.pos == t + 1
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] > frames     # dynamo traced the steps
    for x, y in zip(state_tensors(s_comp.per_layer), state_tensors(s_eager.per_layer), strict=True):
        assert x.shape == y.shape and rel(x, y) < 1e-5


def test_state_is_not_mutated_and_dtype_is_kept():
    cfg = HRWKV7Config.from_dict(TINY)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    _, state = model(ids)
    before = [t.clone() for t in state_tensors(state.per_layer)]
    model(ids, state)
    model(ids[:, :1], state)
    for x, y in zip(state_tensors(state.per_layer), before, strict=True):
        assert torch.equal(x, y)
    assert all((s.dtype if torch.is_tensor(s) else s[0].dtype) == torch.float64 for s in state.per_layer)


# =================================================================================================
# 3  The WKV kernel suite: every form of wkv_kernel.py against the float64 loop
# The WKV kernel suite runs the same properties on each form, or with --wkv-impl on any function
# with wkv_kernel's signature (conftest.py); then the definition, wkv7_chunked and wkv7_triton on
# what the suite does not reach.


HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if WANT_CUDA and HAS_CUDA else "cpu"
NAMES = ("r", "w", "k", "v", "a", "b", "S0")


# =================================================================================================
# 3.1  WKV inputs: one generator, and the strategy that draws its cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One set of WKV inputs; wkv_inputs(case) makes the tensors.

    decay: "hxa079"  w = -exp(-0.5 - softplus(z)): the model's range [-e^-0.5, 0) = [-0.61, 0)
           "wide"    |w| log-uniform in [1e-3, 30]: from almost no decay to e^-30 per token
           "strong"  w uniform in [-30, 0]
           "mixed"   hxa079, except a burst of 8 tokens of w uniform in [-30, 0]
    ab:    "model"   a = -kk, b = kk * iclr, kk unit-norm and iclr in (0, 1), as hxa079 calls it
           "free"    a, b uniform in [-1, 1] / sqrt(K), unrelated to each other and to k
    """
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: torch.dtype
    decay: str = "hxa079"
    ab: str = "model"
    with_state: bool = True
    seed: int = 0


DECAYS = ("hxa079", "wide", "strong", "mixed")
HEAD_SIZES = (2, 8, 16, 24, 64, 96)


def wkv_inputs(case: Case):
    """[r, w, k, v, a, b] ([B, T, H, K], v [B, T, H, V]) in case.dtype, and S_0 [B, H, K, V] in the
    state dtype (or None). Drawn in float64, then rounded."""
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    g = torch.Generator().manual_seed(case.seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    uni = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    if case.decay in ("hxa079", "mixed"):
        w = -torch.exp(-0.5 - F.softplus(rnd(B, T, H, K)))
        if case.decay == "mixed":
            t0 = int(torch.randint(0, T, (1,), generator=g))
            w[:, t0:t0 + 8] = -30 * uni(B, T, H, K)[:, t0:t0 + 8]
    elif case.decay == "wide":
        w = -torch.exp(math.log(1e-3) + math.log(30 / 1e-3) * uni(B, T, H, K))
    elif case.decay == "strong":
        w = -30 * uni(B, T, H, K)
    else:
        raise ValueError(f"unknown decay {case.decay!r}")
    if case.ab == "model":
        kk = F.normalize(rnd(B, T, H, K), dim=-1)
        a, b = -kk, kk * torch.sigmoid(rnd(B, T, H, K))
    else:
        a, b = (2 * uni(B, T, H, K) - 1) * K ** -0.5, (2 * uni(B, T, H, K) - 1) * K ** -0.5
    S0 = rnd(B, H, K, V).to(state_dtype(case.dtype)) if case.with_state else None
    return [x.to(case.dtype) for x in (r, w, k, v, a, b)], S0


@st.composite
def cases(draw, dtypes, head_sizes=HEAD_SIZES, T=(1, 100), B=(1, 2), H=(1, 3), decays=DECAYS, T_max=None):
    """Cases with T drawn (mostly not a multiple of any chunk size), K and V from head_sizes (V
    often != K), every decay and both a/b kinds, with or without an initial state. Cases with a
    head size over 24 are kept short (T * B * H <= 120) so that the suite stays fast; T_max, when
    given, caps T below T's upper end."""
    K = draw(st.sampled_from(head_sizes))
    V = draw(st.sampled_from(head_sizes)) if draw(st.booleans()) else K
    B_, H_ = draw(st.integers(*B)), draw(st.integers(*H))
    T_hi = min(T[1], T_max or T[1])
    T_hi = T_hi if max(K, V) <= 24 else max(T[0], min(T_hi, 120 // (B_ * H_)))
    return Case(B_, draw(st.integers(T[0], T_hi)), H_, K, V, dtype=draw(st.sampled_from(dtypes)),
                decay=draw(st.sampled_from(decays)), ab=draw(st.sampled_from(("model", "free"))),
                with_state=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)))


# =================================================================================================
# 3.2  Tolerances: one helper, assert_close
# An output is compared with the float64 loop run on the very same (rounded) inputs, so only the
# arithmetic and the output's own rounding count:
#     |got - ref| <= rtol * |ref| + atol * max|ref|      elementwise
# (the atol term covers entries near 0 whose error comes from O(max) terms that cancelled).
#  - float64: a few hundred roundings of 1.1e-16, amplified by the O(1) condition of the triangular
#    solve and the state products: ~1e-13 observed; 1e-10 leaves room and still fails any slip.
#  - float32: the same in float32 (eps 6e-8), plus the chunked form's exp(g) of a running sum g
#    (relative error ~|g| eps <= 2.4e-6 at BT = 64, wkv7_chunked step 5): ~3e-6 of max|ref| observed.
#  - bfloat16 / float16 outputs: computed in float32 (the atol term above), then rounded to nearest
#    in the output dtype: at most half an ulp, 2^-8 (bf16, 8 significant bits) / 2^-11 (fp16, 11
#    bits) of |y|. A truncating conversion, up to a whole ulp, fails this. The state comes back in
#    float32 and takes the float32 tolerance.
# Gradients take the tolerance of their dtype too.


TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5),
              torch.bfloat16: (2 ** -8, 1e-5), torch.float16: (2 ** -11, 1e-5)}


def assert_close(got, ref, what, scale=None):
    """got (any dtype) against the float64 ref, with the tolerance of got's dtype; `scale` is the
    magnitude the atol term is relative to (default max|ref|)."""
    rtol, atol = TOLERANCES[got.dtype]
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs()
    scale = ref.abs().max() if scale is None else scale
    bound = rtol * ref.abs() + atol * scale
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: |err| {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
                                  f"(ref {ref.flatten()[worst]:.3g}, scale {scale:.3g}, "
                                  f"max|err| / scale = {err.max() / scale:.2g})")


# =================================================================================================
# 3.3  The properties: plain functions of a kernel f(r, w, k, v, a, b, S0) -> (y, S_T) and inputs


def check_matches_loop(f, xs, S0, split=None):
    """f's y and S_T against the float64 loop on the same inputs: output dtypes (y in the inputs'
    dtype, S_T float32, float64 for float64 inputs), shapes, values; the state it was given is
    left untouched. With split = t, f runs tokens [0, t) and then [t, T) from the state it
    returned: that state must continue the sequence."""
    dtype = xs[0].dtype
    y_ref, S_ref = wkv7_naive(*(x.double() for x in xs), None if S0 is None else S0.double())
    S0_before = None if S0 is None else S0.clone()
    if split is None:
        y, S = f(*xs, S0)
    else:
        y1, S1 = f(*(x[:, :split] for x in xs), S0)
        y2, S = f(*(x[:, split:] for x in xs), S1)
        y = torch.cat([y1, y2], 1)
    assert y.dtype == dtype, f"y has dtype {y.dtype}, expected the inputs' {dtype}"
    assert S.dtype == state_dtype(dtype), f"S_T has dtype {S.dtype}, expected {state_dtype(dtype)}"
    assert y.shape == y_ref.shape and S.shape == S_ref.shape, (f"shapes y {tuple(y.shape)}, S_T {tuple(S.shape)}; "
                                                               f"expected {tuple(y_ref.shape)}, {tuple(S_ref.shape)}")
    assert_close(y.cpu(), y_ref, "y")
    assert_close(S.cpu(), S_ref, "S_T")
    assert S0 is None or torch.equal(S0, S0_before), "the kernel wrote into the state it was given"


def check_gradients(f, xs, S0, seed=0):
    """The gradients of a random projection of (y, S_T) with respect to all inputs (the initial
    state too, when there is one) against the float64 loop's."""
    g = torch.Generator().manual_seed(seed)
    B, T, H, K = xs[0].shape
    V = xs[3].shape[-1]
    proj_y = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    proj_S = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)

    def grads(fn, inputs):
        leaves = [x.detach().clone().requires_grad_() for x in inputs if x is not None]
        y, S = fn(*leaves[:6], leaves[6] if len(leaves) == 7 else None)
        loss = (y.cpu().double() * proj_y).sum() + (S.cpu().double() * proj_S).sum()
        return torch.autograd.grad(loss, leaves, allow_unused=True)

    got = grads(f, [*xs, S0])
    want = grads(wkv7_naive, [x.double() for x in xs] + [None if S0 is None else S0.double()])
    # a gradient that is 0 in exact arithmetic (e.g. d/dw with a zero state) is, in floating point, a
    # sum of terms the size of the other gradients that cancel: the atol term is relative to those
    scale = max(g_want.abs().max() for g_want in want)
    for name, g_got, g_want in zip(NAMES, got, want):
        assert g_got is not None, f"d loss / d {name}: no gradient (the output does not depend on {name})"
        assert_close(g_got.cpu(), g_want, f"d loss / d {name}", scale=scale)


# =================================================================================================
# 3.4  The kernels the suite runs on: the project's forms, or --wkv-impl package.module:function


ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(eq=False)
class Kernel:
    """A kernel for the suite: f(r, w, k, v, a, b, S0) -> (y, S_T) on CPU tensors, its budget and
    what it claims to support.

    examples  the share of the profile's examples each property draws for it
    dtypes    the dtypes the suite tries
    grads     whether the suite tries gradients
    min_T     the shortest sequence one call gets (also each part in test_state_carries)
    shapes    keyword arguments of `cases` but T: the shapes, decays, ... to draw
    claims    the dtypes the kernel documents that it computes in, and claims_grads whether it
              documents a backward. A kernel that refuses a dtype (raises on a tiny input of its
              shapes), or gradients (raises under autograd or returns outputs without a graph),
              fails the test when the refusal is inside its claims and is skipped outside them:
              the project's own forms claim what their docstrings say, a --wkv-impl kernel
              claims nothing (a refusal there is a limitation of someone else's kernel)."""
    name: str
    fn: Callable
    examples: float = 1.0
    dtypes: tuple = ALL_DTYPES
    grads: bool = True
    min_T: int = 1
    shapes: dict = dataclasses.field(default_factory=dict)
    claims: tuple = ()
    claims_grads: bool = False


def on_device(f, device):
    """f run on `device`, inputs and outputs on the CPU (autograd passes through the copies)."""
    if device == "cpu":
        return f

    def run(*xs):
        y, S = f(*(None if x is None else x.to(device) for x in xs))
        return y.cpu(), S.cpu()
    return run


# wkv7_triton runs where triton is installed and either its interpreter is on (TRITON_INTERPRET=1,
# conftest.py) or the tests run on a GPU; elsewhere it claims nothing, and its refusal is a skip
TRITON_RUNS = HAS_TRITON and (TRITON_INTERPRETED or DEVICE == "cuda")


@functools.cache
def own_kernels():
    return (
        # naive and chunked: every floating dtype, differentiable
        Kernel("chunked", wkv7_chunked, claims=ALL_DTYPES, claims_grads=True),
        # float32, bfloat16, float16 (float64 raises), forward only (a graph wanted raises);
        # the interpreter runs the programs one after the other: shorter sequences (still over two chunks)
        Kernel("triton", on_device(wkv7_triton, DEVICE), examples=0.5, shapes=dict(H=(1, 2), T_max=40),
               claims=(torch.float32, torch.bfloat16, torch.float16) if TRITON_RUNS else ()),
        # each new case class compiles anew, 20-50 s on a 2-core CPU: a new dtype or head size, one chunk
        # (n = 1) or several, B * H = 1 or more, sizes equal or not (n == B * H), and, after the graph
        # break, a strongly decaying chunk or not. So: float32, head size 24, 2 to 7 chunks of 16,
        # B * H = 8, the model's decays (the strong-decay branch is wkv7_chunked's own code after the
        # break, tested there). One compile.
        # wkv7_chunked compiled: its claims, but only float32 forward is in the budget
        Kernel("compiled", functools.partial(wkv7_compiled, chunk_size=16), examples=0.3, dtypes=(torch.float32,),
               grads=False, min_T=17, shapes=dict(head_sizes=(24,), B=(2, 2), H=(4, 4), decays=("hxa079",)),
               claims=ALL_DTYPES, claims_grads=True),
    )


@functools.cache
def foreign_kernel(spec: str):
    """'package.module:function' -> Kernel."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise pytest.UsageError(f"--wkv-impl takes package.module:function, got {spec!r}")
    return Kernel(spec, getattr(importlib.import_module(module), name))


def pytest_generate_tests(metafunc):
    if "kernel" in metafunc.fixturenames:
        spec = metafunc.config.getoption("--wkv-impl", default=None)
        kernels = (foreign_kernel(spec),) if spec else own_kernels()
        metafunc.parametrize("kernel", kernels, ids=[k.name for k in kernels])


@functools.cache
def refusal(kernel: Kernel, dtype, grad=False):
    """Why the kernel cannot be tested in dtype (with gradients): the error it raises on a tiny
    input, or None when it runs."""
    sh = {"head_sizes": HEAD_SIZES, "B": (1,), "H": (1,), **kernel.shapes}   # its smallest case
    xs, S0 = wkv_inputs(Case(sh["B"][0], max(3, kernel.min_T), sh["H"][0], sh["head_sizes"][0], sh["head_sizes"][0],
                             dtype))
    if grad:
        xs, S0 = [x.requires_grad_() for x in xs], S0.requires_grad_()
    try:
        y, S = kernel.fn(*xs, S0)
        if grad and not (y.requires_grad or S.requires_grad):
            return "it returns outputs without an autograd graph"
        if grad:
            torch.autograd.grad(y.double().sum() + S.double().sum(), [*xs, S0], allow_unused=True)
    except Exception as e:
        return f"it raises {type(e).__name__}: {e}"
    return None


def skip_unless_runs(kernel, dtype, grad=False):
    """Skip what the kernel's budget leaves out and what it refuses outside its claims; fail on a
    refusal inside its claims."""
    if dtype not in kernel.dtypes:
        pytest.skip(f"{kernel.name}: {dtype} is not in its test budget")
    if grad and not kernel.grads:
        pytest.skip(f"{kernel.name}: gradients are not in its test budget")
    why = refusal(kernel, dtype, grad)
    if why is None:
        return
    what = f"{kernel.name} refuses {dtype}{' with gradients' if grad else ''}: {why}"
    if dtype in kernel.claims and (kernel.claims_grads or not grad):
        pytest.fail(f"{what}, inside what it claims to support")
    pytest.skip(what)


def budget(kernel, examples):
    """Hypothesis settings for `examples` examples (profile "ci") scaled by the kernel's share."""
    n = max(1, round(examples * kernel.examples * settings.default.max_examples / 10))
    return settings(max_examples=n, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# =================================================================================================
# 3.5  The kernel suite: every form against the float64 loop


# dtype: examples per kernel (profile "ci"); the low-precision dtypes differ only in y's final rounding
SUITE_DTYPES = {torch.float64: 10, torch.float32: 10, torch.bfloat16: 4, torch.float16: 3}


@pytest.mark.parametrize("dtype", SUITE_DTYPES, ids=str)
def test_matches_loop(kernel, dtype):
    """y and S_T equal the float64 loop's, for any decay from none to w = -30, any length, head
    sizes 2 to 96, with and without an initial state."""
    skip_unless_runs(kernel, dtype)

    @budget(kernel, SUITE_DTYPES[dtype])
    @given(case=cases((dtype,), T=(kernel.min_T, 100), **kernel.shapes))
    def run(case):
        check_matches_loop(kernel.fn, *wkv_inputs(case))
    run()


def test_state_carries(kernel):
    """Two calls, the second from the state the first returned, equal one call."""
    runs_f64 = torch.float64 in kernel.dtypes and (torch.float64 in kernel.claims or refusal(kernel, torch.float64) is None)
    dtype = torch.float64 if runs_f64 else torch.float32
    skip_unless_runs(kernel, dtype)

    @budget(kernel, 5)
    @given(case=cases((dtype,), T=(2 * kernel.min_T, 100), **kernel.shapes), at=st.floats(0, 1))
    def run(case, at):
        check_matches_loop(kernel.fn, *wkv_inputs(case), split=kernel.min_T + round(at * (case.T - 2 * kernel.min_T)))
    run()


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_gradients(kernel, dtype):
    """Gradients with respect to every input equal the float64 loop's."""
    skip_unless_runs(kernel, dtype, grad=True)

    @budget(kernel, 6)
    @given(case=cases((dtype,), **{"head_sizes": (2, 8, 24), "T": (kernel.min_T, 40), "H": (1, 2), **kernel.shapes}))
    def run(case):
        check_gradients(kernel.fn, *wkv_inputs(case), seed=case.seed + 1)
    run()


# =================================================================================================
# 3.6  The suite catches planted errors: each property fails on a kernel with a planted error, and
# the gate fails on a refusal inside a kernel's claims


def decay_after_write(r, w, k, v, a, b, S0=None):
    """wkv7_naive with a planted error: the decay applied after the write,
    S_t = diag(exp(w_t)) (S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T)."""
    sd = state_dtype(r.dtype)
    B, T, H, K = r.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=sd) if S0 is None else S0.clone()
    ys = []
    for t in range(T):
        r_t, w_t, k_t, v_t, a_t, b_t = (x[:, t].to(sd) for x in (r, w, k, v, a, b))
        aS = torch.einsum("bhk,bhkv->bhv", a_t, S)
        S = torch.exp(w_t)[..., None] * (S + b_t[..., None] * aS[..., None, :] + k_t[..., None] * v_t[..., None, :])
        ys.append(torch.einsum("bhk,bhkv->bhv", r_t, S))
    return torch.stack(ys, 1).to(r.dtype), S


def truncated_to_bf16(y):
    """float32 -> bfloat16 by dropping the low 16 bits (rounding toward zero)."""
    return (y.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


PLANTED = {   # name: (kernel, case on which it must fail, property)
    "decay after the write": (decay_after_write, Case(1, 20, 2, 8, 8, torch.float64), check_matches_loop),
    "initial state ignored": (lambda *x: wkv7_naive(*x[:6]), Case(1, 20, 2, 8, 8, torch.float64), check_matches_loop),
    "decay clamped at -5": (lambda r, w, *x: wkv7_naive(r, w.clamp(min=-5), *x),
                            Case(1, 20, 2, 8, 8, torch.float32, decay="strong"), check_matches_loop),
    "y truncated to bf16": (lambda *x: (truncated_to_bf16(wkv7_chunked(*(t.float() for t in x[:6]), x[6])[0]),
                                        wkv7_chunked(*x)[1]),
                            Case(1, 20, 2, 24, 24, torch.bfloat16), check_matches_loop),
    "state overwritten": (lambda *x: (wkv7_chunked(*x), x[6].zero_())[0], Case(1, 5, 1, 8, 8, torch.float64),
                          check_matches_loop),
    "half the decay's gradient": (lambda r, w, *x: wkv7_chunked(r, 0.5 * w + 0.5 * w.detach(), *x),
                                  Case(1, 12, 1, 8, 8, torch.float64), check_gradients),
    "no gradient to the state": (lambda *x: wkv7_chunked(*x[:6], x[6].detach()), Case(1, 12, 1, 8, 8, torch.float64),
                                 check_gradients),
}


@pytest.mark.parametrize("planted", PLANTED)
def test_properties_catch_a_planted_error(planted):
    """Each property fails on a kernel with a planted error, on a case that wkv7_chunked passes."""
    f, case, prop = PLANTED[planted]
    prop(wkv7_chunked, *wkv_inputs(case))
    with pytest.raises(AssertionError):
        prop(f, *wkv_inputs(case))


def refuses_float16(r, w, k, v, a, b, S0=None):
    """wkv7_chunked, except that it raises on float16 inputs."""
    if r.dtype == torch.float16:
        raise ValueError("refuses_float16: no float16")
    return wkv7_chunked(r, w, k, v, a, b, S0)


def test_a_refusal_inside_the_claims_fails_and_outside_them_skips():
    """The suite's gate: a kernel claiming float16 that raises on it fails; the same kernel claiming
    nothing (as a --wkv-impl kernel does) is skipped; a kernel claiming a backward that returns no
    graph fails with gradients. The project's forms claim what their docstrings say."""
    claimed = Kernel("claims every dtype", refuses_float16, claims=ALL_DTYPES, claims_grads=True)
    with pytest.raises(pytest.fail.Exception, match="refuses torch.float16.*inside what it claims"):
        skip_unless_runs(claimed, torch.float16)
    with pytest.raises(pytest.skip.Exception, match="refuses torch.float16"):
        skip_unless_runs(Kernel("claims nothing", refuses_float16), torch.float16)
    skip_unless_runs(claimed, torch.float32)                             # runs: neither skipped nor failed
    no_graph = Kernel("no backward", lambda *x: tuple(t.detach() for t in wkv7_chunked(*x)), claims=ALL_DTYPES,
                      claims_grads=True)
    with pytest.raises(pytest.fail.Exception, match="with gradients: it returns outputs without an autograd graph"):
        skip_unless_runs(no_graph, torch.float64, grad=True)
    own = {k.name: k for k in own_kernels()}
    assert own["chunked"].claims == own["compiled"].claims == ALL_DTYPES
    assert own["chunked"].claims_grads and own["compiled"].claims_grads and not own["triton"].claims_grads
    assert torch.float64 not in own["triton"].claims


# =================================================================================================
# 3.7  The definition: the naive loop (a hand-computed example, dtypes, bad input, fla-core's recurrence)


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


def test_wkv_bad_inputs():
    x = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="k has shape"):
        wkv7(x, x, x[:, :2], x, x, x)
    with pytest.raises(ValueError, match="S0 has shape"):
        wkv7(x, x, x, x, x, x, torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="S0 has dtype"):
        wkv7(x, x, x, x, x, x, torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown impl"):
        wkv7(x, x, x, x, x, x, impl="fast")


@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
def test_float32_log_decay_beside_half_inputs(impl):
    # the model passes w in float32 beside bf16/fp16 r, k, v, a, b (one bf16 rounding of the
    # pre-decay w_pre near -5 moves w by ~1.6%): each form takes it and matches the float64 loop
    # on those inputs
    if impl == "triton" and not TRITON_RUNS:
        pytest.skip("needs triton (its interpreter, or CUDA)")
    for dtype in (torch.bfloat16, torch.float16):
        case = Case(B=2, T=37, H=2, K=24, V=24, dtype=torch.float32, decay="wide", seed=3)
        xs, S0 = wkv_inputs(case)
        xs = [x if i == 1 else x.to(dtype) for i, x in enumerate(xs)]   # w stays float32
        xs, S0 = [x.to(DEVICE) for x in xs], S0.to(DEVICE)
        y, S = IMPLS[impl](*xs, S0)
        y_ref, S_ref = wkv7_naive(*(x.double() for x in xs), S0.double())
        assert y.dtype == dtype and S.dtype == torch.float32
        assert_close(y, y_ref, f"{impl} {dtype} y")
        assert_close(S, S_ref, f"{impl} {dtype} S_T")
    with pytest.raises(ValueError, match="w may be float32"):
        wkv7_naive(*(x.double() if i == 1 else x for i, x in enumerate(xs)), S0)   # only float32 is let in


@pytest.mark.parametrize("decay", ["hxa079", "strong"])
def test_naive_matches_fla_dplr_recurrence(decay):
    """The definition against an independent implementation, fla-core's dplr_recurrence (float32),
    through fla_adapter.py."""
    from fla_adapter import fla_dplr_recurrence, load_fla_dplr_naive
    if load_fla_dplr_naive() is None:
        pytest.skip("fla-core is not installed")
    check_matches_loop(fla_dplr_recurrence, *wkv_inputs(Case(2, 40, 3, 16, 16, torch.float32, decay, seed=21)))


# =================================================================================================
# 3.8  wkv7_chunked: its tunables, the factored/pairwise threshold, edge cases, the dispatcher, the
# model's calls


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases((torch.float64, torch.float32)), chunk_size=st.sampled_from([1, 4, 16, 32]),
       max_factored_span=st.sampled_from([None, 0.0, 5.0]), segment_elements=st.sampled_from([1, 3000, 2 ** 17]))
def test_chunked_tunables_match_loop(case, chunk_size, max_factored_span, segment_elements):
    """Any chunk size; max_factored_span 0 (every chunk pairwise) or 5 (both paths in one call, also
    at the model's decays); segments of one chunk, a few, or all."""
    f = functools.partial(wkv7_chunked, chunk_size=chunk_size, max_factored_span=max_factored_span,
                          segment_elements=segment_elements)
    check_matches_loop(f, *wkv_inputs(case))


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases((torch.float64,), head_sizes=(2, 8), T=(1, 40), H=(1, 2)), chunk_size=st.sampled_from([4, 8, 16]),
       max_factored_span=st.sampled_from([None, 0.0, 5.0]), segment_elements=st.sampled_from([1, 2 ** 17]))
def test_chunked_tunables_gradients(case, chunk_size, max_factored_span, segment_elements):
    f = functools.partial(wkv7_chunked, chunk_size=chunk_size, max_factored_span=max_factored_span,
                          segment_elements=segment_elements)
    check_gradients(f, *wkv_inputs(case), seed=case.seed + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("span_factor", [0.99, 1.01])
def test_chunked_at_the_factored_span_threshold(dtype, span_factor):
    """The second chunk decays by just under the default threshold (the largest factors the factored
    product ever sees) or just over it (the pairwise path, next to a factored first chunk)."""
    BT = 16
    xs, S0 = wkv_inputs(Case(1, 2 * BT, 2, 24, 24, dtype, seed=7))
    span = span_factor * (60.0 if dtype == torch.float32 else 600.0)
    xs[1][:, BT:, :, 0] = -span / BT                   # channel 0 of the second chunk decays by `span`
    check_matches_loop(functools.partial(wkv7_chunked, chunk_size=BT), xs, S0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_chunked_extreme_decay_values_and_gradients(dtype):
    """w = -30 from token 64 on: those 64-token chunks decay by e^-1920, far below any float (the
    state keeps only the last token's write and the a/b correction), next to a first chunk at
    the model's decays. Values and gradients finite and equal to the loop's."""
    xs, S0 = wkv_inputs(Case(1, 150, 2, 16, 16, dtype, seed=3))
    xs[1][:, 64:] = -30.0
    check_matches_loop(wkv7_chunked, xs, S0)
    check_gradients(wkv7_chunked, xs, S0, seed=4)


@pytest.mark.parametrize("seed", range(3))
def test_chunked_float32_strong_decay_is_as_accurate_as_the_loop(seed):
    """In float32 at w in [-30, 0] the float32 loop is off by ~1e-7 (of max|y|) from the float64
    loop, and the chunked form must stay within a small factor of that, in y and in S_T: taking the
    decays to the chunk end, g_end - g_s, as a difference of two running sums (~ -1000 there) instead
    of summing them over their own segment costs ~100x in S_T (step 5), which the float32
    tolerance of check_matches_loop (1e-5 of max|S|) would let through."""
    xs, S0 = wkv_inputs(Case(1, 128, 2, 16, 16, torch.float32, "strong", seed=seed))
    y64, S64 = wkv7_naive(*(x.double() for x in xs), S0.double())
    err = lambda x, ref: ((x.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    (y_loop, S_loop), (y, S) = wkv7_naive(*xs, S0), wkv7_chunked(*xs, S0)
    assert err(y, y64) <= 4 * err(y_loop, y64) and err(S, S64) <= 4 * err(S_loop, S64)


def test_chunked_empty_sequence_and_bad_tunables():
    xs, S0 = wkv_inputs(Case(1, 5, 2, 8, 8, torch.float64))
    y, S = wkv7_chunked(*(x[:, :0] for x in xs), S0)
    assert y.shape == (1, 0, 2, 8) and torch.equal(S, S0) and S is not S0
    for bad in (dict(chunk_size=0), dict(max_factored_span=-1.0), dict(segment_elements=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            wkv7_chunked(*xs, S0, **bad)


def test_dispatcher_runs_chunked():
    assert IMPLS["chunked"] is wkv7_chunked
    xs, S0 = wkv_inputs(Case(2, 50, 3, 16, 16, torch.float64, seed=5))
    y_c, S_c = wkv7(*xs, S0, impl="chunked")
    check_matches_loop(functools.partial(wkv7, impl="chunked"), xs, S0)
    assert pick_impl(xs[0]) == "chunked" and pick_impl(xs[0][:, :1]) == "naive"
    y_a, S_a = wkv7(*xs, S0)
    assert torch.equal(y_a, y_c) and torch.equal(S_a, S_c)


def test_model_logits_with_chunked_equal_naive():
    model = random_model({**TINY, "transformer_layers": [0]}, seed=5)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.wkv_impl = "naive"
        want, st_want = model(ids)
        model.wkv_impl = "chunked"
        got, st_got = model(ids)
    assert_close(got, want, "logits")
    for i, (S_got, S_want) in enumerate(zip(st_got.per_layer[1:], st_want.per_layer[1:])):
        assert_close(S_got, S_want, f"state of layer {i + 1}")


def test_bfloat16_model_computes_its_decay_path_in_float32(monkeypatch):
    """A bfloat16 model hands its WKV kernel the log decay w in float32 beside bfloat16 r, k, v, a, b."""
    seen = []

    def spy(r, w, *rest, **kw):
        seen.append((r.dtype, w.dtype))
        return wkv7(r, w, *rest, **kw)
    monkeypatch.setattr(hrwkv7_ref, "wkv7", spy)
    model = random_model(HRWKV7Config.from_dict(TINY)).bfloat16()
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3, 4]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert seen and set(seen) == {(torch.bfloat16, torch.float32)}


# =================================================================================================
# 3.9  wkv7_triton: what the suite does not reach (its paths, tunables and refusals), in Triton's
# interpreter on a CPU (HRWKV7_TEST_CUDA=1: on the GPU)


needs_triton = pytest.mark.skipif(not HAS_TRITON or not (WANT_CUDA or TRITON_INTERPRETED),
                                  reason="needs triton, and TRITON_INTERPRET=1 (CPU) or HRWKV7_TEST_CUDA=1 (GPU)")
needs_cuda = pytest.mark.skipif(not (WANT_CUDA and HAS_CUDA),
                                reason="GPU test: set HRWKV7_TEST_CUDA=1 on a CUDA machine")
TRITON = inspect.signature(wkv7_triton).parameters       # its tunables' defaults: TRITON["chunk_size"].default
triton_on_device = on_device(wkv7_triton, DEVICE)


@needs_triton
@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases((torch.float32,), head_sizes=(24, 64, 96), T=(1, 40)), path=st.sampled_from(["chunked", "recurrent"]),
       chunk_size=st.sampled_from([16, 32]))
def test_triton_paths(case, path, chunk_size):
    """Either kernel at any length (the chunked one also for T < BT), chunks of 16 or 32."""
    check_matches_loop(functools.partial(triton_on_device, path=path, chunk_size=chunk_size), *wkv_inputs(case))


@needs_triton
@pytest.mark.parametrize("w_case", ["edge_factored", "edge_pairwise", "mixed_chunks", "hard_reset"])
def test_triton_strong_decay_is_exact(w_case):
    """A chunk whose span max_k(-g_end) is over max_factored_span takes the pairwise branch; at w = -30
    per step a chunk spans 480, where the factored split would need exp(480): inf, then NaN."""
    BT, edge_w = TRITON["chunk_size"].default, -TRITON["max_factored_span"].default / TRITON["chunk_size"].default
    xs, S0 = wkv_inputs(Case(1, 2 * BT + 5, 1, 24, 24, torch.float32, seed=4))
    w = xs[1]
    if w_case == "edge_factored":                                        # span 60: the factored path's limit
        w.fill_(edge_w)
    elif w_case == "edge_pairwise":                                      # just over it: pairwise
        w.fill_(edge_w * 1.01)
    elif w_case == "mixed_chunks":                                       # weak, strong, weak + one strong token
        w[:, BT:2 * BT] = -30.0
        w[:, 2 * BT + 2] = -30.0
    elif w_case == "hard_reset":                                         # exp(w) == 0 in float32 on some tokens
        w[:, 3::7] = -1e4
    check_matches_loop(functools.partial(triton_on_device, path="chunked"), xs, S0)


@needs_triton
def test_triton_decode_after_prefill_equals_one_pass():
    """Prefill by the chunked kernel, then T == 1 steps (auto: the recurrent kernel), state carried."""
    BT = TRITON["chunk_size"].default
    xs, S0 = wkv_inputs(Case(1, 2 * BT + 3, 2, 64, 64, torch.float32, seed=1))

    def prefill_then_decode(*x):
        y, S = triton_on_device(*(t[:, :2 * BT] for t in x[:6]), x[6])
        ys = [y]
        for t in range(2 * BT, x[0].shape[1]):
            y, S = triton_on_device(*(u[:, t:t + 1] for u in x[:6]), S)
            ys.append(y)
        return torch.cat(ys, 1), S
    check_matches_loop(prefill_then_decode, xs, S0)


@needs_triton
def test_triton_non_contiguous_inputs():
    xs, S0 = wkv_inputs(Case(1, 20, 2, 24, 24, torch.float32, seed=2))
    xs = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in xs]
    assert not xs[0].is_contiguous()
    check_matches_loop(triton_on_device, xs, S0)


@needs_triton
def test_triton_empty_sequence():
    xs, S0 = wkv_inputs(Case(1, 0, 2, 24, 24, torch.float32))
    y, S = triton_on_device(*xs, S0)
    assert y.shape == (1, 0, 2, 24) and torch.equal(S, S0)


@needs_triton
def test_triton_refuses_what_it_cannot_do():
    xs, _ = wkv_inputs(Case(1, 3, 1, 24, 24, torch.float32, seed=5))
    xs = [x.to(DEVICE) for x in xs]
    xs[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        wkv7_triton(*xs)
    with torch.no_grad():                                                # no graph wanted: allowed
        wkv7_triton(*xs)
    with pytest.raises(ValueError, match="float64"):
        wkv7_triton(*(x.detach().double() for x in xs))
    for bad in (dict(path="fast"), dict(chunk_size=8), dict(chunk_size=24), dict(block_v=24),
                dict(max_factored_span=-1.0), dict(num_warps=3)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            wkv7_triton(*(x.detach() for x in xs), **bad)


@needs_triton
def test_dispatcher_runs_triton():
    xs, S0 = wkv_inputs(Case(1, 3, 1, 24, 24, torch.float32, seed=10))
    xs, S0 = [x.to(DEVICE) for x in xs], S0.to(DEVICE)
    y, S = wkv7(*xs, S0, impl="triton")
    y_ref, S_ref = wkv7_triton(*xs, S0)
    assert torch.equal(y, y_ref) and torch.equal(S, S_ref)


def test_module_imports_without_triton(monkeypatch):
    """Where triton is not installed wkv_kernel still imports and its torch forms run; wkv7_triton
    raises a clear error and impl="auto" never picks it."""
    monkeypatch.setitem(sys.modules, "triton", None)                     # `import triton` now raises ImportError
    spec = importlib.util.spec_from_file_location("wkv_kernel_without_triton", wkv_kernel.__file__)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    assert not m.HAS_TRITON and not m.TRITON_INTERPRETED
    xs, S0 = wkv_inputs(Case(1, 20, 2, 8, 8, torch.float32))
    check_matches_loop(m.wkv7_chunked, xs, S0)
    assert m.pick_impl(xs[0]) == "chunked"
    with pytest.raises(RuntimeError, match="triton is not installed"):
        m.wkv7_triton(*xs, S0)


COMPILE_SCRIPT = r"""
import inspect
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import wkv_kernel as m
assert m.HAS_TRITON and not m.TRITON_INTERPRETED
tune = {n: p.default for n, p in inspect.signature(m.wkv7_triton).parameters.items()}
sig = {n: "*bf16" for n in ("r_ptr", "w_ptr", "k_ptr", "v_ptr", "a_ptr", "b_ptr", "y_ptr")}
sig.update(s0_ptr="*fp32", sT_ptr="*fp32", T="i32")
const = dict(H=64, K=96, V=96, BK=128, BV=tune["block_v"], HAS_S0=True)
for fn, extra in ((m._wkv7_fwd_recurrent_kernel, {}),
                  (m._wkv7_fwd_chunked_kernel, dict(BT=tune["chunk_size"], MAX_SPAN=tune["max_factored_span"]))):
    c = {**const, **extra}
    triton.compile(ASTSource(fn, {**sig, **{n: "constexpr" for n in c}}, c), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=tune["num_warps"]))
print("ok")
"""


@needs_triton
def test_kernels_compile_for_sm90():
    """The interpreter does not type-check control flow the way the compiler does: compile both
    kernels (bf16, head size 96, the default tunables) for an H100 target down to PTX, in a process
    without the interpreter. Needs triton's NVIDIA backend, not a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# =================================================================================================
# 3.10  wkv7_triton on a GPU only (HRWKV7_TEST_CUDA=1 on a CUDA machine)


@needs_triton
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_long_sequence(dtype):
    """Model shapes (head size 96), a long prefill."""
    check_matches_loop(triton_on_device, *wkv_inputs(Case(2, 1000, 4, 96, 96, dtype, seed=8)))


@needs_triton
@needs_cuda
def test_cuda_strong_decay():
    check_matches_loop(triton_on_device, *wkv_inputs(Case(1, 300, 2, 64, 64, torch.float32, "strong", seed=9)))


# =================================================================================================
# 4  GQA attention against its definition, and the other parts the model is made of
# The NoPE GQA layer with its cache against causal attention written with loops; causal_attention
# (SDPA, blocked masks) against causal_attention_reference; RoPE (used by the RWKV layers' r and k)
# on known values; RMSNorm's float32 compute.


# =================================================================================================
# 4.1  GQA with its cache against plain causal attention written independently


@given(H_per_KV=st.sampled_from([1, 2, 3]), KV=st.sampled_from([1, 2]), T=st.integers(1, 7),
       P=st.integers(0, 5), qk_norm=st.booleans())
def test_gqa_cache_equals_plain_causal_attention(H_per_KV, KV, T, P, qk_norm):
    H, N = KV * H_per_KV, 6
    cfg = HRWKV7Config.from_dict({**TINY, "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": N,
                                  "hidden_size": 12, "enable_qk_norm": qk_norm, "transformer_layers": [0]})
    layer = random_model(cfg).model.layers[0].self_attn
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
    assert rel(out, want) < 1e-12
    assert kc.shape == (2, KV, P + T, N) and torch.allclose(kc, k.transpose(1, 2))


# =================================================================================================
# 4.2  causal_attention (SDPA) against causal_attention_reference (the formula); the model on it at
# 4096 tokens is section 2


ATTENTION_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def attention_tolerance(q, k, v):
    """A bound on max |fast - exact| where exact is the definition computed in float64 on the same
    (already rounded) inputs. Every output row is a convex combination of rows of v, so errors are
    measured against max|v|. With u the unit roundoff of the dtype:
      float64: 1e-12 max|v| (the project's float64 standard; the actual error is ~1e-15).
      float32: scores, softmax and sums in float32; a score q.k N^-0.5 is rounded to about
        u |q||k| N^-0.5, which moves each probability by that much relatively (twice, counting the
        normalisation), and exp, the sums and the output add a few u:
        16 u (1 + max |q_i||k_j| N^-0.5) max|v|.
      bfloat16: the kernels (CPU flash, CUDA flash, the reference) compute scores and softmax in
        float32, but the fused kernels round the probabilities to bfloat16 before the product with
        V (<= u_bf16 max|v|) and everything rounds the output to bfloat16 (<= u_bf16 max|v|):
        2 u_bf16 max|v| + the float32 term."""
    N = q.shape[-1]
    vmax = v.double().abs().max().item()
    qk = (q.double().norm(dim=-1).max() * k.double().norm(dim=-1).max()).item() * N ** -0.5
    f32 = 16 * 2.0 ** -24 * (1 + qk) * vmax
    if q.dtype == torch.float64:
        return 1e-12 * vmax
    if q.dtype == torch.float32:
        return f32
    if q.dtype == torch.bfloat16:
        return 2 * 2.0 ** -8 * vmax + f32
    raise ValueError(q.dtype)


def rms_normalize(x):
    """What qk-norm does to q and k (RMSNorm with unit weight): every head vector has rms 1."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


def random_qkv(B, H, KV, P, T, N, scale, qk_norm, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(B, H, T, N, generator=gen, dtype=torch.float64)       # [B, H, T, N]
    k = torch.randn(B, KV, P + T, N, generator=gen, dtype=torch.float64)           # [B, KV, P+T, N]
    v = torch.randn(B, KV, P + T, N, generator=gen, dtype=torch.float64)
    if qk_norm:
        q, k = rms_normalize(q), rms_normalize(k)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_reference_is_the_causal_softmax_written_per_query():
    H, KV, P, T, N = 6, 2, 5, 4, 8
    q, k, v = random_qkv(2, H, KV, P, T, N, 1.0, False, torch.float64, seed=0)
    o = causal_attention_reference(q, k, v)
    for i in range(T):
        for h in range(H):
            kh, vh = k[:, h // (H // KV), :P + i + 1], v[:, h // (H // KV), :P + i + 1]  # keys j <= P + i
            p = torch.softmax(torch.einsum("bn,bjn->bj", q[:, h, i], kh) / math.sqrt(N), dim=-1)
            torch.testing.assert_close(o[:, h, i], torch.einsum("bj,bjn->bn", p, vh), rtol=0, atol=1e-14)


@ATTENTION_SETTINGS
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), H_per_KV=st.sampled_from([1, 2, 3]),
       KV=st.sampled_from([1, 2]), P=st.integers(0, 40), T=st.integers(1, 40), N=st.sampled_from([2, 8, 16, 64]),
       scale=st.sampled_from([0.1, 1.0, 4.0]), qk_norm=st.booleans(), block_elements=st.integers(1, 400),
       seed=st.integers(0, 2 ** 16))
def test_fast_attention_equals_definition(dtype, H_per_KV, KV, P, T, N, scale, qk_norm, block_elements, seed):
    q, k, v = random_qkv(2, H_per_KV * KV, KV, P, T, N, scale, qk_norm, dtype, seed)
    exact = causal_attention_reference(q.double(), k.double(), v.double())
    fast = causal_attention(q, k, v, block_elements=block_elements)
    assert fast.dtype == dtype and fast.shape == q.shape
    err = (fast.double() - exact).abs().max().item()
    assert err <= attention_tolerance(q, k, v), (err, attention_tolerance(q, k, v))
    if dtype == torch.float64:
        assert rel(fast, exact) < 1e-12


@pytest.mark.parametrize("attention", [causal_attention_reference, causal_attention])
def test_bf16_scores_and_softmax_are_float32(attention):
    """bfloat16 inputs whose scores are 30 and 30 + 15/256 (q = [8, 1, 0, 0], k_j = [7.5, 15/128 or 0,
    0, 0], N = 4) and values -1 and +1: bfloat16 spaces numbers near 30 by 1/8, so scores rounded to
    bfloat16 would all be 30 and the output 0 instead of tanh(15/512) = 0.029; computed in float32
    the output is within the bfloat16 bound. Holds for the definition and for SDPA's kernel."""
    S, N = 64, 4
    odd = torch.arange(S) % 2                                           # [S]
    q = torch.tensor([8.0, 1.0, 0.0, 0.0]).view(1, 1, 1, N).bfloat16()
    k = torch.zeros(1, 1, S, N, dtype=torch.bfloat16)
    k[0, 0, :, 0], k[0, 0, :, 1] = 7.5, odd * 15 / 128
    v = torch.zeros(1, 1, S, N, dtype=torch.bfloat16)
    v[0, 0, :, 0] = 2 * odd - 1
    exact = causal_attention_reference(q.double(), k.double(), v.double())
    assert torch.equal(((q.double() @ k.double().transpose(-1, -2)) / 2).flatten(), 30 + odd.double() * 15 / 256)
    coarse = torch.softmax(((q @ k.transpose(-1, -2)) / 2).double(), dim=-1) @ v.double()  # scores rounded to bf16
    assert coarse.abs().max() == 0 and abs(exact[0, 0, 0, 0].item() - math.tanh(15 / 512)) < 1e-15
    assert exact.abs().max() > 3 * attention_tolerance(q, k, v)
    assert (attention(q, k, v).double() - exact).abs().max() <= attention_tolerance(q, k, v)


def record_sdpa_calls(monkeypatch):
    """Replace F.scaled_dot_product_attention by a stand-in that records each call's shapes and
    returns zeros (for mask-size checks at sizes too big to compute here)."""
    calls = []

    def fake(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), mask=None if attn_mask is None else tuple(attn_mask.shape),
                          mask_bytes=0 if attn_mask is None else attn_mask.untyped_storage().nbytes(),
                          is_causal=is_causal))
        return q.new_zeros(q.shape)

    monkeypatch.setattr(F, "scaled_dot_product_attention", fake)
    return calls


@pytest.mark.parametrize("P, T", [(0, 32768), (32767, 1), (24576, 8192), (8192, 8192), (100, 3)])
def test_blocked_path_mask_is_bounded(monkeypatch, P, T):
    """The 4 x 8192 split's last piece (P=24576, T=8192) must not build an 8192 x 32768 mask: every
    block's mask has <= block_elements numbers (or one row of keys), the blocks cover the T queries
    in order, each block sees exactly the keys [0, P + end of block), and the masks are views of
    one tensor of attention_transient_bytes bytes."""
    calls = record_sdpa_calls(monkeypatch)
    q, k = torch.empty(1, 4, T, 12), torch.empty(1, 2, P + T, 12)
    block_elements = 2 ** 22
    causal_attention(q, k, k, block_elements=block_elements)
    if P == 0 or T == 1:
        assert len(calls) == 1 and calls[0]["mask"] is None and calls[0]["is_causal"] == (T > 1)
        assert attention_transient_bytes(T, P + T) == 0
        return
    done = 0
    for c in calls:
        bq = c["q"][2]
        assert c["mask"] == (bq, P + done + bq) and c["k"][2] == P + done + bq
        assert bq * (P + T) <= max(block_elements, P + T)
        done += bq
    assert done == T
    assert {c["mask_bytes"] for c in calls} == {attention_transient_bytes(T, P + T, block_elements=block_elements)}


# =================================================================================================
# 4.3  RoPE; RMSNorm


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
    assert torch.equal(out[0], x[0, 0, 0]) and rel(out[1], want1) < 1e-15


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


def test_rmsnorm_computes_in_float32_for_half_inputs():
    # activations of a few hundred: their squares overflow float16 (max 65504) unless upcast
    norm = RMSNorm(48, 1e-5)
    x = 300 * torch.randn(3, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = norm.double()(x)
    for dtype, tol in ((torch.float16, 2 ** -10), (torch.bfloat16, 2 ** -7)):   # ~ one rounding of the output
        got = norm.to(dtype)(x.to(dtype))
        assert got.dtype == dtype and rel(got, want) < tol, dtype


@pytest.mark.parametrize("block_bytes", [2 ** 20, 4096, 1])
@pytest.mark.parametrize("M", [1, 5])
def test_linear_in_equals_the_cast_product(block_bytes, M):
    """linear_in (compute_dtype's product: bfloat16 W and b, float32 x, W cast a block of rows at a
    time) == x W^T + b in float64 on the same numbers, to float32 rounding (2e-6 over 300 terms);
    blocks of 3 rows leave a remainder of 1000 rows, block_bytes=1 one row per block. With W in x's
    dtype it is F.linear itself."""
    gen = torch.Generator().manual_seed(M)
    W, b = torch.randn(1000, 300, generator=gen).bfloat16(), torch.randn(1000, generator=gen).bfloat16()
    x = torch.randn(2, M, 300, generator=gen)
    got = hrwkv7_ref.linear_in(x, W, b, block_bytes=block_bytes)
    assert got.shape == (2, M, 1000) and got.dtype == torch.float32
    assert rel(got, F.linear(x.double(), W.double(), b.double())) < 2e-6
    assert torch.equal(hrwkv7_ref.linear_in(x, W.float(), b.float()), F.linear(x, W.float(), b.float()))
    Wg, xg = W.clone().requires_grad_(), x.clone().requires_grad_()          # under autograd: gradients too
    hrwkv7_ref.linear_in(xg, Wg, b, block_bytes=block_bytes).pow(2).sum().backward()
    Wd, xd = W.double().requires_grad_(), x.double().requires_grad_()
    F.linear(xd, Wd, b.double()).pow(2).sum().backward()
    assert rel(xg.grad, xd.grad) < 2e-6 and rel(Wg.grad, Wd.grad) < 1e-2      # W's gradient rounded to bf16


@pytest.mark.parametrize("M", [1, 4])
def test_linear_in_under_compile_is_one_reduction_equal_to_the_cast_product(M):
    """Under torch.compile (compile_decode) with at most 4 rows of x, linear_in takes its other branch:
    one reduction sum_i x[m, i] W[o, i], into which inductor fuses W's cast. The graph dynamo captures
    (recorded by a backend that runs it as it is, so no compile) holds that sum and no block loop of
    products, and gives x W^T + b in float64 on the same numbers to float32 rounding."""
    gen = torch.Generator().manual_seed(M)
    W, b = torch.randn(1000, 300, generator=gen).bfloat16(), torch.randn(1000, generator=gen).bfloat16()
    x = torch.randn(1, M, 300, generator=gen)
    graphs = []

    def record(gm, example_inputs):
        graphs.append([n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
                       for n in gm.graph.nodes if n.op in ("call_function", "call_method")])
        return gm.forward

    with torch.no_grad():
        got = torch.compile(hrwkv7_ref.linear_in, backend=record, fullgraph=True, dynamic=False)(x, W, b)
    assert len(graphs) == 1 and "sum" in graphs[0] and not {"mm", "linear", "copy_"} & set(graphs[0]), graphs
    assert got.shape == (1, M, 1000) and got.dtype == torch.float32
    assert rel(got, F.linear(x.double(), W.double(), b.double())) < 2e-6


# =================================================================================================
# 5  The golden vectors and the named variants: what a port is checked against
# The golden vectors made from the per-token definition (golden/make_golden.py), their checker
# (golden/check.py) and the known wrong variants (golden/variants.py), each planted in the loop or
# in the model and caught by name. golden/ is not a package: a porter runs its scripts as files, so
# its modules are imported from its folder (on sys.path since conftest.py), here in this section.

GOLDEN = os.path.join(HERE, "golden")
check, make_golden, variants = (importlib.import_module(name) for name in ("check", "make_golden", "variants"))
CASES = sorted(make_golden.CASES)


def read_safetensors(path) -> dict:
    """Every tensor of one safetensors file, read with safetensors' own reader."""
    from safetensors.torch import load_file
    return load_file(path)


def golden(case):
    return read_safetensors(os.path.join(GOLDEN, case, "vectors.safetensors"))


def model_state_tensors(state: HRWKV7State) -> dict:
    """The model's state under the golden names (state.per_layer.{i}.S / .k_cache / .v_cache, state.pos)."""
    return make_golden.state_tensors({"per_layer": state.per_layer, "pos": state.pos})


def split_run_model(model, ids):
    """make_golden.split_run (the pieces of SPLIT, the state carried) with the model in the loop's place."""
    with torch.no_grad():
        return make_golden.split_run(lambda _config, _sd, piece, state: model(piece, state), None, None, ids)


def port_tensors_of_loop(loop, case) -> dict:
    """What a port built like `loop` (a module with run) writes for a golden case, in float64."""
    config, sd = make_golden.CASES[case][0], read_safetensors(os.path.join(GOLDEN, case, "model.safetensors"))
    ids = golden(case)["input_ids"]
    full, _ = loop.run(config, sd, ids)
    split, state = make_golden.split_run(loop.run, config, sd, ids)
    return {"logits": full, "split_logits": split, **make_golden.state_tensors(state)}


# =================================================================================================
# 5.1  The golden vectors


@pytest.mark.parametrize("case", CASES)
def test_golden_case_is_what_the_loop_and_the_model_compute(case):
    """The stored logits, split logits and state == hrwkv7_loop and hrwkv7_ref (float64) to 1e-12, so
    the vectors cannot drift from either; the directory loads with from_pretrained."""
    vec = golden(case)
    loop = port_tensors_of_loop(hrwkv7_loop, case)
    assert set(loop) == {k for k in vec if "__" not in k} - {"input_ids", "split_lengths"}
    for name, t in loop.items():
        assert t.shape == vec[name].shape and t.dtype == vec[name].dtype, name
        assert (torch.equal(t, vec[name]) if name == "state.pos" else rel(t, vec[name]) < 1e-12), name
    model = HRWKV7ForCausalLM.from_pretrained(os.path.join(GOLDEN, case), dtype=torch.float64)
    with torch.no_grad():
        full, _ = model(vec["input_ids"])
    split, state = split_run_model(model, vec["input_ids"])
    assert rel(full, vec["logits"]) < 1e-12 and rel(split, vec["split_logits"]) < 1e-12
    for name, t in model_state_tensors(state).items():
        assert t.shape == vec[name].shape and rel(t, vec[name]) < 1e-12, name
    assert vec["split_lengths"].tolist() == make_golden.SPLIT and vec["logits"].dtype == torch.float64
    assert vec["input_ids"].dtype == torch.int64


def test_golden_cases_cover_what_ports_get_wrong():
    cfgs = {case: HRWKV7Config.from_json(os.path.join(GOLDEN, case, "config.json")) for case in CASES}
    assert any(c.is_gqa(0) for c in cfgs.values())
    assert any(c.enable_qk_norm and c.attention_bias for c in cfgs.values())
    assert any(c.tie_word_embeddings for c in cfgs.values())
    assert any(c.num_key_value_heads == 1 for c in cfgs.values())
    assert any(c.head_size & (c.head_size - 1) for c in cfgs.values())        # not a power of two
    shown = {k.split("__")[1] for case in CASES for k in golden(case) if "__" in k}
    assert shown == set(variants.VARIANTS)                                      # every variant shows somewhere


def test_make_golden_is_deterministic_and_writes_these_files(tmp_path):
    """make_golden.py writes the same bytes twice, and what it writes is what is stored: the same
    files and names, configs and weights and inputs exactly, computed numbers to 1e-12 (another BLAS
    may round the last bit differently)."""
    make_golden.main(["--out", str(tmp_path / "a")])
    make_golden.main(["--out", str(tmp_path / "b"), "--only", "tied_kv1_n24", "wkv"])
    only = ["tied_kv1_n24/config.json", "tied_kv1_n24/model.safetensors", "tied_kv1_n24/vectors.safetensors",
            "wkv.safetensors"]
    assert sorted(os.path.relpath(os.path.join(r, f), tmp_path / "b") for r, _, fs in os.walk(tmp_path / "b")
                  for f in fs) == only                                  # --only: those and nothing else
    for name in ("tied_kv1_n24/vectors.safetensors", "tied_kv1_n24/model.safetensors", "wkv.safetensors"):
        with open(tmp_path / "a" / name, "rb") as a, open(tmp_path / "b" / name, "rb") as b:
            assert a.read() == b.read(), name
    stored = sorted(os.path.relpath(os.path.join(r, f), GOLDEN) for r, _, fs in os.walk(GOLDEN) for f in fs
                    if f.endswith((".safetensors", ".json")))
    written = sorted(os.path.relpath(os.path.join(r, f), tmp_path / "a") for r, _, fs in os.walk(tmp_path / "a")
                     for f in fs)
    assert stored == written
    for name in stored:
        mine, new = os.path.join(GOLDEN, name), str(tmp_path / "a" / name)
        if name.endswith(".json"):
            assert open(mine).read() == open(new).read(), name
            continue
        a, b = read_safetensors(mine), read_safetensors(new)
        assert a.keys() == b.keys(), name
        for key in a:
            computed = name.endswith("vectors.safetensors") and key not in ("input_ids", "split_lengths") or (
                name == "wkv.safetensors" and key.split(".")[1].startswith(("y", "S_T")))
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (name, key)
            assert (rel(b[key], a[key]) < 1e-12 if computed else torch.equal(a[key], b[key])), (name, key)


def test_make_golden_only_writes_the_named_file(tmp_path):
    """--only wkv writes wkv.safetensors and no case directory (a regeneration of one file must not
    rewrite the others)."""
    make_golden.main(["--out", str(tmp_path), "--only", "wkv"])
    assert os.listdir(tmp_path) == ["wkv.safetensors"]


@pytest.mark.parametrize("form", ["naive", "chunked"])
def test_wkv_vectors_match_the_kernels(form):
    g = read_safetensors(os.path.join(GOLDEN, "wkv.safetensors"))
    cases = sorted({k.split(".")[0] for k in g})
    assert any(g[c + ".w"].min() == -30 for c in cases)
    assert any(g[c + ".r"].shape[1] % 16 and g[c + ".r"].shape[1] > 64 for c in cases)
    for c in cases:
        y, S = wkv_kernel.IMPLS[form](*(g[f"{c}.{n}"] for n in ("r", "w", "k", "v", "a", "b")), g[c + ".S_0"])
        assert rel(y, g[c + ".y"]) < 1e-12 and rel(S, g[c + ".S_T"]) < 1e-12
    assert all(ok for ok, _ in check.check_wkv(wkv_kernel.IMPLS[form], "float64"))

    def numpy_kernel(*arrays):                      # a kernel on NumPy arrays (check.py --numpy)
        y, S = wkv_kernel.IMPLS[form](*(torch.from_numpy(x) for x in arrays))
        return y.numpy(), S.numpy()
    results = check.check_wkv(numpy_kernel, "float64", numpy=True)
    assert len(results) == 2 * len(cases) and all(ok for ok, _ in results), results


# =================================================================================================
# 5.2  Known wrong variants, caught by name


def test_each_variant_is_one_small_change_that_fits_the_loop():
    src = open(os.path.join(HERE, "hrwkv7_loop.py")).read()
    for slug in variants.VARIANTS:
        changed = variants.source(slug)
        assert changed != src and len(variants.VARIANTS[slug][3]) <= 4
    variants.VARIANTS["_probe"] = ("probe", "", "", [("no such line", "x")])
    try:
        with pytest.raises(ValueError, match="occurs 0 times"):
            variants.source("_probe")
    finally:
        del variants.VARIANTS["_probe"]


@pytest.mark.parametrize("slug", sorted(variants.VARIANTS))
def test_variant_planted_in_the_loop_fails_by_name(slug):
    """The loop with the variant planted fails the float32 check on every case where the variant
    shows, and the checker names the mistake."""
    mod, name = variants.load(slug), variants.VARIANTS[slug][0]
    hit = 0
    for case in CASES:
        if not any(k.endswith("__" + slug) for k in golden(case)):
            continue
        results = check.check_model(os.path.join(GOLDEN, case), port_tensors_of_loop(mod, case), "float32")
        failed = [line for ok, line in results if not ok]
        named = [line for line in failed if "matches known wrong variant" in line]
        assert named and all(f"matches known wrong variant: {name}" in line for line in named), failed
        if any(line.startswith("FAIL logits:") for line in named):       # the split logits are named too
            assert any(line.startswith("FAIL split_logits:") for line in named), failed
        hit += 1
    assert hit


@pytest.mark.parametrize("case", CASES)
def test_split_logits_from_a_variant_are_named(case):
    """A port whose prefill logits are right but whose split run computes a variant (its split
    logits equal its prefill logits, make_golden checks) gets the variant named on split_logits:
    the checker compares split_logits with the variant's logits where no split_logits__* is stored."""
    vec = golden(case)
    slugs = [k.split("__")[1] for k in vec if k.startswith("logits__")]
    assert slugs
    for slug in slugs:
        port = {"logits": vec["logits"], "split_logits": vec["logits__" + slug]}
        (ok, line), (split_ok, split_line) = check.check_model(os.path.join(GOLDEN, case), port, "float32")
        assert ok and line.startswith("pass logits:"), line
        assert not split_ok and split_line.startswith("FAIL split_logits:"), split_line
        assert f"matches known wrong variant: {variants.VARIANTS[slug][0]} ({slug}," in split_line, split_line


@pytest.mark.parametrize("slug", variants.WKV_VARIANTS)
def test_wkv_variant_fails_the_wkv_vectors_by_name(slug):
    results = check.check_wkv(variants.load(slug).wkv7_float64, "float32")
    failed = [line for ok, line in results if not ok]
    assert failed and all(f"matches known wrong variant: {variants.VARIANTS[slug][0]}" in line for line in failed)


def transposed_state_kernel(r, w, k, v, a, b, S0=None, impl="auto"):
    """A kernel that keeps its state as [V, K]: it reads the state it is given, and writes its
    final state, transposed."""
    y, S = wkv_kernel.wkv7(r, w, k, v, a, b, None if S0 is None else S0.transpose(-1, -2).contiguous(), impl=impl)
    return y, S.transpose(-1, -2).contiguous()


def decay_after_write_kernel(r, w, k, v, a, b, S0=None, impl="auto"):
    return variants.load("decay_after_write").wkv7_float64(r, w, k, v, a, b, S0)


@pytest.mark.parametrize("slug,wrong_kernel", [("state_transposed", transposed_state_kernel),
                                               ("decay_after_write", decay_after_write_kernel)])
def test_variant_planted_in_the_model_fails_by_name(monkeypatch, slug, wrong_kernel):
    """hrwkv7_ref with its WKV kernel replaced by a wrong one fails the golden check by name."""
    monkeypatch.setattr(hrwkv7_ref, "wkv7", wrong_kernel)
    case = "released_layout"
    model = HRWKV7ForCausalLM.from_pretrained(os.path.join(GOLDEN, case), dtype=torch.float64)
    with torch.no_grad():
        full, _ = model(golden(case)["input_ids"])
    split, state = split_run_model(model, golden(case)["input_ids"])
    port = {"logits": full, "split_logits": split, **model_state_tensors(state)}
    failed = [line for ok, line in check.check_model(os.path.join(GOLDEN, case), port, "float32") if not ok]
    named = [line for line in failed if "matches known wrong variant" in line]
    assert named and all(f"matches known wrong variant: {variants.VARIANTS[slug][0]}" in line for line in named)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_model_in_float32_and_bfloat16_passes(dtype):
    """This project's model passes in the dtype it computes in (the tolerances are not too tight),
    and its float32 numbers fail the float64 bar (they are not too loose to notice anything)."""
    for case in CASES:
        model = HRWKV7ForCausalLM.from_pretrained(os.path.join(GOLDEN, case), dtype=getattr(torch, dtype))
        ids = golden(case)["input_ids"]
        with torch.no_grad():
            full, _ = model(ids)
        split, state = split_run_model(model, ids)
        port = {"logits": full.float(), "split_logits": split.float(), **model_state_tensors(state)}
        results = check.check_model(os.path.join(GOLDEN, case), port, dtype)
        assert all(ok for ok, _ in results), results
        if dtype == "float32":
            assert not all(ok for ok, _ in check.check_model(os.path.join(GOLDEN, case), port, "float64"))
    assert all(ok for ok, _ in check.check_wkv(wkv_kernel.wkv7_chunked, dtype))


# =================================================================================================
# 5.3  The checker's command line


def run_check(*args):
    return subprocess.run([sys.executable, os.path.join(GOLDEN, "check.py"), *args], cwd=HERE,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


def test_checker_command_line(tmp_path, capsys):
    from safetensors.torch import save_file
    assert check.main(["wkv", "wkv_kernel:wkv7_naive"]) == 0 and "6 passed, 0 failed" in capsys.readouterr().out
    case = os.path.join(GOLDEN, "gqa0_qknorm_bias")
    save_file(port_tensors_of_loop(variants.load("groupnorm"), "gqa0_qknorm_bias"), str(tmp_path / "port.safetensors"))
    out = run_check("model", case, str(tmp_path / "port.safetensors"))
    assert out.returncode == 1 and "matches known wrong variant: GroupNorm kept" in out.stdout
    save_file({"split_logits": golden("gqa0_qknorm_bias")["logits"]}, str(tmp_path / "nologits.safetensors"))
    save_file({"logits": golden("gqa0_qknorm_bias")["logits"]}, str(tmp_path / "good.safetensors"))
    assert check.main(["model", case, str(tmp_path / "good.safetensors")]) == 0
    for argv, says in ([["wkv", "nosuchmodule:f"], "cannot load 'nosuchmodule:f'"],
                       [["wkv", "wkv_kernel"], "expected MODULE:FUNCTION"],
                       [["model", str(tmp_path), str(tmp_path / "good.safetensors")], "no vectors.safetensors"],
                       [["model", case, str(tmp_path / "missing.safetensors")], "missing.safetensors: cannot read"],
                       [["model", case, str(tmp_path / "nologits.safetensors")], "no tensor 'logits'"],
                       [["model", case], "required"],
                       [["wkv", "wkv_kernel:wkv7_naive", "--dtype", "int8"], "invalid choice"],
                       [["wkv", "wkv_kernel:wkv7_naive", "--numpy", "--dtype", "bfloat16"], "NumPy has no bfloat16"]):
        capsys.readouterr()
        try:
            rc = check.main(argv)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and says in err and err.count("\n") == 1 and err.startswith("error: "), (argv, err)


# =================================================================================================
# 6  transformers as an external reference (the teachers: make_teacher, conftest.py)
#
# The teachers here are built and written by transformers itself (`save_pretrained`, float64
# weights, config.json as transformers >= 5 writes it: `rope_parameters`, no top-level
# `rope_theta`), and transformers' own forward is the reference no one in this project wrote:
#
#   - NoPE equivalence: a teacher run with position_ids all zero (RoPE at position 0 is the
#     identity, so every attention layer is a NoPE GQA layer) against the student made by
#     init_from_teacher(transformer_layers=all layers, qkvo_scale=(1, 1, 1, 1)), float64,
#     <= 1e-6 relative; also split prefill (transformers' KV cache vs the student's state).
#     The floor (~1e-7) is transformers' RMSNorm, which computes in float32 for float64 input.
#   - a hybrid student (RWKV layers, default qkvo_scale): finite logits, and token-by-token
#     decoding through the returned state equals the parallel forward (float64, <= 1e-10).
#   - RoPE: rope_cos_sin + apply_rope against LlamaRotaryEmbedding + apply_rotary_pos_emb.
#   - config handling on transformers-written files: rope_parameters, refused rope types,
#     sliding-window teachers (a warning), the student's config.json read back two ways.
#
# Only the public API is used: init_from_teacher, load_checkpoint, HRWKV7Config.from_json,
# HRWKV7ForCausalLM.from_pretrained / forward, rope_cos_sin / apply_rope.
#
# Skipped test by test (not with a module-level importorskip, which would skip all of
# test_ref.py) when transformers is not installed; CI installs it. transformers and convert.py are
# imported in this section's functions, where they are used.


needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed (pip install 'transformers>=5'); these tests use it as an external reference")


def init_from_teacher(*args, **kwargs):
    """convert.init_from_teacher: the student made from a teacher."""
    from convert import init_from_teacher
    return init_from_teacher(*args, **kwargs)


def load_checkpoint(*args, **kwargs):
    """convert.load_checkpoint: (config, lazy state dict) of a checkpoint."""
    from convert import load_checkpoint
    return load_checkpoint(*args, **kwargs)


def single_threaded(test):
    """Run `test` with one torch thread (restored after). These models are tiny, so intra-op threads
    buy nothing, and on a shared 2-core machine two threads that must meet at every op wait for each
    other's time slice: the file ran 3-5x slower with torch's default threads under load."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return test(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return run


# bounded, reproducible examples: the same draws on every machine, no per-example deadline
TF_SETTINGS = settings(max_examples=4, deadline=None, derandomize=True, database=None)


def load_teacher(path):
    """The teacher as transformers reads it back from `path`, float64, eval mode."""
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def teacher_cache_kwarg(teacher):
    """The forward keyword of the KV cache: `cache` in transformers 5.2x, `past_key_values` before."""
    params = inspect.signature(teacher.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def teacher_logits(teacher, ids, positions="zero", cache=None, past_len=0):
    """(logits, cache) of transformers' forward on ids [B, T]. positions="zero": position_ids all 0,
    so RoPE is the identity (NoPE attention); "absolute": past_len, ..., past_len + T - 1.
    The all-ones attention mask is passed on purpose: with neither a mask nor a cache (use_cache=False),
    transformers >= 5 reads position_ids that do not step by 1 as packed sequences, and each token
    would attend only to itself (tried: rel err 1.2 against the student)."""
    B, T = ids.shape
    pos = torch.zeros_like(ids) if positions == "zero" else torch.arange(past_len, past_len + T).expand(B, T)
    key = teacher_cache_kwarg(teacher)
    with torch.no_grad():
        out = teacher(input_ids=ids, position_ids=pos, attention_mask=torch.ones(B, past_len + T, dtype=torch.long),
                      use_cache=True, **({key: cache} if cache is not None else {}))
    return out.logits, getattr(out, key)


def token_ids(B, T, vocab, seed):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# =================================================================================================
# 6.1  NoPE equivalence: an all-GQA student against transformers with position_ids = 0
# (worst seen over 8 draws per kind with transformers 5.24: 1.3e-7 .. 2.2e-7; 1e-15 when transformers'
# RMSNorm is made to compute in float64, so the float32 RMSNorm is the whole floor)


@needs_transformers
@pytest.mark.parametrize("kind", list(TEACHER_KINDS))
@TF_SETTINGS
@given(n_layers=st.integers(1, 3), B=st.integers(1, 3), T=st.integers(1, 24), split=st.floats(0.1, 0.9),
       seed=st.integers(0, 2**16))
@single_threaded
def test_transformers_nope_teacher_equals_all_gqa_student(kind, n_layers, B, T, split, seed):
    with tempfile.TemporaryDirectory() as tmp:
        tdir = make_teacher(os.path.join(tmp, "teacher"), kind, n_layers, seed)
        if kind == "llama_sharded":
            assert os.path.exists(os.path.join(tdir, "model.safetensors.index.json"))
        assert "rope_theta" not in read_json(os.path.join(tdir, "config.json"))   # the transformers >= 5 layout
        teacher = load_teacher(tdir)
        init_from_teacher(tdir, os.path.join(tmp, "student"), transformer_layers=list(range(n_layers)),
                          qkvo_scale=(1, 1, 1, 1))
        student = HRWKV7ForCausalLM.from_pretrained(os.path.join(tmp, "student"), dtype=torch.float64)
    ids = token_ids(B, T, 101, seed)
    want, _ = teacher_logits(teacher, ids)
    with torch.no_grad():
        got, _ = student(ids)
    err = rel(got, want)
    assert err <= 1e-6, f"{kind}: all-GQA student vs transformers (position_ids = 0): rel err {err:.2e}"

    # split prefill: transformers' KV cache against the student's state, same NoPE attention
    s = min(max(1, round(split * T)), T - 1) if T > 1 else None
    if s is not None:
        w1, cache = teacher_logits(teacher, ids[:, :s])
        w2, _ = teacher_logits(teacher, ids[:, s:], cache=cache, past_len=s)
        with torch.no_grad():
            g1, st1 = student(ids[:, :s])
            g2, _ = student(ids[:, s:], st1)
        err = rel(torch.cat([g1, g2], 1), torch.cat([w1, w2], 1))
        assert err <= 1e-6, f"{kind}: split prefill at {s} of {T}: rel err {err:.2e}"

        # the comparison can fail: with positions (RoPE on), the same teacher is far from the NoPE student
        rope_on, _ = teacher_logits(teacher, ids, positions="absolute")
        assert rel(got, rope_on) > 1e-3


# =================================================================================================
# 6.2  A hybrid student: finite logits, token-by-token decoding equals the parallel forward


@needs_transformers
@settings(max_examples=6, deadline=None, derandomize=True, database=None)
@given(data=st.data(), kind=st.sampled_from(list(TEACHER_KINDS)), n_layers=st.integers(1, 4),
       B=st.integers(1, 2), T=st.integers(1, 20), seed=st.integers(0, 2**16))
@single_threaded
def test_transformers_hybrid_student_decodes_like_its_parallel_forward(data, kind, n_layers, B, T, seed):
    gqa = data.draw(st.lists(st.integers(0, n_layers - 1), unique=True, max_size=n_layers - 1), label="gqa layers")
    with tempfile.TemporaryDirectory() as tmp:
        tdir = make_teacher(os.path.join(tmp, "teacher"), kind, n_layers, seed)
        init_from_teacher(tdir, os.path.join(tmp, "student"), transformer_layers=gqa, seed=seed)  # default scales
        student = HRWKV7ForCausalLM.from_pretrained(os.path.join(tmp, "student"), dtype=torch.float64)
    assert student.config.num_hidden_layers - len(student.config.transformer_layers) >= 1
    ids = token_ids(B, T, 101, seed)
    with torch.no_grad():
        full, _ = student(ids)
        state, steps = None, []
        for t in range(T):
            logits, state = student(ids[:, t:t + 1], state)
            steps.append(logits)
    assert torch.isfinite(full).all()
    err = rel(torch.cat(steps, 1), full)
    assert err <= 1e-10, f"{kind}, GQA layers {gqa} of {n_layers}: token-by-token vs parallel rel err {err:.2e}"


# =================================================================================================
# 6.3  RoPE against transformers' rotary embedding


@needs_transformers
@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(N=st.sampled_from([8, 12, 16, 96]), theta=st.sampled_from([1e4, 5e5, 8e6]),
       positions=st.lists(st.integers(0, 300), min_size=1, max_size=40), heads=st.integers(1, 3),
       seed=st.integers(0, 2**16))
@single_threaded
def test_transformers_rope_matches_transformers(N, theta, positions, heads, seed):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    cfg = transformers.LlamaConfig(hidden_size=N * heads, num_attention_heads=heads, head_dim=N,
                                   rope_parameters={"rope_type": "default", "rope_theta": theta})
    pos = torch.tensor(positions)
    x = torch.randn(2, len(positions), heads, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cos_t, sin_t = LlamaRotaryEmbedding(cfg)(x, pos[None])             # [1, T, N], float32 angles cast to float64
    want, _ = apply_rotary_pos_emb(x, x, cos_t, sin_t, unsqueeze_dim=2)  # x is [B, T, heads, N]
    cos, sin = rope_cos_sin(pos, N, theta, torch.float64, "cpu")
    got = apply_rope(x, cos, sin)
    # transformers forms the angles in float32: inv_freq = 1 / theta^(j/N) carries a relative error
    # <= (ln(theta) + 3) u (the exponent j/N is rounded, then pow and the division), the product
    # pos * inv_freq one more u, and cos/sin of the float32 angle another u each, u = 2^-24. So
    # |d cos|, |d sin| <= (ln(theta) + 4) u * max_pos + 2u, and each output element, x_i cos + x_j sin,
    # moves by at most 2 max|x| times that.
    u = 2.0 ** -24
    tol = 2 * ((math.log(theta) + 4) * u * max(positions) + 2 * u)
    err = rel(got, want)
    assert err <= tol, f"N={N} theta={theta} max pos {max(positions)}: rel err {err:.2e} > {tol:.2e}"


# =================================================================================================
# 6.4  Config handling with transformers-written files


@needs_transformers
@single_threaded
def test_transformers_rope_parameters_teacher_converts_and_the_config_reads_back(tmp_path):
    tdir = make_teacher(str(tmp_path / "teacher"), "qwen3_qknorm", 2,
                        rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    tcfg = read_json(os.path.join(tdir, "config.json"))
    assert "rope_theta" not in tcfg and tcfg["rope_parameters"]["rope_theta"] == 123456.0
    sdir = str(tmp_path / "student")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # a full-attention teacher: no warning
        init_from_teacher(tdir, sdir, transformer_layers=[1])
    written = read_json(os.path.join(sdir, "config.json"))
    assert written["rope_theta"] == 123456.0
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 123456.0}
    assert written["head_dim"] == 16                                   # != hidden_size // heads: must be written
    assert written["model_type"] == "hrwkv7" and written["architectures"] == ["HRWKV7ForCausalLM"]
    assert written["transformer_layers"] == [1]
    from_json = HRWKV7Config.from_json(os.path.join(sdir, "config.json"))
    loaded, _ = load_checkpoint(sdir)
    assert from_json == loaded
    assert (loaded.rope_theta, loaded.head_size, loaded.num_key_value_heads, loaded.enable_qk_norm) == (
        123456.0, 16, 2, True)

    # the same teacher in the layout transformers < 5 wrote (top-level rope_theta, rope_scaling null)
    old = {k: v for k, v in tcfg.items() if k != "rope_parameters"}
    old.update(rope_theta=123456.0, rope_scaling=None)
    with open(os.path.join(tdir, "config.json"), "w") as f:
        json.dump(old, f)
    init_from_teacher(tdir, str(tmp_path / "student_old"), transformer_layers=[1])
    assert load_checkpoint(str(tmp_path / "student_old"))[0] == loaded


ROPE_TYPES = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 2.0},
}


@needs_transformers
@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
@single_threaded
def test_transformers_scaled_rope_teacher_is_refused_by_name(tmp_path, rope_type):
    tdir = make_teacher(str(tmp_path / "teacher"), "llama", 1, rope_parameters=ROPE_TYPES[rope_type],
                        max_position_embeddings=256)
    assert read_json(os.path.join(tdir, "config.json"))["rope_parameters"]["rope_type"] == rope_type
    out = str(tmp_path / "student")
    with pytest.raises(ValueError) as err:
        init_from_teacher(tdir, out, transformer_layers=[0])
    msg = str(err.value)
    assert repr(rope_type) in msg and os.path.join(tdir, "config.json") in msg, msg
    assert not os.path.exists(out)


@needs_transformers
@single_threaded
def test_transformers_legacy_rope_scaling_is_refused_by_name(tmp_path):
    """An older file: top-level rope_theta and rope_scaling {"type": "linear"} (patched into config.json)."""
    tdir = make_teacher(str(tmp_path / "teacher"), "llama", 1)
    cfg = read_json(os.path.join(tdir, "config.json"))
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    with open(os.path.join(tdir, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="'linear'") as err:
        init_from_teacher(tdir, str(tmp_path / "student"), transformer_layers=[0])
    assert os.path.join(tdir, "config.json") in str(err.value)


@needs_transformers
@single_threaded
def test_transformers_student_config_with_scaled_rope_is_refused_on_load(tmp_path):
    tdir = make_teacher(str(tmp_path / "teacher"), "llama", 2)
    sdir = str(tmp_path / "student")
    init_from_teacher(tdir, sdir, transformer_layers=[0])
    cfg = read_json(os.path.join(sdir, "config.json"))
    cfg["rope_parameters"] = ROPE_TYPES["yarn"]
    with open(os.path.join(sdir, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="'yarn'") as err:
        load_checkpoint(sdir)
    assert sdir in str(err.value)
    with pytest.raises(ValueError, match="'yarn'") as err:
        HRWKV7Config.from_json(os.path.join(sdir, "config.json"))
    assert sdir in str(err.value)


@needs_transformers
@pytest.mark.parametrize("arch, overrides", [
    ("mistral", {"sliding_window": 16}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}),
])
@single_threaded
def test_transformers_sliding_window_teacher_converts_with_a_warning(tmp_path, arch, overrides):
    tdir = str(tmp_path / "teacher")
    spec = dict(arch=arch, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    make_teacher(tdir, spec, 2, **overrides)
    assert read_json(os.path.join(tdir, "config.json"))["sliding_window"] == 16
    sdir = str(tmp_path / "student")
    with pytest.warns(UserWarning, match="sliding"):
        init_from_teacher(tdir, sdir, transformer_layers=[0, 1], qkvo_scale=(1, 1, 1, 1))
    student = HRWKV7ForCausalLM.from_pretrained(sdir, dtype=torch.float64)
    # within the window the teacher's attention is full attention: the NoPE check still holds
    ids = token_ids(2, 12, 101, 0)
    want, _ = teacher_logits(load_teacher(tdir), ids)
    with torch.no_grad():
        got, _ = student(ids)
    assert rel(got, want) <= 1e-6

