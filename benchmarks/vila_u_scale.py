"""Per-layer scaling of a VILA-U image-generation timing measured with fewer layers (bench_vila_u):
the 7B-256 model at fp32 does not fit this machine, so the benchmark runs its widths with fewer LLM
and depth-transformer layers and scales each part of the time to the full depth.

Every part of the position loop streams its weights once per pass (two rows per pass: the weights,
not the arithmetic, set the time), so a part's time is taken as proportional to the weight bytes it
reads: fixed + layers x per-layer. Parts and their bytes (in parameters; the dtype cancels):
- prefill: the LLM's layers only;
- LLM steps: the layers, plus the code embedding's projector (C x hidden + hidden x hidden) both sides
  time with them (vila_edge: embed_codes; the reference: projector before each step);
- depth steps: 12 E^2 per block, plus the classifier (K x E), in_mlp_1 (C x E) and in_mlp_2
  (hidden x E, once per position: / D per step);
- the reference's dummy text token, the decoder and the rest of the loop: no layers, unscaled.
"""
from vila_edge_export.fixtures_vila_u import SHAPES

FULL = SHAPES["vila-u-7b-256"]
FULL_LLM_LAYERS, FULL_DEPTH_LAYERS = FULL["llm"][1], FULL["head"][1]


def applies(spec) -> bool:
    """Only a checkpoint of the 7B-256 widths (fewer layers) scales to it."""
    return (spec.llm.hidden, spec.llm.intermediate, spec.head[0], spec.codebook_size) == \
        (FULL["llm"][0], FULL["llm"][3], FULL["head"][0], FULL["K"])


def _ratio(fixed: float, per_layer: float, measured: int, wanted: int) -> float:
    return (fixed + wanted * per_layer) / (fixed + measured * per_layer)


def factors(spec, llm_layers: int = FULL_LLM_LAYERS, depth_layers: int = FULL_DEPTH_LAYERS) -> dict:
    """Time multipliers per part, from the checkpoint's spec (read_vila_u) to the wanted layer counts."""
    llm, C = spec.llm, spec.siglip.hidden
    E, n_head_layers, _ = spec.head
    layer = llm.hidden * (llm.heads + 2 * llm.kv_heads) * llm.head_dim + llm.heads * llm.head_dim * llm.hidden \
        + 3 * llm.hidden * llm.intermediate
    projector = C * llm.hidden + llm.hidden * llm.hidden
    depth_fixed = spec.codebook_size * E + C * E + llm.hidden * E / spec.depth
    return {"prefill": llm_layers / llm.layers,
            "llm_steps": _ratio(projector, layer, llm.layers, llm_layers),
            "depth": _ratio(depth_fixed, 12 * E * E, n_head_layers, depth_layers),
            "layers": (llm.layers, n_head_layers), "wanted": (llm_layers, depth_layers)}


def scaled_image(seconds: float, split: dict, positions: int, total: int, f: dict) -> float:
    """One repeat of a `positions` run -> seconds per whole image at the wanted layer counts."""
    loop = split["loop_s"] if "loop_s" in split else seconds - split["decoder_s"]
    prefill, llm, depth = split["prefill_s"], split["llm_s"], split["depth_s"]
    head = split.get("text_head_s", 0.0)
    rest = loop - llm - depth - head                      # sampling bookkeeping, progress: unscaled
    per_position = ((llm - prefill) * f["llm_steps"] + depth * f["depth"] + head + rest) / positions
    return prefill * f["prefill"] + per_position * total + split["decoder_s"]
