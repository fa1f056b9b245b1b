"""Where does one decode step of the fused graph go? Node times by op, and the Python around the run.

    python -m benchmarks.profile_decode ENGINE [ENGINE ...] [--context 128] [--steps 48] [--threads 2]

For each engine (the same checkpoint's graph variants, e.g. lm_head int8 vs int4), in one process:
1. ORT's profiler: the 10th percentile of each node's time over `steps` decode steps (LLMEngine.step
   of a random text id after a prefill of `context` ids), summed by op type, the lm_head on its own
   line. The 10th percentile rather than the median: on a shared machine a node's time is its own
   work plus however long the scheduler held its threads off the cores, and the low tail is the
   work. Engines' rounds alternate, so load hits them alike.
2. Python and binding per step: the main thread's CPU time (time.thread_time, which a preemption does
   not inflate) of LLMEngine.step minus that of session.run_with_iobinding, for the runner's decode
   fast path (one sequence, one position: buffers bound once) and its general path (forward_batch's
   per-step arrays, bindings and output copy), first engine only, 1 intra-op thread (ORT runs on
   the calling thread, and that CPU is subtracted).
"""
import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict

import numpy as np

from benchmarks.ab_paged import _engine, _round, _start
from benchmarks.common import save_json
from vila_edge.manifest import Manifest


def node_profile(paths: list, threads: int, context: int, steps: int, seed: int) -> dict:
    engines = {}
    for i, path in enumerate(paths):
        m, rng = Manifest.load(path), np.random.default_rng(seed)
        prefix = os.path.join("/tmp", f"profile_decode_{os.getpid()}_{i}")
        configure = lambda o, prefix=prefix: (setattr(o, "enable_profiling", True), setattr(o, "profile_file_prefix", prefix))
        eng = _engine(path, m, threads, context + 4 * steps, 1, configure)
        _start(eng, rng, m.llm.vocab_size, context, 4 * steps)
        engines[path] = (eng, m, rng)
    for _ in range(2):                          # the first half warms up; both halves are profiled
        for eng, m, rng in engines.values():
            _round(eng, rng, m.llm.vocab_size, steps // 2)
    out = {}
    for path, (eng, m, rng) in engines.items():
        trace = eng.runner.session.session.end_profiling()
        with open(trace) as f:
            events = json.load(f)
        os.remove(trace)
        first = [e for e in events if e.get("name") == "model_run"][-steps]["ts"]
        times = defaultdict(list)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
                times[e["name"].removesuffix("_kernel_time")].append(e["dur"])
        p10 = {k: float(np.percentile(v, 10)) for k, v in times.items()}
        head = _head_node(path, m)
        by_op = defaultdict(float)
        for k, v in p10.items():
            by_op["lm_head MatMulNBits" if k == head else re.sub(r"_\d+$", "", k.split("/")[0])] += v
        out[path] = {"nodes": len(p10), "sum_us": sum(p10.values()),
                     "by_op_us": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}
    return out


def _head_node(path: str, m) -> str:
    """The lm_head's node: the MatMulNBits with the largest N (the vocabulary)."""
    import onnx

    graph = onnx.load(os.path.join(path, m.files["llm"]), load_external_data=False).graph
    return max((n for n in graph.node if n.op_type == "MatMulNBits"),
               key=lambda n: next(a.i for a in n.attribute if a.name == "N")).name


def python_overhead(path: str, context: int, steps: int, rounds: int, seed: int) -> dict:
    m, rng = Manifest.load(path), np.random.default_rng(seed)
    engines, per = {}, {}
    for label in ("decode fast path", "general path"):
        eng = _engine(path, m, 1, context + (rounds + 1) * steps + 1, 1)
        if label == "general path":
            eng.runner._decode_rows = None
        _start(eng, rng, m.llm.vocab_size, context, (rounds + 1) * steps)
        engines[label], per[label] = (eng, _run_clock(eng.runner.session)), []
    for r in range(rounds + 1):
        for label, (eng, clock) in engines.items():
            clock["s"] = 0.0
            t = time.thread_time()
            for tok in rng.integers(0, m.llm.vocab_size, steps):
                eng.step("s", int(tok))
            if r:
                per[label].append((time.thread_time() - t - clock["s"]) / steps * 1e6)
    return {k: {"median_us": float(np.median(v)), "min_us": min(v), "max_us": max(v)} for k, v in per.items()}


def _run_clock(session) -> dict:
    """Wraps session.run_with_iobinding to add its thread CPU seconds to clock["s"]."""
    clock, run = {"s": 0.0}, session.run_with_iobinding

    def timed(io, where=""):
        t = time.thread_time()
        run(io, where)
        clock["s"] += time.thread_time() - t
    session.run_with_iobinding = timed
    return clock


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    r = {"context": args.context, "threads": args.threads, "loadavg_start": list(os.getloadavg()),
         "nodes": node_profile(args.engines, args.threads, args.context, args.steps, args.seed),
         "python": python_overhead(args.engines[0], args.context, 30, 12, args.seed)}
    r["loadavg_end"] = list(os.getloadavg())
    print(f"context {args.context}, {args.threads} threads, load {r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f}")
    for path, p in r["nodes"].items():
        print(f"\n{path}: node p10 sum {p['sum_us']:.0f} us over {p['nodes']} nodes")
        for op, us in p["by_op_us"].items():
            print(f"  {op:36s} {us:8.0f} us")
    print(f"\nPython + binding per step (main thread CPU outside the run, {args.engines[0]}):")
    for label, v in r["python"].items():
        print(f"  {label:18s} median {v['median_us']:.0f} us (rounds {v['min_us']:.0f}-{v['max_us']:.0f})")
    if args.json:
        save_json(r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
