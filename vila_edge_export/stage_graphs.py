"""Export stage 2: checkpoint (+ the quantize stage's directory) -> ONNX graphs and the embedding table.

    python -m vila_edge_export.stages graphs CHECKPOINT GRAPHS_DIR [--dtype fp16] [--quantized QUANT_DIR]

GRAPHS_DIR holds vision.onnx, llm.onnx (+ llm.onnx.data when large), embed_tokens.npy and
graphs.json, the sidecar the engine stage reads: graph dtype, the manifest's quant entry, the
logits size, the embedding dtype and the projector token order the vision graph was built with.
Written under a temporary name and renamed into place.
"""
import json
import os

import numpy as np

from vila_edge_export.build import FILES, embed_dtype, numpy_weights, read_spec, steps
from vila_edge_export.checkpoint import load_vision_weights, load_weights
from vila_edge_export.onnx_graph import save
from vila_edge_export.onnx_llm import build_llm, lm_head_rows
from vila_edge_export.onnx_vision import build_vision
from vila_edge_export.options import DTYPES
from vila_edge.atomic import atomic_dir

SIDECAR = "graphs.json"


def graphs_stage(checkpoint: str, out_dir: str, opts, quantized: str | None = None) -> str:
    """Build the graphs as `opts` (ExportOptions) asks, from the quantize stage's directory when
    opts.quant is quantized; returns out_dir."""
    from vila_edge_export.stage_quantize import read_quantized

    if opts.quant.quantized != (quantized is not None):
        raise ValueError(f"quant {opts.quant.method!r} needs {'a' if opts.quant.quantized else 'no'} quantize "
                         f"stage directory (--quantized)")
    dtype = DTYPES[opts.dtype]
    spec = read_spec(checkpoint, opts)
    with steps(opts.progress, 3, "graphs") as bar, atomic_dir(out_dir, prefix=".graphs-") as tmp:
        bar.set_postfix_str("vision"); bar.update()
        vision = build_vision(spec.vision, spec.projector, numpy_weights(load_vision_weights(spec), dtype),
                              numpy_weights(load_weights(spec.path("mm_projector")), dtype), dtype)
        save(vision.model(), os.path.join(tmp, FILES["vision"]))
        del vision
        bar.set_postfix_str("llm"); bar.update()
        if quantized is None:
            weights, quant, info = numpy_weights(load_weights(spec.path("llm")), dtype), {}, {"method": "none"}
        else:
            weights, quant, info = read_quantized(quantized)
        save(build_llm(spec.llm, weights, dtype, quant).model(), os.path.join(tmp, FILES["llm"]))
        bar.set_postfix_str("embeddings"); bar.update()
        table = embed_dtype(opts, dtype)
        np.save(os.path.join(tmp, FILES["embeddings"]),
                weights["model.embed_tokens.weight"][: spec.llm.vocab_size].astype(table))
        sidecar = {"dtype": dtype, "quant": info, "logits_size": int(lm_head_rows(weights, quant)),
                   "embeddings_dtype": table, "token_order": spec.projector.token_order}
        with open(os.path.join(tmp, SIDECAR), "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2)
    return out_dir
