"""
Time every WKV-7 form of wkv_kernel.py (wkv_kernel.IMPLS) against the installed peers.

    python bench_wkv.py [--repeats N] [--device cuda]

On a CPU (float32): B1 T2048 H8 N64 and B1 T512 H64 N96, against a loop written the way the
`rwkv` pip package runs RWKV-7 and, when fla-core is installed, its pure-torch DPLR references.
On CUDA (bfloat16): model-sized prefills and decode steps against fla-core's Triton kernels
for RWKV-7, with GB/s moved. The first call of each form is timed apart (the compile of
`compiled` and `triton`). Here N is the head size (K = V = N).

fla-core's references come through fla_adapter.py, which also puts its recurrence through the
kernel suite:  python -m pytest -q test_ref.py --wkv-impl fla_adapter:fla_dplr_recurrence
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from einops import rearrange

from fla_adapter import load_fla_dplr_naive, to_fla_layout
from wkv_kernel import IMPLS


def bench_inputs(B, T, H, N, dtype, device, seed=0):
    """hxa079-like inputs: log decay in [-e^-0.5, 0), a = -kk, b = kk * iclr with kk unit-norm."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=gen)  # noqa: E731
    r, k, v = rnd(), rnd(), rnd()
    w = -torch.exp(-0.5 - F.softplus(rnd()))
    kk = F.normalize(rnd(), dim=-1)
    iclr = torch.sigmoid(rnd())
    return [x.to(dtype=dtype, device=device) for x in (r, w, k, v, -kk, kk * iclr)]


# ----------------------------------------------------------------------------
# The peers


def cpu_peers():
    """Other CPU implementations of the same recurrence: name -> prepare(r, w, k, v, a, b) -> run,
    with run() -> y. Each converts to its own layout in prepare, outside the timed call."""
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

    dplr = load_fla_dplr_naive()
    if dplr is None:
        print("(fla-core is not installed: its rows are skipped)")
        return peers

    def fla(fn, **kw):
        def prepare(r, w, k, v, a, b):
            args = to_fla_layout(r, w, k, v, a, b)
            return lambda: fn(*args, **kw)[0].transpose(1, 2)
        return prepare
    peers["fla dplr_recurrence"] = fla(dplr.dplr_recurrence)
    peers["fla dplr_chunkwise (C=32)"] = fla(dplr.dplr_chunkwise, chunk_size=32)
    return peers


def gpu_peers():
    """fla-core's Triton kernels for RWKV-7 (same [B, T, H, K] layout, w = log decay), when installed."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except ImportError:
        print("(fla-core is not installed: its rows are skipped)")
        return {}
    return {"fla chunk_rwkv7": lambda *x: (lambda: chunk_rwkv7(*x, scale=1.0)[0]),
            "fla fused_recurrent_rwkv7": lambda *x: (lambda: fused_recurrent_rwkv7(*x, scale=1.0)[0])}


# ----------------------------------------------------------------------------
# The benchmark


def bench(shapes=None, dtype=None, device="cpu", repeats=5):
    """Median wall time of each form (every IMPLS entry, then the installed peers) on each shape.
    The first call of each form is timed apart ("1st call": the compile of `compiled`/`triton`)."""
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

    peers = gpu_peers() if cuda else cpu_peers()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {dtype}; median of {repeats} "
          f"(3 when a run takes > 1 s) after a warm-up; rel err = max|y - y_naive| / max|y_naive|; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (a busy machine slows every row)")
    if cuda:
        print(torch.cuda.get_device_name())
        buf = torch.empty(2 ** 28, dtype=torch.uint8, device=device)
        t, _, _ = timed(lambda: buf.clone())
        print(f"device-to-device copy: {2 * buf.numel() / t / 1e9:.0f} GB/s (read + write)")
    print(f"{'shape':<22} {'form':<28} {'ms':>9} {'tokens/s':>10} {'vs naive':>9} {'rel err':>8} {'1st call':>9}"
          + ("  GB/s" if cuda else ""))
    for B, T, H, N in shapes:
        x = bench_inputs(B, T, H, N, dtype, device)
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
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per form and shape (median)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (bfloat16, model-sized shapes, fla-core's kernels)")
    args = p.parse_args()
    bench(repeats=args.repeats, device=args.device)
