"""
Load, check and write hxa079 checkpoints, one tensor at a time.

    config, sd = load_checkpoint("HRWKV7-dir")            # or "x.safetensors", or "rwkv.pth"
    save_checkpoint("out-dir", config, sd, max_shard_bytes=5 * 10**9, dtype=torch.bfloat16)
    init_from_teacher("Llama-dir", "out-dir", transformer_layers=[5, 11, 17])

    python convert.py SRC DST [--set key=value ...] [--dtype bfloat16] [--max-shard-size 5GB] [--force]
    python convert.py from-teacher TEACHER DST --transformer-layers 5,11,17 [--seed 0]

`hrwkv7_ref.HRWKV7ForCausalLM.from_pretrained` reads a complete HF-layout checkpoint by itself;
this file adds the other formats, config inference from the tensor shapes, writing, initialisation
from a teacher, and a diagnosis of bad checkpoints that names what is wrong. It builds on
hrwkv7_ref.py (one way: the model file never imports this one). Its command line follows
command_line.py's convention: bad input is one line `error: ...` on stderr and exit status 2
(`--debug` shows the traceback).

Laziness (how a 40 GB checkpoint converts in bounded memory). `load_checkpoint` reads only the
file headers: it returns a `LazyStateDict`, a read-only mapping whose `sd[key]` reads that one
tensor from disk on each access (nothing is cached), and whose `sd.ref(key)` is a `TensorRef`
(shape, dtype, `load(dtype, device)`) that reads nothing until loaded. `save_checkpoint` accepts a
mapping whose values are tensors or TensorRefs; it loads the tensors of one shard (cast to the
output dtype), writes them with `safetensors.torch.save_file` and lets them go before the next
shard: the peak is about the largest shard.

Every check runs before anything is written: names and shapes against the config (`check_state_dict`
on a meta-device model), dtypes (floating point only), index entries (bare file names of the
checkpoint directory), file integrity (safetensors headers). Output goes to a temporary directory
beside the destination and is renamed into place only once complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from command_line import ArgumentParser, UsageError, run_command
from hrwkv7_ref import (HXA079_BIASES, HXA079_LORA, HRWKV7Config, HRWKV7ForCausalLM, check_state_dict,
                        fold_rope_keys, open_safetensors, open_safetensors_file, override_config, read_json,
                        resolve_checkpoint)

# safetensors dtype names; the integer and bool ones are only read (and refused as weights)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {dt: name for name, dt in _ST_DTYPES.items()}

# -----------------------------------------------------------------------------
# Lazy tensors


@dataclasses.dataclass
class TensorRef:
    """A tensor not read yet: its shape and dtype, and how to read it. `where` names its source."""
    shape: tuple
    dtype: object                      # a torch.dtype, or the file's dtype name when torch has none
    fn: Callable[[], torch.Tensor]
    where: str = ""

    def load(self, dtype=None, device=None) -> torch.Tensor:
        t = self.fn()
        if tuple(t.shape) != tuple(self.shape):
            raise ValueError(f"{self.where}: read a tensor of shape {tuple(t.shape)}, expected {tuple(self.shape)}")
        return t.to(dtype=dtype, device=device)


def _as_ref(value, key) -> TensorRef:
    if isinstance(value, TensorRef):
        return value
    if torch.is_tensor(value):
        return TensorRef(tuple(value.shape), value.dtype, lambda: value, key)
    raise TypeError(f"{key}: expected a tensor or a TensorRef, got {type(value).__name__}")


class LazyStateDict(Mapping):
    """A read-only state dict whose tensors stay on disk until accessed. `sd[key]` reads the tensor
    (a fresh read on each access); `sd.ref(key)` / `sd.refs()` give TensorRefs, which read nothing."""

    def __init__(self, refs: dict):
        self._refs = dict(refs)

    def __getitem__(self, key) -> torch.Tensor:
        return self._refs[key].load()

    def __iter__(self):
        return iter(self._refs)

    def __len__(self):
        return len(self._refs)

    def ref(self, key) -> TensorRef:
        return self._refs[key]

    def refs(self) -> dict:
        return dict(self._refs)


def _refs_of(state_dict) -> dict:
    if isinstance(state_dict, LazyStateDict):
        return state_dict.refs()
    return {key: _as_ref(value, key) for key, value in state_dict.items()}


# -----------------------------------------------------------------------------
# Reading safetensors and .pth files


def _read_safetensors_tensor(path, key):
    with open_safetensors_file(path) as f:
        try:
            return f.get_tensor(key)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {key} ({e})") from e


def _safetensors_ref(f, path, key) -> TensorRef:
    """A TensorRef of tensor `key` of the open safetensors file f (at path), from its header."""
    meta = f.get_slice(key)
    dtype_name = meta.get_dtype()
    return TensorRef(tuple(meta.get_shape()), _ST_DTYPES.get(dtype_name, dtype_name),
                     lambda: _read_safetensors_tensor(path, key), f"{path}:{key}")


def _safetensors_refs(path) -> dict:
    """{name: TensorRef} from one safetensors file, reading only its header."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open_safetensors_file(path) as f:
        return {key: _safetensors_ref(f, path, key) for key in f.keys()}


def _hf_dir_refs(path) -> dict:
    """{name: TensorRef} from an HF directory: model.safetensors or model.safetensors.index.json
    (structure and index checked by hrwkv7_ref.open_safetensors; each header read once)."""
    with open_safetensors(path) as tensors:
        return {key: _safetensors_ref(f, file, key) for key, (file, _, f) in tensors.items()}


_PTH_TOP = {"emb.": "model.embed_tokens.", "ln_out.": "model.norm.", "head.": "lm_head."}
_PTH_BLOCK = {"att": "self_attn", "ffn": "mlp", "ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
_PTH_FFN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_PTH_DROPPED = ("layer_architecture", "head_size_record")   # training bookkeeping scalars


def _pth_to_hf(key, gqa_layers) -> str:
    """An RWKV-style .pth name -> the HF name (SPEC.md §8); names it does not know pass unchanged."""
    m = re.fullmatch(r"blocks\.(\d+)\.([^.]+)\.([^.]+)(.*)", key)
    if m is None:
        for old, new in _PTH_TOP.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key
    i, part, name, rest = int(m[1]), m[2], m[3], m[4]
    if part == "ffn":
        name = _PTH_FFN.get(name, name)
    elif part == "att" and name == "ln_r":
        name = "q_norm" if i in gqa_layers else "r_norm"
    elif part == "att" and name == "ln_k":
        name = "k_norm"
    return f"model.layers.{i}.{_PTH_BLOCK.get(part, part)}.{name}{rest}"


def _pth_refs(path) -> dict:
    """{HF name: TensorRef} from an RWKV-style .pth, unpickled with weights_only=True (no pickled code
    runs) and memory-mapped (tensors are read from the file when used)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        lines = str(e).splitlines() or [""]
        if isinstance(e, pickle.UnpicklingError):
            why = "its pickle asks for more than tensors and plain containers, and running it could execute code: "
            why += next((ln.strip() for ln in lines if "global" in ln.lower()), "refused by the weights-only unpickler")
        elif "mmap can only be used" in str(e):
            why = "not in torch's zip format (needed to memory-map it); re-save it with torch.save"
        else:
            why = f"{type(e).__name__}: {lines[0]}"
        raise ValueError(f"{path}: cannot be loaded as a weights-only torch checkpoint ({why})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"{path}: expected a flat dict of name -> tensor")
    gqa = {int(m[1]) for k in sd for m in [re.match(r"blocks\.(\d+)\.att\.q_proj\.", k)] if m}
    refs = {}
    for key, t in sd.items():
        if key.rsplit(".", 1)[-1] in _PTH_DROPPED:
            continue
        new = _pth_to_hf(key, gqa)
        if new in refs:
            raise ValueError(f"{path}: two tensors are named {new} after renaming")
        refs[new] = TensorRef(tuple(t.shape), t.dtype, lambda t=t: t, f"{path}:{key}")
    return refs


# -----------------------------------------------------------------------------
# The config: given keys, checked against (and completed from) the tensor shapes

_LAYER = r"model\.layers\.(\d+)\."
_RANKS = {name: field for name, field in HXA079_LORA.items() if name.endswith("1")}   # w1 [C, rank] shows the rank
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "rms_norm_eps", "rope_theta")


def _infer_from_shapes(shapes: dict):
    """What the shapes say about the config: (values, evidence, geometry). values: config fields;
    evidence: the tensor each was read from; geometry: A = H*N and D = KV*N (projection widths) and the
    head size N where a 2-D r_k or a per-head norm shows it, each None when no tensor shows it."""
    got, why, geo = {}, {}, {"A": None, "D": None, "N": None}

    def desc(key):
        return f"{key} {list(shapes[key])}"

    def put(field, value, because):
        got[field], why[field] = value, because

    def first(keys, ndim):
        return next((k for k in keys if k in shapes and len(shapes[k]) == ndim), None)

    layers = sorted({int(m[1]) for k in shapes for m in [re.match(_LAYER, k)] if m})
    gqa = [i for i in layers if f"model.layers.{i}.self_attn.q_proj.weight" in shapes]
    rwkv = [i for i in layers if i not in gqa]
    attn = lambda i, name: f"model.layers.{i}.self_attn.{name}"  # noqa: E731
    if first(["model.embed_tokens.weight"], 2):
        put("vocab_size", shapes["model.embed_tokens.weight"][0], desc("model.embed_tokens.weight"))
        put("hidden_size", shapes["model.embed_tokens.weight"][1], desc("model.embed_tokens.weight"))
    if layers:
        put("num_hidden_layers", layers[-1] + 1, f"the highest layer index is {layers[-1]}")
    put("transformer_layers", gqa, "the layers with self_attn.q_proj")
    put("tie_word_embeddings", "lm_head.weight" not in shapes,
        "lm_head.weight is " + ("absent" if "lm_head.weight" not in shapes else "present"))
    bias = sorted(k for k in shapes if re.fullmatch(_LAYER + r"self_attn\.(receptance|key|value|[qkv]_proj)\.bias", k))
    put("attention_bias", bool(bias), bias[0] if bias else "no attention biases")
    norms = sorted(k for k in shapes if re.fullmatch(_LAYER + r"self_attn\.[rqk]_norm\.weight", k))
    put("enable_qk_norm", bool(norms), norms[0] if norms else "no r_norm/q_norm/k_norm")
    key = first([f"model.layers.{i}.mlp.gate_proj.weight" for i in layers], 2)
    if key:
        put("intermediate_size", shapes[key][0], desc(key))
    for name, field in _RANKS.items():
        key = first([attn(i, name) for i in rwkv], 2)
        if key:
            put(field, shapes[key][1], desc(key))
    key = first([attn(i, "r_k") for i in rwkv], 2)
    if key:
        put("num_attention_heads", shapes[key][0], desc(key))
        geo["N"], why["head_dim"] = shapes[key][1], desc(key)
    elif first(norms, 1):
        geo["N"], why["head_dim"] = shapes[first(norms, 1)][0], desc(first(norms, 1))
    for i in layers:
        q, k = (attn(i, "q_proj.weight"), attn(i, "k_proj.weight")) if i in gqa else (
            attn(i, "receptance.weight"), attn(i, "key.weight"))
        if first([q], 2) and first([k], 2):
            geo["A"], geo["D"], why["widths"] = shapes[q][0], shapes[k][0], f"{desc(q)} and {desc(k)}"
            break
    return got, why, geo


def resolve_config(shapes: dict, given: Optional[dict], where: str) -> HRWKV7Config:
    """The HRWKV7Config of a checkpoint whose tensors (HF names) have the shapes `shapes`: the `given`
    keys (config.json and/or overrides) completed with what the shapes determine. A given value the
    shapes contradict, or a required value that is neither given nor inferable, is a ValueError."""
    given = dict(given or {})
    if given.get("head_dim", 0) is None:
        del given["head_dim"]
    got, why, geo = _infer_from_shapes(shapes)

    def check(field, value, given_value, because):
        if field == "transformer_layers" and isinstance(given_value, (list, tuple)):
            given_value = sorted(given_value)
        if given_value is not None and given_value != value:
            raise ValueError(f"{where}: the config says {field}={given_value!r} but the weights say {value!r} "
                             f"({because})")

    for field, value in got.items():
        check(field, value, given.get(field), why[field])
    # the head size: from the weights (r_k, a per-head norm) or else from the config (HF rule: head_dim,
    # else hidden_size // num_attention_heads); then H and KV from the projection widths
    hidden, heads = given.get("hidden_size", got.get("hidden_size")), given.get("num_attention_heads")
    given_n = given.get("head_dim", hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                        and heads > 0 else None)
    A, D, N = geo["A"], geo["D"], geo["N"]
    if N is None:
        N = given_n
    else:
        check("head_dim", N, given_n, why["head_dim"] if "head_dim" in given else
              f"{why['head_dim']}; without head_dim the config implies hidden_size // num_attention_heads")
    if isinstance(N, int) and N > 0 and A is not None:
        if A % N or D % N:
            raise ValueError(f"{where}: head size {N} does not divide the projection widths {A} and {D} "
                             f"({why['widths']})")
        for field, value in (("num_attention_heads", A // N), ("num_key_value_heads", D // N)):
            if field not in got:
                got[field], why[field] = value, f"{why['widths']}, head size {N}"
                check(field, value, given.get(field), why[field])
    merged = {**given, **got}
    if "head_dim" not in merged and N is not None and "num_attention_heads" not in given:
        merged["head_dim"] = N                                       # inferred: written out explicitly
    missing = [f for f in _REQUIRED if f not in merged]
    if len(merged.get("transformer_layers", [])) < merged.get("num_hidden_layers", 0):
        missing += [f for f in _RANKS.values() if f not in merged]
    if N is None and "head_dim" not in merged:
        missing.append("head_dim (no RWKV layer has a 2-D r_k, no per-head norm shows it)")
    if missing:
        raise ValueError(f"{where}: cannot infer {', '.join(missing)}; give them in the config "
                         f"(python convert.py ... --set key=value)")
    return HRWKV7Config.from_dict(merged)


# -----------------------------------------------------------------------------
# Loading


def _as_dict(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, HRWKV7Config):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be an HRWKV7Config, a dict or None, got {type(config).__name__}")


def _meta_model(config: HRWKV7Config) -> HRWKV7ForCausalLM:
    with torch.device("meta"):
        return HRWKV7ForCausalLM(config)


def _check_dtypes(refs: dict, where: str):
    bad = [f"{key}: {ref.dtype}" for key, ref in refs.items()
           if not (isinstance(ref.dtype, torch.dtype) and ref.dtype.is_floating_point)]
    if bad:
        raise ValueError(f"{where}: tensors whose dtype cannot be cast to floating-point weights:\n  "
                         + "\n  ".join(sorted(bad)))


def _normalise_shapes(refs: dict, model) -> dict:
    """w0/a0/v0/k0 stored [D] -> [1, 1, D]; r_k stored [H*N] -> [H, N]."""
    want = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    out = {}
    for key, ref in refs.items():
        shape = want.get(key)
        flat = len(ref.shape) == 1 and key.rsplit(".", 1)[-1] in (*HXA079_BIASES, "r_k")
        if shape is not None and tuple(ref.shape) != shape and flat and math.prod(ref.shape) == math.prod(shape):
            ref = TensorRef(shape, ref.dtype, lambda fn=ref.fn, shape=shape: fn().reshape(shape), ref.where)
        out[key] = ref
    return out


def load_checkpoint(path, config=None, revision=None):
    """(HRWKV7Config, LazyStateDict) from
      - an HF directory: config.json + model.safetensors, or + model.safetensors.index.json and shards,
        or an HF repo id (at `revision`) resolved through the HF cache (hrwkv7_ref.resolve_checkpoint);
      - a single .safetensors file: config from `config`, or a config.json beside it, or the shapes;
      - an RWKV-style .pth (weights_only, memory-mapped; names translated to HF names).
    `config` (an HRWKV7Config or a dict, possibly partial) overrides config.json keys. Whatever the
    shapes determine (sizes, layer kinds, ranks, flags) is inferred and must agree with the config;
    rms_norm_eps and rope_theta (and the head size when no RWKV layer has r_k) must be given.
    Everything is checked against the config before returning; no tensor data is read."""
    path = resolve_checkpoint(path, revision)
    given = {}
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            given = read_json(os.path.join(path, "config.json"))
        refs = _hf_dir_refs(path)
    elif path.endswith(".safetensors"):
        beside = os.path.join(os.path.dirname(path), "config.json")
        if config is None and os.path.exists(beside):
            given = read_json(beside)
        refs = _safetensors_refs(path)
    elif path.endswith((".pth", ".pt", ".bin")):
        refs = _pth_refs(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    else:
        raise ValueError(f"{path}: expected a directory, a .safetensors file or a .pth file")
    given = override_config(given, _as_dict(config), path)
    _check_dtypes(refs, path)
    cfg = resolve_config({key: tuple(ref.shape) for key, ref in refs.items()}, given, path)
    model = _meta_model(cfg)
    refs = _normalise_shapes(refs, model)
    check_state_dict(model, {key: ref.shape for key, ref in refs.items()}, where=path)
    return cfg, LazyStateDict(refs)


# -----------------------------------------------------------------------------
# Writing


def _plan_shards(names, sizes, max_shard_bytes):
    """Greedy, in order: a shard closes when the next tensor would take it past max_shard_bytes
    (a tensor larger than the limit gets a shard of its own)."""
    shards, cur, cur_bytes = [], [], 0
    for name in names:
        if cur and max_shard_bytes is not None and cur_bytes + sizes[name] > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += sizes[name]
    return shards + [cur] if cur else shards


def save_checkpoint(out_dir, config, state_dict, max_shard_bytes=None, dtype=None, overwrite=False,
                    progress=False) -> dict:
    """Write an HF-layout checkpoint: config.json + model.safetensors, or, when the tensors exceed
    max_shard_bytes, model-0000i-of-0000N.safetensors + model.safetensors.index.json.
    `state_dict` maps HF names to tensors or TensorRefs (a LazyStateDict streams from its files);
    `dtype` casts every tensor as it is written. The tensors are checked against the config first;
    the files are written to a temporary directory beside out_dir and renamed into place when
    complete; an existing out_dir is replaced only with overwrite=True. Returns a summary dict."""
    cfg = config if isinstance(config, HRWKV7Config) else HRWKV7Config.from_dict(_as_dict(config))
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype in _ST_NAMES):
        raise ValueError(f"dtype must be a floating-point torch dtype safetensors can store, got {dtype!r}")
    if max_shard_bytes is not None and not max_shard_bytes > 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes!r}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--force) to replace it")
    refs = _refs_of(state_dict)
    model = _meta_model(cfg)
    check_state_dict(model, {key: ref.shape for key, ref in refs.items()}, where="state_dict")
    _check_dtypes(refs, "state_dict")
    order = list(model.state_dict().keys())
    out_dtype = {name: dtype or refs[name].dtype for name in order}
    bad = [f"{name}: {dt}" for name, dt in out_dtype.items() if dt not in _ST_NAMES]
    if bad:
        raise ValueError("dtypes safetensors cannot store:\n  " + "\n  ".join(bad))
    sizes = {name: math.prod(refs[name].shape) * out_dtype[name].itemsize for name in order}
    shards = _plan_shards(order, sizes, max_shard_bytes)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{s + 1:05d}-of-{n:05d}.safetensors" for s in range(n)]

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                                 # as os.makedirs would have made it
    written = 0
    try:
        config_json = cfg.to_dict()
        if len(set(out_dtype.values())) == 1:                       # what HF tools read as the weights' dtype
            name = str(next(iter(out_dtype.values()))).removeprefix("torch.")
            config_json.update({key: name for key in ("torch_dtype",) if key in config_json}, dtype=name)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        from tqdm import tqdm
        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=os.path.basename(out_dir),
                   disable=not progress)
        with bar:
            for fname, names in zip(files, shards):               # one shard in memory at a time
                bar.set_postfix_str(fname)
                tensors = {}
                for name in names:
                    tensors[name] = refs[name].load(dtype=out_dtype[name], device="cpu").detach().contiguous()
                    bar.update(sizes[name])
                save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
                os.chmod(os.path.join(tmp, fname), 0o666 & ~umask)       # save_file makes it owner-only
                written += os.path.getsize(os.path.join(tmp, fname))
                del tensors
        if n > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {name: fname for fname, names in zip(files, shards) for name in names}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        if os.path.lexists(out_dir):                              # overwrite: move the old one aside first
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "previous"))
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(os.path.join(old, "previous"), out_dir)
                os.rmdir(old)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_gqa = len(cfg.transformer_layers)
    return {"out_dir": out_dir, "files": files, "bytes_written": written, "tensor_bytes": sum(sizes.values()),
            "parameters": sum(math.prod(refs[name].shape) for name in order), "layers": cfg.layer_kinds,
            "rwkv_layers": cfg.num_hidden_layers - n_gqa, "gqa_layers": n_gqa}


# -----------------------------------------------------------------------------
# Initialising an hxa079 student from a Llama / Mistral / Qwen2 / Qwen3 teacher


def default_lora_ranks(A: int) -> dict:
    """The LoRA ranks RWKVInside gives an hxa079 layer whose attention width is A = H*N
    (rwkv_inside/TimeMixer.py, RWKV_Tmix_x070_Mose_cxa079.__init__, lines 285, 294, 300, 307, 315):
        decay  max(256, 32 * round(1.7  * A**0.6 / 32))
        iclr   max(32,  32 * round(1.8  * A**0.5 / 32))
        value / key residual mix   max(32, 32 * round(1.3 * A**0.5 / 32))
        gate   max(256, 32 * round(0.35 * A**0.8 / 32))
    (Python's round: halves go to the even integer.) A = 6144: 320, 128, 96, 96, 384.
    These are the formulas at RWKVInside commit d03af49. At ae22207, the commit of the released
    model's training configs, the decay and gate floors are 32, not 256: the same ranks for
    A >= 4096 (A = 6144 included), larger decay and gate ranks here below that."""
    r = lambda lo, m, p: max(lo, int(round(m * A ** p / 32)) * 32)  # noqa: E731
    d = r(256, 1.7, 0.6), r(32, 1.8, 0.5), r(32, 1.3, 0.5), r(32, 1.3, 0.5), r(256, 0.35, 0.8)
    return dict(zip(_RANKS.values(), d))


def _semi_orthogonal(rows, cols, gen) -> torch.Tensor:
    """A [rows, cols] matrix with orthonormal columns (rows >= cols) or rows (rows < cols): Q of the
    reduced QR of a [max, min] standard normal matrix, transposed when rows < cols."""
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=gen, dtype=torch.float64))
    return q if rows >= cols else q.T


def hxa079_init(name: str, layer: int, cfg: HRWKV7Config, seed: int = 0) -> torch.Tensor:
    """Initial value (float32) of the new parameter `name` of RWKV layer `layer`, as RWKVInside
    initialises RWKV_Tmix_x070_Mose_cxa079 (rwkv_inside/TimeMixer.py, lines 201-318). With A = H*N,
    channel n in [0, A), ratio = layer / (L - 1) (0 when L = 1), z_n = ((n mod N) - (N-1)/2) / ((N-1)/2):
        zigzag_n = z_n |z_n|                    linear_n = n / (A-1) - 0.5
        w0_n = -6 + 6 (n / (A-1))^(1 + ratio^0.3) + 0.5 + 2.5 zigzag_n
        a0_n = -0.19 + 0.3 zigzag_n + 0.4 linear_n
        v0 = k0 = 0.73        (the source subtracts 0.4 * linear_kv, a vector it never fills: zeros)
        r_k = -0.04
        w1, a1, v1, k1, g1 = 0
        w2, a2, v2, k2, g2 = 0.1 * gain * semi-orthogonal [rank, width], gain = sqrt(rows/cols) if rows > cols else 1
    Each random matrix draws from its own generator seeded by (seed, layer, name), so the result does
    not depend on the order tensors are produced in."""
    H, N, L = cfg.num_attention_heads, cfg.head_size, cfg.num_hidden_layers
    A, D = H * N, cfg.num_key_value_heads * N
    n = torch.arange(A, dtype=torch.float64)
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag, linear = z * z.abs(), n / (A - 1) - 0.5
    ratio = layer / (L - 1) if L > 1 else 0.0
    if name == "w0":
        val = -6 + 6 * (n / (A - 1)) ** (1 + ratio ** 0.3) + 0.5 + 2.5 * zigzag
    elif name == "a0":
        val = -0.19 + 0.3 * zigzag + 0.4 * linear
    elif name in ("v0", "k0"):
        val = torch.full((D,), 0.73, dtype=torch.float64)
    elif name == "r_k":
        return torch.full((H, N), -0.04)
    elif name in _RANKS:                                         # w1, a1, v1, k1, g1
        return torch.zeros(cfg.hidden_size, getattr(cfg, HXA079_LORA[name]))
    elif name in HXA079_LORA:                                    # w2, a2, v2, k2, g2
        rows = getattr(cfg, HXA079_LORA[name])
        cols = D if name in ("v2", "k2") else A
        digest = hashlib.sha256(f"hxa079-init/{seed}/{layer}/{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        gain = math.sqrt(rows / cols) if rows > cols else 1.0
        return (0.1 * gain * _semi_orthogonal(rows, cols, gen)).float()
    else:
        raise KeyError(f"{name} is not a new hxa079 parameter")
    return val.reshape(1, 1, -1).float()


# An RWKV layer's self_attn tensors that come from the teacher's attention of the same layer; the
# first four are scaled by qkvo_scale (in this order), the norms are copied as they are
TEACHER_NAMES = {"receptance": "q_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj",
                 "r_norm": "q_norm", "k_norm": "k_norm"}
_TEACHER_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")   # a buffer some old checkpoints carry
_TEACHER_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "vocab_size", "rms_norm_eps", "rope_theta")


def _scaled(ref: TensorRef, scale: float) -> TensorRef:
    def fn():
        t = ref.load()
        return (t.to(torch.promote_types(t.dtype, torch.float32)) * scale).to(t.dtype)
    return TensorRef(ref.shape, ref.dtype, fn, f"{scale} * {ref.where}")


def student_from_teacher(teacher_dir, transformer_layers, seed=0, ranks=None, qkvo_scale=(0.5, 0.5, 0.3, 0.5)):
    """(HRWKV7Config, {HF name: TensorRef}) of an hxa079 student of an HF Llama-style teacher.
    Nothing is read but headers; see init_from_teacher."""
    teacher_dir = resolve_checkpoint(teacher_dir)
    tc = fold_rope_keys(read_json(os.path.join(teacher_dir, "config.json")), os.path.join(teacher_dir, "config.json"))
    window = tc.get("sliding_window") if tc.get("use_sliding_window", True) else None
    if "layer_types" in tc:                                      # transformers >= 4.5x says it per layer
        window = window if "sliding_attention" in (tc["layer_types"] or []) else None
    if window:
        warnings.warn(f"{teacher_dir}: the teacher uses sliding-window attention (sliding_window={window!r}); "
                      f"the student's GQA layers attend to the whole context", stacklevel=2)
    missing = [k for k in _TEACHER_REQUIRED if tc.get(k) is None]
    if missing:
        raise ValueError(f"{teacher_dir}/config.json lacks {', '.join(missing)}")
    trefs = _hf_dir_refs(teacher_dir)
    _check_dtypes(trefs, teacher_dir)
    has = lambda pattern: any(re.fullmatch(_LAYER + pattern, k) for k in trefs)  # noqa: E731
    if has(r"self_attn\.o_proj\.bias"):
        raise ValueError(f"{teacher_dir}: the teacher has o_proj biases; the hxa079 model has no output bias")
    d = {k: v for k, v in tc.items() if (v is not None or k not in ("num_key_value_heads", "head_dim"))
         and k not in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")}
    d.setdefault("num_key_value_heads", tc["num_attention_heads"])
    d.update(tie_word_embeddings=bool(tc.get("tie_word_embeddings", False)),
             attention_bias=has(r"self_attn\.[qkv]_proj\.bias"), enable_qk_norm=has(r"self_attn\.[qk]_norm\.weight"),
             transformer_layers=sorted(int(i) for i in transformer_layers), rwkv_architecture="hxa079",
             model_type="hrwkv7", architectures=["HRWKV7ForCausalLM"])
    A = d["num_attention_heads"] * (d.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"])
    rank_values = default_lora_ranks(A)
    unknown = set(ranks or {}) - set(rank_values)
    if unknown:
        raise ValueError(f"ranks: unknown keys {sorted(unknown)}; expected some of {list(rank_values)}")
    d.update(rank_values, **(ranks or {}))
    cfg = HRWKV7Config.from_dict(d)

    model = _meta_model(cfg)
    dtype = trefs["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in trefs else torch.float32
    refs, used, problems = {}, set(), []
    for key, p in model.state_dict().items():
        m = re.fullmatch(_LAYER + r"self_attn\.([^.]+)(\.weight|\.bias|)", key)
        src, scale = key, None
        if m and not cfg.is_gqa(int(m[1])):
            layer, name, suffix = int(m[1]), m[2], m[3]
            if name not in TEACHER_NAMES:           # a new parameter
                refs[key] = TensorRef(tuple(p.shape), dtype, where=f"hxa079 init of {key}",
                                      fn=lambda n=name, i=layer: hxa079_init(n, i, cfg, seed).to(dtype))
                continue
            slot = list(TEACHER_NAMES).index(name)
            src = f"model.layers.{layer}.self_attn.{TEACHER_NAMES[name]}{suffix}"
            scale = qkvo_scale[slot] if slot < 4 else None
        if src not in trefs:
            problems.append(f"missing teacher tensor {src} (for {key})")
        elif tuple(trefs[src].shape) != tuple(p.shape):
            problems.append(f"teacher tensor {src} has shape {tuple(trefs[src].shape)}, expected {tuple(p.shape)}")
        else:
            used.add(src)
            refs[key] = trefs[src] if scale is None or scale == 1 else _scaled(trefs[src], scale)
    unused = [k for k in trefs if k not in used and not _TEACHER_IGNORED.fullmatch(k)
              and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    problems += [f"teacher tensor {k} has no place in the student" for k in unused]
    if problems:
        raise ValueError(f"{teacher_dir}: the teacher does not fit its config.json as a Llama-style model:\n  "
                         + "\n  ".join(sorted(problems)))
    return cfg, refs


def init_from_teacher(teacher_dir, out_dir, transformer_layers, seed=0, ranks=None, qkvo_scale=(0.5, 0.5, 0.3, 0.5),
                      dtype=None, max_shard_bytes=None, overwrite=False, progress=False) -> dict:
    """Write an hxa079 student initialised from a Llama / Mistral / Qwen2 / Qwen3-style HF checkpoint.

    Copied bit for bit: embeddings, final norm, LM head, every layer's norms and MLP, and the whole
    attention (q/k/v/o, biases, q_norm/k_norm) of the `transformer_layers` (GQA). RWKV layers take
    receptance/key/value/output = qkvo_scale * teacher q/k/v/o (biases too) and r_norm/k_norm =
    teacher q_norm/k_norm; the default scales (0.5, 0.5, 0.3, 0.5) are those RWKVInside's stage-1
    training script applies to RWKV layers (train_scripts/train_hybrid_deepspeed2_stage1.py, lines
    749-760); pass (1, 1, 1, 1) for plain copies. The other RWKV parameters are `hxa079_init`'s; their
    LoRA ranks are `default_lora_ranks(H*N)` unless `ranks` ({"lora_rank_decay": 64, ...}) says otherwise.
    New parameters take the teacher's dtype. attention_bias and enable_qk_norm follow the teacher's
    tensors (Qwen2 has q/k/v biases without a config flag); the teacher's other config keys are kept.
    Streams: nothing is held but the tensor being written."""
    cfg, refs = student_from_teacher(teacher_dir, transformer_layers, seed, ranks, qkvo_scale)
    return save_checkpoint(out_dir, cfg, refs, max_shard_bytes=max_shard_bytes, dtype=dtype, overwrite=overwrite,
                           progress=progress)


# -----------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '512MiB' -> 512 * 2**20, '1000' -> 1000."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB, 1000000)")
    power = " KMGT".index(m[2].upper() or " ")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


def _parse_set(items) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _dtype(name: str):
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise argparse.ArgumentTypeError(f"not a floating-point torch dtype: {name!r}")
    return dt


def _print_summary(s: dict):
    print(f"layers: {s['rwkv_layers']} RWKV + {s['gqa_layers']} GQA  ({s['layers']}; R = RWKV, G = GQA)")
    print(f"parameters: {s['parameters']:,}")
    print(f"written: {s['bytes_written']:,} bytes in {len(s['files'])} safetensors file(s) to {s['out_dir']}")


def _run(argv):
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "convert.py"   # or hrwkv7-convert
    common = ArgumentParser(add_help=False)
    common.add_argument("--dtype", type=_dtype, help="cast every tensor, e.g. bfloat16")
    common.add_argument("--max-shard-size", type=parse_size, help="e.g. 5GB; default: one file")
    common.add_argument("--force", action="store_true", help="replace DST if it exists")
    if argv[:1] == ["from-teacher"]:
        ap = ArgumentParser(prog=f"{prog} from-teacher", parents=[common],
                                     description="initialise an hxa079 student from a Llama-style HF checkpoint")
        ap.add_argument("teacher")
        ap.add_argument("dst")
        ap.add_argument("--transformer-layers", required=True,
                        type=lambda s: [int(x) for x in s.split(",") if x.strip()], help="GQA layers, e.g. 5,11,17")
        ap.add_argument("--seed", type=int, default=0)
        args = ap.parse_args(argv[1:])
        summary = init_from_teacher(args.teacher, args.dst, args.transformer_layers, seed=args.seed, dtype=args.dtype,
                                    max_shard_bytes=args.max_shard_size, overwrite=args.force, progress=True)
    else:
        ap = ArgumentParser(prog=prog, parents=[common], epilog=f"or: {prog} from-teacher -h",
                                     description="convert an hxa079 checkpoint (HF dir, .safetensors or RWKV .pth) "
                                                 "to an HF directory")
        ap.add_argument("src", help="an HF directory or repo id (owner/name), a .safetensors or a .pth file")
        ap.add_argument("dst")
        ap.add_argument("--revision", help="the repo id's branch, tag or commit")
        ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="config value (JSON, else a string), e.g. rms_norm_eps=1e-5; repeatable")
        args = ap.parse_args(argv)
        cfg, sd = load_checkpoint(args.src, _parse_set(args.set) or None, args.revision)
        summary = save_checkpoint(args.dst, cfg, sd, max_shard_bytes=args.max_shard_size, dtype=args.dtype,
                                  overwrite=args.force, progress=True)
    _print_summary(summary)
    return summary


def main(argv=None):
    """The `hrwkv7-convert` command (bad input: one line `error: ...`, exit status 2; see
    command_line.run_command)."""
    return run_command(_run, argv)


if __name__ == "__main__":
    main()
