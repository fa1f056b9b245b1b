"""Which grammar library for structured output: per-token mask cost, llguidance against outlines-core.

    python -m benchmarks.bench_constrain TOKENIZER_JSON [TOKENIZER_JSON ...] [--steps 48] [--rounds 5]

    make bench-constrain    # the bundled model's engine and SmolLM2's 49k tokenizer

For each tokenizer and constraint (a JSON schema, a regex, a list of choices), both libraries walk
the same seeded random path through the grammar: each step computes the mask of allowed ids as a
numpy bool [V] (what the sampler applies) and consumes one allowed id. Reported: compile time and
per-step time (mask + consume), median and spread over the rounds, interleaved A/B in one process.
Both read the same token bytes (llguidance's view of the tokenizer), so only the matchers differ.
outlines-core compiles a JSON schema through its regex (build_regex_from_schema) into a
token-level automaton up front; llguidance runs an Earley parser over a lexer lazily per step.
Writes constrain.json and constrain.md under benchmarks/results/constrain/.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


from benchmarks.common import finish, machine_info
from vila_edge.constrain import JSON_OPTIONS, grammar_tokenizer

SCHEMA = {"type": "object", "properties": {
    "objects": {"type": "array", "items": {"type": "object", "properties": {
        "shape": {"enum": ["circle", "square", "triangle", "star"]},
        "color": {"enum": ["red", "green", "blue", "yellow"]},
        "cell": {"type": "integer", "minimum": 0, "maximum": 8}},
        "required": ["shape", "color", "cell"], "additionalProperties": False}, "maxItems": 4},
    "caption": {"type": "string", "maxLength": 40}},
    "required": ["objects", "caption"], "additionalProperties": False}
REGEX = r"(left|right|center) at [0-9]{1,3}(\.[0-9])? m, [a-z ]{1,30}"
CHOICES = ["yes", "no", "the red circle", "the blue square"]
DECISION = """## Decision: llguidance

- Both masks cost far less than a decode step (SmolLM2 int4 decodes ~60 tok/s here, ~17 ms a step;
  see benchmarks/results/smollm2-vila-fp32/peers.md): llguidance's median step is 0.2-1% of it.
- outlines-core's step is cheaper once compiled, but it compiles the whole schema into a token
  automaton first: hundreds of ms on a 49k vocabulary for this small schema, growing with the
  schema, and a server compiles every request's schema anew. llguidance compiles in ~1 ms.
- llguidance reads the engine's tokenizer.json itself (byte-level BPE, SentencePiece byte
  fallback; a small wrapper adds Metaspace), supports more of JSON Schema, and installs without
  torch (Rust). xgrammar was excluded before measuring: its wheel requires torch and transformers
  at install time (`pip install --dry-run xgrammar`).
- Jetson: `pip download --platform manylinux_2_28_aarch64 --only-binary=:all:` finds
  llguidance 1.6.1 (abi3) and outlines-core 0.2.14 on this project's index; the structured-output
  tests pass with llguidance 1.6.1 and 1.9.1 (1.6.1 takes one stop id, see constrain.py).
"""


def _walk(start, mask_fn, consume_fn, is_stop, steps: int, seed: int) -> tuple:
    """(seconds per step list, compile seconds): a seeded random walk of allowed ids."""
    t0 = time.perf_counter()
    state = start()
    compile_s = time.perf_counter() - t0
    rng, times = np.random.default_rng(seed), []
    for _ in range(steps):
        t = time.perf_counter()
        mask = mask_fn(state)
        ids = np.flatnonzero(mask)
        tok = int(ids[rng.integers(len(ids))]) if len(ids) else -1
        if tok < 0 or is_stop(tok):
            break
        consume_fn(state, tok)
        times.append(time.perf_counter() - t)
    return times, compile_s


def _llguidance(tok, vocab: int, grammar: str):
    import llguidance as ll

    def start():
        return ll.LLMatcher(tok, grammar, log_level=0)

    def mask(m):
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")[:vocab]
        return bits.astype(bool)
    return start, mask, lambda m, t: m.consume_token(t)


def _outlines(tok, vocab: int, eos: int, regex: str):
    import outlines_core as oc
    by_bytes = {}
    for i in range(vocab):
        if i != eos and not tok.is_special_token(i):
            by_bytes.setdefault(tok.decode_bytes([i]), []).append(i)
    vocabulary = oc.Vocabulary(eos, by_bytes)
    words = np.zeros((vocab + 31) // 32, np.int32)

    def start():
        return oc.Guide(oc.Index(regex, vocabulary))

    def mask(g):
        g.write_mask_into(words.ctypes.data, words.size, 4)
        return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)
    return start, mask, lambda g, t: g.advance(t, return_tokens=False)


def _constraints() -> dict:
    import llguidance as ll
    import outlines_core as oc
    return {
        "json_schema": (ll.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS),
                        oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA), r"")),
        "regex": (ll.LLMatcher.grammar_from_regex(REGEX), REGEX),
        "choices": (ll.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in CHOICES)),
                    "(" + "|".join(c.replace(" ", r"\ ") for c in CHOICES) + ")"),
    }


def bench_tokenizer(path: str, steps: int, rounds: int) -> list:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    vocab = len(spec["model"]["vocab"])
    eos = next(t["id"] for t in spec["added_tokens"] if t["content"] in ("</s>", "<|endoftext|>", "<|im_end|>"))
    t = time.perf_counter()
    tok = grammar_tokenizer(path, [eos])          # llguidance's tokenizer: once per engine
    tokenizer_ms = (time.perf_counter() - t) * 1e3
    rows = []
    for name, (ll_grammar, oc_regex) in _constraints().items():
        libs = {"llguidance": _llguidance(tok, vocab, ll_grammar)}
        t = time.perf_counter()
        libs["outlines-core"] = _outlines(tok, vocab, eos, oc_regex)
        vocab_s = time.perf_counter() - t
        res = {lib: {"step_us": [], "compile_ms": []} for lib in libs}
        for r in range(rounds):
            for lib, (start, mask, consume) in libs.items():      # interleaved A/B
                times, compile_s = _walk(start, mask, consume, lambda i: i == eos, steps, seed=r)
                res[lib]["step_us"] += [x * 1e6 for x in times]
                res[lib]["compile_ms"].append(compile_s * 1e3)
        for lib, v in res.items():
            s = sorted(v["step_us"])
            rows.append({"tokenizer": path, "vocab": vocab, "constraint": name, "library": lib,
                         "steps": len(s), "step_us_median": statistics.median(s),
                         "step_us_p10": s[len(s) // 10], "step_us_p90": s[9 * len(s) // 10],
                         "compile_ms_median": statistics.median(v["compile_ms"]),
                         "setup_ms": vocab_s * 1e3 if lib == "outlines-core" else tokenizer_ms})
            print(f"{os.path.basename(os.path.dirname(path)) or path} V={vocab} {name:12s} {lib:14s} "
                  f"step {rows[-1]['step_us_median']:8.1f} us (p10 {rows[-1]['step_us_p10']:.1f}, "
                  f"p90 {rows[-1]['step_us_p90']:.1f})  compile {rows[-1]['compile_ms_median']:.1f} ms", flush=True)
    return rows


def markdown(r: dict) -> str:
    lines = ["# Structured output: per-token mask cost", "",
             f"`{r['command']}` on {r['machine']['cpu']} (load {r['machine']['loadavg_start']}).", "",
             "Per step: compute the mask as numpy bool [V] + consume one id (median, p10-p90 over "
             f"{r['rounds']} seeded walks of up to {r['steps']} steps). Compile: matcher construction.", "",
             "| tokenizer | V | constraint | library | step us median | p10-p90 | compile ms | setup ms |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['tokenizer']} | {x['vocab']} | {x['constraint']} | {x['library']} | "
                     f"{x['step_us_median']:.1f} | {x['step_us_p10']:.1f}-{x['step_us_p90']:.1f} | "
                     f"{x['compile_ms_median']:.1f} | {x['setup_ms']:.0f} |")
    return "\n".join(lines + ["", "Setup: once per engine (llguidance: its tokenizer from tokenizer.json; "
                                   "outlines-core: its Vocabulary from the same token bytes).", "", DECISION])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tokenizers", nargs="+", help="tokenizer.json files")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "constrain"))
    args = ap.parse_args(argv)
    rows = [row for p in args.tokenizers for row in bench_tokenizer(p, args.steps, args.rounds)]
    import llguidance
    import outlines_core
    from importlib.metadata import version
    r = {"command": "python -m benchmarks.bench_constrain " + " ".join(argv or sys.argv[1:]),
         "machine": machine_info(1), "steps": args.steps, "rounds": args.rounds,
         "versions": {"llguidance": llguidance.__version__, "outlines-core": version("outlines_core")},
         "rows": rows}
    finish(r, args.out, "constrain", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
