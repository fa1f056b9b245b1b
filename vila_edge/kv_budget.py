"""How many KV blocks a device can afford: an explicit byte budget, or a Jetson target's DRAM.

Orin's GPU shares DRAM with the CPU, so "take all free memory" is never right: the pool is sized
once, from DRAM - engine weights - a named reserve for everything else that must stay resident.
"""
import operator
import re
from dataclasses import dataclass

from vila_edge.errors import KVBudgetError
from vila_edge.kv_cache import KVLayout

KiB, MiB, GiB = 2**10, 2**20, 2**30


@dataclass(frozen=True)
class Target:
    name: str
    dram_bytes: int      # physical LPDDR5 on the module (datasheets: 8/16/32/64 GB = GiB parts)
    reserve_bytes: int   # OS + firmware carve-outs + CUDA/runtime + activations: not for KV


# Reserves are ESTIMATES for a headless JetPack 6 image running only this runtime; measure your
# board (tegrastats / free -b with the engine loaded) and pass an explicit byte budget when they
# differ. They hold what the engine does not decide; the engine's own buffers (activations of a
# prefill chunk, vision buffers, staging) are counted from the engine by vila_edge/memory.py.
# Each splits as (GiB):
#   carve-outs + kernel: firmware/bootloader carve-outs and kernel reservations, which is why
#                        Linux's MemTotal is below the module's DRAM (not measured here);
#   OS:                  desktop-less Ubuntu + JetPack services (no GNOME, which costs ~1 GiB more);
#   CUDA + runtime:      CUDA context, cuBLAS/cuDNN/TensorRT or ORT code and workspaces, Python.
TARGETS = {
    # 0.6 carve-outs + 0.8 OS + 0.6 CUDA/runtime
    "orin-nano-8gb": Target("orin-nano-8gb", 8 * GiB, 2048 * MiB),
    # 0.7 carve-outs + 0.8 OS + 0.6 CUDA/runtime
    "orin-nx-16gb": Target("orin-nx-16gb", 16 * GiB, 2150 * MiB),
    # 0.9 carve-outs + 0.8 OS + 0.8 CUDA/runtime
    "agx-orin-32gb": Target("agx-orin-32gb", 32 * GiB, 2560 * MiB),
    # 1.2 carve-outs + 0.8 OS + 0.8 CUDA/runtime
    "agx-orin-64gb": Target("agx-orin-64gb", 64 * GiB, 2870 * MiB),
}
ALIASES = {"orin-nano": "orin-nano-8gb", "orin-nx": "orin-nx-16gb"}

# SI units are powers of 1000 and IEC units powers of 1024, as written; a bare number is bytes.
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": KiB, "mib": MiB, "gib": GiB, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")


def parse_budget(text: str) -> "int | Target":
    """'512MiB', '2GB', '1.5 GiB', '1073741824' -> bytes; 'orin-nano', 'agx-orin-64gb' -> Target."""
    name = text.strip().lower()
    name = ALIASES.get(name, name)
    if name in TARGETS:
        return TARGETS[name]
    m = _SIZE.fullmatch(name)
    if m is None or m.group(2) not in UNITS:
        raise KVBudgetError(
            f"KV budget {text!r} is neither a size (e.g. '512MiB', '2GB', '1.5GiB', bytes) nor a "
            f"target ({', '.join(sorted([*TARGETS, *ALIASES]))})")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def kv_budget_bytes(budget: "str | int | Target", weights_bytes: int) -> int:
    """Bytes the KV pool may take. A byte count is taken as is; a target gives
    DRAM - weights - reserve, and fails when the engine leaves nothing for KV."""
    if isinstance(budget, str):
        budget = parse_budget(budget)
    if not isinstance(budget, Target):
        budget = operator.index(budget)  # ints and numpy ints; a float byte count is a mistake
        if budget <= 0:
            raise KVBudgetError(f"KV budget must be a positive byte count, got {budget}")
        return budget
    kv = budget.dram_bytes - weights_bytes - budget.reserve_bytes
    if kv <= 0:
        raise KVBudgetError(
            f"engine weights ({_gib(weights_bytes)}) + reserve for OS/CUDA/activations "
            f"({_gib(budget.reserve_bytes)}) exceed {budget.name}'s {_gib(budget.dram_bytes)} DRAM: "
            f"no room for the KV cache; use a smaller or int4 engine, or a larger target")
    return kv


def blocks_for_budget(layout: KVLayout, budget_bytes: int) -> int:
    """Whole blocks that fit in budget_bytes (floor)."""
    if budget_bytes < 0:
        raise KVBudgetError(f"KV budget must be >= 0 bytes, got {budget_bytes}")
    return budget_bytes // layout.bytes_per_block


def plan_num_blocks(layout: KVLayout, budget: "str | int | Target", weights_bytes: int,
                    max_context_tokens: int) -> int:
    """Pool size for an engine: the budget's blocks, checked to hold one full context."""
    kv_bytes = kv_budget_bytes(budget, weights_bytes)
    num_blocks = blocks_for_budget(layout, kv_bytes)
    need = -(-max_context_tokens // layout.block_size)
    if num_blocks < need:
        raise KVBudgetError(
            f"KV budget {_gib(kv_bytes)} buys {num_blocks} blocks of {layout.block_size} tokens "
            f"({_gib(layout.bytes_per_block)} each), but one {max_context_tokens}-token context "
            f"needs {need} blocks ({_gib(need * layout.bytes_per_block)}); raise the budget, "
            f"use a larger target or lower the max context")
    return num_blocks


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"
