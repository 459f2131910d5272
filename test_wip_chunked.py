"""
Property tests of wkv7_chunked, the chunked parallel form of WKV-7, against the naive loop
(the definition), and of the naive loop against fla-core's independent reference when it is
installed.

    pytest -q test_wip_chunked.py
"""
import contextlib
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wkv_kernel import IMPLS, MAX_FACTORED_SPAN, pick_impl, wkv7, wkv7_chunked, wkv7_naive

_CHUNK_SETTINGS = dict(deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _chunk_rel_err(x, ref):
    """max |x - ref| / max |ref| (a norm-wise relative error, so tiny entries don't dominate)."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300)).item()


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


@settings(max_examples=40, **_CHUNK_SETTINGS)
@given(**_chunk_case)
def test_chunked_matches_naive_float64(seed, B, T, H, N, chunk, decay, ab, with_state, max_span):
    if not _chunk_small(N, T, H, B):
        T = max(1, 120 // (H * B))
    xs, S0 = _chunk_inputs(seed, B, T, H, N, torch.float64, decay, ab, with_state)
    y_ref, S_ref = wkv7_naive(*xs, S0)
    with _chunk_max_span(torch.float64, max_span):
        y, S = wkv7_chunked(*xs, S0, chunk_size=chunk)
    assert y.dtype == S.dtype == torch.float64 and y.shape == y_ref.shape and S.shape == S_ref.shape
    assert _chunk_rel_err(y, y_ref) < 1e-10
    assert _chunk_rel_err(S, S_ref) < 1e-10


@settings(max_examples=40, **_CHUNK_SETTINGS)
@given(**_chunk_case)
def test_chunked_matches_naive_float32(seed, B, T, H, N, chunk, decay, ab, with_state, max_span):
    if not _chunk_small(N, T, H, B):
        T = max(1, 120 // (H * B))
    xs, S0 = _chunk_inputs(seed, B, T, H, N, torch.float32, decay, ab, with_state)
    y_ref, S_ref = wkv7_naive(*xs, S0)
    with _chunk_max_span(torch.float32, max_span):
        y, S = wkv7_chunked(*xs, S0, chunk_size=chunk)
    assert y.dtype == S.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(S).all()
    assert _chunk_rel_err(y, y_ref) < 1e-4
    assert _chunk_rel_err(S, S_ref) < 1e-4


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
    assert _chunk_rel_err(S, S_ref) < 1e-4


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
    assert _chunk_rel_err(y, y_ref) < tol and _chunk_rel_err(S, S_ref) < tol


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
    assert _chunk_rel_err(y, y_ref) < tol and _chunk_rel_err(S, S_ref) < tol
    for name, a, b in zip(("r", "w", "k", "v", "a", "b", "state"), g_chunk, g_ref):
        assert torch.isfinite(a).all(), name
        assert _chunk_rel_err(a, b) < tol, name


@pytest.mark.parametrize("seed", range(4))
def test_chunked_float32_strong_decay_is_as_accurate_as_the_loop(seed):
    # Against a float64 oracle the float32 naive loop is off by ~2e-7 (of max|y|) at w in
    # [-30, 0]. The chunked form must not lose more than a few float32 ulps of the chunk's
    # decays: e.g. taking g_C - g_s as a difference of two cumulative sums of size ~1000
    # would cost ~1000 * 6e-8 = 6e-5, hence the decays to the chunk end summed from the end.
    xs, S0 = _chunk_inputs(seed, 1, 128, 2, 16, torch.float32, "strong", "model", True)
    y_ref, S_ref = wkv7_naive(*(x.double() for x in xs), S0.double())
    y, S = wkv7_chunked(*xs, S0, chunk_size=64)
    assert _chunk_rel_err(y, y_ref) < 5e-6 and _chunk_rel_err(S, S_ref) < 5e-6


def test_chunked_split_sequence_equals_whole():
    # Running [0, t) then [t, T) from the carried state equals one call over [0, T).
    xs, S0 = _chunk_inputs(11, 2, 77, 2, 8)
    y, S = wkv7_chunked(*xs, S0, chunk_size=16)
    y1, S1 = wkv7_chunked(*(x[:, :30] for x in xs), S0, chunk_size=16)
    y2, S2 = wkv7_chunked(*(x[:, 30:] for x in xs), S1, chunk_size=16)
    assert _chunk_rel_err(torch.cat([y1, y2], 1), y) < 1e-12 and _chunk_rel_err(S2, S) < 1e-12


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
        assert _chunk_rel_err(a, b) < 1e-8, name


# -----------------------------------------------------------------------------
# the dispatcher


def test_dispatcher_runs_chunked():
    assert IMPLS["chunked"] is wkv7_chunked
    xs, S0 = _chunk_inputs(5, 2, 50, 3, 16)
    y_n, S_n = wkv7(*xs, S0, impl="naive")
    y_c, S_c = wkv7(*xs, S0, impl="chunked")
    assert _chunk_rel_err(y_c, y_n) < 1e-10 and _chunk_rel_err(S_c, S_n) < 1e-10
    assert pick_impl(xs[0]) == "chunked" and pick_impl(xs[0][:, :1]) == "naive"
    y_a, S_a = wkv7(*xs, S0)
    assert torch.equal(y_a, y_c) and torch.equal(S_a, S_c)


# -----------------------------------------------------------------------------
# the naive loop against an independent implementation: fla-core's dplr_recurrence


def _chunk_fla_dplr():
    """fla/ops/generalized_delta_rule/dplr/naive.py loaded as one file (needs torch and einops
    only; importing the fla package itself would load its Triton kernels)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "ops", "generalized_delta_rule", "dplr", "naive.py")
    if not os.path.exists(path):
        return None
    file_spec = importlib.util.spec_from_file_location("_chunk_fla_dplr_naive", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("decay", ["hxa079", "strong"])
def test_naive_matches_fla_dplr_recurrence(decay):
    dplr = _chunk_fla_dplr()
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
    assert _chunk_rel_err(y, y_fla.transpose(1, 2)) < 1e-5
    assert _chunk_rel_err(S, S_fla) < 1e-5
