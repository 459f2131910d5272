"""
Everything around the equivalence proofs of test_ref.py: the model's interface (config, input
checks, generation, memory accounting), loading (from_pretrained, the hub cache, device_map),
checkpoints and their conversion (convert.py), the command lines (hrwkv7, hrwkv7-convert: stop
strings and the error convention of command_line.py) and the installed package. Bad input
everywhere against clear errors. Synthetic tiny checkpoints only.

    python -m pytest -q test_loading.py
    python -m pytest -q test_ref.py test_loading.py        (both files)

conftest.py sets the environment and holds what both test files share: `rel` (golden/check.py's
max |x - ref| / max |ref|), save_hf / load_tensors / read_json (checkpoint files written and read
with safetensors' own code, independent of convert.py) and make_teacher. The tiny random model is
hrwkv7_ref.random_model.

Contents (each section starts with a banner "# ===...", then "# <number>  <title>"):

1     The model's interface
1.1     Config: round trip, errors that name the field
1.2     The model's input checks: bad ids and states get clear errors
1.3     Generation and memory accounting: greedy, streaming, EOS, sampling, the global RNG left
        alone, state_bytes, init_random's std, the released preset
2     Loading: from_pretrained against the loop, two files copied alone, device_map with disk
      offload, bfloat16 weights, a repo id from the hub cache and the chat command, bad tensors, an
      index that disagrees with its shards
3     convert.py
3.1     Round trips: .pth -> HF -> load, exact; sharded layout, dtype casts, the command
3.2     Bad checkpoints and outputs: unsafe index entries, missing/unexpected/mis-shaped tensors,
        corrupt files, contradicting configs, pickles, permissions, half-written outputs
3.3     Initialisation from a teacher: init_from_teacher, its formulas, its errors and command
4     The command lines: hrwkv7 and hrwkv7-convert
4.1     Stop strings over several tokens, and the text stream that holds them back
4.2     One error convention for both commands: one `error:` line, exit status 2 (bad paths,
        dtypes, devices, repo ids; an error of several lines; a missing optional package)
5     The installed package: the wheel's five modules and two commands, installed into a fresh venv
"""


import importlib.util
import json
import os
import pickle
import re
import shutil
import site
import subprocess
import sys
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
import hrwkv7_cli
import hrwkv7_loop
import hrwkv7_ref
from conftest import HERE, load_tensors, make_teacher, read_json, rel, save_hf
from convert import (LazyStateDict, TensorRef, default_lora_ranks, hxa079_init, init_from_teacher, load_checkpoint,
                     parse_size, save_checkpoint)
from hrwkv7_ref import (HXA079_BIASES, REKA_FLASH_31, TINY, HRWKV7Config, HRWKV7ForCausalLM, HRWKV7State,
                        compute_in, random_model, sample, state_bytes)

# =================================================================================================
# 1  The model's interface: its config, its input checks, generation, memory
# What a user of hrwkv7_ref meets around the forward: config.json read and refused by field name,
# bad ids and states refused by name, generate / sample, state_bytes, the presets and init_random.


# =================================================================================================
# 1.1  Config


def test_config_round_trip_keeps_unknown_keys(tmp_path):
    d = {**TINY, "torch_dtype": "bfloat16", "architectures": ["HRWKV7ForCausalLM"], "some_future_key": {"a": 1}}
    cfg = HRWKV7Config.from_dict(d)
    out = cfg.to_dict()
    assert {k: out[k] for k in d} == d                       # every key kept, defaults filled in
    assert HRWKV7Config.from_dict(out) == cfg
    (tmp_path / "config.json").write_text(json.dumps(out))
    assert HRWKV7Config.from_json(tmp_path / "config.json") == cfg
    assert HRWKV7Config.from_dict({k: v for k, v in TINY.items() if k != "head_dim"}).head_size == 12


@pytest.mark.parametrize("change, field", [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": None, "hidden_size": 50}, "head_dim"),
    ({"head_dim": 0}, "head_dim"),
    ({"transformer_layers": [4]}, "transformer_layers"),
    ({"transformer_layers": [-1]}, "transformer_layers"),
    ({"lora_rank_gate": 0}, "lora_rank_gate"),
    ({"vocab_size": 2.5}, "vocab_size"),
    ({"rwkv_architecture": "x070"}, "rwkv_architecture"),
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        HRWKV7Config.from_dict({**TINY, **change})


# =================================================================================================
# 1.2  The model's input checks: bad ids and states get clear errors


def test_bad_inputs_raise_clear_errors():
    cfg = HRWKV7Config.from_dict(TINY)
    model = random_model(cfg)
    with pytest.raises(ValueError, match="token id 128"):
        model(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.tensor([[1.0, 2.0]]))
    _, state = model(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.tensor([[1]]), state)
    other = random_model(HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]}))
    with pytest.raises(ValueError, match="layer 1 is GQA"):
        other(torch.tensor([[1], [2]]), state)
    with pytest.raises(ValueError, match="float32"):
        model.float()(torch.tensor([[1], [2]]), state)


def test_state_of_another_batch_size_is_refused_by_name_before_an_rwkv_layer_runs(monkeypatch):
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [3]})       # layers 0, 1, 2 are RWKV
    model = random_model(cfg, dtype=torch.float32)
    _, state = model(torch.tensor([[1, 2], [3, 4]]))
    calls = []
    monkeypatch.setattr(hrwkv7_ref, "wkv7", lambda *a, **k: calls.append(1))
    for ids in (torch.tensor([[1]]), torch.tensor([[1], [2], [3]])):
        with pytest.raises(ValueError, match=rf"state\.per_layer\[0\] \(RWKV\).*batch size 2.*input_ids has batch "
                                             rf"size {ids.shape[0]}"):
            model(ids, state)
    assert calls == []                                        # refused before any kernel ran


# =================================================================================================
# 1.3  Generation and memory accounting


def test_generate_greedy_equals_argmax_of_full_forward():
    cfg = HRWKV7Config.from_dict(TINY)
    model = random_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])
    a = model.generate(prompt, 5, temperature=0.8, top_p=0.9, seed=1)
    assert torch.equal(a, model.generate(prompt, 5, temperature=0.8, top_p=0.9, seed=1))


def test_generate_streams_and_stops_at_eos():
    cfg = HRWKV7Config.from_dict(TINY)
    model = random_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    free = model.generate(prompt, 8, temperature=0)
    eos = int(free[0, 7])                                            # row 0's third new token
    seen = []
    out = model.generate(prompt, 8, temperature=0, eos_token_id=[eos, 10 ** 6], on_token=seen.append)
    assert torch.equal(torch.cat(seen, 1), out[:, 5:])
    stop = [int((free[b, 5:] == eos).nonzero()[0]) + 1 if (free[b, 5:] == eos).any() else 8 for b in range(2)]
    assert out.shape[1] == 5 + max(stop)                             # stops when every row has ended
    for b in range(2):
        assert torch.equal(out[b, :5 + stop[b]], free[b, :5 + stop[b]])
        assert torch.all(out[b, 5 + stop[b]:] == eos)                # an ended row repeats its EOS


def test_sample_follows_temperature_and_top_p():
    # 40000 draws at once: frequencies against softmax(logits / temperature), renormalised over the
    # smallest set of tokens (in order of probability) whose mass reaches top_p, that set included
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0], dtype=torch.float64)
    n = 40000
    for temperature, top_p in ((0.5, 1.0), (2.0, 1.0), (1.0, 0.8), (1.0, 0.5)):
        p = torch.softmax(logits / temperature, -1)
        keep = (p.cumsum(-1) - p) < top_p                              # p is sorted here: the set, its crossing token included
        want = p * keep / (p * keep).sum()
        draws = sample(logits.expand(n, 5), temperature, top_p, torch.Generator().manual_seed(1))
        freq = torch.bincount(draws[:, 0], minlength=5).double() / n
        sigma = (want * (1 - want) / n).sqrt()
        assert torch.all((freq - want).abs() <= 5 * sigma + 1e-12), (temperature, top_p, freq, want)
    assert torch.equal(sample(logits[None], 0, 1.0, None), torch.tensor([[0]]))


def test_state_whose_cache_disagrees_with_pos_is_refused():
    cfg = HRWKV7Config.from_dict(TINY)
    model = random_model(cfg)
    _, state = model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"caches 3 positions but state.pos=2"):
        model(torch.tensor([[4]]), HRWKV7State(state.per_layer, 2))


def test_state_bytes_formula_matches_a_real_state():
    """state_bytes(cfg, context, batch, dtype) == the bytes of the state a model in dtype returns:
    the WKV state in state_dtype(dtype) (float32, float64 for float64), the cache in dtype."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        model = random_model(TINY, dtype=dtype)
        cfg = model.config
        with torch.no_grad():
            _, state = model(torch.randint(0, cfg.vocab_size, (3, 7)))
        rwkv, kv = state_bytes(cfg, 7, batch=3, dtype=dtype)
        assert state.nbytes() == {"rwkv_state": rwkv, "kv_cache": kv}, dtype
    assert state_bytes(cfg, 7, batch=3, dtype=torch.bfloat16) == (3 * 3 * 4 * 12 * 12 * 4, 3 * 2 * 2 * 7 * 12 * 2)


def test_generate_without_a_seed_leaves_the_global_rng_alone():
    model = random_model(TINY, dtype=torch.float32)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = model.generate(torch.tensor([[1, 2, 3]]), 8, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), before)
    b = model.generate(torch.tensor([[1, 2, 3]]), 8, temperature=1.0, seed=5)
    assert torch.equal(b, model.generate(torch.tensor([[1, 2, 3]]), 8, temperature=1.0, seed=5))
    assert torch.equal(torch.get_rng_state(), before) and a.shape == b.shape


@pytest.mark.parametrize("std", [0.02, 0.5])
def test_init_random_draws_the_projections_with_the_std_given(std):
    model = HRWKV7ForCausalLM(HRWKV7Config.from_dict(TINY)).double().init_random(std=std)
    plain = torch.cat([p.flatten() for name, p in model.named_parameters()
                       if name.endswith(("proj.weight", "receptance.weight", "key.weight", "value.weight",
                                         "output.weight", "embed_tokens.weight", "lm_head.weight"))])
    assert plain.numel() > 50_000
    assert abs(plain.std().item() / std - 1) < 0.02 and abs(plain.mean().item()) < 0.02 * std


def test_reka_preset_has_the_released_layout():
    cfg = HRWKV7Config.from_dict(REKA_FLASH_31)
    assert cfg.transformer_layers == [8, 15, 22, 29, 36, 43] and not cfg.enable_qk_norm
    assert cfg.layer_kinds == "".join("G" if i in (8, 15, 22, 29, 36, 43) else "R" for i in range(44))
    run = subprocess.run([sys.executable, "hrwkv7_ref.py"], capture_output=True, text=True, cwd=HERE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "GQA at 8, 15, 22, 29, 36, 43" in run.stdout and "illustrative" not in run.stdout
    run = subprocess.run([sys.executable, "hrwkv7_ref.py", "--model", "x"], capture_output=True, text=True, cwd=HERE)
    assert run.returncode == 2 and "hrwkv7_cli.py" in run.stderr and not run.stdout   # the demo takes no arguments


# =================================================================================================
# 2  Loading: from_pretrained (float64 against the loop, two files alone, device_map, bfloat16), the
# hub cache and the chat command, bad tensors, an index that disagrees with its shards


def _write_tokenizer(path, vocab_size, eos):
    """A word-level tokenizer.json (the tokenizers package), a chat template and generation_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<s>", "</s>", "<unk>", "user", "assistant", "a", "b", "c"]
    vocab = {w: i for i, w in enumerate(words + [f"t{i}" for i in range(len(words), vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s>\n{% endfor %}"
                "{% if add_generation_prompt %}<s> assistant {% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>",
                                                            "eos_token": {"content": "</s>"}}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return tok


def _hub_cache(cache, repo_id, src, commit="0123456789abcdef0123456789abcdef01234567"):
    """src's files laid out as huggingface_hub's cache keeps a snapshot: refs/main holds the commit,
    snapshots/<commit>/<file> are links into ../../blobs/<sha256>."""
    import hashlib
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name in os.listdir(src):
        data = (src / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", repo / "snapshots" / commit / name)


def oracle_logits(sd, cfg, ids):
    """float64 logits [B, T, V] of hrwkv7_loop (the definition) with state dict `sd` and HRWKV7Config
    `cfg` on ids [B, T], a fresh prefill."""
    return hrwkv7_loop.run(cfg.to_dict(), sd, ids)[0]


@pytest.mark.parametrize("shards", [1, 3])
def test_from_pretrained_float64_matches_oracle(tmp_path, shards):
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [0, 3], "enable_qk_norm": True,
                                  "attention_bias": True})
    src = random_model(cfg, seed=3)
    save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards)
    model = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        logits, state = model(ids)
    assert all((s.dtype if torch.is_tensor(s) else s[0].dtype) == torch.float64 for s in state.per_layer)
    assert rel(logits, oracle_logits(src.state_dict(), cfg, ids)) < 1e-10


def test_two_files_copied_alone_load_a_checkpoint(tmp_path):
    # hrwkv7_ref.py + wkv_kernel.py in an empty folder load an HF checkpoint (sharded) with torch and
    # safetensors alone, and give the logits of the model that was saved
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]})
    src = random_model(cfg, seed=4)
    save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.save(src(ids)[0], tmp_path / "want.pt")
    lone = tmp_path / "lone"
    lone.mkdir()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("hrwkv7_ref.py", "wkv_kernel.py"):
        (lone / name).write_text(open(os.path.join(here, name)).read())
    script = (f"import sys, torch; sys.modules['convert'] = None\n"
              f"from hrwkv7_ref import HRWKV7ForCausalLM\n"
              f"m = HRWKV7ForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, dtype=torch.float64)\n"
              f"want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)\n"
              f"got = m(torch.tensor({ids.tolist()}))[0].detach()\n"
              f"err = ((got - want).abs().max() / want.abs().max()).item()\n"
              f"assert err < 1e-12, err\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=lone, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr


def test_device_map_with_disk_offload_gives_the_plain_logits(tmp_path):
    pytest.importorskip("accelerate")
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]})
    src = random_model(cfg, seed=6).float()
    save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "disk"}
    model = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map,
                                              offload_folder=tmp_path / "offload")
    with torch.no_grad():
        want, want_state = src(ids)
        got, state = model(ids)
        assert torch.equal(got, want)
        assert torch.equal(model(ids[:, :2], state)[0], src(ids[:, :2], want_state)[0])   # decoding on
    assert torch.equal(model.generate(ids[:1], 4, temperature=0), src.generate(ids[:1], 4, temperature=0))
    with pytest.raises(ValueError, match=r"device_map\['model.layers.0'\] = 'cuda:7': no such device"):
        HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", device_map={**device_map, "model.layers.0": "cuda:7"},
                                          offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError, match="give offload_folder"):
        HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map)


def test_bfloat16_weights_float32_compute_match_float64(tmp_path):
    # the same bf16-rounded weights, run once in float64 and once stored bf16 / computed float32
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1], "hidden_size": 64, "head_dim": 16})
    src = random_model(cfg, seed=7).bfloat16()
    save_hf(tmp_path / "ckpt", cfg, src.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(7))
    ref = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    model = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}   # stored: bf16 only
    with torch.no_grad():
        got, want = model(ids)[0], ref(ids)[0]
    assert got.dtype == torch.float32 and rel(got, want) < 1e-5     # float32 rounding, not bf16's


@pytest.mark.parametrize("tie", [False, True])
def test_compute_in_blocks_prefill_and_decode_match_float64(tmp_path, tie):
    """compute_in with 1 KiB blocks (every product in several blocks and a remainder), a tied or an
    untied head: prefill, then one decode step, each to 1e-5 of float64 on the same bf16-rounded
    weights; the weights stay bfloat16 (no float32 copy kept), the caches and logits are float32."""
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1], "hidden_size": 64, "head_dim": 16,
                                  "tie_word_embeddings": tie})
    save_hf(tmp_path / "ckpt", cfg, random_model(cfg, seed=7).bfloat16().state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 33), generator=torch.Generator().manual_seed(7))
    ref = HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    model = compute_in(HRWKV7ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16), torch.float32,
                       block_bytes=1024)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.dtype == torch.float32
    with torch.no_grad():
        want, want_state = ref(ids[:, :32])
        got, state = model(ids[:, :32])
        assert got.dtype == torch.float32 and rel(got, want) < 1e-5
        assert all(t.dtype == torch.float32 for s in state.per_layer for t in (s if isinstance(s, tuple) else [s]))
        assert rel(model(ids[:, 32:], state)[0], ref(ids[:, 32:], want_state)[0]) < 1e-5


def test_repo_id_from_the_hub_cache_and_the_chat_command(tmp_path):
    # an HF repo id resolved offline from a hub cache (sharded files as links into blobs/), by the
    # model, by convert.py and by the command users run, with the checkpoint's own chat template
    pytest.importorskip("huggingface_hub")
    pytest.importorskip("jinja2")
    cfg = HRWKV7Config.from_dict({**TINY, "transformer_layers": [1]})
    src = random_model(cfg, seed=8).float()
    ckpt = save_hf(tmp_path / "ckpt", cfg, src.state_dict(), shards=3)
    tok = _write_tokenizer(ckpt, cfg.vocab_size, eos=1)
    _hub_cache(tmp_path / "hub", "owner/tiny-hxa079", ckpt)
    chat = "<s> user a b c </s>\n<s> assistant "
    ids = tok.encode(chat, add_special_tokens=False).ids
    with torch.no_grad():
        want_logits = src(torch.tensor([ids]))[0]
        want = src.generate(torch.tensor([ids]), 6, temperature=0, eos_token_id=1)[0, len(ids):].tolist()
    torch.save(want_logits, tmp_path / "want.pt")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    script = f"""
import torch, convert, hrwkv7_cli
from hrwkv7_ref import HRWKV7ForCausalLM, resolve_checkpoint
from hrwkv7_cli import chat_prompt
assert chat_prompt(resolve_checkpoint("owner/tiny-hxa079"), "a b c") == {chat!r}
m = HRWKV7ForCausalLM.from_pretrained("owner/tiny-hxa079")
assert torch.equal(m(torch.tensor([{ids}]))[0], torch.load({str(tmp_path / "want.pt")!r}))
cfg, sd = convert.load_checkpoint("owner/tiny-hxa079")
assert cfg.transformer_layers == [1] and len(sd) == {len(src.state_dict())}
try:
    HRWKV7ForCausalLM.from_pretrained("owner/not-there")
except FileNotFoundError as e:
    print("ERROR:", e)
print("---", flush=True)
hrwkv7_cli.main(["--model", "owner/tiny-hxa079", "--prompt", "a b c", "--chat", "--temperature", "0",
                 "--max-new-tokens", "6"])   # what `python hrwkv7_cli.py --model ...` runs
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert run.returncode == 0, run.stderr
    error, cli = run.stdout.split("ERROR:")[1].split("---\n")
    assert "owner/not-there" in error and str(tmp_path / "hub") in error and "HF_HUB_OFFLINE='1'" in error
    assert cli.strip() == tok.decode(want)                           # streamed, stopped at the EOS
    assert re.search(rf"\[load .* prefill {len(ids)} tokens at .* tokens/s; decode {len(want) - 1} tokens at "
                     rf".*tokens/s\]", run.stderr)


def test_from_pretrained_names_bad_tensors(tmp_path):
    cfg = HRWKV7Config.from_dict(TINY)
    src = random_model(cfg)
    save_hf(tmp_path / "ok", cfg, src.state_dict())
    sd = load_file(str(tmp_path / "ok" / "model.safetensors"))
    for what, mutate in [("missing tensor model.layers.1.self_attn.w1", lambda d: d.pop("model.layers.1.self_attn.w1")),
                         ("unexpected tensor model.layers.1.self_attn.extra",
                          lambda d: d.__setitem__("model.layers.1.self_attn.extra", torch.zeros(1))),
                         ("model.norm.weight", lambda d: d.__setitem__("model.norm.weight", torch.ones(5)))]:
        bad = dict(sd)
        mutate(bad)
        d = tmp_path / what.split()[-1]
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg.to_dict()))
        save_file(bad, str(d / "model.safetensors"))
        with pytest.raises(ValueError, match=what.replace(".", r"\.")):
            HRWKV7ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("fault", ["mapped_to_the_other_shard", "held_by_both_shards"])
def test_index_that_disagrees_with_its_shards_is_refused_naming_both_files(tmp_path, fault):
    """model.safetensors.index.json maps a tensor to the shard that does not hold it, or a second
    shard holds a copy of it: loading would take a tensor the index does not point to (or either
    copy), so from_pretrained and convert.load_checkpoint refuse with a ValueError naming the tensor
    and both files."""
    model = random_model(TINY, dtype=torch.float32)
    ckpt = save_hf(tmp_path / "ckpt", model.config, model.state_dict(), shards=2)
    index = read_json(ckpt / "model.safetensors.index.json")
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    name = min(k for k, f in index["weight_map"].items() if f == second)
    if fault == "mapped_to_the_other_shard":
        index["weight_map"][name] = first
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({**load_file(str(ckpt / first)), name: model.state_dict()[name].contiguous()}, str(ckpt / first))
    for load in (HRWKV7ForCausalLM.from_pretrained, load_checkpoint):
        with pytest.raises(ValueError, match="disagrees with its shards") as e:
            load(ckpt)
        assert name in str(e.value) and first in str(e.value) and second in str(e.value), str(e.value)


# =================================================================================================
# 3  convert.py
# Exact round trips (.pth -> HF -> load, sharded, cast), bad checkpoints and outputs refused with an
# error that names them, teacher initialisation. Synthetic tiny checkpoints only.


_FILE_SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
EPS_THETA = {"rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def _pth_name(key, flat=False, value=None):
    """HF name -> RWKV-style .pth name (SPEC.md section 8), optionally storing w0/a0/v0/k0 as [D]
    and r_k as [H*N]."""
    for old, new in [("model.embed_tokens.", "emb."), ("model.norm.", "ln_out."), ("lm_head.", "head."),
                     ("model.layers.", "blocks."), ("self_attn.", "att."), ("mlp.", "ffn."), ("gate_proj", "gate"),
                     ("up_proj", "up"), ("down_proj", "down"), ("input_layernorm", "ln1"),
                     ("post_attention_layernorm", "ln2"), ("r_norm.", "ln_r."), ("q_norm.", "ln_r."),
                     ("k_norm.", "ln_k.")]:
        key = key.replace(old, new)
    if flat and value is not None and key.rsplit(".", 1)[-1] in (*HXA079_BIASES, "r_k"):
        value = value.reshape(-1)
    return key, value


def _save_pth(model, path, flat=False):
    sd = dict(_pth_name(k, flat, v) for k, v in model.state_dict().items())
    cfg = model.config
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_gqa(i):
            sd[f"blocks.{i}.att.layer_architecture"] = torch.tensor(78.0)
            sd[f"blocks.{i}.att.head_size_record"] = torch.tensor(float(cfg.head_size))
    torch.save(sd, path)
    return sd


def _same_tensors(sd_a, sd_b):
    assert sorted(sd_a) == sorted(sd_b)
    for k in sd_a:
        a, b = sd_a[k], sd_b[k]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k


def _logits_of(model, cfg, seed=1):
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)[0]


# =================================================================================================
# 3.1  Round trips


@_FILE_SETTINGS
@given(gqa=st.sets(st.integers(0, 3), max_size=2), qk_norm=st.booleans(), bias=st.booleans(), tie=st.booleans(),
       flat=st.booleans(), shard_kib=st.sampled_from([None, 8, 40, 1000]))
def test_pth_to_hf_round_trip_is_exact(tmp_path_factory, gqa, qk_norm, bias, tie, flat, shard_kib):
    tmp = tmp_path_factory.mktemp("rt")
    model = random_model({**TINY, "transformer_layers": sorted(gqa), "enable_qk_norm": qk_norm,
                        "attention_bias": bias, "tie_word_embeddings": tie}, dtype=torch.float32)
    cfg = model.config
    _save_pth(model, tmp / "m.pth", flat)
    if flat and not qk_norm and len(gqa) < 4:       # a flat r_k and no per-head norm: the head size must be given
        with pytest.raises(ValueError, match=r"cannot infer num_attention_heads, num_key_value_heads, head_dim"):
            load_checkpoint(tmp / "m.pth", EPS_THETA)
    got_cfg, sd = load_checkpoint(tmp / "m.pth", {**EPS_THETA, "head_dim": 12})
    assert got_cfg == cfg
    assert isinstance(sd, LazyStateDict)
    _same_tensors(dict(sd), model.state_dict())
    summary = save_checkpoint(tmp / "hf", got_cfg, sd, max_shard_bytes=shard_kib and shard_kib * 1024)
    cfg2, sd2 = load_checkpoint(tmp / "hf")
    written = {**cfg.to_dict(), "dtype": "float32"}                  # + the dtype the tensors were written in
    assert cfg2 == HRWKV7Config.from_dict(written) and json.loads((tmp / "hf" / "config.json").read_text()) == written
    _same_tensors(dict(sd2), model.state_dict())
    assert (len(summary["files"]) > 1) == (tmp / "hf" / "model.safetensors.index.json").exists()
    loaded = HRWKV7ForCausalLM.from_pretrained(tmp / "hf")
    assert torch.equal(_logits_of(loaded, cfg), _logits_of(model, cfg))


def test_ln_r_becomes_q_norm_in_gqa_layers_and_r_norm_in_rwkv_layers(tmp_path):
    model = random_model({**TINY, "transformer_layers": [1], "enable_qk_norm": True}, dtype=torch.float32)
    pth = _save_pth(model, tmp_path / "m.pth")
    assert "blocks.1.att.ln_r.weight" in pth and "blocks.0.att.ln_r.weight" in pth
    _, sd = load_checkpoint(tmp_path / "m.pth", EPS_THETA)
    assert torch.equal(sd["model.layers.1.self_attn.q_norm.weight"], pth["blocks.1.att.ln_r.weight"])
    assert torch.equal(sd["model.layers.0.self_attn.r_norm.weight"], pth["blocks.0.att.ln_r.weight"])
    assert torch.equal(sd["model.layers.1.self_attn.k_norm.weight"], pth["blocks.1.att.ln_k.weight"])
    assert not any("layer_architecture" in k or "head_size_record" in k for k in sd)


def test_flat_vectors_are_reshaped(tmp_path):
    model = random_model(TINY, dtype=torch.float32)
    cfg = model.config
    _save_pth(model, tmp_path / "m.pth", flat=True)
    _, sd = load_checkpoint(tmp_path / "m.pth", {**EPS_THETA, "num_attention_heads": 4})
    assert sd.ref("model.layers.0.self_attn.w0").shape == (1, 1, 48)
    assert sd["model.layers.0.self_attn.r_k"].shape == (4, 12)
    # the same in an HF file
    hf_sd = {k: (v.reshape(-1) if k.rsplit(".", 1)[-1] in (*HXA079_BIASES, "r_k") else v)
             for k, v in model.state_dict().items()}
    save_hf(tmp_path / "hf", cfg, hf_sd)
    _, sd = load_checkpoint(tmp_path / "hf")
    _same_tensors(dict(sd), model.state_dict())


def test_sharded_layout_is_hf_format(tmp_path):
    model = random_model({**TINY, "transformer_layers": [0, 3]}, dtype=torch.float32)
    cfg = model.config
    limit = 30_000
    summary = save_checkpoint(tmp_path / "out", cfg, model.state_dict(), max_shard_bytes=limit)
    n = len(summary["files"])
    assert n > 2 and summary["files"] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    sd = model.state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(summary["files"])
    merged = {}
    for f in summary["files"]:
        part = load_file(str(tmp_path / "out" / f))                 # safetensors' own reader
        assert sum(t.numel() * t.element_size() for t in part.values()) <= limit or len(part) == 1
        with safe_open(str(tmp_path / "out" / f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
        merged.update(part)
    _same_tensors(merged, sd)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]                  # no temporary directory left


def test_dtype_cast_bf16_and_float64_loading(tmp_path):
    model = random_model({**TINY, "enable_qk_norm": True, "attention_bias": True}, dtype=torch.float32)
    cfg = model.config
    save_hf(tmp_path / "src", cfg, model.state_dict(), shards=3)
    _, sd = load_checkpoint(tmp_path / "src")
    save_checkpoint(tmp_path / "bf16", HRWKV7Config.from_dict({**cfg.to_dict(), "torch_dtype": "float32"}), sd,
                    dtype=torch.bfloat16, max_shard_bytes=50_000)
    written = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "bfloat16"   # what HF tools read, not the source's
    _, sd16 = load_checkpoint(tmp_path / "bf16")
    _same_tensors(dict(sd16), {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    m64 = HRWKV7ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.state_dict().values())
    assert all(torch.equal(p, model.state_dict()[k].to(torch.bfloat16).double()) for k, p in m64.state_dict().items())
    assert _logits_of(m64, cfg).dtype == torch.float64


def test_single_safetensors_file_config_from_arg_beside_or_shapes(tmp_path):
    model = random_model({**TINY, "tie_word_embeddings": True}, dtype=torch.float32)
    cfg = model.config
    save_hf(tmp_path / "a", cfg, model.state_dict(), write_config=False)
    f = tmp_path / "a" / "model.safetensors"
    with pytest.raises(ValueError, match=r"cannot infer rms_norm_eps, rope_theta;"):
        load_checkpoint(f)
    got, sd = load_checkpoint(f, EPS_THETA)                  # everything else from the shapes
    assert got == cfg
    got, _ = load_checkpoint(f, cfg)
    assert got == cfg
    d = {**cfg.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "my_key": [1]}
    del d["rope_theta"]                                             # as transformers >= 5 writes it
    (tmp_path / "a" / "config.json").write_text(json.dumps(d))
    got, _ = load_checkpoint(f)                                     # config.json beside it, unknown keys kept
    assert got.rope_theta == 5e5 and got.extra == {"my_key": [1]}


def test_no_rwkv_layer_needs_the_head_size(tmp_path):
    model = random_model({**TINY, "transformer_layers": [0, 1, 2, 3]}, dtype=torch.float32)
    _save_pth(model, tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"cannot infer num_attention_heads, num_key_value_heads, head_dim"):
        load_checkpoint(tmp_path / "m.pth", EPS_THETA)
    for extra in ({"num_attention_heads": 4}, {"head_dim": 12}):
        got, sd = load_checkpoint(tmp_path / "m.pth", {**EPS_THETA, **extra})
        assert (got.num_attention_heads, got.num_key_value_heads, got.head_size) == (4, 2, 12)
        _same_tensors(dict(sd), model.state_dict())


def test_cli_converts_pth_with_set_dtype_shards_and_force(tmp_path, capsys):
    model = random_model(TINY, dtype=torch.float32)
    _save_pth(model, tmp_path / "m.pth")
    argv = [str(tmp_path / "m.pth"), str(tmp_path / "out"), "--set", "rms_norm_eps=1e-5", "--set", "rope_theta=1e4",
            "--set", "note=hello", "--dtype", "bfloat16", "--max-shard-size", "60kB"]
    summary = convert._run(argv)                                      # the command without the error convention
    out = capsys.readouterr().out
    assert "3 RWKV + 1 GQA" in out and f"{sum(p.numel() for p in model.parameters()):,}" in out
    assert str(summary["bytes_written"]) in out.replace(",", "")
    assert summary["bytes_written"] == sum(os.path.getsize(tmp_path / "out" / f) for f in summary["files"])
    got, sd = load_checkpoint(tmp_path / "out")
    assert got.extra == {"note": "hello", "dtype": "bfloat16"} and len(summary["files"]) > 1
    _same_tensors(dict(sd), {k: v.bfloat16() for k, v in model.state_dict().items()})
    with pytest.raises(FileExistsError, match="--force"):
        convert._run(argv)
    convert.main(argv[:-4] + ["--force"])                            # float32, one file, through the command
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000


# =================================================================================================
# 3.2  Bad checkpoints and outputs: every one refused with an error that names it


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABS", "sub/outside.safetensors", "..", "link"])
def test_index_entry_must_be_a_bare_file_name(tmp_path, entry):
    # the rule: a bare file name of the directory; a link the directory's owner made is followed
    model = random_model(TINY, dtype=torch.float32)
    cfg = model.config
    ckpt = save_hf(tmp_path / "ckpt", cfg, model.state_dict(), shards=2)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    moved = [k for k, f in index["weight_map"].items() if f == "model-00002-of-00002.safetensors"]
    os.rename(ckpt / "model-00002-of-00002.safetensors", tmp_path / "outside.safetensors")
    os.makedirs(ckpt / "sub")
    os.symlink(tmp_path / "outside.safetensors", ckpt / "sub" / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", ckpt / "link.safetensors")
    entry = {"ABS": str(tmp_path / "outside.safetensors"), "link": "link.safetensors"}.get(entry, entry)
    index["weight_map"].update({k: entry for k in moved})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    if entry == "link.safetensors":
        ids = torch.tensor([[1, 2, 3]])
        assert torch.equal(HRWKV7ForCausalLM.from_pretrained(ckpt)(ids)[0], model(ids)[0])
        return
    for load in (load_checkpoint, HRWKV7ForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=rf"weight_map entry '{re.escape(moved[0])}'.*not a bare file name"):
            load(ckpt)


def test_missing_unexpected_and_wrong_shape_name_the_tensor(tmp_path):
    model = random_model(TINY, dtype=torch.float32)
    cfg = model.config
    sd = model.state_dict()
    bad = {k: v for k, v in sd.items() if k != "model.layers.3.mlp.up_proj.weight"}
    bad["model.layers.0.self_attn.bonus"] = torch.zeros(3)
    bad["model.norm.weight"] = torch.ones(47)
    save_hf(tmp_path / "bad", cfg, bad)
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path / "bad")
    msg = str(e.value)
    assert "missing tensor model.layers.3.mlp.up_proj.weight" in msg
    assert "unexpected tensor model.layers.0.self_attn.bonus" in msg
    assert "model.norm.weight: checkpoint (47,) vs model (48,)" in msg
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.3\.mlp\.up_proj\.weight"):
        save_checkpoint(tmp_path / "out", cfg, bad)
    assert not (tmp_path / "out").exists()


def test_integer_or_bool_weights_are_refused(tmp_path):
    model = random_model(TINY, dtype=torch.float32)
    cfg = model.config
    sd = dict(model.state_dict())
    sd["model.layers.1.self_attn.w1"] = sd["model.layers.1.self_attn.w1"].to(torch.int32)
    sd["model.norm.weight"] = sd["model.norm.weight"] > 0
    save_hf(tmp_path / "ints", cfg, sd)
    with pytest.raises(ValueError, match=r"(?s)cannot be cast.*model\.layers\.1\.self_attn\.w1: torch\.int32.*"
                                         r"model\.norm\.weight: torch\.bool"):
        load_checkpoint(tmp_path / "ints")
    with pytest.raises(ValueError, match=r"model\.norm\.weight: torch\.bool"):
        save_checkpoint(tmp_path / "out", cfg, sd)


def test_truncated_or_corrupt_safetensors_names_the_file(tmp_path):
    model = random_model(TINY, dtype=torch.float32)
    cfg = model.config
    ckpt = save_hf(tmp_path / "ckpt", cfg, model.state_dict(), shards=3)
    shard = ckpt / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors: not a valid safetensors file"):
        load_checkpoint(ckpt)
    shard.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors: not a valid safetensors file"):
        load_checkpoint(ckpt)


def test_config_contradicting_the_weights_names_field_and_values(tmp_path):
    model = random_model({**TINY, "transformer_layers": [2]}, dtype=torch.float32)
    cfg = model.config
    _save_pth(model, tmp_path / "m.pth")
    for override, pattern in [({"num_key_value_heads": 4}, r"num_key_value_heads=4 but the weights say 2"),
                              ({"hidden_size": 64}, r"hidden_size=64 but the weights say 48"),
                              ({"transformer_layers": [1]}, r"transformer_layers=\[1\] but the weights say \[2\]"),
                              ({"head_dim": 6}, r"head_dim=6 but the weights say 12 \(.*r_k \[4, 12\]\)"),
                              ({"num_attention_heads": 8}, r"num_attention_heads=8 but the weights say 4"),
                              ({"tie_word_embeddings": True}, r"tie_word_embeddings=True but the weights say False"),
                              ({"lora_rank_gate": 16}, r"lora_rank_gate=16 but the weights say 8")]:
        with pytest.raises(ValueError, match=pattern):
            load_checkpoint(tmp_path / "m.pth", {**EPS_THETA, **override})
    save_hf(tmp_path / "hf", {**cfg.to_dict(), "enable_qk_norm": True}, model.state_dict())
    with pytest.raises(ValueError, match=r"enable_qk_norm=True but the weights say False"):
        load_checkpoint(tmp_path / "hf")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pth_whose_pickle_would_run_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = {"emb.weight": torch.zeros(4, 2), "blocks.0.att.r_k": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, tmp_path / "evil.pth")
    else:
        with open(tmp_path / "evil.pth", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(ValueError, match=r"evil\.pth: cannot be loaded as a weights-only torch checkpoint"):
        load_checkpoint(tmp_path / "evil.pth", EPS_THETA)
    assert not marker.exists()


def test_written_files_get_the_usual_permissions(tmp_path):
    model = random_model(TINY, dtype=torch.float32)
    cfg = model.config
    save_checkpoint(tmp_path / "out", cfg, model.state_dict(), max_shard_bytes=20_000)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path / "out"):
        assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o666 & ~umask, name
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask


def test_existing_output_is_kept_without_overwrite(tmp_path):
    model = random_model(TINY, dtype=torch.float32)
    cfg = model.config
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(tmp_path / "out", cfg, model.state_dict())
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    save_checkpoint(tmp_path / "out", cfg, model.state_dict(), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failure_while_writing_leaves_nothing_half_written(tmp_path):
    model = random_model(TINY, dtype=torch.float32)
    cfg = model.config
    sd = dict(model.state_dict())

    def boom():
        raise OSError("disk went away")
    key = "model.layers.3.mlp.down_proj.weight"
    sd[key] = TensorRef(tuple(sd[key].shape), torch.float32, boom, key)
    with pytest.raises(OSError, match="disk went away"):
        save_checkpoint(tmp_path / "out", cfg, sd, max_shard_bytes=20_000)
    assert os.listdir(tmp_path) == []
    # an existing checkpoint survives a failed overwrite
    save_checkpoint(tmp_path / "out", cfg, model.state_dict())
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "out", cfg, sd, overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before and os.listdir(tmp_path) == ["out"]
    # a source shard damaged after the (lazy) load: the error names it, nothing is written
    save_hf(tmp_path / "src", cfg, model.state_dict(), shards=2)
    _, lazy = load_checkpoint(tmp_path / "src")
    shard = tmp_path / "src" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors: not a valid safetensors file"):
        save_checkpoint(tmp_path / "new", cfg, lazy)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


# =================================================================================================
# 3.3  Initialisation from a teacher (written with safetensors: no transformers needed)


# convert's own teachers, 4 layers, written with safetensors (make_teacher(..., writer="safetensors")) in the
# layout transformers < 5 wrote (top-level rope_theta): a Llama, a Qwen2 (q/k/v biases, no flag, tied
# head), a Qwen3 (q_norm/k_norm, head_dim 12 != hidden_size / heads)
CONVERT_TEACHER = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                       vocab_size=40, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096)
CONVERT_TEACHERS = {"llama": dict(arch="llama", attention_bias=False, **CONVERT_TEACHER),
                    "qwen2": dict(arch="qwen2", **{**CONVERT_TEACHER, "tie_word_embeddings": True}),
                    "qwen3": dict(arch="qwen3", head_dim=12, **CONVERT_TEACHER)}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_init_from_teacher(tmp_path, kind):
    make_teacher(tmp_path / "teacher", CONVERT_TEACHERS[kind], 4, dtype=torch.bfloat16, writer="safetensors")
    teacher = load_tensors(tmp_path / "teacher")
    init_from_teacher(tmp_path / "teacher", tmp_path / "student", [1], seed=3, max_shard_bytes=40_000)
    cfg, sd = load_checkpoint(tmp_path / "student")
    assert (cfg.rwkv_architecture, cfg.transformer_layers, cfg.num_hidden_layers) == ("hxa079", [1], 4)
    assert cfg.attention_bias == (kind == "qwen2") and cfg.enable_qk_norm == (kind == "qwen3")
    assert cfg.tie_word_embeddings == (kind == "qwen2") and cfg.head_size == (12 if kind == "qwen3" else 8)
    assert (cfg.rms_norm_eps, cfg.rope_theta) == (1e-6, 1e6)
    assert cfg.extra["model_type"] == "hrwkv7" and cfg.extra["architectures"] == ["HRWKV7ForCausalLM"]
    assert cfg.extra["max_position_embeddings"] == 4096                # the teacher's other keys are kept
    A = cfg.num_attention_heads * cfg.head_size
    assert {k: getattr(cfg, k) for k in default_lora_ranks(A)} == default_lora_ranks(A)
    shapes = {k: tuple(v.shape) for k, v in HRWKV7ForCausalLM(cfg).state_dict().items()}
    assert {k: sd.ref(k).shape for k in sd} == shapes and all(sd.ref(k).dtype == torch.bfloat16 for k in sd)
    scale = {"receptance": ("q_proj", 0.5), "key": ("k_proj", 0.5), "value": ("v_proj", 0.3),
             "output": ("o_proj", 0.5), "r_norm": ("q_norm", 1), "k_norm": ("k_norm", 1)}
    for key in sd:
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        name = key.split(".")[4] if ".self_attn." in key else None
        if name is None or layer == "1":                           # copied bit for bit
            assert torch.equal(sd[key], teacher[key]), key
        elif name in scale:
            src, s = scale[name]
            expect = (teacher[key.replace(name, src)].float() * s).bfloat16()
            assert torch.equal(sd[key], expect), key
    student = HRWKV7ForCausalLM.from_pretrained(tmp_path / "student")
    assert _logits_of(student, cfg).isfinite().all()


def test_teacher_init_values_follow_the_formulas(tmp_path):
    make_teacher(tmp_path / "teacher", CONVERT_TEACHERS["llama"], 4, dtype=torch.float32, writer="safetensors")
    init_from_teacher(tmp_path / "teacher", tmp_path / "s", [2], ranks={"lora_rank_decay": 16, "lora_rank_gate": 8},
                      qkvo_scale=(1, 1, 1, 1))
    cfg, sd = load_checkpoint(tmp_path / "s")
    teacher = load_tensors(tmp_path / "teacher")
    for old, new in [("q_proj", "receptance"), ("k_proj", "key"), ("v_proj", "value"), ("o_proj", "output")]:
        p = "model.layers.0.self_attn."
        assert torch.equal(sd[f"{p}{new}.weight"], teacher[f"{p}{old}.weight"])
    assert (cfg.lora_rank_decay, cfg.lora_rank_gate, cfg.lora_rank_iclr) == (16, 8, 32)
    A, N, L = 32, 8, 4
    for layer in (0, 3):
        p = f"model.layers.{layer}.self_attn."
        w0, a0 = sd[p + "w0"][0, 0].double(), sd[p + "a0"][0, 0].double()
        ratio = layer / (L - 1)
        # channel 0: zigzag -1, linear -0.5; channel A-1: zigzag +1, linear +0.5
        assert w0[0].item() == pytest.approx(-6 + 0.5 - 2.5, abs=1e-6)
        assert w0[-1].item() == pytest.approx(-6 + 6 + 0.5 + 2.5, abs=1e-6)
        zigzag9 = -(5 / 7) ** 2                                    # channel 9: (9 mod 8) = 1, z = (1 - 3.5) / 3.5
        expect = -6 + 6 * (9 / 31) ** (1 + ratio ** 0.3) + 0.5 + 2.5 * zigzag9
        assert w0[9].item() == pytest.approx(expect, abs=1e-6)
        assert a0[0].item() == pytest.approx(-0.19 - 0.3 - 0.2, abs=1e-6)
        assert a0[-1].item() == pytest.approx(-0.19 + 0.3 + 0.2, abs=1e-6)
        assert torch.all(sd[p + "v0"] == torch.tensor(0.73)) and torch.all(sd[p + "k0"] == torch.tensor(0.73))
        assert torch.all(sd[p + "r_k"] == torch.tensor(-0.04)) and sd[p + "r_k"].shape == (4, N)
        for z in ("w1", "a1", "v1", "k1", "g1"):
            assert not sd[p + z].any()
        for m, rows, cols in [("w2", 16, A), ("a2", 32, A), ("v2", 32, 16), ("k2", 32, 16), ("g2", 8, A)]:
            w = sd[p + m].double()
            assert w.shape == (rows, cols)
            gram, eye = (w.T @ w, torch.eye(cols)) if rows > cols else (w @ w.T, torch.eye(rows))
            gain = (rows / cols) if rows > cols else 1.0
            assert torch.allclose(gram, 0.01 * gain * eye.double(), atol=1e-6), m
    assert not torch.equal(sd["model.layers.0.self_attn.w2"], sd["model.layers.3.self_attn.w2"])
    # the seed decides the random matrices, and nothing else does
    assert torch.equal(hxa079_init("g2", 3, cfg, seed=5), hxa079_init("g2", 3, cfg, seed=5))
    assert not torch.equal(hxa079_init("g2", 3, cfg, seed=5), hxa079_init("g2", 3, cfg, seed=6))


def test_teacher_problems_and_cli(tmp_path, capsys):
    assert default_lora_ranks(6144) == {"lora_rank_decay": 320, "lora_rank_iclr": 128,
                                        "lora_rank_value_residual_mix": 96, "lora_rank_key_residual_mix": 96,
                                        "lora_rank_gate": 384}
    make_teacher(tmp_path / "t", CONVERT_TEACHERS["llama"], 4, dtype=torch.bfloat16, writer="safetensors")
    tc, sd = read_json(tmp_path / "t" / "config.json"), load_tensors(tmp_path / "t")
    convert.main(["from-teacher", str(tmp_path / "t"), str(tmp_path / "s"), "--transformer-layers", "1,3",
                  "--seed", "2"])
    assert "2 RWKV + 2 GQA  (RGRG" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "s")[0].transformer_layers == [1, 3]
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_hf(tmp_path / "obias", tc, sd)
    with pytest.raises(ValueError, match="o_proj biases"):
        init_from_teacher(tmp_path / "obias", tmp_path / "x", [1])
    del sd["model.layers.0.self_attn.o_proj.bias"]
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(5, 32)
    sd["model.vision.weight"] = torch.zeros(2)
    save_hf(tmp_path / "bad", tc, sd)
    with pytest.raises(ValueError, match=r"(?s)model\.layers\.2\.mlp\.up_proj\.weight has shape \(5, 32\), expected "
                                         r"\(48, 32\).*model\.vision\.weight has no place"):
        init_from_teacher(tmp_path / "bad", tmp_path / "x", [1])
    with pytest.raises(ValueError, match=r"lacks rope_theta"):
        save_hf(tmp_path / "nocfg", {k: v for k, v in tc.items() if k != "rope_theta"}, {})
        init_from_teacher(tmp_path / "nocfg", tmp_path / "x", [1])
    assert not (tmp_path / "x").exists()


# =================================================================================================
# 4  The command lines: hrwkv7 (hrwkv7_cli.py) and hrwkv7-convert (convert.py)


# =================================================================================================
# 4.1  Stop strings that span several tokens


def cli_checkpoint(path, config=TINY, seed=0):
    """A tiny random float32 model saved as an HF directory by convert.py; (path, model)."""
    model = random_model(config, seed, dtype=torch.float32)
    convert.save_checkpoint(path, model.config, model.state_dict())
    return path, model


PROMPT_IDS = [5, 6, 7]
STOP_PIECES = ["<", "se", "p>"]          # "<sep>" in three tokens, as a cl100k_base-style tokenizer may split it


@pytest.fixture(scope="module")
def sep_checkpoint(tmp_path_factory):
    """A checkpoint whose greedy continuation of PROMPT_IDS, decoded with its tokenizer.json, holds
    "<sep>" spread over three tokens. The model is random; the tokenizer is built afterwards around
    what it generates: three consecutive generated ids (first seen there) get the pieces "<", "se",
    "p>", every other id the piece "w{id}." (no piece is found inside a concatenation of others but
    at its own place); the decoder joins pieces without spaces (decoders.Fuse).
    Returns (path, generated ids, j) with generated[j:j + 3] the stop string's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    path, model = cli_checkpoint(tmp_path_factory.mktemp("sep") / "ckpt", seed=11)
    gen = model.generate(torch.tensor([PROMPT_IDS]), 16, temperature=0)[0, len(PROMPT_IDS):].tolist()
    j = next(j for j in range(2, len(gen) - 2) if len(set(gen[j:j + 3])) == 3
             and not set(gen[j:j + 3]) & set(gen[:j] + PROMPT_IDS))
    pieces = {i: f"w{i}." for i in range(TINY["vocab_size"])}
    pieces.update(zip(gen[j:j + 3], STOP_PIECES))
    tok = Tokenizer(models.WordLevel({p: i for i, p in pieces.items()}, unk_token=pieces[PROMPT_IDS[0]]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    assert tok.decode(gen[j:j + 3]) == "<sep>" and "<" not in tok.decode(gen[:j])
    return path, gen, j, tok


def run_cli(capsys, path, *extra):
    ids = hrwkv7_cli.main(["--model", str(path), "--prompt", "w5. w6. w7.", "--temperature", "0",
                           "--max-new-tokens", "16", "--device", "cpu", *extra])
    out, err = capsys.readouterr()
    return ids, out, err


def test_compile_flag_compiles_the_decode_step(sep_checkpoint, capsys, monkeypatch):
    """--compile loads with from_pretrained(compile=True): compile_decode is called once, and the
    generated ids are the same (compile_decode is replaced by a recorder: no compile here; the
    compiled step's numbers are test_ref's test_compiled_decode_equals_eager)."""
    path, *_ = sep_checkpoint
    calls = []
    monkeypatch.setattr(HRWKV7ForCausalLM, "compile_decode", lambda self: calls.append(self) or self)
    plain, *_ = run_cli(capsys, path)
    assert calls == []
    compiled, *_ = run_cli(capsys, path, "--compile")
    assert len(calls) == 1 and compiled == plain


def test_stop_string_over_several_tokens_ends_generation_and_is_not_printed(sep_checkpoint, capsys):
    path, gen, j, tok = sep_checkpoint
    ids, out, err = run_cli(capsys, path, "--stop", "<sep>")
    assert out == tok.decode(gen[:j]) + "\n"                 # nothing of "<sep>" was written, not even "<"
    assert ids == PROMPT_IDS + gen[:j + 3]                   # generation ended with the token completing it
    assert f"decode {j + 2} tokens" in err
    ids, out, _ = run_cli(capsys, path)                     # without --stop: "<sep>" is printed, 16 tokens
    assert "<sep>" in out and len(ids) == len(PROMPT_IDS) + 16


def test_stop_is_repeatable_and_generation_config_stop_strings_count(sep_checkpoint, capsys, tmp_path):
    path, gen, j, tok = sep_checkpoint
    early = tok.decode(gen[1:2])                             # a one-token stop string before "<sep>"
    ids, out, _ = run_cli(capsys, path, "--stop", "<sep>", "--stop", early)
    assert out == tok.decode(gen[:1]) + "\n" and ids == PROMPT_IDS + gen[:2]
    ids, out, _ = run_cli(capsys, path, "--stop", "never there", "--stop", "<sep>")
    assert out == tok.decode(gen[:j]) + "\n" and ids == PROMPT_IDS + gen[:j + 3]
    # the same checkpoint with generation_config.json's stop_strings (a list, or one string), no --stop
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for name in os.listdir(path):
        (copy / name).write_bytes((path / name).read_bytes())
    for stops in (["never there", "<sep>"], "<sep>"):
        (copy / "generation_config.json").write_text(json.dumps({"stop_strings": stops}))
        ids, out, _ = run_cli(capsys, copy)
        assert out == tok.decode(gen[:j]) + "\n" and ids == PROMPT_IDS + gen[:j + 3]
    assert hrwkv7_cli.stop_strings(copy) == ["<sep>"]
    # EOS ids still stop, and the EOS token is not printed
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": gen[2], "stop_strings": ["<sep>"]}))
    ids, out, _ = run_cli(capsys, copy)
    assert out == tok.decode(gen[:2]) + "\n" and ids == PROMPT_IDS + gen[:3]


def test_text_stream_holds_back_only_what_may_still_become_a_stop_string(sep_checkpoint):
    _, gen, j, tok = sep_checkpoint
    lt, se, p = gen[j:j + 3]
    other = next(i for i in range(TINY["vocab_size"]) if i not in (lt, se, p))
    writes = []
    stream = hrwkv7_cli.TextStream(tok, ["<sep>"], write=writes.append)
    assert not stream.add(other) and writes == [f"w{other}."]
    assert not stream.add(lt) and not stream.add(se) and writes == [f"w{other}."]   # "<se" held back
    assert not stream.add(other) and writes == [f"w{other}.", f"<sew{other}."]      # no longer a stop: written
    assert not stream.add(lt) and not stream.add(se) and stream.add(p)              # "<sep>" completed
    assert "".join(writes) == f"w{other}.<sew{other}." and stream.stopped
    stream = hrwkv7_cli.TextStream(tok, ["<sep>"], write=writes.append)
    writes.clear()
    stream.add(lt)
    stream.finish()                                          # the end: what was held back is written
    assert writes == ["<"]


def test_text_stream_holds_back_a_character_whose_bytes_are_incomplete():
    # a byte-level tokenizer (one token per byte): "é" is two tokens, and the first decodes to U+FFFD
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ids = tok.encode("aé<sep>b").ids
    assert len(ids) == 9 and tok.decode(ids[:2]) == "a\ufffd"
    writes = []
    stream = hrwkv7_cli.TextStream(tok, ["<sep>"], write=writes.append)
    assert [stream.add(i) for i in ids[:8]] == [False] * 7 + [True]
    assert writes == ["a", "é"]                               # never the replacement character, nothing of "<sep>"


# =================================================================================================
# 4.2  One error convention for both commands (command_line.py): a bad path, repo id, dtype or
# device, a checkpoint that does not match its config, an optional package that is not installed:
# one line `error: ...` on stderr, exit status 2; --debug for the traceback


def one_error_line(err, *names):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_bad_path_dtype_device_one_line_exit_2_in_both_commands(tmp_path, capsys):
    path, _ = cli_checkpoint(tmp_path / "ckpt")
    nope = str(tmp_path / "nope")
    for argv, names in [(["--model", nope], [nope]),
                        (["--model", str(path), "--dtype", "float8"], ["--dtype", "float8"]),
                        (["--model", str(path), "--device", "cuda:7"], ["--device", "cuda:7"]),
                        (["--model", str(path), "--device", "gpu0"], ["--device", "gpu0"]),
                        (["--model", str(path), "--top-p", "0"], ["--top-p"]),
                        (["--prompt", "hi"], ["--model"])]:
        with pytest.raises(SystemExit) as exit_:
            hrwkv7_cli.main(argv)
        assert exit_.value.code == 2, argv
        one_error_line(capsys.readouterr().err, *names)
    for argv, names in [([nope, str(tmp_path / "out")], [nope]),
                        ([str(path), str(tmp_path / "out"), "--dtype", "int8"], ["--dtype", "int8"]),
                        ([str(path), str(tmp_path / "out"), "--set", "rms_norm_eps"], ["--set", "rms_norm_eps"]),
                        ([str(path), str(path)], [str(path), "--force"])]:
        with pytest.raises(SystemExit) as exit_:
            convert.main(argv)
        assert exit_.value.code == 2, argv
        one_error_line(capsys.readouterr().err, *names)
    with pytest.raises(FileNotFoundError, match="nope"):                    # --debug: the exception itself
        hrwkv7_cli.main(["--model", nope, "--debug"])
    with pytest.raises(ValueError, match="cuda:7"):
        hrwkv7_cli.main(["--model", str(path), "--device", "cuda:7", "--debug"])
    with pytest.raises(FileNotFoundError, match="nope"):
        convert.main([nope, str(tmp_path / "out"), "--debug"])


def test_bad_repo_id_offline_one_line_exit_2_no_traceback(tmp_path):
    pytest.importorskip("huggingface_hub")
    (tmp_path / "hub").mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for command in ([sys.executable, "hrwkv7_cli.py", "--model", "owner/not-there"],
                    [sys.executable, "convert.py", "owner/not-there", str(tmp_path / "out")]):
        run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE)
        assert run.returncode == 2, run.stderr
        one_error_line(run.stderr, "owner/not-there", "HF_HUB_OFFLINE='1'")
        run = subprocess.run(command + ["--debug"], capture_output=True, text=True, env=env, cwd=HERE)
        assert run.returncode == 1 and "Traceback" in run.stderr and "owner/not-there" in run.stderr


def test_an_error_of_several_lines_is_printed_as_one_line(tmp_path, capsys):
    """A checkpoint lacking two tensors: the error names each on a line of its own; both commands
    print it as exactly one stderr line `error: ...` naming both, exit status 2."""
    path, _ = cli_checkpoint(tmp_path / "ckpt")
    sd = load_tensors(path)
    missing = ["model.layers.0.self_attn.w1", "model.layers.3.mlp.up_proj.weight"]
    bad = save_hf(tmp_path / "bad", read_json(path / "config.json"), {k: v for k, v in sd.items() if k not in missing})
    for command, argv in ((hrwkv7_cli.main, ["--model", str(bad), "--device", "cpu", "--prompt", "5 6"]),
                          (convert.main, [str(bad), str(tmp_path / "out")])):
        with pytest.raises(ValueError) as e:                              # what is raised: several lines
            command(argv + ["--debug"])
        assert len(str(e.value).splitlines()) > 2 and all(name in str(e.value) for name in missing)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            command(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, (argv, err)
        one_error_line(err, *missing)


@pytest.mark.parametrize("package", ["huggingface_hub", "accelerate"])
def test_a_missing_optional_package_is_one_line_exit_2(tmp_path, capsys, monkeypatch, package):
    """With huggingface_hub (for a repo id) or accelerate (for --device-map) not importable, the
    commands say so in one `error:` line naming the package, exit status 2, not a traceback."""
    monkeypatch.setitem(sys.modules, package, None)                       # `import package` raises ImportError
    if package == "huggingface_hub":
        runs = [(hrwkv7_cli.main, ["--model", "owner/not-there"]),
                (convert.main, ["owner/not-there", str(tmp_path / "out")])]
    else:
        path, _ = cli_checkpoint(tmp_path / "ckpt")
        runs = [(hrwkv7_cli.main, ["--model", str(path), "--device-map", "auto", "--prompt", "5 6"])]
    for command, argv in runs:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            command(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (argv, err)
        one_error_line(err, package, f"pip install {package}")


# =================================================================================================
# 5  The installed package (pyproject.toml): `pip install .` gives the five modules and the
# two commands
#
# A wheel is built from a copy of the checkout, installed into a fresh venv that sees the
# dependencies already installed here, and used from a folder outside the checkout. Nothing is
# downloaded: the build reuses this interpreter's setuptools (--no-build-isolation), the install
# is --no-index --no-deps, and the new venv reaches torch & co. through a .pth file.


PKG_REPO = os.path.dirname(os.path.abspath(__file__))
PKG_MODULES = {"hrwkv7_ref", "wkv_kernel", "hrwkv7_cli", "convert", "command_line"}
PKG_COMMANDS = {"hrwkv7", "hrwkv7-convert"}
PKG_CORE_DEPS = {"torch", "numpy", "einops", "safetensors", "tqdm", "tokenizers", "triton"}


def _offline_wheel_builder_missing():
    """Why a wheel cannot be built here without the network, or None when it can."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools (the build backend) is not installed: pip install 'setuptools>=70.1'"
    import setuptools
    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    if version < (61,):
        return f"setuptools {setuptools.__version__} cannot read pyproject.toml's [project] table; needs >=61"
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        return (f"setuptools {setuptools.__version__} needs the `wheel` package to build a wheel; "
                f"pip install 'setuptools>=70.1' (or wheel)")
    return None


def _clean_env():
    """The environment of the subprocesses: no PYTHONPATH (the checkout must not leak in), no pip config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _start(args, cwd):
    return subprocess.Popen(args, cwd=cwd, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p, timeout=180):
    """The stdout of a process started by _start; its command, exit code and output in the failure."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    assert p.returncode == 0, f"{' '.join(map(str, p.args))} -> exit {p.returncode}\n{out}\n{err}"
    return out


def _run(args, cwd):
    return _finish(_start(args, cwd))


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory):
    why = _offline_wheel_builder_missing()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources, and other
    # runs share the checkout. The copy has every top-level file (tests, benches, ...) and the
    # notebooks, so the file list below shows that py-modules keeps them out; other folders
    # (.git, tmp/ with its checkpoints, caches) stay behind.
    src = tmp / "src"
    shutil.copytree(PKG_REPO, src, ignore=lambda folder, names: [
        n for n in names if folder == PKG_REPO and n != "notebooks" and os.path.isdir(os.path.join(folder, n))])
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
              "--no-cache-dir", "-w", tmp / "dist", src], cwd=tmp)
    (whl,) = (tmp / "dist").glob("hrwkv7-*.whl")
    return whl


def test_wheel_holds_the_five_modules_and_declares_the_commands(built_wheel):
    with zipfile.ZipFile(built_wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert {n for n in names if not n.startswith(dist_info + "/")} == {m + ".py" for m in PKG_MODULES}
        meta = z.read(f"{dist_info}/METADATA").decode().splitlines()
        entry_points = {line.strip() for line in z.read(f"{dist_info}/entry_points.txt").decode().splitlines()}
    requires = [line.split(":", 1)[1].strip() for line in meta if line.startswith("Requires-Dist:")]
    core = {re.match(r"[A-Za-z0-9_.-]+", r).group() for r in requires if "extra ==" not in r}
    assert core == PKG_CORE_DEPS
    assert {line.split(":", 1)[1].strip() for line in meta if line.startswith("Provides-Extra:")} == {
        "hub", "notebooks", "dev"}
    assert {"hrwkv7 = hrwkv7_cli:main", "hrwkv7-convert = convert:main"} <= entry_points


def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_checkout(built_wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    py = venv / "bin" / "python"          # POSIX layout, as on CI
    purelib, scripts = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib')); "
                                           "print(sysconfig.get_path('scripts'))"], cwd=tmp_path).splitlines()
    # The dependencies (and pip) come from this interpreter's site-packages, after the venv's own.
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if p in sys.path]
    with open(os.path.join(purelib, "_outer_site_packages.pth"), "w") as f:
        f.write("\n".join(outer) + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--no-compile",
              "--no-cache-dir", built_wheel], cwd=tmp_path)

    # Three interpreters that import torch: started together, they overlap their start-up.
    importing = _start([py, "-c", "import hrwkv7_ref, wkv_kernel, hrwkv7_cli, convert, command_line\n"
                                  "for m in (hrwkv7_ref, wkv_kernel, hrwkv7_cli, convert, command_line): "
                                  "print(m.__file__)"], cwd=tmp_path)
    helping = {command: _start([os.path.join(scripts, command), "--help"], cwd=tmp_path)
               for command in sorted(PKG_COMMANDS)}
    paths = _finish(importing).splitlines()
    assert len(paths) == len(PKG_MODULES), paths
    for path in paths:
        assert os.path.dirname(os.path.realpath(path)) == os.path.realpath(purelib), path
    for command, p in helping.items():
        out = _finish(p)
        assert out.startswith("usage:"), f"{command} --help:\n{out}"
