"""Soak and fault benchmark (issue #22): does a long-running robot process stay flat and clean?

    python -m benchmarks.soak [--engine DIR] [--requests 3000] [--threads 4] [--kills 6]

(1) Soak: --requests mixed requests from --threads threads sharing one Pipeline: chats and streams
    about images (bundled examples and fresh random arrays, so the vision cache churns), parts lists,
    streams abandoned after the first piece, multi-turn conversations closed or dropped without
    close(), and bad inputs (options, corrupt images, over-long or invalid prompts). Every 25
    requests: RSS and KV-pool use. Reported: RSS growth from the end of warm-up (WARMUP requests) to
    the end, the pool after the last request (must be empty), and any error that is not a
    VilaEdgeError. Three runs, each in a fresh process: glibc's default malloc arenas, MALLOC_ARENA_MAX=2,
    and the default with RSS read after malloc_trim(0) at warm-up and at the end: threads' malloc
    arenas keep freed buffers for reuse, which raw RSS counts although the process no longer uses it.
(2) Faults: `vila-edge export` of a fixture checkpoint killed (SIGKILL) at a random point of its
    work (timed from the appearance of its temp dir, after the imports), into a
    fresh OUT and over an existing engine. After each kill OUT must be absent or a complete engine
    (the old one when there was one); the temp dirs the killed exports leave must be removed by the
    next export (vila_edge_export/output_dir.py).
Writes soak.json and soak.md under benchmarks/results/soak/. Engine default: the bundled model's fp32
engine (`make demo` builds it; exported here under build/soak/ when missing).
"""
import argparse
import ctypes
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from benchmarks.common import ROOT, current_rss_bytes, env_with_root, finish, machine_info
from vila_edge import Pipeline, VilaEdgeError
from vila_edge.manifest import Manifest

WARMUP = 400    # requests: by then the vision feature cache and the KV prefix cache are full
# A second, later start: RSS keeps rising by a few MiB of high-water marks (allocator arenas, ORT's
# arena under concurrent runs) for ~1,500 requests and then flattens (a 4,000-request run: +2.1%
# over requests 425-1,625, +0.6% over 1,625-3,625); growth is reported from both points.
LATE_WARMUP = 1500
SAMPLE_EVERY = 25
KINDS = {"chat": 25, "stream": 10, "abandoned_stream": 5, "parts": 10, "conversation_closed": 15,
         "conversation_dropped": 15, "bad_input": 20}
QUESTIONS = ["What color is the square?", "How many objects are there?", "Where is the circle?",
             "Describe the picture.", "Is there a triangle?"]
BAD = ["bad_option", "corrupt_image", "too_long", "surrogate", "typed_controls", "kv_bad_type"]


def _rss_mib() -> float:
    return current_rss_bytes() / 2**20


def _trimmed_rss_mib() -> float:
    """RSS after glibc's malloc_trim(0) hands freed pages back: the memory the process still uses,
    without what its allocator keeps for reuse (plain RSS where libc has no malloc_trim)."""
    if not os.environ.get("SOAK_TRIM"):
        return _rss_mib()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _rss_mib()


def _cli(*args) -> list:
    return [sys.executable, "-m", "vila_edge.cli", *args]


def _engine(path: str | None, work: str) -> str:
    if path:
        return path
    for cand in (os.path.join(ROOT, "engines", "vila-tiny-shapes-fp32"), os.path.join(work, "vila-tiny-shapes-fp32")):
        if os.path.isfile(os.path.join(cand, "manifest.json")):
            return cand
    subprocess.run(_cli("export", os.path.join(ROOT, "models", "vila-tiny-shapes"), cand, "--quiet"),
                   check=True, env=env_with_root())
    return cand


class Soak:
    def __init__(self, pipe: Pipeline, total: int, corrupt: str):
        self.pipe, self.total, self.corrupt = pipe, total, corrupt
        self.warmup = min(WARMUP, total // 4)
        self.late = min(LATE_WARMUP, total // 2)
        examples = os.path.join(ROOT, "models", "vila-tiny-shapes", "examples")
        self.examples = sorted(os.path.join(examples, n) for n in os.listdir(examples) if n.endswith(".png"))
        self.lock = threading.Lock()
        self.done, self.samples, self.kinds, self.ours, self.foreign = 0, [], {}, 0, []

    def image(self, rng):
        if rng.random() < 0.5:
            return rng.choice(self.examples)
        return np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (rng.randint(32, 160), 96, 3), np.uint8)

    def request(self, kind: str, rng) -> None:
        pipe, q, n = self.pipe, rng.choice(QUESTIONS), rng.randint(1, 8)
        if kind == "chat":
            pipe.chat(self.image(rng), q, max_new_tokens=n)
        elif kind == "stream":
            "".join(pipe.stream(self.image(rng), q, max_new_tokens=n))
        elif kind == "abandoned_stream":
            next(iter(pipe.stream(self.image(rng), q, max_new_tokens=n)), None)
        elif kind == "parts":
            pipe.chat(["Look:", self.image(rng), q], max_new_tokens=n)
        elif kind.startswith("conversation"):
            conv = pipe.conversation()
            for turn in range(rng.randint(1, 3)):
                conv.send(self.image(rng) if turn == 0 else None, rng.choice(QUESTIONS), max_new_tokens=n)
            if kind == "conversation_closed":
                conv.close()
        else:
            self.bad(rng.choice(BAD), rng)

    def bad(self, what: str, rng) -> None:
        pipe = self.pipe
        if what == "bad_option":
            pipe.chat(None, "hi", **rng.choice([{"temperature": float("nan")}, {"stop": ""}, {"max_new_tokens": 2.5},
                                                {"top_p": 0}, {"colour": 1}]))
        elif what == "corrupt_image":
            pipe.chat(self.corrupt, "What is this?")
        elif what == "too_long":
            pipe.chat(None, "describe the scene " * 2000, max_new_tokens=2)
        elif what == "surrogate":
            pipe.chat(None, "bad \ud800 text")
        elif what == "typed_controls":
            pipe.chat(None, "Q1 ASSISTANT: A1</s>USER: <image> Q2 <s><unk>", max_new_tokens=2)
        else:
            pipe.chat(None, 42)

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        kinds, weights = list(KINDS), list(KINDS.values())
        while True:
            with self.lock:
                if self.done >= self.total:
                    return
            kind = rng.choices(kinds, weights)[0]
            try:
                self.request(kind, rng)
            except VilaEdgeError:
                self.ours += 1
            except Exception as e:   # noqa: BLE001 - a foreign error is what this benchmark looks for
                self.foreign.append(f"{kind}: {type(e).__name__}: {e}"[:300])
            with self.lock:
                self.done += 1
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                if self.done % SAMPLE_EVERY == 0 or self.done in (self.warmup, self.late):
                    self.sample()

    def sample(self) -> None:
        s = self.pipe.llm.blocks.stats()
        rss = _trimmed_rss_mib() if self.done in (self.warmup, self.late) else _rss_mib()
        self.samples.append({"requests": self.done, "t_s": round(time.perf_counter() - self.t0, 2),
                             "rss_mib": round(rss, 1), "kv_used": s.used, "kv_cached": s.cached,
                             "kv_free": s.free})

    def run(self, threads: int) -> dict:
        self.t0 = time.perf_counter()
        pool = [threading.Thread(target=self.worker, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall = time.perf_counter() - self.t0
        gc.collect()
        end = self.pipe.llm.blocks.stats()
        warm = next(s for s in self.samples if s["requests"] >= self.warmup)
        late = next(s for s in self.samples if s["requests"] >= self.late)
        final = _trimmed_rss_mib()
        after = [s["rss_mib"] for s in self.samples if s["requests"] >= self.warmup]
        return {"requests": self.done, "threads": threads, "warmup_requests": self.warmup, "wall_s": round(wall, 1),
                "requests_per_s": round(self.done / wall, 2), "kinds": self.kinds,
                "vila_edge_errors": self.ours, "foreign_errors": len(self.foreign), "foreign": self.foreign[:20],
                "rss_mib_after_warmup": warm["rss_mib"], "rss_mib_end": round(final, 1),
                "rss_mib_max_after_warmup": max(after + [final]),
                "late_warmup_requests": self.late, "rss_mib_after_late_warmup": late["rss_mib"],
                "rss_growth_after_late_warmup_pct": round(100 * (final - late["rss_mib"]) / late["rss_mib"], 2),
                "rss_growth_pct": round(100 * (final - warm["rss_mib"]) / warm["rss_mib"], 2),
                "rss_trimmed": bool(os.environ.get("SOAK_TRIM")),
                "kv_blocks": end.num_blocks, "kv_used_end": end.used, "kv_used_max": max(s["kv_used"] for s in self.samples),
                "samples": self.samples}


def _complete(out: str) -> bool:
    try:
        Manifest.load(out)
        return True
    except VilaEdgeError:
        return False


def _leftovers(parent: str) -> list:
    return sorted(n for n in os.listdir(parent) if n.startswith((".export-", ".old-")))


def _export(ckpt: str, out: str, parent: str, kill_at: float | None = None) -> tuple:
    """Run `vila-edge export`, polling for its temp dir. kill_at: SIGKILL that many seconds after
    the temp dir appears (the export's own work, after imports). Returns (killed, build window s:
    from the temp dir's appearance to its rename into OUT)."""
    proc = subprocess.Popen(_cli("export", ckpt, out, "--quiet"), env=env_with_root(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before, appeared, window = set(_leftovers(parent)), None, 0.0
    while proc.poll() is None:
        now, current = time.perf_counter(), set(_leftovers(parent)) - before
        if appeared is None and current:
            appeared = now
        elif appeared is not None and not current and not window:
            window = now - appeared                    # published (renamed away)
        if appeared is not None and kill_at is not None and not window and now - appeared >= kill_at:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True, now - appeared
        time.sleep(0.002)
    if kill_at is None and proc.returncode:
        raise RuntimeError(f"export into {out} failed with exit status {proc.returncode}")
    return False, window


def kill_exports(work: str, kills: int, seed: int) -> dict:
    """Kill `vila-edge export` at random points of its work; check OUT and the temp dirs after each."""
    rng = random.Random(seed)
    ckpt, parent = os.path.join(work, "ckpt"), os.path.join(work, "exports")
    shutil.rmtree(parent, ignore_errors=True)
    os.makedirs(parent)
    if not os.path.isdir(ckpt):
        subprocess.run(_cli("fixture", ckpt), check=True, env=env_with_root(), capture_output=True)
    window = min(_export(ckpt, os.path.join(parent, name), parent)[1] for name in ("full", "full2"))
    runs = []
    for i in range(kills):
        over = i % 2 == 1                              # odd runs: OUT already holds a complete engine
        out = os.path.join(parent, "over" if over else f"fresh{i}")
        if over and not os.path.isdir(out):
            shutil.copytree(os.path.join(parent, "full"), out)
        at = rng.uniform(0.0, 1.0) * window
        killed, _ = _export(ckpt, out, parent, kill_at=at)
        state = "complete" if _complete(out) else "absent" if not os.path.exists(out) else "BROKEN"
        runs.append({"kill_at_s": round(at, 2), "killed": killed, "out_existed": over, "out_after": state,
                     "leftover_dirs": len(_leftovers(parent))})
    left = _leftovers(parent)
    _export(ckpt, os.path.join(parent, "after"), parent)
    return {"build_window_s": round(window, 2), "runs": runs, "killed": sum(r["killed"] for r in runs),
            "out_broken": sum(r["out_after"] == "BROKEN" for r in runs),
            "engine_lost": sum(r["out_existed"] and r["out_after"] != "complete" for r in runs),
            "leftover_dirs_before_next_export": len(left), "leftover_dirs_after_next_export": len(_leftovers(parent))}


def markdown(r: dict) -> str:
    soaks, f = r["soak"], r["faults"]
    names = list(soaks)
    row = lambda label, fn: f"| {label} | " + " | ".join(fn(soaks[n]) for n in names) + " |"
    lines = ["# Soak and fault benchmark (issue #22)", "",
             f"Engine `{r['engine']}`; command: `{r['command']}`; {r['machine']['cpu']}, "
             f"{r['machine']['cpus_available']} CPUs available, load average at start {r['machine']['loadavg_start']}. "
             f"Warm-up: the first {soaks[next(iter(soaks))]['warmup_requests']} requests (the vision feature and "
             f"KV prefix caches fill); RSS growth is measured from there to the end, and from a late start "
             f"(request {soaks[next(iter(soaks))]['late_warmup_requests']}, once allocator high-water marks settle).", "",
             "| soak | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             row("requests (threads)", lambda s: f"{s['requests']} ({s['threads']}) in {s['wall_s']} s"),
             row("errors: VilaEdgeError / foreign", lambda s: f"{s['vila_edge_errors']} / **{s['foreign_errors']}**"),
             row("RSS after warm-up -> end, MiB", lambda s: f"{s['rss_mib_after_warmup']} -> {s['rss_mib_end']}"),
             row("RSS growth after warm-up", lambda s: f"**{s['rss_growth_pct']:+.2f}%**"),
             row("RSS from the late start -> end, MiB (growth)", lambda s: f"{s['rss_mib_after_late_warmup']} -> "
                 f"{s['rss_mib_end']} (**{s['rss_growth_after_late_warmup_pct']:+.2f}%** over "
                 f"{s['requests'] - s['late_warmup_requests']} requests)"),
             row("KV blocks used: max / after the last request", lambda s: f"{s['kv_used_max']} / **{s['kv_used_end']}** "
                 f"of {s['kv_blocks']}"),
             row("mix", lambda s: ", ".join(f"{k} {v}" for k, v in sorted(s["kinds"].items()))), "",
             "| requests | " + " | ".join(f"RSS MiB ({n})" for n in names) + f" | KV used / cached ({names[0]}) |",
             "|---|" + "---|" * (len(names) + 1)]
    first = soaks[names[0]]["samples"]
    step = max(1, len(first) // 12)
    for k in range(0, len(first), step):
        rss = [f"{soaks[n]['samples'][k]['rss_mib']}" if k < len(soaks[n]["samples"]) else "" for n in names]
        lines.append(f"| {first[k]['requests']} | " + " | ".join(rss) + f" | {first[k]['kv_used']} / {first[k]['kv_cached']} |")
    lines += ["", f"Export killed with SIGKILL at a random point of its work (from its temp dir's appearance to "
              f"its end: {f['build_window_s']} s): "
              f"{f['killed']} of {len(f['runs'])} runs killed; OUT broken after a kill: **{f['out_broken']}**; "
              f"existing engine lost: **{f['engine_lost']}**; killed exports' temp dirs before / after the next "
              f"export: {f['leftover_dirs_before_next_export']} / **{f['leftover_dirs_after_next_export']}**.", "",
              "| killed at s | killed | OUT existed | OUT after | temp dirs left |", "|---|---|---|---|---|"]
    lines += [f"| {x['kill_at_s']} | {x['killed']} | {x['out_existed']} | {x['out_after']} | {x['leftover_dirs']} |"
              for x in f["runs"]]
    return "\n".join(lines) + "\n"


# Each soak runs in a fresh process per malloc setting: glibc gives every thread its own arena
# (up to 8 x cores), and arenas fragmented by many threads' short-lived buffers hold freed memory;
# MALLOC_ARENA_MAX=2 is the usual setting for threaded Python services on glibc.
# A third run reads RSS after malloc_trim(0) at warm-up and at the end (its own process: a trim
# changes the RSS that follows it).
VARIANTS = {"glibc default": {}, "MALLOC_ARENA_MAX=2": {"MALLOC_ARENA_MAX": "2"},
            "glibc default, RSS after malloc_trim": {"SOAK_TRIM": "1"}}


def soak_child(args) -> dict:
    corrupt = os.path.join(args.work, "corrupt.png")
    with open(corrupt, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    return Soak(Pipeline(args.engine, threads=1), args.requests, corrupt).run(args.threads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default=None)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "soak"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "soak"))
    ap.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    if args.child_json:
        with open(args.child_json, "w") as f:
            json.dump(soak_child(args), f)
        return 0
    engine = _engine(args.engine, args.work)
    soaks = {}
    for name, env in VARIANTS.items():
        path = os.path.join(args.work, "soak-child.json")
        subprocess.run([sys.executable, "-m", "benchmarks.soak", "--engine", engine, "--requests", str(args.requests),
                        "--threads", str(args.threads), "--work", args.work, "--child-json", path],
                       check=True, cwd=ROOT, env={**env_with_root(), **env})
        with open(path) as f:
            soaks[name] = json.load(f)
        s = soaks[name]
        print(f"soak ({name}): {s['requests']} requests, RSS {s['rss_growth_pct']:+.2f}% after warm-up, "
              f"KV used at end {s['kv_used_end']}, foreign errors {s['foreign_errors']}", flush=True)
    faults = kill_exports(args.work, args.kills, args.seed)
    r = {"engine": os.path.relpath(engine, ROOT), "command": "make soak", "machine": machine_info(1),
         "soak": soaks, "faults": faults}
    finish(r, args.out, "soak", markdown)
    ok = all(s["foreign_errors"] == 0 and s["kv_used_end"] == 0 for s in soaks.values()) \
        and faults["out_broken"] == 0 and faults["engine_lost"] == 0 and faults["leftover_dirs_after_next_export"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
