"""The LLM engine: policy over a runner. Chunked prefill, decode steps, rollback on failure.

LLMEngine sees integers and token inputs: block tables and slots come from the BlockManager, and
the runner (vila_edge/runner.py) owns every byte of device memory, the KV pool included.
"""
from dataclasses import dataclass

import numpy as np

from vila_edge.kv_blocks import BlockManager
from vila_edge.runner import LLMRunner, Tokens

# Prompt positions per forward pass: bounds activation memory (T x T scores, T x vocab never
# materialised: the graph returns the last position's logits only).
PREFILL_CHUNK = 512


# Without a budget the pool holds this many full contexts (a few concurrent conversations).
DEFAULT_CONTEXTS = 4


@dataclass(frozen=True)
class KVConfig:
    block_size: int = 16
    # Bytes (int or "512MiB"): the KV pool's size. Or a device preset ("orin-nano", "orin-nx",
    # "agx-orin-32gb", "agx-orin-64gb"): the pool gets what is left of the module's DRAM after the
    # reserve, the weights and every other buffer (vila_edge/memory.py). None: room for
    # DEFAULT_CONTEXTS full contexts.
    budget: "int | str | None" = None
    wait_s: float = 0.0          # how long a request waits for a full pool before KVCacheFull


def _tokens(inputs) -> Tokens:
    return inputs if isinstance(inputs, Tokens) else Tokens.from_embeds(np.asarray(inputs))


class LLMEngine:
    def __init__(self, runner: LLMRunner, kv: KVConfig):
        self.runner = runner
        self.blocks = BlockManager(runner.num_blocks, runner.layout.block_size, kv.wait_s)

    @property
    def pool(self):
        return self.runner.pool

    def prefill(self, seq_id, inputs, keys: np.ndarray, grow: int = 0) -> tuple:
        """Start a sequence; reuses cached prefix blocks. `inputs`: Tokens, or input rows [T, C].
        `grow`: positions decode will append (placement hint, BlockManager.allocate).
        Returns (logits, cached token count)."""
        tokens = _tokens(inputs)
        alloc = self.blocks.allocate(seq_id, keys.tolist(), grow)
        cached = alloc.num_cached_tokens
        try:
            logits = self._run_chunks(seq_id, tokens.slice(cached, len(tokens)), cached, alloc.block_table,
                                      alloc.slots)
        except BaseException:
            self.blocks.free(seq_id)
            raise
        return logits, cached

    def extend(self, seq_id, inputs, keys: np.ndarray) -> np.ndarray:
        """Append positions to a live sequence (a decode step) and run them."""
        tokens = _tokens(inputs)
        try:
            start, table, slots = self.blocks.reserve(seq_id, keys.tolist())
            return self._run_chunks(seq_id, tokens, start, table, slots)
        except BaseException:
            # Reserved-but-uncomputed positions would poison the sequence, and a caller that sees an
            # error (KVCacheFull from append included) forgets it: drop it whole, here.
            self.blocks.free(seq_id)
            raise

    def step(self, seq_id, token: int) -> np.ndarray:
        """One decode step of a text token: its id is its block key. extend's behaviour with two
        BlockManager calls (append_token, commit) instead of four."""
        try:
            start, table, slot = self.blocks.append_token(seq_id, token)
            logits = self.runner.decode(token, start, table, slot)
            self.blocks.commit(seq_id, start + 1)
            return logits
        except BaseException:
            self.blocks.free(seq_id)      # as extend
            raise

    def _run_chunks(self, seq_id, tokens: Tokens, start: int, table: list, slots: np.ndarray) -> np.ndarray:
        """Positions start..start+T-1, in chunks of PREFILL_CHUNK."""
        if 0 < len(tokens) <= PREFILL_CHUNK:      # one chunk (a decode step): no Tokens.slice copy
            logits = self.runner.forward(tokens, start, table, slots)
            self.blocks.commit(seq_id, start + len(tokens))
            return logits
        logits = None
        for lo in range(0, len(tokens), PREFILL_CHUNK):
            hi = min(lo + PREFILL_CHUNK, len(tokens))
            logits = self.runner.forward(tokens.slice(lo, hi), start + lo, table, slots[lo:hi])
            self.blocks.commit(seq_id, start + hi)
        return logits

    def release(self, seq_id) -> None:
        self.blocks.free(seq_id)

    def release_later(self, seq_id) -> None:
        """release() for garbage-collector callbacks: takes no lock (BlockManager.release_later)."""
        self.blocks.release_later(seq_id)
