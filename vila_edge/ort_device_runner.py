"""The device runner: ONNX Runtime with IOBinding over a KV pool and I/O buffers in device memory.

Devices (vila_edge/devices.py): `cuda` and `tensorrt` on a GPU; `cpu-iobinding`, the same code on
ORT's CPU provider, which is how CI checks it against the numpy runner (vila_edge/ort_runner.py).
Every device takes `--target orin` engines only (the standard-op LLM graph, TensorRT's form; contract
in docs/contracts.md): a target cpu engine's fused graph (vila_edge::PagedAttention) raises EngineError.

Per forward pass the host sends the new positions' input rows (a decode step: one row) and gets back
the last position's logits row; the KV never leaves the device:
- past K/V: the graph's past_k_l / past_v_l inputs are bound to the pool rows of the sequence's first
  blocks when the block table is consecutive (BlockManager places sequences so), else the blocks are
  gathered into a device staging buffer, one 2-D copy per run of consecutive blocks;
- new K/V: the k_new_l / v_new_l outputs are bound to the pool rows at the sequence's slots when
  they are consecutive, else to a scratch buffer scattered into the pool after the run. A bound
  output may share rows with the past input beyond past_len: those rows are masked (additive finite
  mask, vila_edge_export/onnx_llm.py), so what the graph reads there never reaches the result.
- image rows: a span given as a DeviceImage (vila_edge/device_splice.py) is projected by the projector
  + splice kernel straight into the bound inputs_embeds buffer (GpuProjector on cuda, its numpy twin
  on cpu-iobinding).
Pool layout as docs/contracts.md: [L, 2, NB, BS, Hkv, D]; the (layer, K|V) slabs are `pitch` bytes apart.
All passes hold one lock: the I/O buffers and the stream are shared (forward_batch loops forward).
"""
import os
import threading

import numpy as np

from vila_edge import engine_check
from vila_edge.backend import OrtSession
from vila_edge.device_memory import Region
from vila_edge.device_splice import DeviceImage
from vila_edge.devices import check_active, check_graph, providers, require
from vila_edge.errors import EngineError
from vila_edge.llm import PREFILL_CHUNK
from vila_edge.manifest import REBUILD
from vila_edge.ort_runner import OrtLLMRunner, OrtVisionRunner, _accuracy_level, kv_layout
from vila_edge.runner import Buffer, LLMRunner, RunnerOptions, Tokens

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def runs(ids) -> list:
    """[(index, first id, count)]: maximal runs of consecutive ids, e.g. [4, 5, 9] -> [(0, 4, 2), (2, 9, 1)]."""
    out = []
    for k, i in enumerate(int(x) for x in ids):
        if out and i == out[-1][1] + out[-1][2]:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((k, i, 1))
    return out


def memory_for(device: str):
    from vila_edge.device_memory import CudaMemory, HostMemory
    return HostMemory() if device == "cpu-iobinding" else CudaMemory(0)


def llm_buffers(manifest, num_blocks: int, block_size: int, max_context: int, opts: RunnerOptions) -> list:
    """[Buffer] the device runner allocates, computed without allocating (the memory ledger)."""
    layout = kv_layout(manifest, block_size)
    max_blocks = -(-max_context // block_size)
    row = layout.bytes_per_block // block_size          # one position's K and V over every layer
    embeds = PREFILL_CHUNK * manifest.llm.hidden * np.dtype(manifest.dtype).itemsize
    return [Buffer("kv pool", layout.bytes_per_block * num_blocks),
            Buffer("kv staging", layout.bytes_per_block * max_blocks),
            Buffer("new kv rows", row * PREFILL_CHUNK), Buffer("input embeddings", embeds)]


class DeviceLLMRunner(LLMRunner):
    _tables = OrtLLMRunner._tables
    embed = OrtLLMRunner.embed        # the same host-side gather of text rows and feature spans

    def __init__(self, engine_dir: str, manifest, num_blocks: int, block_size: int, max_context: int,
                 opts: RunnerOptions):
        m, device = manifest, opts.device
        require(device)
        check_graph(device, engine_dir, m)
        path = os.path.join(engine_dir, m.files["llm"])
        self.memory = memory_for(device)
        profile = None
        if device == "tensorrt":
            from vila_edge.trt_profile import check_context, engine_profile
            p = engine_profile(engine_dir, m)
            check_context(engine_dir, p, max_context, block_size)
            profile = p["llm"]
        stream = getattr(getattr(self.memory, "stream", None), "handle", None)
        self.session = OrtSession(path, opts.threads, providers(device, engine_dir, m, profile, stream),
                                  int4_accuracy_level=_accuracy_level(engine_dir, m, opts))
        check_active(self.session.session, device, path)
        engine_check.check_llm(self.session.session, m, path, REBUILD.format(out=engine_dir))
        self._tables(engine_dir, m, opts, num_blocks, block_size, max_context)
        L, H, D = m.llm.layers, m.llm.kv_heads, m.llm.head_dim
        self._kv = np.dtype(m.kv_dtype)
        self._row = H * D * self._kv.itemsize                     # bytes of one position of one (layer, K|V)
        self._block = block_size * self._row
        self._slabs = 2 * L
        self._max_blocks = -(-max_context // block_size)
        mem = self.memory
        self.pool = mem.alloc((L, 2, num_blocks, block_size, H, D), self._kv)
        self._staging = mem.alloc((L, 2, self._max_blocks, block_size, H, D), self._kv)
        self._new = mem.alloc((L, 2, PREFILL_CHUNK, H, D), self._kv)
        self.embeds_buffer = mem.alloc((PREFILL_CHUNK, m.llm.hidden), self.embeds_dtype)
        outs = {o.name: o for o in self.session.session.get_outputs()}
        self._logits = np.zeros((1, m.llm.logits_size), ORT_DTYPES[outs["logits"].type])
        self._hidden_out = np.zeros((1, m.llm.hidden), np.float32) if "hidden" in outs else None
        self._thread = threading.local()
        self._image_rows = None            # scratch for device images a prefill chunk cuts (_project)
        self._lock = threading.Lock()      # one set of I/O buffers and one stream: one pass at a time

    @property
    def last_hidden(self):
        return getattr(self._thread, "value", None)

    def buffers(self) -> list:
        return llm_buffers(self.manifest, self.num_blocks, self.layout.block_size, self.max_context, self.opts)

    def copy_block(self, src: int, dst: int) -> None:
        pitch = self.num_blocks * self._block
        with self._lock:
            self.memory.make_current()
            self.memory.copy2d(self.pool.ptr + dst * self._block, pitch, self.pool.ptr + src * self._block, pitch,
                               self._block, self._slabs)

    def _past(self, blocks: list) -> tuple:
        """(address, slab pitch) of the past rows: the pool itself when the blocks are consecutive."""
        pool_pitch = self.num_blocks * self._block
        if len(runs(blocks)) == 1:
            return self.pool.ptr + blocks[0] * self._block, pool_pitch
        stage_pitch = self._max_blocks * self._block
        for k, first, count in runs(blocks):
            self.memory.copy2d(self._staging.ptr + k * self._block, stage_pitch, self.pool.ptr + first * self._block,
                               pool_pitch, count * self._block, self._slabs)
        return self._staging.ptr, stage_pitch

    def _new_rows(self, slots: np.ndarray) -> tuple:
        """(address, slab pitch, scatter) for the new rows: straight into the pool when the slots are
        consecutive (scatter None), else into scratch that `scatter` runs are copied from."""
        pool_pitch = self.num_blocks * self._block
        parts = runs(slots)
        if len(parts) == 1:
            return self.pool.ptr + int(slots[0]) * self._row, pool_pitch, None
        return self._new.ptr, PREFILL_CHUNK * self._row, parts

    def forward(self, tokens: Tokens, start: int, table: list, slots: np.ndarray) -> np.ndarray:
        T, bs = len(tokens), self.layout.block_size
        if not 1 <= T <= PREFILL_CHUNK or len(slots) != T:
            raise EngineError(f"device runner: {T} positions with {len(slots)} slots; a pass takes 1..{PREFILL_CHUNK}")
        # Spans of device images are projected on the device after the upload (zeros hold their place).
        on_device = [(o, r) for o, r in tokens.spans if isinstance(r, DeviceImage)]
        if on_device:
            tokens = Tokens(tokens.ids, tuple((o, np.zeros((len(r), self.embeddings.width), self.embeds_dtype))
                                              if isinstance(r, DeviceImage) else (o, r) for o, r in tokens.spans))
        embeds = self.embed(tokens)
        n = max(1, -(-start // bs))          # the graph's past is never empty: >= 1 block
        with self._lock:
            self.memory.make_current()
            self.memory.upload(self.embeds_buffer.ptr, embeds)
            for offset, image in on_device:
                self._project(image, offset)
            past, past_pitch = self._past(list(table[:n]))
            new, new_pitch, scatter = self._new_rows(np.asarray(slots))
            io = self._bind(T, start, n * bs, past, past_pitch, new, new_pitch)
            self.session.run_with_iobinding(io, f" on device {self.opts.device!r}")
            io.synchronize_outputs()         # the host-bound logits row is complete before it is read
            if scatter is not None:
                pool_pitch = self.num_blocks * self._block
                for k, slot, count in scatter:
                    self.memory.copy2d(self.pool.ptr + slot * self._row, pool_pitch, self._new.ptr + k * self._row,
                                       new_pitch, count * self._row, self._slabs)
            self._thread.value = None if self._hidden_out is None else self._hidden_out[0].copy()
            return self._logits[0].astype(np.float32)

    def _project(self, image: DeviceImage, offset: int) -> None:
        """The projector kernel writes image rows at `offset` of the bound inputs_embeds buffer; a cut
        image goes whole into scratch first and the chunk's rows are copied from there."""
        if self.embeds_dtype != np.float16:
            raise EngineError(f"{self.engine_dir}: the projector kernel writes fp16 rows; this engine's LLM takes "
                              f"{np.dtype(self.embeds_dtype).name} (export with --dtype fp16)")
        H = self.embeddings.width
        stream = getattr(self.memory, "stream", None)
        emb = Region(self.embeds_buffer.ptr, (PREFILL_CHUNK, H), np.dtype(np.float16), None)
        if image.whole:
            image.projector(image.x, emb, np.array([offset], np.int32), stream)
            return
        T = image.projector.tokens_per_image
        if self._image_rows is None or self._image_rows.shape[0] < T:
            self._image_rows = self.memory.alloc((T, H), np.float16)      # once per image size, not per step
        scratch = Region(self._image_rows.ptr, (T, H), np.dtype(np.float16), None)
        image.projector(image.x, scratch, np.array([0], np.int32), stream)
        row, width = H * 2, len(image) * H * 2
        self.memory.copy2d(emb.ptr + offset * row, width, scratch.ptr + image.lo * row, width, width, 1)

    def _bind(self, T: int, start: int, P: int, past: int, past_pitch: int, new: int, new_pitch: int):
        mem, dev, kv = self.memory, self.memory.device_type, self._kv
        io = self.session.session.io_binding()
        io.bind_input("inputs_embeds", dev, mem.device_id, self.embeds_dtype, [1, T, self.manifest.llm.hidden],
                      self.embeds_buffer.ptr)
        io.bind_cpu_input("position_ids", np.arange(start, start + T, dtype=np.int64)[None])
        io.bind_cpu_input("past_len", np.array(start, np.int64))
        H, D = self.manifest.llm.kv_heads, self.manifest.llm.head_dim
        for layer in range(self.manifest.llm.layers):
            for j, name in enumerate("kv"):
                slab = 2 * layer + j
                io.bind_input(f"past_{name}_{layer}", dev, mem.device_id, kv, [P, H, D], past + slab * past_pitch)
                io.bind_output(f"{name}_new_{layer}", dev, mem.device_id, kv, [T, H, D], new + slab * new_pitch)
        # The one host-bound output: the sampled position's logits row (and VILA-U's hidden state).
        io.bind_output("logits", "cpu", 0, self._logits.dtype, list(self._logits.shape), self._logits.ctypes.data)
        if self._hidden_out is not None:
            io.bind_output("hidden", "cpu", 0, np.float32, list(self._hidden_out.shape), self._hidden_out.ctypes.data)
        return io


class DeviceVisionRunner(OrtVisionRunner):
    """The engine's vision graphs on the device's provider; features come back to the host once per
    image (the LLM runner uploads them with the prompt's rows)."""

    def __init__(self, engine_dir: str, manifest, opts: RunnerOptions):
        require(opts.device)
        check_graph(opts.device, engine_dir, manifest)       # the LLM would refuse it: say so before loading
        profile = None
        if opts.device == "tensorrt":
            from vila_edge.trt_profile import engine_profile
            if "projector" in manifest.files:      # its profile would need the tower's width: not in the manifest
                raise EngineError(f"{engine_dir}: multi-scale engines ({manifest.vision.multiscale}) do not run on "
                                  f"device 'tensorrt' yet; use device 'cuda'")
            profile = engine_profile(engine_dir, manifest)["vision"]
        super().__init__(engine_dir, manifest, opts, providers(opts.device, engine_dir, manifest, profile))
        check_active(self.session.session, opts.device, os.path.join(engine_dir, manifest.files["vision"]))


def llm(engine_dir: str, manifest, num_blocks: int, block_size: int, max_context: int, opts: RunnerOptions):
    return DeviceLLMRunner(engine_dir, manifest, num_blocks, block_size, max_context, opts)


def vision(engine_dir: str, manifest, opts: RunnerOptions):
    return DeviceVisionRunner(engine_dir, manifest, opts)


def image(engine_dir: str, manifest, opts: RunnerOptions):
    raise EngineError(f"{engine_dir}: VILA-U image generation runs on device 'cpu' only in this version "
                      f"(asked for {opts.device!r})")
