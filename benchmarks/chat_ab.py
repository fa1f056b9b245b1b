"""Decode tok/s of Pipeline.stream (the scheduler's decode loop, sampler and text streamer included),
two checkouts A/B in alternating fresh processes.

    python -m benchmarks.chat_ab ENGINE --a ROOT_A --b ROOT_B [--pairs 4] [--sends 5] [--tokens 96] [--threads 2]

Each process (PYTHONPATH=ROOT, so that checkout's runtime runs) loads a Pipeline, sends one warm-up
text prompt, then `sends` greedy turns of up to `tokens` new tokens (fresh conversations, one
prompt that keeps a small model counting, so the turns run to the budget) and reports the median of
`last_stats["decode_tok_s"]` (tokens after the first per second). `pairs` processes per side
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

engine, threads, sends, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pipe = Pipeline(engine, threads=threads, max_context=1024, progress=False)
prompt = "Count from 1 to 500, separated by commas: 1, 2, 3, 4,"
rates, lengths = [], []
for i in range(sends + 1):
    conv = pipe.conversation()
    conv.send(None, prompt, max_new_tokens=tokens)
    if i:
        rates.append(conv.last_stats["decode_tok_s"])
        lengths.append(conv.last_stats["new_tokens"])
    conv.close()
print(json.dumps({"decode_tok_s": float(np.median(rates)), "new_tokens": lengths}))
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
    ratios = [b / a for a, b in zip(rate["a"], rate["b"])]
    summary = {k: {"median_tok_s": float(np.median(v)), "min_tok_s": min(v), "max_tok_s": max(v)} for k, v in rate.items()}
    summary["b_over_a"] = {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)}
    print(f"{args.threads} threads, {args.pairs} processes per side, load {load[0]:.1f} -> {load[1]:.1f}")
    print("| side | decode tok/s median (range) |\n|---|---|")
    for k in ("a", "b"):
        s = summary[k]
        print(f"| {k} | {s['median_tok_s']:.1f} ({s['min_tok_s']:.1f}-{s['max_tok_s']:.1f}) |")
    r = summary["b_over_a"]
    print(f"\nB / A per pair: median {r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f})")
    if args.json:
        save_json({"a": args.a, "b": args.b, "engine": args.engine, "threads": args.threads, "tokens": args.tokens,
                   "load": load, "per_process": runs, "summary": summary}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
