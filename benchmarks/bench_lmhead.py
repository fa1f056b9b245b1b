"""The lm_head alone: the int8 MatMulNBits over the vocabulary vs the screened head (onnx_llm_fused.screened_head)
at several K, one ORT session each, timed in interleaved rounds (SmolLM2's shape by default, random weights:
the cost does not depend on the values). Also per-op medians from ORT's profiler for the screened heads.

    python -m benchmarks.bench_lmhead [--vocab 49152] [--hidden 576] [--group 64] [--k 16,32,64] [--rows 1,4]
"""
import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np

from benchmarks.common import save_json


def _session(v: int, c: int, group: int, k: int, threads: int, profile: bool = False):
    import onnxruntime as ort

    from vila_edge_export.onnx_graph import Graph
    from vila_edge_export.onnx_llm_fused import DEFAULT_ACCURACY_LEVEL, MS, linear, screened_head
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (v, c)).astype(np.int8)
    scales = (rng.random((v, c // group)) * 0.01 + 0.001).astype(np.float32)
    g = Graph("head", "float32")
    x = g.input("x", "float32", [1, "B", c])
    quant = (codes, scales, group, 8)
    y = screened_head(g, x, quant, k, DEFAULT_ACCURACY_LEVEL) if k else \
        linear(g, x, "lm_head", None, None, quant, DEFAULT_ACCURACY_LEVEL)
    g.output(y, "logits", "float32", [1, "B", v])
    g.opsets = {MS: 1}
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="bench_lmhead_"), "p")
    return ort.InferenceSession(g.model().SerializeToString(), so, providers=["CPUExecutionProvider"])


def _op_medians(sess, x: np.ndarray, runs: int) -> dict:
    for _ in range(runs):
        sess.run(None, {"x": x})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    per = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["args"]["op_name"]].append(e["dur"])
    return {op: float(np.median(d)) for op, d in per.items()}


def run(v: int, c: int, group: int, ks: list, rows: list, threads: int, rounds: int, calls: int) -> dict:
    sessions = {k: _session(v, c, group, k, threads) for k in [0] + ks}
    rng = np.random.default_rng(1)
    out = {"vocab": v, "hidden": c, "group": group, "threads": threads, "rounds": rounds, "calls": calls,
           "loadavg_start": list(os.getloadavg()), "rows": [], "ops_us": {}}
    for b in rows:
        x = rng.standard_normal((1, b, c)).astype(np.float32)
        per = {k: [] for k in sessions}
        for r in range(rounds + 1):              # round 0 warms up
            for k, s in sessions.items():
                t = time.perf_counter()
                for _ in range(calls):
                    s.run(None, {"x": x})
                if r:
                    per[k].append((time.perf_counter() - t) / calls)
        base = float(np.median(per[0]))
        for k, t in per.items():
            med = float(np.median(t))
            out["rows"].append({"rows": b, "screen_k": k, "ms": 1e3 * med, "ms_min": 1e3 * min(t),
                                "ms_max": 1e3 * max(t), "vs_int8": med / base})
    x = rng.standard_normal((1, 1, c)).astype(np.float32)
    for k in [0] + ks:
        out["ops_us"][str(k)] = _op_medians(_session(v, c, group, k, threads, profile=True), x, 200)
    out["loadavg_end"] = list(os.getloadavg())
    return out


def markdown(r: dict) -> str:
    lines = [f"lm_head {r['vocab']} x {r['hidden']} (G {r['group']}), {r['threads']} threads, {r['rounds']} rounds x "
             f"{r['calls']} calls, load {r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f}", "",
             "| rows | head | ms (median) | per-round range | vs int8 |", "|---|---|---|---|---|"]
    for w in r["rows"]:
        name = "int8 MatMulNBits" if not w["screen_k"] else f"screen K={w['screen_k']}"
        lines.append(f"| {w['rows']} | {name} | {w['ms']:.3f} | {w['ms_min']:.3f}-{w['ms_max']:.3f} | {w['vs_int8']:.2f} |")
    lines += ["", "Per-op medians (us, 1 row, ORT profiler):", ""]
    for k, ops in r["ops_us"].items():
        lines.append(f"- {'int8' if k == '0' else 'K=' + k}: " + ", ".join(f"{op} {us:.0f}" for op, us in ops.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--k", default="16,32,64")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    r = run(args.vocab, args.hidden, args.group, [int(k) for k in args.k.split(",")],
            [int(b) for b in args.rows.split(",")], args.threads, args.rounds, args.calls)
    print(markdown(r))
    if args.json:
        save_json(r, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
