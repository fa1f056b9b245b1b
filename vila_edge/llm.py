"""The LLM engine: runs llm.onnx over sequences whose KV lives in the paged pool.

Each forward pass takes the embeddings of the positions not yet in the pool, the sequence's block
table and how many positions are already there (`past_len`); the graph gathers the past from the
pool and returns the new rows, which are written at the slots the BlockManager reserved.
"""
from dataclasses import dataclass

import numpy as np

from vila_edge.backend import OrtSession
from vila_edge.kv_blocks import BlockManager
from vila_edge.kv_budget import plan_num_blocks
from vila_edge.kv_cache import KVLayout, KVPool
from vila_edge.manifest import LLMInfo

# Prompt positions per forward pass: bounds activation memory (T x T scores, T x vocab never
# materialised: the graph returns the last position's logits only).
PREFILL_CHUNK = 512


# Without a budget the pool holds this many full contexts (a few concurrent conversations).
DEFAULT_CONTEXTS = 4


@dataclass(frozen=True)
class KVConfig:
    block_size: int = 16
    # Bytes (int or "512MiB"), or a device preset ("orin-nano", "orin-nx", "agx-orin-32gb",
    # "agx-orin-64gb": DRAM minus the engine's weights minus a reserve, see kv_budget.py).
    # None: room for DEFAULT_CONTEXTS full contexts.
    budget: "int | str | None" = None
    wait_s: float = 0.0          # how long a request waits for a full pool before KVCacheFull


class LLMEngine:
    def __init__(self, session: OrtSession, info: LLMInfo, dtype: str, kv: KVConfig, max_context: int,
                 weights_bytes: int):
        self.session, self.info, self.dtype = session, info, np.dtype(dtype)
        self.max_context = max_context
        layout = KVLayout(info.layers, info.kv_heads, info.head_dim, kv.block_size, self.dtype.name)
        if kv.budget is None:
            n = DEFAULT_CONTEXTS * -(-max_context // kv.block_size)
        else:
            n = plan_num_blocks(layout, kv.budget, weights_bytes, max_context)
        self.pool = KVPool(layout, n)
        self.blocks = BlockManager(n, kv.block_size, kv.wait_s)
        self._pool_feeds = {}
        for layer in range(info.layers):
            k, v = self.pool.layer(layer)
            self._pool_feeds[f"k_pool_{layer}"] = k
            self._pool_feeds[f"v_pool_{layer}"] = v

    def _forward(self, embeds: np.ndarray, start: int, table: list, slots: np.ndarray) -> np.ndarray:
        """Positions start..start+T-1 given embeds [T, C]; writes their KV; returns logits [V']."""
        t = len(embeds)
        feeds = dict(self._pool_feeds)
        feeds.update(inputs_embeds=embeds[None].astype(self.dtype, copy=False),
                     position_ids=np.arange(start, start + t, dtype=np.int64)[None],
                     past_len=np.array(start, np.int64), block_table=np.asarray(table, np.int64))
        out = self.session.run(feeds)
        layers = range(self.info.layers)
        self.pool.write([out[f"k_new_{l}"] for l in layers], [out[f"v_new_{l}"] for l in layers], slots)
        return out["logits"][0]

    def prefill(self, seq_id, embeds: np.ndarray, keys: np.ndarray) -> tuple:
        """Start a sequence; reuses cached prefix blocks. Returns (logits, cached token count)."""
        alloc = self.blocks.allocate(seq_id, keys.tolist())
        cached = alloc.num_cached_tokens
        try:
            logits = self._run_chunks(seq_id, embeds[cached:], cached, alloc.block_table, alloc.slots)
        except BaseException:
            self.blocks.free(seq_id)
            raise
        return logits, cached

    def extend(self, seq_id, embeds: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Append positions to a live sequence (a decode step) and run them."""
        start = self.blocks.num_tokens(seq_id)
        slots = self.blocks.append(seq_id, keys.tolist())
        try:
            return self._run_chunks(seq_id, embeds, start, self.blocks.block_table(seq_id), slots)
        except BaseException:
            # Reserved-but-uncomputed positions would poison the sequence: drop it whole.
            self.blocks.free(seq_id)
            raise

    def _run_chunks(self, seq_id, embeds: np.ndarray, start: int, table: list, slots: np.ndarray) -> np.ndarray:
        """embeds [T, C] of positions start..start+T-1, in chunks of PREFILL_CHUNK."""
        logits = None
        for lo in range(0, len(embeds), PREFILL_CHUNK):
            hi = min(lo + PREFILL_CHUNK, len(embeds))
            logits = self._forward(embeds[lo:hi], start + lo, table, slots[lo:hi])
            self.blocks.commit(seq_id, start + hi)
        return logits

    def release(self, seq_id) -> None:
        self.blocks.free(seq_id)
