"""
Property tests of wkv7_chunked's segmenting (the chunks go through in segments of about
CHUNKED_SEGMENT_ELEMENTS numbers per tensor, carrying the state between segments): any
segment size gives the naive loop's values and gradients.

    pytest -q test_wip_chunked.py
"""
import contextlib

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wkv_kernel
from wkv_kernel import wkv7_chunked, wkv7_naive

_CHUNK_SETTINGS = dict(deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _chunk_rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300)).item()


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


@settings(max_examples=25, **_CHUNK_SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), T=st.integers(1, 120), H=st.integers(1, 3),
       N=st.sampled_from([2, 8, 24]), chunk=st.sampled_from([4, 16, 32]),
       decay=st.sampled_from(["hxa079", "mixed"]), segment=_chunk_segment_sizes)
def test_chunked_segments_match_naive(seed, B, T, H, N, chunk, decay, segment):
    xs, S0 = _chunk_seg_inputs(seed, B, T, H, N, decay)
    y_ref, S_ref = wkv7_naive(*xs, S0)
    with _chunk_segment_elements(segment or wkv_kernel.CHUNKED_SEGMENT_ELEMENTS):
        y, S = wkv7_chunked(*xs, S0, chunk_size=chunk)
    assert y.shape == y_ref.shape and y.dtype == torch.float64
    assert _chunk_rel_err(y, y_ref) < 1e-10 and _chunk_rel_err(S, S_ref) < 1e-10


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
        assert _chunk_rel_err(y, y_ref) < 1e-4 and _chunk_rel_err(S, S_ref) < 1e-4
    assert _chunk_rel_err(y1, y2) < 1e-5


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
        assert _chunk_rel_err(a, b) < 1e-8, name
