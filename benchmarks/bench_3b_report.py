"""The estimates and the markdown of benchmarks/bench_3b.py (measured depths, per-layer fit, 32-layer estimate)."""
import os

from benchmarks.depth_fit import estimate_rows, lever

PEERS = {"ort_genai": "ORT GenAI int4 (its builder)", "llama_cpp": "llama.cpp Q4_0", "hf": "transformers eager fp32"}
SYSTEMS = {"vila_edge_int4": "vila_edge int4", **PEERS}
GIB = 2**30


def measured(r: dict) -> dict:
    """{system: {key: {layers: seconds}}}: key is a decode context (int) or "ttft" (one image)."""
    out = {}
    for d in r["depths"]:
        for system in SYSTEMS:
            rows = out.setdefault(system, {})
            for row in d[system]["decode"]:
                rows.setdefault(row["context"], {})[d["layers"]] = row["step_s"]
            if "ttft_1_image" in d[system]:
                rows.setdefault("ttft", {})[d["layers"]] = d[system]["ttft_1_image"]["median_s"]
    return out


def estimates(r: dict) -> dict:
    fits = estimate_rows(measured(r), r["target_layers"])
    ours = fits["vila_edge_int4"]
    # vila_edge / peer: tokens/s for decode (peer seconds / ours), seconds for a first token (ours / peer).
    ratios = {p: {k: (ours[k]["est_s"] / f["est_s"] if k == "ttft" else f["est_s"] / ours[k]["est_s"])
                  for k, f in fits[p].items() if f["est_s"] and ours.get(k, {}).get("est_s")} for p in PEERS}
    return {"fits": fits, "ratios": ratios,
            "lever": lever(tuple(d["layers"] for d in r["depths"]), r["target_layers"])}


def baseline_rows(b: dict, path: str) -> dict:
    """What an earlier full-depth bench_peers run (peers.json) measured, to set beside the estimates."""
    out = {"path": path, "loadavg_start": b["machine"]["loadavg_start"][0], "loadavg_end": b["machine"]["loadavg_end"][0]}
    for key in ("vila_edge_int4", "vila_edge_fp32", "hf", "llama_cpp", "ort_genai"):
        if key in b:
            out[key] = {"kind": b[key].get("kind", key), "decode_tok_s": {d["context"]: d["tok_s"] for d in b[key]["decode"]}}
            if "ttft_1_image" in b[key]:
                out[key]["ttft_s"] = b[key]["ttft_1_image"]["median_s"]
    return out


def _by_layers(r: dict, system: str, key) -> list:
    rows = measured(r)[system][key]
    return [rows[d["layers"]] for d in r["depths"]]


def _table(r: dict, key, title: str, unit: str) -> list:
    """One table per measure: each system's value at each depth, its fit and its 32-layer estimate,
    then vila_edge / system at each depth and at the estimate."""
    depths, target, e = [d["layers"] for d in r["depths"]], r["target_layers"], r["estimate"]
    fmt = (lambda s: "n/a" if s is None else f"{s:.2f} s") if key == "ttft" else (
        lambda s: "n/a" if s is None else f"{1 / s:.1f}")
    lines = ["", f"### {title}", "",
             "| system | " + " | ".join(f"L{d} {unit}" for d in depths) + " | fixed a | per layer b "
             f"| **estimate L{target}** {unit} | " + " | ".join(f"vila_edge / system, L{d}" for d in depths)
             + f" | **vila_edge / system, L{target} (est.)** |",
             "|---" * (2 * len(depths) + 5) + "|"]
    ours = _by_layers(r, "vila_edge_int4", key)
    for system, label in SYSTEMS.items():
        if key not in e["fits"][system]:
            continue
        vals, f = _by_layers(r, system, key), e["fits"][system][key]
        rat = [(o / v if key == "ttft" else v / o) for o, v in zip(ours, vals)]
        est = e["ratios"].get(system, {}).get(key)
        est_ratio = "" if system == "vila_edge_int4" else "n/a (fit too noisy)" if est is None else f"**{est:.2f}**"
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in vals) + f" | {f['a_s'] * 1e3:.1f} ms "
                     f"| {f['b_s'] * 1e3:.2f} ms | **{fmt(f['est_s'])}** | "
                     + " | ".join("" if system == "vila_edge_int4" else f"{x:.2f}" for x in rat) + f" | {est_ratio} |")
    return lines


def _baseline(r: dict) -> list:
    b, e, target = r["baseline"], r["estimate"]["fits"], r["target_layers"]
    then_kind = b.get("vila_edge_int4", {}).get("kind", "n/a")
    lines = ["", f"## Estimate against an earlier full-depth measurement ({target} layers, `{b['path']}`, load "
                 f"{b['loadavg_start']:.1f} -> {b['loadavg_end']:.1f})", "",
             f"The earlier run's vila_edge engine: {then_kind}, exported and run by the code of that day.", "",
             "| system | measure | measured then, L32 | estimated now, L32 | now / then |", "|---|---|---|---|---|"]
    pairs = [("vila_edge_int4", "vila_edge_int4", "ttft"), ("hf", "hf", "ttft")]
    pairs += [(k, k, c) for k in ("llama_cpp", "ort_genai", "hf", "vila_edge_int4") for c in r["contexts"]]
    for then_key, now_key, key in pairs:
        then = b.get(then_key)
        if not then or key not in e[now_key]:
            continue
        est = e[now_key][key]["est_s"]
        if est is None:
            continue
        if key == "ttft" and "ttft_s" in then:
            lines.append(f"| {SYSTEMS[now_key]} | TTFT, 1 image | {then['ttft_s']:.1f} s | {est:.1f} s | {est / then['ttft_s']:.2f} |")
        elif key != "ttft" and key in then["decode_tok_s"]:
            old = then["decode_tok_s"][key]
            lines.append(f"| {SYSTEMS[now_key]} | decode tok/s @ {key} | {old:.1f} | {1 / est:.1f} | {(1 / est) / old:.2f} |")
    lines.append("\ntransformers and llama.cpp have not changed since that run: their rows check the estimate "
                 "method itself (now / then near 1, within the load's noise). vila_edge's TTFT row answers "
                 "'time to first token with one image not worse than today' with an estimate, not a measurement.")
    return lines


def _memory(r: dict) -> list:
    lines = ["", "## Wall time and peak RSS of each process", "",
             "| step | finished (UTC) | wall s | CPU s | peak RSS GiB |", "|---|---|---|---|---|"]
    cpu = lambda row: f"{row['cpu_s']:.0f}" if "cpu_s" in row else "n/a"   # noqa: E731
    for s in r.get("build_steps", []):
        lines.append(f"| build: {s['step']} | {s.get('finished_utc', 'n/a')} | {s['wall_s']:.0f} | {cpu(s)} "
                     f"| {s['peak_rss_bytes'] / GIB:.2f} |")
    rows = [(f"transformers vision (L{r['depths'][-1]['layers']} checkpoint)", r["hf_vision"])]
    rows += [(f"{label}, L{d['layers']}", d[system]) for d in r["depths"] for system, label in SYSTEMS.items()]
    for label, row in rows:
        lines.append(f"| measure: {label} | | {row['wall_s']:.0f} | {cpu(row)} | {row['peak_rss_bytes'] / GIB:.2f} |")
    lines.append("\nBuild rows are the latest run of each step (`build/bench-3b/steps.jsonl`); a step whose "
                 "output was cached keeps its earlier row. Peak RSS: the largest process of the step. CPU s: all "
                 "threads of all its processes; on an idle machine a step's wall time is at least CPU s / cores.")
    return lines


def markdown(r: dict) -> str:
    m, e, target = r["machine"], r["estimate"], r["target_layers"]
    depths = [d["layers"] for d in r["depths"]]
    lo, hi = min(depths), max(depths)
    hf_v = r["hf_vision"]
    lines = [f"# vila_edge against peers at VILA1.5-3B widths: {', '.join(f'L{d}' for d in depths)} measured, "
             f"L{target} estimated", "",
             f"Machine: {m['cpu']}, {m['threads_used']} threads for every system; load average "
             f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end. Medians of "
             f"{r['repeats']} runs (TTFT) and {r['repeats'] * r['decode_steps']} steps (decode) after one warm-up.",
             f"**Note:** {r['note']}" if r["note"] else "", "",
             f"Checkpoints: random weights at VILA1.5-3B widths, LLM depth {', '.join(map(str, depths))} of {target}, "
             f"the full 27-layer SigLIP tower and projector ({hf_v['image_tokens']} image tokens). "
             f"Engines: `{os.path.basename(r['depths'][-1]['paths']['engine_int4'])}` "
             f"({r['depths'][-1]['vila_edge_int4']['kind']}), ORT GenAI "
             f"{r['depths'][-1]['ort_genai']['onnxruntime_genai']} builder int4 (RTN, block 32, accuracy 4), "
             f"llama.cpp {r['depths'][-1]['llama_cpp']['llama_cpp_python']} Q4_0, transformers "
             f"{hf_v['transformers']} eager fp32 (torch {hf_v['torch']}).",
             "", "## Measured and estimated", "",
             f"**Bold: estimates at {target} layers, not measurements.** Decode in tokens/s; ratios vila_edge / system "
             "(> 1: vila_edge faster). TTFT in seconds; ratio vila_edge / system (< 1: vila_edge faster)."]
    for c in r["contexts"]:
        lines += _table(r, c, f"Decode at {c} context", "tok/s")
    lines += _table(r, "ttft", "Time to first token, one image", "TTFT")
    lines += ["", "transformers' TTFT is the sum of two processes' medians (vision tower + projector "
                  f"{hf_v['vision_s']['median_s']:.2f} s, measured once; the LLM share at each depth): at 3B "
                  "widths one fp32 process holding both exceeds the ~3 GB a process may use here.",
              "", "## Method", "",
              f"Per system and measure, seconds = a + b * layers fitted through the measured depths (least squares; "
              f"exact through two). a is what does not grow with depth: embedding, final norm, the 32000-row "
              "lm_head, per-step Python and I/O, and for TTFT the vision tower and projector at full depth; b is "
              "one transformer layer (every layer has the same widths and bytes). Scaling a shallow time by "
              f"{target}/layers would multiply a as well. The estimate at {target} is an extrapolation: an error "
              f"of e in the L{hi} time moves it by {e['lever']:.1f} e, one in the L{lo} time by {e['lever'] - 1:.1f} e, "
              "so noise from other processes on the machine is amplified; the medians and the load average are "
              "reported for that reason, and the baseline table below checks the method on systems that have "
              "not changed. What the fit cannot see: effects that appear only at full size (a 1.6 GB int4 "
              "weight set against a 0.4 GB one in the page cache, memory pressure), which the linear model "
              "assumes away."]
    if "baseline" in r:
        lines += _baseline(r)
    lines += _memory(r)
    return "\n".join(lines) + "\n"
