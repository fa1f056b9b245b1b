"""vila-edge bench ENGINE_DIR: how fast is this engine on this machine, and how close to the memory roofline?

    vila-edge bench engines/vila1.5-3b-tiny-fp32 [--threads 2] [--contexts 128,512,1024,2048]

Measures vision encode latency (p50/p90 per image, feature cache bypassed), prefill tokens/s, time to
first token with 1 and 4 images, decode tokens/s at several context lengths, peak host memory, and
the memory bandwidth decode achieves: bytes read per step (LLM weights + the KV of the context) /
step time, against the host's measured streaming-read and copy bandwidths and the Orin datasheet
ceilings. Fixed seed, warm-up, repeated runs, medians. Writes bench.json, bench.md and
decode_vs_context.png under benchmarks/results/<name>/. No torch; matplotlib (the `bench` extra) only for the plot.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

from vila_edge.bench_s2 import bench_vision_by_tiles, markdown_rows, max_tokens_per_image
from vila_edge.atomic import write_text
from vila_edge.kv_cache import KVLayout
from vila_edge.llm import KVConfig
from vila_edge.manifest import Manifest

# Datasheet DRAM bandwidth, GB/s (Jetson module datasheets DS-10662-001 v1.8, DS-10712-001 v1.0,
# DS-11105-001). Orin NX: 128-bit LPDDR5 at 6400 MT/s = 102.4 (often rounded to 102).
ORIN_BANDWIDTH_GBS = {"agx-orin": 204.8, "orin-nx": 102.4, "orin-nano": 68.0}
BLOCK_SIZE = KVConfig().block_size
COPY_BYTES = 256 * 2**20          # > any last-level cache, small enough for a shared machine
PROMPT = "Describe the scene in detail."


def _median(xs):
    return float(statistics.median(xs))


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    mem = 0
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = int(next(l.split()[1] for l in f if l.startswith("MemTotal"))) * 1024
    except OSError:
        pass
    import onnxruntime
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "cpus_available": len(os.sched_getaffinity(0)),
            "threads_used": threads, "ram_bytes": mem, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg())}


def best_seconds(fn, repeats: int = 5) -> float:
    """Fastest of `repeats` timed calls of fn(), after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def host_copy_gbs(nbytes: int = COPY_BYTES, repeats: int = 5) -> float:
    """Measured host memcpy bandwidth, GB/s counting bytes read + bytes written (STREAM 'copy')."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.zeros_like(src)            # both touched: no page faults inside the timed copies
    return 2 * nbytes / best_seconds(lambda: np.copyto(dst, src), repeats) / 1e9


def host_read_gbs(threads: int, nbytes: int = COPY_BYTES, repeats: int = 5) -> float:
    """Measured streaming read bandwidth, GB/s: integer sums over `nbytes` split across `threads`
    threads (numpy drops the GIL in reductions). Decode only reads weights and KV, so this, not the
    copy figure, is its memory ceiling."""
    from concurrent.futures import ThreadPoolExecutor

    data = np.ones(nbytes // 8, np.int64)
    parts = np.array_split(data, threads)
    with ThreadPoolExecutor(threads) as pool:
        return nbytes / best_seconds(lambda: list(pool.map(np.add.reduce, parts)), repeats) / 1e9


def llm_weight_bytes(engine_dir: str, manifest: Manifest) -> int:
    """Bytes of llm.onnx and its external data: the initializers every decode step reads."""
    path = os.path.join(engine_dir, manifest.files["llm"])
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.isfile(p))


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(next(l.split()[1] for l in f if l.startswith("VmHWM"))) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(next(l.split()[1] for l in f if l.startswith("VmRSS"))) * 1024
    except (OSError, StopIteration):
        return 0


def random_images(rng, n: int, size: int) -> list:
    """Distinct noise images (HWC uint8): every one misses the vision cache and the prefix cache."""
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def bench_vision(pipe, rng, runs: int, warmup: int) -> dict:
    size = pipe.manifest.vision.image_size
    times, tiles = [], 0
    for i, img in enumerate(random_images(rng, runs + warmup, size)):
        pipe.vision.clear_cache()
        t = time.perf_counter()
        feats, _ = pipe.vision.encode(img)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        tiles, tokens = len(feats), sum(len(f) for f in feats)
    return {"p50_s": _median(times), "p90_s": _pct(times, 90), "runs": len(times), "tiles_per_image": tiles,
            "tokens_per_image": tokens}


def bench_ttft(pipe, rng, n_images: int, runs: int, warmup: int) -> dict:
    """Cold time to first token: fresh images, and a system prompt with a nonce so no prefix block hits."""
    size = pipe.manifest.vision.image_size
    times, stats = [], {}
    for i in range(runs + warmup):
        with pipe.conversation(system=f"Session {rng.integers(1 << 62)}.") as conv:
            conv.send(random_images(rng, n_images, size), PROMPT, max_new_tokens=1)
            stats = conv.last_stats
        if i >= warmup:
            times.append(stats["ttft_s"])
    return {"images": n_images, "median_s": _median(times), "runs": len(times),
            "prompt_tokens": stats["prompt_tokens"], "cached_tokens": stats["cached_tokens"]}


def _keys(rng, n: int) -> np.ndarray:
    return rng.integers(0, 2**62, n, dtype=np.int64)       # random keys: never a prefix hit


def bench_prefill(llm, rng, hidden: int, tokens: int, runs: int, warmup: int) -> dict:
    times = []
    for i in range(runs + warmup):
        embeds = rng.standard_normal((tokens, hidden), dtype=np.float32)
        seq = ("prefill", i)
        t = time.perf_counter()
        llm.prefill(seq, embeds, _keys(rng, tokens))
        dt = time.perf_counter() - t
        llm.release(seq)
        if i >= warmup:
            times.append(dt)
    return {"tokens": tokens, "median_s": _median(times), "tok_s": tokens / _median(times), "runs": len(times)}


def fill_context(llm, rng, seq, n: int, hidden: int, synthetic: bool, grow: int = 0) -> None:
    """Put n positions in the pool: a real prefill on random embeddings, or (synthetic) reserve and
    commit the blocks without computing them. Decode reads the same bytes either way, whatever
    their values; synthetic fill is for shapes whose prefill would take minutes on this host."""
    if not synthetic:
        llm.prefill(seq, rng.standard_normal((n, hidden), dtype=np.float32), _keys(rng, n), grow)
        return
    llm.blocks.allocate(seq, _keys(rng, n).tolist(), grow)
    llm.blocks.commit(seq, n)


def bench_decode(llm, rng, hidden: int, ctx: int, steps: int, runs: int, warmup: int, synthetic: bool) -> dict:
    """Median seconds per decode step (LLMEngine.extend of one position) at context ctx."""
    seq = ("decode", ctx)
    fill_context(llm, rng, seq, ctx, hidden, synthetic, grow=warmup + runs * steps)
    step_embeds = rng.standard_normal((1, 1, hidden), dtype=np.float32)
    try:
        times, cpu = [], 0.0
        for i in range(warmup + runs * steps):
            t, c = time.perf_counter(), time.process_time()
            llm.extend(seq, step_embeds[0], _keys(rng, 1))
            if i >= warmup:
                times.append(time.perf_counter() - t)
                cpu += time.process_time() - c
    finally:
        llm.release(seq)
    step = _median(times)
    # CPU seconds per step (all threads): wall >> cpu / threads means the cores were busy elsewhere.
    return {"context": ctx, "step_s": step, "tok_s": 1 / step, "p90_step_s": _pct(times, 90), "steps": len(times),
            "cpu_s_per_step": cpu / len(times), "fill": "synthetic" if synthetic else "prefill"}


def add_bandwidth(row: dict, weight_bytes: int, kv_bytes_per_token: int, host_gbs: float, read_gbs: float) -> dict:
    """Bytes per step = weights + KV of the context (reads; writes and a fragmented pool's gathered copy not counted)."""
    step_bytes = weight_bytes + kv_bytes_per_token * row["context"]
    row.update(bytes_per_step=step_bytes, achieved_gbs=step_bytes / row["step_s"] / 1e9)
    row["pct_of_host_copy"] = 100 * row["achieved_gbs"] / host_gbs
    row["pct_of_host_read"] = 100 * row["achieved_gbs"] / read_gbs
    row["orin_ceiling_tok_s"] = {k: bw * 1e9 / step_bytes for k, bw in ORIN_BANDWIDTH_GBS.items()}
    return row


def kv_config(m: Manifest, max_context: int, block_size: int = BLOCK_SIZE) -> KVConfig:
    """A pool of two full contexts (sequences are released between measurements): the default
    (4 contexts of 4096) would take GBs at 3B shapes on a machine others share."""
    layout = KVLayout(m.llm.layers, m.llm.kv_heads, m.llm.head_dim, block_size, np.dtype(m.dtype).name)
    return KVConfig(block_size=block_size, budget=2 * layout.bytes_per_block * -(-max_context // block_size))


def run(args) -> dict:
    from vila_edge.pipeline import Pipeline

    rng = np.random.default_rng(args.seed)
    m = Manifest.load(args.engine)
    threads = args.threads or len(os.sched_getaffinity(0))
    layout = KVLayout(m.llm.layers, m.llm.kv_heads, m.llm.head_dim, BLOCK_SIZE, np.dtype(m.dtype).name)
    decode_tokens = args.warmup + args.repeats * args.decode_steps
    per_image = max_tokens_per_image(m.vision)
    need = max(max(args.contexts, default=0) + decode_tokens + 1, max(args.images, default=0) * per_image + 256)
    max_context = min(need, m.llm.max_positions)
    rss_before_load = current_rss_bytes()
    t = time.perf_counter()
    pipe = Pipeline(args.engine, threads=threads, max_context=max_context, kv=kv_config(m, max_context))
    load_s = time.perf_counter() - t
    out = {"engine": os.path.abspath(args.engine), "name": args.name, "machine": machine_info(threads),
           "note": args.note, "seed": args.seed, "repeats": args.repeats, "warmup": args.warmup,
           "model": {"family": m.family, "dtype": m.dtype, "quant": m.quant.get("method"),
                     "llm_layers": m.llm.layers, "llm_hidden": m.llm.hidden, "kv_heads": m.llm.kv_heads},
           "load_s": load_s, "rss_after_load_bytes": peak_rss_bytes()}
    out["vision"] = bench_vision(pipe, rng, args.repeats * 2, args.warmup)
    if m.vision.multiscale:
        out["vision_by_tiles"] = bench_vision_by_tiles(pipe, rng, args.repeats, args.warmup)
    out["ttft"] = [bench_ttft(pipe, rng, n, args.repeats, args.warmup) for n in args.images
                   if n * out["vision"]["tokens_per_image"] + 128 < max_context]
    hidden = m.llm.hidden
    prefill_tokens = min(args.prefill_tokens, max_context - 1)
    out["prefill"] = bench_prefill(pipe.llm, rng, hidden, prefill_tokens, args.repeats, args.warmup)
    weights = llm_weight_bytes(args.engine, m)
    out["llm_weight_bytes"], out["kv_bytes_per_token"] = weights, layout.bytes_per_token
    rows = []
    for ctx in args.contexts:
        if ctx + decode_tokens >= max_context:
            continue
        synthetic = args.fill == "synthetic" or (
            args.fill == "auto" and ctx / out["prefill"]["tok_s"] > args.max_fill_s)
        rows.append(bench_decode(pipe.llm, rng, hidden, ctx, args.decode_steps, args.repeats, args.warmup, synthetic))
    # Memory is read before the host bandwidth probes, whose buffers (COPY_BYTES each) would
    # otherwise be the process's peak; engine_peak_bytes leaves out the interpreter and libraries.
    peak = peak_rss_bytes()
    out["memory"] = {"peak_rss_bytes": peak, "rss_before_load_bytes": rss_before_load,
                     "engine_peak_bytes": peak - rss_before_load, "kv_pool_bytes": pipe.llm.pool.nbytes,
                     "device_bytes": None, "device_note": "n/a: CPU execution provider"}
    out["host_copy_gbs"], out["host_read_gbs"] = host_copy_gbs(), host_read_gbs(threads)
    out["decode"] = [add_bandwidth(row, weights, layout.bytes_per_token, out["host_copy_gbs"], out["host_read_gbs"])
                     for row in rows]
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    return out


def markdown(r: dict) -> str:
    mc, mib = r["machine"], 2**20
    lines = [f"# vila-edge bench: {r['name']}", "",
             f"Engine `{r['engine']}` ({r['model']['family']}, {r['model']['dtype']}, quant {r['model']['quant']}).",
             f"Machine: {mc['cpu']}, {mc['cpus_available']} CPUs available, {mc['threads_used']} threads, "
             f"{mc['ram_bytes'] / 2**30:.0f} GiB RAM, onnxruntime {mc['onnxruntime']}; load average "
             f"{mc['loadavg_start'][0]:.1f} at start, {mc['loadavg_end'][0]:.1f} at end.",
             f"Medians of {r['repeats']} runs after {r['warmup']} warm-up, seed {r['seed']}."]
    if r["note"]:
        lines += ["", f"**Note:** {r['note']}"]
    v = r["vision"]
    lines += ["", "| measure | value |", "|---|---|",
              f"| vision encode per image ({v['tiles_per_image']} tile(s), {v['tokens_per_image']} tokens) p50 / p90 "
              f"| {v['p50_s'] * 1e3:.1f} / {v['p90_s'] * 1e3:.1f} ms |",
              f"| prefill ({r['prefill']['tokens']} tokens) | {r['prefill']['tok_s']:.1f} tok/s |"]
    for t in r["ttft"]:
        lines.append(f"| time to first token, {t['images']} image(s), {t['prompt_tokens']} prompt tokens "
                     f"| {t['median_s'] * 1e3:.1f} ms |")
    lines += [f"| host RSS after load / peak (before the bandwidth probes) | {r['rss_after_load_bytes'] / mib:.0f} / "
              f"{r['memory']['peak_rss_bytes'] / mib:.0f} MiB |",
              f"| engine peak (peak RSS - RSS before load) | {r['memory']['engine_peak_bytes'] / mib:.0f} MiB |",
              f"| KV pool | {r['memory']['kv_pool_bytes'] / mib:.0f} MiB |",
              "| device memory | n/a (CPU) |",
              f"| LLM weights read per step | {r['llm_weight_bytes'] / mib:.1f} MiB |",
              f"| measured host memcpy (read + write) | {r['host_copy_gbs']:.1f} GB/s |",
              f"| measured host streaming read, {mc['threads_used']} threads | {r['host_read_gbs']:.1f} GB/s |",
              "", "Decode (one position per step; bytes = LLM weights + KV of the context):", "",
              "| context | tok/s | ms/step | CPU ms/step | MB/step | achieved GB/s | % of host read | % of host memcpy "
              "| fill | ceiling tok/s AGX / NX / Nano |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in r["decode"]:
        c = d["orin_ceiling_tok_s"]
        lines.append(f"| {d['context']} | {d['tok_s']:.1f} | {d['step_s'] * 1e3:.2f} | {_ms(d.get('cpu_s_per_step'))} "
                     f"| {d['bytes_per_step'] / 1e6:.1f} "
                     f"| {d['achieved_gbs']:.2f} | {d['pct_of_host_read']:.0f}% | {d['pct_of_host_copy']:.0f}% "
                     f"| {d['fill']} "
                     f"| {c['agx-orin']:.0f} / {c['orin-nx']:.0f} / {c['orin-nano']:.0f} |")
    lines += ["", "CPU ms/step counts all threads: wall time well above CPU time / threads means other processes "
                  "held the cores. Bytes per step count the weights as stored in llm.onnx(.data); an fp16 engine "
                  "on ONNX Runtime's x86 CPU provider may compute on fp32 copies of them (compare RSS after load "
                  "with the file sizes), so its real traffic can be up to 2x the figure.",
              "Ceiling tok/s = Orin datasheet bandwidth (AGX 204.8, NX 102.4, Nano 68 GB/s) / bytes per "
                  "step of this engine: a bound, not a measurement."]
    if r.get("vision_by_tiles"):
        lines += markdown_rows(r["vision_by_tiles"])
    return "\n".join(lines) + "\n"


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f}"


def plot(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([d["context"] for d in r["decode"]], [d["tok_s"] for d in r["decode"]], "o-")
    ax.set(xlabel="context length (tokens)", ylabel="decode tokens/s", title=f"{r['name']}: decode vs context")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_report(r: dict, out_dir: str, stem: str, md: str) -> dict:
    """Write <stem>.json and <stem>.md under out_dir (created if needed); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    write_text(paths["json"], json.dumps(r, indent=2))
    write_text(paths["md"], md)
    return paths


def write_results(r: dict, out_dir: str) -> dict:
    paths = save_report(r, out_dir, "bench", markdown(r))
    paths["png"] = os.path.join(out_dir, "decode_vs_context.png")
    plot(r, paths["png"])
    return paths


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench flags, on `ap` (the `vila-edge bench` subparser, or this module's own parser)."""
    ap.add_argument("engine", help="engine directory to measure")
    ap.add_argument("--name", default=None, help="results folder name (default: the engine folder's name)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"), help="results root (default benchmarks/results)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all CPUs)")
    ap.add_argument("--contexts", type=_ints, default=[128, 512, 1024, 2048],
                    help="comma-separated context lengths for decode tokens/s (default 128,512,1024,2048)")
    ap.add_argument("--images", type=_ints, default=[1, 4], help="image counts for time to first token")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens of the prefill measure")
    ap.add_argument("--decode-steps", type=int, default=16, help="decode steps per run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measure (medians reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before each measure")
    ap.add_argument("--fill", choices=["auto", "prefill", "synthetic"], default="auto",
                    help="how decode contexts are built; auto: synthetic when prefill would exceed --max-fill-s")
    ap.add_argument("--max-fill-s", type=float, default=20.0, help="longest real prefill allowed to fill a context")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random images and tokens")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared machine')")
    return ap


def parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="vila-edge bench", description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))


def run_cli(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments, write the results, print the table."""
    args.name = args.name or os.path.basename(os.path.normpath(args.engine))
    result = run(args)
    paths = write_results(result, os.path.join(args.out, args.name))
    sys.stdout.write(markdown(result) + "\n" + "\n".join(paths.values()) + "\n")
    return 0


def main(argv=None) -> int:
    return run_cli(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
