"""Op by op: one decode step of our fused graph against ORT GenAI's graph of the same LLM, in one process.

    python -m benchmarks.graphdiff ENGINE GENAI_DIR [--context 128] [--steps 32] [--rounds 4] [--threads 2]

Both run with ORT's profiler on (SessionOptions.enable_profiling; GenAI through its config's
session_options), 2 intra-op threads and 1 inter-op thread. Our engine steps through LLMEngine.step
(embedding gather + forward + KV write), GenAI through Generator.generate_next_token (forward + greedy
pick), in alternating rounds so load from other processes hits both alike. From each trace: every
node's median (and 10th percentile) time over the profiled steps, summed by op type with the lm_head
on its own line; the session's own run time per step (model_run) and the step's wall time outside it
(our Python + binding, GenAI's generator loop).
"""
import argparse
import glob
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

from benchmarks.ab_paged import _engine, _start
from benchmarks.common import save_json
from benchmarks.profile_decode import _head_node
from vila_edge.manifest import Manifest


def _trace_stats(path: str, runs: int, head_pred) -> dict:
    """Per op type: the sum over nodes of each node's median / p10 time in the last `runs` model_runs."""
    with open(path) as f:
        events = json.load(f)
    model_runs = [e for e in events if e.get("name") == "model_run"][-runs:]
    first = model_runs[0]["ts"]
    times, ops = defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            name = e["name"].removesuffix("_kernel_time")
            times[name].append(e["dur"])
            ops[name] = "lm_head MatMulNBits" if head_pred(name) else e["args"].get("op_name", "?")
    by_op = defaultdict(lambda: {"nodes": 0, "p50_us": 0.0, "p10_us": 0.0})
    for name, v in times.items():
        row = by_op[ops[name]]
        row["nodes"] += 1
        row["p50_us"] += float(np.median(v))
        row["p10_us"] += float(np.percentile(v, 10))
    return {"model_run_us": float(np.median([e["dur"] for e in model_runs])),
            "node_sum_p50_us": sum(r["p50_us"] for r in by_op.values()),
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["p50_us"]))}


class Ours:
    def __init__(self, path: str, threads: int, context: int, grow: int, rng):
        self.m, self.rng, self.path = Manifest.load(path), rng, path
        self.prefix = os.path.join("/tmp", f"graphdiff_ours_{os.getpid()}")

        def configure(o):
            o.enable_profiling, o.profile_file_prefix = True, self.prefix
        self.eng = _engine(path, self.m, threads, context + grow + 8, 1, configure)
        _start(self.eng, rng, self.m.llm.vocab_size, context, grow + 4)

    def step(self, tok: int) -> None:
        self.eng.step("s", tok)

    def trace(self) -> str:
        return self.eng.runner.session.session.end_profiling()

    def is_head(self, name: str) -> bool:
        self.head = getattr(self, "head", None) or _head_node(self.path, self.m)
        return name == self.head


class GenAI:
    def __init__(self, model_dir: str, threads: int, context: int, grow: int, rng):
        import onnxruntime_genai as og
        self.prefix = os.path.join("/tmp", f"graphdiff_genai_{os.getpid()}")
        config = og.Config(model_dir)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1, "enable_profiling": self.prefix}}}}))
        self.model = og.Model(config)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=context + grow + 8, do_sample=False)
        self.gen = og.Generator(self.model, params)
        self.gen.append_tokens(rng.integers(0, 49152, context).astype(np.int32))

    def step(self, tok: int) -> None:
        self.gen.generate_next_token()

    def trace(self) -> str:
        self.gen = None
        self.model = None                  # the session writes its trace when it is destroyed
        import gc
        gc.collect()
        return max(glob.glob(self.prefix + "*.json"), key=os.path.getmtime)

    def is_head(self, name: str) -> bool:
        return "lm_head" in name


def run(engine: str, genai: str, threads: int, context: int, steps: int, rounds: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    grow = (rounds + 1) * steps
    systems = {"vila_edge": Ours(engine, threads, context, grow, rng),
               "ort-genai": GenAI(genai, threads, context, grow, rng)}
    walls = {k: [] for k in systems}
    load = list(os.getloadavg())
    for r in range(rounds + 1):                       # round 0 warms up (and is left out of the trace stats)
        for k, s in systems.items():
            for _ in range(steps):
                tok = int(rng.integers(0, 49152))
                t = time.perf_counter()
                s.step(tok)
                if r:
                    walls[k].append(time.perf_counter() - t)
    out = {"context": context, "threads": threads, "steps": steps * rounds, "loadavg_start": load}
    for k, s in systems.items():
        path = s.trace()
        st = _trace_stats(path, steps * rounds, s.is_head)
        os.remove(path)
        st["step_wall_us"] = float(np.median(walls[k])) * 1e6
        st["outside_run_us"] = st["step_wall_us"] - st["model_run_us"]
        out[k] = st
    out["loadavg_end"] = list(os.getloadavg())
    return out


def markdown(r: dict) -> str:
    a, b = r["vila_edge"], r["ort-genai"]
    lines = [f"context {r['context']}, {r['threads']} threads, {r['steps']} profiled steps each, load "
             f"{r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f} (shared machine: under load)", "",
             "| op type | ours: nodes | ours p50 us (p10) | GenAI: nodes | GenAI p50 us (p10) |",
             "|---|---|---|---|---|"]
    p50 = lambda s, o: s["by_op"].get(o, {}).get("p50_us", 0)
    for op in sorted(set(a["by_op"]) | set(b["by_op"]), key=lambda o: -max(p50(a, o), p50(b, o))):
        cell = lambda s: (f"{s['by_op'][op]['nodes']} | {s['by_op'][op]['p50_us']:.0f} "
                          f"({s['by_op'][op]['p10_us']:.0f})" if op in s["by_op"] else "- | -")
        lines.append(f"| {op} | {cell(a)} | {cell(b)} |")
    for label, key in (("sum of node medians", "node_sum_p50_us"), ("session run (model_run)", "model_run_us"),
                       ("step wall time", "step_wall_us"), ("outside the run", "outside_run_us")):
        lines.append(f"| **{label}** | | {a[key]:.0f} | | {b[key]:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("genai")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    r = run(args.engine, args.genai, args.threads, args.context, args.steps, args.rounds, args.seed)
    print(markdown(r))
    if args.json:
        save_json(r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
