"""TensorRT optimisation profiles: min / opt / max of every dynamic input axis of an engine's graphs.

TensorRT builds kernels for a range of shapes fixed when the engine is built; a run outside the
range fails. The export (target orin) writes these ranges into the manifest (`build.tensorrt`) from
the runtime's context length, prefill chunk and block size; the TensorRT runner passes them to ORT's
TensorRT provider and refuses a runtime setting that would leave them.

LLM (docs/contracts.md): inputs_embeds [1, T, C], position_ids [1, T], past_k_l / past_v_l
[P, Hkv, D]. T: 1 (decode) .. the prefill chunk; P: whole blocks of the past, one block at least,
round_up(max_context, BS) at most. opt is a decode step at half the context: the memory-bound step
that runs most often. Vision: pixel_values [N, 3, R, R], N up to the tiles of one image.
"""
from vila_edge.errors import EngineError
from vila_edge.manifest import REBUILD


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def vision_batch(manifest) -> int:
    """Most tiles one vision call encodes: a dynamic image's tiles + thumbnail, or one image."""
    v = manifest.vision
    if v.multiscale:     # every scale's tiles of one image in one call (vila_edge/multiscale.py)
        return sum((s // v.image_size) ** 2 for s in v.scales) * (v.max_tiles if v.multiscale == "dynamic_s2" else 1)
    return v.max_tiles + 1 if v.image_mode == "dynamic" else 1


def profiles(manifest, max_context: int, prefill_chunk: int, block_size: int) -> dict:
    """{"max_context", "prefill_chunk", "block_size", "llm": {input: {min, opt, max}}, "vision": {...}}."""
    i, v = manifest.llm, manifest.vision
    max_p = _round_up(max_context, block_size)
    opt_p = _round_up(max(max_context // 2, 1), block_size)
    chunk = min(prefill_chunk, max_context)
    llm = {"inputs_embeds": {"min": [1, 1, i.hidden], "opt": [1, 1, i.hidden], "max": [1, chunk, i.hidden]},
           "position_ids": {"min": [1, 1], "opt": [1, 1], "max": [1, chunk]}}
    for layer in range(i.layers):
        for kv in "kv":
            llm[f"past_{kv}_{layer}"] = {"min": [1, i.kv_heads, i.head_dim], "opt": [opt_p, i.kv_heads, i.head_dim],
                                         "max": [max_p, i.kv_heads, i.head_dim]}
    r = v.image_size
    vision = {"pixel_values": {"min": [1, 3, r, r], "opt": [1, 3, r, r], "max": [vision_batch(manifest), 3, r, r]}}
    return {"max_context": max_context, "prefill_chunk": chunk, "block_size": block_size,
            "llm": llm, "vision": vision}


def provider_shapes(profile: dict) -> dict:
    """{input: {min, opt, max}} -> ORT TensorRT provider options ("name:1x1x2560,name2:...")."""
    def one(which):
        return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in profile.items())
    return {"trt_profile_min_shapes": one("min"), "trt_profile_opt_shapes": one("opt"),
            "trt_profile_max_shapes": one("max")}


def engine_profile(engine_dir: str, manifest) -> dict:
    """The profile the export wrote into the manifest (target orin engines)."""
    p = manifest.build.get("tensorrt")
    if not isinstance(p, dict) or not {"llm", "vision", "max_context"} <= set(p):
        raise EngineError(f"{engine_dir}/manifest.json: no build.tensorrt profile; export the engine with "
                          f"--target orin for device 'tensorrt'; " + REBUILD.format(out=engine_dir))
    return p


def check_context(engine_dir: str, p: dict, max_context: int, block_size: int) -> None:
    """A runtime context or block size whose past rows leave the profile fails here, not in TensorRT."""
    need = _round_up(max_context, block_size)
    have = p["llm"]["past_k_0"]["max"][0]
    if need > have:
        raise EngineError(f"{engine_dir}: its TensorRT profile covers {have} past positions; max_context "
                          f"{max_context} with block size {block_size} needs {need}: run with --max-context "
                          f"<= {p['max_context']}, or re-export with a larger context")
