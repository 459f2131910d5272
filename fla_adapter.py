"""
fla-core's pure-torch reference of the WKV-7 (DPLR) recurrence, with wkv_kernel's signature.

    python -m pytest -q test_ref.py --wkv-impl fla_adapter:fla_dplr_recurrence

puts a kernel no one here wrote through the WKV property suite of the tests; bench_wkv.py times
fla-core's references beside the project's forms. fla-core is optional (pip install fla-core):
without it `load_fla_dplr_naive()` is None and `fla_dplr_recurrence` raises ImportError.

fla's state update is S_t = S_{t-1} * exp(gk_t) + k_t v_t^T + beta_t (alpha_t^T S_{t-1}), with
its tensors [B, H, T, K]: wkv_kernel's with alpha = a, beta = b, gk = w (the log decay), once
the layout is changed and q is scaled (see to_fla_layout).
"""
import functools
import importlib.util
import os

import torch


@functools.cache
def load_fla_dplr_naive():
    """fla-core's plain-torch reference of the DPLR (WKV-7) recurrence, fla/ops/generalized_delta_rule/
    dplr/naive.py, loaded as a single file (it needs only torch and einops; importing the fla
    package would load its Triton kernels). None when fla-core is not installed."""
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


def to_fla_layout(r, w, k, v, a, b):
    """wkv_kernel's inputs [B, T, H, K] as fla's DPLR arguments (q, k, v, alpha, beta, gk), [B, H, T, K].
    fla's state update is S_t = S_{t-1} * exp(gk_t) + k v^T + beta (alpha^T S_{t-1}): ours with
    alpha = a, beta = b, gk = w. It scales q by K**-0.5 inside, so q = r * K**0.5 (in float32,
    where fla computes: no extra rounding for bfloat16 inputs)."""
    q = r.float() * r.shape[-1] ** 0.5
    return tuple(x.transpose(1, 2).contiguous() for x in (q, k, v, a, b, w))


def fla_dplr_recurrence(r, w, k, v, a, b, S0=None):
    """fla-core's `dplr_recurrence` with wkv_kernel's signature: y [B, T, H, V], S_T [B, H, K, V].

    dplr_recurrence converts its inputs to float32 and computes in float32: float64 inputs are
    refused here (a TypeError) rather than answered at float32 accuracy in a float64 tensor."""
    if r.dtype == torch.float64:
        raise TypeError("fla_dplr_recurrence: fla's dplr_recurrence computes in float32; float64 is not supported")
    dplr = load_fla_dplr_naive()
    if dplr is None:
        raise ImportError("fla_dplr_recurrence: fla-core is not installed (pip install fla-core)")
    y, S = dplr.dplr_recurrence(*to_fla_layout(r, w, k, v, a, b), initial_state=S0)
    return y.transpose(1, 2).to(r.dtype), S                              # y comes back in q's dtype, float32
