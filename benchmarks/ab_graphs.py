"""A/B: decode speed of engines of the same checkpoint (graph variants, export options), in one process.

    python -m benchmarks.ab_graphs engines/smollm2-int4-cpu engines/smollm2-int4-orin \
        [genai:build/genai/smollm2-vila-int4] [engines/x@/tmp/old_ops.so] [--contexts 128,512]

Each engine holds one sequence per context (a real prefill of random text ids); rounds of `steps`
decode steps (LLMEngine.step: embedding gather + forward + KV write, no sampling) alternate between
the engines, so load from other processes hits all of them alike. "ENGINE@LIB.so" runs ENGINE with
another build of vila_edge's op library (a copy of LIB at its own path, so two builds load side by side). "genai:DIR" adds ORT GenAI's own
export of the same LLM (Generator.generate_next_token: forward + greedy pick) to the rotation. Then cold time to first token with one fresh image, alternating the same way (vila_edge engines).
Reports each engine's median step
over all rounds, the spread of the per-round medians, and the ratio to the first engine.
"""
import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from unittest import mock

import numpy as np


from benchmarks.common import bench_ttft, kv_config, save_json
from vila_edge import ops
from vila_edge.manifest import Manifest
from vila_edge.pipeline import Pipeline
from vila_edge.runner import Tokens


class _VilaEdge:
    def __init__(self, spec: str, threads: int, max_context: int):
        engine, _, lib = spec.partition("@")
        with _ops_library(lib):
            self.pipe = Pipeline(engine, threads=threads, max_context=max_context,
                                 kv=kv_config(Manifest.load(engine), max_context))
        self.graph, self.vocab = self.pipe.manifest.build.get("graph"), self.pipe.manifest.llm.vocab_size

    def start(self, prompt: np.ndarray, grow: int) -> None:
        self.pipe.llm.prefill("ab", Tokens(prompt), prompt, grow=grow)

    def step(self, token: int) -> None:
        self.pipe.llm.step("ab", token)

    def stop(self) -> None:
        self.pipe.llm.release("ab")


class _GenAI:
    def __init__(self, model_dir: str, threads: int, max_context: int):
        import onnxruntime_genai as og
        self.og, self.max_length, self.graph = og, max_context + 8, "ort-genai"
        config = og.Config(model_dir)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                              "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        with open(os.path.join(model_dir, "genai_config.json")) as f:
            self.vocab = json.load(f)["model"]["vocab_size"]

    def start(self, prompt: np.ndarray, grow: int) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(prompt.astype(np.int32))

    def step(self, token: int) -> None:
        self.gen.generate_next_token()

    def stop(self) -> None:
        self.gen = None


@contextlib.contextmanager
def _ops_library(lib: str):
    """Sessions created inside load `lib` (copied to a path of its own) as vila_edge's op library."""
    if not lib:
        yield
        return
    copy = os.path.join(tempfile.mkdtemp(prefix="ab_graphs_ops_"), os.path.basename(lib))
    shutil.copy(lib, copy)
    with mock.patch.object(ops, "library_path", lambda: copy):
        yield


def run(engines: list, contexts: list, steps: int, rounds: int, threads: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    max_context = max(max(contexts) + (rounds + 1) * steps + 1, 1024)    # 1024: room for an image prompt
    pipes = {e: (_GenAI(e.removeprefix("genai:"), threads, max_context) if e.startswith("genai:")
                 else _VilaEdge(e, threads, max_context)) for e in engines}
    vocab = min(p.vocab for p in pipes.values())
    out = {"threads": threads, "steps_per_round": steps, "rounds": rounds, "loadavg_start": list(os.getloadavg()),
           "rows": []}
    for ctx in contexts:
        prompt = rng.integers(0, vocab, ctx)
        for e, p in pipes.items():
            p.start(prompt, (rounds + 1) * steps)
        per_round = {e: [] for e in engines}
        for r in range(rounds + 1):                     # round 0 warms up
            for e, p in pipes.items():
                times = []
                for _ in range(steps):
                    tok = int(rng.integers(0, vocab))
                    t = time.perf_counter()
                    p.step(tok)
                    times.append(time.perf_counter() - t)
                if r:
                    per_round[e].append(float(np.median(times)))
        base = float(np.median(per_round[engines[0]]))
        for e, p in pipes.items():
            p.stop()
            med = float(np.median(per_round[e]))
            out["rows"].append({"engine": e, "graph": p.graph, "context": ctx,
                                "step_ms": 1e3 * med, "tok_s": 1 / med, "round_tok_s_min": 1 / max(per_round[e]),
                                "round_tok_s_max": 1 / min(per_round[e]), "vs_first": base / med})
    out["ttft"] = []
    ours = {e: p for e, p in pipes.items() if isinstance(p, _VilaEdge)}
    times = {e: [] for e in ours}
    for r in range(rounds + 1):                         # cold TTFT with one fresh image, alternating
        for e, p in ours.items():
            row = bench_ttft(p.pipe, rng, 1, 1, 0)
            if r:
                times[e].append(row["median_s"])
    base = float(np.median(times[engines[0]])) if engines[0] in times else None
    for e, t in times.items():
        med = float(np.median(t))
        out["ttft"].append({"engine": e, "graph": ours[e].graph, "median_s": med, "min_s": min(t), "max_s": max(t),
                            "vs_first": med / base if base else None})
    out["loadavg_end"] = list(os.getloadavg())
    return out


def markdown(r: dict) -> str:
    lines = [f"threads {r['threads']}, {r['rounds']} rounds x {r['steps_per_round']} steps, load "
             f"{r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f}", "",
             "| engine | graph | context | tok/s (median) | per-round range | vs first |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['engine']} | {row['graph']} | {row['context']} | {row['tok_s']:.1f} | "
                     f"{row['round_tok_s_min']:.1f}-{row['round_tok_s_max']:.1f} | {row['vs_first']:.2f}x |")
    if r.get("ttft"):
        lines += ["", "| engine | graph | TTFT, 1 image (median) | range | vs first |", "|---|---|---|---|---|"]
        for row in r["ttft"]:
            lines.append(f"| {row['engine']} | {row['graph']} | {row['median_s'] * 1e3:.0f} ms | "
                         f"{row['min_s'] * 1e3:.0f}-{row['max_s'] * 1e3:.0f} ms | {row['vs_first']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--contexts", default="128,512")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    r = run(args.engines, [int(c) for c in args.contexts.split(",")], args.steps, args.rounds, args.threads, args.seed)
    print(markdown(r))
    if args.json:
        save_json(r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
