"""
wkv7_triton (the Triton forward kernels) against wkv7_naive run in float64 on the same inputs.

By default the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before
torch or triton is imported), so these tests need no GPU. With HRWKV7_TEST_CUDA=1 (and a
CUDA device) the same tests run the compiled kernels on the GPU instead, and the GPU-only
tests at the end run too.
"""
import os

WANT_CUDA = os.environ.get("HRWKV7_TEST_CUDA") == "1"
if not WANT_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

pytest.importorskip("triton")

from wkv_kernel import TRITON_CHUNK, TRITON_MAX_FACTORED_SPAN, wkv7, wkv7_naive, wkv7_triton  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if WANT_CUDA and HAS_CUDA else "cpu"
if not WANT_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("TRITON_INTERPRET was set to something else than 1 and HRWKV7_TEST_CUDA is not 1",
                allow_module_level=True)
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


@settings(deadline=None, max_examples=4)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]), T=st.sampled_from([1, 5, TRITON_CHUNK + 3]),
       K=st.sampled_from([64, 96]), seed=st.integers(0, 2**31 - 1))
def test_half_inputs_match_naive(dtype, T, K, seed):
    inputs, state = make_inputs(1, T, 2, K, K, seed=seed)
    (y, S), (y_ref, S_ref) = run_both(inputs, state, dtype)
    assert_close_rel(y, y_ref, what=f"y ({dtype})", **LOW_TOL[dtype])
    assert_close_rel(S, S_ref, what="S_T", **F32_TOL)


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


def test_empty_sequence():
    (r, w, k, v, a, b), state = make_inputs(1, 0, 2, 24, 24, seed=3)
    y, S = wkv7_triton(*(x.float().to(DEVICE) for x in (r, w, k, v, a, b)), state.float().to(DEVICE))
    assert y.shape == (1, 0, 2, 24) and torch.equal(S.cpu(), state.float())


# --- strong decay -------------------------------------------------------------------------
# A chunk whose total decay span max_k(-g_C) exceeds TRITON_MAX_FACTORED_SPAN takes the
# pairwise branch. At w = -30 per step the span of a chunk is 480: the factored split about
# g_C / 2 would need exp(240) (overflow: inf, then NaN), so exactness here shows the branch.

EDGE_W = -TRITON_MAX_FACTORED_SPAN / TRITON_CHUNK                       # span exactly at the threshold


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

def test_requires_grad_raises():
    (r, w, k, v, a, b), _ = make_inputs(1, 3, 1, 24, 24, seed=5)
    xs = [x.float().to(DEVICE) for x in (r, w, k, v, a, b)]
    xs[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        wkv7_triton(*xs)
    with torch.no_grad():                                                # no graph wanted: allowed
        wkv7_triton(*xs)


def test_float64_raises():
    (r, w, k, v, a, b), _ = make_inputs(1, 3, 1, 24, 24, seed=6)
    with pytest.raises(ValueError, match="float64"):
        wkv7_triton(*(x.to(DEVICE) for x in (r, w, k, v, a, b)))


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

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_long_sequence(dtype):
    """Model shapes (head size 96), a long prefill."""
    inputs, state = make_inputs(2, 1000, 4, 96, 96, seed=8)
    (y, S), (y_ref, S_ref) = run_both(inputs, state, dtype)
    tol = F32_TOL if dtype == torch.float32 else LOW_TOL[dtype]
    assert_close_rel(y, y_ref, what="y", **tol)
    assert_close_rel(S, S_ref, what="S_T", **F32_TOL)


@needs_cuda
def test_cuda_strong_decay():
    inputs, state = make_inputs(1, 300, 2, 64, 64, seed=9, w_min=-30.0)
    (y, S), (y_ref, S_ref) = run_both(inputs, state, torch.float32)
    assert_close_rel(y, y_ref, what="y", **F32_TOL)
    assert_close_rel(S, S_ref, what="S_T", **F32_TOL)
