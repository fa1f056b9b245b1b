"""Run one build step of a benchmark and log its wall time and peak RSS (the Makefile's bench-3b).

    python -m benchmarks.steps LOG NAME -- command [args...]

Appends {"step", "wall_s", "cpu_s", "peak_rss_bytes", "command", "returncode", "finished_utc"} as one JSON line to
LOG and prints it. A step skipped later because its output exists keeps its row: reports read the last
row of each step name (latest_steps).
Peak RSS is the largest resident set of the command or any process it waited for (Linux folds every
reaped descendant's peak into RUSAGE_CHILDREN's ru_maxrss): the figure that must fit the machine.
Exits with the command's status.
"""
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone


def run_step(log: str, name: str, command: list) -> dict:
    t = time.perf_counter()
    rc = subprocess.run(command).returncode
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds (all threads, all descendants): on a loaded machine the wall time says little about
    # an idle one; the CPU time does not depend on the load (much), and wall >= CPU / cores.
    row = {"step": name, "wall_s": time.perf_counter() - t, "command": " ".join(command), "returncode": rc,
           "cpu_s": use.ru_utime + use.ru_stime, "peak_rss_bytes": use.ru_maxrss * 1024,   # KiB on Linux
           "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"[{name}] {row['wall_s']:.0f} s ({row['cpu_s']:.0f} CPU s), peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB"
          + ("" if rc == 0 else f", exit status {rc}"), file=sys.stderr, flush=True)
    return row


def latest_steps(log: str) -> list:
    """The last row of each step name in LOG, in the order the names first appear ([] if no LOG)."""
    if not os.path.isfile(log):
        return []
    rows = {}
    with open(log) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    return list(rows.values())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 4 or argv[2] != "--":
        sys.exit(__doc__)
    return run_step(argv[0], argv[1], argv[3:])["returncode"]


if __name__ == "__main__":
    sys.exit(main())
