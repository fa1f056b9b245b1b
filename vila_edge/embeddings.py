"""The token embedding table a runner gathers text rows from: float (.npy) or group-quantized (.npz).

A quantized table stores symmetric codes per row in groups of G along the hidden axis, as the
exporter quantizes linears (vila_edge_export/quantize.py): row = codes * scales[group]. int4 codes are packed
two per byte, low nibble first (ONNX INT4 order, vila_edge_export/onnx_graph.py pack_int4). Only the rows a
step needs are dequantized, so SmolLM2's 49k x 576 table costs 14 MB (int4, G 32) instead of 57 MB
(fp16), at a few microseconds per decode step.
"""
import os

import numpy as np

from vila_edge.errors import EngineError


class EmbeddingTable:
    def __init__(self, table: np.ndarray | None = None, codes: np.ndarray | None = None,
                 scales: np.ndarray | None = None, bits: int = 0):
        self.table, self.codes, self.scales, self.bits = table, codes, scales, bits
        if table is not None:
            self.rows, self.width = table.shape
        else:
            self.rows = codes.shape[0]
            self.width = codes.shape[1] * (2 if bits == 4 else 1)
            self.group = self.width // scales.shape[1]

    @staticmethod
    def load(engine_dir: str, manifest) -> "EmbeddingTable":
        path = os.path.join(engine_dir, manifest.files["embeddings"])
        if path.endswith(".npy"):
            # Mapped, not read: pages load on first use (never unpickled; shape and dtype checked
            # against the manifest). A plain ndarray view of the map: indexing a np.memmap builds a
            # memmap object per call (~100 us, as much as a small model's step).
            from vila_edge.engine_check import load_embeddings
            from vila_edge.manifest import REBUILD
            return EmbeddingTable(table=load_embeddings(path, manifest, REBUILD.format(out=engine_dir))
                                  .view(np.ndarray))
        try:
            z = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise EngineError(f"{path}: not a numpy archive this runtime can read ({e}); rebuild the engine") from e
        with z:
            bits = int(z["bits"])
            if bits not in (4, 8):
                raise EngineError(f"{path}: embedding codes of {bits} bits; expected 4 or 8")
            return EmbeddingTable(codes=z["codes"], scales=z["scales"], bits=bits)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """[n, C] float rows of text ids (float32 for a quantized table, the stored dtype otherwise)."""
        if self.table is not None:
            return self.table[ids]
        codes = self.codes[ids]
        if self.bits == 4:
            lo = (codes & 0x0F).astype(np.int8)
            hi = (codes >> 4).astype(np.int8)
            q = np.stack([lo, hi], axis=-1).reshape(len(ids), -1)     # (n, C): low nibble first
            q = np.where(q > 7, q - 16, q)                              # two's complement 4-bit
        else:
            q = codes
        n = len(ids)
        x = q.reshape(n, -1, self.group).astype(np.float32) * self.scales[ids].astype(np.float32)[..., None]
        return x.reshape(n, self.width)


def quantize_table(table: np.ndarray, bits: int, group: int) -> dict:
    """Symmetric per-group codes of a [V, C] float table: {codes, scales fp16, bits} for np.savez."""
    V, C = table.shape
    if C % group:
        raise ValueError(f"embedding width {C} is not a multiple of the group size {group}")
    x = table.astype(np.float32).reshape(V, C // group, group)
    qmax = (1 << (bits - 1)) - 1
    scales = (np.abs(x).max(axis=-1) / qmax).astype(np.float16)
    safe = np.where(scales == 0, 1, scales).astype(np.float32)
    q = np.clip(np.rint(x / safe[..., None]), -qmax - (bits == 4), qmax).astype(np.int8).reshape(V, C)
    if bits == 4:
        u = q.view(np.uint8) & 0x0F
        codes = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    else:
        codes = q
    return {"codes": codes, "scales": scales, "bits": np.array(bits)}
