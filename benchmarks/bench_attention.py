"""vila_edge::PagedAttention alone, at a model's attention shape, over a realistic pool: op builds and
KV dtypes side by side, rounds interleaved in one process.

    python -m benchmarks.bench_attention [--lib OLD.so] [--kv float32,float16] [--contexts 128,512,2048] \
        [--shape smollm2|vila1.5-3b] [--layers N] [--threads 2] [--out benchmarks/results/attention]

Shapes: smollm2 (SmolLM2-135M: 30 layers, 9 q / 3 kv heads of 64) and vila1.5-3b (VILA1.5-3B's
Sheared-LLaMA-2.7B: 32 layers, 32 q / 32 kv heads of 80; --layers 8 matches engines/vila1.5-3b-L8V27).

One ONNX graph of L PagedAttention nodes (one per layer, each over its own K and V pool of
`context + 1` positions in shuffled blocks of 16, rotary inside), so one run reads the KV bytes a
decode step reads (SmolLM2: 30 layers of 3 KV heads x 64 at 512 positions, 23.6 MB fp32), not one layer's
cache-resident pool. Variants: every --lib (default: the built library) x every --kv dtype; each
--lib is copied to its own path, so two builds of the same op load side by side. Per (variant,
case): the median of `rounds` round medians and their range; cases: a decode token at each
context, 4 sequences' decode tokens in one pass, and a 128-token prefill.
"""
import argparse
import os
import shutil
import sys
import tempfile

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from benchmarks.common import finish, machine_info, timed
from vila_edge import ops

BS, MAX_POS = 16, 4096
SHAPES = {"smollm2": {"hq": 9, "hkv": 3, "d": 64, "layers": 30},          # SmolLM2-135M
          "vila1.5-3b": {"hq": 32, "hkv": 32, "d": 80, "layers": 32}}     # VILA1.5-3B's LLM (MHA)
ONNX_TYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def _graph(sh: dict, kv: str) -> bytes:
    """sh["layers"] nodes sharing qkv, metadata and rotary caches; pools key_i/value_i in `kv`."""
    f32 = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
    ins = [f32("qkv")] + [helper.make_tensor_value_info(f"{n}_{l}", ONNX_TYPE[kv], None)
                          for l in range(sh["layers"]) for n in ("key", "value")]
    ins += [helper.make_tensor_value_info(n, TensorProto.INT32, None)
            for n in ("block_tables", "seq_lens", "query_start_loc", "slot_mapping")] + [f32("cos"), f32("sin")]
    nodes = [helper.make_node("PagedAttention", ["qkv", f"key_{l}", f"value_{l}", "block_tables", "seq_lens",
                                                 "query_start_loc", "slot_mapping", "cos", "sin"], [f"out_{l}"],
                              domain=ops.DOMAIN, num_heads=sh["hq"], num_kv_heads=sh["hkv"], scale=0.0)
             for l in range(sh["layers"])]
    graph = helper.make_graph(nodes, "attention", ins, [f32(f"out_{l}") for l in range(sh["layers"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid(ops.DOMAIN, 1)]).SerializeToString()


def _session(lib: str, sh: dict, kv: str, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(lib)
    return ort.InferenceSession(_graph(sh, kv), so, providers=["CPUExecutionProvider"])


def _feeds(rng, sh: dict, kv: str, past: list, new: list) -> dict:
    """Sequences with `past` positions already in shuffled pool blocks, `new` tokens to run."""
    need = [-(-(p + n) // BS) for p, n in zip(past, new)]
    nb = sum(need)
    blocks = rng.permutation(nb).astype(np.int32)
    tables, at = np.zeros((len(past), max(need)), np.int32), 0
    for b, k in enumerate(need):
        tables[b, :k], at = blocks[at: at + k], at + k
    slots = [tables[b, p // BS] * BS + p % BS for b in range(len(past)) for p in range(past[b], past[b] + new[b])]
    d = sh["d"]
    angles = np.arange(MAX_POS)[:, None] / 10000.0 ** (np.arange(d // 2) / (d // 2))     # [MAX_POS, D/2]
    feeds = {"qkv": rng.standard_normal((sum(new), (sh["hq"] + 2 * sh["hkv"]) * d)).astype(np.float32),
             "block_tables": tables, "seq_lens": np.array(past, np.int32) + np.array(new, np.int32),
             "query_start_loc": np.concatenate([[0], np.cumsum(new)]).astype(np.int32),
             "slot_mapping": np.array(slots, np.int32),
             "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}
    for l in range(sh["layers"]):
        for n in ("key", "value"):
            feeds[f"{n}_{l}"] = rng.standard_normal((nb, BS, sh["hkv"], d)).astype(kv)
    return feeds


def _cases(contexts: list) -> dict:
    """name -> (past, new): decode tokens at each context, a batch of 4 decodes, a prefill."""
    cases = {f"decode {c}": ([c - 1], [1]) for c in contexts}
    cases[f"decode 4 x {contexts[-1] // 4}"] = ([contexts[-1] // 4 - 1] * 4, [1] * 4)
    cases["prefill 128"] = ([0], [128])
    return cases


def run(libs: list, kvs: list, contexts: list, threads: int, rounds: int, runs: int, seed: int,
        sh: dict = SHAPES["smollm2"]) -> dict:
    tmp = tempfile.mkdtemp(prefix="bench_attention_")
    copies = {}
    for i, lib in enumerate(libs):                     # distinct paths: dlopen loads each build once
        copies[lib] = os.path.join(tmp, f"lib{i}.so")
        shutil.copy(lib, copies[lib])
    variants, skipped = {}, []
    for lib in libs:
        for kv in kvs:
            name = f"{os.path.basename(lib)} kv {kv}"
            try:
                variants[name] = (_session(copies[lib], sh, kv, threads), kv)
            except ort.capi.onnxruntime_pybind11_state.Fail as e:    # an older build without this pool dtype
                skipped.append(f"{name}: {str(e).splitlines()[0][-120:]}")
    rng = np.random.default_rng(seed)
    rows = []
    for case, (past, new) in _cases(contexts).items():
        feeds = {kv: _feeds(rng, sh, kv, past, new) for kv in kvs}     # the same pool for every build
        per = {v: [] for v in variants}
        for _ in range(rounds):
            for v, (sess, kv) in variants.items():
                per[v].append(float(np.median(timed(lambda: sess.run(None, feeds[kv]), runs, warmup=2))))
        for v, meds in per.items():
            rows.append({"case": case, "variant": v, "tokens": int(sum(new)), "ms": 1e3 * float(np.median(meds)),
                         "ms_min": 1e3 * min(meds), "ms_max": 1e3 * max(meds)})
        print(f"{case}: " + ", ".join(f"{r['variant']} {r['ms']:.3f} ms" for r in rows if r["case"] == case), flush=True)
    shutil.rmtree(tmp)
    return {"threads": threads, "layers": sh["layers"], "shape": {"hq": sh["hq"], "hkv": sh["hkv"], "d": sh["d"],
                                                                 "block": BS, "name": sh.get("name")},
            "rounds": rounds, "runs_per_round": runs, "rows": rows, "skipped": skipped}


def markdown(r: dict) -> str:
    base = {}
    lines = [f"PagedAttention x {r['layers']} layers (Hq {r['shape']['hq']}, Hkv {r['shape']['hkv']}, D "
             f"{r['shape']['d']}), {r['threads']} threads; median of {r['rounds']} round medians "
             f"({r['runs_per_round']} runs each); speed-up = the case's first variant's ms / this one's. "
             f"Load average {r['machine']['loadavg_start'][0]:.1f} -> {r['machine'].get('loadavg_end', [0])[0]:.1f} "
             f"on {r['machine']['cpus_available']} CPUs ({r['machine']['cpu']}).", "",
             f"| case | variant | ms per pass ({r['layers']} layers) | range | speed-up |", "|---|---|---|---|---|"]
    for x in r["rows"]:
        b = base.setdefault(x["case"], x["ms"])
        lines.append(f"| {x['case']} | {x['variant']} | {x['ms']:.3f} | {x['ms_min']:.3f}-{x['ms_max']:.3f} | "
                     f"{b / x['ms']:.2f}x |")
    lines += [""] + [f"Not loadable: {s}" for s in r["skipped"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", action="append", default=[], help="an op library to compare (repeatable); "
                    "the built one (vila_edge/ops) is always last")
    ap.add_argument("--kv", default="float32,float16", help="KV pool dtypes, comma-separated")
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="PagedAttention nodes (default: the shape's depth)")
    ap.add_argument("--out", default=None, help="write bench_attention.json and .md here")
    args = ap.parse_args(argv)
    machine = machine_info(args.threads)
    sh = dict(SHAPES[args.shape], name=args.shape)
    if args.layers:
        sh["layers"] = args.layers
    r = run(args.lib + [ops.library_path()], args.kv.split(","), [int(c) for c in args.contexts.split(",")],
            args.threads, args.rounds, args.runs, args.seed, sh)
    r["machine"] = machine
    if args.out:
        finish(r, args.out, "bench_attention", markdown)
    else:
        r["machine"]["loadavg_end"] = list(os.getloadavg())
        print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
