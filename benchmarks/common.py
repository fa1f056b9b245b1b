"""What every benchmark script shares: machine info, timing with repeats, RSS, host ceilings, saving.

Each script in benchmarks/ answers one question and imports its plumbing from here. The machine
info, RSS, median/spread and the engine measures themselves live in the runtime
(vila_edge/measure.py) because `vila-edge bench` must run after `pip install vila-edge`, where
this folder is not installed; they are re-exported here so that a script has one import.
"""
import json
import os
import sys
import time

import numpy as np

from vila_edge.atomic import write_text
from vila_edge.measure import (BLOCK_SIZE, PROMPT, bench_decode, bench_prefill, bench_ttft, bench_vision,
                               current_rss_bytes, fill_context, kv_config, kv_layout, llm_weight_bytes,
                               machine_info, peak_rss_bytes, random_images, spread)

__all__ = ["BLOCK_SIZE", "PROMPT", "bench_decode", "bench_prefill", "bench_ttft", "bench_vision", "current_rss_bytes",
           "fill_context", "kv_config", "kv_layout", "llm_weight_bytes", "machine_info", "peak_rss_bytes",
           "random_images", "spread", "ROOT", "COPY_BYTES", "timed", "best_seconds", "host_copy_gbs", "host_read_gbs",
           "env_with_root", "save_report", "finish"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY_BYTES = 256 * 2**20          # > any last-level cache, small enough for a shared machine


def timed(fn, runs: int, warmup: int = 1) -> list:
    """Seconds of each of `runs` calls of fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def best_seconds(fn, repeats: int = 5) -> float:
    """Fastest of `repeats` timed calls of fn(), after one untimed warm-up call: a ceiling's time."""
    return min(timed(fn, repeats))


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


def env_with_root() -> dict:
    """The environment for a child process (the CLI, a server, a benchmark side) that must import
    this checkout's vila_edge and benchmarks, whatever the venv has installed."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))


def save_json(r: dict, path: str) -> None:
    """Write r as JSON to path (its folder created if needed): the `--json PATH` of the A/B scripts."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_text(path, json.dumps(r, indent=2))


def save_report(r: dict, out_dir: str, stem: str, md: str) -> dict:
    """Write <stem>.json and <stem>.md under out_dir (created if needed); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    write_text(paths["json"], json.dumps(r, indent=2))
    write_text(paths["md"], md)
    return paths


def finish(r: dict, out_dir: str, stem: str, markdown) -> dict:
    """The end of every script: the load average at the end into r["machine"], then JSON +
    markdown (markdown(r)) saved under out_dir and the markdown printed. Returns the paths."""
    if "machine" in r:
        r["machine"]["loadavg_end"] = list(os.getloadavg())
    text = markdown(r)
    paths = save_report(r, out_dir, stem, text)
    sys.stdout.write(text + "\n" + "\n".join(paths.values()) + "\n")
    return paths
