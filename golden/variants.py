"""
Known wrong variants of hxa079, each one small change to the per-token definition hrwkv7_loop.py.

A variant is a list of (line in hrwkv7_loop.py, what a wrong port writes instead); `load(slug)` applies
the replacements to the loop's source and returns the changed copy as a module (the same `run`
and `wkv7_float64`). Each replaced text must occur exactly once in the loop, so a change to the loop
that a variant no longer fits is an error here, not a silent no-op.

make_golden.py stores each variant's numbers beside the right ones where they differ
(`logits__<slug>`, ...), and check.py names the variant a failing port matches.
"""
import os
import types

HERE = os.path.dirname(os.path.abspath(__file__))
LOOP = os.path.join(HERE, "..", "hrwkv7_loop.py")

# slug: (name, what a port does instead, where it was seen, [(text in the loop, replacement)])
VARIANTS = {
    "key_iclr_minus_decay": (
        "key scaled by iclr - decay",
        "k = k + k * (iclr - decay) with decay = exp(w) = exp(-exp(w_pre)), instead of "
        "k * (1 - w_pre + iclr) with the pre-decay w_pre",
        "OpenMOSE/llama.cpp src/models/rwkv07d.cpp (llm_build_rwkv07d)",
        [("k_h = k_h * (1 - w_pre[:, hh] + iclr[:, hh])",
          "k_h = k_h + k_h * (iclr[:, hh] - torch.exp(w[:, hh]))")]),
    "first_from_layer0": (
        "v_first/k_first from layer 0",
        "v_first, k_first taken at layer 0 even when layer 0 is a GQA layer (its v_proj / k_proj "
        "outputs), instead of at the first RWKV layer",
        "OpenMOSE/llama.cpp src/models/rwkv07d.cpp sets them only when il == 0",
        [("out, per_layer[i] = gqa(p + \"self_attn.\", g, h, per_layer[i], eps, H, KV, N, qk_norm)",
          "out, per_layer[i] = gqa(p + \"self_attn.\", g, h, per_layer[i], eps, H, KV, N, qk_norm)\n"
          "                first = (per_layer[i][1][:, :, -1], per_layer[i][0][:, :, -1]) if i == 0 else first")]),
    "state_transposed": (
        "state transposed ([V, K])",
        "the WKV state kept as [V, K] (the RWKV CUDA kernels' layout) where hxa079's is [K, V]: "
        "an initial state read transposed, a final state written transposed",
        "RWKV-7 CUDA kernels (state[v][k]); fla and the official hxa079 engine use [K, V]",
        [("S = torch.exp(w)[:, :, None] * S + b[:, :, None] * (a[:, None, :] @ S) + k[:, :, None] * v[:, None, :]",
          "S = torch.exp(w)[:, None, :] * S + (S @ a[:, :, None]) * b[:, None, :] + v[:, :, None] * k[:, None, :]"),
         ("y = (r[:, None, :] @ S)[:, 0]", "y = (S @ r[:, :, None])[..., 0]")]),
    "rope_in_gqa": (
        "RoPE applied in the GQA layers",
        "q and k of the GQA layers rotated with RoPE; hxa079's GQA layers have no position encoding (NoPE)",
        "RWKVInside stage-1 training (the GQA layers get RoPE while the mixers are aligned)",
        [("cache = (torch.cat([cache[0], k[:, :, None]], 2), torch.cat([cache[1], v[:, :, None]], 2))",
          "q, k = rope(q, cache[0].shape[2], theta), rope(k, cache[0].shape[2], theta)\n"
          "    cache = (torch.cat([cache[0], k[:, :, None]], 2), torch.cat([cache[1], v[:, :, None]], 2))"),
         ("def gqa(p, g, h, cache, eps, H, KV, N, qk_norm):",
          "def gqa(p, g, h, cache, eps, H, KV, N, qk_norm, theta):"),
         ("out, per_layer[i] = gqa(p + \"self_attn.\", g, h, per_layer[i], eps, H, KV, N, qk_norm)",
          "out, per_layer[i] = gqa(p + \"self_attn.\", g, h, per_layer[i], eps, H, KV, N, qk_norm, theta)")]),
    "token_shift": (
        "token shift kept",
        "RWKV-7's token shift kept: the time-mix reads x + (x_prev - x) * mu (planted with mu = 0.5 for "
        "every path); hxa079 reads x alone",
        "RWKV-7 (x070) time-mix",
        [("        pos0 = 0\n", "        pos0, shift = 0, {}\n"),
         ("        pos0 = state[\"pos\"]\n", "        pos0, shift = state[\"pos\"], dict(state[\"shift\"])\n"),
         ("            else:\n                out, first = time_mix(",
          "            else:\n                h, shift[i] = h + (shift.get(i, 0 * h) - h) * 0.5, h\n"
          "                out, first = time_mix("),
         ("{\"per_layer\": per_layer, \"pos\": pos0 + T}",
          "{\"per_layer\": per_layer, \"pos\": pos0 + T, \"shift\": shift}")]),
    "groupnorm": (
        "GroupNorm kept on the time-mix output",
        "RWKV-7's per-head GroupNorm (eps 64e-5, unit weight) on the WKV output in place of the N^-0.5 "
        "scale",
        "RWKV-7 (x070) ln_x",
        [("y_h = y_h * N ** -0.5",
          "y_h = (y_h - y_h.mean(-1, keepdim=True)) / torch.sqrt(y_h.var(-1, unbiased=False, keepdim=True) + 64e-5)")]),
    "bonus_unscaled_key": (
        "bonus computed with the unscaled key",
        "the bonus sum(r * k * r_k) * v taken with k before k * (1 - w_pre + iclr)",
        "",
        [("k_h = k_h * (1 - w_pre[:, hh] + iclr[:, hh])", "k_raw, k_h = k_h, k_h * (1 - w_pre[:, hh] + iclr[:, hh])"),
         ("(r[:, hh] * k_h * g(p + \"r_k\")[hh])", "(r[:, hh] * k_raw * g(p + \"r_k\")[hh])")]),
    "decay_after_write": (
        "decay applied after the write",
        "S' = diag(exp(w)) (S + b (a^T S) + k v^T) instead of diag(exp(w)) S + b (a^T S) + k v^T",
        "",
        [("S = torch.exp(w)[:, :, None] * S + b[:, :, None] * (a[:, None, :] @ S) + k[:, :, None] * v[:, None, :]",
          "S = torch.exp(w)[:, :, None] * (S + b[:, :, None] * (a[:, None, :] @ S)"
          " + k[:, :, None] * v[:, None, :])")]),
}

# the variants that change the WKV recurrence alone (so they show in the WKV-only vectors too)
WKV_VARIANTS = ("state_transposed", "decay_after_write")


def source(slug: str) -> str:
    """hrwkv7_loop.py's source with the variant's replacements made."""
    with open(LOOP) as f:
        src = f.read()
    for old, new in VARIANTS[slug][3]:
        if src.count(old) != 1:
            raise ValueError(f"variant {slug!r}: {old!r} occurs {src.count(old)} times in {LOOP}, expected once")
        src = src.replace(old, new)
    return src


def load(slug: str) -> types.ModuleType:
    """The per-token loop with the variant planted, as a module (run, wkv7_float64)."""
    if slug not in VARIANTS:
        raise KeyError(f"unknown variant {slug!r}; known: {', '.join(VARIANTS)}")
    mod = types.ModuleType(f"hrwkv7_loop__{slug}")
    exec(compile(source(slug), f"<hrwkv7_loop.py with {VARIANTS[slug][0]}>", "exec"), mod.__dict__)
    return mod
