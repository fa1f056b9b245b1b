"""Build the CUDA kernel library and report registers and spills per kernel.

    python kernels/build.py [--arch 87 --arch 90] [--out build/kernels] [--no-shared]

Writes, into --out (atomically: built in a temporary directory, then renamed into place):
  vila_kernels.fatbin   one cubin per arch, loaded by vila_edge/cuda/kernels.py
  libvila_kernels.so    the C ABI of kernels/csrc/vila_kernels.h (skipped with --no-shared)
  resources.json        ptxas registers / spills / shared memory per (kernel, arch)
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent
REPO = KERNELS_DIR.parent
SOURCE = KERNELS_DIR / "csrc" / "vila_kernels.cu"
DEFAULT_OUT = REPO / "build" / "kernels"
# Orin (Jetson AGX/NX/Nano, sm_87) is the target; sm_90 (H100/H200) is where we benchmark.
DEFAULT_ARCHS = ("87", "90")
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo")
FATBIN = "vila_kernels.fatbin"
SHARED = "libvila_kernels.so"
RESOURCES = "resources.json"

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


class BuildError(RuntimeError):
    """nvcc is missing or failed; the message carries its command and output."""


def find_nvcc() -> str:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        candidate = Path(cuda_home) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    if nvcc is None:
        raise BuildError("nvcc not found: put it on PATH, or set NVCC or CUDA_HOME")
    return nvcc


def gencode_flags(archs) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def run_nvcc(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return proc.stderr  # ptxas -v reports on stderr


def parse_ptxas(log: str) -> list[dict]:
    """ptxas -v lines -> one record per (kernel, arch), in the order ptxas printed them."""
    records, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m[1], "arch": m[2], "registers": None, "spill_stores": 0,
                       "spill_loads": 0, "stack_bytes": 0, "smem_bytes": 0}
            records.append(current)
        elif current is not None and (m := _SPILL.search(line)):
            current.update(stack_bytes=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m[1])
            current["smem_bytes"] = int(m[2] or 0)
    return sorted(records, key=lambda r: (r["kernel"], r["arch"]))


def format_table(records: list[dict]) -> str:
    head = f"{'kernel':34} {'arch':6} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'smem':>6}"
    rows = [head, "-" * len(head)]
    for r in records:
        flag = "  SPILLS" if r["spill_stores"] or r["spill_loads"] else ""
        rows.append(f"{r['kernel']:34} {r['arch']:6} {r['registers']:>5} {r['spill_stores']:>9} "
                    f"{r['spill_loads']:>9} {r['smem_bytes']:>6}{flag}")
    return "\n".join(rows)


def build(out_dir: Path, archs=DEFAULT_ARCHS, shared: bool = True) -> list[dict]:
    nvcc = find_nvcc()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".kernels-") as tmp:
        tmp = Path(tmp)
        log = run_nvcc([nvcc, "-fatbin", *NVCC_FLAGS, "-Xptxas", "-v", *gencode_flags(archs),
                        "-o", str(tmp / FATBIN), str(SOURCE)])
        records = parse_ptxas(log)
        if {r["arch"] for r in records} != {f"sm_{a}" for a in archs}:
            raise BuildError(f"ptxas reported archs {sorted({r['arch'] for r in records})}, "
                             f"expected sm_{archs}; log:\n{log}")
        if shared:
            run_nvcc([nvcc, "-shared", "-Xcompiler", "-fPIC", *NVCC_FLAGS, *gencode_flags(archs),
                      "-o", str(tmp / SHARED), str(SOURCE)])
        (tmp / RESOURCES).write_text(json.dumps({"archs": list(archs), "kernels": records},
                                                indent=2) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)  # same filesystem: each file lands whole
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", action="append", help="SM version, e.g. 87 (repeatable)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-shared", action="store_true", help="skip libvila_kernels.so")
    args = ap.parse_args(argv)
    archs = tuple(args.arch or DEFAULT_ARCHS)
    try:
        records = build(args.out.resolve(), archs, shared=not args.no_shared)
    except BuildError as e:
        print(f"kernels/build.py: {e}", file=sys.stderr)
        return 1
    print(format_table(records))
    print(f"wrote {args.out}/{{{FATBIN}{'' if args.no_shared else ', ' + SHARED}, {RESOURCES}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
