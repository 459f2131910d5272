"""
The WKV-7 recurrence: the definition (a plain loop over time) and its faster forms.

Every form here has one signature and one meaning:

    y, S_T = wkv7_<form>(r, w, k, v, a, b, state=None)

    r, w, k, a, b : [B, T, H, K]     receptance, LOG decay (w <= 0), key, and the two
                                     vectors of the rank-1 state correction
    v             : [B, T, H, V]     value (K == V == head_dim in hxa079; the names stay apart)
    state         : [B, H, K, V]     S_0, or None for zeros
    y             : [B, T, H, V]     in the inputs' dtype
    S_T           : [B, H, K, V]     float32 (float64 when the inputs are float64)

Per batch element and head, with S_t a [K, V] matrix:

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    y_t = S_t^T r_t

Reading it as a delta rule: S maps keys to values (y = S^T r reads the value stored
under r). hxa079 calls this with a = -kk and b = kk * iclr, where kk is the unit-norm key
and iclr in (0, 1)^K a per-channel "in-context learning rate", so the middle term is
    b (a^T S) = - (iclr * kk) (kk^T S),
the value currently stored under kk (kk^T S), written back negatively along iclr * kk: with
iclr = 1 the old value under kk is erased, before k v^T writes the new one.

The state layout [B, H, K, V] (key index first) is fla's; RWKV's CUDA kernels keep the
transpose [B, H, V, K]. The state is always accumulated in float32 (float64 for float64
inputs), whatever the inputs' dtype.

Forms: `wkv7_naive` (the definition, one token at a time) and `wkv7_chunked` (the chunked
parallel form, derived in its docstring). `python wkv_kernel.py --bench` times them.
`wkv7_triton` is the same chunked form as Triton kernels (forward only; CUDA, or Triton's CPU
interpreter with TRITON_INTERPRET=1).
"""
import importlib.util
import math

import torch
import torch.nn.functional as F
from einops import rearrange


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs keep float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_wkv7_inputs(r, w, k, v, a, b, state=None):
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
        if x.dtype != r.dtype:
            raise ValueError(f"wkv7: {name} has dtype {x.dtype} but r has {r.dtype}; pass one dtype")
        if x.device != r.device:
            raise ValueError(f"wkv7: {name} is on {x.device} but r is on {r.device}")
    V = v.shape[-1]
    if state is not None:
        if tuple(state.shape) != (B, H, K, V):
            raise ValueError(f"wkv7: state has shape {tuple(state.shape)}, expected [B, H, K, V] = {(B, H, K, V)}")
        if state.dtype != _state_dtype(r.dtype):
            raise ValueError(f"wkv7: state has dtype {state.dtype}, expected {_state_dtype(r.dtype)} "
                             f"for {r.dtype} inputs")
        if state.device != r.device:
            raise ValueError(f"wkv7: state is on {state.device} but r is on {r.device}")


def wkv7_naive(r, w, k, v, a, b, state=None):
    """The definition: one token at a time, exactly the recurrence in the module docstring."""
    check_wkv7_inputs(r, w, k, v, a, b, state)
    B, T, H, K = r.shape
    V = v.shape[-1]
    dtype, sd = r.dtype, _state_dtype(r.dtype)
    S = torch.zeros(B, H, K, V, dtype=sd, device=r.device) if state is None else state.clone()
    r, w, k, v, a, b = (x.to(sd) for x in (r, w, k, v, a, b))
    y = torch.empty(B, T, H, V, dtype=sd, device=r.device)
    for t in range(T):
        r_t, w_t, k_t, v_t, a_t, b_t = (x[:, t] for x in (r, w, k, v, a, b))  # [B, H, K] (v_t: [B, H, V])
        aS = torch.einsum("bhk,bhkv->bhv", a_t, S)                                # a_t^T S_{t-1}  [B, H, V]
        S = (torch.exp(w_t)[..., None] * S                                        # diag(exp(w_t)) S_{t-1}
             + b_t[..., None] * aS[..., None, :]                                  # + b_t (a_t^T S_{t-1})
             + k_t[..., None] * v_t[..., None, :])                                # + k_t v_t^T
        y[:, t] = torch.einsum("bhk,bhkv->bhv", r_t, S)                           # y_t = S_t^T r_t
    return y.to(dtype), S


# ----------------------------------------------------------------------------
# The chunked form

# Largest total log decay of a chunk, -g_C = -(w_1 + ... + w_C) (max over channels), that the
# factored product in `_intra_factored` handles; stronger chunks take `_intra_pairwise`.
# Justified in wkv7_chunked's docstring, step 5.
MAX_FACTORED_SPAN = {torch.float32: 60.0, torch.float64: 600.0}

# wkv7_chunked runs the sequence in segments of whole chunks whose [chunks, B*H, C, K]-sized
# tensors hold about this many numbers (512 KiB in float32: each core's L2 holds the working set).
CHUNKED_SEGMENT_ELEMENTS = 2 ** 17


def _intra_factored(a_D, r_D, b_E, k_E, g_end, max_span):
    """The four intra-chunk matrices as products of [C, K] matrices (any decay up to max_span).

    a_D * exp(-g_C) = a_t exp(g_{t-1} - g_C) and b_E = b_s exp(g_C - g_s), so their product is
    sum_k a_t b_s exp(g_{t-1} - g_s). The clamp only acts in chunks over max_span, whose
    (finite) result the caller replaces.
    """
    up = torch.exp((-g_end).clamp(max=max_span))                     # exp(-g_C)  [n, BH, 1, K], in [1, e^max_span]
    a_, r_ = a_D * up, r_D * up                                      # [n, BH, C, K]
    A_ab = (a_ @ b_E.mT).tril_(-1)                                   # s <  t   [n, BH, C, C]
    A_ak = (a_ @ k_E.mT).tril_(-1)
    A_rb = (r_ @ b_E.mT).tril_()                                     # s <= t
    A_rk = (r_ @ k_E.mT).tril_()
    return A_ab, A_ak, A_rb, A_rk


def _intra_pairwise(w, a, r, b, k):
    """The four intra-chunk matrices from an explicit [C, C, K] tensor of decays (any decay).

    seg[t, s] = w_{s+1} + ... + w_t = g_t - g_s for s <= t, summed inside the segment (so its
    rounding is relative to the segment, not to g_t), and -inf above the diagonal: every
    exp(seg) is in [0, 1].
    """
    C = w.shape[-2]
    t = torch.arange(C, device=w.device)
    after_s = (t[:, None] > t[None, :])[..., None]                   # j > s     [C(j), C(s), 1]
    seg = (w[..., :, None, :] * after_s).cumsum(-3)                  # sum_{s<j<=t} w_j   [N, C, C, K]
    E_r = seg.masked_fill(~(t[:, None] >= t[None, :])[..., None], -math.inf).exp()  # exp(g_t - g_s), s <= t
    E_a = F.pad(E_r[..., :-1, :, :], (0, 0, 0, 0, 1, 0))            # row t is row t-1: exp(g_{t-1} - g_s), s < t
    A_ab = torch.einsum("...tk,...sk,...tsk->...ts", a, b, E_a)      # [N, C, C]
    A_ak = torch.einsum("...tk,...sk,...tsk->...ts", a, k, E_a)
    A_rb = torch.einsum("...tk,...sk,...tsk->...ts", r, b, E_r)
    A_rk = torch.einsum("...tk,...sk,...tsk->...ts", r, k, E_r)
    return A_ab, A_ak, A_rb, A_rk


def wkv7_chunked(r, w, k, v, a, b, state=None, chunk_size: int = 64):
    """The chunked parallel form: the loop over T becomes a loop over T / C chunks.

    Inside one chunk number the tokens t = 1..C, let S_0 be the state entering it, and write
    x * y for the elementwise product, rows of a [C, K] matrix for the tokens' vectors.

    0. Cumulative log decays (per channel, <= 0, non-increasing):
           g_t = w_1 + ... + w_t,   g_0 = 0,   D_t = diag(exp(g_t))
       so that diag(exp(w_{s+1})) ... diag(exp(w_t)) = diag(exp(g_t - g_s)).

    1. Unroll. With u_t = S_{t-1}^T a_t (the "a^T S" term, [V]) one step reads
           S_t = diag(exp(w_t)) S_{t-1} + b_t u_t^T + k_t v_t^T,  hence
           S_t = D_t S_0 + sum_{s<=t} diag(exp(g_t - g_s)) (b_s u_s^T + k_s v_s^T).

    2. The a^T S terms. Put 1. at t-1 into u_t = S_{t-1}^T a_t:
           u_t = S_0^T (a_t * exp(g_{t-1}))
                 + sum_{s<t} (sum_k a_t b_s exp(g_{t-1} - g_s)) u_s
                 + sum_{s<t} (sum_k a_t k_s exp(g_{t-1} - g_s)) v_s
       i.e., stacking the rows t = 1..C,  U = A_aD S_0 + A_ab U + A_ak V  with
           A_aD[t]    = a_t * exp(g_{t-1})                                   [C, K]
           A_ab[t, s] = sum_k a_t b_s exp(g_{t-1} - g_s)   for s < t, else 0 [C, C]
           A_ak[t, s] = sum_k a_t k_s exp(g_{t-1} - g_s)   for s < t, else 0 [C, C]
       A_ab is strictly lower triangular, so this is the unit lower-triangular system
           (I - A_ab) U = A_aD S_0 + A_ak V,
       solved by forward substitution: solve_triangular (unitriangular) against I gives
       (I - A_ab)^{-1}, cheaper here than against the [C, K + V] right-hand side. Linear in S_0:
           U = W S_0 + U_0,   W = (I - A_ab)^{-1} A_aD,   U_0 = (I - A_ab)^{-1} A_ak V,
       and W, U_0 do not depend on the state: they are computed for all chunks at once.

    3. Outputs. y_t = S_t^T r_t with 1.:
           y = R_D S_0 + A_rb U + A_rk V,   R_D[t] = r_t * exp(g_t),
           A_rb[t, s] = sum_k r_t b_s exp(g_t - g_s) for s <= t (diagonal included), A_rk alike.

    4. Carried state. 1. at t = C, then U = W S_0 + U_0 from 2.:
           S_C = D_C S_0 + B_E^T U + K_E^T V,   B_E[s] = b_s * exp(g_C - g_s), K_E alike,
               = (D_C + B_E^T W) S_0 + (B_E^T U_0 + K_E^T V)  =  M S_0 + N.
       M [K, K] and N [K, V] do not depend on the state either; only S <- M S + N runs chunk
       after chunk (one [K, K] x [K, V] product each). With every chunk's S_0 known, U and
       y (3.) are again computed for all chunks at once.

    5. Numerics. The exponents in A_aD, R_D, B_E, K_E, D_C are <= 0: those factors lie in
       [0, 1]. So do the pairwise exp(g_t - g_s) (s <= t) inside the A matrices, but a matrix
       product needs each split into a row factor times a column factor, and
       exp(g_t) * exp(-g_s) overflows once -g_s > 88 (float32). Split about a reference point
       g_ref of the chunk instead, here its end g_C:
           exp(g_t - g_s) = exp(g_t - g_C) * exp(g_C - g_s),
       so the column factor is B_E's (K_E's) own, in [e^-span, 1], and only the rows are
       rescaled: A_aD * exp(-g_C), R_D * exp(-g_C), in [1, e^span] times a, r; span = -g_C is
       the chunk's total decay (max over channels). With span <= MAX_FACTORED_SPAN (60 for a
       float32 state, 600 for float64):
         - exp(g) >= exp(-span) is still a normal number (smallest normal: e^-87.3 float32,
           e^-708.4 float64), so A_aD etc. keep full relative precision when rescaled;
         - every factor is <= e^span (1e26 / 1e260), and so are the discarded products above
           the diagonal, exp(g_t - g_s) <= e^span: far from overflow (3e38 / 1e308), no inf or
           NaN anywhere, also not in the backward pass.
       (The midpoint g_ref = g_C / 2, as in the Triton kernel, bounds both factors by e^(span/2)
       but scales both sides; the discarded products, and so the threshold, are the same.)
       hxa079's log decay is |w| <= e^-0.5 = 0.61 per token, so span <= 39 at C = 64: its
       chunks always take this path. A chunk over the threshold (e.g. w down to -30) instead
       builds the [C, C, K] tensors exp(g_t - g_s) and exp(g_{t-1} - g_s) themselves, each
       exponent a sum over its own segment and set to -inf above the diagonal (every entry in
       [0, 1]): exact for any decay, at ~C times the memory and elementwise work.
       Rounding: g is a running sum, so exp(g) carries a relative error ~|g| * eps (float32:
       <= 39 * 6e-8 = 2.4e-6 for hxa079 at C = 64; the naive loop's products of exp(w) do
       better, ~2e-7). In chunks over the threshold the decays to the chunk end, g_C - g_s,
       are therefore summed over their own segment rather than taken as a difference of two
       g's (both ~ -1000 there: the difference would lose ~6e-5); below it the difference is
       consistent with g itself, and the more accurate.

    Cost per token and head: ~(8 C + 6 N) N multiply-adds, nearly all in batched products (the
    naive loop: ~4 N^2, but one token at a time), plus ~30 elementwise passes over [C, K]-sized
    tensors; the sequential part is T / C products of [K, K] x [K, V].
    The tail is padded with identity steps (w = 0, k = v = a = b = 0). chunk_size = 64 was the
    fastest of 16/32/64/128 on a 2-core CPU at head sizes 64 and 96 (`python wkv_kernel.py --bench`).
    """
    return _run_chunked(r, w, k, v, a, b, state, chunk_size, _chunk_prepare, _chunk_outputs)


def _run_chunked(r, w, k, v, a, b, state, chunk_size, prepare, outputs):
    """wkv7_chunked with its two state-free stages passed in (wkv7_compiled passes them compiled).
    Between them runs the only sequential part, the state carried from chunk to chunk.

    The chunks go through in segments of about CHUNKED_SEGMENT_ELEMENTS numbers per
    [chunks, BH, C, K]-sized tensor: the ~30 passes over those then stay in the cores' caches
    (~1.4x faster than whole-sequence tensors on a 2-core CPU), and the intermediates stay
    bounded however long T is."""
    check_wkv7_inputs(r, w, k, v, a, b, state)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"wkv7_chunked: chunk_size must be a positive int, got {chunk_size!r}")
    B, T, H, K = r.shape
    V = v.shape[-1]
    dtype, sd = r.dtype, _state_dtype(r.dtype)
    S = torch.zeros(B, H, K, V, dtype=sd, device=r.device) if state is None else state
    if T == 0:
        return v.new_empty(B, 0, H, V), S.clone()
    C = min(chunk_size, T)
    n = -(-T // C)                                                   # number of chunks
    pad = n * C - T

    # Batch and heads in one dimension, chunk index first (the loop below walks it):
    # [B, T, H, K] -> [n, BH, C, K], the tail padded with identity steps
    def chunks(x):
        x = F.pad(x.to(sd), (0, 0, 0, 0, 0, pad)) if pad else x.to(sd)
        return rearrange(x, "b (n c) h k -> n (b h) c k", c=C).contiguous()

    r, w, k, v, a, b = (chunks(x) for x in (r, w, k, v, a, b))       # v: [n, BH, C, V]
    S = S.reshape(B * H, K, V)
    per = max(1, CHUNKED_SEGMENT_ELEMENTS // (B * H * C * K))        # chunks per segment
    ys = []
    for i in range(0, n, per):
        W, U0, M, N, r_D, A_rb, A_rk = prepare(*(x[i:i + per] for x in (r, w, k, v, a, b)))

        # 4. the state, chunk after chunk: S_C = M S_0 + N
        S_in = []
        for M_i, N_i in zip(M, N):
            S_in.append(S)                                           # S_0 of chunk i         [BH, K, V]
            S = torch.baddbmm(N_i, M_i, S)                           # M S_0 + N
        S_in = torch.stack(S_in)                                     # [per, BH, K, V]

        ys.append(outputs(S_in, W, U0, r_D, A_rb, A_rk, v[i:i + per]))  # [per, BH, C, V]
    y = rearrange(torch.cat(ys), "n (b h) c v -> b (n c) h v", b=B)[:, :T]
    return y.to(dtype), S.view(B, H, K, V)


def _chunk_prepare(r, w, k, v, a, b):
    """Steps 0-2 and the chunk maps of step 4, for all chunks at once (nothing here needs the state).
    Inputs [n, BH, C, K] (v: [n, BH, C, V]) in the state dtype."""
    C, sd = r.shape[-2], r.dtype

    # 0. cumulative log decays
    g = w.cumsum(-2)                                                 # g_t                    [n, BH, C, K]
    g_prev = g - w                                                   # g_{t-1}
    g_end = g[..., -1:, :]                                           # g_C                    [n, BH, 1, K]
    g_rest = g_end - g                                               # g_C - g_t
    # chunks whose decay is too strong for the factored form (5.); in them |g| is large, so
    # g_C - g_t is summed over its own segment, w_{t+1} + ... + w_C, instead
    max_span = MAX_FACTORED_SPAN[sd]
    strong = (-g_end).amax(-1)[..., 0] > max_span                    # [n, BH]
    if strong.any():
        later = torch.ones(C, C, dtype=sd, device=r.device).triu(1)  # later[t, j] = 1 for j > t
        g_rest = g_rest.index_put((strong,), later @ w[strong])

    # decayed rows (all factors in [0, 1])
    a_D = a * torch.exp(g_prev)                                      # A_aD                   [n, BH, C, K]
    r_D = r * torch.exp(g)                                           # R_D
    to_end = torch.exp(g_rest)
    b_E, k_E = b * to_end, k * to_end                                # B_E, K_E

    # intra-chunk matrices (5.): factored, except in the strong chunks
    A_ab, A_ak, A_rb, A_rk = _intra_factored(a_D, r_D, b_E, k_E, g_end, max_span)  # [n, BH, C, C]
    if strong.any():
        pairwise = _intra_pairwise(*(x[strong] for x in (w, a, r, b, k)))
        A_ab, A_ak, A_rb, A_rk = (A.index_put((strong,), P) for A, P in zip((A_ab, A_ak, A_rb, A_rk), pairwise))

    # 2. W = (I - A_ab)^{-1} A_aD and U_0 = (I - A_ab)^{-1} A_ak V, all chunks at once
    I = torch.eye(C, dtype=sd, device=r.device)
    T_inv = torch.linalg.solve_triangular(I - A_ab, I.expand_as(A_ab), upper=False, unitriangular=True)
    W, U0 = T_inv @ a_D, T_inv @ (A_ak @ v)                          # [n, BH, C, K], [n, BH, C, V]

    # 4. S_C = D_C S_0 + B_E^T (W S_0 + U_0) + K_E^T V = M S_0 + N
    # (sums accumulate in place into fresh products: fewer [n, BH, K, V]-sized temporaries)
    M = b_E.mT @ W                                                   # B_E^T W                [n, BH, K, K]
    M.diagonal(dim1=-2, dim2=-1).add_(torch.exp(g_end[..., 0, :]))  # + D_C
    N = (b_E.mT @ U0).add_(k_E.mT @ v)                               # B_E^T U_0 + K_E^T V    [n, BH, K, V]
    return W, U0, M, N, r_D, A_rb, A_rk


def _chunk_outputs(S_in, W, U0, r_D, A_rb, A_rk, v):
    """Step 3 for all chunks at once, given each chunk's entering state S_in [n, BH, K, V]."""
    U = (W @ S_in).add_(U0)                                          # U = W S_0 + U_0        [n, BH, C, V]
    return (r_D @ S_in).add_(A_rb @ U).add_(A_rk @ v)                # y = R_D S_0 + A_rb U + A_rk V


# ----------------------------------------------------------------------------
# The Triton kernels (forward only)

TRITON_CHUNK = 16                  # tokens per chunk (tl.dot needs every dimension >= 16)
TRITON_MAX_FACTORED_SPAN = 60.0    # largest chunk decay span of the factored path (wkv7_triton doc)
TRITON_BV = 32                     # value columns per program (at most)
TRITON_NUM_WARPS = 8               # chunked kernel; fewest register spills for ptxas sm_90 at K = 64, 96

triton = tl = None                 # set by _load_triton()
_wkv7_fwd_recurrent_kernel = _wkv7_fwd_chunked_kernel = None
_interpreted = False               # whether triton made the kernels for its CPU interpreter


def wkv7_triton(r, w, k, v, a, b, state=None, path: str = "auto"):
    """The forward pass as two Triton kernels; same signature and meaning as `wkv7_naive`.

    path: "auto" (the recurrent kernel for T < TRITON_CHUNK, else the chunked one), "chunked"
    or "recurrent".

    Two kernels, both one program per (batch * head, block of BV value columns), the state
    block S [K, BV] kept in registers (float32) from the first token to the last:

      - `_wkv7_fwd_recurrent_kernel` (decode, T < TRITON_CHUNK): the recurrence itself, token by
        token:  u = S^T a_t;  S = diag(exp(w_t)) S + b_t u^T + k_t v_t^T;  y_t = S^T r_t.
      - `_wkv7_fwd_chunked_kernel` (prefill): TRITON_CHUNK = 16 tokens per step, the chunked form
        derived in `wkv7_chunked`'s docstring (steps 0-4). Per chunk, with S_0 the state entering it:
            0. g_t = w_1 + ... + w_t,  D_t = diag(exp(g_t))
            2. U = (I - A_ab)^{-1} (A_aD S_0 + A_ak V)          (the rows u_t = S_{t-1}^T a_t)
            3. y = R_D S_0 + A_rb U + A_rk V
            4. S_C = D_C S_0 + B_E^T U + K_E^T V
        A_ab[t, s] = sum_k a_t b_s exp(g_{t-1} - g_s) (s < t), A_ak alike with k_s; A_rb, A_rk with
        r_t and exp(g_t - g_s) (s <= t); A_aD[t] = a_t exp(g_{t-1}), R_D[t] = r_t exp(g_t),
        B_E[s] = b_s exp(g_C - g_s), K_E alike. (I - A_ab)^{-1} comes from forward substitution
        over the C rows of the unit lower-triangular matrix; it does not depend on S_0.
        Unlike `wkv7_chunked`, nothing is computed for all chunks at once: each program walks its
        chunks in order and does steps 2-4 for one chunk before the next.

    Numerics (float32 throughout; every tl.dot is input_precision="ieee", so no TF32 rounding):
      - Every exponent is a sum of the w's it spans, never a difference of two running sums:
        g_t, g_{t-1} and g_C - g_t are inclusive/exclusive scans of w, of w shifted by one token,
        and a reverse scan. Their rounding is relative to the decay they describe.
      - A_aD, R_D, B_E, K_E, D_C have exponents <= 0: factors in [0, 1], any decay.
      - The four C x C matrices need exp(g_t - g_s) split into a row and a column factor for a
        tl.dot. The split is about the chunk's midpoint g_ref = g_C / 2 (per channel), as in
        `wkv7_chunked` step 5: exact (no overflow, no underflow of a factor that matters) while
        the chunk's total decay span = max_k(-g_C) <= TRITON_MAX_FACTORED_SPAN = 60, i.e. for any
        w >= -3.75 per step at C = 16. hxa079's w is in [-exp(-0.5), 0) = [-0.61, 0): its span is
        at most 9.7, so it always takes this path.
      - A chunk over that span (e.g. w = -30 per step) is not an error and not garbage: the kernel
        branches, for that chunk only, to a pairwise form that builds each column s of the four
        matrices from exp(sum_{s<j<=t} w_j) as a [C, BK] tile (exponents <= 0, masked to -inf
        above the diagonal): exact for any decay, about C times the elementwise work.

    Dtypes: r, w, k, v, a, b float32, bfloat16 or float16 (loaded and computed in float32); y in
    the inputs' dtype; state float32 in and out. float64 inputs raise a ValueError (use
    impl="naive" or "chunked" for float64). Head sizes: any K, V (64, 96, 24, ...): tiles are
    the next power of two (at least 16) and the loads/stores are masked.

    Backward: not implemented. With grad mode on and any input requiring grad, wkv7_triton
    raises a RuntimeError rather than returning a tensor that silently has no gradient.

    Triton is imported on the first call, so this module imports without it. On a CPU the
    kernels run in Triton's interpreter when TRITON_INTERPRET=1 was set before triton was first
    imported and before the first call; otherwise they need CUDA tensors.
    """
    check_wkv7_inputs(r, w, k, v, a, b, state)
    if r.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"wkv7_triton: inputs must be float32, bfloat16 or float16, got {r.dtype} "
                         f"(the kernels accumulate in float32; use impl='naive' or 'chunked' for float64)")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, w, k, v, a, b, state)):
        raise RuntimeError("wkv7_triton: forward only, there is no backward; use impl='chunked' or 'naive' "
                           "for gradients, or call it under torch.no_grad()")
    if path not in ("auto", "chunked", "recurrent"):
        raise ValueError(f"wkv7_triton: path must be 'auto', 'chunked' or 'recurrent', got {path!r}")
    B, T, H, K = r.shape
    V = v.shape[-1]
    sT = torch.empty(B, H, K, V, dtype=torch.float32, device=r.device)
    if T == 0:
        if state is None:
            sT.zero_()
        else:
            sT.copy_(state)
        return v.new_empty(B, 0, H, V), sT
    _load_triton()
    if not r.is_cuda and not _interpreted:
        raise ValueError(f"wkv7_triton: inputs are on {r.device}; the kernels need CUDA tensors, or "
                         f"TRITON_INTERPRET=1 set before the first call (and before triton's import) for the CPU")
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    s0 = sT if state is None else state.contiguous()                      # unread when state is None
    # Triton's interpreter converts float32 to bfloat16 by truncation (the GPU rounds to nearest
    # even): there, y is stored in float32 and rounded by torch below.
    y_dtype = torch.float32 if (_interpreted and r.dtype == torch.bfloat16) else r.dtype
    y = torch.empty(B, T, H, V, dtype=y_dtype, device=r.device)
    BK = max(16, _next_pow2(K))
    BV = min(max(16, _next_pow2(V)), TRITON_BV)
    grid = (triton.cdiv(V, BV), B * H)
    if path == "recurrent" or (path == "auto" and T < TRITON_CHUNK):
        _wkv7_fwd_recurrent_kernel[grid](r, w, k, v, a, b, s0, y, sT, T, H=H, K=K, V=V, BK=BK, BV=BV,
                                         HAS_S0=state is not None)
    else:
        _wkv7_fwd_chunked_kernel[grid](r, w, k, v, a, b, s0, y, sT, T, H=H, K=K, V=V, C=TRITON_CHUNK,
                                       BK=BK, BV=BV, HAS_S0=state is not None,
                                       MAX_SPAN=TRITON_MAX_FACTORED_SPAN, num_warps=TRITON_NUM_WARPS)
    return y.to(r.dtype), sT


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _load_triton():
    """Import triton and define the two kernels (once)."""
    global triton, tl, _wkv7_fwd_recurrent_kernel, _wkv7_fwd_chunked_kernel, _interpreted
    if _wkv7_fwd_chunked_kernel is not None:
        return
    import triton
    import triton.language as tl

    @triton.jit
    def _wkv7_fwd_recurrent_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, sT_ptr, T,
                                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                   BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
        # program (i_v, i_bh): value columns [i_v * BV, (i_v + 1) * BV) of head i_bh % H of batch i_bh // H
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        i_b, i_h = i_bh // H, i_bh % H
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]           # [BK, BV] in [B, H, K, V]
        if HAS_S0:
            S = tl.load(s0_ptr + p_s, mask=m_kv, other=0.0)                # S_0
        else:
            S = tl.zeros([BK, BV], dtype=tl.float32)
        p_k = (i_b * T * H + i_h) * K + o_k                               # token 0 in [B, T, H, K]
        p_v = (i_b * T * H + i_h) * V + o_v                               # token 0 in [B, T, H, V]
        for t in range(0, T):
            r_t = tl.load(r_ptr + p_k, mask=m_k, other=0.0).to(tl.float32)
            w_t = tl.load(w_ptr + p_k, mask=m_k, other=0.0).to(tl.float32)
            k_t = tl.load(k_ptr + p_k, mask=m_k, other=0.0).to(tl.float32)
            a_t = tl.load(a_ptr + p_k, mask=m_k, other=0.0).to(tl.float32)
            b_t = tl.load(b_ptr + p_k, mask=m_k, other=0.0).to(tl.float32)
            v_t = tl.load(v_ptr + p_v, mask=m_v, other=0.0).to(tl.float32)
            u_t = tl.sum(a_t[:, None] * S, axis=0)                        # a_t^T S_{t-1}          [BV]
            S = (tl.exp(w_t)[:, None] * S                                 # diag(exp(w_t)) S_{t-1}
                 + b_t[:, None] * u_t[None, :]                            # + b_t (a_t^T S_{t-1})
                 + k_t[:, None] * v_t[None, :])                           # + k_t v_t^T
            y_t = tl.sum(r_t[:, None] * S, axis=0)                        # y_t = S_t^T r_t        [BV]
            tl.store(y_ptr + p_v, y_t.to(y_ptr.dtype.element_ty), mask=m_v)
            p_k += H * K
            p_v += H * V
        tl.store(sT_ptr + p_s, S, mask=m_kv)

    @triton.jit
    def _wkv7_fwd_chunked_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, sT_ptr, T,
                                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                 C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                 HAS_S0: tl.constexpr, MAX_SPAN: tl.constexpr):
        # program (i_v, i_bh): value columns [i_v * BV, (i_v + 1) * BV) of head i_bh % H of batch i_bh // H
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        i_b, i_h = i_bh // H, i_bh % H
        o_t = tl.arange(0, C)                                             # token within the chunk
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]           # [BK, BV] in [B, H, K, V]
        if HAS_S0:
            S = tl.load(s0_ptr + p_s, mask=m_kv, other=0.0)                # S_0 of the first chunk
        else:
            S = tl.zeros([BK, BV], dtype=tl.float32)
        s_lt = o_t[None, :] < o_t[:, None]                                # [t, s]: s < t
        s_le = o_t[None, :] <= o_t[:, None]                               # [t, s]: s <= t
        eye = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)            # I  [C, C]
        base_k = (i_b * T * H + i_h) * K                                  # token 0 in [B, T, H, K]
        base_v = (i_b * T * H + i_h) * V                                  # token 0 in [B, T, H, V]

        for t0 in range(0, T, C):
            # load the chunk; tokens past T are identity steps (w = 0, everything else 0)
            t = t0 + o_t
            m_tk = (t < T)[:, None] & m_k[None, :]
            p_k = base_k + t[:, None] * (H * K) + o_k[None, :]             # [C, BK]
            p_v = base_v + t[:, None] * (H * V) + o_v[None, :]             # [C, BV]
            r = tl.load(r_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + p_v, mask=(t < T)[:, None] & m_v[None, :], other=0.0).to(tl.float32)
            # w shifted by one token inside the chunk: w_prev[t] = w_{t-1} (0 at the chunk start),
            # w_next[t] = w_{t+1} (0 at the chunk end)
            w_prev = tl.load(w_ptr + p_k - H * K, mask=m_tk & (o_t > 0)[:, None], other=0.0).to(tl.float32)
            w_next = tl.load(w_ptr + p_k + H * K, mask=((t + 1 < T) & (o_t + 1 < C))[:, None] & m_k[None, :],
                             other=0.0).to(tl.float32)

            # 0. cumulative log decays, each a scan of the w's it spans
            g = tl.cumsum(w, axis=0)                                      # g_t                    [C, BK]
            g_prev = tl.cumsum(w_prev, axis=0)                            # g_{t-1}
            g_rest = tl.cumsum(w_next, axis=0, reverse=True)              # g_C - g_t
            g_end = tl.sum(w, axis=0)                                     # g_C                    [BK]

            # the decayed rows of 2.-4. (exponents <= 0: factors in [0, 1])
            a_D = a * tl.exp(g_prev)                                      # A_aD[t] = a_t exp(g_{t-1})
            r_D = r * tl.exp(g)                                           # R_D[t]  = r_t exp(g_t)
            to_end = tl.exp(g_rest)
            b_E = b * to_end                                              # B_E[s]  = b_s exp(g_C - g_s)
            k_E = k * to_end                                              # K_E[s]  = k_s exp(g_C - g_s)

            # 2./3. the intra-chunk matrices A_ab, A_ak (s < t) and A_rb, A_rk (s <= t)
            span = tl.max(-g_end, axis=0)                                 # the chunk's total decay, max over channels
            if span <= MAX_SPAN:
                # factored about g_ref = g_C / 2: (a_t exp(g_{t-1} - g_ref)) . (b_s exp(g_ref - g_s)),
                # every factor within exp(+-span / 2)
                m = tl.exp(-0.5 * g_end)[None, :]                         # exp(-g_ref)            [1, BK]
                a_m, r_m, b_m, k_m = a_D * m, r_D * m, b_E * m, k_E * m
                A_ab = tl.where(s_lt, tl.dot(a_m, tl.trans(b_m), input_precision="ieee"), 0.0)
                A_ak = tl.where(s_lt, tl.dot(a_m, tl.trans(k_m), input_precision="ieee"), 0.0)
                A_rb = tl.where(s_le, tl.dot(r_m, tl.trans(b_m), input_precision="ieee"), 0.0)
                A_rk = tl.where(s_le, tl.dot(r_m, tl.trans(k_m), input_precision="ieee"), 0.0)
            else:
                # pairwise, one column s at a time: exp(g_t - g_s) = exp(w_{s+1} + ... + w_t) as a
                # [C, BK] tile, -inf (so 0) where the matrix is zero
                A_ab = tl.zeros([C, C], dtype=tl.float32)
                A_ak = tl.zeros([C, C], dtype=tl.float32)
                A_rb = tl.zeros([C, C], dtype=tl.float32)
                A_rk = tl.zeros([C, C], dtype=tl.float32)
                # (reloaded rather than kept: fewer registers live through the common path)
                r = tl.load(r_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
                k = tl.load(k_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
                a = tl.load(a_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + p_k, mask=m_tk, other=0.0).to(tl.float32)
                w_prev = tl.load(w_ptr + p_k - H * K, mask=m_tk & (o_t > 0)[:, None], other=0.0).to(tl.float32)
                for s in range(0, C):
                    at_s = (o_t == s)[:, None]
                    b_s = tl.sum(tl.where(at_s, b, 0.0), axis=0)[None, :]  # row s of b, k       [1, BK]
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

            # 2. (I - A_ab)^{-1} by forward substitution: row t = e_t + sum_{s<t} A_ab[t, s] row s
            # (rows s >= t are still e_s there, but A_ab[t, s] = 0 for them)
            T_inv = eye
            for i in range(1, C):
                at_i = (o_t == i)[:, None]
                A_i = tl.sum(tl.where(at_i, A_ab, 0.0), axis=0)           # A_ab[i, :]             [C]
                row = tl.sum(A_i[:, None] * T_inv, axis=0) + tl.where(o_t == i, 1.0, 0.0)
                T_inv = tl.where(at_i, row[None, :], T_inv)
            # 2. U = (I - A_ab)^{-1} (A_aD S_0 + A_ak V)                                           [C, BV]
            rhs = tl.dot(a_D, S, input_precision="ieee") + tl.dot(A_ak, v, input_precision="ieee")
            U = tl.dot(T_inv, rhs, input_precision="ieee")
            # 3. y = R_D S_0 + A_rb U + A_rk V                                                      [C, BV]
            y = (tl.dot(r_D, S, input_precision="ieee") + tl.dot(A_rb, U, input_precision="ieee")
                 + tl.dot(A_rk, v, input_precision="ieee"))
            tl.store(y_ptr + p_v, y.to(y_ptr.dtype.element_ty), mask=(t < T)[:, None] & m_v[None, :])
            # 4. S_C = D_C S_0 + B_E^T U + K_E^T V                                                  [BK, BV]
            S = (tl.exp(g_end)[:, None] * S + tl.dot(tl.trans(b_E), U, input_precision="ieee")
                 + tl.dot(tl.trans(k_E), v, input_precision="ieee"))

        tl.store(sT_ptr + p_s, S, mask=m_kv)

    _interpreted = type(_wkv7_fwd_chunked_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------
# The chunked form, compiled


_COMPILED = {}   # (prepare, outputs) compiled once per process, lazily


def wkv7_compiled(r, w, k, v, a, b, state=None, chunk_size: int = 64):
    """wkv7_chunked with its two state-free stages (`_chunk_prepare`, `_chunk_outputs`) compiled by
    torch.compile (inductor: C++/OpenMP on a CPU, Triton on a GPU). The same code, not a copy.

    Compiled with dynamic=True: the number of chunks and B*H are symbolic, so a new T or batch does
    not recompile (the chunk size, head size and dtype are specialised; each new one compiles once).
    The data-dependent switch to the pairwise path for strongly decaying chunks is a graph break:
    that rare branch runs eagerly. The chunk-to-chunk state scan stays a plain loop of n small
    products. The first call pays the compile (about 20-40 s on a 2-core CPU; printed by --bench).
    Differentiable like wkv7_chunked (inductor compiles the backward too)."""
    if not _COMPILED:
        _COMPILED["stages"] = (torch.compile(_chunk_prepare, dynamic=True),
                               torch.compile(_chunk_outputs, dynamic=True))
    return _run_chunked(r, w, k, v, a, b, state, chunk_size, *_COMPILED["stages"])


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
    if r.is_cuda and r.dtype != torch.float64 and not needs_grad and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "naive" if r.shape[1] <= 1 else "chunked"


def wkv7(r, w, k, v, a, b, state=None, impl: str = "auto"):
    """y, S_T = WKV-7 via the chosen form ("auto", or a key of IMPLS)."""
    if impl == "auto":
        impl = pick_impl(r, w, k, v, a, b, state)
    if impl not in IMPLS:
        raise ValueError(f"wkv7: unknown impl {impl!r}; choose 'auto' or one of {sorted(IMPLS)}")
    return IMPLS[impl](r, w, k, v, a, b, state)


# ----------------------------------------------------------------------------
# python wkv_kernel.py --bench


def _bench_inputs(B, T, H, N, dtype, device, seed=0):
    """hxa079-like inputs: log decay in [-e^-0.5, 0), a = -kk, b = kk * iclr with kk unit-norm."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=gen)  # noqa: E731
    r, k, v = rnd(), rnd(), rnd()
    w = -torch.exp(-0.5 - F.softplus(rnd()))
    kk = F.normalize(rnd(), dim=-1)
    iclr = torch.sigmoid(rnd())
    return [x.to(dtype=dtype, device=device) for x in (r, w, k, v, -kk, kk * iclr)]


def _load_fla_dplr_naive():
    """fla-core's plain-torch reference of the DPLR (WKV-7) recurrence, fla/ops/generalized_delta_rule/
    dplr/naive.py, loaded as a single file (it needs only torch and einops; importing the fla
    package would load its Triton kernels). None when fla-core is not installed."""
    import importlib.util
    import os
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "ops", "generalized_delta_rule", "dplr", "naive.py")
    if not os.path.exists(path):
        return None
    file_spec = importlib.util.spec_from_file_location("fla_dplr_naive", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def _bench_peers():
    """Other CPU implementations of the same recurrence: name -> f(r, w, k, v, a, b) -> y.

    Each converts to its own layout outside the timed call: prepare(inputs) -> run() -> y."""
    peers = {}

    def rwkv_pip_style(r, w, k, v, a, b):
        # How the `rwkv` pip package runs RWKV-7 on CPU: one token at a time, state [V, K] per
        # head, state = state * decay + state @ (a b^T) + v k^T,  y = state @ r.
        B, T, H, K = r.shape
        V = v.shape[-1]
        r, k, v, a, b = (rearrange(x, "b t h k -> t (b h) k").contiguous() for x in (r, k, v, a, b))
        decay = rearrange(torch.exp(w), "b t h k -> t (b h) 1 k").contiguous()

        def run():
            S = torch.zeros(B * H, V, K, dtype=torch.float32)
            ys = []
            for t in range(T):
                ab = a[t, :, :, None] @ b[t, :, None, :]                # a b^T  [BH, K, K]
                vk = v[t, :, :, None] @ k[t, :, None, :]                # v k^T  [BH, V, K]
                S = S * decay[t] + S @ ab + vk
                ys.append(S @ r[t, :, :, None])                         # [BH, V, 1]
            return rearrange(torch.stack(ys), "t (b h) v 1 -> b t h v", b=B)
        return run
    peers["rwkv pip-style loop"] = rwkv_pip_style

    dplr = _load_fla_dplr_naive()
    if dplr is None:
        print("(fla-core is not installed: its rows are skipped)")
        return peers
    dplr_recurrence, dplr_chunkwise = dplr.dplr_recurrence, dplr.dplr_chunkwise

    def fla(fn, **kw):
        def prepare(r, w, k, v, a, b):
            # fla: [B, H, T, K] layout, q scaled by K**-0.5 inside (undone here), alpha/beta = a/b
            K = r.shape[-1]
            q, w, k, v, a, b = (x.transpose(1, 2).contiguous() for x in (r * K ** 0.5, w, k, v, a, b))
            return lambda: fn(q, k, v, a, b, w, **kw)[0].transpose(1, 2)
        return prepare
    peers["fla dplr_recurrence"] = fla(dplr_recurrence)
    peers["fla dplr_chunkwise (C=32)"] = fla(dplr_chunkwise, chunk_size=32)
    return peers


def _bench_gpu_peers():
    """fla-core's Triton kernels for RWKV-7 (same [B, T, H, K] layout, w = log decay), when installed."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except ImportError:
        print("(fla-core is not installed: its rows are skipped)")
        return {}
    return {"fla chunk_rwkv7": lambda *x: (lambda: chunk_rwkv7(*x, scale=1.0)[0]),
            "fla fused_recurrent_rwkv7": lambda *x: (lambda: fused_recurrent_rwkv7(*x, scale=1.0)[0])}


def bench(shapes=None, dtype=None, device="cpu", repeats=5):
    """Median wall time of each form (every IMPLS entry, then the installed peers) on each shape.
    The first call of each form is timed apart ("1st call": the compile of `compiled`/`triton`)."""
    import statistics
    import time

    cuda = device != "cpu"
    if shapes is None:
        shapes = ((1, 4096, 64, 96), (8, 4096, 32, 64), (1, 1, 64, 96), (64, 1, 64, 96)) if cuda else \
                 ((1, 2048, 8, 64), (1, 512, 64, 96))
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(run):
        t0 = time.perf_counter()
        run()                                                            # warm-up (and compile)
        sync()
        first = time.perf_counter() - t0
        times = []
        for _ in range(min(repeats, 3) if first > 1.0 else repeats):    # fewer repeats for the slow loops
            t0 = time.perf_counter()
            out = run()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), first, out

    peers = _bench_gpu_peers() if cuda else _bench_peers()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {dtype}; median of {repeats} "
          f"(3 when a run takes > 1 s) after a warm-up; rel err = max|y - y_naive| / max|y_naive|")
    if cuda:
        print(torch.cuda.get_device_name())
        buf = torch.empty(2 ** 28, dtype=torch.uint8, device=device)
        t, _, _ = timed(lambda: buf.clone())
        print(f"device-to-device copy: {2 * buf.numel() / t / 1e9:.0f} GB/s (read + write)")
    print(f"{'shape':<22} {'form':<28} {'ms':>9} {'tokens/s':>10} {'vs naive':>9} {'rel err':>8} {'1st call':>9}"
          + ("  GB/s" if cuda else ""))
    for B, T, H, N in shapes:
        x = _bench_inputs(B, T, H, N, dtype, device)
        rows = [(name, lambda f=f: f(*x)[0]) for name, f in IMPLS.items()]
        rows += [(name, prepare(*x)) for name, prepare in peers.items()]
        t_naive = y_naive = None
        moved = sum(t.numel() * t.element_size() for t in x) + x[3].numel() * x[3].element_size()  # 6 in, y out
        for name, run in rows:
            label = f"B{B} T{T} H{H} N{N}"
            try:
                t, first, y = timed(run)
            except Exception as e:                                       # e.g. a GPU-only form on a CPU
                print(f"{label:<22} {name:<28} skipped: {type(e).__name__}: {str(e)[:60]}")
                continue
            if name == "naive":
                t_naive, y_naive = t, y.float()
            err = ((y.float() - y_naive).abs().max() / y_naive.abs().max()).item()
            print(f"{label:<22} {name:<28} {t * 1e3:9.2f} {B * T / t:10.0f} {t_naive / t:8.1f}x {err:8.1e} "
                  f"{first:8.2f}s" + (f"  {moved / t / 1e9:4.0f}" if cuda else ""))


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bench", action="store_true", help="time every form (IMPLS) and the installed CPU peers")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.bench:
        bench(repeats=args.repeats, device=args.device)
    else:
        p.print_help()
