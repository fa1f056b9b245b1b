"""The LLM engine: runs llm.onnx over sequences whose KV lives in the paged pool.

Each forward pass takes the embeddings of the positions not yet in the pool, how many positions are
already there (`past_len`) and, per layer, the past K/V rows: the pool blocks of the sequence's
block table, passed as zero-copy views of the pool when those blocks are consecutive (a sequence
allocated in one piece, the common case) and gathered into one copy otherwise. The graph returns
the new rows, which are written at the slots the BlockManager reserved.
"""
import threading
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
        self._names = [(f"past_k_{l}", f"past_v_{l}") for l in range(info.layers)]
        self._max_blocks = -(-max_context // kv.block_size)
        self._local = threading.local()

    def _past(self, table: list, past_len: int) -> dict:
        """Per layer past K and V [P, Hkv, D]: the first max(1, ceil(past_len / BS)) blocks of the
        table (at least one block: the graph's past is never empty; rows from past_len on are masked)."""
        n = max(1, -(-past_len // self.pool.layout.block_size))
        first = table[0]
        if list(table[:n]) == list(range(first, first + n)):
            blocks = self.pool.data[:, :, first: first + n]         # a view: no copy
        else:
            # Scattered blocks: one copy into this thread's staging buffer (reused, grown by doubling:
            # a fresh array per step would page-fault hundreds of MB each step at 3B shapes).
            stage = getattr(self._local, "stage", None)
            if stage is None or stage.shape[2] < n:
                cap = min(max(n, 2 * (0 if stage is None else stage.shape[2])), self._max_blocks)
                stage = self._local.stage = np.empty(self.pool.data.shape[:2] + (cap,) + self.pool.data.shape[3:],
                                                     self.pool.data.dtype)
            blocks, ids = stage[:, :, :n], np.asarray(table[:n])
            for layer, kv in np.ndindex(blocks.shape[:2]):       # contiguous out: no buffering in take
                np.take(self.pool.data[layer, kv], ids, axis=0, out=blocks[layer, kv], mode="clip")
        L, _, _, BS, H, D = blocks.shape
        rows = blocks.reshape(L, 2, n * BS, H, D)                    # merges contiguous axes: still a view
        return {name: rows[l, kv] for l, pair in enumerate(self._names) for kv, name in enumerate(pair)}

    def _forward(self, embeds: np.ndarray, start: int, table: list, slots: np.ndarray) -> np.ndarray:
        """Positions start..start+T-1 given embeds [T, C]; writes their KV; returns logits [V']."""
        t = len(embeds)
        feeds = self._past(table, start)
        feeds.update(inputs_embeds=embeds[None].astype(self.dtype, copy=False),
                     position_ids=np.arange(start, start + t, dtype=np.int64)[None],
                     past_len=np.array(start, np.int64))
        out = self.session.run(feeds)
        layers = range(self.info.layers)
        self.pool.write([out[f"k_new_{l}"] for l in layers], [out[f"v_new_{l}"] for l in layers], slots)
        return out["logits"][0]

    def prefill(self, seq_id, embeds: np.ndarray, keys: np.ndarray, grow: int = 0) -> tuple:
        """Start a sequence; reuses cached prefix blocks. `grow`: positions decode will append
        (placement hint, BlockManager.allocate). Returns (logits, cached token count)."""
        alloc = self.blocks.allocate(seq_id, keys.tolist(), grow)
        cached = alloc.num_cached_tokens
        try:
            logits = self._run_chunks(seq_id, embeds[cached:], cached, alloc.block_table, alloc.slots)
        except BaseException:
            self.blocks.free(seq_id)
            raise
        return logits, cached

    def extend(self, seq_id, embeds: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Append positions to a live sequence (a decode step) and run them."""
        try:
            start = self.blocks.num_tokens(seq_id)
            slots = self.blocks.append(seq_id, keys.tolist())
            return self._run_chunks(seq_id, embeds, start, self.blocks.block_table(seq_id), slots)
        except BaseException:
            # Reserved-but-uncomputed positions would poison the sequence, and a caller that sees an
            # error (KVCacheFull from append included) forgets it: drop it whole, here.
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

    def release_later(self, seq_id) -> None:
        """release() for garbage-collector callbacks: takes no lock (BlockManager.release_later)."""
        self.blocks.release_later(seq_id)
