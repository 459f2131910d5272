"""
Property tests, in the order of the files they test: every WKV form against the definition (the
float64 loop), the model against an independent float64 implementation of SPEC.md, checkpoints
and conversion, transformers' own models as an external reference, and the installed package. Bad
input everywhere against clear errors.

    python -m pytest -q test_ref.py                      (profile "ci": bounded examples)
    HYPOTHESIS_PROFILE=dev python -m pytest -q test_ref.py   (more examples)
    python -m pytest -q test_ref.py --wkv-impl package.module:function   (your kernel, conftest.py)
    HRWKV7_TEST_CUDA=1 python -m pytest -q test_ref.py   (the Triton kernels on a GPU, conftest.py)

The WKV kernel suite (the tests taking a `kernel` argument) runs the same properties on each of the
project's forms, or, with --wkv-impl, on any function with wkv_kernel's signature
f(r, w, k, v, a, b, state) -> (y, S_T), e.g. fla_adapter:fla_dplr_recurrence. The properties are
plain functions (check_matches_loop, check_gradients) that take the kernel as an argument.
conftest.py sets the environment (TRITON_INTERPRET=1: the Triton kernels in Triton's CPU
interpreter) before this file imports wkv_kernel.

Contents (each section starts with a banner "# ===...", then "# <number>  <title>"):

0     Shared fixtures: rel_err; one factory per kind of fixture: tiny_model (a random HRWKV7
      model), save_hf (an HF checkpoint directory, written with safetensors' own writer),
      load_tensors / read_json (read one back), make_teacher (a Llama / Qwen2 / Qwen3 teacher)
1     wkv_kernel.py
1.1     WKV inputs: Case, wkv_inputs and the hypothesis strategy `cases`
1.2     Tolerances: assert_close, the bound of each dtype and why
1.3     The properties: check_matches_loop (y, S_T, dtypes, the state left untouched, a split
        call), check_gradients (every input's gradient)
1.4     The kernels the suite runs on: the project's forms, or --wkv-impl; refusals become skips
1.5     The kernel suite: test_matches_loop, test_state_carries, test_gradients
1.6     The suite catches planted errors: test_properties_catch_a_planted_error
1.7     The definition: the naive loop on a hand-computed example, its dtypes, bad input, float32
        decay beside half inputs, against fla-core's recurrence (fla_adapter.py)
1.8     wkv7_chunked: tunables, the factored/pairwise threshold, extreme decays, empty input, the
        dispatcher, the model's logits with it
1.9     wkv7_triton in Triton's interpreter: both paths, strong decays, decode after prefill,
        refusals, imports without triton, compiles for sm_90
1.10    wkv7_triton on a GPU only
2     hrwkv7_ref.py
2.1     The oracle: oracle_logits(sd, cfg, ids) = hrwkv7_loop.logits, the model written
        independently, one token at a time, in float64 (section 3 checks the file itself)
2.2     Config: round trip, errors that name the field
2.3     RoPE: known values, norm kept, relative positions
2.4     GQA with its cache against causal attention written with loops
2.5     causal_attention (SDPA) against causal_attention_reference, bf16 scores in float32,
        bounded masks, a 4096-token prefill split three ways
2.6     The model against the oracle; parallel == split == token by token; state not mutated
2.7     The model's input checks: bad ids and states get clear errors
2.8     Loading: from_pretrained against the oracle, two files copied alone, device_map with disk
        offload, bfloat16 weights, a repo id from the hub cache and the chat command, bad tensors
2.9     Generation and memory accounting: greedy, streaming, EOS, sampling, RMSNorm in float32,
        state_bytes
3     hrwkv7_loop.py and golden/: what a port is checked against
3.1     The definition: hrwkv7_loop imports torch only and equals the model over drawn configs
3.2     The golden vectors: what the loop and the model compute now, rebuilt byte for byte by
        golden/make_golden.py; the WKV vectors against wkv7_naive and wkv7_chunked
3.3     Known wrong variants (golden/variants.py), each planted and caught by name
3.4     The checker's command line (golden/check.py)
4     convert.py
4.1    Round trips: .pth -> HF -> load, exact; sharded layout, dtype casts, the CLI
4.2    Bad checkpoints and outputs: unsafe index entries, missing/unexpected/mis-shaped tensors,
        corrupt files, contradicting configs, pickles, permissions, half-written outputs
4.3    Initialisation from a teacher: init_from_teacher, its formulas, its errors and CLI
5     hrwkv7_cli.py: stop strings over several tokens, the error convention of both commands
6     transformers as an external reference (skipped when transformers is not installed)
6.1    NoPE equivalence: an all-GQA student against transformers with position_ids = 0
6.2    A hybrid student decodes token by token like its parallel forward
6.3    RoPE against transformers' rotary embedding
6.4    Config handling with transformers-written files (rope_parameters, refused rope types,
        sliding windows)
7     The installed package: the wheel's contents, installed into a fresh venv
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
import pathlib
import pickle
import re
import runpy
import shutil
import site
import subprocess
import sys
import tempfile
import warnings
import zipfile
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
import hrwkv7_cli
import hrwkv7_loop
import hrwkv7_ref
import wkv_kernel
from convert import (LazyStateDict, TensorRef, default_lora_ranks, hxa079_init, init_from_teacher, load_checkpoint,
                     parse_size, save_checkpoint)
from fla_adapter import fla_dplr_recurrence, load_fla_dplr_naive
from hrwkv7_ref import (HXA079_BIASES, REKA_FLASH_31, TINY, HRWKV7Config, HRWKV7ForCausalLM, HRWKV7State, RMSNorm,
                        apply_rope, attention_transient_bytes, causal_attention, causal_attention_reference, rope_cos_sin,
                        sample, state_bytes)
from wkv_kernel import (HAS_TRITON, IMPLS, TRITON_INTERPRETED, pick_impl, wkv7, wkv7_chunked, wkv7_compiled,
                        wkv7_naive, wkv7_triton)

try:
    import transformers
except ImportError:                     # CI installs it; a bare checkout skips those tests
    transformers = None

# HRWKV7_TEST_CUDA=1: the Triton kernels run on the GPU (conftest.py then leaves TRITON_INTERPRET
# unset), and the GPU-only tests run too
WANT_CUDA = os.environ.get("HRWKV7_TEST_CUDA") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))   # the repository root: the modules, golden/, notebooks/

settings.register_profile("ci", max_examples=10, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# =================================================================================================
# 0  Shared fixtures: one factory per kind of fixture, used by the sections below


def rel_err(x, ref):
    """max |x - ref| / max |ref| (a norm-wise relative error, so tiny entries don't dominate)."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300)).item()


def tiny_model(config=TINY, seed=0, dtype=torch.float64):
    """A random HRWKV7 model of `config` (an HRWKV7Config or its dict) in eval mode, its weights in
    `dtype` (init_random(seed) draws them in float64, then rounds); its config is model.config."""
    cfg = config if isinstance(config, HRWKV7Config) else HRWKV7Config.from_dict(config)
    return HRWKV7ForCausalLM(cfg).to(dtype).init_random(seed=seed).eval()


def save_hf(path, cfg, sd, shards=1, write_config=True):
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


def load_tensors(path):
    """Every tensor of the *.safetensors files in directory `path`, read with safetensors' own reader."""
    return {k: v for f in sorted(pathlib.Path(path).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def read_json(path):
    with open(path) as f:
        return json.load(f)


# tiny teachers: hidden 32-64, vocab 101; every kind is a different code path of the conversion
# (section 6 runs each; section 4 writes its own kinds, CONVERT_TEACHERS, with safetensors)
TEACHER_KINDS = {
    # plain Llama GQA: 4 query heads on 2 KV heads
    "llama": dict(arch="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    # Qwen2: q/k/v biases (no config flag), head size 12 (not a power of two, like Reka's 96)
    "qwen2_bias": dict(arch="qwen2", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12),
    # Qwen3: per-head q/k RMSNorm, head_dim 16 != hidden_size // heads
    "qwen3_qknorm": dict(arch="qwen3", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # multi-query (one KV head) with the LM head tied to the embeddings
    "llama_mqa_tied": dict(arch="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=8, tie_word_embeddings=True),
    # written in several shards (model.safetensors.index.json)
    "llama_sharded": dict(arch="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=8, max_shard_size="20KB"),
}
TEACHER_ARCHS = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}


def transformers_classes(arch):
    """(config class, model class) of a transformers architecture name."""
    names = TEACHER_ARCHS[arch]
    return getattr(transformers, names + "Config"), getattr(transformers, names + "ForCausalLM")


def teacher_weight(name, shape, gen):
    """A teacher's random weight, float64: embeddings N(0, 1), Linear weights N(0, 1/fan_in) (so
    q.k / sqrt(N) is O(1) and attention is far from uniform), norm weights 1 + N(0, 0.2^2), biases
    N(0, 0.3^2)."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    if name.endswith("norm.weight"):
        return 1 + 0.2 * noise
    if name.endswith(".bias"):
        return 0.3 * noise
    if "embed_tokens" in name:
        return noise
    return noise / math.sqrt(shape[1])


def teacher_shapes(arch, c):
    """name -> shape of the tensors of an `arch` checkpoint (HF names) with config dict `c`, in the
    order transformers creates them (so teacher_weight draws the same values for either writer):
    Qwen2 has q/k/v biases, Qwen3 q/k norms; no lm_head when the head is tied."""
    C, H, KV, ffn = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    N = c.get("head_dim") or C // H
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], C)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", H * N), ("k_proj", KV * N), ("v_proj", KV * N)):
            shapes[p + f"self_attn.{proj}.weight"] = (rows, C)
            if arch == "qwen2":
                shapes[p + f"self_attn.{proj}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (C, H * N)
        if arch == "qwen3":
            shapes.update({p + "self_attn.q_norm.weight": (N,), p + "self_attn.k_norm.weight": (N,)})
        shapes.update({p + "mlp.gate_proj.weight": (ffn, C), p + "mlp.up_proj.weight": (ffn, C),
                       p + "mlp.down_proj.weight": (C, ffn), p + "input_layernorm.weight": (C,),
                       p + "post_attention_layernorm.weight": (C,)})
    shapes["model.norm.weight"] = (C,)
    if not c.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (c["vocab_size"], C)
    return shapes


def make_teacher(path, kind, n_layers, seed=0, dtype=torch.float64, writer="transformers", **config_overrides):
    """A random `kind` teacher (a TEACHER_KINDS name or such a dict) of n_layers layers, written to
    `path` in `dtype`; returns `path`. Weights: teacher_weight, drawn in float64, then rounded.

    writer="transformers": built by transformers and written with its save_pretrained, config.json as
        transformers >= 5 writes it ("dtype", `rope_parameters`, no top-level `rope_theta`): section 6.
    writer="safetensors": the same config keys and tensors (teacher_shapes: the names, shapes and
        order transformers creates, so the same values), with "architectures", "model_type" and
        "torch_dtype", written by save_hf in 2 shards, so that section 4 needs no transformers. A
        top-level rope_theta in the kind or the overrides replaces `rope_parameters` (the layout
        transformers < 5 wrote)."""
    spec = dict(TEACHER_KINDS[kind] if isinstance(kind, str) else kind)
    arch, max_shard_size = spec.pop("arch"), spec.pop("max_shard_size", None)
    kw = dict(vocab_size=101, intermediate_size=64, num_hidden_layers=n_layers, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
    kw.update(spec)
    kw.update(config_overrides)
    gen = torch.Generator().manual_seed(seed)
    if writer == "safetensors":
        if "rope_theta" in kw:
            del kw["rope_parameters"]
        config = {"architectures": [TEACHER_ARCHS[arch] + "ForCausalLM"], "model_type": arch, **kw,
                  "torch_dtype": str(dtype).removeprefix("torch.")}
        sd = {name: teacher_weight(name, shape, gen).to(dtype) for name, shape in teacher_shapes(arch, kw).items()}
        save_hf(pathlib.Path(path), config, sd, shards=2)
        return path
    assert writer == "transformers", writer
    config_cls, model_cls = transformers_classes(arch)
    model = model_cls(config_cls(**kw)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(teacher_weight(name, p.shape, gen))
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **extra)
    return path


# =================================================================================================
# 1  wkv_kernel.py
# The WKV kernel suite runs the same properties on each form, or with --wkv-impl on any function
# with wkv_kernel's signature (conftest.py); then the definition, wkv7_chunked and wkv7_triton on
# what the suite does not reach.


HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if WANT_CUDA and HAS_CUDA else "cpu"
NAMES = ("r", "w", "k", "v", "a", "b", "state")


# =================================================================================================
# 1.1  WKV inputs: one generator, and the strategy that draws its cases


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


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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
# 1.2  Tolerances: one helper, assert_close
# An output is compared with the float64 loop run on the very same (rounded) inputs, so only the
# arithmetic and the output's own rounding count:
#     |got - ref| <= rtol * |ref| + atol * max|ref|      elementwise
# (the atol term covers entries near 0 whose error comes from O(max) terms that cancelled).
#  - float64: a few hundred roundings of 1.1e-16, amplified by the O(1) condition of the triangular
#    solve and the state products: ~1e-13 observed; 1e-10 leaves room and still fails any slip.
#  - float32: the same in float32 (eps 6e-8), plus the chunked form's exp(g) of a running sum g
#    (relative error ~|g| eps <= 2.4e-6 at C = 64, wkv7_chunked step 5): ~3e-6 of max|ref| observed.
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
# 1.3  The properties: plain functions of a kernel f(r, w, k, v, a, b, state) -> (y, S_T) and inputs


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
# 1.4  The kernels the suite runs on: the project's forms, or --wkv-impl package.module:function


@dataclasses.dataclass(eq=False)
class Kernel:
    """A kernel for the suite: f(r, w, k, v, a, b, state) -> (y, S_T) on CPU tensors, and its budget.

    examples  the share of the profile's examples each property draws for it
    dtypes    the dtypes the suite tries (a dtype it refuses, by raising on a tiny input, is skipped)
    grads     whether the suite tries gradients (skipped when it raises under autograd or returns
              outputs without a graph)
    min_T     the shortest sequence one call gets (also each part in test_state_carries)
    shapes    keyword arguments of `cases` but T: the shapes, decays, ... to draw"""
    name: str
    fn: Callable
    examples: float = 1.0
    dtypes: tuple = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    grads: bool = True
    min_T: int = 1
    shapes: dict = dataclasses.field(default_factory=dict)


def on_device(f, device):
    """f run on `device`, inputs and outputs on the CPU (autograd passes through the copies)."""
    if device == "cpu":
        return f

    def run(*xs):
        y, S = f(*(None if x is None else x.to(device) for x in xs))
        return y.cpu(), S.cpu()
    return run


@functools.cache
def own_kernels():
    return (
        Kernel("chunked", wkv7_chunked),
        # the interpreter runs the programs one after the other: shorter sequences (still over two chunks)
        Kernel("triton", on_device(wkv7_triton, DEVICE), examples=0.5, shapes=dict(H=(1, 2), T_max=40)),
        # each new case class compiles anew, 20-50 s on a 2-core CPU: a new dtype or head size, one chunk
        # (n = 1) or several, B * H = 1 or more, sizes equal or not (n == B * H), and, after the graph
        # break, a strongly decaying chunk or not. So: float32, head size 24, 2 to 7 chunks of 16,
        # B * H = 8, the model's decays (the strong-decay branch is wkv7_chunked's own code after the
        # break, tested there). One compile.
        Kernel("compiled", functools.partial(wkv7_compiled, chunk_size=16), examples=0.3, dtypes=(torch.float32,),
               grads=False, min_T=17, shapes=dict(head_sizes=(24,), B=(2, 2), H=(4, 4), decays=("hxa079",))),
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
    if dtype not in kernel.dtypes:
        pytest.skip(f"{kernel.name}: {dtype} is not in its test budget")
    if grad and not kernel.grads:
        pytest.skip(f"{kernel.name}: gradients are not in its test budget")
    why = refusal(kernel, dtype, grad)
    if why is not None:
        pytest.skip(f"{kernel.name} refuses {dtype}{' with gradients' if grad else ''}: {why}")


def budget(kernel, examples):
    """Hypothesis settings for `examples` examples (profile "ci") scaled by the kernel's share."""
    n = max(1, round(examples * kernel.examples * settings.default.max_examples / 10))
    return settings(max_examples=n, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# =================================================================================================
# 1.5  The kernel suite: every form against the float64 loop


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
    runs_f64 = torch.float64 in kernel.dtypes and refusal(kernel, torch.float64) is None
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
# 1.6  The suite catches planted errors: each property fails on a kernel with a planted error


def decay_after_write(r, w, k, v, a, b, state=None):
    """wkv7_naive with a planted error: the decay applied after the write,
    S_t = diag(exp(w_t)) (S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T)."""
    sd = state_dtype(r.dtype)
    B, T, H, K = r.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=sd) if state is None else state.clone()
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


# =================================================================================================
# 1.7  The definition: the naive loop (a hand-computed example, dtypes, bad input, fla-core's recurrence)


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
    with pytest.raises(ValueError, match="state has shape"):
        wkv7(x, x, x, x, x, x, torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="state has dtype"):
        wkv7(x, x, x, x, x, x, torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown impl"):
        wkv7(x, x, x, x, x, x, impl="fast")


@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
def test_float32_log_decay_beside_half_inputs(impl):
    # the model passes w in float32 beside bf16/fp16 r, k, v, a, b (one bf16 rounding of w near -5
    # moves the decay by ~1.6%): each form takes it and matches the float64 loop on those inputs
    if impl == "triton" and not (HAS_TRITON and (TRITON_INTERPRETED or DEVICE == "cuda")):
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
    if load_fla_dplr_naive() is None:
        pytest.skip("fla-core is not installed")
    check_matches_loop(fla_dplr_recurrence, *wkv_inputs(Case(2, 40, 3, 16, 16, torch.float32, decay, seed=21)))


# =================================================================================================
# 1.8  wkv7_chunked: its tunables, the factored/pairwise threshold, edge cases, the dispatcher


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
    C = 16
    xs, S0 = wkv_inputs(Case(1, 2 * C, 2, 24, 24, dtype, seed=7))
    span = span_factor * (60.0 if dtype == torch.float32 else 600.0)
    xs[1][:, C:, :, 0] = -span / C                     # channel 0 of the second chunk decays by `span`
    check_matches_loop(functools.partial(wkv7_chunked, chunk_size=C), xs, S0)


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
    decays to the chunk end, g_C - g_s, as a difference of two running sums (~ -1000 there) instead
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
    model = tiny_model({**TINY, "transformer_layers": [0]}, seed=5)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.wkv_impl = "naive"
        want, st_want = model(ids)
        model.wkv_impl = "chunked"
        got, st_got = model(ids)
    assert_close(got, want, "logits")
    for i, (S_got, S_want) in enumerate(zip(st_got.layers[1:], st_want.layers[1:])):
        assert_close(S_got, S_want, f"state of layer {i + 1}")


# =================================================================================================
# 1.9  wkv7_triton: what the suite does not reach (its paths, tunables and refusals), in Triton's
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
    """Either kernel at any length (the chunked one also for T < C), chunks of 16 or 32."""
    check_matches_loop(functools.partial(triton_on_device, path=path, chunk_size=chunk_size), *wkv_inputs(case))


@needs_triton
@pytest.mark.parametrize("w_case", ["edge_factored", "edge_pairwise", "mixed_chunks", "hard_reset"])
def test_triton_strong_decay_is_exact(w_case):
    """A chunk whose span max_k(-g_C) is over max_factored_span takes the pairwise branch; at w = -30
    per step a chunk spans 480, where the factored split would need exp(480): inf, then NaN."""
    C, edge_w = TRITON["chunk_size"].default, -TRITON["max_factored_span"].default / TRITON["chunk_size"].default
    xs, S0 = wkv_inputs(Case(1, 2 * C + 5, 1, 24, 24, torch.float32, seed=4))
    w = xs[1]
    if w_case == "edge_factored":                                        # span 60: the factored path's limit
        w.fill_(edge_w)
    elif w_case == "edge_pairwise":                                      # just over it: pairwise
        w.fill_(edge_w * 1.01)
    elif w_case == "mixed_chunks":                                       # weak, strong, weak + one strong token
        w[:, C:2 * C] = -30.0
        w[:, 2 * C + 2] = -30.0
    elif w_case == "hard_reset":                                         # exp(w) == 0 in float32 on some tokens
        w[:, 3::7] = -1e4
    check_matches_loop(functools.partial(triton_on_device, path="chunked"), xs, S0)


@needs_triton
def test_triton_decode_after_prefill_equals_one_pass():
    """Prefill by the chunked kernel, then T == 1 steps (auto: the recurrent kernel), state carried."""
    C = TRITON["chunk_size"].default
    xs, S0 = wkv_inputs(Case(1, 2 * C + 3, 2, 64, 64, torch.float32, seed=1))

    def prefill_then_decode(*x):
        y, S = triton_on_device(*(t[:, :2 * C] for t in x[:6]), x[6])
        ys = [y]
        for t in range(2 * C, x[0].shape[1]):
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
                  (m._wkv7_fwd_chunked_kernel, dict(C=tune["chunk_size"], MAX_SPAN=tune["max_factored_span"]))):
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
# 1.10  wkv7_triton on a GPU only (HRWKV7_TEST_CUDA=1 on a CUDA machine)


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
# 2  hrwkv7_ref.py
# The model against an independent float64 definition of it (the oracle, 2.1), its parts against
# their definitions, decoding against prefill, loading, generation.


# =================================================================================================
# 2.1  The oracle: hrwkv7_loop.py, the whole model one token at a time in float64, written from
# SPEC.md apart from hrwkv7_ref (its own loops, RoPE, softmax attention and WKV step; section 3
# checks the file itself). One entry point, used by sections 2.6 and 2.8:
# oracle_logits(sd, cfg, ids) -> float64 logits [B, T, V].


def oracle_logits(sd, cfg, ids):
    """float64 logits [B, T, V] of the model with state dict `sd` and HRWKV7Config `cfg` on ids [B, T]."""
    return hrwkv7_loop.logits(cfg.to_dict(), sd, ids)


# =================================================================================================
# 2.2  Config


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


# =================================================================================================
# 2.3  RoPE


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


# =================================================================================================
# 2.4  GQA with its cache against plain causal attention written independently


@given(H_per_KV=st.sampled_from([1, 2, 3]), KV=st.sampled_from([1, 2]), T=st.integers(1, 7),
       P=st.integers(0, 5), qk_norm=st.booleans())
def test_gqa_cache_equals_plain_causal_attention(H_per_KV, KV, T, P, qk_norm):
    H, N = KV * H_per_KV, 6
    cfg = HRWKV7Config.from_dict({**TINY, "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": N,
                                  "hidden_size": 12, "enable_qk_norm": qk_norm, "transformer_layers": [0]})
    layer = tiny_model(cfg).model.layers[0].self_attn
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


# =================================================================================================
# 2.5  causal_attention (SDPA) against causal_attention_reference (the formula), and the model on it


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
        assert rel_err(fast, exact) < 1e-12


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


def test_model_4096_whole_equals_split_equals_token_by_token(monkeypatch):
    """On the fast path, float32: a 4096-token prefill == 3000 tokens (fresh prefill: is_causal) +
    1088 (after a cache: the blocked path, 1088 queries over 4088 keys in 2 blocks) + 8 tokens one
    at a time (decode: no mask), the state carried; logits to 1e-5 relative, the caches too."""
    sdpa, calls = F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], k.shape[2], attn_mask is not None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_model(HRWKV7Config.from_dict(TINY)).float()
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
    assert rel_err(torch.cat([a, b] + steps, dim=1), whole) < 1e-5
    assert st.pos == state.pos == 4096
    for s, w in zip(st.layers, state.layers):
        for x, y in zip(s if isinstance(s, tuple) else [s], w if isinstance(w, tuple) else [w]):
            assert x.shape == y.shape and rel_err(x, y) < 1e-5


# =================================================================================================
# 2.6  The model against the oracle; parallel, split and token-by-token decoding agree


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


@given(cfg=tiny_configs(), T=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
@settings(max_examples=6)
def test_model_matches_independent_oracle(cfg, T, seed):
    model = tiny_model(cfg, seed)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, _ = model(ids)
    want = oracle_logits(model.state_dict(), cfg, ids)
    assert rel_err(logits, want) < 1e-10


@given(cfg=tiny_configs(), T=st.integers(2, 20), data=st.data())
def test_parallel_equals_split_equals_stepwise(cfg, T, data):
    model = tiny_model(cfg, data.draw(st.integers(0, 2 ** 16)))
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
    model = tiny_model(cfg)
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


# =================================================================================================
# 2.7  The model's input checks: bad ids and states get clear errors


def test_bad_inputs_raise_clear_errors():
    cfg = HRWKV7Config.from_dict(TINY)
    model = tiny_model(cfg)
    with pytest.raises(ValueError, match="token id 128"):
        model(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.tensor([[1.0, 2.0]]))
    _, state = model(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.tensor([[1]]), state)
    other = tiny_model(HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]}))
    with pytest.raises(ValueError, match="layer 1 is GQA"):
        other(torch.tensor([[1], [2]]), state)
    with pytest.raises(ValueError, match="float32"):
        model.float()(torch.tensor([[1], [2]]), state)


def test_state_of_another_batch_size_is_refused_by_name_before_an_rwkv_layer_runs(monkeypatch):
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [3]})       # layers 0, 1, 2 are RWKV
    model = tiny_model(cfg, dtype=torch.float32)
    _, state = model(torch.tensor([[1, 2], [3, 4]]))
    calls = []
    monkeypatch.setattr(hrwkv7_ref, "wkv7", lambda *a, **k: calls.append(1))
    for ids in (torch.tensor([[1]]), torch.tensor([[1], [2], [3]])):
        with pytest.raises(ValueError, match=rf"state\.layers\[0\] \(RWKV\).*batch size 2.*input_ids has batch "
                                             rf"size {ids.shape[0]}"):
            model(ids, state)
    assert calls == []                                        # refused before any kernel ran


# =================================================================================================
# 2.8  Loading: from_pretrained (float64, two files alone, device_map, bfloat16), the hub cache and
# the chat command


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


@pytest.mark.parametrize("shards", [1, 3])
def test_from_pretrained_float64_matches_oracle(tmp_path, shards):
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [0, 3], "enable_qk_norm": True,
                                  "attention_bias": True})
    src = tiny_model(cfg, seed=3)
    save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards)
    model = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        logits, state = model(ids)
    assert all((s.dtype if torch.is_tensor(s) else s[0].dtype) == torch.float64 for s in state.layers)
    assert rel_err(logits, oracle_logits(src.state_dict(), cfg, ids)) < 1e-10


def test_two_files_copied_alone_load_a_checkpoint(tmp_path):
    # hrwkv7_ref.py + wkv_kernel.py in an empty folder load an HF checkpoint (sharded) with torch and
    # safetensors alone, and give the logits of the model that was saved
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]})
    src = tiny_model(cfg, seed=4)
    save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards=2)
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
    src = tiny_model(cfg, seed=6).float()
    save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards=2)
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


def test_bfloat16_model_computes_its_decay_path_in_float32(monkeypatch):
    import hrwkv7_ref
    seen = []

    def spy(r, w, *rest, **kw):
        seen.append((r.dtype, w.dtype))
        return wkv7(r, w, *rest, **kw)
    monkeypatch.setattr(hrwkv7_ref, "wkv7", spy)
    model = tiny_model(HRWKV7Config.from_dict(TINY)).bfloat16()
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3, 4]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert seen and set(seen) == {(torch.bfloat16, torch.float32)}


def test_bfloat16_weights_float32_compute_match_float64(tmp_path):
    # the same bf16-rounded weights, run once in float64 and once stored bf16 / computed float32
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1], "hidden_size": 64, "head_dim": 16})
    src = tiny_model(cfg, seed=7).bfloat16()
    save_hf(tmp_path / "ckpt", cfg, src.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(7))
    ref = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    model = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}   # stored: bf16 only
    with torch.no_grad():
        got, want = model(ids)[0], ref(ids)[0]
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5     # float32 rounding, not bf16's


def test_repo_id_from_the_hub_cache_and_the_chat_command(tmp_path):
    # an HF repo id resolved offline from a hub cache (sharded files as links into blobs/), by the
    # model, by convert.py and by the command users run, with the checkpoint's own chat template
    pytest.importorskip("huggingface_hub")
    pytest.importorskip("jinja2")
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]})
    src = tiny_model(cfg, seed=8).float()
    ckpt = save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards=3)
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
import torch, convert, hrwkv7_cli
from hrwkv7_ref import HRWKV7ForCausalLM, resolve_checkpoint
from hrwkv7_cli import chat_prompt
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
hrwkv7_cli.main(["--model", "owner/tiny-hxa079", "--prompt", "a b c", "--chat", "--temperature", "0",
                 "--max-new-tokens", "6"])   # what `python hrwkv7_cli.py --model ...` runs
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
    src = tiny_model(cfg)
    save_hf(tmp_path / "ok", cfg, src.state_dict())
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


# =================================================================================================
# 2.9  Generation and memory accounting


def test_generate_greedy_equals_argmax_of_full_forward():
    cfg = HRWKV7Config.from_dict(TINY)
    model = tiny_model(cfg)
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
    model = tiny_model(cfg)
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
    model = tiny_model(cfg)
    _, state = model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"caches 3 positions but state.pos=2"):
        model(torch.tensor([[4]]), HRWKV7State(state.layers, 2))


def test_state_bytes_formula_matches_a_real_state():
    model = tiny_model(TINY, dtype=torch.float32)
    cfg = model.config
    with torch.no_grad():
        _, state = model(torch.randint(0, cfg.vocab_size, (3, 7)))
    rwkv, kv = state_bytes(cfg, 7, batch=3, kv_bytes=4, state_bytes_per=4)
    assert state.nbytes() == {"rwkv_state": rwkv, "kv_cache": kv}


def test_generate_without_a_seed_leaves_the_global_rng_alone():
    model = tiny_model(TINY, dtype=torch.float32)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = model.generate(torch.tensor([[1, 2, 3]]), 8, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), before)
    b = model.generate(torch.tensor([[1, 2, 3]]), 8, temperature=1.0, seed=5)
    assert torch.equal(b, model.generate(torch.tensor([[1, 2, 3]]), 8, temperature=1.0, seed=5))
    assert torch.equal(torch.get_rng_state(), before) and a.shape == b.shape


@pytest.mark.parametrize("std", [0.02, 0.5])
def test_init_random_draws_the_projections_with_the_std_given(std):
    model = HRWKV7ForCausalLM(HRWKV7Config.from_dict(TINY)).double().init_random(std=std)
    plain = torch.cat([p.flatten() for name, p in model.named_parameters()
                       if name.endswith(("proj.weight", "receptance.weight", "key.weight", "value.weight",
                                         "output.weight", "embed_tokens.weight", "lm_head.weight"))])
    assert plain.numel() > 50_000
    assert abs(plain.std().item() / std - 1) < 0.02 and abs(plain.mean().item()) < 0.02 * std


def test_reka_preset_has_the_released_layout():
    cfg = HRWKV7Config.from_dict(REKA_FLASH_31)
    assert cfg.transformer_layers == [8, 15, 22, 29, 36, 43] and not cfg.enable_qk_norm
    assert cfg.layer_kinds == "".join("G" if i in (8, 15, 22, 29, 36, 43) else "R" for i in range(44))
    run = subprocess.run([sys.executable, "hrwkv7_ref.py"], capture_output=True, text=True, cwd=HERE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "GQA at 8, 15, 22, 29, 36, 43" in run.stdout and "illustrative" not in run.stdout
    run = subprocess.run([sys.executable, "hrwkv7_ref.py", "--model", "x"], capture_output=True, text=True, cwd=HERE)
    assert run.returncode == 2 and "hrwkv7_cli.py" in run.stderr and not run.stdout   # the demo takes no arguments


# =================================================================================================
# 3  hrwkv7_loop.py and golden/: what a port is checked against
# The per-token definition, the golden vectors made from it (golden/make_golden.py), their checker
# (golden/check.py) and the known wrong variants (golden/variants.py). golden/ is not a package: a
# porter runs its scripts as files, so its modules are imported from its folder.

GOLDEN = os.path.join(HERE, "golden")
sys.path.insert(0, GOLDEN)
check, make_golden, variants = (importlib.import_module(name) for name in ("check", "make_golden", "variants"))
CASES = sorted(make_golden.CASES)


def golden(case):
    return load_file(os.path.join(GOLDEN, case, "vectors.safetensors"))


def model_state_tensors(state: HRWKV7State) -> dict:
    """The model's state under the golden names (state.layers.{i}.S / .k_cache / .v_cache, state.pos)."""
    return make_golden.state_tensors({"layers": state.layers, "pos": state.pos})


def split_run_model(model, ids):
    """make_golden.split_run (the pieces of SPLIT, the state carried) with the model in the loop's place."""
    with torch.no_grad():
        return make_golden.split_run(lambda _config, _sd, piece, state: model(piece, state), None, None, ids)


def port_tensors_of_loop(loop, case) -> dict:
    """What a port built like `loop` (a module with run) writes for a golden case, in float64."""
    config, sd = make_golden.CASES[case][0], load_file(os.path.join(GOLDEN, case, "model.safetensors"))
    ids = golden(case)["input_ids"]
    full, _ = loop.run(config, sd, ids)
    split, state = make_golden.split_run(loop.run, config, sd, ids)
    return {"logits": full, "split_logits": split, **make_golden.state_tensors(state)}



# =================================================================================================
# 3.1  The definition: hrwkv7_loop.py imports torch only and equals the model


def test_loop_imports_torch_and_the_standard_library_only():
    tree = ast.parse(open(os.path.join(HERE, "hrwkv7_loop.py")).read())
    top = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    names = {alias.name.split(".")[0] for n in ast.walk(ast.Module(top, [])) if isinstance(n, ast.Import)
             for alias in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(ast.Module(top, [])) if isinstance(n, ast.ImportFrom)}
    assert names <= {"torch", "math"}, names


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
    model = HRWKV7ForCausalLM(cfg).double().init_random(seed=seed).eval()
    sd = model.state_dict()
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    cut = data.draw(st.integers(1, T - 1))
    with torch.no_grad():
        want, _ = model(ids)
        _, st_a = model(ids[:, :cut])
        want_b, st_b = model(ids[:, cut:], st_a)
    assert rel_err(hrwkv7_loop.logits(config, sd, ids), want) < 1e-12
    _, loop_a = hrwkv7_loop.run(config, sd, ids[:, :cut])
    got_b, loop_b = hrwkv7_loop.run(config, sd, ids[:, cut:], loop_a)
    assert rel_err(got_b, want_b) < 1e-12
    assert loop_b["pos"] == st_b.pos == T
    for i, (s, r) in enumerate(zip(loop_b["layers"], st_b.layers)):
        assert isinstance(s, tuple) == isinstance(r, tuple) == cfg.is_gqa(i)
        for x, y in zip(s if isinstance(s, tuple) else [s], r if isinstance(r, tuple) else [r]):
            assert x.shape == y.shape and rel_err(x, y) < 1e-12


def test_loop_never_changes_the_state_it_is_given():
    config, sd = make_golden.CASES["gqa0_qknorm_bias"][0], load_file(
        os.path.join(GOLDEN, "gqa0_qknorm_bias", "model.safetensors"))
    ids = golden("gqa0_qknorm_bias")["input_ids"]
    _, state = hrwkv7_loop.run(config, sd, ids[:, :3])
    before = make_golden.state_tensors(state)
    hrwkv7_loop.run(config, sd, ids[:, 3:5], state)
    after = make_golden.state_tensors(state)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_loop_refuses_what_it_does_not_compute():
    config = make_golden.CASES["released_layout"][0]
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        hrwkv7_loop.logits({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 8e6}}, {},
                           torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"integer tensor \[B, T\]"):
        hrwkv7_loop.logits(config, {}, torch.zeros(1, 2))


def test_loop_main_checks_itself(capsys):
    runpy.run_path(os.path.join(HERE, "hrwkv7_loop.py"), run_name="__main__")
    assert "hrwkv7_loop vs hrwkv7_ref" in capsys.readouterr().out


# =================================================================================================
# 3.2  The golden vectors


@pytest.mark.parametrize("case", CASES)
def test_golden_case_is_what_the_loop_and_the_model_compute(case):
    """The stored logits, split logits and state == hrwkv7_loop and hrwkv7_ref (float64) to 1e-12, so
    the vectors cannot drift from either; the directory loads with from_pretrained."""
    vec = golden(case)
    loop = port_tensors_of_loop(hrwkv7_loop, case)
    assert set(loop) == {k for k in vec if "__" not in k} - {"input_ids", "split_lengths"}
    for name, t in loop.items():
        assert t.shape == vec[name].shape and t.dtype == vec[name].dtype, name
        assert (torch.equal(t, vec[name]) if name == "state.pos" else rel_err(t, vec[name]) < 1e-12), name
    model = HRWKV7ForCausalLM.from_pretrained(os.path.join(GOLDEN, case), dtype=torch.float64)
    with torch.no_grad():
        full, _ = model(vec["input_ids"])
    split, state = split_run_model(model, vec["input_ids"])
    assert rel_err(full, vec["logits"]) < 1e-12 and rel_err(split, vec["split_logits"]) < 1e-12
    for name, t in model_state_tensors(state).items():
        assert t.shape == vec[name].shape and rel_err(t, vec[name]) < 1e-12, name
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
        a, b = load_file(mine), load_file(new)
        assert a.keys() == b.keys(), name
        for key in a:
            computed = name.endswith("vectors.safetensors") and key not in ("input_ids", "split_lengths") or (
                name == "wkv.safetensors" and key.split(".")[1].startswith(("y", "S_T")))
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (name, key)
            assert (rel_err(b[key], a[key]) < 1e-12 if computed else torch.equal(a[key], b[key])), (name, key)


@pytest.mark.parametrize("form", ["naive", "chunked"])
def test_wkv_vectors_match_the_kernels(form):
    g = load_file(os.path.join(GOLDEN, "wkv.safetensors"))
    cases = sorted({k.split(".")[0] for k in g})
    assert any(g[c + ".w"].min() == -30 for c in cases)
    assert any(g[c + ".r"].shape[1] % 16 and g[c + ".r"].shape[1] > 64 for c in cases)
    for c in cases:
        y, S = wkv_kernel.IMPLS[form](*(g[f"{c}.{n}"] for n in ("r", "w", "k", "v", "a", "b")), g[c + ".S_0"])
        assert rel_err(y, g[c + ".y"]) < 1e-12 and rel_err(S, g[c + ".S_T"]) < 1e-12
    assert all(ok for ok, _ in check.check_wkv(wkv_kernel.IMPLS[form], "float64"))


# =================================================================================================
# 3.3  Known wrong variants, caught by name


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
        hit += 1
    assert hit


@pytest.mark.parametrize("slug", variants.WKV_VARIANTS)
def test_wkv_variant_fails_the_wkv_vectors_by_name(slug):
    results = check.check_wkv(variants.load(slug).wkv7, "float32")
    failed = [line for ok, line in results if not ok]
    assert failed and all(f"matches known wrong variant: {variants.VARIANTS[slug][0]}" in line for line in failed)


def transposed_state_kernel(r, w, k, v, a, b, state=None, impl="auto"):
    """A kernel that keeps its state as [V, K]: it reads the state it is given, and writes its
    final state, transposed."""
    y, S = wkv_kernel.wkv7(r, w, k, v, a, b, None if state is None else state.transpose(-1, -2).contiguous(),
                           impl=impl)
    return y, S.transpose(-1, -2).contiguous()


def decay_after_write_kernel(r, w, k, v, a, b, state=None, impl="auto"):
    return variants.load("decay_after_write").wkv7(r, w, k, v, a, b, state)


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
# 3.4  The checker's command line


def run_check(*args):
    return subprocess.run([sys.executable, os.path.join(GOLDEN, "check.py"), *args], cwd=HERE,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


def test_checker_command_line(tmp_path, capsys):
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
                       [["wkv", "wkv_kernel:wkv7_naive", "--dtype", "int8"], "invalid choice"]):
        capsys.readouterr()
        try:
            rc = check.main(argv)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and says in err and err.count("\n") == 1 and err.startswith("error: "), (argv, err)


# =================================================================================================
# 4  convert.py
# Exact round trips (.pth -> HF -> load, sharded, cast), bad checkpoints and outputs refused with an
# error that names them, teacher initialisation. Synthetic tiny checkpoints only.


_FILE_SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
EPS_THETA = {"rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def _pth_name(key, flat=False, value=None):
    """HF name -> RWKV-style .pth name (SPEC.md section 8), optionally storing w0/a0/v0/k0 as [D]
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


def _same_tensors(sd_a, sd_b):
    assert sorted(sd_a) == sorted(sd_b)
    for k in sd_a:
        a, b = sd_a[k], sd_b[k]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k


def _logits_of(model, cfg, seed=1):
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)[0]


# =================================================================================================
# 4.1  Round trips


@_FILE_SETTINGS
@given(gqa=st.sets(st.integers(0, 3), max_size=2), qk_norm=st.booleans(), bias=st.booleans(), tie=st.booleans(),
       flat=st.booleans(), shard_kib=st.sampled_from([None, 8, 40, 1000]))
def test_pth_to_hf_round_trip_is_exact(tmp_path_factory, gqa, qk_norm, bias, tie, flat, shard_kib):
    tmp = tmp_path_factory.mktemp("rt")
    model = tiny_model({**TINY, "transformer_layers": sorted(gqa), "enable_qk_norm": qk_norm,
                        "attention_bias": bias, "tie_word_embeddings": tie}, dtype=torch.float32)
    cfg = model.config
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
    written = {**cfg.to_dict(), "dtype": "float32"}                  # + the dtype the tensors were written in
    assert cfg2 == HRWKV7Config.from_dict(written) and json.loads((tmp / "hf" / "config.json").read_text()) == written
    _same_tensors(dict(sd2), model.state_dict())
    assert (len(summary["files"]) > 1) == (tmp / "hf" / "model.safetensors.index.json").exists()
    loaded = HRWKV7ForCausalLM.from_pretrained(tmp / "hf")
    assert torch.equal(_logits_of(loaded, cfg), _logits_of(model, cfg))


def test_ln_r_becomes_q_norm_in_gqa_layers_and_r_norm_in_rwkv_layers(tmp_path):
    model = tiny_model({**TINY, "transformer_layers": [1], "enable_qk_norm": True}, dtype=torch.float32)
    pth = _save_pth(model, tmp_path / "m.pth")
    assert "blocks.1.att.ln_r.weight" in pth and "blocks.0.att.ln_r.weight" in pth
    _, sd = load_checkpoint(tmp_path / "m.pth", EPS_THETA)
    assert torch.equal(sd["model.layers.1.self_attn.q_norm.weight"], pth["blocks.1.att.ln_r.weight"])
    assert torch.equal(sd["model.layers.0.self_attn.r_norm.weight"], pth["blocks.0.att.ln_r.weight"])
    assert torch.equal(sd["model.layers.1.self_attn.k_norm.weight"], pth["blocks.1.att.ln_k.weight"])
    assert not any("layer_architecture" in k or "head_size_record" in k for k in sd)


def test_flat_vectors_are_reshaped(tmp_path):
    model = tiny_model(TINY, dtype=torch.float32)
    cfg = model.config
    _save_pth(model, tmp_path / "m.pth", flat=True)
    _, sd = load_checkpoint(tmp_path / "m.pth", {**EPS_THETA, "num_attention_heads": 4})
    assert sd.ref("model.layers.0.self_attn.w0").shape == (1, 1, 48)
    assert sd["model.layers.0.self_attn.r_k"].shape == (4, 12)
    # the same in an HF file
    hf_sd = {k: (v.reshape(-1) if k.rsplit(".", 1)[-1] in (*HXA079_BIASES, "r_k") else v)
             for k, v in model.state_dict().items()}
    save_hf(tmp_path / "hf", cfg, hf_sd)
    _, sd = load_checkpoint(tmp_path / "hf")
    _same_tensors(dict(sd), model.state_dict())


def test_sharded_layout_is_hf_format(tmp_path):
    model = tiny_model({**TINY, "transformer_layers": [0, 3]}, dtype=torch.float32)
    cfg = model.config
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
    model = tiny_model({**TINY, "enable_qk_norm": True, "attention_bias": True}, dtype=torch.float32)
    cfg = model.config
    save_hf(tmp_path / "src", cfg, model.state_dict(), shards=3)
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
    model = tiny_model({**TINY, "tie_word_embeddings": True}, dtype=torch.float32)
    cfg = model.config
    save_hf(tmp_path / "a", cfg, model.state_dict(), write_config=False)
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
    model = tiny_model({**TINY, "transformer_layers": [0, 1, 2, 3]}, dtype=torch.float32)
    _save_pth(model, tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"cannot infer num_attention_heads, num_key_value_heads, head_dim"):
        load_checkpoint(tmp_path / "m.pth", EPS_THETA)
    for extra in ({"num_attention_heads": 4}, {"head_dim": 12}):
        got, sd = load_checkpoint(tmp_path / "m.pth", {**EPS_THETA, **extra})
        assert (got.num_attention_heads, got.num_key_value_heads, got.head_size) == (4, 2, 12)
        _same_tensors(dict(sd), model.state_dict())


def test_cli_converts_pth_with_set_dtype_shards_and_force(tmp_path, capsys):
    model = tiny_model(TINY, dtype=torch.float32)
    _save_pth(model, tmp_path / "m.pth")
    argv = [str(tmp_path / "m.pth"), str(tmp_path / "out"), "--set", "rms_norm_eps=1e-5", "--set", "rope_theta=1e4",
            "--set", "note=hello", "--dtype", "bfloat16", "--max-shard-size", "60kB"]
    summary = convert.main(argv)
    out = capsys.readouterr().out
    assert "3 RWKV + 1 GQA" in out and f"{sum(p.numel() for p in model.parameters()):,}" in out
    assert str(summary["bytes_written"]) in out.replace(",", "")
    assert summary["bytes_written"] == sum(os.path.getsize(tmp_path / "out" / f) for f in summary["files"])
    got, sd = load_checkpoint(tmp_path / "out")
    assert got.extra == {"note": "hello", "dtype": "bfloat16"} and len(summary["files"]) > 1
    _same_tensors(dict(sd), {k: v.bfloat16() for k, v in model.state_dict().items()})
    with pytest.raises(FileExistsError, match="--force"):
        convert.main(argv)
    convert.main(argv[:-4] + ["--force"])                            # float32, one file
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000


# =================================================================================================
# 4.2  Bad checkpoints and outputs: every one refused with an error that names it


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABS", "sub/outside.safetensors", "..", "link"])
def test_index_entry_must_be_a_bare_file_name(tmp_path, entry):
    # the rule: a bare file name of the directory; a link the directory's owner made is followed
    model = tiny_model(TINY, dtype=torch.float32)
    cfg = model.config
    ckpt = save_hf(tmp_path / "ckpt", cfg, model.state_dict(), shards=2)
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
    model = tiny_model(TINY, dtype=torch.float32)
    cfg = model.config
    sd = model.state_dict()
    bad = {k: v for k, v in sd.items() if k != "model.layers.3.mlp.up_proj.weight"}
    bad["model.layers.0.self_attn.bonus"] = torch.zeros(3)
    bad["model.norm.weight"] = torch.ones(47)
    save_hf(tmp_path / "bad", cfg, bad)
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
    model = tiny_model(TINY, dtype=torch.float32)
    cfg = model.config
    sd = dict(model.state_dict())
    sd["model.layers.1.self_attn.w1"] = sd["model.layers.1.self_attn.w1"].to(torch.int32)
    sd["model.norm.weight"] = sd["model.norm.weight"] > 0
    save_hf(tmp_path / "ints", cfg, sd)
    with pytest.raises(ValueError, match=r"(?s)cannot be cast.*model\.layers\.1\.self_attn\.w1: torch\.int32.*"
                                         r"model\.norm\.weight: torch\.bool"):
        load_checkpoint(tmp_path / "ints")
    with pytest.raises(ValueError, match=r"model\.norm\.weight: torch\.bool"):
        save_checkpoint(tmp_path / "out", cfg, sd)


def test_truncated_or_corrupt_safetensors_names_the_file(tmp_path):
    model = tiny_model(TINY, dtype=torch.float32)
    cfg = model.config
    ckpt = save_hf(tmp_path / "ckpt", cfg, model.state_dict(), shards=3)
    shard = ckpt / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors: not a valid safetensors file"):
        load_checkpoint(ckpt)
    shard.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors: not a valid safetensors file"):
        load_checkpoint(ckpt)


def test_config_contradicting_the_weights_names_field_and_values(tmp_path):
    model = tiny_model({**TINY, "transformer_layers": [2]}, dtype=torch.float32)
    cfg = model.config
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
    save_hf(tmp_path / "hf", {**cfg.to_dict(), "enable_qk_norm": True}, model.state_dict())
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
    model = tiny_model(TINY, dtype=torch.float32)
    cfg = model.config
    save_checkpoint(tmp_path / "out", cfg, model.state_dict(), max_shard_bytes=20_000)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path / "out"):
        assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o666 & ~umask, name
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask


def test_existing_output_is_kept_without_overwrite(tmp_path):
    model = tiny_model(TINY, dtype=torch.float32)
    cfg = model.config
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(tmp_path / "out", cfg, model.state_dict())
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    save_checkpoint(tmp_path / "out", cfg, model.state_dict(), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failure_while_writing_leaves_nothing_half_written(tmp_path):
    model = tiny_model(TINY, dtype=torch.float32)
    cfg = model.config
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
    save_hf(tmp_path / "src", cfg, model.state_dict(), shards=2)
    _, lazy = load_checkpoint(tmp_path / "src")
    shard = tmp_path / "src" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors: not a valid safetensors file"):
        save_checkpoint(tmp_path / "new", cfg, lazy)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


# =================================================================================================
# 4.3  Initialisation from a teacher (written with safetensors: no transformers needed)


# convert's own teachers, 4 layers, written with safetensors (make_teacher(..., writer="safetensors")) in the
# layout transformers < 5 wrote (top-level rope_theta): a Llama, a Qwen2 (q/k/v biases, no flag, tied
# head), a Qwen3 (q_norm/k_norm, head_dim 12 != hidden_size / heads)
CONVERT_TEACHER = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                       vocab_size=40, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096)
CONVERT_TEACHERS = {"llama": dict(arch="llama", attention_bias=False, **CONVERT_TEACHER),
                    "qwen2": dict(arch="qwen2", **{**CONVERT_TEACHER, "tie_word_embeddings": True}),
                    "qwen3": dict(arch="qwen3", head_dim=12, **CONVERT_TEACHER)}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_init_from_teacher(tmp_path, kind):
    make_teacher(tmp_path / "teacher", CONVERT_TEACHERS[kind], 4, dtype=torch.bfloat16, writer="safetensors")
    teacher = load_tensors(tmp_path / "teacher")
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
    make_teacher(tmp_path / "teacher", CONVERT_TEACHERS["llama"], 4, dtype=torch.float32, writer="safetensors")
    init_from_teacher(tmp_path / "teacher", tmp_path / "s", [2], ranks={"lora_rank_decay": 16, "lora_rank_gate": 8},
                      qkvo_scale=(1, 1, 1, 1))
    cfg, sd = load_checkpoint(tmp_path / "s")
    teacher = load_tensors(tmp_path / "teacher")
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
    make_teacher(tmp_path / "t", CONVERT_TEACHERS["llama"], 4, dtype=torch.bfloat16, writer="safetensors")
    tc, sd = read_json(tmp_path / "t" / "config.json"), load_tensors(tmp_path / "t")
    convert.main(["from-teacher", str(tmp_path / "t"), str(tmp_path / "s"), "--transformer-layers", "1,3",
                  "--seed", "2"])
    assert "2 RWKV + 2 GQA  (RGRG" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "s")[0].transformer_layers == [1, 3]
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_hf(tmp_path / "obias", tc, sd)
    with pytest.raises(ValueError, match="o_proj biases"):
        init_from_teacher(tmp_path / "obias", tmp_path / "x", [1])
    del sd["model.layers.0.self_attn.o_proj.bias"]
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(5, 32)
    sd["model.vision.weight"] = torch.zeros(2)
    save_hf(tmp_path / "bad", tc, sd)
    with pytest.raises(ValueError, match=r"(?s)model\.layers\.2\.mlp\.up_proj\.weight has shape \(5, 32\), expected "
                                         r"\(48, 32\).*model\.vision\.weight has no place"):
        init_from_teacher(tmp_path / "bad", tmp_path / "x", [1])
    with pytest.raises(ValueError, match=r"lacks rope_theta"):
        save_hf(tmp_path / "nocfg", {k: v for k, v in tc.items() if k != "rope_theta"}, {})
        init_from_teacher(tmp_path / "nocfg", tmp_path / "x", [1])
    assert not (tmp_path / "x").exists()


# =================================================================================================
# 5  hrwkv7_cli.py: the command line (stop strings that span several tokens; one error convention,
# shared with convert.py: a bad path, repo id, dtype or device is one `error:` line and exit status 2)


def cli_checkpoint(path, config=TINY, seed=0):
    """A tiny random float32 model saved as an HF directory by convert.py; (path, model)."""
    model = tiny_model(config, seed, dtype=torch.float32)
    convert.save_checkpoint(path, model.config, model.state_dict())
    return path, model


PROMPT_IDS = [5, 6, 7]
STOP_PIECES = ["<", "se", "p>"]          # "<sep>" in three tokens, as a cl100k_base-style tokenizer may split it


@pytest.fixture(scope="module")
def sep_checkpoint(tmp_path_factory):
    """A checkpoint whose greedy continuation of PROMPT_IDS, decoded with its tokenizer.json, holds
    "<sep>" spread over three tokens. The model is random; the tokenizer is built afterwards around
    what it generates: three consecutive generated ids (first seen there) get the pieces "<", "se",
    "p>", every other id the piece "w{id}." (no piece is found inside a concatenation of others but
    at its own place); the decoder joins pieces without spaces (decoders.Fuse).
    Returns (path, generated ids, j) with generated[j:j + 3] the stop string's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    path, model = cli_checkpoint(tmp_path_factory.mktemp("sep") / "ckpt", seed=11)
    gen = model.generate(torch.tensor([PROMPT_IDS]), 16, temperature=0)[0, len(PROMPT_IDS):].tolist()
    j = next(j for j in range(2, len(gen) - 2) if len(set(gen[j:j + 3])) == 3
             and not set(gen[j:j + 3]) & set(gen[:j] + PROMPT_IDS))
    pieces = {i: f"w{i}." for i in range(TINY["vocab_size"])}
    pieces.update(zip(gen[j:j + 3], STOP_PIECES))
    tok = Tokenizer(models.WordLevel({p: i for i, p in pieces.items()}, unk_token=pieces[PROMPT_IDS[0]]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    assert tok.decode(gen[j:j + 3]) == "<sep>" and "<" not in tok.decode(gen[:j])
    return path, gen, j, tok


def run_cli(capsys, path, *extra):
    ids = hrwkv7_cli.main(["--model", str(path), "--prompt", "w5. w6. w7.", "--temperature", "0",
                           "--max-new-tokens", "16", "--device", "cpu", *extra])
    out, err = capsys.readouterr()
    return ids, out, err


def test_stop_string_over_several_tokens_ends_generation_and_is_not_printed(sep_checkpoint, capsys):
    path, gen, j, tok = sep_checkpoint
    ids, out, err = run_cli(capsys, path, "--stop", "<sep>")
    assert out == tok.decode(gen[:j]) + "\n"                 # nothing of "<sep>" was written, not even "<"
    assert ids == PROMPT_IDS + gen[:j + 3]                   # generation ended with the token completing it
    assert f"decode {j + 2} tokens" in err
    ids, out, _ = run_cli(capsys, path)                     # without --stop: "<sep>" is printed, 16 tokens
    assert "<sep>" in out and len(ids) == len(PROMPT_IDS) + 16


def test_stop_is_repeatable_and_generation_config_stop_strings_count(sep_checkpoint, capsys, tmp_path):
    path, gen, j, tok = sep_checkpoint
    early = tok.decode(gen[1:2])                             # a one-token stop string before "<sep>"
    ids, out, _ = run_cli(capsys, path, "--stop", "<sep>", "--stop", early)
    assert out == tok.decode(gen[:1]) + "\n" and ids == PROMPT_IDS + gen[:2]
    ids, out, _ = run_cli(capsys, path, "--stop", "never there", "--stop", "<sep>")
    assert out == tok.decode(gen[:j]) + "\n" and ids == PROMPT_IDS + gen[:j + 3]
    # the same checkpoint with generation_config.json's stop_strings (a list, or one string), no --stop
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for name in os.listdir(path):
        (copy / name).write_bytes((path / name).read_bytes())
    for stops in (["never there", "<sep>"], "<sep>"):
        (copy / "generation_config.json").write_text(json.dumps({"stop_strings": stops}))
        ids, out, _ = run_cli(capsys, copy)
        assert out == tok.decode(gen[:j]) + "\n" and ids == PROMPT_IDS + gen[:j + 3]
    assert hrwkv7_cli.stop_strings(copy) == ["<sep>"]
    # EOS ids still stop, and the EOS token is not printed
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": gen[2], "stop_strings": ["<sep>"]}))
    ids, out, _ = run_cli(capsys, copy)
    assert out == tok.decode(gen[:2]) + "\n" and ids == PROMPT_IDS + gen[:3]


def test_text_stream_holds_back_only_what_may_still_become_a_stop_string(sep_checkpoint):
    _, gen, j, tok = sep_checkpoint
    lt, se, p = gen[j:j + 3]
    other = next(i for i in range(TINY["vocab_size"]) if i not in (lt, se, p))
    writes = []
    stream = hrwkv7_cli.TextStream(tok, ["<sep>"], write=writes.append)
    assert not stream.add(other) and writes == [f"w{other}."]
    assert not stream.add(lt) and not stream.add(se) and writes == [f"w{other}."]   # "<se" held back
    assert not stream.add(other) and writes == [f"w{other}.", f"<sew{other}."]      # no longer a stop: written
    assert not stream.add(lt) and not stream.add(se) and stream.add(p)              # "<sep>" completed
    assert "".join(writes) == f"w{other}.<sew{other}." and stream.stopped
    stream = hrwkv7_cli.TextStream(tok, ["<sep>"], write=writes.append)
    writes.clear()
    stream.add(lt)
    stream.finish()                                          # the end: what was held back is written
    assert writes == ["<"]


def test_text_stream_holds_back_a_character_whose_bytes_are_incomplete():
    # a byte-level tokenizer (one token per byte): "é" is two tokens, and the first decodes to U+FFFD
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ids = tok.encode("aé<sep>b").ids
    assert len(ids) == 9 and tok.decode(ids[:2]) == "a\ufffd"
    writes = []
    stream = hrwkv7_cli.TextStream(tok, ["<sep>"], write=writes.append)
    assert [stream.add(i) for i in ids[:8]] == [False] * 7 + [True]
    assert writes == ["a", "é"]                               # never the replacement character, nothing of "<sep>"


# -----------------------------------------------------------------------------
# One error convention for both commands: one line on stderr, exit status 2, --debug for the traceback


def one_error_line(err, *names):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_bad_path_dtype_device_one_line_exit_2_in_both_commands(tmp_path, capsys):
    path, _ = cli_checkpoint(tmp_path / "ckpt")
    nope = str(tmp_path / "nope")
    for argv, names in [(["--model", nope], [nope]),
                        (["--model", str(path), "--dtype", "float8"], ["--dtype", "float8"]),
                        (["--model", str(path), "--device", "cuda:7"], ["--device", "cuda:7"]),
                        (["--model", str(path), "--device", "gpu0"], ["--device", "gpu0"]),
                        (["--model", str(path), "--top-p", "0"], ["--top-p"]),
                        (["--prompt", "hi"], ["--model"])]:
        with pytest.raises(SystemExit) as exit_:
            hrwkv7_cli.main(argv)
        assert exit_.value.code == 2, argv
        one_error_line(capsys.readouterr().err, *names)
    for argv, names in [([nope, str(tmp_path / "out")], [nope]),
                        ([str(path), str(tmp_path / "out"), "--dtype", "int8"], ["--dtype", "int8"]),
                        ([str(path), str(tmp_path / "out"), "--set", "rms_norm_eps"], ["--set", "rms_norm_eps"]),
                        ([str(path), str(path)], [str(path), "--force"])]:
        with pytest.raises(SystemExit) as exit_:
            convert.cli(argv)
        assert exit_.value.code == 2, argv
        one_error_line(capsys.readouterr().err, *names)
    with pytest.raises(FileNotFoundError, match="nope"):                    # --debug: the exception itself
        hrwkv7_cli.main(["--model", nope, "--debug"])
    with pytest.raises(ValueError, match="cuda:7"):
        hrwkv7_cli.main(["--model", str(path), "--device", "cuda:7", "--debug"])
    with pytest.raises(FileNotFoundError, match="nope"):
        convert.cli([nope, str(tmp_path / "out"), "--debug"])


def test_bad_repo_id_offline_one_line_exit_2_no_traceback(tmp_path):
    pytest.importorskip("huggingface_hub")
    (tmp_path / "hub").mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for command in ([sys.executable, "hrwkv7_cli.py", "--model", "owner/not-there"],
                    [sys.executable, "convert.py", "owner/not-there", str(tmp_path / "out")]):
        run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE)
        assert run.returncode == 2, run.stderr
        one_error_line(run.stderr, "owner/not-there", "HF_HUB_OFFLINE='1'")
        run = subprocess.run(command + ["--debug"], capture_output=True, text=True, env=env, cwd=HERE)
        assert run.returncode == 1 and "Traceback" in run.stderr and "owner/not-there" in run.stderr


# =================================================================================================
# 6  transformers as an external reference (the teachers: make_teacher, section 0)
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
# test_ref.py once merged) when transformers is not installed; CI installs it.


needs_transformers = pytest.mark.skipif(
    transformers is None, reason="transformers is not installed (pip install 'transformers>=5'); "
                                 "these tests use it as an external reference")


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
    err = rel_err(got, want)
    assert err <= 1e-6, f"{kind}: all-GQA student vs transformers (position_ids = 0): rel err {err:.2e}"

    # split prefill: transformers' KV cache against the student's state, same NoPE attention
    s = min(max(1, round(split * T)), T - 1) if T > 1 else None
    if s is not None:
        w1, cache = teacher_logits(teacher, ids[:, :s])
        w2, _ = teacher_logits(teacher, ids[:, s:], cache=cache, past_len=s)
        with torch.no_grad():
            g1, st1 = student(ids[:, :s])
            g2, _ = student(ids[:, s:], st1)
        err = rel_err(torch.cat([g1, g2], 1), torch.cat([w1, w2], 1))
        assert err <= 1e-6, f"{kind}: split prefill at {s} of {T}: rel err {err:.2e}"

        # the comparison can fail: with positions (RoPE on), the same teacher is far from the NoPE student
        rope_on, _ = teacher_logits(teacher, ids, positions="absolute")
        assert rel_err(got, rope_on) > 1e-3


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
    err = rel_err(torch.cat(steps, 1), full)
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
    err = rel_err(got, want)
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
    assert rel_err(got, want) <= 1e-6


# =================================================================================================
# 7  The installed package (pyproject.toml): `pip install .` gives the four modules and the
# two commands
#
# A wheel is built from a copy of the checkout, installed into a fresh venv that sees the
# dependencies already installed here, and used from a folder outside the checkout. Nothing is
# downloaded: the build reuses this interpreter's setuptools (--no-build-isolation), the install
# is --no-index --no-deps, and the new venv reaches torch & co. through a .pth file.


PKG_REPO = os.path.dirname(os.path.abspath(__file__))
PKG_MODULES = {"hrwkv7_ref", "wkv_kernel", "hrwkv7_cli", "convert"}
PKG_COMMANDS = {"hrwkv7", "hrwkv7-convert"}
PKG_CORE_DEPS = {"torch", "numpy", "einops", "safetensors", "tqdm", "tokenizers", "triton"}


def _offline_wheel_builder_missing():
    """Why a wheel cannot be built here without the network, or None when it can."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools (the build backend) is not installed: pip install 'setuptools>=70.1'"
    import setuptools
    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    if version < (61,):
        return f"setuptools {setuptools.__version__} cannot read pyproject.toml's [project] table; needs >=61"
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        return (f"setuptools {setuptools.__version__} needs the `wheel` package to build a wheel; "
                f"pip install 'setuptools>=70.1' (or wheel)")
    return None


def _clean_env():
    """The environment of the subprocesses: no PYTHONPATH (the checkout must not leak in), no pip config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _start(args, cwd):
    return subprocess.Popen(args, cwd=cwd, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p, timeout=180):
    """The stdout of a process started by _start; its command, exit code and output in the failure."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    assert p.returncode == 0, f"{' '.join(map(str, p.args))} -> exit {p.returncode}\n{out}\n{err}"
    return out


def _run(args, cwd):
    return _finish(_start(args, cwd))


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory):
    why = _offline_wheel_builder_missing()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources, and other
    # runs share the checkout. The copy has every top-level file (tests, benches, ...) and the
    # notebooks, so the file list below shows that py-modules keeps them out; other folders
    # (.git, tmp/ with its checkpoints, caches) stay behind.
    src = tmp / "src"
    shutil.copytree(PKG_REPO, src, ignore=lambda folder, names: [
        n for n in names if folder == PKG_REPO and n != "notebooks" and os.path.isdir(os.path.join(folder, n))])
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
              "--no-cache-dir", "-w", tmp / "dist", src], cwd=tmp)
    (whl,) = (tmp / "dist").glob("hrwkv7-*.whl")
    return whl


def test_wheel_holds_the_four_modules_and_declares_the_commands(built_wheel):
    with zipfile.ZipFile(built_wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert {n for n in names if not n.startswith(dist_info + "/")} == {m + ".py" for m in PKG_MODULES}
        meta = z.read(f"{dist_info}/METADATA").decode().splitlines()
        entry_points = {line.strip() for line in z.read(f"{dist_info}/entry_points.txt").decode().splitlines()}
    requires = [line.split(":", 1)[1].strip() for line in meta if line.startswith("Requires-Dist:")]
    core = {re.match(r"[A-Za-z0-9_.-]+", r).group() for r in requires if "extra ==" not in r}
    assert core == PKG_CORE_DEPS
    assert {line.split(":", 1)[1].strip() for line in meta if line.startswith("Provides-Extra:")} == {
        "hub", "notebooks", "dev"}
    assert {"hrwkv7 = hrwkv7_cli:main", "hrwkv7-convert = convert:cli"} <= entry_points


def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_checkout(built_wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    py = venv / "bin" / "python"          # POSIX layout, as on CI
    purelib, scripts = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib')); "
                                           "print(sysconfig.get_path('scripts'))"], cwd=tmp_path).splitlines()
    # The dependencies (and pip) come from this interpreter's site-packages, after the venv's own.
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if p in sys.path]
    with open(os.path.join(purelib, "_outer_site_packages.pth"), "w") as f:
        f.write("\n".join(outer) + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--no-compile",
              "--no-cache-dir", built_wheel], cwd=tmp_path)

    # Three interpreters that import torch: started together, they overlap their start-up.
    importing = _start([py, "-c", "import hrwkv7_ref, wkv_kernel, hrwkv7_cli, convert\n"
                                      "for m in (hrwkv7_ref, wkv_kernel, hrwkv7_cli, convert): print(m.__file__)"], cwd=tmp_path)
    helping = {command: _start([os.path.join(scripts, command), "--help"], cwd=tmp_path)
               for command in sorted(PKG_COMMANDS)}
    paths = _finish(importing).splitlines()
    assert len(paths) == len(PKG_MODULES), paths
    for path in paths:
        assert os.path.dirname(os.path.realpath(path)) == os.path.realpath(purelib), path
    for command, p in helping.items():
        out = _finish(p)
        assert out.startswith("usage:"), f"{command} --help:\n{out}"
