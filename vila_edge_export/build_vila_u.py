"""VILA-U's part of an engine export: the graphs image generation needs, and the manifest fields.

vila_edge_export/stage_graphs.py calls `save_graphs` instead of its vision export when the checkpoint is VILA-U
(CheckpointSpec.generation set), builds llm.onnx with its hidden-state output, and records
`manifest_fields` in its graphs.json sidecar; the engine stage (build.engine_stage) writes them into
the manifest and checks the extra graphs load.
"""
import os

from vila_edge_export.checkpoint import load_weights
from vila_edge_export.onnx_graph import save
from vila_edge_export.onnx_vila_u import build_code_embed, build_decoder, build_depth, build_vision_vila_u

FILES = {"code_embed": "code_embed.onnx", "depth": "depth.onnx", "decoder": "decoder.onnx"}
CAPABILITIES = ["generate_image"]      # vila_edge/server/app.py IMAGE_CAPABILITY


def save_graphs(spec, tmp: str, dtype: str, vision_file: str, progress: bool = True, depth_quant=None) -> None:
    """vision.onnx (tower + quantizer + projector) and the three generation graphs, each loaded in
    ONNX Runtime once written (a graph ORT cannot load never reaches a published engine).
    depth_quant: None, or an onnx_vila_u.DepthQuant for a quantized depth transformer (quantized engines)."""
    import numpy as np
    import onnxruntime as ort
    from tqdm import tqdm

    vu = spec.generation
    tower = {k: v.float().numpy().astype(np.dtype(dtype)) for k, v in load_weights(spec.path("vision_tower")).items()
             if not k.startswith("rqvaesiglip.siglip_model.text_model.")}
    projector = {k: v.float().numpy().astype(np.dtype(dtype)) for k, v in load_weights(spec.path("mm_projector")).items()}
    stages = [(vision_file, lambda: build_vision_vila_u(vu, tower, projector, dtype)),
              (FILES["code_embed"], lambda: build_code_embed(vu, tower, projector, dtype)),
              (FILES["depth"], lambda: build_depth(vu, tower, dtype, depth_quant)),
              (FILES["decoder"], lambda: build_decoder(vu, tower, dtype))]
    with tqdm(stages, desc="vila-u graphs", unit="graph", disable=not progress, leave=False) as bar:
        for name, build in bar:
            bar.set_postfix_str(name)
            path = os.path.join(tmp, name)
            save(build().model(), path)
            ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def manifest_fields(spec, depth_quant=None) -> dict:
    """files, capabilities and generation facts for the manifest (empty for other families)."""
    vu = spec.generation
    if vu is None:
        return {"files": {}, "capabilities": [], "generation": {}}
    side = (vu.decoder_latent or [vu.siglip.grid])[0] * 2 ** (len(vu.decoder["ch_mult"]) - 1)
    return {"files": dict(FILES), "capabilities": list(CAPABILITIES),
            "generation": {"depth": vu.depth, "codebook_size": vu.codebook_size, "grid": vu.siglip.grid,
                           "image_size": side, "im_start_id": vu.special_ids["<im_start>"],
                           "vi_start_id": vu.special_ids["<vi_start>"],
                           # the depth transformer's blocks: 8 / 4 (RTN, group <= depth_group) or 0 = float;
                           # its input / output projections (onnx_vila_u.DEPTH_EDGE): 8, 4 or float
                           "depth_bits": depth_quant.bits if depth_quant else 0,
                           "depth_group": depth_quant.group if depth_quant else 0,
                           "depth_edge_bits": depth_quant.edge_bits if depth_quant else 0}}
