"""
Check a port against the golden vectors (README.md in this folder).

    python golden/check.py wkv MODULE:FUNCTION [--dtype float32] [--numpy]
        calls FUNCTION(r, w, k, v, a, b, S0) -> (y, S_T) on every case of wkv.safetensors (inputs cast
        to --dtype, S0 to float32, or float64 with --dtype float64; torch tensors, or NumPy arrays with
        --numpy) and compares y and S_T (tensors or arrays)
    python golden/check.py model CASE_DIR PORT.safetensors [--dtype float32]
        compares the tensors the port wrote (logits, and any of split_logits, state.*) with
        CASE_DIR/vectors.safetensors

A tensor passes when max |port - golden| / max |golden| <= the tolerance of --dtype. A failing tensor
that lies within that tolerance of a known wrong variant's numbers is reported by the variant's name.
Exit status: 0 all passed, 1 something failed, 2 bad command line or unreadable file (one line
`error: ...`, the convention of the project's commands, command_line.py).
"""
import importlib
import os
import sys

import torch
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from command_line import ArgumentParser, UsageError, run_command  # noqa: E402
# max |x - golden| / max |golden| a port must reach, by the dtype it computes in (README: "Tolerances")
TOLERANCES = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-1}
WKV_TOLERANCES = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2}


def rel(x, ref) -> float:
    """max |x - ref| / max |ref|, in float64"""
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def read(path) -> dict:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # a missing or malformed file: one line, exit status 2
        raise UsageError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None


def variant_names() -> dict:
    sys.path.insert(0, HERE)
    from variants import VARIANTS
    return {slug: v[0] for slug, v in VARIANTS.items()}


def compare(name, got, golden: dict, tol: float, names: dict) -> tuple:
    """(passed, report line) for the port's tensor `got` against golden[name] and its variants."""
    want = golden[name]
    if tuple(got.shape) != tuple(want.shape):
        return False, f"FAIL {name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if not torch.isfinite(got.double()).all():
        return False, f"FAIL {name}: not finite"
    err = rel(got, want)
    if err <= tol:
        return True, f"pass {name}: {err:.1e} <= {tol:.0e}"
    line = f"FAIL {name}: {err:.1e} > {tol:.0e}"
    base = name.split("__")[0]
    near = sorted((rel(got, golden[key]), key.split("__", 1)[1]) for key in golden
                  if key.startswith(base + "__") and golden[key].shape == want.shape)
    if base.startswith("split_logits") and not near:    # a variant's split logits are its logits
        near = sorted((rel(got, golden[key]), key.split("__", 1)[1]) for key in golden
                      if key.startswith("logits__") and golden[key].shape == want.shape)
    if near and near[0][0] <= tol:
        line += f"; matches known wrong variant: {names[near[0][1]]} ({near[0][1]}, {near[0][0]:.1e})"
    return False, line


def load_function(spec: str):
    """'package.module:function' -> the function (the current directory is importable)."""
    module, _, fn_name = spec.partition(":")
    if not module or not fn_name:
        raise UsageError(f"wkv: expected MODULE:FUNCTION, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), fn_name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"wkv: cannot load {spec!r} ({type(e).__name__}: {e})") from None


def check_wkv(fn, dtype: str, numpy: bool = False) -> list:
    """fn: a function f(r, w, k, v, a, b, S0) -> (y, S_T), or 'module:function'; numpy: pass it
    NumPy arrays instead of torch tensors. It may return tensors or arrays."""
    if numpy and dtype == "bfloat16":
        raise UsageError("wkv: --numpy with --dtype bfloat16: NumPy has no bfloat16")
    fn = load_function(fn) if isinstance(fn, str) else fn
    fn_name = getattr(fn, "__name__", "the function")
    golden = read(os.path.join(HERE, "wkv.safetensors"))
    dt = getattr(torch, dtype)
    sdt = torch.float64 if dt == torch.float64 else torch.float32
    names, results = variant_names(), []
    for case in sorted({k.split(".")[0] for k in golden}):
        g = {k.split(".", 1)[1]: t for k, t in golden.items() if k.startswith(case + ".")}
        args = [g[n].to(dt) for n in ("r", "w", "k", "v", "a", "b")] + [g["S_0"].to(sdt)]
        if numpy:
            args = [x.numpy() for x in args]
        try:
            y, S = fn(*args)
        except Exception as e:
            results.append((False, f"FAIL {case}: {fn_name} raised {type(e).__name__}: {e}"))
            continue
        for name, got in (("y", y), ("S_T", S)):
            ok, line = compare(name, torch.as_tensor(got).detach().cpu(), g, WKV_TOLERANCES[dtype], names)
            results.append((ok, f"{case}: {line}"))
    return results


def check_model(case_dir: str, port_file, dtype: str) -> list:
    """port_file: a safetensors file of the port's tensors, or a dict of them."""
    path = os.path.join(case_dir, "vectors.safetensors")
    if not os.path.isfile(path):
        raise UsageError(f"model: {case_dir} has no vectors.safetensors (not a golden case directory)")
    golden = read(path)
    port = dict(port_file) if isinstance(port_file, dict) else read(port_file)
    port_file = "the port's tensors" if isinstance(port_file, dict) else str(port_file)
    if "logits" not in port:
        raise UsageError(f"model: {port_file} has no tensor 'logits' (the full-prefill logits [B, T, V])")
    unknown = sorted(k for k in port if k not in golden or "__" in k)
    if unknown:
        raise UsageError(f"model: {port_file} has tensors the golden case does not: {', '.join(unknown)}")
    names = variant_names()
    results = [compare(name, port[name], golden, TOLERANCES[dtype], names)
               for name in sorted(port) if name not in ("input_ids", "split_lengths", "state.pos")]
    if "state.pos" in port:
        got, want = port["state.pos"].reshape(-1).tolist(), golden["state.pos"].tolist()
        results.append((got == want, f"{'pass' if got == want else 'FAIL'} state.pos: {got}, expected {want}"))
    return results


def _run(argv) -> int:
    ap = ArgumentParser(prog="golden/check.py", description=__doc__.strip().splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True, parser_class=ArgumentParser)
    w = sub.add_parser("wkv", help="a WKV kernel f(r, w, k, v, a, b, S0) -> (y, S_T) on wkv.safetensors")
    w.add_argument("--numpy", action="store_true", help="pass NumPy arrays instead of torch tensors")
    w.add_argument("function", metavar="MODULE:FUNCTION")
    m = sub.add_parser("model", help="a port's logits (and state) against a golden case")
    m.add_argument("case_dir", metavar="CASE_DIR")
    m.add_argument("port_file", metavar="PORT.safetensors")
    for p in (w, m):
        p.add_argument("--dtype", choices=sorted(TOLERANCES), default="float32",
                       help="the dtype the port computes in: picks the tolerance (default float32)")
    args = ap.parse_args(argv)
    results = (check_wkv(args.function, args.dtype, args.numpy) if args.what == "wkv"
               else check_model(args.case_dir, args.port_file, args.dtype))
    for _, line in results:
        print(line)
    failed = sum(not ok for ok, _ in results)
    named = sorted({line.split("matches known wrong variant: ")[1].split(" (")[0] for _, line in results
                    if "matches known wrong variant: " in line})
    if named:
        print("the failing numbers match known wrong variant(s): " + "; ".join(named) + " (golden/README.md)")
    print(f"{len(results) - failed} passed, {failed} failed ({args.dtype} tolerance)")
    return 1 if failed else 0


def main(argv=None) -> int:
    """The checker's command line (bad input: one line `error: ...`, exit status 2)."""
    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
