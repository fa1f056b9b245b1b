"""Decode tok/s of Pipeline.stream (the scheduler's decode loop, sampler and text streamer included),
two checkouts A/B in alternating fresh processes.

    python -m benchmarks.chat_ab ENGINE --a ROOT_A --b ROOT_B [--pairs 4] [--sends 5] [--tokens 96] [--threads 2]

Each process (PYTHONPATH=ROOT, so that checkout's runtime runs) loads a Pipeline, sends one warm-up
text prompt, then `sends` greedy turns of up to `tokens` new tokens (fresh conversations, one
prompt that keeps a small model counting, so the turns run to the budget) and reports the median of
`last_stats["decode_tok_s"]` (tokens after the first per second) and the scheduler thread's CPU time
outside session.run_with_iobinding per generated token (its prefill, decode steps, sampling and text
streaming; the pipeline's overhead_ab). `pairs` processes per side
alternate A, B (B, A on odd pairs). Unlike overhead_ab and ab_graphs (LLMEngine.step), this is the
path a request takes.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

from benchmarks.common import save_json

CHILD = r"""
import json, sys
import numpy as np
from vila_edge.pipeline import Pipeline

import threading, time
from vila_edge.scheduler import Scheduler

engine, threads, sends, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pipe = Pipeline(engine, threads=threads, max_context=1024, progress=False)
prompt = "Count from 1 to 500, separated by commas: 1, 2, 3, 4,"

# The scheduler thread's CPU time per turn, and its part inside session.run_with_iobinding (the same
# clock as overhead_ab's: thread time, not inflated by preemption).
clock, run, loop = {"run": 0.0, "loop": 0.0}, pipe.llm.runner.session.run_with_iobinding, Scheduler._loop
ended = threading.Event()
def timed_run(io, where=""):
    t = time.thread_time()
    run(io, where)
    clock["run"] += time.thread_time() - t
def timed_loop(self):
    t = time.thread_time()
    try:
        loop(self)
    finally:
        clock["loop"] += time.thread_time() - t
        ended.set()
pipe.llm.runner.session.run_with_iobinding, Scheduler._loop = timed_run, timed_loop

rates, lengths, outside = [], [], []
for i in range(sends + 1):
    conv = pipe.conversation()
    clock["run"] = clock["loop"] = 0.0
    ended.clear()
    conv.send(None, prompt, max_new_tokens=tokens)
    assert ended.wait(60)                         # the loop's clock stops when its thread ends
    if i:
        rates.append(conv.last_stats["decode_tok_s"])
        lengths.append(conv.last_stats["new_tokens"])
        outside.append((clock["loop"] - clock["run"]) / conv.last_stats["new_tokens"] * 1e6)
    conv.close()
print(json.dumps({"decode_tok_s": float(np.median(rates)), "new_tokens": lengths,
                  "outside_us_per_token": float(np.median(outside))}))
"""


def measure(root: str, engine: str, threads: int, sends: int, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(engine), str(threads), str(sends), str(tokens)],
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
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--sends", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    runs, load = {"a": [], "b": []}, [os.getloadavg()[0]]
    for i in range(args.pairs):
        for k in (("a", "b") if i % 2 == 0 else ("b", "a")):
            runs[k].append(measure(getattr(args, k), args.engine, args.threads, args.sends, args.tokens))
            print(f"pair {i} {k}: {runs[k][-1]}", file=sys.stderr)
    load.append(os.getloadavg()[0])
    rate = {k: [r["decode_tok_s"] for r in v] for k, v in runs.items()}
    over = {k: [r["outside_us_per_token"] for r in v] for k, v in runs.items()}
    ratios = [b / a for a, b in zip(rate["a"], rate["b"])]
    summary = {k: {"median_tok_s": float(np.median(v)), "min_tok_s": min(v), "max_tok_s": max(v),
                   "outside_us_per_token": {"median": float(np.median(over[k])), "min": min(over[k]),
                                            "max": max(over[k])}} for k, v in rate.items()}
    summary["b_over_a"] = {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)}
    print(f"{args.threads} threads, {args.pairs} processes per side, load {load[0]:.1f} -> {load[1]:.1f}")
    print("| side | decode tok/s median (range) | scheduler thread CPU outside the run, us/token (range) |")
    print("|---|---|---|")
    for k in ("a", "b"):
        s, o = summary[k], summary[k]["outside_us_per_token"]
        print(f"| {k} | {s['median_tok_s']:.1f} ({s['min_tok_s']:.1f}-{s['max_tok_s']:.1f}) | "
              f"{o['median']:.0f} ({o['min']:.0f}-{o['max']:.0f}) |")
    r = summary["b_over_a"]
    print(f"\nB / A per pair: median {r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f})")
    if args.json:
        save_json({"a": args.a, "b": args.b, "engine": args.engine, "threads": args.threads, "tokens": args.tokens,
                   "load": load, "per_process": runs, "summary": summary}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
