"""pytest set-up of test_ref.py and test_loading.py: the environment the tests run in, the option
--wkv-impl, the hypothesis profiles, and the factories both files use.

Environment. The Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1) unless
HRWKV7_TEST_CUDA=1 (then on the GPU, and the GPU-only tests run too). Triton reads the variable
when wkv_kernel defines its kernels, i.e. when wkv_kernel is first imported; pytest imports this
file before any test module, so it is set here, before anything imports wkv_kernel. Subprocesses
the tests start (and the notebooks' kernels) inherit it.

--wkv-impl: put any WKV-7 kernel through the WKV property suite of test_ref.py.

    python -m pytest -q test_ref.py --wkv-impl package.module:function
    python -m pytest -q test_ref.py --wkv-impl fla_adapter:fla_dplr_recurrence   (fla-core's reference)

The function must have wkv_kernel's signature, f(r, w, k, v, a, b, S0) -> (y, S_T). The suite's
tests (those that take the `kernel` argument) then run on it alone, and every other test is
deselected. Without the option the suite runs on the project's own forms.

Hypothesis profiles: "ci" (the default: bounded examples) and "dev" (HYPOTHESIS_PROFILE=dev: more).

The factories (the test files import them: `from conftest import ...`):
    rel             golden/check.py's relative error, max |x - ref| / max |ref| in float64 (a
                    norm-wise measure, so tiny entries don't dominate): the tests and the checker
                    measure with one formula
    save_hf         an HF checkpoint directory written with safetensors' own writer (not convert.py)
    load_tensors, read_json   read one back
    make_teacher    a random Llama / Qwen2 / Qwen3 / Mistral teacher, written by transformers or by
                    safetensors (TEACHER_KINDS, teacher_weight, teacher_shapes)
The tiny random HRWKV7 model is hrwkv7_ref.random_model.
"""
import json
import math
import os
import pathlib
import sys

WANT_CUDA = os.environ.get("HRWKV7_TEST_CUDA") == "1"   # also what test_ref.py checks before its GPU-only tests
if not WANT_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402  (after TRITON_INTERPRET is set: torch may import triton)
from hypothesis import HealthCheck, settings  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))   # the repository root: the modules, golden/, notebooks/
GOLDEN = os.path.join(HERE, "golden")               # not a package: a porter runs its scripts as files
sys.path.insert(0, GOLDEN)
from check import rel  # noqa: E402,F401  (golden/check.py: the one relative-error measure)


def pytest_addoption(parser):
    parser.addoption("--wkv-impl", metavar="package.module:function", default=None,
                     help="run only the WKV kernel suite, on this function f(r, w, k, v, a, b, S0) -> (y, S_T)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--wkv-impl") is None:
        return
    suite = [item for item in items if "kernel" in getattr(item, "fixturenames", ())]
    others = [item for item in items if "kernel" not in getattr(item, "fixturenames", ())]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = suite


settings.register_profile("ci", max_examples=10, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# -------------------------------------------------------------------------------------------------
# Checkpoint files and teachers


def save_hf(path, cfg, sd, shards=1, write_config=True):
    """An HF directory written with safetensors' own writer (independent of convert.py); cfg is an
    HRWKV7Config or a config.json dict, shards > 1 writes model.safetensors.index.json."""
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    if write_config:
        (path / "config.json").write_text(json.dumps(cfg if isinstance(cfg, dict) else cfg.to_dict()))
    sd = {k: v.contiguous() for k, v in sd.items()}
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"))
        return path
    keys, weight_map = sorted(sd), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in keys[s::shards]}, str(path / name))
        weight_map.update({k: name for k in keys[s::shards]})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def load_tensors(path):
    """Every tensor of the *.safetensors files in directory `path`, read with safetensors' own reader."""
    from safetensors.torch import load_file
    return {k: v for f in sorted(pathlib.Path(path).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def read_json(path):
    with open(path) as f:
        return json.load(f)


# tiny teachers: hidden 32-64, vocab 101; every kind is a different code path of the conversion
# (test_ref.py section 6 runs each; test_loading.py section 3 writes its own kinds, CONVERT_TEACHERS,
# with safetensors)
TEACHER_KINDS = {
    # plain Llama GQA: 4 query heads on 2 KV heads
    "llama": dict(arch="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    # Qwen2: q/k/v biases (no config flag), head size 12 (not a power of two, like Reka's 96)
    "qwen2_bias": dict(arch="qwen2", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12),
    # Qwen3: per-head q/k RMSNorm, head_dim 16 != hidden_size // heads
    "qwen3_qknorm": dict(arch="qwen3", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # multi-query (one KV head) with the LM head tied to the embeddings
    "llama_mqa_tied": dict(arch="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=8, tie_word_embeddings=True),
    # written in several shards (model.safetensors.index.json)
    "llama_sharded": dict(arch="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=8, max_shard_size="20KB"),
}
TEACHER_ARCHS = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}


def transformers_classes(arch):
    """(config class, model class) of a transformers architecture name."""
    import transformers
    names = TEACHER_ARCHS[arch]
    return getattr(transformers, names + "Config"), getattr(transformers, names + "ForCausalLM")


def teacher_weight(name, shape, gen):
    """A teacher's random weight, float64: embeddings N(0, 1), Linear weights N(0, 1/fan_in) (so
    q.k / sqrt(N) is O(1) and attention is far from uniform), norm weights 1 + N(0, 0.2^2), biases
    N(0, 0.3^2)."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    if name.endswith("norm.weight"):
        return 1 + 0.2 * noise
    if name.endswith(".bias"):
        return 0.3 * noise
    if "embed_tokens" in name:
        return noise
    return noise / math.sqrt(shape[1])


def teacher_shapes(arch, c):
    """name -> shape of the tensors of an `arch` checkpoint (HF names) with config dict `c`, in the
    order transformers creates them (so teacher_weight draws the same values for either writer):
    Qwen2 has q/k/v biases, Qwen3 q/k norms; no lm_head when the head is tied."""
    C, H, KV, ffn = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    N = c.get("head_dim") or C // H
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], C)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", H * N), ("k_proj", KV * N), ("v_proj", KV * N)):
            shapes[p + f"self_attn.{proj}.weight"] = (rows, C)
            if arch == "qwen2":
                shapes[p + f"self_attn.{proj}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (C, H * N)
        if arch == "qwen3":
            shapes.update({p + "self_attn.q_norm.weight": (N,), p + "self_attn.k_norm.weight": (N,)})
        shapes.update({p + "mlp.gate_proj.weight": (ffn, C), p + "mlp.up_proj.weight": (ffn, C),
                       p + "mlp.down_proj.weight": (C, ffn), p + "input_layernorm.weight": (C,),
                       p + "post_attention_layernorm.weight": (C,)})
    shapes["model.norm.weight"] = (C,)
    if not c.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (c["vocab_size"], C)
    return shapes


def make_teacher(path, kind, n_layers, seed=0, dtype=torch.float64, writer="transformers", **config_overrides):
    """A random `kind` teacher (a TEACHER_KINDS name or such a dict) of n_layers layers, written to
    `path` in `dtype`; returns `path`. Weights: teacher_weight, drawn in float64, then rounded.

    writer="transformers": built by transformers and written with its save_pretrained, config.json as
        transformers >= 5 writes it ("dtype", `rope_parameters`, no top-level `rope_theta`):
        test_ref.py section 6.
    writer="safetensors": the same config keys and tensors (teacher_shapes: the names, shapes and
        order transformers creates, so the same values), with "architectures", "model_type" and
        "torch_dtype", written by save_hf in 2 shards, so that test_loading.py section 3 needs no
        transformers. A top-level rope_theta in the kind or the overrides replaces
        `rope_parameters` (the layout transformers < 5 wrote)."""
    spec = dict(TEACHER_KINDS[kind] if isinstance(kind, str) else kind)
    arch, max_shard_size = spec.pop("arch"), spec.pop("max_shard_size", None)
    kw = dict(vocab_size=101, intermediate_size=64, num_hidden_layers=n_layers, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
    kw.update(spec)
    kw.update(config_overrides)
    gen = torch.Generator().manual_seed(seed)
    if writer == "safetensors":
        if "rope_theta" in kw:
            del kw["rope_parameters"]
        config = {"architectures": [TEACHER_ARCHS[arch] + "ForCausalLM"], "model_type": arch, **kw,
                  "torch_dtype": str(dtype).removeprefix("torch.")}
        sd = {name: teacher_weight(name, shape, gen).to(dtype) for name, shape in teacher_shapes(arch, kw).items()}
        save_hf(pathlib.Path(path), config, sd, shards=2)
        return path
    assert writer == "transformers", writer
    config_cls, model_cls = transformers_classes(arch)
    model = model_cls(config_cls(**kw)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(teacher_weight(name, p.shape, gen))
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **extra)
    return path

