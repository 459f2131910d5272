"""
The WKV-7 recurrence: the definition (a plain loop over time) and its faster forms.
The model it serves, and this recurrence's place in it, are specified in SPEC.md (§5 the
recurrence, §4 the hxa079 time-mix that calls it, §13 its symbols against the RWKV-7 paper's).

Every form here has one signature and one meaning:

    y, S_T = wkv7_<form>(r, w, k, v, a, b, S0=None, <tunables as keyword arguments>)

    r, k, a, b : [B, T, H, K]   receptance, key, and the two vectors of the rank-1 state correction
    w          : [B, T, H, K]   the LOG decay (w <= 0: the state decays by exp(w) per token)
    v          : [B, T, H, V]   value (K == V == head_dim in hxa079; the names stay apart)
    S0         : [B, H, K, V]   the initial state S_0, or None for zeros
    y          : [B, T, H, V]
    S_T        : [B, H, K, V]   the state after the last token

Dtypes (state_dtype below is the one place the state's rule is written):
    r, k, v, a, b   one floating dtype, the input dtype: float64, float32, bfloat16 or float16
                    (wkv7_triton: not float64)
    w               the input dtype, or float32 beside bfloat16/float16 inputs
    S0, S_T         state_dtype(input dtype): float64 for float64 inputs, float32 for all others
    y               the input dtype
All on one device. Every form computes in the state dtype.

Per batch element and head, with S_t a [K, V] matrix:

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    y_t = S_t^T r_t

Reading it as a delta rule: S maps keys to values (y = S^T r reads the value stored
under r). hxa079 calls this with a = -kk and b = kk * iclr, where kk is the unit-norm key
and iclr in (0, 1)^K a per-channel "in-context learning rate", so the middle term is
    b (a^T S) = - (iclr * kk) (kk^T S),
the value currently stored under kk (kk^T S), written back negatively along iclr * kk: with
iclr = 1 the old value under kk is erased, before k v^T writes the new one.

The state layout [B, H, K, V] (key index first) is fla's; RWKV's CUDA kernels, and the RWKV-7
paper's wkv_t, keep the transpose [B, H, V, K] (SPEC.md §5).

The file, top to bottom:
  - `wkv7_naive`: the definition, one token at a time;
  - `wkv7_chunked`: the chunked parallel form, exact for any decay, derived step by step in
    the comment block that opens its section, before the helpers that cite the steps;
  - `wkv7_compiled`: the same chunked code under torch.compile;
  - `wkv7_triton`: the chunked form as Triton kernels (forward only; CUDA, or Triton's CPU
    interpreter with TRITON_INTERPRET=1 set before this module is imported);
  - `wkv7`: the dispatcher the model calls.
`wkv7_naive` and `wkv7_chunked` each run when copied together with everything above them:
torch and einops only. `python bench_wkv.py` times every form.
"""
import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the WKV state is kept (and accumulated) in for inputs of `dtype`: float64 inputs keep
    float64; everything else (float32, bfloat16, float16) accumulates in float32. The one place this
    rule is written; the model imports it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The log decay w may come in float32 beside inputs in these dtypes (every form computes in float32
# anyway): one bfloat16 rounding moves w by up to 0.4% of itself, and the decay over n tokens,
# exp(n w), by n times that in its exponent; the model's decay path (SPEC.md §4) is float32 too.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def check_wkv7_inputs(r, w, k, v, a, b, S0=None):
    """Raise a ValueError naming the offending tensor before any work is done."""
    if r.dim() != 4:
        raise ValueError(f"wkv7: r must be [B, T, H, K], got shape {tuple(r.shape)}")
    B, T, H, K = r.shape
    for name, x in (("w", w), ("k", k), ("a", a), ("b", b)):
        if tuple(x.shape) != (B, T, H, K):
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, expected [B, T, H, K] = {(B, T, H, K)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"wkv7: v has shape {tuple(v.shape)}, expected [B, T, H, V] = {(B, T, H)} + (V,)")
    for name, x in (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if not x.is_floating_point():
            raise ValueError(f"wkv7: {name} has dtype {x.dtype}, expected a floating dtype")
        if x.dtype != r.dtype and not (x is w and x.dtype == torch.float32 and r.dtype in HALF_DTYPES):
            raise ValueError(f"wkv7: {name} has dtype {x.dtype} but r has {r.dtype}; pass one dtype "
                             f"(the log decay w may be float32 beside bfloat16/float16 inputs)")
        if x.device != r.device:
            raise ValueError(f"wkv7: {name} is on {x.device} but r is on {r.device}")
    V = v.shape[-1]
    if S0 is not None:
        if tuple(S0.shape) != (B, H, K, V):
            raise ValueError(f"wkv7: S0 has shape {tuple(S0.shape)}, expected [B, H, K, V] = {(B, H, K, V)}")
        if S0.dtype != state_dtype(r.dtype):
            raise ValueError(f"wkv7: S0 has dtype {S0.dtype}, expected {state_dtype(r.dtype)} "
                             f"for {r.dtype} inputs")
        if S0.device != r.device:
            raise ValueError(f"wkv7: S0 is on {S0.device} but r is on {r.device}")


def wkv7_naive(r, w, k, v, a, b, S0=None):
    """The definition: one token at a time, exactly the recurrence in the module docstring."""
    check_wkv7_inputs(r, w, k, v, a, b, S0)
    B, T, H, K = r.shape
    V = v.shape[-1]
    dtype, sd = r.dtype, state_dtype(r.dtype)
    S = torch.zeros(B, H, K, V, dtype=sd, device=r.device) if S0 is None else S0   # read, never written
    r, w, k, v, a, b = (x.to(sd) for x in (r, w, k, v, a, b))
    y = torch.empty(B, T, H, V, dtype=sd, device=r.device)
    for t in range(T):
        r_t, w_t, k_t, v_t, a_t, b_t = (x[:, t] for x in (r, w, k, v, a, b))  # [B, H, K] (v_t: [B, H, V])
        aS = torch.einsum("bhk,bhkv->bhv", a_t, S)                                # a_t^T S_{t-1}  [B, H, V]
        S = torch.exp(w_t)[..., None] * S                                         # diag(exp(w_t)) S_{t-1}
        S.addcmul_(b_t[..., None], aS[..., None, :])                              # + b_t (a_t^T S_{t-1})
        S.addcmul_(k_t[..., None], v_t[..., None, :])                             # + k_t v_t^T
        y[:, t] = torch.einsum("bhk,bhkv->bhv", r_t, S)                           # y_t = S_t^T r_t
    return y.to(dtype), S if T else S.clone()                                     # never S0 itself


# ----------------------------------------------------------------------------
# The chunked form: its derivation (steps 0-5, which the helpers below, `wkv7_chunked` and
# `wkv7_triton` cite by number), then the helpers, each working on all chunks at once,
# [n, BH, BT, K] (n chunks of BT tokens, BH = B * H), then `wkv7_chunked` itself.
#
# Derivation. Inside one chunk number the tokens t = 1..BT, let S_0 be the state entering it, and write
# x * y for the elementwise product. Without a subscript, r, k, a, b ([BT, K]) and v ([BT, V])
# are the chunk's matrices whose row t is r_t, k_t, ..., and U ([BT, V]) has rows u_t.
#
# 0. Cumulative log decays (per channel, <= 0, non-increasing):
#        g_t = w_1 + ... + w_t,   g_0 = 0,   g_end = g_BT (the chunk's total log decay)
#    so that diag(exp(w_{s+1})) ... diag(exp(w_t)) = diag(exp(g_t - g_s)).
#
# 1. Unroll. With u_t = S_{t-1}^T a_t (the "a^T S" term, [V]) one step reads
#        S_t = diag(exp(w_t)) S_{t-1} + b_t u_t^T + k_t v_t^T,  hence
#        S_t = diag(exp(g_t)) S_0 + sum_{s<=t} diag(exp(g_t - g_s)) (b_s u_s^T + k_s v_s^T).
#
# 2. The a^T S terms. Put 1. at t-1 into u_t = S_{t-1}^T a_t:
#        u_t = S_0^T (a_t * exp(g_{t-1}))
#              + sum_{s<t} (sum_k a_t b_s exp(g_{t-1} - g_s)) u_s
#              + sum_{s<t} (sum_k a_t k_s exp(g_{t-1} - g_s)) v_s
#    i.e., stacking the rows t = 1..BT,  U = a_D S_0 + A_ab U + A_ak v  with
#        a_D[t]     = a_t * exp(g_{t-1})                                   [BT, K]
#        A_ab[t, s] = sum_k a_t b_s exp(g_{t-1} - g_s)   for s < t, else 0 [BT, BT]
#        A_ak[t, s] = sum_k a_t k_s exp(g_{t-1} - g_s)   for s < t, else 0 [BT, BT]
#    A_ab is strictly lower triangular, so this is the unit lower-triangular system
#        (I - A_ab) U = a_D S_0 + A_ak v,
#    solved by forward substitution: solve_triangular (unitriangular) against I gives
#    L_inv = (I - A_ab)^{-1}, cheaper here than against the [BT, K + V] right-hand side.
#    Linear in S_0:
#        U = W S_0 + U_0,   W = L_inv a_D,   U_0 = L_inv A_ak v,
#    and W, U_0 do not depend on the state: they are computed for all chunks at once.
#
# 3. Outputs. y_t = S_t^T r_t with 1.:
#        y = r_D S_0 + A_rb U + A_rk v,   r_D[t] = r_t * exp(g_t),
#        A_rb[t, s] = sum_k r_t b_s exp(g_t - g_s) for s <= t (diagonal included), A_rk alike.
#
# 4. Carried state. 1. at t = BT, then U = W S_0 + U_0 from 2.:
#        S_end = diag(exp(g_end)) S_0 + b_E^T U + k_E^T v,   b_E[s] = b_s * exp(g_end - g_s), k_E alike,
#            = (diag(exp(g_end)) + b_E^T W) S_0 + (b_E^T U_0 + k_E^T v)  =  M S_0 + Z.
#    M [K, K] and Z [K, V] (the state the chunk leaves from S_0 = 0) do not depend on the
#    state either; only S <- M S + Z runs chunk after chunk (one [K, K] x [K, V] product
#    each). With every chunk's S_0 known, U and y (3.) are again computed for all chunks at once.
#
# 5. Numerics. The exponents in a_D, r_D, b_E, k_E, diag(exp(g_end)) are <= 0: those factors lie in
#    [0, 1]. So do the pairwise exp(g_t - g_s) (s <= t) inside the A matrices, but a matrix
#    product needs each split into a row factor times a column factor, and
#    exp(g_t) * exp(-g_s) overflows once -g_s > 88 (float32). Split about the chunk's end g_end
#    instead:
#        exp(g_t - g_s) = exp(g_t - g_end) * exp(g_end - g_s),
#    so the column factor is b_E's (k_E's) own, in [e^-span, 1], and only the rows are
#    rescaled: a_D * exp(-g_end), r_D * exp(-g_end), in [1, e^span] times a, r; span = -g_end is
#    the chunk's total decay (max over channels). With span <= max_factored_span (default 60
#    for a float32 state, 600 for float64):
#      - exp(g) >= exp(-span) is still a normal number (smallest normal: e^-87.3 float32,
#        e^-708.4 float64), so a_D etc. keep full relative precision when rescaled;
#      - every factor is <= e^span (1e26 / 1e260), and so are the discarded products above
#        the diagonal, exp(g_t - g_s) <= e^span: far from overflow (3e38 / 1e308), no inf or
#        NaN anywhere, also not in the backward pass.
#    (`wkv7_triton` splits the same way.) hxa079's log decay is |w| <= e^-0.5 = 0.61 per
#    token, so span <= 39 at BT = 64: its chunks always take this path. A chunk over the
#    threshold (e.g. w down to -30) instead builds the [BT, BT, K] tensors exp(g_t - g_s) and
#    exp(g_{t-1} - g_s) themselves, each exponent a sum over its own segment and set to -inf
#    above the diagonal (every entry in [0, 1]): exact for any decay, at ~BT times the memory
#    and elementwise work.
#    Rounding: g is a running sum, so exp(g) carries a relative error ~|g| * eps (float32:
#    <= 39 * 6e-8 = 2.4e-6 for hxa079 at BT = 64; the naive loop's products of exp(w) do
#    better, ~2e-7). In chunks over the threshold the decays to the chunk end, g_end - g_s,
#    are therefore summed over their own segment rather than taken as a difference of two
#    g's (both ~ -1000 there: the difference would lose ~6e-5); below it the difference is
#    consistent with g itself, and the more accurate.


def _intra_factored(a_D, r_D, b_E, k_E, g_end, max_span):
    """The four intra-chunk matrices as products of [BT, K] matrices (step 5: any decay up to max_span).

    (a_D * exp(-g_end))[t] = a_t exp(g_{t-1} - g_end) and b_E[s] = b_s exp(g_end - g_s), so their product
    is sum_k a_t b_s exp(g_{t-1} - g_s). The clamp only acts in chunks over max_span, whose
    (finite) result the caller replaces.
    """
    up = torch.exp((-g_end).clamp(max=max_span))                     # exp(-g_end)  [n, BH, 1, K], in [1, e^max_span]
    a_up, r_up = a_D * up, r_D * up                                  # [n, BH, BT, K]
    A_ab = (a_up @ b_E.mT).tril_(-1)                                 # s <  t   [n, BH, BT, BT]
    A_ak = (a_up @ k_E.mT).tril_(-1)
    A_rb = (r_up @ b_E.mT).tril_()                                   # s <= t
    A_rk = (r_up @ k_E.mT).tril_()
    return A_ab, A_ak, A_rb, A_rk


def _intra_pairwise(w, a, r, b, k):
    """The four intra-chunk matrices from an explicit [BT, BT, K] tensor of decays (step 5: any decay).

    seg[t, s] = w_{s+1} + ... + w_t = g_t - g_s for s <= t, summed inside the segment (so its
    rounding is relative to the segment, not to g_t), and -inf above the diagonal: every
    exp(seg) is in [0, 1]. Inputs [..., BT, K]; outputs [..., BT, BT].
    """
    BT = w.shape[-2]
    t = torch.arange(BT, device=w.device)
    after_s = (t[:, None] > t[None, :])[..., None]                   # j > s     [BT(j), BT(s), 1]
    seg = (w[..., :, None, :] * after_s).cumsum(-3)                  # sum_{s<j<=t} w_j   [..., BT(t), BT(s), K]
    E_r = seg.masked_fill(~(t[:, None] >= t[None, :])[..., None], -math.inf).exp()  # exp(g_t - g_s), s <= t
    E_a = F.pad(E_r[..., :-1, :, :], (0, 0, 0, 0, 1, 0))            # row t is row t-1: exp(g_{t-1} - g_s), s < t
    A_ab = torch.einsum("...tk,...sk,...tsk->...ts", a, b, E_a)      # [..., BT, BT]
    A_ak = torch.einsum("...tk,...sk,...tsk->...ts", a, k, E_a)
    A_rb = torch.einsum("...tk,...sk,...tsk->...ts", r, b, E_r)
    A_rk = torch.einsum("...tk,...sk,...tsk->...ts", r, k, E_r)
    return A_ab, A_ak, A_rb, A_rk


def _chunk_prepare(r, w, k, v, a, b, max_span: float):
    """Steps 0-2 and the chunk maps of step 4, for all chunks at once (nothing here needs the state).
    Inputs [n, BH, BT, K] (v: [n, BH, BT, V]) in the state dtype."""
    BT, sd = r.shape[-2], r.dtype

    # 0. cumulative log decays
    g = w.cumsum(-2)                                                 # g_t                    [n, BH, BT, K]
    g_prev = g - w                                                   # g_{t-1}
    g_end = g[..., -1:, :]                                           # g_BT                   [n, BH, 1, K]
    g_rest = g_end - g                                               # g_end - g_t
    # chunks whose decay is too strong for the factored form (5.); in them |g| is large, so
    # g_end - g_t is summed over its own segment, w_{t+1} + ... + w_BT, instead
    strong = (-g_end).amax(-1)[..., 0] > max_span                    # [n, BH]
    if strong.any():
        later = torch.ones(BT, BT, dtype=sd, device=r.device).triu(1)  # later[t, j] = 1 for j > t
        g_rest = g_rest.index_put((strong,), later @ w[strong])

    # decayed rows (all factors in [0, 1])
    a_D = a * torch.exp(g_prev)                                      # a_D[t] = a_t exp(g_{t-1})   [n, BH, BT, K]
    r_D = r * torch.exp(g)                                           # r_D[t] = r_t exp(g_t)
    to_end = torch.exp(g_rest)
    b_E, k_E = b * to_end, k * to_end                                # b_E[s] = b_s exp(g_end - g_s), k_E alike

    # intra-chunk matrices (5.): factored, except in the strong chunks
    A_ab, A_ak, A_rb, A_rk = _intra_factored(a_D, r_D, b_E, k_E, g_end, max_span)  # [n, BH, BT, BT]
    if strong.any():
        pairwise = _intra_pairwise(*(x[strong] for x in (w, a, r, b, k)))
        A_ab, A_ak, A_rb, A_rk = (A.index_put((strong,), A_s) for A, A_s in zip((A_ab, A_ak, A_rb, A_rk), pairwise))

    # 2. W = (I - A_ab)^{-1} a_D and U_0 = (I - A_ab)^{-1} A_ak v, all chunks at once
    I = torch.eye(BT, dtype=sd, device=r.device)
    L_inv = torch.linalg.solve_triangular(I - A_ab, I.expand_as(A_ab), upper=False, unitriangular=True)
    W, U0 = L_inv @ a_D, L_inv @ (A_ak @ v)                          # [n, BH, BT, K], [n, BH, BT, V]

    # 4. S_end = diag(exp(g_end)) S_0 + b_E^T (W S_0 + U_0) + k_E^T v = M S_0 + Z
    # (sums accumulate in place into fresh products: fewer [n, BH, K, V]-sized temporaries)
    M = b_E.mT @ W                                                   # b_E^T W                [n, BH, K, K]
    M.diagonal(dim1=-2, dim2=-1).add_(torch.exp(g_end[..., 0, :]))  # + diag(exp(g_end))
    Z = (b_E.mT @ U0).add_(k_E.mT @ v)                               # b_E^T U_0 + k_E^T v    [n, BH, K, V]
    return W, U0, M, Z, r_D, A_rb, A_rk


def _chunk_outputs(S_in, W, U0, r_D, A_rb, A_rk, v):
    """Step 3 for all chunks at once, given each chunk's entering state S_in [n, BH, K, V]."""
    U = (W @ S_in).add_(U0)                                          # U = W S_0 + U_0        [n, BH, BT, V]
    return (r_D @ S_in).add_(A_rb @ U).add_(A_rk @ v)                # y = r_D S_0 + A_rb U + A_rk v


def wkv7_chunked(r, w, k, v, a, b, S0=None, chunk_size: int = 64, max_factored_span: float | None = None,
                 segment_elements: int = 2 ** 17, stages=(_chunk_prepare, _chunk_outputs)):
    """The chunked parallel form, derived in steps 0-5 in the comment block that opens this section
    (same names): the loop over T becomes a loop over T / BT chunks.

    chunk_size         BT, tokens per chunk (64: the fastest of 16/32/64/128 on a 2-core CPU at
                       head sizes 64 and 96, `python bench_wkv.py`).
    max_factored_span  the largest total decay of a chunk that the factored product handles
                       (step 5); stronger chunks take the pairwise path. None: 60 for a float32
                       state, 600 for float64. Any value >= 0 is exact; 0 sends every chunk
                       down the (slower) pairwise path.
    segment_elements   the chunks go through in segments of whole chunks whose [chunks, B*H, BT, K]
                       tensors hold about this many numbers (2^17: 512 KiB in float32, so the
                       ~30 elementwise passes over them stay in a core's L2 cache, ~1.4x faster
                       than whole-sequence tensors on a 2-core CPU; the intermediates stay bounded
                       however long T is). Any value >= 1 gives the same result up to rounding.
    stages             (prepare, outputs): the two state-free stages above (`_chunk_prepare`:
                       steps 0-2 and 4's maps; `_chunk_outputs`: step 3); `wkv7_compiled`
                       passes them compiled.

    Cost per token and head (K = V): ~(8 BT + 6 K) K multiply-adds, nearly all in batched
    products (the naive loop: ~4 K^2, but one token at a time), plus ~30 elementwise passes
    over [BT, K]-sized tensors; the sequential part is T / BT products of [K, K] x [K, V].
    The tail is padded with identity steps (w = 0, k = v = a = b = 0).
    """
    check_wkv7_inputs(r, w, k, v, a, b, S0)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"wkv7_chunked: chunk_size must be a positive int, got {chunk_size!r}")
    if not (max_factored_span is None or (isinstance(max_factored_span, (int, float)) and max_factored_span >= 0)):
        raise ValueError(f"wkv7_chunked: max_factored_span must be None or a number >= 0, got {max_factored_span!r}")
    if not (isinstance(segment_elements, int) and segment_elements >= 1):
        raise ValueError(f"wkv7_chunked: segment_elements must be a positive int, got {segment_elements!r}")
    prepare, outputs = stages
    B, T, H, K = r.shape
    V = v.shape[-1]
    dtype, sd = r.dtype, state_dtype(r.dtype)
    if max_factored_span is None:
        max_factored_span = 600.0 if sd == torch.float64 else 60.0
    S = torch.zeros(B, H, K, V, dtype=sd, device=r.device) if S0 is None else S0
    if T == 0:
        return v.new_empty(B, 0, H, V), S.clone()
    BT = min(chunk_size, T)
    n = -(-T // BT)                                                  # number of chunks
    pad = n * BT - T

    # Batch and heads in one dimension, chunk index first (the loop below walks it):
    # [B, T, H, K] -> [n, BH, BT, K], the tail padded with identity steps
    def chunks(x):
        x = F.pad(x.to(sd), (0, 0, 0, 0, 0, pad)) if pad else x.to(sd)
        return rearrange(x, "b (n c) h k -> n (b h) c k", c=BT).contiguous()

    r, w, k, v, a, b = (chunks(x) for x in (r, w, k, v, a, b))       # v: [n, BH, BT, V]
    S = S.reshape(B * H, K, V)
    per = max(1, segment_elements // (B * H * BT * K))               # chunks per segment
    ys = []
    for i in range(0, n, per):
        W, U0, M, Z, r_D, A_rb, A_rk = prepare(*(x[i:i + per] for x in (r, w, k, v, a, b)), float(max_factored_span))

        # 4. the state, chunk after chunk: S_end = M S_0 + Z
        S_in = []
        for M_i, Z_i in zip(M, Z):
            S_in.append(S)                                           # S_0 of chunk i         [BH, K, V]
            S = torch.baddbmm(Z_i, M_i, S)                           # M S_0 + Z
        S_in = torch.stack(S_in)                                     # [per, BH, K, V]

        ys.append(outputs(S_in, W, U0, r_D, A_rb, A_rk, v[i:i + per]))  # 3.  [per, BH, BT, V]
    y = rearrange(torch.cat(ys), "n (b h) c v -> b (n c) h v", b=B)[:, :T]
    return y.to(dtype), S.view(B, H, K, V)


# ----------------------------------------------------------------------------
# The chunked form, compiled


@functools.cache
def _compiled_stages():
    """The two stages of wkv7_chunked under torch.compile, made on first use (making them imports
    torch's compiler, ~5 s) and then kept for the process."""
    return torch.compile(_chunk_prepare, dynamic=True), torch.compile(_chunk_outputs, dynamic=True)


def wkv7_compiled(r, w, k, v, a, b, S0=None, chunk_size: int = 64, max_factored_span: float | None = None,
                  segment_elements: int = 2 ** 17):
    """wkv7_chunked with its two state-free stages (`_chunk_prepare`, `_chunk_outputs`) compiled by
    torch.compile (inductor: C++/OpenMP on a CPU, Triton on a GPU). The same code, not a copy.

    Compiled with dynamic=True: the number of chunks n and B*H are symbolic, so a new T or batch
    does not recompile, except that a single chunk or B*H = 1 is a case of its own (sizes 0 and 1
    are specialised), as are sizes that happen to be equal (n == B*H: assumed equal until they are
    not) and each new chunk size, head size, dtype and max_factored_span. The data-dependent switch
    to the pairwise path for strongly decaying chunks is a graph break: the code after it is
    compiled once per branch taken, so the first call with a strong chunk compiles again. The
    chunk-to-chunk state scan stays a plain loop of n small products. Each compile costs about
    20-50 s on a 2-core CPU (the first call's time, printed by `python bench_wkv.py`).
    Differentiable like wkv7_chunked (inductor compiles the backward too)."""
    return wkv7_chunked(r, w, k, v, a, b, S0, chunk_size=chunk_size, max_factored_span=max_factored_span,
                        segment_elements=segment_elements, stages=_compiled_stages())


# ----------------------------------------------------------------------------
# The Triton kernels (forward only). Without triton installed the module still imports, and
# wkv7_triton raises. TRITON_INTERPRET=1 in the environment when the kernels below are defined,
# i.e. when this module is imported, makes them run in Triton's CPU interpreter.

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
HAS_TRITON = triton is not None

if HAS_TRITON:
    @triton.jit
    def _wkv7_program_start(s0_ptr, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
        # What every program of both kernels starts with. Program (i_v, i_bh) owns the value columns
        # [i_v * BV, (i_v + 1) * BV) of head i_bh % H of batch element i_bh // H. Returns the key and
        # value offsets o_k [BK], o_v [BV] and their masks, the offsets p_s [BK, BV] of its state block
        # in [B, H, K, V] with its mask, S_0 (loaded, or zeros), and the offsets of its token 0 in the
        # [B, T, H, K] and [B, T, H, V] inputs.
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        i_b, i_h = i_bh // H, i_bh % H
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]             # [BK, BV] in [B, H, K, V]
        if HAS_S0:
            S = tl.load(s0_ptr + p_s, mask=m_kv, other=0.0)                  # S_0
        else:
            S = tl.zeros([BK, BV], dtype=tl.float32)
        base_k = (i_b * T * H + i_h) * K                                    # token 0 in [B, T, H, K]
        base_v = (i_b * T * H + i_h) * V                                    # token 0 in [B, T, H, V]
        return o_k, o_v, m_k, m_v, p_s, m_kv, S, base_k, base_v

    @triton.jit
    def _wkv7_load_chunk(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, p_k, m_tk, o_t, H: tl.constexpr, K: tl.constexpr):
        # The chunk's rows of r, w, k, a, b at the offsets p_k [BT, BK] in float32, 0 where masked
        # (tokens past T are identity steps: w = 0, everything else 0), and w shifted by one token
        # inside the chunk: w_prev[t] = w_{t-1} (0 at the chunk start).
        r = tl.load(r_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
        w_prev = tl.load(w_ptr + p_k - H * K, mask=m_tk & (o_t > 0)[:, None], other=0.0).to(tl.float32)
        return r, w, k, a, b, w_prev

    @triton.jit
    def _wkv7_fwd_recurrent_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, sT_ptr, T,
                                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                   BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
        o_k, o_v, m_k, m_v, p_s, m_kv, S, base_k, base_v = _wkv7_program_start(s0_ptr, T, H, K, V, BK, BV, HAS_S0)
        p_k = base_k + o_k                                                  # token t in [B, T, H, K]
        p_v = base_v + o_v                                                  # token t in [B, T, H, V]
        for t in range(0, T):
            r_t = tl.load(r_ptr + p_k, mask=m_k, other=0.0).to(tl.float32)
            w_t = tl.load(w_ptr + p_k, mask=m_k, other=0.0).to(tl.float32)
            k_t = tl.load(k_ptr + p_k, mask=m_k, other=0.0).to(tl.float32)
            a_t = tl.load(a_ptr + p_k, mask=m_k, other=0.0).to(tl.float32)
            b_t = tl.load(b_ptr + p_k, mask=m_k, other=0.0).to(tl.float32)
            v_t = tl.load(v_ptr + p_v, mask=m_v, other=0.0).to(tl.float32)
            u_t = tl.sum(a_t[:, None] * S, axis=0)                          # a_t^T S_{t-1}          [BV]
            S = (tl.exp(w_t)[:, None] * S                                   # diag(exp(w_t)) S_{t-1}
                 + b_t[:, None] * u_t[None, :]                              # + b_t (a_t^T S_{t-1})
                 + k_t[:, None] * v_t[None, :])                             # + k_t v_t^T
            y_t = tl.sum(r_t[:, None] * S, axis=0)                          # y_t = S_t^T r_t        [BV]
            tl.store(y_ptr + p_v, y_t.to(y_ptr.dtype.element_ty), mask=m_v)
            p_k += H * K
            p_v += H * V
        tl.store(sT_ptr + p_s, S, mask=m_kv)

    @triton.jit
    def _wkv7_fwd_chunked_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, sT_ptr, T,
                                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                 HAS_S0: tl.constexpr, MAX_SPAN: tl.constexpr):
        o_k, o_v, m_k, m_v, p_s, m_kv, S, base_k, base_v = _wkv7_program_start(s0_ptr, T, H, K, V, BK, BV, HAS_S0)
        o_t = tl.arange(0, BT)                                              # token within the chunk
        s_lt = o_t[None, :] < o_t[:, None]                                  # [t, s]: s < t
        s_le = o_t[None, :] <= o_t[:, None]                                 # [t, s]: s <= t
        eye = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)              # I  [BT, BT]

        for t0 in range(0, T, BT):
            # load the chunk
            t = t0 + o_t
            m_tk = (t < T)[:, None] & m_k[None, :]
            p_k = base_k + t[:, None] * (H * K) + o_k[None, :]               # [BT, BK]
            p_v = base_v + t[:, None] * (H * V) + o_v[None, :]               # [BT, BV]
            r, w, k, a, b, w_prev = _wkv7_load_chunk(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, p_k, m_tk, o_t, H, K)
            v = tl.load(v_ptr + p_v, mask=(t < T)[:, None] & m_v[None, :], other=0.0).to(tl.float32)
            # w shifted the other way: w_next[t] = w_{t+1} (0 at the chunk end)
            w_next = tl.load(w_ptr + p_k + H * K, mask=((t + 1 < T) & (o_t + 1 < BT))[:, None] & m_k[None, :],
                             other=0.0).to(tl.float32)

            # 0. cumulative log decays, each a scan of the w's it spans
            g = tl.cumsum(w, axis=0)                                        # g_t                    [BT, BK]
            g_prev = tl.cumsum(w_prev, axis=0)                              # g_{t-1}
            g_rest = tl.cumsum(w_next, axis=0, reverse=True)                # g_end - g_t
            g_end = tl.sum(w, axis=0)                                       # g_end                  [BK]

            # the decayed rows of 2.-4. (exponents <= 0: factors in [0, 1])
            a_D = a * tl.exp(g_prev)                                        # a_D[t] = a_t exp(g_{t-1})
            r_D = r * tl.exp(g)                                             # r_D[t] = r_t exp(g_t)
            to_end = tl.exp(g_rest)
            b_E = b * to_end                                                # b_E[s] = b_s exp(g_end - g_s)
            k_E = k * to_end                                                # k_E[s] = k_s exp(g_end - g_s)

            # 2./3. the intra-chunk matrices A_ab, A_ak (s < t) and A_rb, A_rk (s <= t)
            span = tl.max(-g_end, axis=0)                                   # the chunk's total decay, max over channels
            if span <= MAX_SPAN:
                # factored about the chunk end g_end, as in step 5 of the chunked derivation:
                # (a_t exp(g_{t-1} - g_end)) . (b_s exp(g_end - g_s)), row factors in [1, e^span]
                up = tl.exp(-g_end)[None, :]                                # exp(-g_end)            [1, BK]
                a_up, r_up = a_D * up, r_D * up
                A_ab = tl.where(s_lt, tl.dot(a_up, tl.trans(b_E), input_precision="ieee"), 0.0)
                A_ak = tl.where(s_lt, tl.dot(a_up, tl.trans(k_E), input_precision="ieee"), 0.0)
                A_rb = tl.where(s_le, tl.dot(r_up, tl.trans(b_E), input_precision="ieee"), 0.0)
                A_rk = tl.where(s_le, tl.dot(r_up, tl.trans(k_E), input_precision="ieee"), 0.0)
            else:
                # pairwise, one column s at a time: exp(g_t - g_s) = exp(w_{s+1} + ... + w_t) as a
                # [BT, BK] tile, -inf (so 0) where the matrix is zero
                A_ab = tl.zeros([BT, BT], dtype=tl.float32)
                A_ak = tl.zeros([BT, BT], dtype=tl.float32)
                A_rb = tl.zeros([BT, BT], dtype=tl.float32)
                A_rk = tl.zeros([BT, BT], dtype=tl.float32)
                # (reloaded rather than kept: fewer registers live through the common path)
                r, w, k, a, b, w_prev = _wkv7_load_chunk(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, p_k, m_tk, o_t, H, K)
                for s in range(0, BT):
                    at_s = (o_t == s)[:, None]
                    b_s = tl.sum(tl.where(at_s, b, 0.0), axis=0)[None, :]    # row s of b, k       [1, BK]
                    k_s = tl.sum(tl.where(at_s, k, 0.0), axis=0)[None, :]
                    seg_r = tl.cumsum(tl.where((o_t > s)[:, None], w, 0.0), axis=0)           # g_t - g_s
                    seg_a = tl.cumsum(tl.where((o_t > s + 1)[:, None], w_prev, 0.0), axis=0)  # g_{t-1} - g_s
                    E_r = tl.exp(tl.where((o_t >= s)[:, None], seg_r, float("-inf")))          # s <= t
                    E_a = tl.exp(tl.where((o_t > s)[:, None], seg_a, float("-inf")))           # s < t
                    col = o_t[None, :] == s
                    A_ab = tl.where(col, tl.sum(a * E_a * b_s, axis=1)[:, None], A_ab)
                    A_ak = tl.where(col, tl.sum(a * E_a * k_s, axis=1)[:, None], A_ak)
                    A_rb = tl.where(col, tl.sum(r * E_r * b_s, axis=1)[:, None], A_rb)
                    A_rk = tl.where(col, tl.sum(r * E_r * k_s, axis=1)[:, None], A_rk)

            # 2. L_inv = (I - A_ab)^{-1} by forward substitution: row t = e_t + sum_{s<t} A_ab[t, s] row s
            # (rows s >= t are still e_s there, but A_ab[t, s] = 0 for them)
            L_inv = eye
            for i in range(1, BT):
                at_i = (o_t == i)[:, None]
                A_i = tl.sum(tl.where(at_i, A_ab, 0.0), axis=0)             # A_ab[i, :]             [BT]
                row = tl.sum(A_i[:, None] * L_inv, axis=0) + tl.where(o_t == i, 1.0, 0.0)
                L_inv = tl.where(at_i, row[None, :], L_inv)
            # 2. U = L_inv (a_D S_0 + A_ak v)                                                       [BT, BV]
            rhs = tl.dot(a_D, S, input_precision="ieee") + tl.dot(A_ak, v, input_precision="ieee")
            U = tl.dot(L_inv, rhs, input_precision="ieee")
            # 3. y = r_D S_0 + A_rb U + A_rk v                                                      [BT, BV]
            y = (tl.dot(r_D, S, input_precision="ieee") + tl.dot(A_rb, U, input_precision="ieee")
                 + tl.dot(A_rk, v, input_precision="ieee"))
            tl.store(y_ptr + p_v, y.to(y_ptr.dtype.element_ty), mask=(t < T)[:, None] & m_v[None, :])
            # 4. S_end = diag(exp(g_end)) S_0 + b_E^T U + k_E^T v                                  [BK, BV]
            S = (tl.exp(g_end)[:, None] * S + tl.dot(tl.trans(b_E), U, input_precision="ieee")
                 + tl.dot(tl.trans(k_E), v, input_precision="ieee"))

        tl.store(sT_ptr + p_s, S, mask=m_kv)

# whether triton made the kernels above for its CPU interpreter (TRITON_INTERPRET=1 at import)
TRITON_INTERPRETED = HAS_TRITON and not isinstance(_wkv7_fwd_chunked_kernel, triton.runtime.JITFunction)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _is_pow2(n) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def wkv7_triton(r, w, k, v, a, b, S0=None, path: str = "auto", chunk_size: int = 16,
                max_factored_span: float = 60.0, block_v: int = 32, num_warps: int = 8):
    """The forward pass as two Triton kernels; same signature and meaning as `wkv7_naive`.

    path               "auto" (the recurrent kernel for T < chunk_size, else the chunked one),
                       "chunked" or "recurrent".
    chunk_size         BT, tokens per chunk of the chunked kernel: a power of two >= 16 (tl.dot
                       needs every dimension >= 16).
    max_factored_span  the largest total decay of a chunk that takes the factored path (step 5).
    block_v            BV, value columns per program (at most): a power of two >= 16.
    num_warps          of the chunked kernel; 8 gives the fewest register spills for ptxas sm_90 at
                       head sizes 64 and 96.

    Two kernels, both one program per (batch * head, block of BV value columns), the state
    block S [K, BV] kept in registers (float32) from the first token to the last; both start
    with `_wkv7_program_start` (offsets, masks, S_0):

      - `_wkv7_fwd_recurrent_kernel` (decode, T < chunk_size): the recurrence itself, token by
        token, as `wkv7_naive`.
      - `_wkv7_fwd_chunked_kernel` (prefill): steps 0, 2, 3 and 4 of the derivation that opens
        the chunked section (same names), for one chunk of BT tokens after another, inside the
        program: no stage runs for all chunks at once as in `wkv7_chunked`. (I - A_ab)^{-1} comes
        from forward substitution over the BT rows.

    Numerics: step 5, in float32, with every tl.dot at input_precision="ieee" (no TF32). Two
    differences from `wkv7_chunked`: g_t, g_{t-1} and g_end - g_t are each a scan of the w's they
    span (never a difference of two running sums); and a chunk over max_factored_span (60: any
    w >= -3.75 per token at BT = 16; hxa079's span is at most 9.7) builds each column s of the
    four matrices from exp(w_{s+1} + ... + w_t) as a [BT, BK] tile, exact for any decay.

    Dtypes: r, w, k, v, a, b float32, bfloat16 or float16 (loaded and computed in float32); y in
    the inputs' dtype; S0 and S_T float32. float64 inputs raise a ValueError (use
    impl="naive" or "chunked" for float64). Head sizes: any K, V (64, 96, 24, ...): tiles are
    the next power of two (at least 16) and the loads/stores are masked.

    Backward: not implemented. With grad mode on and any input requiring grad, wkv7_triton
    raises a RuntimeError rather than returning a tensor that silently has no gradient.

    Device: CUDA tensors; or CPU tensors when the kernels were made for Triton's interpreter
    (TRITON_INTERPRET=1 set before this module was imported; TRITON_INTERPRETED says so).
    """
    check_wkv7_inputs(r, w, k, v, a, b, S0)
    if r.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"wkv7_triton: inputs must be float32, bfloat16 or float16, got {r.dtype} "
                         f"(the kernels accumulate in float32; use impl='naive' or 'chunked' for float64)")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, w, k, v, a, b, S0)):
        raise RuntimeError("wkv7_triton: forward only, there is no backward; use impl='chunked' or 'naive' "
                           "for gradients, or call it under torch.no_grad()")
    if path not in ("auto", "chunked", "recurrent"):
        raise ValueError(f"wkv7_triton: path must be 'auto', 'chunked' or 'recurrent', got {path!r}")
    if not (_is_pow2(chunk_size) and chunk_size >= 16):
        raise ValueError(f"wkv7_triton: chunk_size must be a power of two >= 16, got {chunk_size!r}")
    if not (isinstance(max_factored_span, (int, float)) and max_factored_span >= 0):
        raise ValueError(f"wkv7_triton: max_factored_span must be a number >= 0, got {max_factored_span!r}")
    if not (_is_pow2(block_v) and block_v >= 16):
        raise ValueError(f"wkv7_triton: block_v must be a power of two >= 16, got {block_v!r}")
    if not _is_pow2(num_warps):
        raise ValueError(f"wkv7_triton: num_warps must be a power of two, got {num_warps!r}")
    if not HAS_TRITON:
        raise RuntimeError("wkv7_triton: triton is not installed; use impl='chunked'")
    if not r.is_cuda and not TRITON_INTERPRETED:
        raise ValueError(f"wkv7_triton: inputs are on {r.device}; the kernels need CUDA tensors, or "
                         f"TRITON_INTERPRET=1 set before wkv_kernel is imported for the CPU")
    B, T, H, K = r.shape
    V = v.shape[-1]
    sT = torch.empty(B, H, K, V, dtype=torch.float32, device=r.device)
    if T == 0:
        if S0 is None:
            sT.zero_()
        else:
            sT.copy_(S0)
        return v.new_empty(B, 0, H, V), sT
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    s0 = sT if S0 is None else S0.contiguous()                           # unread when S0 is None
    # Triton's interpreter converts float32 to bfloat16 by truncation (the GPU rounds to nearest
    # even): there, y is stored in float32 and rounded by torch below.
    y_dtype = torch.float32 if (TRITON_INTERPRETED and r.dtype == torch.bfloat16) else r.dtype
    y = torch.empty(B, T, H, V, dtype=y_dtype, device=r.device)
    BK = max(16, _next_pow2(K))
    BV = min(max(16, _next_pow2(V)), block_v)
    grid = (triton.cdiv(V, BV), B * H)
    if path == "recurrent" or (path == "auto" and T < chunk_size):
        _wkv7_fwd_recurrent_kernel[grid](r, w, k, v, a, b, s0, y, sT, T, H=H, K=K, V=V, BK=BK, BV=BV,
                                         HAS_S0=S0 is not None)
    else:
        _wkv7_fwd_chunked_kernel[grid](r, w, k, v, a, b, s0, y, sT, T, H=H, K=K, V=V, BT=chunk_size,
                                       BK=BK, BV=BV, HAS_S0=S0 is not None,
                                       MAX_SPAN=float(max_factored_span), num_warps=num_warps)
    return y.to(r.dtype), sT


# ----------------------------------------------------------------------------
# One entry point for every form. The model calls this.

IMPLS = {"naive": wkv7_naive, "chunked": wkv7_chunked, "compiled": wkv7_compiled, "triton": wkv7_triton}


def pick_impl(r, *others) -> str:
    """What impl="auto" runs for these inputs:
    - on CUDA, for float32/bf16/fp16 without autograd: the Triton kernels (it has no backward);
    - otherwise the loop for a single token (decode), and the chunked form for T > 1.
    "compiled" is never picked: its first call costs a compile (tens of seconds on a CPU), which
    a caller should choose to pay; force it with impl="compiled"."""
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, *others))
    if r.is_cuda and r.dtype != torch.float64 and not needs_grad and HAS_TRITON:
        return "triton"
    return "naive" if r.shape[1] <= 1 else "chunked"


def wkv7(r, w, k, v, a, b, S0=None, impl: str = "auto"):
    """y, S_T = WKV-7 via the chosen form ("auto", or a key of IMPLS)."""
    if impl == "auto":
        impl = pick_impl(r, w, k, v, a, b, S0)
    if impl not in IMPLS:
        raise ValueError(f"wkv7: unknown impl {impl!r}; choose 'auto' or one of {sorted(IMPLS)}")
    return IMPLS[impl](r, w, k, v, a, b, S0)
