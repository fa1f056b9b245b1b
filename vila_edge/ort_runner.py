"""ONNX Runtime runners (CPU here; any ORT execution provider elsewhere): the engine's graphs, the
numpy KV pool, the embedding table and the staging buffers, all allocated once.

Each LLM forward pass takes the input rows of the positions not yet in the pool, how many positions
are already there (`past_len`) and, per layer, the past K/V rows: the pool blocks of the sequence's
block table, passed as zero-copy views of the pool when those blocks are consecutive (a sequence
allocated in one piece, the common case: BlockManager places them so) and gathered into a staging
buffer otherwise. The graph returns the new rows, written at the slots the BlockManager reserved.
Both graph variants (vila_edge_export/onnx_llm.py standard ops, vila_edge_export/onnx_llm_fused.py contrib ops) share
this I/O contract (docs/contracts.md).
"""
import contextlib
import os
import queue
import threading

import numpy as np

from vila_edge import engine_check, ops
from vila_edge.backend import OrtSession
from vila_edge.embeddings import EmbeddingTable
from vila_edge.errors import EngineError
from vila_edge.kv_cache import KVLayout, KVPool
from vila_edge.manifest import REBUILD
from vila_edge.runner import IMAGE_POSITION, Buffer, LLMRunner, RunnerOptions, Tokens, VisionRunner


def kv_layout(manifest, block_size: int) -> KVLayout:
    i = manifest.llm
    return KVLayout(i.layers, i.kv_heads, i.head_dim, block_size, manifest.kv_dtype)


def llm_buffers(manifest, num_blocks: int, block_size: int, max_context: int, opts: RunnerOptions) -> list:
    """[Buffer] the LLM runner allocates for these sizes, computed without allocating (the ledger)."""
    if _paged(manifest):
        from vila_edge.ort_paged_runner import paged_llm_buffers
        return paged_llm_buffers(manifest, num_blocks, block_size, max_context, opts)
    layout = kv_layout(manifest, block_size)
    max_blocks = -(-max_context // block_size)
    return [Buffer("kv pool", layout.bytes_per_block * num_blocks),
            Buffer("kv staging", opts.staging_contexts * layout.bytes_per_block * max_blocks)]


def _accuracy_level(engine_dir: str, manifest, opts: RunnerOptions) -> int:
    """The MatMulNBits accuracy level to run at: a fused graph's is fixed in its file."""
    fixed = manifest.quant.get("accuracy_level")
    if fixed is None:
        return 4 if opts.int4_accuracy_level is None else opts.int4_accuracy_level
    if opts.int4_accuracy_level not in (None, fixed):
        raise EngineError(f"{engine_dir}: its fused LLM graph runs int4 at accuracy level {fixed} (set at export); "
                          f"re-export with --int4-accuracy-level {opts.int4_accuracy_level}, or use a --target orin "
                          f"engine, whose level is chosen at load")
    return fixed


class OrtLLMRunner(LLMRunner):
    def __init__(self, engine_dir: str, manifest, num_blocks: int, block_size: int, max_context: int,
                 opts: RunnerOptions, session: OrtSession | None = None):
        m = manifest
        self.session = session or OrtSession(os.path.join(engine_dir, m.files["llm"]), opts.threads,
                                             int4_accuracy_level=_accuracy_level(engine_dir, m, opts))
        if session is None:
            engine_check.check_llm(self.session.session, m, os.path.join(engine_dir, m.files["llm"]),
                                   REBUILD.format(out=engine_dir))
        self._tables(engine_dir, m, opts, num_blocks, block_size, max_context)
        self.pool = KVPool(self.layout, num_blocks)
        self._names = [(f"past_k_{l}", f"past_v_{l}") for l in range(m.llm.layers)]
        self._outputs = [(f"k_new_{l}", f"v_new_{l}") for l in range(m.llm.layers)]
        self._max_blocks = -(-max_context // block_size)
        self._hidden = threading.local()
        # VILA-U graphs take `logits_rows` (1: logits, 0: hidden state only; hidden_only())
        self._head_switch = "logits_rows" in {i.name for i in self.session.session.get_inputs()}
        # Scattered tables are gathered into one of these (allocated once, counted by the ledger);
        # a run that finds none free waits for one.
        self._staging = queue.Queue()
        for _ in range(opts.staging_contexts):
            L, _, _, BS, H, D = self.pool.data.shape
            stage = np.empty((L, 2, self._max_blocks, BS, H, D), self.pool.data.dtype)
            stage.fill(0)          # touch every page now, as the pool does
            self._staging.put(stage)

    @property
    def last_hidden(self):
        """The final-norm hidden state of this thread's last forward ([hidden]) or forward_batch
        ([B, hidden]); None: the graph has no hidden output."""
        return getattr(self._hidden, "value", None)

    def forward_batch(self, steps: list) -> np.ndarray:
        """The seam's loop over forward, plus last_hidden stacked [B, hidden] (VILA-U's rows)."""
        logits, hidden = [], []
        for s in steps:
            logits.append(self.forward(s.tokens, s.start, s.table, s.slots))
            hidden.append(self.last_hidden)
        self._hidden.value = None if hidden[0] is None else np.stack(hidden)
        return np.stack(logits)

    @contextlib.contextmanager
    def hidden_only(self):
        """VILA-U image steps on this thread: the graph skips its lm_head (its `logits_rows` input, 0)
        and forward returns empty logits [0]; graphs without that input run as usual."""
        self._hidden.skip_head = self._head_switch
        try:
            yield self
        finally:
            self._hidden.skip_head = False

    def share(self, num_blocks: int, block_size: int, max_context: int) -> "OrtLLMRunner":
        """Another runner of this class with its own pool over this one's session (weights loaded once)."""
        return type(self)(self.engine_dir, self.manifest, num_blocks, block_size, max_context, self.opts,
                            self.session)

    def buffers(self) -> list:
        return llm_buffers(self.manifest, self.num_blocks, self.layout.block_size, self.max_context, self.opts)

    def copy_block(self, src: int, dst: int) -> None:
        self.pool.copy_block(src, dst)

    def _tables(self, engine_dir: str, m, opts: RunnerOptions, num_blocks: int, block_size: int, max_context: int):
        """What every ORT LLM runner (this one, the paged and the device runner) keeps beside its
        session: the engine's identity, the embedding table it gathers from, the KV layout."""
        self.engine_dir, self.manifest, self.opts, self.max_context = engine_dir, m, opts, max_context
        self.embeds_dtype = self.session.input_dtype("inputs_embeds")
        self.embeddings = EmbeddingTable.load(engine_dir, m)
        self.vocab_rows = self.embeddings.rows
        self.layout = kv_layout(m, block_size)
        self.num_blocks = num_blocks

    def embed(self, tokens: Tokens) -> np.ndarray:
        """[T, C] graph inputs: table rows for text ids, span rows at their offsets."""
        ids, spans = tokens.ids, tokens.spans
        if len(spans) == 1 and spans[0][0] == 0 and len(spans[0][1]) == len(ids):
            return np.asarray(spans[0][1]).astype(self.embeds_dtype, copy=False)
        text = ids != IMAGE_POSITION if spans else None                 # None: every position is text
        checked = ids if text is None else ids[text]
        if len(checked) and (checked.min() < 0 or checked.max() >= self.vocab_rows):
            bad = checked[(checked < 0) | (checked >= self.vocab_rows)]
            raise EngineError(f"{self.engine_dir}: its tokenizer produced ids {sorted(set(bad.tolist()))[:5]} "
                              f"outside the {self.vocab_rows}-row embedding table: tokenizer.json and the "
                              f"embedding table do not belong together; " + REBUILD.format(out=self.engine_dir))
        if text is None:                                                 # decode steps: one gather
            return self.embeddings.rows_of(ids).astype(self.embeds_dtype, copy=False)
        out = np.empty((len(ids), self.embeddings.width), self.embeds_dtype)
        if len(checked):
            out[text] = self.embeddings.rows_of(checked)
        for offset, rows in spans:
            if rows.ndim != 2 or rows.shape[1] != out.shape[1]:     # every row written once, none left empty
                raise EngineError(f"{self.engine_dir}: vision features of shape {list(rows.shape)} cannot fill "
                                  f"[n, {out.shape[1]}] LLM input rows; " + REBUILD.format(out=self.engine_dir))
            out[offset: offset + len(rows)] = rows
        return out

    def forward(self, tokens: Tokens, start: int, table: list, slots: np.ndarray) -> np.ndarray:
        embeds = self.embed(tokens)
        n = max(1, -(-start // self.layout.block_size))   # the graph's past is never empty: >= 1 block
        first = table[0]
        stage = None
        if table[n - 1] - first == n - 1 and list(table[:n]) == list(range(first, first + n)):
            blocks = self.pool.data[:, :, first: first + n]        # a view: no copy
        else:
            stage = self._staging.get()
            blocks, ids = stage[:, :, :n], np.asarray(table[:n])
            for layer, kv in np.ndindex(blocks.shape[:2]):       # contiguous out: no buffering in take
                np.take(self.pool.data[layer, kv], ids, axis=0, out=blocks[layer, kv], mode="clip")
        try:
            L, _, _, BS, H, D = blocks.shape
            rows = blocks.reshape(L, 2, n * BS, H, D)                # merges contiguous axes: still a view
            return self._run(embeds, start, rows, np.asarray(slots, np.int64))
        finally:
            if stage is not None:
                self._staging.put(stage)

    def _run(self, embeds: np.ndarray, start: int, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """One session run on plain feeds (an IOBinding that bound k_new/v_new straight into the pool
        measured slower: its per-input bind calls cost more than the scatter they save), then the
        new rows go to their slots."""
        feeds = {name: rows[l, kv] for l, pair in enumerate(self._names) for kv, name in enumerate(pair)}
        t = len(embeds)
        feeds.update(inputs_embeds=embeds[None], position_ids=np.arange(start, start + t, dtype=np.int64)[None],
                     past_len=np.array(start, np.int64))
        if self._head_switch:
            feeds["logits_rows"] = np.array([0 if getattr(self._hidden, "skip_head", False) else 1], np.int64)
        out = self.session.run(feeds)
        # VILA-U graphs also return the last position's final-norm hidden state (vila_edge/imagine.py);
        # per thread, as the server runs requests on several threads over one runner.
        self._hidden.value = out["hidden"][0] if "hidden" in out else None
        self.pool.write([out[k] for k, _ in self._outputs], [out[v] for _, v in self._outputs], slots)
        return out["logits"].reshape(-1)


class OrtVisionRunner(VisionRunner):
    def __init__(self, engine_dir: str, manifest, opts: RunnerOptions, providers=("CPUExecutionProvider",)):
        # The op library where built: a vision.onnx swapped with llm.onnx then fails engine_check's
        # clear I/O check rather than ORT's "not a registered op".
        self.session = OrtSession(os.path.join(engine_dir, manifest.files["vision"]), opts.threads, providers,
                                  ops_library=ops.built())
        self.dtype = np.dtype(manifest.dtype)
        # Multi-scale engines: vision.onnx is the tower alone, projector.onnx projects merged maps.
        self.projector = None
        self._out = "image_features"
        if "projector" in manifest.files:
            self.projector = OrtSession(os.path.join(engine_dir, manifest.files["projector"]), opts.threads,
                                        providers)
            self._out = "tower_features"
        else:
            engine_check.check_vision(self.session.session, manifest, os.path.join(engine_dir, manifest.files["vision"]),
                                      REBUILD.format(out=engine_dir))

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run({"pixel_values": pixels.astype(self.dtype)})[self._out]

    def project(self, features: np.ndarray) -> np.ndarray:
        if self.projector is None:
            return super().project(features)
        return self.projector.run({"tower_features": features.astype(self.dtype, copy=False)})["image_features"]


def _paged(manifest) -> bool:
    """The fused graph (target cpu) is the paged, batched one (vila_edge/ort_paged_runner.py)."""
    return manifest.build.get("graph") == "fused"


def llm(engine_dir: str, manifest, num_blocks: int, block_size: int, max_context: int, opts: RunnerOptions):
    if _paged(manifest):
        from vila_edge import ort_paged_runner
        return ort_paged_runner.llm(engine_dir, manifest, num_blocks, block_size, max_context, opts)
    return OrtLLMRunner(engine_dir, manifest, num_blocks, block_size, max_context, opts)


def vision(engine_dir: str, manifest, opts: RunnerOptions):
    return OrtVisionRunner(engine_dir, manifest, opts)


def image(engine_dir: str, manifest, opts: RunnerOptions):
    """VILA-U's generation graphs (engines whose manifest lists "generate_image")."""
    from vila_edge.ort_image_runner import image as open_image
    return open_image(engine_dir, manifest, opts)
