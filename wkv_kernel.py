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
and iclr in (0, 1) an "in-context learning rate", so the middle term is
    - kk (iclr * kk)^T S = - diag-scaled projection of S onto kk,
i.e. the old value stored under kk is partly erased before k v^T writes the new one.

The state layout [B, H, K, V] (key index first) is fla's; RWKV's CUDA kernels keep the
transpose [B, H, V, K]. The state is always accumulated in float32 (float64 for float64
inputs), whatever the inputs' dtype.
"""
import torch


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
# One entry point for every form. The model calls this.

IMPLS = {"naive": wkv7_naive}


def pick_impl(r) -> str:
    """What impl="auto" runs for these inputs."""
    return "naive"


def wkv7(r, w, k, v, a, b, state=None, impl: str = "auto"):
    """y, S_T = WKV-7 via the chosen form ("auto", or a key of IMPLS)."""
    if impl == "auto":
        impl = pick_impl(r)
    if impl not in IMPLS:
        raise ValueError(f"wkv7: unknown impl {impl!r}; choose 'auto' or one of {sorted(IMPLS)}")
    return IMPLS[impl](r, w, k, v, a, b, state)
