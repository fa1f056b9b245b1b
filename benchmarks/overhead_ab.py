"""Python and binding per decode step, two checkouts A/B in alternating fresh processes.

    python -m benchmarks.overhead_ab --a ROOT_A --b ROOT_B ENGINE [--context 128] [--pairs 4] [--rounds 10]

Each process (PYTHONPATH=ROOT, so that checkout's runtime runs) measures what
benchmarks/profile_decode.py's second part does: the main thread's CPU time (time.thread_time, not
inflated by preemption) per decode step outside session.run_with_iobinding, ORT on the calling thread
(1 intra-op thread, whose CPU is subtracted), `rounds` rounds of 30 steps after one warm-up round, for
  fast          LLMEngine.step on the runner's decode fast path (one sequence, one position)
  general       the same steps through forward_batch's general path
  fast+greedy   the fast path plus the greedy Sampler on its logits (what a decode step of a request costs)
A process reports the median over its rounds; `pairs` processes per side alternate A, B (B, A on odd
pairs). The engine must load in both checkouts (same engine format) and needs benchmarks/ab_paged.py there.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

from benchmarks.common import save_json

# The child's clock is its own copy of profile_decode._run_clock, not an import: both checkouts must time
# with the same code, and checkouts older than 1e51c2c lack it.
CHILD = r"""
import json, sys, time
import numpy as np
from benchmarks.ab_paged import _engine, _start
from vila_edge.manifest import Manifest
from vila_edge.sampling import GenerationConfig, Sampler, SeenIds

path, context, rounds, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 30
m, rng = Manifest.load(path), np.random.default_rng(0)


def clock(session):
    c, run = {"s": 0.0}, session.run_with_iobinding
    def timed(io, where=""):
        t = time.thread_time()
        run(io, where)
        c["s"] += time.thread_time() - t
    session.run_with_iobinding = timed
    return c


labels, engines = ("fast", "general", "fast+greedy"), {}
for label in labels:
    eng = _engine(path, m, 1, context + (rounds + 1) * steps + 1, 1)
    if label == "general":
        eng.runner._decode_rows = None
    _start(eng, rng, m.llm.vocab_size, context, (rounds + 1) * steps)
    engines[label] = (eng, clock(eng.runner.session))
# the pipeline's never-sampled ids are the media tokens past the original vocabulary; three ids stand in
sampler = Sampler(GenerationConfig(), m.llm.vocab_size, list(range(m.llm.vocab_size - 3, m.llm.vocab_size)))
seen, per = SeenIds(m.llm.vocab_size), {k: [] for k in labels}
for r in range(rounds + 1):
    for label, (eng, c) in engines.items():
        c["s"] = 0.0
        toks = [int(t) for t in rng.integers(0, m.llm.vocab_size, steps)]
        t = time.thread_time()
        for tok in toks:
            logits = eng.step("s", tok)
            if label == "fast+greedy":
                sampler(logits, seen)
        if r:
            per[label].append((time.thread_time() - t - c["s"]) / steps * 1e6)
print(json.dumps({k: float(np.median(v)) for k, v in per.items()}))
"""


def measure(root: str, engine: str, context: int, rounds: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(engine), str(context), str(rounds)],
                         cwd=root, env=dict(os.environ, PYTHONPATH=os.path.abspath(root)), capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"{root}: exit {out.returncode}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--a", required=True, help="baseline checkout")
    ap.add_argument("--b", required=True, help="checkout under test")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    runs = {"a": [], "b": []}
    load = [os.getloadavg()[0]]
    for i in range(args.pairs):
        for k in (("a", "b") if i % 2 == 0 else ("b", "a")):
            runs[k].append(measure(getattr(args, k), args.engine, args.context, args.rounds))
            print(f"pair {i} {k}: {runs[k][-1]}", file=sys.stderr)
    load.append(os.getloadavg()[0])
    table = {k: {label: {"median_us": float(np.median([r[label] for r in v])),
                         "min_us": min(r[label] for r in v), "max_us": max(r[label] for r in v)}
                 for label in v[0]} for k, v in runs.items()}
    print(f"context {args.context}, {args.pairs} processes per side, load {load[0]:.1f} -> {load[1]:.1f}")
    print("| path | A median us (range) | B median us (range) |\n|---|---|---|")
    for label in table["a"]:
        a, b = table["a"][label], table["b"][label]
        print(f"| {label} | {a['median_us']:.0f} ({a['min_us']:.0f}-{a['max_us']:.0f}) | "
              f"{b['median_us']:.0f} ({b['min_us']:.0f}-{b['max_us']:.0f}) |")
    if args.json:
        save_json({"a": args.a, "b": args.b, "engine": args.engine, "context": args.context, "load": load,
                   "per_process": runs, "summary": table}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
