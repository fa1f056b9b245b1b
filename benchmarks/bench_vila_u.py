"""VILA-U image generation: seconds per image, vila_edge (ORT engines: fp32, int4, ...) vs the torch
reference's eager loop (vila_edge_export/reference_vila_u.py), same checkpoint, same thread count.

    python -m benchmarks.bench_vila_u --checkpoint CKPT --engine ENGINE [--engine ENGINE2 ...]
        [--threads 2] [--repeats 1] [--reference-json FILE]

Each side runs in its own process, one after the other (two 7B-256-width models do not fit this
machine's per-process budget together). Every side samples with the reference's settings (cfg 3,
temperature 1, top-k 900, top-p 0.96, seed r for repeat r); rows: total and vila_edge's split into
LLM passes (prefill + 255 steps, cond and uncond rows), depth-transformer passes (+ sampling) and
the pixel decoder (sampling's share of the depth time is in the JSON, sample_s). The reference runs
as the official loop does (torch.inference_mode; a dummy text token computed and sampled at every
position, which vila_edge skips): its row, and the same less that token's seconds (text_head_s). --reference-json /
--engine-json reuse sides measured by separate `--side reference|engine` runs (their JSON line), for
machines where one job must stay short; the table then says so.
Writes benchmarks/results/<name>/vila_u.json and .md.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import vila_u_scale

PROMPT = "a red cube on the left and a blue ball on the right"
# Every side first runs WARMUP positions of another prompt and one decoder pass, untimed: first-call costs
# (ORT's arena growth, oneDNN primitive creation) are paid once per process, not once per image, and the
# per-image extrapolation of a --positions run would multiply them. Another prompt: only the unconditional
# prompt (the same for every request, issue #16) is then in vila_edge's prefix cache, as in service.
WARMUP_PROMPT, WARMUP = "a green tree", 2


def run_engine(engine: str, threads: int, repeats: int, positions: int = 0) -> dict:
    import numpy as np
    from vila_edge import imagine
    from vila_edge.pipeline import Pipeline

    pipe = Pipeline(engine, threads=threads, progress=False)
    g, D = pipe.manifest.generation["grid"], pipe.manifest.generation["depth"]

    def first(prompt: str, n: int, rng) -> dict:
        """The first n positions of the image (generate_image's loop), then one decode."""
        s = {"llm_s": 0.0, "depth_s": 0.0, "decoder_s": 0.0, "cached_tokens": []}
        imagine._codes(pipe, list(imagine.prompt_ids(pipe, prompt)), n, 3.0,
                       lambda t, d, logits: imagine.sample(logits, 1.0, 900, 0.96, rng), s, imagine._Progress(None, n))
        t1 = time.perf_counter()
        pipe.imager.decode(np.zeros((1, g, g, D), np.int64))
        s["decoder_s"] = time.perf_counter() - t1
        return s
    first(WARMUP_PROMPT, WARMUP, np.random.default_rng(0))
    times, stats = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        if positions:
            pipe.last_image_stats = first(PROMPT, positions, np.random.default_rng(r))
        else:
            pipe.generate_image(PROMPT, seed=r)
        times.append(time.perf_counter() - t0)
        stats.append(pipe.last_image_stats)
    m = pipe.manifest
    return {"seconds": times, "split": stats, "positions": m.generation["grid"] ** 2, "depth": m.generation["depth"],
            "kind": f"{m.dtype} LLM {m.quant.get('method', 'none')}, depth "
                    f"{'int4' if m.generation.get('depth_bits') else m.dtype}"}


def run_reference(checkpoint: str, threads: int, repeats: int, positions: int = 0) -> dict:
    """The reference's eager loop as the official code runs it: inference mode, and the dummy text token
    the official loop computes and samples at every position (reference_vila_u._text_head), timed apart
    (text_head_s) so the table can show the loop without it too."""
    import torch
    from vila_edge_export.checkpoint_vila_u import read_vila_u
    from vila_edge_export.reference_vila_u import VilaUReference

    torch.set_num_threads(threads)
    ref = VilaUReference(read_vila_u(checkpoint))
    g, D = ref.spec.siglip.grid, ref.spec.depth
    with torch.inference_mode():
        ref.generate_codes(WARMUP_PROMPT, generator=torch.Generator().manual_seed(0), positions=WARMUP, text_head=True)
        ref.decode(torch.zeros(1, g, g, D, dtype=torch.int64))
    times, split = [], []
    for r in range(repeats):
        timing = {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            codes = ref.generate_codes(PROMPT, generator=torch.Generator().manual_seed(r), positions=positions or None,
                                       timing=timing, text_head=True)
            t1 = time.perf_counter()
            ref.decode(torch.zeros(1, g, g, D, dtype=torch.int64) if positions else codes)
        times.append(time.perf_counter() - t0)
        split.append({"loop_s": t1 - t0, "decoder_s": time.perf_counter() - t1,
                      **{k: timing[k] for k in ("prefill_s", "llm_s", "depth_s", "text_head_s")}})
    return {"seconds": times, "split": split}


def without_head(ref: dict) -> dict:
    """The reference side less its dummy text token's seconds (the loop a runtime that skips it would run)."""
    split = [dict(s, loop_s=s["loop_s"] - s.get("text_head_s", 0.0), text_head_s=0.0) for s in ref["split"]]
    return {"seconds": [t - s.get("text_head_s", 0.0) for t, s in zip(ref["seconds"], ref["split"])], "split": split}


def per_image_all(side: dict, positions: int, total: int) -> list:
    """Seconds per whole image from each repeat of a run of the first `positions`: the prefill once,
    the rest of the position loop scaled to `total` positions (each costs about the same: the LLM's
    context grows by < 2x), plus the decoder."""
    out = []
    for seconds, s in zip(side["seconds"], side["split"]):
        loop = s["loop_s"] if "loop_s" in s else seconds - s["decoder_s"]
        prefill = s.get("prefill_s", 0.0)
        out.append(prefill + (loop - prefill) * total / positions + s["decoder_s"])
    return out


def per_image(side: dict, positions: int, total: int) -> float:
    """The median over repeats of per_image_all."""
    return _med(per_image_all(side, positions, total))


def _child(side: str, args, engine: str = "") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_vila_u", "--side", side, "--checkpoint", args.checkpoint,
           "--engine", engine or "-", "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--positions", str(args.positions)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _med(xs: list) -> float:
    import statistics

    return statistics.median(xs)


def _table(args, ours: dict, ref: dict) -> str:
    first = next(iter(ours.values()))
    bare = without_head(ref)
    unit = "image" if not args.positions else f"{args.positions} positions"
    lines = [f"# VILA-U image generation ({args.name}; {args.note})", "",
             (f"the first {args.positions} of " if args.positions else "")
             + f"{first['positions']} positions x depth {first['depth']} (+ one decoder pass), cfg 3 (two rows per LLM pass), "
             f"{args.threads} threads, {args.repeats} repeat(s): median [min-max]; the split is repeat 0's. The reference "
             "is the official eager loop (torch.inference_mode), which also computes and samples a dummy text token "
             "at every position (lm_head; vila_edge skips it); the row below it subtracts that token's time."
             + (" Sides measured in separate runs of `--side` (--reference-json / --engine-json), one after another."
                if args.reference_json or args.engine_json else ""),
             "", f"| runtime | s / {unit} | LLM passes s | depth passes s | decoder s | speedup vs reference "
                 f"| vs reference without its text token |",
             "|---|---|---|---|---|---|---|"]
    spread = lambda xs: f"{_med(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"
    for engine, r in ours.items():
        s = r["split"][0]
        lines.append(f"| vila_edge {os.path.basename(engine.rstrip('/'))} ({r['kind']}) | {spread(r['seconds'])} "
                     f"| {s['llm_s']:.1f} | {s['depth_s']:.1f} | {s['decoder_s']:.1f} "
                     f"| {_med(ref['seconds']) / _med(r['seconds']):.2f}x | {_med(bare['seconds']) / _med(r['seconds']):.2f}x |")
    rs = ref.get("split", [{}])[0]
    part = lambda k: f"{rs[k]:.1f}" if k in rs else ""
    lines.append(f"| torch reference (eager fp32, official loop) | {spread(ref['seconds'])} | {part('llm_s')} "
                 f"| {part('depth_s')} | {rs.get('decoder_s', 0):.1f} | 1.00x | |")
    lines.append(f"| torch reference without its text token ({rs.get('text_head_s', 0):.1f} s) | "
                 f"{spread(bare['seconds'])} | | | {rs.get('decoder_s', 0):.1f} | | 1.00x |")
    if args.positions and "split" in ref:
        total = first["positions"]
        want, want_bare = per_image(ref, args.positions, total), per_image(bare, args.positions, total)
        lines += ["", f"Per whole image, extrapolated (prefill once + the rest of the position loop x {total}/"
                      f"{args.positions} + decoder):", "",
                  "| runtime | s / image (extrapolated), median [min-max] | speedup vs reference | vs reference without its text token |",
                  "|---|---|---|---|"]
        for engine, r in ours.items():
            mine = per_image(r, args.positions, total)
            lo, hi = min(per_image_all(r, args.positions, total)), max(per_image_all(r, args.positions, total))
            lines.append(f"| vila_edge {os.path.basename(engine.rstrip('/'))} | {mine:.0f} [{lo:.0f}-{hi:.0f}] "
                         f"| {want / mine:.2f}x "
                         f"| {want_bare / mine:.2f}x |")
        lo, hi = min(per_image_all(ref, args.positions, total)), max(per_image_all(ref, args.positions, total))
        lines.append(f"| torch reference (eager fp32, official loop) | {want:.0f} [{lo:.0f}-{hi:.0f}] | 1.00x | |")
        lines.append(f"| torch reference without its text token | {want_bare:.0f} | | 1.00x |")
    return "\n".join(lines + _scaled_lines(args, ours, ref) + [""])


def _scales(args, ref: dict) -> bool:
    """A 7B-256-width checkpoint and a reference side that recorded its split (older JSON did not)."""
    from vila_edge_export.checkpoint_vila_u import read_vila_u

    return all("llm_s" in s for s in ref.get("split", [{}])) and vila_u_scale.applies(read_vila_u(args.checkpoint))


def scaled(args, side: dict, total: int) -> list:
    """Per-image seconds of every repeat at the full 7B-256 layer counts (benchmarks/vila_u_scale.py)."""
    from vila_edge_export.checkpoint_vila_u import read_vila_u

    f = vila_u_scale.factors(read_vila_u(args.checkpoint))
    return [vila_u_scale.scaled_image(t, s, args.positions or total, total, f) for t, s in zip(side["seconds"], side["split"])]


def _scaled_lines(args, ours: dict, ref: dict) -> list:
    if not _scales(args, ref):
        return []
    total = next(iter(ours.values()))["positions"]
    want, want_bare = _med(scaled(args, ref, total)), _med(scaled(args, without_head(ref), total))
    L, H = vila_u_scale.FULL_LLM_LAYERS, vila_u_scale.FULL_DEPTH_LAYERS
    lines = ["", f"Per whole image at the full vila-u-7b-256 depth ({L} LLM layers, {H} depth-transformer layers), "
                 "each part scaled per layer by the weight bytes it reads (benchmarks/vila_u_scale.py):", "",
             "| runtime | s / image (scaled), median [min-max] | speedup vs reference | vs reference without its text token |",
             "|---|---|---|---|"]
    for engine, r in ours.items():
        xs = scaled(args, r, total)
        lines.append(f"| vila_edge {os.path.basename(engine.rstrip('/'))} | {_med(xs):.0f} [{min(xs):.0f}-{max(xs):.0f}] "
                     f"| {want / _med(xs):.2f}x | {want_bare / _med(xs):.2f}x |")
    xs = scaled(args, ref, total)
    lines.append(f"| torch reference (eager fp32, official loop) | {want:.0f} [{min(xs):.0f}-{max(xs):.0f}] | 1.00x | |")
    lines.append(f"| torch reference without its text token | {want_bare:.0f} | | 1.00x |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--engine", action="append", required=True, help="an engine dir (repeat for several)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--name", default="vila-u-7b-256")
    ap.add_argument("--note", default="")
    ap.add_argument("--reference-json", help="the reference side's JSON (a `--side reference` run) instead of running it")
    ap.add_argument("--engine-json", action="append", default=[],
                    help="an engine side's JSON (a `--side engine` run), one per --engine in order, instead of running it")
    ap.add_argument("--positions", type=int, default=0,
                    help="time only the first N grid positions (+ one decoder pass) on every side; 0: the whole image")
    ap.add_argument("--side", choices=["engine", "reference"], help="run one side in this process, print its JSON")
    args = ap.parse_args(argv)
    if args.side == "engine":
        print(json.dumps(run_engine(args.engine[-1], args.threads, args.repeats, args.positions)))
        return
    if args.side == "reference":
        print(json.dumps(run_reference(args.checkpoint, args.threads, args.repeats, args.positions)))
        return
    ours = {}
    for i, engine in enumerate(args.engine):
        if i < len(args.engine_json):
            with open(args.engine_json[i]) as f:
                ours[engine] = json.loads(f.read().strip().splitlines()[-1])
            continue
        ours[engine] = _child("engine", args, engine)
        print(f"{engine}: {ours[engine]['seconds']}", file=sys.stderr)
    if args.reference_json:
        with open(args.reference_json) as f:
            ref = json.loads(f.read().strip().splitlines()[-1])
    else:
        ref = _child("reference", args)
    result = {"checkpoint": args.checkpoint, "threads": args.threads, "repeats": args.repeats, "note": args.note,
              "prompt": PROMPT, "positions": args.positions or "all", "vila_edge": ours, "reference": ref,
              "sides_reused": bool(args.reference_json or args.engine_json),
              "speedup": {e: _med(ref["seconds"]) / _med(r["seconds"]) for e, r in ours.items()},
              "speedup_vs_reference_without_text_token": {e: _med(without_head(ref)["seconds"]) / _med(r["seconds"])
                                                          for e, r in ours.items()}}
    if args.positions:
        total = next(iter(ours.values()))["positions"]
        result["per_image_extrapolated"] = {
            "reference": per_image(ref, args.positions, total),
            "reference_without_text_token": per_image(without_head(ref), args.positions, total),
            **{e: per_image(r, args.positions, total) for e, r in ours.items()}}
    if _scales(args, ref):
        total = next(iter(ours.values()))["positions"]
        result["per_image_full_depth_scaled"] = {
            "layers": [vila_u_scale.FULL_LLM_LAYERS, vila_u_scale.FULL_DEPTH_LAYERS],
            "reference": _med(scaled(args, ref, total)),
            "reference_without_text_token": _med(scaled(args, without_head(ref), total)),
            **{e: _med(scaled(args, r, total)) for e, r in ours.items()}}
    out_dir = os.path.join("benchmarks", "results", args.name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vila_u.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = _table(args, ours, ref)
    with open(os.path.join(out_dir, "vila_u.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
