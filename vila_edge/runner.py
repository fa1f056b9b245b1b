"""The model-runner seam: the one place a backend owns device memory (nano-vllm's model_runner.py).

A backend is one file with an `LLMRunner` and a `VisionRunner` and one entry in `RUNNERS`, keyed by
the engine's target (manifest.build["target"]). A runner owns its sessions, the KV pool, the
embedding table and its I/O and staging buffers; everything above it (LLMEngine's chunking and
rollback, BlockManager, Sampler, Splicer) speaks token ids, feature spans, block tables and slots.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from vila_edge.errors import EngineError
from vila_edge.kv_cache import KVLayout

IMAGE_POSITION = -1   # id at positions whose input is a feature row (splice.py stores it)


@dataclass(frozen=True)
class Tokens:
    """Positions to run: text ids, and feature rows for the positions that are not text.

    ids      int64 [T]; IMAGE_POSITION where a span's feature rows go
    spans    ((offset, rows [n, C]), ...): rows for ids[offset : offset + n], in order
    """
    ids: np.ndarray
    spans: tuple = field(default_factory=tuple)

    @staticmethod
    def from_embeds(embeds: np.ndarray) -> "Tokens":
        """Every position given as an input row (tests and benchmarks feed embeddings directly)."""
        return Tokens(np.full(len(embeds), IMAGE_POSITION, np.int64), ((0, embeds),))

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, lo: int, hi: int) -> "Tokens":
        """Positions lo..hi-1, with the parts of the spans that fall inside."""
        spans = tuple((max(o, lo) - lo, rows[max(o, lo) - o: min(o + len(rows), hi) - o])
                      for o, rows in self.spans if o < hi and o + len(rows) > lo)
        return Tokens(self.ids[lo:hi], spans)


@dataclass(frozen=True)
class Step:
    """One sequence's part of a batched forward pass: its new positions start..start+len(tokens)-1,
    the KV rows they write (`slots`) and the sequence's block table (its past)."""
    tokens: Tokens
    start: int
    table: list
    slots: np.ndarray


@dataclass(frozen=True)
class Buffer:
    """A runner allocation the memory ledger counts (vila_edge/memory.py)."""
    name: str
    nbytes: int


class LLMRunner(ABC):
    """Runs the LLM over positions whose KV lives in this runner's pool."""
    layout: KVLayout
    num_blocks: int
    vocab_rows: int         # rows of the embedding table: text ids must be below this

    @abstractmethod
    def forward(self, tokens: Tokens, start: int, table: list, slots: np.ndarray) -> np.ndarray:
        """Positions start..start+T-1 (their KV rows at `slots`, past in `table`'s blocks);
        returns the last position's logits [V'] float32."""

    def decode(self, token: int, start: int, table: list, slot: int) -> np.ndarray:
        """forward of one text id at position `start`, its KV row at `slot` (a decode step, from
        BlockManager.append_token). A runner with a faster path for it overrides this."""
        return self.forward(Tokens(np.array([token], np.int64)), start, table, np.array([slot], np.int64))

    # Sequences one forward_batch call runs in one pass of the graph (1: a loop over forward).
    max_batch: int = 1

    def forward_batch(self, steps: list) -> np.ndarray:
        """[Step] of different sequences -> each one's last-position logits [B, V'] float32, rows in
        the order of `steps`. This default runs them one after another; a runner whose graph takes
        several sequences at once overrides it (and `max_batch`)."""
        return np.stack([self.forward(s.tokens, s.start, s.table, s.slots) for s in steps])

    @abstractmethod
    def copy_block(self, src: int, dst: int) -> None:
        """Copy every layer's K and V of pool block src into block dst (BlockManager.fork)."""

    @abstractmethod
    def buffers(self) -> list:
        """[Buffer]: everything this runner allocated besides the weights, pool included."""


class VisionRunner(ABC):
    @abstractmethod
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """pixel tiles [n, 3, R, R] float32 -> features [n, tokens, C] in the engine dtype (for
        multi-scale engines: the tower's features, projected later by `project`)."""

    def project(self, features: np.ndarray) -> np.ndarray:
        """Multi-scale engines only: merged tower tokens [n, T, C'] -> projected features [n, T', C]."""
        raise EngineError("this engine's vision graph projects its own features: it has no projector graph")


@dataclass(frozen=True)
class RunnerOptions:
    threads: int | None = None
    # ORT MatMulNBits activations: 4 = int8 per block, 0 = float; None: the engine's (4 for standard
    # graphs, whose DequantizeLinear -> MatMul ORT fuses at load; fused graphs fix it at export).
    int4_accuracy_level: int | None = None
    staging_contexts: int = 1        # full-context staging buffers for scattered block tables
    device: str = "cpu"              # vila_edge/devices.py: cpu, cpu-iobinding, cuda, tensorrt


def _ort():
    from vila_edge import ort_runner
    return ort_runner


# target -> module factory with llm(engine_dir, manifest, num_blocks, block_size, max_context, opts),
# vision(engine_dir, manifest, opts), llm_buffers(manifest, num_blocks, block_size, max_context, opts)
# and image(engine_dir, manifest, opts) (VILA-U's generation graphs, vila_edge/ort_image_runner.py).
RUNNERS = {"cpu": _ort, "orin": _ort}


def _ort_device():
    from vila_edge import ort_device_runner
    return ort_device_runner


# device (other than "cpu") -> module factory, the same functions as RUNNERS' (vila_edge/devices.py).
DEVICE_RUNNERS = {"cpu-iobinding": _ort_device, "cuda": _ort_device, "tensorrt": _ort_device}


def backend(manifest, device: str = "cpu"):
    """The runner module for an engine's target on `device` ("cpu": by the engine's target)."""
    if device != "cpu":
        from vila_edge.devices import check_name
        return DEVICE_RUNNERS[check_name(device)]()
    target = manifest.build.get("target", "cpu")
    if target not in RUNNERS:
        raise EngineError(f"engine target {target!r} has no runner in this build of vila_edge "
                          f"(available: {', '.join(sorted(RUNNERS))})")
    return RUNNERS[target]()
