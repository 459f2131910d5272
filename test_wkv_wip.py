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




def _tiny_model(cfg, seed=0):
    return HRWKV7ForCausalLM(cfg).double().init_random(seed=seed).eval()

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

def test_wkv_bad_inputs():
    x = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="k has shape"):
        wkv7(x, x, x[:, :2], x, x, x)
    with pytest.raises(ValueError, match="state has shape"):
        wkv7(x, x, x, x, x, x, torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="unknown impl"):
        wkv7(x, x, x, x, x, x, impl="fast")

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
