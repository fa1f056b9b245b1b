"""How fast is this engine on this machine, and how close does decode come to the memory roofline?

    python -m benchmarks.engine engines/vila1.5-3b-tiny-fp32 [--threads 2] [--contexts 128,512,1024,2048]
    make bench OUT=engines/name

Every measure of `vila-edge bench` (vila_edge/measure.py: vision p50/p90, prefill tok/s, TTFT with 1
and 4 images, decode tok/s vs context, memory), then the ceilings decode runs under: bytes read per
step (LLM weights + the KV of the context) / step time, against this host's measured streaming-read
and copy bandwidths (measured after the memory figures, so their buffers are not in them) and the
Orin datasheet ceilings. Writes bench.json, bench.md and decode_vs_context.png under
benchmarks/results/<name>/ (matplotlib, the `bench` extra, for the plot).
"""
import argparse
import os
import sys

from benchmarks.common import ROOT, finish, host_copy_gbs, host_read_gbs
from vila_edge import measure

# Datasheet DRAM bandwidth, GB/s (Jetson module datasheets DS-10662-001 v1.8, DS-10712-001 v1.0,
# DS-11105-001). Orin NX: 128-bit LPDDR5 at 6400 MT/s = 102.4 (often rounded to 102).
ORIN_BANDWIDTH_GBS = {"agx-orin": 204.8, "orin-nx": 102.4, "orin-nano": 68.0}


def add_ceilings(row: dict, host_gbs: float, read_gbs: float) -> dict:
    """A decode row's achieved GB/s against the host's ceilings, and the tok/s each Orin allows."""
    row["pct_of_host_copy"] = 100 * row["achieved_gbs"] / host_gbs
    row["pct_of_host_read"] = 100 * row["achieved_gbs"] / read_gbs
    row["orin_ceiling_tok_s"] = {k: bw * 1e9 / row["bytes_per_step"] for k, bw in ORIN_BANDWIDTH_GBS.items()}
    return row


def run(args) -> dict:
    r = measure.run(args)
    r.update(name=args.name, note=args.note)
    threads = r["machine"]["threads_used"]
    r["host_copy_gbs"], r["host_read_gbs"] = host_copy_gbs(), host_read_gbs(threads)
    r["decode"] = [add_ceilings(d, r["host_copy_gbs"], r["host_read_gbs"]) for d in r["decode"]]
    return r


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f}"


def tile_rows(rows: list) -> list:
    lines = ["", "Vision per image by tile count (feature cache cleared; tower = SigLIP on all tiles in one batch, "
                 "rest = tiling, scale merge, projector):", "",
             "| image | tokens | p50 ms | p90 ms | tower p50 ms | rest p50 ms |", "|---|---|---|---|---|---|"]
    for t in rows:
        lines.append(f"| {t['case']} | {t['tokens']} | {t['p50_s'] * 1e3:.0f} | {t['p90_s'] * 1e3:.0f} "
                     f"| {t['tower_p50_s'] * 1e3:.0f} | {(t['p50_s'] - t['tower_p50_s']) * 1e3:.0f} |")
    return lines


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
                     f"| {d['bytes_per_step'] / 1e6:.1f} | {d['achieved_gbs']:.2f} | {d['pct_of_host_read']:.0f}% "
                     f"| {d['pct_of_host_copy']:.0f}% | {d['fill']} "
                     f"| {c['agx-orin']:.0f} / {c['orin-nx']:.0f} / {c['orin-nano']:.0f} |")
    lines += ["", "CPU ms/step counts all threads: wall time well above CPU time / threads means other processes "
                  "held the cores. Bytes per step count the weights as stored in llm.onnx(.data); an fp16 engine "
                  "on ONNX Runtime's x86 CPU provider may compute on fp32 copies of them (compare RSS after load "
                  "with the file sizes), so its real traffic can be up to 2x the figure.",
              "Ceiling tok/s = Orin datasheet bandwidth (AGX 204.8, NX 102.4, Nano 68 GB/s) / bytes per "
                  "step of this engine: a bound, not a measurement."]
    if r.get("vision_by_tiles"):
        lines += tile_rows(r["vision_by_tiles"])
    return "\n".join(lines) + "\n"


def plot(r: dict, path: str) -> None:
    from vila_edge.extras import require_extra
    require_extra("bench", "the decode-vs-context plot")
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


def parser() -> argparse.ArgumentParser:
    ap = measure.add_arguments(argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__,
                                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--name", default=None, help="results folder name (default: the engine folder's name)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="results root")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared machine')")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.name = args.name or os.path.basename(os.path.normpath(args.engine))
    r = run(args)
    out_dir = os.path.join(args.out, args.name)
    finish(r, out_dir, "bench", markdown)
    plot(r, os.path.join(out_dir, "decode_vs_context.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
