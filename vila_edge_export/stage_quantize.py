"""Export stage 1: checkpoint -> quantized LLM weights in a directory (gpt-fast's model_int4.g32.pth).

    python -m vila_edge_export.stages quantize CHECKPOINT QUANT_DIR --quant awq [--group-size 128]

QUANT_DIR holds two files:
  llm.safetensors     every float tensor of the LLM (folded norms, embeddings, biases, a float
                      lm_head) as fp32, and per quantized linear `<name>.qcodes` (int8 [N, K], values
                      in the code range of its bits), `<name>.qscales` (fp32 [N, K // G]) and, for a
                      linear with zero points, `<name>.qzeros` (int8 [N, K // G] in [-8, 7])
  quant_config.json   method, group size, bits, lm_head bits, each linear's bits, the quality report
The directory is written beside QUANT_DIR under a temporary name and renamed into place, so a
stopped run (Ctrl-C, a quality floor) leaves nothing that looks finished.
"""
import json
import os

import numpy as np

from vila_edge_export.build import chat_template_source, read_spec
from vila_edge.atomic import atomic_dir
from vila_edge.errors import CheckpointError

WEIGHTS = "llm.safetensors"
CONFIG = "quant_config.json"
CODES, SCALES, ZEROS = ".qcodes", ".qscales", ".qzeros"


def write_quantized(out_dir: str, weights: dict, quant: dict, info: dict) -> None:
    """weights {name: np fp32}, quant {linear: (codes, scales, G, bits[, zeros])}, info: the manifest's
    quant entry."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    for name, (codes, scales, *rest) in quant.items():
        tensors[name + CODES] = np.ascontiguousarray(codes, dtype=np.int8)
        tensors[name + SCALES] = np.ascontiguousarray(scales, dtype=np.float32)
        if len(rest) > 2:
            tensors[name + ZEROS] = np.ascontiguousarray(rest[2], dtype=np.int8)
    save_file(tensors, os.path.join(out_dir, WEIGHTS))
    config = dict(info, linears={name: {"bits": int(q[3]), "group": int(q[2])} for name, q in quant.items()})
    with open(os.path.join(out_dir, CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def read_quantized(quant_dir: str) -> tuple:
    """-> (weights {name: np fp32}, {linear: (codes, scales, G, bits[, zeros])}, info) as write_quantized
    took them."""
    from safetensors.numpy import load_file

    paths = [os.path.join(quant_dir, f) for f in (WEIGHTS, CONFIG)]
    for p in paths:
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: missing; not a quantize stage output (vila_edge_export.stages quantize)")
    with open(paths[1], encoding="utf-8") as f:
        info = json.load(f)
    linears = info.pop("linears")
    tensors = load_file(paths[0])
    quant = {}
    for name, q in linears.items():
        codes, scales = tensors.pop(name + CODES), tensors.pop(name + SCALES)
        if codes.shape[1] != scales.shape[1] * q["group"]:
            raise CheckpointError(f"{paths[0]}: {name} codes {codes.shape} and scales {scales.shape} do not match "
                                  f"group {q['group']} of {paths[1]}")
        zeros = tensors.pop(name + ZEROS, None)
        if zeros is not None and zeros.shape != scales.shape:
            raise CheckpointError(f"{paths[0]}: {name} zero points {zeros.shape} and scales {scales.shape} differ")
        quant[name] = (codes, scales, q["group"], q["bits"]) + (() if zeros is None else (zeros,))
    return tensors, quant, info


def quantize_stage(checkpoint: str, out_dir: str, opts) -> str:
    """Quantize the checkpoint's LLM as `opts` (ExportOptions) asks and write out_dir; returns out_dir."""
    from vila_edge_export.llm_quant import quantize_llm

    qopts = opts.quant
    if not qopts.quantized:
        raise ValueError("quant none has nothing to quantize: run the graphs stage on the checkpoint")
    spec = read_spec(checkpoint, opts)
    weights, quant, report = quantize_llm(spec, qopts, chat_template_source(spec), opts.progress)
    # int8_linears: decoder linears stored as symmetric int8 (mixed precision, QuantOptions.max_bpw)
    # group_plan: G per linear kind over group_size (options.py); each linear's own G is in linears
    info = {"method": qopts.method, "group_size": qopts.group_size, "group_plan": qopts.group_plan, "bits": 4,
            "symmetric": not qopts.zero_point, "gptq_rounding": qopts.gptq_rounding,
            "act_order": qopts.act_order,
            "lm_head_bits": qopts.lm_head_bits, "int8_linears": report["int8_linears"], "report": report}
    with atomic_dir(out_dir, prefix=".quantize-") as tmp:
        write_quantized(tmp, weights, quant, info)
    return out_dir
