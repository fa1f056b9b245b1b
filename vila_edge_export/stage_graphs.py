"""Export stage 2: checkpoint (+ the quantize stage's directory) -> ONNX graphs and the embedding table.

    python -m vila_edge_export.stages graphs CHECKPOINT GRAPHS_DIR [--dtype fp16] [--quantized QUANT_DIR]

GRAPHS_DIR holds vision.onnx (+ projector.onnx for multi-scale checkpoints), llm.onnx (+ llm.onnx.data
when large; the fused contrib-op graph or the standard-op one, by target: vila_edge/targets.py), the
embedding table (embed_tokens.npy, or .npz codes with embed_bits) and graphs.json, the sidecar the
engine stage reads: graph dtype and variant, the manifest's quant entry, the logits size, the
embedding file and dtype, the projector token order the vision graph was built with, and the
generation graphs' files, capabilities and generation facts (VILA-U: code_embed.onnx, depth.onnx and
decoder.onnx are written here too, and llm.onnx gets its `hidden` output; build_vila_u.py).
Written under a temporary name and renamed into place.
"""
import json
import math
import os

import numpy as np

from vila_edge_export.build_vila_u import manifest_fields as generation_fields, save_graphs as save_generation_graphs
from vila_edge_export.build import FILES, PROJECTOR_FILE, embed_dtype, numpy_weights, read_spec, steps
from vila_edge_export.checkpoint import CheckpointSpec, load_vision_weights, load_weights
from vila_edge_export.onnx_graph import save
from vila_edge_export.onnx_llm import build_llm, lm_head_rows
from vila_edge_export.onnx_llm_fused import build_llm_fused
from vila_edge_export.onnx_vision import build_projector, build_tower, build_vision
from vila_edge_export.options import DTYPES
from vila_edge_export.weights_check import check_finite, checkpoint_faults
from vila_edge.atomic import atomic_dir
from vila_edge.errors import ExportOptionError

SIDECAR = "graphs.json"


def graphs_stage(checkpoint: str, out_dir: str, opts, quantized: str | None = None) -> str:
    """Build the graphs as `opts` (ExportOptions) asks, from the quantize stage's directory when
    opts.quant is quantized; returns out_dir."""
    from vila_edge_export.stage_quantize import read_quantized

    if opts.quant.quantized != (quantized is not None):
        raise ExportOptionError(f"quant {opts.quant.method!r} needs {'a' if opts.quant.quantized else 'no'} quantize "
                                f"stage directory (--quantized)")
    dtype = DTYPES[opts.dtype]
    spec = read_spec(checkpoint, opts)
    with steps(opts.progress, 3, "graphs") as bar, atomic_dir(out_dir, prefix=".graphs-") as tmp:
        bar.set_postfix_str("vision"); bar.update()
        with checkpoint_faults(spec.root):
            if spec.generation is not None:     # VILA-U: quantizing tower + the generation graphs
                save_generation_graphs(spec, tmp, dtype, FILES["vision"], opts.progress, _depth_quant(opts))
            else:
                _save_vision(spec, tmp, dtype)
        bar.set_postfix_str("llm"); bar.update()
        if quantized is None:
            with checkpoint_faults(spec.root):
                weights, quant, info = numpy_weights(load_weights(spec.path("llm")), dtype), {}, {"method": "none"}
        else:
            weights, quant, info = read_quantized(quantized)
            info["accuracy_level"] = opts.int4_accuracy_level if opts.graph == "fused" else None
            info["lm_head_screen"] = opts.lm_head_screen
        check_finite(weights, spec.path("llm"))
        with checkpoint_faults(spec.root):
            hidden = spec.generation is not None       # VILA-U's depth head reads the last hidden state
            if opts.graph == "fused":
                graph = build_llm_fused(spec.llm, weights, dtype, quant, opts.int4_accuracy_level, hidden_output=hidden,
                                        kv_dtype=DTYPES[opts.kv_dtype], lm_head_screen=opts.lm_head_screen)
            else:
                graph = build_llm(spec.llm, weights, dtype, quant, hidden_output=hidden)
            llm_model = graph.model()
        del graph
        save(llm_model, os.path.join(tmp, FILES["llm"]))
        del llm_model
        bar.set_postfix_str("embeddings"); bar.update()
        with checkpoint_faults(spec.root):
            table = weights["model.embed_tokens.weight"][: spec.llm.vocab_size]
        embed_file, table_dtype = _save_embeddings(tmp, table, opts, dtype)
        sidecar = {"dtype": dtype, "kv_dtype": DTYPES[opts.kv_dtype], "graph": opts.graph, "quant": info,
                   "logits_size": int(lm_head_rows(weights, quant)), "embeddings": embed_file,
                   "embeddings_dtype": table_dtype, "token_order": spec.projector.token_order,
                   **generation_fields(spec, _depth_quant(opts))}   # files / capabilities / generation: VILA-U's
        with open(os.path.join(tmp, SIDECAR), "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2)
    return out_dir


def _depth_quant(opts):
    """VILA-U's depth transformer when the LLM is quantized: its blocks at depth_bits, its input and output
    projections at the lm_head's bits (onnx_vila_u.DEPTH_EDGE), the LLM's group and zero point."""
    if not opts.quant.quantized:
        return None
    from vila_edge_export.onnx_vila_u import DepthQuant
    from vila_edge_export.options import quant_options
    q = quant_options(opts.quant, opts.target)
    return DepthQuant(q.group_size, bool(q.zero_point), q.depth_bits, q.lm_head_bits)


def _save_vision(spec: CheckpointSpec, tmp: str, dtype: str) -> None:
    """vision.onnx = tower + projector; multi-scale checkpoints get the tower alone in vision.onnx and
    projector.onnx beside it, since the runtime merges the scales' maps in between."""
    tower = check_finite(numpy_weights(load_vision_weights(spec), dtype), spec.path("vision_tower"))
    projector = check_finite(numpy_weights(load_weights(spec.path("mm_projector")), dtype), spec.path("mm_projector"))
    if spec.scales is None:
        save(build_vision(spec.vision, spec.projector, tower, projector, dtype).model(),
             os.path.join(tmp, FILES["vision"]))
        return
    save(build_tower(spec.vision, tower, dtype).model(), os.path.join(tmp, FILES["vision"]))
    del tower
    save(build_projector(spec.projector, spec.vision.grid, projector, dtype).model(),
         os.path.join(tmp, PROJECTOR_FILE))


def _save_embeddings(tmp: str, embed: np.ndarray, opts, dtype: str) -> tuple:
    """The table as .npy (float), or as group-quantized codes (.npz, vila_edge/embeddings.py) with the
    linears' group size; -> (file name, dtype for the report)."""
    bits = opts.quant.embed_bits
    if not bits:
        table = embed_dtype(opts, dtype)
        np.save(os.path.join(tmp, FILES["embeddings"]), embed.astype(table))
        return FILES["embeddings"], table
    from vila_edge.embeddings import quantize_table
    name = "embed_tokens.npz"
    group = math.gcd(embed.shape[1], opts.quant.group_size)        # groups must tile the hidden axis
    np.savez(os.path.join(tmp, name), **quantize_table(embed, bits, group))
    return name, f"int{bits}"
