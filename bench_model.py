"""
The whole model's speed on this machine against the machine's own limits.

Builds a random hxa079 model (by default the 457M-parameter shape: hidden 1536, 14 layers, GQA at
layers 6 and 13, 16 heads of 96, 4 KV heads, MLP 4096, vocab 32000), saves it as an HF checkpoint
(config.json + model.safetensors, the weights rounded to bfloat16 and stored as bfloat16) in a
temporary directory, and loads it with the public API in three modes:

    fp32             from_pretrained(dir, dtype=torch.float32)
    bf16             from_pretrained(dir, dtype=torch.bfloat16)
    bf16->fp32       from_pretrained(dir, dtype=torch.bfloat16, compute_dtype=torch.float32)
    (+ each with compile=True, under --compile)

For each mode, batch 1, at a stated thread count, it measures
  - prefill: one call on --prefill random tokens, in tokens/s;
  - decode: --decode-steps calls of one token each after that prefill (so the GQA layers attend over
    ~prefill tokens), the median time of one step;
and sets each beside limits measured in the same process:
  - read floor: the bytes of weights one decode step reads (every parameter in its stored dtype,
    except the embedding table, of which a step reads one row), at the read bandwidth measured as
    the sum of a 256 MiB float32 tensor;
  - matvec floor: the same weights through torch's own matrix-vector product in their stored dtype
    (F.linear of a [1, in] vector through each 2-D weight, summed): what a step could take if it did
    nothing but its products, as torch computes them;
  - GEMM rate: a 2048^3 matrix product in the mode's compute dtype (bfloat16 for bfloat16, float32
    otherwise); prefill's FLOPs are counted as 2 x (parameters in the products) x tokens plus the
    GQA attention (2 x T^2 x H x N per GQA layer, causal); the WKV recurrence is not counted.
  - error: max |logits - ref| / max |ref| over the prefill's and the decode steps' logits, ref
    being float64 on the same (bfloat16-rounded) weights and the same tokens. A random model of this
    depth amplifies rounding (about 1.5-2x per layer at the default shape, already at the first token):
    read a mode's error against float32's, the error float32 arithmetic attains on this model.

How to read it: "% of floor" = floor / measured time (100% = as fast as reading the weights once, or as
torch's own matvec on them); prefill "% GEMM" = achieved FLOP rate / the 2048^3 rate. Repeats are
interleaved across modes (--repeats rounds: each mode prefills once then decodes) and medians are
reported. The machine is shared: the load average is printed, and only ratios measured within one run
should be compared.

    python bench_model.py                 # the 457M shape, 1 thread (a few minutes)
    python bench_model.py --small         # a quick check on a small shape
    python bench_model.py --threads 2 --modes bf16 fp32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from hrwkv7_ref import HRWKV7Config, HRWKV7ForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden"))
from check import rel  # noqa: E402  (golden/check.py: max |x - ref| / max |ref|, the project's one measure)

MODES = {   # name: from_pretrained's keyword arguments
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "bf16->fp32": dict(dtype=torch.bfloat16, compute_dtype=torch.float32),
}
SMALL = dict(hidden=256, layers=4, gqa="2", heads=4, kv_heads=2, intermediate=768, vocab=4096,
             lora=(16, 16, 8, 8, 32), prefill=64, decode_steps=8, repeats=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--gqa", default="6,13", help="comma-separated GQA layer indices (default 6,13)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--lora", type=int, nargs=5, default=(64, 64, 32, 32, 128), metavar="R",
                   help="LoRA ranks: decay, iclr, value mix, key mix, gate (default 64 64 32 32 128)")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--decode-steps", type=int, default=8, help="one-token steps timed per round (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="rounds, interleaved across modes (default 3)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--no-error", action="store_true", help="skip the float64 reference (and the errors)")
    p.add_argument("--compile", action="store_true",
                   help="also each mode with from_pretrained(..., compile=True)")
    p.add_argument("--small", action="store_true", help="a quick check: " + ", ".join(f"{k}={v}" for k, v in SMALL.items()))
    p.add_argument("--init-std", type=float, default=None,
                   help="std of the random projections (default hidden**-0.5, so activations keep their scale)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.small:
        for key, val in SMALL.items():
            setattr(args, key, val)
    return args


def median_time(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_str() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}" + ("  (> 1.5: the machine is busy)" if la[0] > 1.5 else "")


def make_checkpoint(args, path):
    """A random model of the asked shape, bf16-rounded, written as config.json + model.safetensors (bf16)."""
    from safetensors.torch import save_file
    Rw, Ra, Rv, Rk, Rg = args.lora
    d = dict(model_type="hrwkv7", architectures=["HRWKV7ForCausalLM"], rwkv_architecture="hxa079",
             vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
             intermediate_size=args.intermediate, transformer_layers=[int(i) for i in str(args.gqa).split(",") if i],
             lora_rank_decay=Rw, lora_rank_iclr=Ra, lora_rank_value_residual_mix=Rv, lora_rank_key_residual_mix=Rk,
             lora_rank_gate=Rg, tie_word_embeddings=False, enable_qk_norm=False, attention_bias=False,
             rms_norm_eps=1e-5, rope_theta=10000.0)
    cfg = HRWKV7Config.from_dict(d)
    model = HRWKV7ForCausalLM(cfg).init_random(seed=args.seed, std=args.init_std or args.hidden ** -0.5)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    del model
    save_file(sd, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    return cfg, sum(v.numel() for v in sd.values())


def stored_params(model):
    """(name, stored tensor) of every parameter, as stored (under a parametrization: the original)."""
    return [(n.replace(".parametrizations.", ".").replace(".original", ""), p) for n, p in model.named_parameters()]


def step_weights(model, cfg):
    """The stored tensors one decode step reads in full: all but the (untied) embedding table."""
    return [p for n, p in stored_params(model) if cfg.tie_word_embeddings or n != "model.embed_tokens.weight"]


def matvec_floor(weights) -> float:
    """Seconds for F.linear([1, in] vector, W) over every 2-D weight, in its stored dtype."""
    mats = [w for w in weights if w.dim() == 2]
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in mats]
    return median_time(lambda: [F.linear(x, w) for x, w in zip(xs, mats)], 3)


def gemm_rate(dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / median_time(lambda: a @ b, 3)


def read_bandwidth() -> float:
    x = torch.randn(64 * 2 ** 20)                                       # 256 MiB float32
    return x.numel() * 4 / median_time(lambda: x.sum(), 5)


def prefill_flops(cfg, T: int) -> float:
    """2 x (parameters in the products) x T + causal GQA attention (2 T^2 H N per GQA layer)."""
    model_params = 0
    with torch.device("meta"):
        m = HRWKV7ForCausalLM(cfg)
    for n, p in m.named_parameters():
        if p.dim() == 2 and n != "model.embed_tokens.weight":
            model_params += p.numel()
    if cfg.tie_word_embeddings:
        model_params += cfg.vocab_size * cfg.hidden_size
    attn = len(cfg.transformer_layers) * 2 * T * T * cfg.num_attention_heads * cfg.head_size
    return 2 * model_params * T + attn


def run_mode(model, prompt, steps):
    """One round: prefill `prompt` [1, T], then the tokens `steps` [1, S] one at a time.
    -> prefill seconds, [seconds per step], logits [1, T + S, V] (float64)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits, state = model(prompt)
        t_prefill = time.perf_counter() - t0
        out, times = [logits.double()], []
        for i in range(steps.shape[1]):
            t0 = time.perf_counter()
            lg, state = model(steps[:, i:i + 1], state)
            times.append(time.perf_counter() - t0)
            out.append(lg.double())
    return t_prefill, times, torch.cat(out, dim=1)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"bench_model: torch {torch.__version__}, {torch.get_num_threads()} thread(s), {load_str()}")
    modes = [(name, MODES[name]) for name in args.modes]
    if args.compile:
        modes += [(name + "+compile", {**kw, "compile": True}) for name, kw in modes]

    with tempfile.TemporaryDirectory(prefix="bench_model_") as ckpt:
        t0 = time.perf_counter()
        cfg, n_params = make_checkpoint(args, ckpt)
        print(f"model: {n_params / 1e6:.1f}M parameters, layers {cfg.layer_kinds}, C={cfg.hidden_size} "
              f"H={cfg.num_attention_heads} KV={cfg.num_key_value_heads} N={cfg.head_size} "
              f"I={cfg.intermediate_size} vocab={cfg.vocab_size}, LoRA ranks {tuple(args.lora)}; "
              f"checkpoint written in {time.perf_counter() - t0:.1f} s")
        gen = torch.Generator().manual_seed(args.seed + 1)
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=gen)
        steps = torch.randint(0, cfg.vocab_size, (1, args.decode_steps), generator=gen)

        ref = None
        if not args.no_error:
            t0 = time.perf_counter()
            m64 = HRWKV7ForCausalLM.from_pretrained(ckpt, dtype=torch.float64)
            _, _, ref = run_mode(m64, prompt, steps)
            del m64
            print(f"float64 reference: {time.perf_counter() - t0:.1f} s")

        models = {}
        for name, kw in modes:
            t0 = time.perf_counter()
            models[name] = HRWKV7ForCausalLM.from_pretrained(ckpt, **kw)
            print(f"loaded {name}: {time.perf_counter() - t0:.1f} s")

        # interleaved rounds: the machine's limits (in this process), then each mode
        prefill_t = {name: [] for name, *_ in modes}
        step_t = {name: [] for name, *_ in modes}
        matvec_t = {name: [] for name, *_ in modes}
        bws, rates = [], {torch.float32: [], torch.bfloat16: []}
        errors = {}
        first_steps = {}                                               # a compiled mode compiles here
        for rnd in range(args.repeats):
            bws.append(read_bandwidth())
            for dt in rates:
                rates[dt].append(gemm_rate(dt))
            for name, *_ in modes:                                     # each mode beside its own floor
                matvec_t[name].append(matvec_floor(step_weights(models[name], cfg)))
                tp, ts, logits = run_mode(models[name], prompt, steps)
                compiling = rnd == 0 and name.endswith("+compile")     # its first two steps compile
                if rnd == 0:
                    first_steps[name] = sum(ts[:2])
                    if ref is not None:
                        errors[name] = rel(logits, ref)
                prefill_t[name].append(tp)
                warm = ts[2:] if compiling else ts[1:]                 # the first step after prefill: warm-up
                step_t[name] += warm or ts
            print(f"  round {rnd + 1}/{args.repeats} done, {load_str()}")

    bw = statistics.median(bws)
    rate = {dt: statistics.median(r) for dt, r in rates.items()}
    limits = {}
    for name, kw in modes:
        compute = kw.get("compute_dtype") or kw["dtype"]
        nbytes = sum(p.numel() * p.element_size() for p in step_weights(models[name], cfg))
        limits[name] = dict(bytes=nbytes, read=nbytes / bw, matvec=statistics.median(matvec_t[name]),
                            gemm=rate[torch.bfloat16 if compute == torch.bfloat16 else torch.float32])
    flops = prefill_flops(cfg, args.prefill)
    print()
    print(f"machine (medians over the rounds): read bandwidth {bw / 1e9:.1f} GB/s (sum of 256 MiB float32); "
          f"GEMM 2048^3: " + ", ".join(f"{str(dt).replace('torch.', '')} {r / 1e9:.0f} GFLOP/s" for dt, r in rate.items()))
    print(f"batch 1, {torch.get_num_threads()} thread(s), prefill {args.prefill} tokens, decode after it "
          f"(median of {args.repeats} rounds x {max(1, args.decode_steps - 1)} steps), {load_str()}")
    print(f"{'mode':<18}{'step MB':>8}{'decode':>10}{'read floor':>16}{'matvec floor':>18}"
          f"{'prefill':>18}{'% GEMM':>14}{'err vs f64':>12}")
    for name, *_ in modes:
        lim = limits[name]
        dec = statistics.median(step_t[name])
        pre = statistics.median(prefill_t[name])
        print(f"{name:<18}{lim['bytes'] / 1e6:>8.0f}{dec * 1e3:>8.1f}ms"
              f"{lim['read'] * 1e3:>8.1f}ms {lim['read'] / dec:>4.0%}"
              f"{lim['matvec'] * 1e3:>10.1f}ms {lim['matvec'] / dec:>4.0%}"
              f"{pre:>7.2f}s {args.prefill / pre:>5.0f}t/s"
              f"{flops / pre / 1e9:>6.0f}GF {flops / pre / lim['gemm']:>4.0%}"
              f"{errors.get(name, float('nan')):>12.1e}")
    print("  decode: median step; read floor: step bytes / read bandwidth; matvec floor: torch's F.linear "
          "[1, in] on the same weights in their stored dtype; % = floor / measured.")
    print(f"  prefill: {flops / 1e9:.0f} GFLOP counted (products + GQA attention, WKV not counted); % GEMM = "
          f"achieved / 2048^3 rate in the compute dtype. err: max |logits - float64| / max |float64|.")
    if any(name.endswith("+compile") for name, *_ in modes):
        print("  the first two decode steps (a compiled mode compiles a static graph, then the dynamic one): "
              + ", ".join(f"{n} {t:.1f}s" for n, t in first_steps.items()))


if __name__ == "__main__":
    sys.exit(main())
