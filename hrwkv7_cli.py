"""
Run an hxa079 checkpoint from the command line (the `hrwkv7` command):

    python hrwkv7_cli.py --model DIR_OR_REPO_ID --prompt "Hello" [--chat] [--stop "<sep>"] [--dtype ...]

It loads the checkpoint (hrwkv7_ref.HRWKV7ForCausalLM.from_pretrained: a directory or an HF repo id,
--device or --device-map, --compute-dtype), tokenizes with the checkpoint's tokenizer.json (and,
with --chat, renders its chat template), streams the generated text as it is drawn, stops at the
EOS token(s) and at stop strings, and ends with the load time and the prefill and decode rates on
stderr. This module holds everything the model file does not: tokenizer, chat template, stop
conditions, streaming, timing, argparse. It imports hrwkv7_ref, never the other way round.

Stop conditions. EOS ids: generation_config.json's eos_token_id, else config.json's. Stop strings:
every --stop STRING, and generation_config.json's stop_strings when present. A stop string is looked
for in the decoded text, so it may span several tokens (with a cl100k_base-style tokenizer, "<sep>"
is text, not a special token); nothing of it is printed (TextStream holds back streamed text that
could still become a stop string), and generation ends with the token that completes it.

Bad input, one convention for both commands (`hrwkv7` here and `hrwkv7-convert` / `python convert.py`,
through command_line.run_command): a bad path, repo id, dtype, device or argument is one line `error: ...` naming
it on stderr and exit status 2, no traceback; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from command_line import ArgumentParser, run_command
from hrwkv7_ref import HRWKV7ForCausalLM, check_device, read_json, resolve_checkpoint

# -----------------------------------------------------------------------------
# Prompt and stop conditions, from the checkpoint's files


def chat_prompt(ckpt_dir, user_message: str) -> str:
    """The checkpoint's own chat template (tokenizer_config.json's chat_template, or chat_template.jinja)
    rendered with jinja2 as transformers renders it: a sandboxed environment with trim_blocks and
    lstrip_blocks, messages, add_generation_prompt=True, the special tokens, raise_exception."""
    tok_cfg = read_json(os.path.join(ckpt_dir, "tokenizer_config.json"), default={})
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):                                      # named templates: take "default"
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    jinja_file = os.path.join(ckpt_dir, "chat_template.jinja")
    if template is None and os.path.exists(jinja_file):
        with open(jinja_file) as f:
            template = f.read()
    if not template:
        raise ValueError(f"{ckpt_dir}: --chat needs a chat template, and neither tokenizer_config.json's "
                         f"chat_template nor chat_template.jinja has one")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"{ckpt_dir}: the chat template refused the conversation: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {key: (val.get("content") if isinstance(val, dict) else val) for key, val in tok_cfg.items()
               if key.endswith("_token")}
    return env.from_string(template).render(messages=[{"role": "user", "content": user_message}],
                                            add_generation_prompt=True, **special)


def eos_token_ids(ckpt_dir) -> list:
    """The EOS token id(s) of generation_config.json, else of config.json."""
    for name in ("generation_config.json", "config.json"):
        eos = read_json(os.path.join(ckpt_dir, name), default={}).get("eos_token_id")
        if eos is not None:
            return eos if isinstance(eos, list) else [eos]
    return []


def stop_strings(ckpt_dir) -> list:
    """generation_config.json's stop_strings (a string or a list of strings; [] when absent)."""
    stops = read_json(os.path.join(ckpt_dir, "generation_config.json"), default={}).get("stop_strings") or []
    stops = [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"{ckpt_dir}/generation_config.json: stop_strings must be a string or a list of "
                         f"strings, got {stops!r}")
    return stops


# -----------------------------------------------------------------------------
# Streaming with stop strings


class TextStream:
    """The text of generated tokens, written as it is decoded, ending before the first stop string.

    After each token the whole sequence is decoded again (a token's text can depend on its neighbours)
    and the new text is written, except a tail that must wait: the longest end of the text that is
    the start of a stop string (it may still become one), and a trailing U+FFFD (the decoder's mark
    for bytes of a character still incomplete). When a stop string appears, the text before it is
    written, nothing of it, and add() returns True; finish() writes what was held back."""

    def __init__(self, tokenizer, stops=(), write=None):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.write = write or (lambda text: print(text, end="", flush=True))
        self.ids, self.text, self.written, self.stopped = [], "", 0, False

    def add(self, token_id: int) -> bool:
        """Add one token; True once a stop string has appeared (generation should end)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids)
        start = max(0, self.written - max(map(len, self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self._write_to(min(hits))
            self.stopped = True
        else:
            self._write_to(len(self.text) - self._held_back())
        return self.stopped

    def finish(self):
        """Generation ended without a stop string: write the tail that was held back."""
        if not self.stopped:
            self._write_to(len(self.text))

    def _held_back(self) -> int:
        text = self.text
        n = len(text) - len(text.rstrip("\ufffd"))                      # an incomplete character
        for s in self.stops:
            n = max([n] + [k for k in range(1, len(s)) if text.endswith(s[:k])])
        return n

    def _write_to(self, end: int):
        if end > self.written:
            self.write(self.text[self.written:end])
            self.written = end


# -----------------------------------------------------------------------------
# Running a checkpoint


def run_checkpoint(model_path, prompt, *, chat=False, stop=(), dtype=None, compute_dtype=None, device=None,
                   device_map=None, revision=None, offload_folder=None, max_new_tokens=256, temperature=1.0,
                   top_p=0.9, seed=None, compile=False) -> list:
    """What `hrwkv7 --model ...` does: load, tokenize (the checkpoint's tokenizer.json and, with chat,
    its chat template), stream the generated text until an EOS id or a stop string (`stop` and
    generation_config.json's stop_strings), print load time and tokens/s to stderr. Returns the prompt
    ids + the ids drawn."""
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1, got "
                         f"{max_new_tokens}, {temperature}, {top_p}")
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_map is None:
        check_device(device, "--device")
    on_gpu = device_map is not None or torch.device(device).type != "cpu"
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    path = resolve_checkpoint(model_path, revision)
    tok_path = os.path.join(path, "tokenizer.json")
    stops = [*stop, *stop_strings(path)]
    if not os.path.exists(tok_path) and (chat or stop):
        raise ValueError(f"{path}: {'--chat' if chat else '--stop'} needs tokenizer.json")
    model = HRWKV7ForCausalLM.from_pretrained(path, dtype=dtype, device=device, device_map=device_map,
                                              offload_folder=offload_folder, compute_dtype=compute_dtype,
                                              progress=True, compile=compile)
    load_s = time.perf_counter() - t0
    if os.path.exists(tok_path):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tok_path)
        text = chat_prompt(path, prompt) if chat else prompt
        ids = tok.encode(text, add_special_tokens=not chat).ids          # a chat template writes its own BOS
        stream = TextStream(tok, stops)
    else:
        print("no tokenizer.json: the prompt is read as token ids" + (
            "; generation_config.json's stop_strings are not used" if stops else ""), file=sys.stderr)
        ids = [int(t) for t in prompt.split()]
        stream = None
    eos = eos_token_ids(path)
    new, times = [], []

    def on_token(nxt) -> bool:                                          # stream; True ends generation
        times.append(time.perf_counter())
        new.append(int(nxt[0, 0]))
        if new[-1] in eos:
            return True                                                 # generate stops there anyway
        if stream is None:
            print(f"{new[-1]} ", end="", flush=True)
            return False
        return stream.add(new[-1])
    t1 = time.perf_counter()
    model.generate(torch.tensor([ids], device=device if device_map is None else "cpu"), max_new_tokens,
                   temperature, top_p, seed=seed, eos_token_id=eos, on_token=on_token)
    if stream is not None:
        stream.finish()
    print()
    prefill_s = times[0] - t1                                           # prefill + the first token drawn
    decode = f"{(len(times) - 1) / (times[-1] - times[0]):.1f} tokens/s" if len(times) > 1 else "-"
    print(f"[load {load_s:.1f} s ({dtype}, {device if device_map is None else 'device_map'}; layers "
          f"{model.config.layer_kinds}); prefill {len(ids)} tokens at {len(ids) / prefill_s:.1f} tokens/s; "
          f"decode {len(times) - 1} tokens at {decode}]", file=sys.stderr)
    return ids + new


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(description="run an hxa079 checkpoint: stream the text it generates "
                                                   "(the demo on a tiny random model: python hrwkv7_ref.py)")
    ap.add_argument("--model", required=True, help="HF-layout checkpoint directory, or an HF repo id (owner/name)")
    ap.add_argument("--revision", help="the repo id's branch, tag or commit")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    ap.add_argument("--stop", action="append", default=[], metavar="STRING",
                    help="stop at this text (it may span tokens; not printed); repeatable; generation_config.json's "
                         "stop_strings are used too")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"],
                    help="weights' dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    ap.add_argument("--compute-dtype", choices=["float32", "float64"],
                    help="compute in this dtype, weights kept in --dtype (e.g. bfloat16 weights, float32 logits)")
    ap.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when there is one)")
    ap.add_argument("--compile", action="store_true",
                    help="compile the decode step with torch.compile (a minute or two at the first token; pays for "
                         "small models and --compute-dtype, see bench_model.py)")
    ap.add_argument("--device-map", help="'auto': spread the layers over the GPUs, the CPU and --offload-folder")
    ap.add_argument("--offload-folder", help="where --device-map may offload layers to disk")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int)
    return ap.parse_args(argv)


def _run(argv) -> list:
    args = parse_args(argv)
    return run_checkpoint(args.model, args.prompt, chat=args.chat, stop=args.stop,
                          dtype=args.dtype and getattr(torch, args.dtype),
                          compute_dtype=args.compute_dtype and getattr(torch, args.compute_dtype),
                          device=args.device, device_map=args.device_map, revision=args.revision,
                          offload_folder=args.offload_folder, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed, compile=args.compile)


def main(argv=None) -> list:
    """The `hrwkv7` command (bad input: one line `error: ...`, exit status 2; see run_command)."""
    return run_command(_run, argv)


if __name__ == "__main__":
    main()
