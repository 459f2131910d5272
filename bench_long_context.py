"""
Long context on the embedded tiny model (TINY, float32, batch 1): prefill time, tokens/s and peak
memory, and the decode step time at that cache length, for T = 4k ... 64k.

    python bench_long_context.py                      # the table
    python bench_long_context.py --T 4096,32768 --decode-steps 20 --threads 1
    python bench_long_context.py --check              # 32k: whole == 4 x 8192 split, 2000 decode steps
    python bench_long_context.py --memory             # the memory formulas against measurements

Each T runs in a fresh process (this script calling itself with --one T). Memory is resident
set size (RSS, unaffected by load on the machine): "peak" is the process's peak RSS (VmHWM) from
just before the prefill, when it is reset, to the end of the prefill, and "+prefill" that peak
minus the RSS just before the prefill (after import, model build and a 64-token warm-up), i.e.
what the prefill itself added, logits and state included. Times are wall-clock medians and noisy
on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import hrwkv7_ref
from hrwkv7_ref import TINY, HRWKV7Config, random_model


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB: VmHWM from /proc/self/status (Linux; reset by
    reset_peak_rss), else getrusage's ru_maxrss (the peak since the process started)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident set size of this process now, MiB (VmRSS; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def reset_peak_rss() -> bool:
    """Set the peak RSS (VmHWM) to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def random_ids(vocab_size: int, T: int, seed: int = 1):
    return torch.randint(0, vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode_step_times(model, logits, state, steps: int, warmup: int = 3) -> list:
    """Greedy decode `warmup + steps` tokens from (logits, state); the wall time of each timed step, s."""
    times = []
    for n in range(warmup + steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)                     # [1, 1]
        t0 = time.perf_counter()
        logits, state = model(nxt, state)
        if n >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def cat_time(model, state, repeats: int = 20) -> float:
    """Shortest wall time (the least disturbed by other load) of the KV-cache appends one decode step
    does (torch.cat of k and v in every GQA layer) at the state's cache length, s."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in state.per_layer:
            if isinstance(s, tuple):
                torch.cat([s[0], s[0][:, :, :1]], dim=2), torch.cat([s[1], s[1][:, :, :1]], dim=2)
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def one(T: int, decode_steps: int, repeats: int = 3) -> dict:
    """Prefill T random tokens `repeats` times (the shortest time counts: the least disturbed by other
    load), then decode; what the table prints for T (run in a fresh process)."""
    torch.manual_seed(0)
    model = random_model(TINY, dtype=torch.float32)
    ids = random_ids(model.config.vocab_size, T)
    model(ids[:, :64])                                                  # warm-up: kernels, allocator
    reset_peak_rss()
    base = rss_mib()
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        logits, state = model(ids)
        times.append(time.perf_counter() - t0)
        if r == 0:
            peak = peak_rss_mib()                                       # the first prefill's peak
        if r + 1 < repeats:
            del logits, state
    prefill_s = min(times)
    steps = decode_step_times(model, logits, state, decode_steps)
    return dict(T=T, prefill_s=prefill_s, tok_s=T / prefill_s, peak_mib=peak, delta_mib=peak - base,
                step_ms=1e3 * statistics.median(steps), step_min_ms=1e3 * min(steps), cat_ms=1e3 * cat_time(model, state),
                kv_mib=state.nbytes()["kv_cache"] / 2 ** 20, finite=bool(torch.isfinite(logits).all()))


def sdpa_backends(dtype=torch.float32) -> dict:
    """Which aten kernel F.scaled_dot_product_attention runs for the tiny model's GQA shapes, per case
    of causal_attention (fresh prefill, prefill after a cache, decode step), from the profiler."""
    from torch.profiler import profile
    cfg = HRWKV7Config.from_dict(TINY)
    H, KV, N = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    attention = hrwkv7_ref.causal_attention
    found = {}
    for case, P, T in (("prefill, empty cache", 0, 64), ("prefill after a cache", 64, 64), ("decode step", 128, 1)):
        q, k = torch.randn(1, H, T, N, dtype=dtype), torch.randn(1, KV, P + T, N, dtype=dtype)
        with profile() as prof:
            attention(q, k, k)
        found[case] = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_") and "attention" in e.key})
    return found


@torch.no_grad()
def interleaved_step_times(model, states: dict, rounds: int = 200) -> dict:
    """One decode step from each state in turn, `rounds` times (the states are not advanced, so each
    step runs at its state's cache length; interleaving gives every state the same machine load);
    name -> list of wall times, s."""
    nxt = torch.zeros(1, 1, dtype=torch.long)
    times = {name: [] for name in states}
    for _ in range(rounds):
        for name, state in states.items():
            t0 = time.perf_counter()
            model(nxt, state)
            times[name].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def check_32k(decode_steps: int = 2000, split: int = 4) -> bool:
    """32768-token prefill: peak RSS, whole == `split` pieces with the state carried (float32,
    relative 1e-5), then `decode_steps` decode steps with finite logits, and the decode step time
    at 32k of cache against that at 1k (bound: 2x; steps interleaved, medians)."""
    T = 32768
    model = random_model(TINY, dtype=torch.float32)
    ids = random_ids(model.config.vocab_size, T)
    t0 = time.perf_counter()
    whole, state = model(ids)
    print(f"prefill {T}: {time.perf_counter() - t0:.1f} s, peak RSS of the process so far {peak_rss_mib():.0f} MiB")
    rwkv, kv = hrwkv7_ref.state_bytes(model.config, T, dtype=torch.float32)
    got = state.nbytes()
    print(f"state at {T}: RWKV {got['rwkv_state']} + KV cache {got['kv_cache']} bytes; "
          f"state_bytes(TINY, {T}, dtype=torch.float32) = {rwkv} + {kv}")
    pieces, st = [], None
    for part in ids.chunk(split, dim=1):
        lg, st = model(part, st)
        pieces.append(lg)
    rel = ((torch.cat(pieces, dim=1) - whole).abs().max() / whole.abs().max()).item()
    print(f"whole vs {split} x {T // split} split: max|diff| / max|logits| = {rel:.1e} (bound 1e-5); "
          f"peak RSS of the process {peak_rss_mib():.0f} MiB (bound 2048)")
    t0 = time.perf_counter()
    logits, finite, times = whole, True, []
    for n in range(decode_steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        logits, state = model(nxt, state)
        times.append(time.perf_counter() - t1)
        finite = finite and bool(torch.isfinite(logits).all())
    print(f"{decode_steps} greedy decode steps after the prefill: {time.perf_counter() - t0:.1f} s, all logits "
          f"finite: {finite}, median step {1e3 * statistics.median(times):.2f} ms (cache {state.pos} positions)")
    _, at_1k = model(ids[:, :1024])
    steps = interleaved_step_times(model, {"1k": at_1k, "32k": state})
    med = {name: statistics.median(t) for name, t in steps.items()}
    low = {name: min(t) for name, t in steps.items()}
    print(f"decode step, interleaved: at 1k median {1e3 * med['1k']:.2f} ms (min {1e3 * low['1k']:.2f}), "
          f"at {state.pos} median {1e3 * med['32k']:.2f} ms (min {1e3 * low['32k']:.2f}); "
          f"ratio of medians {med['32k'] / med['1k']:.2f} (bound 2), of minima {low['32k'] / low['1k']:.2f}")
    ok = rel < 1e-5 and finite and peak_rss_mib() < 2048 and med["32k"] < 2 * med["1k"]
    print("check:", "PASS" if ok else "FAIL")
    return ok


def one_transient(B: int, H: int, KV: int, N: int, P: int, T: int, dtype: str) -> dict:
    """Peak RSS causal_attention adds on one call beyond its inputs and its output (run in a fresh
    process), next to attention_transient_bytes."""
    attention = hrwkv7_ref.causal_attention
    transient = hrwkv7_ref.attention_transient_bytes
    dt = getattr(torch, dtype)
    q = torch.randn(B, H, T, N, dtype=dt)
    k, v = torch.randn(B, KV, P + T, N, dtype=dt), torch.randn(B, KV, P + T, N, dtype=dt)
    attention(q[:, :, :2], k[:, :, :P + 2], v[:, :, :P + 2])           # warm-up
    reset_peak_rss()
    base = rss_mib()
    o = attention(q, k, v)
    measured = peak_rss_mib() - base - o.numel() * o.element_size() / 2 ** 20
    return dict(measured_mib=measured, formula_mib=transient(T, P + T, dt.itemsize) / 2 ** 20)


def memory_check():
    """attention_transient_bytes against the peak RSS of causal_attention calls at 32k of context,
    with the tiny model's GQA shapes (float32) and Reka-Flash-3.1's (bfloat16), batch 1 (--check
    compares state_bytes with a measured 32k state)."""
    print("attention transient, peak RSS of one causal_attention call minus inputs and output (fresh process):")
    cases = [(1, 4, 2, 12, 0, 32768, "float32"), (1, 4, 2, 12, 24576, 8192, "float32"),
             (1, 4, 2, 12, 32767, 1, "float32"), (1, 64, 8, 96, 32512, 256, "bfloat16"),
             (1, 64, 8, 96, 32767, 1, "bfloat16")]
    for case in cases:
        out = subprocess.run([sys.executable, __file__, "--one-transient", ",".join(map(str, case))],
                             capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        B, H, KV, N, P, T, dtype = case
        print(f"  B{B} H{H} KV{KV} N{N} cached {P:>5} new {T:>5} {dtype:>8}: measured {r['measured_mib']:6.1f} MiB, "
              f"attention_transient_bytes {r['formula_mib']:6.1f} MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--T", default="4096,8192,16384,32768,65536", help="comma-separated prefill lengths")
    ap.add_argument("--decode-steps", type=int, default=50, help="timed decode steps per T (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in every process (0: torch's default)")
    ap.add_argument("--check", action="store_true", help="the 32k checks instead of the table")
    ap.add_argument("--memory", action="store_true", help="state_bytes and attention_transient_bytes against measurements")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)        # internal: one T, JSON out
    ap.add_argument("--one-transient", help=argparse.SUPPRESS)        # internal: B,H,KV,N,P,T,dtype, JSON out
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.one, args.decode_steps)))
        return
    if args.one_transient:
        *sizes, dtype = args.one_transient.split(",")
        print(json.dumps(one_transient(*map(int, sizes), dtype)))
        return
    if args.check:
        sys.exit(0 if check_32k() else 1)
    if args.memory:
        memory_check()
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tiny model (TINY, layers "
          f"{HRWKV7Config.from_dict(TINY).layer_kinds}) float32, batch 1; "
          f"one fresh process per T; peak = peak RSS of that process during the prefill (VmHWM, reset before it), "
          f"+prefill = that peak minus the RSS just before the prefill")
    for case, kernels in sdpa_backends().items():
        print(f"  SDPA on {case}: {', '.join(kernels) or '?'}")
    print(f"load average {os.getloadavg()[0]:.1f} at the start")
    print(f"{'T':>6} {'prefill s':>10} {'tokens/s':>9} {'peak MiB':>9} {'+prefill':>9} {'KV MiB':>7} "
          f"{'step ms':>8} {'min ms':>7} {'cat ms':>7}")
    for T in (int(t) for t in args.T.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(T), "--decode-steps", str(args.decode_steps),
                              "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{T:>6} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['T']:>6} {r['prefill_s']:>10.2f} {r['tok_s']:>9.0f} {r['peak_mib']:>9.0f} {r['delta_mib']:>9.0f} "
              f"{r['kv_mib']:>7.2f} {r['step_ms']:>8.2f} {r['step_min_ms']:>7.2f} {r['cat_ms']:>7.3f}"
              + ("" if r["finite"] else "  NON-FINITE"))
    print(f"load average {os.getloadavg()[0]:.1f} at the end. prefill s: shortest of 3; step ms / min ms: median / shortest decode step at "
          f"that cache length (+{args.decode_steps} steps); cat ms: the KV-cache torch.cat of one step alone, shortest")


if __name__ == "__main__":
    main()
