"""ONNX Runtime sessions of VILA-U's image-generation graphs (vila_edge_export/onnx_vila_u.py): the code
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
        # The depth graph's per-position KV cache: past_{k,v}_i (B, heads, d, head_dim) per layer.
        self._past = [(i.name, i.shape[1], i.shape[3]) for i in self.depth.session.get_inputs()
                      if i.name.startswith("past_")]
        # Graphs whose `hidden` has its own row axis ("H") read it at depth 0 only (onnx_vila_u.build_depth);
        # older exports take it at every depth.
        self._hidden_once = next(i.shape[0] for i in self.depth.session.get_inputs() if i.name == "hidden") == "H"

    def embed_codes(self, codes: np.ndarray) -> np.ndarray:
        """codes (B, D) int64 -> LLM input rows (B, hidden)."""
        return self.code_embed.run({"codes": codes.astype(np.int64)})["inputs_embeds"]

    def depth_cache(self, rows: int) -> dict:
        """An empty per-position cache of the depth transformer for `rows` rows."""
        return {name: np.zeros((rows, heads, 0, dim), self.dtype) for name, heads, dim in self._past}

    def depth_logits(self, hidden: np.ndarray, codes: np.ndarray, cache: dict) -> tuple:
        """hidden (B, hidden), this position's codes so far (B, d), the cache of depths < d ->
        (float32 logits (B, K) for depth d, the cache extended by depth d)."""
        if self._hidden_once and codes.shape[1]:
            hidden = hidden[:0]
        out = self.depth.run({"hidden": hidden.astype(self.dtype), "codes": codes.astype(np.int64), **cache})
        return out["logits"], {name: out["present" + name[len("past"):]] for name in cache}

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes (N, g, g, D) -> uint8 (N, H, W, 3); the graph clamps (x + 1) * 127.5, the cast truncates
        (mit-han-lab/vila-u@096623c:inference.py:8-14)."""
        return self.decoder.run({"codes": codes.astype(np.int64)})["pixels"].astype(np.uint8)


def image(engine_dir: str, manifest, opts) -> OrtImageRunner:
    return OrtImageRunner(engine_dir, manifest, opts)
