"""Time to first token with one image, two checkouts (or engines) A/B in alternating fresh processes.

    python -m benchmarks.ttft_ab --a ROOT_A ENGINE_A --b ROOT_B ENGINE_B [--rounds 8] [--runs 5] [--threads 2]
        [--export CHECKPOINT [--export-args "--quant rtn ..."]] [--json FILE] [--out DIR]

Each round starts one process per side, A then B (B then A on odd rounds, so neither always runs
first after the other's caches), with PYTHONPATH=ROOT and cwd=ROOT: that checkout's runtime loads its
engine (`Pipeline(engine, threads)`, a pool of two contexts) and measures `bench_ttft` (vila_edge.measure,
or vila_edge.bench in older checkouts): one warm-up request, then `runs` requests of a fresh noise image
and a nonce system prompt, so neither the vision cache nor a prefix block hits. A process reports its
median; the report is the median over rounds per side, their range, and B / A per round (median of those).

A checkout of an older commit, e.g. the state the issue was filed against:

    git worktree add /tmp/ab-628e121 628e121        # or: mkdir D && git archive 628e121 | tar -x -C D

An engine is read only by the checkout that exported it (engine formats change between commits):
with `--export CHECKPOINT` a side whose ENGINE is missing is exported first by that checkout's own
exporter (`python -m vila_edge.cli export CHECKPOINT ENGINE --quiet` + `--export-args`). A checkout
with the vila_edge::PagedAttention op needs it built there (`python setup.py build_ext --inplace`).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

import numpy as np

from benchmarks.common import save_json

# Runs inside ROOT's runtime: only what both old and new checkouts have.
CHILD = r"""
import json, os, sys, time
import numpy as np
import vila_edge
here = os.path.dirname(vila_edge.__file__)
assert os.path.realpath(here).startswith(os.path.realpath(os.getcwd())), f"vila_edge imported from {here}"
# By file, not by ImportError: an editable install elsewhere would serve a module this checkout lacks.
if os.path.isfile(os.path.join(here, "measure.py")):
    from vila_edge.measure import bench_ttft, kv_config
else:                                       # checkouts before vila_edge/measure.py
    from vila_edge.bench import bench_ttft, kv_config
from vila_edge.manifest import Manifest
from vila_edge.pipeline import Pipeline

engine, threads, runs, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = Manifest.load(engine)
t = time.perf_counter()
pipe = Pipeline(engine, threads=threads, max_context=1024, kv=kv_config(m, 1024))
load_s = time.perf_counter() - t
r = bench_ttft(pipe, np.random.default_rng(seed), 1, runs, 1)
print(json.dumps({"median_s": r["median_s"], "prompt_tokens": r["prompt_tokens"], "load_s": load_s,
                  "kv_dtype": getattr(m, "kv_dtype", m.dtype)}))
"""


def _env(root: str) -> dict:
    return dict(os.environ, PYTHONPATH=os.path.abspath(root))


def export(root: str, checkpoint: str, engine: str, extra: str) -> None:
    """ENGINE exported by ROOT's own exporter when missing."""
    if os.path.isfile(os.path.join(engine, "manifest.json")):
        return
    cmd = [sys.executable, "-m", "vila_edge.cli", "export", os.path.abspath(checkpoint), os.path.abspath(engine),
           "--quiet", *shlex.split(extra)]
    print(f"exporting {engine} with {root}: {' '.join(cmd[1:])}", file=sys.stderr)
    subprocess.run(cmd, cwd=root, env=_env(root), check=True)


def measure(root: str, engine: str, threads: int, runs: int, seed: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(engine), str(threads), str(runs), str(seed)],
                         cwd=root, env=_env(root), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{root} {engine}: exit {out.returncode}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(a: list, b: list) -> dict:
    med = lambda xs: float(np.median(xs))
    ratios = [y["median_s"] / x["median_s"] for x, y in zip(a, b)]
    side = lambda xs: {"median_s": med([x["median_s"] for x in xs]), "min_s": min(x["median_s"] for x in xs),
                       "max_s": max(x["median_s"] for x in xs), "load_median_s": med([x["load_s"] for x in xs]),
                       "prompt_tokens": xs[0]["prompt_tokens"], "kv_dtype": xs[0]["kv_dtype"]}
    return {"a": side(a), "b": side(b), "b_over_a_median": med(ratios), "b_over_a_min": min(ratios),
            "b_over_a_max": max(ratios)}


def markdown(r: dict) -> str:
    s = r["summary"]
    row = lambda k, lab: (f"| {lab} `{r[k]['root']}` | `{r[k]['engine']}` ({s[k]['kv_dtype']} KV) | "
                          f"{s[k]['median_s'] * 1e3:.1f} | {s[k]['min_s'] * 1e3:.1f}-{s[k]['max_s'] * 1e3:.1f} |")
    return "\n".join([
        f"TTFT, 1 image ({s['a']['prompt_tokens']} prompt tokens), {r['threads']} threads, {r['rounds']} rounds of "
        f"alternating fresh processes x {r['runs']} requests; load {r['loadavg_start'][0]:.1f} -> "
        f"{r['loadavg_end'][0]:.1f}", "",
        "| side | engine | median of round medians, ms | range, ms |", "|---|---|---|---|",
        row("a", "A"), row("b", "B"), "",
        f"B / A per round: median {s['b_over_a_median']:.3f} (range {s['b_over_a_min']:.3f}-{s['b_over_a_max']:.3f})",
        ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs=2, metavar=("ROOT", "ENGINE"), required=True, help="baseline checkout and its engine")
    ap.add_argument("--b", nargs=2, metavar=("ROOT", "ENGINE"), required=True,
                    help="checkout under test and its engine")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5, help="timed requests per process (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export", metavar="CHECKPOINT", default=None, help="export a missing ENGINE with its checkout")
    ap.add_argument("--export-args", default="", help="extra `vila-edge export` flags for --export (both sides)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None, help="append the markdown table to DIR/ttft_ab.md")
    args = ap.parse_args(argv)
    sides = {"a": args.a, "b": args.b}
    if args.export:
        for root, engine in sides.values():
            export(root, args.export, engine, args.export_args)
    results = {"a": [], "b": []}
    r = {"threads": args.threads, "rounds": args.rounds, "runs": args.runs, "loadavg_start": list(os.getloadavg()),
         **{k: {"root": v[0], "engine": v[1]} for k, v in sides.items()}}
    for i in range(args.rounds):
        for k in (("a", "b") if i % 2 == 0 else ("b", "a")):
            results[k].append(measure(*sides[k], args.threads, args.runs, args.seed + i))
            print(f"round {i} {k}: {results[k][-1]['median_s'] * 1e3:.1f} ms", file=sys.stderr)
    r["loadavg_end"] = list(os.getloadavg())
    r["per_round"] = results
    r["summary"] = summary(results["a"], results["b"])
    text = markdown(r)
    print(text)
    if args.json:
        save_json(r, args.json)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ttft_ab.md"), "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
