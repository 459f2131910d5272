"""
Writes the golden vectors of this folder from the per-token definition (hrwkv7_loop.py) and the known
wrong variants (variants.py). Deterministic: every number comes from a seeded torch.Generator, so a
rerun writes the same bytes (the tests check it).

    python golden/make_golden.py [--out DIR] [--only NAME ...]

README.md in this folder describes every file and tensor name.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import hrwkv7_loop  # noqa: E402
import variants  # noqa: E402
from check import rel  # noqa: E402  (max |x - ref| / max |ref|, the checker's own measure)

LORA = dict(lora_rank_decay=4, lora_rank_iclr=4, lora_rank_value_residual_mix=2, lora_rank_key_residual_mix=2,
            lora_rank_gate=8)
COMMON = dict(model_type="hrwkv7", architectures=["HRWKV7ForCausalLM"], rwkv_architecture="hxa079",
              vocab_size=64, rms_norm_eps=1e-5, **LORA)
CASES = {   # name: (config.json, seed); each case covers what its name says
    "gqa0_qknorm_bias": (dict(COMMON, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, intermediate_size=64, transformer_layers=[0, 2],
                              enable_qk_norm=True, attention_bias=True, tie_word_embeddings=False,
                              rope_theta=10000.0), 1),
    "tied_kv1_n24": (dict(COMMON, hidden_size=48, num_hidden_layers=3, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, transformer_layers=[1],
                          enable_qk_norm=False, attention_bias=False, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 500.0}), 2),   # no head_dim: 48 // 2
    "released_layout": (dict(COMMON, hidden_size=48, num_hidden_layers=5, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=12, intermediate_size=64, transformer_layers=[2, 4],
                             enable_qk_norm=False, attention_bias=False, tie_word_embeddings=False,
                             rope_theta=8e6), 3),
}
BATCH, TOKENS = 2, 16
SPLIT = [7, 5, 1, 1, 1, 1]          # prefill 7 tokens, then 5, then 4 tokens one at a time
WKV_CASES = {   # name: (B, T, H, N, initial state, seed)
    "t5_n4_zero_state": (1, 5, 1, 4, False, 11),
    "t67_n24": (1, 67, 1, 24, True, 12),
    "t33_n64": (1, 33, 1, 64, True, 13),
}


def bf16_exact(x):
    """x rounded to the nearest bfloat16 number, kept in x's dtype: casting it to bf16 loses nothing."""
    return x.to(torch.bfloat16).to(x.dtype)


def shapes(c: dict) -> dict:
    """{name: shape} of an hxa079 checkpoint in HF layout (SPEC.md §8): the state dict of the model
    built on the meta device (no memory, nothing drawn)."""
    from hrwkv7_ref import HRWKV7Config, HRWKV7ForCausalLM
    with torch.device("meta"):
        model = HRWKV7ForCausalLM(HRWKV7Config.from_dict(c))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def random_weights(c: dict, seed: int) -> dict:
    """float32 tensors holding bfloat16 numbers, unit-scale activations; w0 spread so that the
    per-token decay factors exp(w) = exp(-exp(w_pre)) range from about 0.55 to 0.998."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in sorted(shapes(c).items()):
        leaf = name.rsplit(".", 1)[-1] if not name.endswith(("weight", "bias")) else name.rsplit(".", 2)[-2]
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name.endswith("norm.weight"):
            x = 1 + 0.1 * x
        elif name.endswith(".w0"):
            x = -6 + 7 * torch.rand(shape, generator=gen, dtype=torch.float64)
        elif name.endswith((".a0", ".v0", ".k0")) or leaf == "embed_tokens":
            pass                                                # unit scale
        elif name.endswith((".w1", ".w2", ".a1", ".a2", ".v1", ".v2", ".k1", ".k2", ".g1", ".g2", ".r_k")):
            x = 0.3 * x
        elif name.endswith(".bias"):
            x = 0.1 * x
        else:                                                   # Linear weights [out, in]
            x = x / shape[-1] ** 0.5
        sd[name] = bf16_exact(x.float()).contiguous()
    return sd


def split_run(run, config, sd, ids):
    """The logits of ids fed in the pieces of SPLIT, the state carried, and the final state."""
    outs, state, lo = [], None, 0
    for n in SPLIT:
        lg, state = run(config, sd, ids[:, lo:lo + n], state)
        outs.append(lg)
        lo += n
    return torch.cat(outs, 1), state


def state_tensors(state) -> dict:
    """A loop state as flat safetensors names (README: "state.*")."""
    out = {"state.pos": torch.tensor([state["pos"]], dtype=torch.int64)}
    for i, s in enumerate(state["per_layer"]):
        if isinstance(s, tuple):
            out[f"state.per_layer.{i}.k_cache"], out[f"state.per_layer.{i}.v_cache"] = s
        else:
            out[f"state.per_layer.{i}.S"] = s
    return out


SHOWS = 1e-3   # a variant's tensor is stored when it differs from the right one by more than this (rel)


def make_case(name: str, out_dir: str):
    config, seed = CASES[name]
    sd = random_weights(config, seed)
    ids = torch.randint(0, config["vocab_size"], (BATCH, TOKENS), generator=torch.Generator().manual_seed(seed))
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    full, _ = hrwkv7_loop.run(config, sd, ids)
    split, state = split_run(hrwkv7_loop.run, config, sd, ids)
    vec = {"input_ids": ids, "logits": full, "split_lengths": torch.tensor(SPLIT, dtype=torch.int64),
           "split_logits": split, **state_tensors(state)}
    shown = {}
    for slug in variants.VARIANTS:
        mod = variants.load(slug)
        v_full, _ = mod.run(config, sd, ids)
        v_split, v_state = split_run(mod.run, config, sd, ids)
        assert rel(v_split, v_full) < 1e-12, (name, slug)     # every variant is self-consistent
        found = {"logits": v_full}
        if rel(v_full, full) <= SHOWS:      # the variant shows in the state alone: store its state
            found.update({k: t for k, t in state_tensors(v_state).items() if k != "state.pos"})
        for key, t in found.items():
            if rel(t, vec[key]) > SHOWS:
                vec[f"{key}__{slug}"] = t
                shown[slug] = max(shown.get(slug, 0.0), rel(t, vec[key]))
    save_file({k: t.contiguous() for k, t in vec.items()}, os.path.join(d, "vectors.safetensors"),
              metadata={"made_by": "golden/make_golden.py"})
    return shown


def wkv_inputs(B, T, H, N, with_state, seed):
    """hxa079-like inputs, each a bfloat16 number in float64: a = -kk, b = kk * iclr for a unit key kk;
    log decays -exp(u), u uniform in [-3, log 30] (w from -0.05 down to -30), a tenth of them -30 exactly."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    u = -3 + (torch.log(torch.tensor(30.0, dtype=torch.float64)) + 3) * torch.rand(B, T, H, N, generator=gen,
                                                                                   dtype=torch.float64)
    w = torch.where(torch.rand(B, T, H, N, generator=gen, dtype=torch.float64) < 0.1, -30.0, -torch.exp(u))
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=gen, dtype=torch.float64)
    S0 = rnd(B, H, N, N) if with_state else torch.zeros(B, H, N, N, dtype=torch.float64)
    return {name: bf16_exact(x) for name, x in (("r", r), ("w", w), ("k", k), ("v", v), ("a", -kk),
                                                ("b", kk * iclr), ("S_0", S0))}


def make_wkv(out_dir: str):
    vec = {}
    for name, (B, T, H, N, with_state, seed) in WKV_CASES.items():
        x = wkv_inputs(B, T, H, N, with_state, seed)
        args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
        y, S = hrwkv7_loop.wkv7_float64(*args, x["S_0"])
        vec.update({f"{name}.{n}": t for n, t in x.items()})
        vec[f"{name}.y"], vec[f"{name}.S_T"] = y, S
        for slug in variants.WKV_VARIANTS:
            vy, vS = variants.load(slug).wkv7_float64(*args, x["S_0"])
            for key, t, ref in (("y", vy, y), ("S_T", vS, S)):
                if rel(t, ref) > SHOWS:
                    vec[f"{name}.{key}__{slug}"] = t
    save_file({k: t.contiguous() for k, t in vec.items()}, os.path.join(out_dir, "wkv.safetensors"),
              metadata={"made_by": "golden/make_golden.py"})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--out", default=HERE, help="where to write (default: this folder)")
    ap.add_argument("--only", nargs="*", help=f"cases to write: {', '.join(CASES)}, wkv (default: all)")
    args = ap.parse_args(argv)
    for name in args.only or [*CASES, "wkv"]:
        if name == "wkv":
            make_wkv(args.out)
            print("wkv.safetensors")
        elif name in CASES:
            shown = make_case(name, args.out)
            print(name, " ".join(f"{s}={e:.2g}" for s, e in shown.items()))
        else:
            ap.error(f"unknown case {name!r}")


if __name__ == "__main__":
    main()
