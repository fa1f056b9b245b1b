"""VILA1.5-3B widths on a small machine: vila_edge int4 against ORT GenAI, llama.cpp and transformers
eager, measured at two reduced LLM depths and fitted per layer to the full 32 (`make bench-3b`).

    python -m benchmarks.bench_3b --layers 4,8 \
        --checkpoint build/fixtures/vila1.5-3b-L{layers}V27 --engine-int4 engines/vila1.5-3b-L{layers}V27-int4 \
        --gguf build/vila1.5-3b-L{layers}V27-q4_0.gguf --genai build/genai/vila1.5-3b-L{layers}V27-int4 \
        [--baseline benchmarks/results/vila1.5-3b/peers.json] [--steps build/bench-3b/steps.jsonl]

`{layers}` in a path is each depth of --layers. Every checkpoint has VILA1.5-3B's widths (Llama 2560 /
20 heads / 6912, 32000-row vocabulary, SigLIP-so400m 384 px and the mlp_downsample projector, random
weights); only the LLM depth differs, and the vision tower keeps its full depth so a first token's
vision share is measured, not estimated. At each depth, each system in a fresh process
(bench_peers.py's measures, same threads, contexts, steps):
  vila_edge int4 engine: time to first token with one image (Conversation.send, max_new_tokens=1) and
      decode tokens/s (LLMEngine.step of a token id + its argmax, as generation runs) at each context;
  ORT GenAI (its builder's int4 export of the same llm/) and llama.cpp (Q4_0 GGUF of the same llm/):
      decode tokens/s at each context;
  transformers eager fp32: decode, and the first token in two processes that together hold what one
      would (the fp32 SigLIP + projector, measured once; the LLM's template, splice and prefill to the
      first argmax with features of the image's token count), their medians summed.
Then benchmarks/depth_fit.py fits seconds = a + b * layers per system and context and reports the
estimate at 32 layers, labelled as an estimate, beside the measured depths; --baseline adds a full-depth
result of an earlier run (TTFT, peers) to compare estimate with measurement. Writes peers3b.json and
peers3b.md under benchmarks/results/<name>/.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks import bench_3b_report as report
from benchmarks.bench_peers import decode_row, genai_rows, isolated, llama_cpp_rows, vila_edge_rows
from benchmarks.common import PROMPT, finish, machine_info, peak_rss_bytes, random_images, save_report, spread
from benchmarks.steps import latest_steps
from vila_edge.families import get_family

FULL_LAYERS = 32          # Efficient-Large-Model/VILA1.5-3b llm/config.json num_hidden_layers


def with_peak(fn, *args, **kwargs) -> dict:
    """fn's result plus this process's peak RSS and CPU seconds (run inside `isolated`: one system per process)."""
    import resource

    out = fn(*args, **kwargs)
    use = resource.getrusage(resource.RUSAGE_SELF)
    out.update(peak_rss_bytes=peak_rss_bytes(), cpu_s=use.ru_utime + use.ru_stime)
    return out


def _hf_part(spec, *, llm: bool):
    """ReferenceVLM holding only its LLM (llm=True) or only its vision tower and projector: at 3B
    widths both in fp32 exceed a ~3 GB process. The LLM is built in the checkpoint's dtype, loaded,
    then cast to fp32, so the load peaks near the fp32 model rather than fp32 model + state dict."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, Qwen2ForCausalLM

    from vila_edge_export.checkpoint import load_weights
    from vila_edge_export.projector import build_projector
    from vila_edge_export.reference import ReferenceVLM, _hf_tower

    ref = ReferenceVLM.__new__(ReferenceVLM)
    ref.spec, ref.dtype, ref.family = spec, torch.float32, get_family(spec.family)
    ref.tokenizer = AutoTokenizer.from_pretrained(spec.path("llm"))
    if not llm:
        ref.tower = _hf_tower(spec, torch.float32)
        p = spec.projector
        ref.projector = build_projector(p.kind, p.in_channels, p.out_channels, p.token_order)
        ref.projector.load_state_dict(load_weights(spec.path("mm_projector")), strict=True)
        ref.projector.to(torch.float32).eval()
        return ref
    cfg = AutoConfig.from_pretrained(spec.path("llm"))
    cfg._attn_implementation = "eager"
    state = load_weights(spec.path("llm"))
    if spec.llm.tie_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    old = torch.get_default_dtype()
    torch.set_default_dtype(next(iter(state.values())).dtype)
    try:
        model = (LlamaForCausalLM if spec.llm.arch == "llama" else Qwen2ForCausalLM)(cfg)
    finally:
        torch.set_default_dtype(old)
    model.load_state_dict(state, strict=True)
    del state
    ref.llm = model.to(torch.float32).eval()
    return ref


def hf_vision_rows(checkpoint, threads, runs, seed) -> dict:
    """transformers' share of a first token before the LLM: SigLIP image processor + tower + projector."""
    import torch
    from PIL import Image

    from vila_edge_export.checkpoint import read_checkpoint
    from vila_edge_export.reference import hf_pixels

    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    spec = read_checkpoint(checkpoint)
    ref = _hf_part(spec, llm=False)
    times = []
    for i in range(runs + 1):
        image = Image.fromarray(random_images(rng, 1, spec.vision.image_size)[0])
        t = time.perf_counter()
        with torch.no_grad():
            feats = ref.encode_images(hf_pixels(spec, image))
        if i:
            times.append(time.perf_counter() - t)
    import transformers
    return {"vision_s": spread(times), "image_tokens": int(feats.shape[1]), "torch": torch.__version__,
            "transformers": transformers.__version__}


def hf_llm_rows(checkpoint, engine, threads, contexts, steps, runs, seed, image_tokens) -> dict:
    """transformers' LLM share of a first token (template, splice of `image_tokens` feature rows,
    prefill to the first argmax) and its decode tokens/s at each context (DynamicCache)."""
    import torch

    from vila_edge.manifest import Manifest
    from vila_edge.pipeline import engine_template
    from vila_edge_export.checkpoint import read_checkpoint

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = read_checkpoint(checkpoint)
    ref = _hf_part(spec, llm=True)
    m = Manifest.load(engine)
    template, text = engine_template(engine, m), get_family(m.family).part_text + PROMPT
    times = []
    for i in range(runs + 1):
        feats = torch.randn(image_tokens, spec.llm.hidden)
        rendered = template.render([("user", text)], f"Session {rng.integers(1 << 62)}.")
        t = time.perf_counter()
        with torch.no_grad():
            embeds = ref.embed(ref.tokenize(rendered), [feats])
            int(torch.argmax(ref.llm(inputs_embeds=embeds, use_cache=True).logits[0, -1]))
        if i:
            times.append(time.perf_counter() - t)
    out = {"llm_prefill_s": spread(times), "prompt_tokens": int(embeds.shape[1]), "attention": "eager", "decode": []}
    with torch.no_grad():
        for ctx in contexts:
            state = {"past": ref.llm(inputs_embeds=torch.randn(1, ctx, spec.llm.hidden), use_cache=True).past_key_values}
            x = torch.randn(1, 1, spec.llm.hidden)

            def step():
                state["past"] = ref.llm(inputs_embeds=x, past_key_values=state["past"], use_cache=True).past_key_values
            out["decode"].append(decode_row(ctx, step, runs * steps))
    return out


def measure_depth(layers, paths, run, seed, hf_vision, log) -> dict:
    """Every system at one depth, each in its own process."""
    threads, contexts, steps, runs = run
    r = {"layers": layers, "paths": paths}
    jobs = [("vila_edge_int4", vila_edge_rows, (paths["engine_int4"], *run), {"images": True, "seed": seed}),
            ("ort_genai", genai_rows, (paths["genai"], *run, seed), {}),
            ("llama_cpp", llama_cpp_rows, (paths["gguf"], *run, seed), {}),
            ("hf", hf_llm_rows, (paths["checkpoint"], paths["engine_int4"], *run, seed, hf_vision["image_tokens"]), {})]
    for key, fn, args, kwargs in jobs:
        t = time.perf_counter()
        r[key] = isolated(with_peak, fn, *args, **kwargs)
        r[key]["wall_s"] = time.perf_counter() - t
        log(f"  L{layers} {key}: {r[key]['wall_s']:.0f} s ({r[key]['cpu_s']:.0f} CPU s), peak RSS {r[key]['peak_rss_bytes'] / 2**30:.2f} GiB")
    hf = r["hf"]
    hf["ttft_1_image"] = {"median_s": hf_vision["vision_s"]["median_s"] + hf["llm_prefill_s"]["median_s"],
                          "prompt_tokens": hf["prompt_tokens"], "parts": "vision + LLM medians, two processes"}
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="4,8", help="LLM depths of the checkpoints, comma-separated (>= 2 distinct)")
    for name in ("checkpoint", "engine-int4", "gguf", "genai"):
        ap.add_argument(f"--{name}", required=True, help="path, with {layers} standing for the depth")
    ap.add_argument("--name", default="vila1.5-3b-depth")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--contexts", default="128,512")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-layers", type=int, default=FULL_LAYERS)
    ap.add_argument("--baseline", default=None, help="peers.json of an earlier full-depth bench_peers run")
    ap.add_argument("--steps", default=None, help="JSON lines of the build steps (benchmarks/steps.py) to report")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    depths = sorted({int(x) for x in args.layers.split(",")})
    if len(depths) < 2:
        ap.error("--layers needs two distinct depths for the per-layer fit")
    threads = args.threads or len(os.sched_getaffinity(0))
    run = (threads, [int(c) for c in args.contexts.split(",")], args.decode_steps, args.repeats)
    r = {"name": args.name, "note": args.note, "machine": machine_info(threads), "contexts": run[1],
         "decode_steps": args.decode_steps, "repeats": args.repeats, "target_layers": args.target_layers}
    log = lambda s: print(s, file=sys.stderr, flush=True)   # noqa: E731 -- progress while each process runs
    paths = {d: {k: getattr(args, k).format(layers=d) for k in ("checkpoint", "engine_int4", "gguf", "genai")}
             for d in depths}
    t = time.perf_counter()
    r["hf_vision"] = isolated(with_peak, hf_vision_rows, paths[depths[-1]]["checkpoint"], threads, args.repeats, args.seed)
    r["hf_vision"]["wall_s"] = time.perf_counter() - t
    log(f"  transformers vision: {time.perf_counter() - t:.0f} s, peak RSS {r['hf_vision']['peak_rss_bytes'] / 2**30:.2f} GiB")
    r["depths"] = [measure_depth(d, paths[d], run, args.seed, r["hf_vision"], log) for d in depths]
    r["estimate"] = report.estimates(r)
    if args.baseline:
        with open(args.baseline) as f:
            r["baseline"] = report.baseline_rows(json.load(f), args.baseline)
    if args.steps:
        r["build_steps"] = latest_steps(args.steps)
    out = os.path.join(args.out, args.name)
    save_report(r, out, "peers3b", "")        # the measurements survive a failing report
    finish(r, out, "peers3b", report.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
