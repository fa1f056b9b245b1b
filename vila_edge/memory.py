"""One memory ledger: everything an engine holds resident, and the KV pool it can afford.

    vila-edge plan ENGINE --device orin-nano [--max-context 4096]

Rows, all counted once at load time (nothing grows later):
  weights      every file the engine loads, external tensor data (llm.onnx.data) included;
  runner       the backend's own buffers besides the pool (staging for scattered block tables);
  activations  one prefill chunk's peak intermediates (estimate: the largest tensors it keeps live);
  vision       one tile batch of pixels and features, plus the feature cache;
  kv pool      whole blocks: on a device preset, what DRAM - reserve - the rows above leaves;
               with a byte budget, that many bytes; by default DEFAULT_CONTEXTS full contexts.
"""
import os
from dataclasses import dataclass

import numpy as np

from vila_edge.kv_budget import GiB, MiB, KVBudgetError, Target, kv_budget_bytes, parse_budget
from vila_edge.llm import DEFAULT_CONTEXTS, PREFILL_CHUNK
from vila_edge.runner import Buffer, RunnerOptions, backend
from vila_edge.vision import CACHE_TILES, TILE_BATCH

# Manifest roles the runtime never reads while serving (so they hold no memory).
NOT_LOADED = ("report",)


def weight_files(engine_dir: str, manifest) -> dict:
    """{file: bytes} of every file the runtime loads: the manifest's, and each graph's external data."""
    out = {}
    for role, name in manifest.files.items():
        if role in NOT_LOADED:
            continue
        path = os.path.join(engine_dir, name)
        out[name] = os.path.getsize(path)
        if name.endswith(".onnx") and os.path.isfile(path + ".data"):
            out[name + ".data"] = os.path.getsize(path + ".data")
    return out


def activation_bytes(manifest, max_context: int) -> int:
    """Peak intermediates of one prefill chunk of T positions over a full context (an estimate of the
    largest live tensors: hidden states, q/k/v, the fused gate/up output, fp32 scores and probs)."""
    i, item = manifest.llm, np.dtype(manifest.dtype).itemsize
    t = min(PREFILL_CHUNK, max_context)
    inter = i.intermediate or 4 * i.hidden
    hidden = 4 * t * i.hidden * item
    qkv = t * (i.heads + 2 * i.kv_heads) * i.head_dim * item
    mlp = 3 * t * inter * item
    scores = 2 * i.heads * t * (max_context + t) * 4
    return hidden + qkv + max(mlp, scores) + i.logits_size * 4


def vision_bytes(manifest) -> int:
    v, item = manifest.vision, np.dtype(manifest.dtype).itemsize
    pixels = TILE_BATCH * 3 * v.image_size ** 2 * 4
    features = v.tokens_per_image * manifest.llm.hidden * item
    return pixels + TILE_BATCH * features + CACHE_TILES * features


@dataclass(frozen=True)
class MemoryPlan:
    device: "Target | None"
    weights: dict          # file -> bytes
    rows: list             # [Buffer]: runner buffers (pool excluded), activations, vision
    block_bytes: int
    num_blocks: int
    block_size: int
    max_context: int

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def pool_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + sum(b.nbytes for b in self.rows) + self.pool_bytes

    def table(self) -> str:
        mib = lambda n: f"{n / MiB:10.1f} MiB"
        lines = [f"  {'weights':<28}{mib(self.weights_bytes)}"]
        lines += [f"    {name:<26}{mib(n)}" for name, n in sorted(self.weights.items())]
        lines += [f"  {b.name:<28}{mib(b.nbytes)}" for b in self.rows]
        lines.append(f"  {'kv pool':<28}{mib(self.pool_bytes)}   {self.num_blocks} blocks x {self.block_size} "
                     f"tokens = {self.num_blocks * self.block_size} tokens "
                     f"({self.num_blocks * self.block_size / self.max_context:.1f} contexts of {self.max_context})")
        lines.append(f"  {'total':<28}{mib(self.total_bytes)}")
        if self.device is not None:
            d = self.device
            lines += [f"  {'reserve (OS, CUDA, runtime)':<28}{mib(d.reserve_bytes)}",
                      f"  {d.name + ' DRAM':<28}{mib(d.dram_bytes)}",
                      f"  {'unplanned':<28}{mib(d.dram_bytes - d.reserve_bytes - self.total_bytes)}"
                      f"   (< one block of {self.block_bytes / MiB:.2f} MiB)"]
        return "\n".join(lines)


def plan(engine_dir: str, manifest, budget, block_size: int, max_context: int,
         opts: RunnerOptions | None = None) -> MemoryPlan:
    """The ledger of an engine at these sizes; `budget`: KVConfig.budget (None, bytes, a preset name or a
    Target). Raises KVBudgetError when a device cannot hold one full context."""
    opts = opts or RunnerOptions()
    runner = backend(manifest, opts.device)
    weights = weight_files(engine_dir, manifest)
    fixed = [b for b in runner.llm_buffers(manifest, 0, block_size, max_context, opts) if b.name != "kv pool"]
    rows = fixed + [Buffer("activations (prefill chunk)", activation_bytes(manifest, max_context)),
                    Buffer("vision buffers", vision_bytes(manifest))]
    block_bytes = runner.llm_buffers(manifest, 1, block_size, max_context, opts)[0].nbytes
    need = -(-max_context // block_size)
    device = parse_budget(budget) if isinstance(budget, str) else budget
    if device is None:
        n = DEFAULT_CONTEXTS * need
    elif isinstance(device, Target):
        free = device.dram_bytes - device.reserve_bytes - sum(weights.values()) - sum(b.nbytes for b in rows)
        n = max(0, free) // block_bytes
    else:
        n = kv_budget_bytes(device, 0) // block_bytes
    result = MemoryPlan(device if isinstance(device, Target) else None, weights, rows, block_bytes, n,
                        block_size, max_context)
    if n < need:
        where = (f"{device.name}'s {device.dram_bytes / GiB:.2f} GiB DRAM after the reserve and the rows above"
                 if isinstance(device, Target) else f"a budget of {n * block_bytes / GiB:.2f} GiB")
        raise KVBudgetError(f"{where} buys {n} KV blocks of {block_size} tokens, but one {max_context}-token "
                            f"context needs {need}; raise the budget, use a larger target or int4 engine, "
                            f"or lower the max context\n{result.table()}")
    return result
