"""ONNX Runtime sessions of VILA-U's image-generation graphs (export/onnx_vila_u.py): the code
embedding (next LLM input), the depth-transformer step and the pixel decoder. The LLM itself runs
through the LLM runner, whose graph also returns the final hidden state (`last_hidden`).
"""
import os

import numpy as np

from vila_edge.backend import OrtSession
from vila_edge.errors import EngineError


class OrtImageRunner:
    def __init__(self, engine_dir: str, manifest, opts):
        missing = [role for role in ("code_embed", "depth", "decoder") if role not in manifest.files]
        if missing:
            raise EngineError(f"{engine_dir}: manifest lists no {', '.join(missing)} graph; re-export the "
                              f"VILA-U checkpoint")
        open_ = lambda role: OrtSession(os.path.join(engine_dir, manifest.files[role]), opts.threads)
        self.code_embed, self.depth, self.decoder = open_("code_embed"), open_("depth"), open_("decoder")
        self.dtype = np.dtype(manifest.dtype)

    def embed_codes(self, codes: np.ndarray) -> np.ndarray:
        """codes (B, D) int64 -> LLM input rows (B, hidden)."""
        return self.code_embed.run({"codes": codes.astype(np.int64)})["inputs_embeds"]

    def depth_logits(self, hidden: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """hidden (B, hidden), this position's codes so far (B, d) -> float32 logits (B, K) for depth d."""
        return self.depth.run({"hidden": hidden.astype(self.dtype), "codes": codes.astype(np.int64)})["logits"]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes (N, g, g, D) -> uint8 (N, H, W, 3); the graph clamps (x + 1) * 127.5, the cast truncates
        (mit-han-lab/vila-u@096623c:inference.py:8-14)."""
        return self.decoder.run({"codes": codes.astype(np.int64)})["pixels"].astype(np.uint8)


def image(engine_dir: str, manifest, opts) -> OrtImageRunner:
    return OrtImageRunner(engine_dir, manifest, opts)
