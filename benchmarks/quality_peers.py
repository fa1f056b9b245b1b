"""4-bit quality of vila_edge's export against ONNX Runtime GenAI and llama.cpp on the same weights and text.

    python -m benchmarks.quality_peers --checkpoint build/fixtures/smollm2-vila [--eval-tokens 4096]

One protocol for every system (vila_edge_export/quality.py `score_windows`, the one the export's quality gate
uses): the first --eval-tokens ids of the held-out half of pydoc_data.topics (vila_edge_export/calib_text.py,
never seen by calibration), windows of --window tokens advancing by window/2, each window a fresh
sequence; per scored position the next-token nll and the argmax. Every system is compared with the
fp32 torch reference of the checkpoint's LLM (transformers eager): top-1 agreement (same argmax) and
perplexity increase.
Systems (each built here from the checkpoint's llm/ unless already under build/quality_peers/):
  vila_edge awq / gptq / rtn   the export's quantizer (`--quant METHOD`) with its default options (torch:
                        what the engine computes at int4 accuracy level 0, within 1e-4,
                        tests/test_int4_export.py); "quantize s" is the quantizer's wall time
                        (calibration, search / rounding), the export's quality passes left out
  ort-genai int4        `python -m onnxruntime_genai.models.builder -p int4 -e cpu` (RTN), its
                        model.onnx run by onnxruntime as built (MatMulNBits accuracy level 4: int8
                        activations) and with accuracy level 0 (float activations: the weights alone)
  llama.cpp q4_1/q4_k_m benchmarks/hf_to_gguf.py (F16 GGUF) + llama.cpp's quantizer, run by
                        llama-cpp-python with logits for every position (llama-perplexity's method)
  llama.cpp f32         the same harness at F32: checks the harness itself (expect top-1 ~1.0)
Bits per weight count what is stored per quantized matrix: codes, scales and zero points (llama.cpp:
the block bytes of each tensor), over its weights; "decoder" is the linears of the decoder layers,
"lm_head" the vocab projection (tied to the embedding table for SmolLM2).
Writes quality_peers.json and quality_peers.md under benchmarks/results/<name>/.
"""
import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

import torch

from benchmarks.common import ROOT, save_report
from vila_edge_export.quality import EVAL_WINDOW, score_windows

BUILD = "build/quality_peers"
GGUF_TYPES = ("q4_1", "q4_k_m")


def _row(system: str, nll: torch.Tensor, top1: torch.Tensor, ref: tuple, bpw: dict, seconds: float, note="") -> dict:
    ppl, ppl_ref = math.exp(nll.mean().item()), math.exp(ref[0].mean().item())
    return {"system": system, "bpw_decoder": bpw.get("decoder"), "bpw_lm_head": bpw.get("lm_head"),
            "top1_agreement": (top1 == ref[1]).double().mean().item(), "ppl": ppl, "ppl_ref": ppl_ref,
            "ppl_increase_pct": 100.0 * (ppl / ppl_ref - 1.0), "eval_seconds": seconds, "note": note}


def _torch_logits(model):
    @torch.no_grad()
    def logits_of(ids):
        return model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0]
    return logits_of


def _reference(model, ids, args, stride: int) -> tuple:
    """The fp32 pass, cached under BUILD per checkpoint, tokens and window (it is the slowest column)."""
    key = f"{os.path.abspath(args.checkpoint)}|{ids.tolist()}|{args.window}|{stride}"
    path = os.path.join(BUILD, f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
    if os.path.isfile(path):
        return tuple(torch.load(path))
    ref = score_windows(_torch_logits(model), ids, args.window, stride)
    torch.save(list(ref), path)
    return ref


# ---- vila_edge -------------------------------------------------------------------------------------

def vila_edge_rows(ref_vlm, ids, args, ref) -> list:
    from vila_edge_export.llm_quant import quantize_model
    from vila_edge_export.options import ExportOptions, QuantOptions
    from vila_edge_export.quality import bits_per_weight
    from vila_edge_export.quantize import apply_quantized

    rows = []
    for method in args.methods.split(","):     # `vila-edge export --quant METHOD` with default options
        t0 = time.perf_counter()
        given = {k: v for k, v in (("lm_head_bits", args.lm_head_bits), ("group_plan", args.group_plan))
                 if v is not None}
        quant = QuantOptions(method=method, **given)
        qllm = quantize_model(ref_vlm, ExportOptions(quant=quant).quant, None, progress=True)
        quant_s = time.perf_counter() - t0
        model = apply_quantized(ref_vlm.llm, qllm)
        t0 = time.perf_counter()
        nll, top1 = score_windows(_torch_logits(model), ids, args.window, args.window // 2)
        rows.append(_row(f"vila_edge {method} (export defaults)", nll, top1, ref, bits_per_weight(qllm),
                         time.perf_counter() - t0, _describe(qllm)))
        rows[-1]["quantize_seconds"] = quant_s
        del model
    return rows


def _describe(qllm) -> str:
    kinds = sorted({(q.bits, q.group, q.zeros is not None) for q in qllm.linears.values()})
    int8 = sum(q.bits == 8 for n, q in qllm.linears.items() if n != "lm_head")
    return (", ".join(f"int{b} g{g}{' zero point' if z else ''}" for b, g, z in kinds)
            + f"; {int8} decoder linears int8")


# ---- ONNX Runtime GenAI ----------------------------------------------------------------------------

def _plain_llm_dir(llm_dir: str) -> str:
    """llm_dir, or a folder of links to its files whose config.json drops a "gguf" quantization_config
    (written by older benchmarks/smollm2_vila.py; the weights are fp32, but GenAI's builder refuses it)."""
    with open(os.path.join(llm_dir, "config.json")) as f:
        cfg = json.load(f)
    if not cfg.pop("quantization_config", None):
        return llm_dir
    out = os.path.join(BUILD, "llm-fp32")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(llm_dir):
        if name != "config.json" and not os.path.exists(os.path.join(out, name)):
            os.symlink(os.path.abspath(os.path.join(llm_dir, name)), os.path.join(out, name))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out


def genai_model(llm_dir: str) -> str:
    out = os.path.join(BUILD, "genai-int4")
    if not os.path.isfile(os.path.join(out, "model.onnx")):
        llm_dir = _plain_llm_dir(llm_dir)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", llm_dir, "-o", out,
                        "-p", "int4", "-e", "cpu", "-c", os.path.join(BUILD, "genai-cache")], check=True)
    return os.path.join(out, "model.onnx")


def _with_accuracy_level(path: str, level: int) -> str:
    """A copy of the GenAI model whose MatMulNBits nodes run at `level` (0: float activations)."""
    import onnx
    out = path.replace(".onnx", f".level{level}.onnx")
    if not os.path.isfile(out):
        model = onnx.load(path, load_external_data=False)
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                for a in node.attribute:
                    if a.name == "accuracy_level":
                        a.i = level
        onnx.save(model, out)   # external data stays in the same folder under the same name
    return out


def genai_bpw(path: str) -> dict:
    import onnx
    from onnx import numpy_helper
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    acc = {"decoder": [0, 0], "lm_head": [0, 0]}
    for node in model.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        attrs = {a.name: a.i for a in node.attribute}
        stored = sum(inits[n].nbytes for n in node.input[1 if node.op_type == "MatMulNBits" else 0:] if n in inits)
        if node.op_type == "GatherBlockQuantized":
            continue        # the embedding table: not a matmul weight (vila_edge keeps it fp16)
        part = "lm_head" if "lm_head" in node.name else "decoder"
        acc[part][0] += stored * 8
        acc[part][1] += attrs["K"] * attrs["N"]
    return {k: (b / n if n else None) for k, (b, n) in acc.items()}


def ort_logits(path: str, threads: int):
    import onnxruntime as ort
    with open(os.path.join(os.path.dirname(path), "genai_config.json")) as f:
        dec = json.load(f)["model"]["decoder"]
    empty_past = (1, dec["num_key_value_heads"], 0, dec["head_size"])     # a fresh sequence: no past
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()

    def logits_of(ids):
        t = ids.numel()
        feed = {}
        for i in inputs:
            if i.name == "input_ids":
                feed[i.name] = ids.numpy()[None].astype(np.int64)
            elif i.name == "attention_mask":
                feed[i.name] = np.ones((1, t), np.int64)
            elif i.name == "position_ids":
                feed[i.name] = np.arange(t, dtype=np.int64)[None]
            elif i.name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in i.type else np.float32
                feed[i.name] = np.zeros(empty_past, dtype)
            else:
                raise ValueError(f"{path}: unexpected input {i.name}")
        return torch.from_numpy(sess.run(["logits"], feed)[0][0].astype(np.float32))
    return logits_of


# ---- llama.cpp -------------------------------------------------------------------------------------

def gguf_model(llm_dir: str, kind: str, threads: int) -> str:
    from benchmarks.hf_to_gguf import convert, quantize
    f16 = os.path.join(BUILD, "smollm2-f16.gguf")
    out = os.path.join(BUILD, f"smollm2-{kind}.gguf")
    if os.path.isfile(out):
        return out
    if kind == "f32":
        convert(llm_dir, out, np.float32)
        return out
    if not os.path.isfile(f16):
        convert(llm_dir, f16, np.float16)
    quantize(f16, out, kind, threads)
    return out


def gguf_bpw(path: str) -> dict:
    from gguf import GGUFReader
    acc = {"decoder": [0, 0], "lm_head": [0, 0]}
    names = {t.name for t in GGUFReader(path).tensors}
    for t in GGUFReader(path).tensors:
        head = "output.weight" if "output.weight" in names else "token_embd.weight"
        part = "decoder" if t.name.startswith("blk.") and len(t.shape) == 2 else ("lm_head" if t.name == head else None)
        if part:
            acc[part][0] += int(t.n_bytes) * 8
            acc[part][1] += int(t.n_elements)
    return {k: b / n for k, (b, n) in acc.items()}


def llama_logits(path: str, window: int, threads: int):
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)

    def logits_of(ids):
        llm.reset()
        llm.eval(ids.tolist())
        return torch.from_numpy(np.array(llm.scores[:ids.numel()], np.float32))
    return logits_of


# ---- report ----------------------------------------------------------------------------------------

def markdown(rows: list, meta: dict) -> str:
    lines = [f"# 4-bit quality on {meta['model']}: {meta['n_scored']} held-out tokens, windows of {meta['window']} "
             f"(stride {meta['stride']}), against the fp32 torch reference (ppl {meta['ppl_ref']:.3f})", "",
             f"Gate of the export: top-1 >= {meta['gate']['min_top1_agreement']}, "
             f"perplexity <= +{meta['gate']['max_ppl_increase_pct']} %.", "",
             "| system | bpw decoder | bpw lm_head | top-1 agreement | perplexity | ppl increase | quantize s | notes |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for r in rows:
        lines.append(f"| {r['system']} | {fmt(r['bpw_decoder'])} | {fmt(r['bpw_lm_head'])} | {r['top1_agreement']:.4f} | "
                     f"{r['ppl']:.3f} | {r['ppl_increase_pct']:+.2f} % | {fmt(r.get('quantize_seconds'))} | {r['note']} |")
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from vila_edge_export.checkpoint import read_checkpoint
    from vila_edge_export.llm_quant import eval_ids
    from vila_edge_export.quality import DEFAULT_FLOOR
    from vila_edge_export.reference import ReferenceVLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="build/fixtures/smollm2-vila")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=EVAL_WINDOW)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default="vila_edge,genai,llama.cpp",
                    help="comma list of vila_edge, genai, llama.cpp")
    ap.add_argument("--lm-head-bits", type=int, choices=[8, 4, 0], default=None,
                    help="vila_edge rows: the export's --lm-head-bits (default: the export's, int8)")
    ap.add_argument("--group-plan", default=None, metavar="KIND=G,...",
                    help="vila_edge rows: the export's --group-plan (default: the export's, auto for awq/gptq, options.DEFAULT_GROUP_PLAN for rtn)")
    ap.add_argument("--methods", default="awq,gptq,rtn", help="comma list of the export's --quant methods")
    ap.add_argument("--name", default="smollm2-vila")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(BUILD, exist_ok=True)
    spec = read_checkpoint(args.checkpoint)
    llm_dir = spec.path("llm")
    ref_vlm = ReferenceVLM(spec, torch.float32)
    ids = eval_ids(ref_vlm.tokenizer, args.eval_tokens)
    stride = args.window // 2
    ref = _reference(ref_vlm.llm, ids, args, stride)
    rows = [_row("fp32 (transformers eager)", *ref, ref, {}, 0.0, "reference")]
    systems = args.systems.split(",")
    if "vila_edge" in systems:
        rows += vila_edge_rows(ref_vlm, ids, args, ref)
    if "genai" in systems:
        path = genai_model(llm_dir)
        bpw = genai_bpw(path)
        for level, note in ((4, "as built: accuracy level 4 (int8 activations)"), (0, "accuracy level 0 (float activations)")):
            t0 = time.perf_counter()
            nll, top1 = score_windows(ort_logits(_with_accuracy_level(path, level), args.threads), ids, args.window, stride)
            rows.append(_row(f"ORT GenAI int4 (level {level})", nll, top1, ref, bpw, time.perf_counter() - t0, note))
    if "llama.cpp" in systems:
        for kind in ("f32", *GGUF_TYPES):
            path = gguf_model(llm_dir, kind, args.threads)
            t0 = time.perf_counter()
            nll, top1 = score_windows(llama_logits(path, args.window, args.threads), ids, args.window, stride)
            rows.append(_row(f"llama.cpp {kind}", nll, top1, ref, gguf_bpw(path), time.perf_counter() - t0,
                             "harness check" if kind == "f32" else "q8 activations in its dot products"))
    meta = {"model": args.name, "n_scored": int(ref[0].numel()), "window": args.window, "stride": stride,
            "ppl_ref": rows[0]["ppl"], "gate": DEFAULT_FLOOR.__dict__,
            "command": "python -m benchmarks.quality_peers " + " ".join(argv if argv is not None else sys.argv[1:])}
    save_report({"meta": meta, "rows": rows}, os.path.join(ROOT, "benchmarks", "results", args.name), "quality_peers",
                markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
