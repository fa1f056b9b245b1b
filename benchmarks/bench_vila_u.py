"""VILA-U image generation: seconds per image, vila_edge (ORT engine) vs the torch reference's eager
loop (vila_edge_export/reference_vila_u.py), same checkpoint, same thread count, one run.

    python -m benchmarks.bench_vila_u --checkpoint CKPT --engine ENGINE [--threads 2] [--repeats 1]

Each side runs in its own process, one after the other (both at the 7B-256 widths do not fit this
machine's per-process budget together). Both sample with the reference's settings (cfg 3,
temperature 1, top-k 900, top-p 0.96); rows: total, and vila_edge's LLM / depth / decoder split.
Writes benchmarks/results/<name>/vila_u.json and .md.
"""
import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = "a red cube on the left and a blue ball on the right"


def run_engine(engine: str, threads: int, repeats: int) -> dict:
    from vila_edge.pipeline import Pipeline

    pipe = Pipeline(engine, threads=threads, progress=False)
    times, stats = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        pipe.generate_image(PROMPT, seed=r)
        times.append(time.perf_counter() - t0)
        stats.append(pipe.last_image_stats)
    return {"seconds": times, "split": stats, "positions": pipe.manifest.generation["grid"] ** 2,
            "depth": pipe.manifest.generation["depth"]}


def run_reference(checkpoint: str, threads: int, repeats: int) -> dict:
    import torch
    from vila_edge_export.checkpoint_vila_u import read_vila_u
    from vila_edge_export.reference_vila_u import VilaUReference

    torch.set_num_threads(threads)
    ref = VilaUReference(read_vila_u(checkpoint))
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        ref.decode(ref.generate_codes(PROMPT, generator=torch.Generator().manual_seed(r)))
        times.append(time.perf_counter() - t0)
    return {"seconds": times}


def _child(side: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_vila_u", "--side", side, "--checkpoint", args.checkpoint, "--engine", args.engine,
           "--threads", str(args.threads), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--name", default="vila-u-7b-256")
    ap.add_argument("--note", default="")
    ap.add_argument("--side", choices=["engine", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side == "engine":
        print(json.dumps(run_engine(args.engine, args.threads, args.repeats)))
        return
    if args.side == "reference":
        print(json.dumps(run_reference(args.checkpoint, args.threads, args.repeats)))
        return
    ours, ref = _child("engine", args), _child("reference", args)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    result = {"checkpoint": args.checkpoint, "engine": args.engine, "threads": args.threads, "note": args.note,
              "vila_edge": ours, "reference": ref, "speedup": med(ref["seconds"]) / med(ours["seconds"])}
    out_dir = os.path.join("benchmarks", "results", args.name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vila_u.json"), "w") as f:
        json.dump(result, f, indent=2)
    split = ours["split"][0]
    table = "\n".join([
        f"# VILA-U image generation ({args.name}; {args.note})", "",
        f"{ours['positions']} positions x depth {ours['depth']}, cfg 3 (two sequences), {args.threads} threads, "
        f"{args.repeats} repeat(s), median.", "",
        "| runtime | s / image | LLM steps s | depth steps s | decoder s |", "|---|---|---|---|---|",
        f"| vila_edge (ORT fp32) | {med(ours['seconds']):.2f} | {split['llm_s']:.2f} | {split['depth_s']:.2f} | "
        f"{split['decoder_s']:.2f} |",
        f"| torch reference (eager) | {med(ref['seconds']):.2f} | | | |", "",
        f"speedup: {result['speedup']:.2f}x", ""])
    with open(os.path.join(out_dir, "vila_u.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
