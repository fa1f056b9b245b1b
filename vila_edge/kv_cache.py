"""The paged KV pool: one array `[L, 2, NB, BS, Hkv, D]` allocated once (docs/contracts.md).

`KVLayout` is the shape of one block; `KVPool` owns the memory and moves rows in and out of it by
slot id (`slot = block * BS + row`, the vLLM slot mapping). Which slots a sequence owns is decided
by `kv_blocks.BlockManager`; how many blocks fit a device by `kv_budget`. No torch: on the GPU the
same layout lives in device buffers, and this numpy pool is the CPU backend and the test reference.
"""
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vila_edge.errors import KVConfigError


@dataclass(frozen=True)
class KVLayout:
    num_layers: int     # L
    num_kv_heads: int   # Hkv
    head_dim: int       # D
    block_size: int     # BS tokens per block
    dtype: str = "float16"   # numpy dtype name of the pool

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVConfigError(f"KVLayout.{name} must be a positive int, got {value!r}")
        try:
            np.dtype(self.dtype)
        except TypeError as e:
            raise KVConfigError(f"KVLayout.dtype {self.dtype!r} is not a numpy dtype name") from e

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def bytes_per_token(self) -> int:
        """K and V of one position across all layers: 2 * L * Hkv * D * itemsize."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block(self) -> int:
        """2 * L * BS * Hkv * D * itemsize."""
        return self.bytes_per_token * self.block_size

    def pool_shape(self, num_blocks: int) -> tuple:
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)


class KVPool:
    """All layers' K and V blocks in one array `data [L, 2, NB, BS, Hkv, D]` (index 0 K, 1 V)."""

    def __init__(self, layout: KVLayout, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"KVPool needs at least one block, got num_blocks={num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks
        # np.zeros would map copy-on-write zero pages and commit memory only when a page is first
        # written, so the real footprint would grow mid-conversation and an overcommitted board
        # (Orin's CPU and GPU share DRAM) would OOM then, not here. Touching every page now makes
        # the pool's memory real at startup; zeros rather than garbage make unwritten rows
        # deterministic for tests.
        self.data = np.empty(layout.pool_shape(num_blocks), dtype=layout.dtype)
        self.data.fill(0)
        L, _, NB, BS, H, D = self.data.shape
        self._rows = self.data.reshape(L, 2, NB * BS, H, D)  # view: (L, kv, slot, Hkv, D)

    @property
    def rows(self) -> np.ndarray:
        """The pool as rows by slot: a view `[L, 2, NB * BS, Hkv, D]` (runners write new KV into it)."""
        return self._rows

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def layer(self, layer: int) -> tuple:
        """(k_pool, v_pool) of one layer: contiguous views [NB, BS, Hkv, D], the block layout the CUDA
        paged-attention kernel reads (llm.onnx takes rows, not the pool: engine format 2)."""
        return self.data[layer, 0], self.data[layer, 1]

    def write(self, k_new, v_new, slots) -> None:
        """Scatter new rows of every layer into `slots` (int [T], from BlockManager).

        k_new, v_new: [L, T, Hkv, D] arrays, or L arrays [T, Hkv, D] (the graph's per-layer
        k_new_l / v_new_l outputs). One fancy-indexed assignment per layer and K/V.
        """
        slots = self._check_slots(slots)
        L, _, _, H, D = self._rows.shape
        want = (len(slots), H, D)
        if len(k_new) != L or len(v_new) != L:
            raise ValueError(f"KVPool.write: expected K and V for {L} layers, "
                             f"got {len(k_new)} and {len(v_new)}")
        # Consecutive slots (decode steps, prefill into a consecutive table) take a slice assignment,
        # several times cheaper per layer than a fancy-indexed one at one or a few rows.
        n = len(slots)
        index = slice(int(slots[0]), int(slots[0]) + n) if n and int(slots[-1]) - int(slots[0]) == n - 1 and \
            (n < 3 or bool((np.diff(slots) == 1).all())) else slots
        for layer in range(L):
            for kv, rows in ((0, k_new[layer]), (1, v_new[layer])):
                if rows.shape != want:
                    raise ValueError(f"KVPool.write: layer {layer} {'KV'[kv]} rows have shape "
                                     f"{rows.shape}, expected [T, Hkv, D] = {want}")
                self._rows[layer, kv, index] = rows

    def copy_block(self, src: int, dst: int) -> None:
        """Copy every layer's K and V of block `src` into block `dst` (BlockManager.fork's copies)."""
        self.data[:, :, dst] = self.data[:, :, src]

    def gather(self, block_table: Sequence[int], n_tokens: int) -> tuple:
        """(k, v), each [L, n_tokens, Hkv, D]: positions 0..n_tokens-1 of a sequence, in order."""
        BS = self.layout.block_size
        if n_tokens > len(block_table) * BS:
            raise ValueError(f"KVPool.gather: {n_tokens} tokens need {-(-n_tokens // BS)} blocks, "
                             f"the table has {len(block_table)}")
        pos = np.arange(n_tokens)
        slots = self._check_slots(np.asarray(block_table, dtype=np.int64)[pos // BS] * BS + pos % BS)
        return self._rows[:, 0, slots], self._rows[:, 1, slots]

    def _check_slots(self, slots) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        n_slots = self._rows.shape[2]
        if slots.ndim != 1 or (slots.size and (slots.min() < 0 or slots.max() >= n_slots)):
            raise ValueError(f"KVPool: slots must be a 1-D int array in [0, {n_slots}), "
                             f"got shape {slots.shape}")
        return slots
