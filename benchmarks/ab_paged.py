"""Where does a decode step of the paged graph go, and which session choices make it fastest?

    python -m benchmarks.ab_paged engines/smollm2-vila-int4 [--context 512] [--steps 32] [--rounds 5] \
        [--json benchmarks/results/x/ab_paged.json]

1. Profile: ORT's profiler on its own session: per op type, the node time of one decode step
   (summed over the steps of a round, divided), against the wall time of LLMEngine.step (embedding
   gather, metadata, bindings, run, copy out); the difference is the Python and binding overhead.
2. Session options, interleaved rounds in one process (a runner per variant over the same engine,
   each with its own pool): threads 2 vs 1, intra-op spinning on vs off.
3. Batching: B sequences' decode steps in one forward_batch, B = 1, 2, 4, 8: tokens/s of all B.
Each row: the median step over all rounds and the spread of the per-round medians.
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

from benchmarks.common import save_json
from vila_edge import ops
from vila_edge.backend import OrtSession
from vila_edge.llm import KVConfig, LLMEngine
from vila_edge.manifest import Manifest
from vila_edge.ort_paged_runner import OrtPagedLLMRunner
from vila_edge.runner import RunnerOptions, Step, Tokens

BS = 16
SPIN = "session.intra_op.allow_spinning"


def _engine(path, m, threads, max_context, seqs, configure=None):
    session = OrtSession(os.path.join(path, m.files["llm"]), threads, int4_accuracy_level=m.quant.get("accuracy_level") or 4,
                         ops_library=ops.library_path(), configure=configure)
    blocks = seqs * -(-max_context // BS)
    runner = OrtPagedLLMRunner(path, m, blocks, BS, max_context, RunnerOptions(threads=threads), session)
    return LLMEngine(runner, KVConfig(block_size=BS))


def _start(engine, rng, vocab, context, grow, seq="s"):
    ids = rng.integers(0, vocab, context)
    engine.prefill(seq, Tokens(ids), ids, grow=grow)


def _round(engine, rng, vocab, steps, seq="s"):
    times = []
    for _ in range(steps):
        tok = int(rng.integers(0, vocab))
        t = time.perf_counter()
        engine.step(seq, tok)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def profile(path, m, threads, context, steps, rng) -> dict:
    prefix = os.path.join("/tmp", f"ab_paged_{os.getpid()}")
    eng = _engine(path, m, threads, context + 4 * steps, 1, lambda o: (setattr(o, "enable_profiling", True),
                                                                       setattr(o, "profile_file_prefix", prefix)))
    _start(eng, rng, m.llm.vocab_size, context, 4 * steps)
    _round(eng, rng, m.llm.vocab_size, steps)                 # warm-up, then profile a fresh round
    wall = []
    for _ in range(2):
        wall.append(_round(eng, rng, m.llm.vocab_size, steps))
    trace = eng.runner.session.session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    runs = [e for e in events if e.get("name") == "model_run"]
    decode = runs[-2 * steps:]                                  # the profiled decode rounds
    lo = decode[0]["ts"]
    by_op, nodes = defaultdict(float), set()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= lo:
            by_op[e["args"]["op_name"]] += e["dur"]
            nodes.add(e["name"])
    per_step = {k: v / len(decode) / 1e3 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}   # ms
    run_ms = float(np.median([r["dur"] for r in decode])) / 1e3
    return {"context": context, "step_ms": 1e3 * float(np.median(wall)), "model_run_ms": run_ms,
            "nodes_ms": sum(per_step.values()), "nodes_per_step": len(nodes), "by_op_ms": per_step}


def variants(path, m, threads, context, steps, rounds, rng) -> list:
    max_context = context + (rounds + 1) * steps + 1
    spin = lambda on: (lambda o: o.add_session_config_entry(SPIN, "1" if on else "0"))
    engines = {f"threads {threads}, spinning on": _engine(path, m, threads, max_context, 1, spin(True)),
               f"threads {threads}, spinning off": _engine(path, m, threads, max_context, 1, spin(False)),
               "threads 1": _engine(path, m, 1, max_context, 1)}
    for e in engines.values():
        _start(e, rng, m.llm.vocab_size, context, (rounds + 1) * steps)
    per = {k: [] for k in engines}
    for r in range(rounds + 1):
        for k, e in engines.items():
            med = _round(e, rng, m.llm.vocab_size, steps)
            if r:
                per[k].append(med)
    return [_row(k, context, per[k], 1) for k in engines]


def batching(path, m, threads, context, steps, rounds, rng, sizes=(1, 2, 4, 8)) -> list:
    max_context = context + (rounds + 1) * steps + 1
    eng = _engine(path, m, threads, max_context, max(sizes))
    vocab = m.llm.vocab_size
    seqs = [f"s{i}" for i in range(max(sizes))]
    for s in seqs:
        _start(eng, rng, vocab, context, (rounds + 1) * steps, s)
    per = {b: [] for b in sizes}
    for r in range(rounds + 1):
        for b in sizes:
            times = []
            for _ in range(steps // 4):
                toks = rng.integers(0, vocab, b)
                t = time.perf_counter()
                batch = []
                for s, tok in zip(seqs[:b], toks):
                    start = eng.blocks.num_tokens(s)
                    slots = eng.blocks.append(s, [int(tok)])
                    batch.append(Step(Tokens(np.array([tok], np.int64)), start, eng.blocks.block_table(s), slots))
                eng.runner.forward_batch(batch)
                times.append(time.perf_counter() - t)
            if r:
                per[b].append(float(np.median(times)))
    return [_row(f"forward_batch B={b}", context, per[b], b) for b in sizes]


def _row(name, context, per_round, tokens) -> dict:
    med = float(np.median(per_round))
    return {"variant": name, "context": context, "step_ms": 1e3 * med, "tok_s": tokens / med,
            "round_tok_s_min": tokens / max(per_round), "round_tok_s_max": tokens / min(per_round)}


def markdown(r: dict) -> str:
    p = r["profile"]
    lines = [f"threads {r['threads']}, context {p['context']}, load {r['loadavg_start'][0]:.1f} -> "
             f"{r['loadavg_end'][0]:.1f}", "",
             f"Profile of one decode step: LLMEngine.step {p['step_ms']:.2f} ms wall, ORT model_run "
             f"{p['model_run_ms']:.2f} ms, nodes {p['nodes_ms']:.2f} ms over {p['nodes_per_step']} nodes; "
             f"Python + binding: {p['step_ms'] - p['model_run_ms']:.2f} ms", "",
             "| op type | ms per step |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in p["by_op_ms"].items()]
    lines += ["", "| variant | context | tok/s (median) | per-round range |", "|---|---|---|---|"]
    lines += [f"| {x['variant']} | {x['context']} | {x['tok_s']:.1f} | {x['round_tok_s_min']:.1f}-"
              f"{x['round_tok_s_max']:.1f} |" for x in r["rows"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    m, rng = Manifest.load(args.engine), np.random.default_rng(args.seed)
    r = {"engine": os.path.abspath(args.engine), "threads": args.threads, "loadavg_start": list(os.getloadavg())}
    r["profile"] = profile(args.engine, m, args.threads, args.context, args.steps, rng)
    r["rows"] = variants(args.engine, m, args.threads, args.context, args.steps, args.rounds, rng) + \
        batching(args.engine, m, args.threads, args.context, args.steps, args.rounds, rng)
    r["loadavg_end"] = list(os.getloadavg())
    print(markdown(r))
    if args.json:
        save_json(r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
