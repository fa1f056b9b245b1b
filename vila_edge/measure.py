"""vila-edge bench ENGINE_DIR: how fast does this engine run on this machine?

    vila-edge bench engines/my-model [--threads 4] [--contexts 128,512,1024,2048] [--json bench.json]

What a robot developer reads on the device, with the runtime alone (no torch, no plotting, no
benchmarks/ folder): vision encode latency (p50/p90 per image, feature cache bypassed), prefill
tokens/s, time to first token with 1 and 4 images, decode tokens/s at several context lengths
(with the bytes each step reads and the GB/s that makes), load time and memory (RSS after load,
peak, the KV pool). Fixed seed, warm-up, repeated runs, medians. Prints a summary; --json writes
every figure. The full report with the host's bandwidth ceilings, the Orin datasheet ceilings,
a markdown table and a plot is `python -m benchmarks.engine` in a source checkout (make bench).
"""
import argparse
import json
import os
import platform
import resource
import time

import numpy as np

from vila_edge.kv_cache import KVLayout
from vila_edge.llm import KVConfig

PROMPT = "Describe the scene in detail."
BLOCK_SIZE = KVConfig().block_size
MiB = 2**20


# ---- the machine and the process ---------------------------------------------------------------

def machine_info(threads: int) -> dict:
    """What a result needs to be compared: CPU, threads, RAM, library versions, load at start."""
    import onnxruntime

    cpu, mem = platform.processor() or platform.machine(), 0
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = int(next(l.split()[1] for l in f if l.startswith("MemTotal"))) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "cpus_available": len(os.sched_getaffinity(0)),
            "threads_used": threads, "ram_bytes": mem, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg())}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return int(next(l.split()[1] for l in f if l.startswith(field)))
    except (OSError, StopIteration):
        return None


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    return (_status_kib("VmRSS") or 0) * 1024


def spread(times: list) -> dict:
    """Median and spread of timed runs (seconds): what every figure reports, never one run."""
    t = np.asarray(times, np.float64)
    return {"median_s": float(np.median(t)), "p10_s": float(np.percentile(t, 10)),
            "p90_s": float(np.percentile(t, 90)), "min_s": float(t.min()), "max_s": float(t.max()), "runs": len(t)}


# ---- the measures ------------------------------------------------------------------------------

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
    s = spread(times)
    return {"p50_s": s["median_s"], "p90_s": s["p90_s"], "runs": s["runs"], "tiles_per_image": tiles,
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
    return {"images": n_images, "median_s": spread(times)["median_s"], "runs": len(times),
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
    median = spread(times)["median_s"]
    return {"tokens": tokens, "median_s": median, "tok_s": tokens / median, "runs": len(times)}


def fill_context(llm, rng, seq, n: int, hidden: int, synthetic: bool, grow: int = 0) -> None:
    """Put n positions in the pool: a real prefill on random embeddings, or (synthetic) reserve and
    commit the blocks without computing them. Decode reads the same bytes either way, whatever
    their values; synthetic fill is for shapes whose prefill would take minutes on this host."""
    if not synthetic:
        llm.prefill(seq, rng.standard_normal((n, hidden), dtype=np.float32), _keys(rng, n), grow)
        return
    llm.blocks.allocate(seq, _keys(rng, n).tolist(), grow)
    llm.blocks.commit(seq, n)


def bench_decode(llm, rng, hidden: int, ctx: int, steps: int, runs: int, warmup: int, synthetic: bool,
                 vocab: int) -> dict:
    """Median seconds per decode step at context ctx: what generation runs per new token, LLMEngine.step
    of a text id (random, in 0..vocab-1; the scheduler's one-sequence path, runner.decode) and the greedy
    pick of its logits. (Through stop 32 this timed LLMEngine.extend of a float embedding row: the
    general forward path, ~0.3 ms of Python and binding a step more than a token step takes,
    benchmarks/profile_decode.py; peers are fed token ids too.)"""
    seq = ("decode", ctx)
    fill_context(llm, rng, seq, ctx, hidden, synthetic, grow=warmup + runs * steps)
    tokens = rng.integers(0, vocab, warmup + runs * steps).tolist()
    try:
        times, cpu = [], 0.0
        for i, token in enumerate(tokens):
            t, c = time.perf_counter(), time.process_time()
            int(np.argmax(llm.step(seq, token)))
            if i >= warmup:
                times.append(time.perf_counter() - t)
                cpu += time.process_time() - c
    finally:
        llm.release(seq)
    s = spread(times)
    # CPU seconds per step (all threads): wall >> cpu / threads means the cores were busy elsewhere.
    return {"context": ctx, "step_s": s["median_s"], "tok_s": 1 / s["median_s"], "p90_step_s": s["p90_s"],
            "steps": s["runs"], "cpu_s_per_step": cpu / len(times), "fill": "synthetic" if synthetic else "prefill"}


def llm_weight_bytes(engine_dir: str, manifest) -> int:
    """Bytes of llm.onnx and its external data: the initializers every decode step reads."""
    path = os.path.join(engine_dir, manifest.files["llm"])
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.isfile(p))


def kv_layout(m, block_size: int = BLOCK_SIZE) -> KVLayout:
    return KVLayout(m.llm.layers, m.llm.kv_heads, m.llm.head_dim, block_size, np.dtype(m.kv_dtype).name)


def kv_config(m, max_context: int, block_size: int = BLOCK_SIZE) -> KVConfig:
    """A pool of two full contexts (sequences are released between measurements): the default
    (4 contexts of 4096) would take GBs at 3B shapes on a machine others share."""
    per_block = kv_layout(m, block_size).bytes_per_block
    return KVConfig(block_size=block_size, budget=2 * per_block * -(-max_context // block_size))


def run(args) -> dict:
    """Every measure on args.engine with the flags of `add_arguments`; the result as a dict."""
    from vila_edge.manifest import Manifest
    from vila_edge.measure_tiles import bench_vision_by_tiles, max_tokens_per_image
    from vila_edge.pipeline import Pipeline

    rng = np.random.default_rng(args.seed)
    m = Manifest.load(args.engine)
    threads = args.threads or len(os.sched_getaffinity(0))
    decode_tokens = args.warmup + args.repeats * args.decode_steps
    need = max(max(args.contexts, default=0) + decode_tokens + 1,
               max(args.images, default=0) * max_tokens_per_image(m.vision) + 256)
    max_context = min(need, m.llm.max_positions)
    rss_before_load = current_rss_bytes()
    t = time.perf_counter()
    pipe = Pipeline(args.engine, threads=threads, max_context=max_context, kv=kv_config(m, max_context))
    out = {"engine": os.path.abspath(args.engine), "machine": machine_info(threads), "seed": args.seed,
           "repeats": args.repeats, "warmup": args.warmup,
           "model": {"family": m.family, "dtype": m.dtype, "quant": m.quant.get("method"),
                     "llm_layers": m.llm.layers, "llm_hidden": m.llm.hidden, "kv_heads": m.llm.kv_heads},
           "load_s": time.perf_counter() - t, "rss_after_load_bytes": peak_rss_bytes()}
    out["vision"] = bench_vision(pipe, rng, args.repeats * 2, args.warmup)
    if m.vision.multiscale:
        out["vision_by_tiles"] = bench_vision_by_tiles(pipe, rng, args.repeats, args.warmup)
    out["ttft"] = [bench_ttft(pipe, rng, n, args.repeats, args.warmup) for n in args.images
                   if n * out["vision"]["tokens_per_image"] + 128 < max_context]
    out["prefill"] = bench_prefill(pipe.llm, rng, m.llm.hidden, min(args.prefill_tokens, max_context - 1),
                                   args.repeats, args.warmup)
    weights, per_token = llm_weight_bytes(args.engine, m), kv_layout(m).bytes_per_token
    out["llm_weight_bytes"], out["kv_bytes_per_token"] = weights, per_token
    out["decode"] = []
    for ctx in args.contexts:
        if ctx + decode_tokens >= max_context:
            continue
        synthetic = args.fill == "synthetic" or (args.fill == "auto" and ctx / out["prefill"]["tok_s"] > args.max_fill_s)
        row = bench_decode(pipe.llm, rng, m.llm.hidden, ctx, args.decode_steps, args.repeats, args.warmup, synthetic,
                           m.llm.vocab_size)
        # Reads per step: the weights + the KV of the context (writes, and a fragmented pool's
        # gathered copy of the past, are not counted: a lower bound on traffic).
        row["bytes_per_step"] = weights + per_token * ctx
        row["achieved_gbs"] = row["bytes_per_step"] / row["step_s"] / 1e9
        out["decode"].append(row)
    peak = peak_rss_bytes()
    out["memory"] = {"peak_rss_bytes": peak, "rss_before_load_bytes": rss_before_load,
                     "engine_peak_bytes": peak - rss_before_load, "kv_pool_bytes": pipe.llm.pool.nbytes,
                     "device_bytes": None, "device_note": "n/a: CPU execution provider"}
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    return out


def summary(r: dict) -> str:
    """The figures as plain lines: what `vila-edge bench` prints."""
    mc, md, v = r["machine"], r["model"], r["vision"]
    lines = [f"{r['engine']}: {md['family']}, {md['dtype']}, quant {md['quant']}; {mc['threads_used']} threads on "
             f"{mc['cpu']}; medians of {r['repeats']} runs; load average {mc['loadavg_start'][0]:.1f} -> "
             f"{mc['loadavg_end'][0]:.1f}",
             f"  load                      {r['load_s']:.2f} s",
             f"  vision encode per image   p50 {v['p50_s'] * 1e3:.1f} ms, p90 {v['p90_s'] * 1e3:.1f} ms "
             f"({v['tiles_per_image']} tile(s), {v['tokens_per_image']} tokens)"]
    lines += [f"  vision, {t['case']:<24}p50 {t['p50_s'] * 1e3:.1f} ms ({t['tokens']} tokens)"
              for t in r.get("vision_by_tiles", [])]
    lines.append(f"  prefill                   {r['prefill']['tok_s']:.1f} tok/s ({r['prefill']['tokens']} tokens)")
    lines += [f"  time to first token       {t['median_s'] * 1e3:.1f} ms ({t['images']} image(s), "
              f"{t['prompt_tokens']} prompt tokens)" for t in r["ttft"]]
    lines += [f"  decode at context {d['context']:<7} {d['tok_s']:.1f} tok/s ({d['step_s'] * 1e3:.2f} ms/step, "
              f"{d['bytes_per_step'] / 1e6:.1f} MB/step, {d['achieved_gbs']:.2f} GB/s)" for d in r["decode"]]
    mem = r["memory"]
    lines.append(f"  memory                    RSS after load {r['rss_after_load_bytes'] / MiB:.0f} MiB, peak "
                 f"{mem['peak_rss_bytes'] / MiB:.0f} MiB (engine {mem['engine_peak_bytes'] / MiB:.0f} MiB, "
                 f"KV pool {mem['kv_pool_bytes'] / MiB:.0f} MiB)")
    return "\n".join(lines)


def _at_least(low: int, kind=int):
    """An argparse type: a `kind` >= low (argparse names the flag in its one-line error)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def _ints(text: str) -> list:
    values = [_at_least(1)(x) for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The measurement flags, on `ap` (`vila-edge bench`, or benchmarks/engine.py's parser)."""
    ap.add_argument("engine", help="engine directory to measure")
    ap.add_argument("--threads", type=_at_least(1), default=None,
                    help="ONNX Runtime intra-op threads (default: all CPUs)")
    ap.add_argument("--contexts", type=_ints, default=[128, 512, 1024, 2048],
                    help="comma-separated context lengths for decode tokens/s (default 128,512,1024,2048)")
    ap.add_argument("--images", type=_ints, default=[1, 4], help="image counts for time to first token (default 1,4)")
    ap.add_argument("--prefill-tokens", type=_at_least(1), default=512,
                    help="prompt tokens of the prefill measure (default 512)")
    ap.add_argument("--decode-steps", type=_at_least(1), default=16, help="decode steps per run (default 16)")
    ap.add_argument("--repeats", type=_at_least(1), default=5, help="timed runs per measure, medians reported (default 5)")
    ap.add_argument("--warmup", type=_at_least(0), default=1, help="untimed runs before each measure (default 1)")
    ap.add_argument("--fill", choices=["auto", "prefill", "synthetic"], default="auto",
                    help="how decode contexts are built; auto: synthetic when prefill would exceed --max-fill-s")
    ap.add_argument("--max-fill-s", type=_at_least(0, float), default=20.0,
                    help="longest real prefill allowed to fill a context, seconds (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random images and tokens (default 0)")
    return ap


def run_cli(args: argparse.Namespace) -> int:
    """`vila-edge bench`: measure, print the summary, write --json if given."""
    from vila_edge.atomic import write_text

    result = run(args)
    if args.json:
        write_text(args.json, json.dumps(result, indent=2))
    print(summary(result) + (f"\n{args.json}" if args.json else ""))
    return 0
