"""How close do the hot-path kernels get to the GPU's memory bandwidth?

    python -m benchmarks.bench_kernels [--fatbin build/kernels/vila_kernels.fatbin] [--iters 50]

Baseline, measured in the same run: a device-to-device cuMemcpy of 256 MiB (reads + writes).
Each kernel's achieved GB/s = the bytes it must move at least (weights, KV, activations) over
its GPU-timed duration. Writes benchmarks/results/kernels-<device>.{json,md}. Needs a GPU.
"""

import argparse
import json
import math
import platform
import re
import sys
from pathlib import Path

import numpy as np

from vila_edge import int4
from vila_edge.atomic import write_text
from vila_edge.cuda import reference as ref
from vila_edge.cuda.driver import DeviceArray, Device, Stream, Timer, check, probe
from vila_edge.cuda.kernels import Kernels, default_fatbin_path
from vila_edge.cuda.projector import GpuProjector
from vila_edge.families import COLUMN_MAJOR, ROW_MAJOR

REPO = Path(__file__).resolve().parents[1]

PEAK_COPY_BYTES = 256 << 20
GEMV_SHAPES = {  # name: (N, K)
    "vila1.5-3b qkv/o 2560x2560": (2560, 2560),
    "vila1.5-3b mlp up 6912x2560": (6912, 2560),
    "vila1.5-3b mlp down 2560x6912": (2560, 6912),
    "nvila-lite-2b mlp up 8960x1536": (8960, 1536),
    "nvila-lite-2b mlp down 1536x8960": (1536, 8960),
}
ATTN_CASES = {  # name: (B, Hq, Hkv, D, BS, context)
    "vila1.5-3b B=1 ctx=1024": (1, 20, 20, 128, 16, 1024),
    "vila1.5-3b B=4 ctx=4096": (4, 20, 20, 128, 16, 4096),
    "nvila-lite-2b B=1 ctx=4096": (1, 12, 2, 128, 16, 4096),
    "nvila-lite-2b B=4 ctx=4096": (4, 12, 2, 128, 16, 4096),
}
PROJECTOR_CASES = {  # name: (merge, S, C, H, order)
    "vila1.5-3b mlp_downsample 1 image": (2, 27, 1152, 2560, COLUMN_MAJOR),
    "nvila-lite-2b 3x3_fix 1 tile": (3, 32, 1152, 1536, ROW_MAJOR),
}


def time_ms(stream, fn, iters, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    timer = Timer(stream)
    with timer:
        for _ in range(iters):
            fn()
    ms = timer.elapsed_ms() / iters
    timer.close()
    return ms


def row(kind, name, ms, nbytes, peak, flops=0.0) -> dict:
    gbs = nbytes / (ms * 1e-3) / 1e9
    return {"kind": kind, "case": name, "ms": round(ms, 4), "bytes": int(nbytes),
            "gb_per_s": round(gbs, 1), "fraction_of_peak": round(gbs / peak, 3),
            "tflop_per_s": round(flops / (ms * 1e-3) / 1e12, 3) if flops else None}


def bench_peak(stream, iters) -> float:
    src, dst = DeviceArray.alloc((PEAK_COPY_BYTES,), np.uint8), DeviceArray.alloc((PEAK_COPY_BYTES,), np.uint8)
    from cuda.bindings import driver as cu

    def copy():
        check(cu.cuMemcpyDtoDAsync(dst.ptr, src.ptr, PEAK_COPY_BYTES, stream.handle), "cuMemcpyDtoDAsync")

    ms = time_ms(stream, copy, iters)
    src.free(), dst.free()
    return 2 * PEAK_COPY_BYTES / (ms * 1e-3) / 1e9  # every byte is read once and written once


def bench_gemv(k, stream, peak, iters, G=128) -> list[dict]:
    rows, r = [], np.random.default_rng(0)
    for name, (N, K) in GEMV_SHAPES.items():
        packed, scales = int4.pack_matmulnbits(*int4.quantize(r.standard_normal((N, K), np.float32), G), G)
        b, s = DeviceArray.from_numpy(packed, stream), DeviceArray.from_numpy(scales, stream)
        for M in (1, 4):
            x = DeviceArray.from_numpy(r.standard_normal((M, K)).astype(np.float16), stream)
            y = DeviceArray.alloc((M, N), np.float16)
            ms = time_ms(stream, lambda: k.int4_gemv(x, b, s, y, stream), iters)
            nbytes = packed.nbytes + scales.nbytes + 2 * M * (K + N)
            rows.append(row("int4_gemv", f"{name} M={M}", ms, nbytes, peak, 2.0 * M * N * K))
            x.free(), y.free()
        b.free(), s.free()
    return rows


def bench_attention(k, stream, peak, iters) -> list[dict]:
    rows, r = [], np.random.default_rng(0)
    for name, (B, Hq, Hkv, D, BS, ctx) in ATTN_CASES.items():
        per_seq = math.ceil(ctx / BS)
        NB = B * per_seq
        tables = r.permutation(NB).astype(np.int32).reshape(B, per_seq)
        arrays = [DeviceArray.from_numpy(a, stream) for a in (
            r.standard_normal((B, Hq, D)).astype(np.float16),
            r.standard_normal((NB, BS, Hkv, D)).astype(np.float16),
            r.standard_normal((NB, BS, Hkv, D)).astype(np.float16),
            tables, np.full(B, ctx, np.int32))]
        out = DeviceArray.alloc((B, Hq, D), np.float16)
        ms = time_ms(stream, lambda: k.paged_attention_decode(*arrays, out, stream), iters)
        nbytes = 2 * B * ctx * Hkv * D * 2 + 2 * B * Hq * D * 2  # K and V once, q and out
        rows.append(row("paged_attention_decode", name, ms, nbytes, peak, 4.0 * B * Hq * ctx * D))
        for a in (*arrays, out):
            a.free()
    return rows


def bench_projector(k, stream, peak, iters) -> list[dict]:
    rows, r = [], np.random.default_rng(0)
    for name, (merge, S, C, H, order) in PROJECTOR_CASES.items():
        L, fc1_out = merge * merge * C, (H if merge == 2 else 3 * C)
        lin = lambda o, i: ((r.standard_normal((o, i)) / math.sqrt(i)).astype(np.float16),  # noqa: E731
                            np.zeros(o, np.float16))
        ln = lambda d: (np.ones(d, np.float16), np.zeros(d, np.float16))  # noqa: E731
        if merge == 2:
            w = ref.ProjectorWeights(2, *ln(L), *lin(fc1_out, L), *lin(H, H))
        else:
            w = ref.ProjectorWeights(3, *ln(L), *lin(fc1_out, L), *lin(H, 3 * C), *ln(3 * C), *lin(H, H))
        T = ref.merged_side(S, merge) ** 2
        proj = GpuProjector(k, w, S, max_images=1, order=order, stream=stream)
        x = DeviceArray.from_numpy(r.standard_normal((1, S * S, C)).astype(np.float16), stream)
        emb = DeviceArray.alloc((T + 64, H), np.float16)
        offsets = np.array([32], np.int32)
        ms = time_ms(stream, lambda: proj(x, emb, offsets, stream), iters)
        mats = [w.fc1_w, w.fc2_w] + ([w.fc3_w] if merge == 3 else [])
        weight_bytes = sum(m.size * 2 for m in mats)
        flops = sum(2.0 * T * m.shape[0] * m.shape[1] for m in mats)
        rows.append(row("projector_splice", name, ms, weight_bytes + x.nbytes + T * H * 2, peak, flops))
        proj.close(), x.free(), emb.free()
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Kernel benchmark — {result['device']}", "",
             f"Peak (device-to-device memcpy, read+write): **{result['peak_gb_per_s']:.1f} GB/s**", "",
             "| kernel | case | ms | GB/s | of peak | TFLOP/s |", "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['kind']} | {r['case']} | {r['ms']:.4f} | {r['gb_per_s']:.1f} | "
                     f"{100 * r['fraction_of_peak']:.1f}% | {r['tflop_per_s'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fatbin", type=Path, default=default_fatbin_path())
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    ok, why = probe()
    if not ok:
        print(f"bench_kernels: needs a GPU: {why}", file=sys.stderr)
        return 2
    device = Device(0)
    stream = Stream()
    k = Kernels(args.fatbin)
    peak = bench_peak(stream, args.iters)
    rows = bench_gemv(k, stream, peak, args.iters) + bench_attention(k, stream, peak, args.iters) \
        + bench_projector(k, stream, peak, args.iters)
    result = {"device": device.name, "compute_capability": list(device.compute_capability),
              "host": platform.node(), "peak_gb_per_s": round(peak, 1), "iters": args.iters,
              "rows": rows}
    k.close(), stream.close(), device.close()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.name.lower()).strip("-")
    write_text(str(args.out_dir / f"kernels-{slug}.json"), json.dumps(result, indent=2) + "\n")
    write_text(str(args.out_dir / f"kernels-{slug}.md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
