"""Everything a GPU can tell us, in one run: `make device-check` (python -m benchmarks.device_check).

For a bare NVIDIA machine with CUDA (nvcc, driver), Python, numpy, torch and cuda-python, and no
ONNX Runtime GPU or TensorRT; under 8 minutes on a desktop GPU. Steps, each passed / failed / skipped:

  environment   python, numpy, torch, cuda-python, the GPU the driver reports
  build         kernels/build.py for sm_87 (Orin), sm_90 and this GPU's arch, registers and spills
  gpu tests     tests/gpu (every kernel against its numpy oracle at the VILA1.5-3B and NVILA-Lite-2B
                shapes), with pytest when it is installed
  oracle        the numpy projector oracle on the tower features of the bundled model's examples ==
                the vision output of its --target orin engine, the one the device runners take, on
                ONNX Runtime's CPU provider (tests/data/projector_bundled.npz, written by
                benchmarks/device_fixture.py): the kernel is held to the engine's own reference
                (runs anywhere)
  kernel splice the CUDA projector + splice kernel on the same features, written into an embedding
                buffer between text rows == that engine's vision output, text rows untouched
  benchmark     benchmarks/bench_kernels.py: GB/s of each kernel against the measured copy peak, JSON

Without a GPU it runs what it can and lists what it skipped and why; exit 1 only when a step fails.
Writes <out>/summary.json and the benchmark's kernels-<gpu>.json/.md; the kernels go to build/kernels
(as make kernels). Imports only numpy, cuda-python and vila_edge.cuda (vila_edge's public names load
lazily), so the repository runs as it is, with the machine's python3.
"""
import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "projector_bundled.npz"
DEFAULT_OUT = REPO / "build" / "device-check"
KERNELS = REPO / "build" / "kernels"
TARGET_ARCHS = ("87", "90")       # make kernels: Orin and Hopper
WEIGHTS = ("ln0_g", "ln0_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b")
# fp16 engine vs fp16-rounded oracle: fp16 intermediates on both sides, different summation order
# and tower precision (torch fp32 tower vs the engine's fp16): measured max |d| 1.2e-3 of max 2.26.
RTOL, ATOL_FRAC = 1e-2, 5e-3


class Check:
    """The run's record: one (step, status, detail, seconds) per step."""

    def __init__(self):
        self.steps = []

    def step(self, name: str, fn):
        t0 = time.perf_counter()
        try:
            status, detail = fn()
        except Exception as e:  # a step's failure is reported and the run goes on
            status, detail = "failed", f"{type(e).__name__}: {e}"
        self.steps.append({"step": name, "status": status, "detail": detail,
                           "seconds": round(time.perf_counter() - t0, 2)})
        print(f"[{status:7}] {name}: {detail}", flush=True)
        return status


def environment() -> tuple[dict, str | None]:
    """Versions, and None when a GPU answers through cuda-python, else why not."""
    env = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine()}
    try:
        import torch
        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = None
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        return env, "cuda-python is not installed"
    from vila_edge.cuda.driver import probe
    ok, why = probe()
    env["gpu"] = why if ok else None
    return env, None if ok else why


def build_kernels(out: Path, gpu_arch: str | None) -> tuple[str, str]:
    spec = importlib.util.spec_from_file_location("kernels_build", REPO / "kernels" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        build.find_nvcc()
    except build.BuildError as e:
        return "skipped", str(e)
    archs = tuple(sorted(set(TARGET_ARCHS) | ({gpu_arch} if gpu_arch else set())))
    records = build.build(out, archs)
    spills = [f"{r['kernel']}@{r['arch']}" for r in records if r["spill_stores"] or r["spill_loads"]]
    return "passed", f"sm_{', sm_'.join(archs)} -> {out}; {len(records)} kernels" + \
        (f"; spills: {', '.join(spills)}" if spills else ", no spills")


def gpu_tests(no_gpu: str | None) -> tuple[str, str]:
    if no_gpu:
        return "skipped", f"no GPU: {no_gpu}"
    if importlib.util.find_spec("pytest") is None:
        return "skipped", "pytest is not installed (python -m pip install pytest, or carry its wheel)"
    # --noconftest: tests/conftest.py builds export fixtures (torch + onnx + ORT); the GPU tests need none.
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "--noconftest", "-m", "gpu", "tests/gpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = " ".join(lines[-1].split()) if lines else proc.stderr.strip()[-300:]
    for line in lines:
        if line.startswith("SKIPPED"):
            print(f"          {line}")
    if proc.returncode not in (0, 5):
        print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n")
    if proc.returncode == 5:              # pytest: nothing collected (every module skipped itself)
        return "skipped", summary
    if proc.returncode != 0:
        return "failed", summary
    return ("passed" if " passed" in summary else "skipped"), summary     # all skipped: say so


def load_fixture():
    from vila_edge.cuda import reference as ref
    z = np.load(FIXTURE)
    weights = ref.ProjectorWeights(int(z["merge"]), *[z[k] for k in WEIGHTS])
    return z["tower"], weights, str(z["order"]), z["engine_features"].astype(np.float32)


def close(got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
    err = np.abs(got.astype(np.float64) - want)
    tol = ATOL_FRAC * np.abs(want).max() + RTOL * np.abs(want)
    return bool((err <= tol).all()), f"max |diff| {err.max():.2e} (max |value| {np.abs(want).max():.2f})"


def oracle_vs_engine() -> tuple[str, str]:
    from vila_edge.cuda import reference as ref
    tower, w, order, want = load_fixture()
    ok, how = close(ref.projector(tower, w, order, fp16_intermediates=True), want)
    return ("passed" if ok else "failed"), f"{len(tower)} images, {how}"


def kernel_vs_engine(no_gpu: str | None, fatbin: Path) -> tuple[str, str]:
    if no_gpu:
        return "skipped", f"no GPU: {no_gpu}"
    if not fatbin.is_file():
        return "skipped", f"{fatbin} not built (the build step was skipped)"
    from vila_edge.cuda import driver
    from vila_edge.cuda.kernels import Kernels
    from vila_edge.cuda.projector import GpuProjector
    tower, w, order, want = load_fixture()
    n, T, H = want.shape
    S = int(round(np.sqrt(tower.shape[1])))
    offsets = np.array([5 + i * (T + 3) for i in range(n)], np.int32)   # text rows before, between, after
    text = np.random.default_rng(0).standard_normal((int(offsets[-1]) + T + 4, H)).astype(np.float16)
    with driver.Device(0):
        stream = driver.Stream()
        kernels = Kernels(fatbin)
        proj = GpuProjector(kernels, w, S, max_images=n, order=order, stream=stream)
        x, emb = driver.DeviceArray.from_numpy(tower, stream), driver.DeviceArray.from_numpy(text, stream)
        try:
            proj(x, emb, offsets, stream)
            got = emb.to_numpy(stream)
        finally:
            proj.close(), x.free(), emb.free(), kernels.close(), stream.close()
    covered = np.zeros(len(text), bool)
    for o in offsets:
        covered[o:o + T] = True
    if not np.array_equal(got[~covered], text[~covered]):
        return "failed", "text rows outside the image spans changed"
    ok, how = close(got[covered].reshape(n, T, H), want)
    return ("passed" if ok else "failed"), f"{n} images spliced at rows {offsets.tolist()}, {how}"


def benchmark(no_gpu: str | None, fatbin: Path, out: Path, iters: int) -> tuple[str, str]:
    if no_gpu:
        return "skipped", f"no GPU: {no_gpu}"
    if not fatbin.is_file():
        return "skipped", f"{fatbin} not built (the build step was skipped)"
    from benchmarks import bench_kernels
    rc = bench_kernels.main(["--fatbin", str(fatbin), "--iters", str(iters), "--out-dir", str(out)])
    written = sorted(p.name for p in out.glob("kernels-*.json"))
    return ("passed" if rc == 0 else "failed"), f"GB/s vs measured peak -> {out}/{', '.join(written)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    ap.add_argument("--iters", type=int, default=50, help="benchmark iterations per case (default 50)")
    ap.add_argument("--no-build", action="store_true", help="skip the kernel build (use build/kernels as it is)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fatbin = KERNELS / "vila_kernels.fatbin"       # where make kernels puts it: the GPU tests load it there
    check = Check()
    env, no_gpu = environment()
    gpu_arch = None
    if not no_gpu:
        from vila_edge.cuda import driver
        with driver.Device(0) as d:
            gpu_arch = "".join(str(v) for v in d.compute_capability)
    check.steps.append({"step": "environment", "status": "passed" if not no_gpu else "skipped",
                        "detail": env if not no_gpu else f"no GPU: {no_gpu}", "seconds": 0.0})
    print(f"[{'passed' if not no_gpu else 'skipped':7}] environment: {env}" + (f"; no GPU: {no_gpu}" if no_gpu else ""))
    check.step("build", lambda: ("skipped", "--no-build") if args.no_build else build_kernels(KERNELS, gpu_arch))
    check.step("gpu tests", lambda: gpu_tests(no_gpu))
    check.step("oracle", oracle_vs_engine)
    check.step("kernel splice", lambda: kernel_vs_engine(no_gpu, fatbin))
    check.step("benchmark", lambda: benchmark(no_gpu, fatbin, out, args.iters))
    summary = {"environment": env, "steps": check.steps,
               "skipped": [s["step"] for s in check.steps if s["status"] == "skipped"],
               "failed": [s["step"] for s in check.steps if s["status"] == "failed"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    passed = [s["step"] for s in check.steps if s["status"] == "passed"]
    print(f"\ndevice-check: passed: {', '.join(passed) or '-'}; skipped: {', '.join(summary['skipped']) or '-'}; "
          f"failed: {', '.join(summary['failed']) or '-'} -> {out / 'summary.json'}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
