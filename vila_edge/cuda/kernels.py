"""Python launchers for kernels/csrc, mirroring the C launchers of vila_kernels.h.

Each op takes DeviceArrays and an explicit Stream, checks shapes and dtypes on the host (the
error names the argument), launches, and returns without synchronising.
"""

import math
from pathlib import Path

import numpy as np

from vila_edge.cuda import reference
from vila_edge.cuda.abi import (ATTN_HEAD_DIMS, FATBIN_NAME, GEMV_GROUPS, KERNEL_NAMES, LN_EPS, MAX_GRID_Y,
                                ORDER_CODES, VK_ATTN_WARPS, VK_GEMM_BM, VK_GEMM_BN,
                                VK_GEMM_THREADS, VK_GEMV_MAX_M, VK_GEMV_WARPS, VK_LN_THREADS,
                                WARP)
from vila_edge.cuda.driver import DeviceArray, Module, Stream, launch


def default_fatbin_path() -> Path:
    """Where kernels/build.py (make kernels) writes the library in a source checkout."""
    return Path(__file__).resolve().parents[2] / "build" / "kernels" / FATBIN_NAME


def _expect(name: str, a: DeviceArray, dtype, shape=None, ndim=None) -> None:
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if ndim is not None and len(a.shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {a.shape}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {a.shape}")


def _ptr(a) -> np.uint64:
    return np.uint64(0 if a is None else a.ptr)


class Kernels:
    """The loaded kernel library. Needs a current context (driver.Device)."""

    def __init__(self, fatbin: Path | None = None):
        self.module = Module(fatbin or default_fatbin_path(), KERNEL_NAMES)
        self.fn = self.module.functions

    def close(self) -> None:
        self.module.close()

    # ------------------------------------------------------------------------- int4 GEMV

    def int4_gemv(self, x: DeviceArray, b: DeviceArray, scales: DeviceArray, y: DeviceArray,
                  stream: Stream) -> None:
        """y fp16 [M, N] = x fp16 [M, K] @ dequant(b uint8 [N, K/G, G/2], scales fp16 [N, K/G])^T."""
        _expect("b", b, np.uint8, ndim=3)
        N, n_groups, half_g = b.shape
        G, K = 2 * half_g, n_groups * 2 * half_g
        if G not in GEMV_GROUPS:
            raise ValueError(f"b: group size G={G} (2 * b.shape[2]) not in {GEMV_GROUPS}")
        _expect("x", x, np.float16, ndim=2)
        M = x.shape[0]
        if not 1 <= M <= VK_GEMV_MAX_M:
            raise ValueError(f"x: batch M={M} outside 1..{VK_GEMV_MAX_M} of the GEMV kernel")
        _expect("x", x, np.float16, (M, K))
        _expect("scales", scales, np.float16, (N, n_groups))
        _expect("y", y, np.float16, (M, N))
        grid = (math.ceil(N / VK_GEMV_WARPS),)  # one warp per output feature
        launch(self.fn[f"vk_int4_gemv_m{M}"], grid, (VK_GEMV_WARPS * WARP,),
               [_ptr(x), _ptr(b), _ptr(scales), _ptr(y), np.int32(N), np.int32(K), np.int32(G)],
               stream, name=f"vk_int4_gemv_m{M}")

    # ------------------------------------------------------------------------- paged attention

    def paged_attention_decode(self, q: DeviceArray, k_pool: DeviceArray, v_pool: DeviceArray,
                               block_tables: DeviceArray, context_lens: DeviceArray,
                               out: DeviceArray, stream: Stream) -> None:
        """out fp16 [B, Hq, D] = softmax(q K^T / sqrt(D)) V over each sequence's paged blocks.

        Table entries and lengths live on the device and are not checked here: the block
        manager guarantees context_lens[b] <= max_blocks * BS and ids < NB (the kernel clamps
        the length so a bad one cannot read past the table)."""
        _expect("q", q, np.float16, ndim=3)
        B, Hq, D = q.shape
        _expect("k_pool", k_pool, np.float16, ndim=4)
        NB, BS, Hkv, _ = k_pool.shape
        _expect("k_pool", k_pool, np.float16, (NB, BS, Hkv, D))
        _expect("v_pool", v_pool, np.float16, (NB, BS, Hkv, D))
        if D not in ATTN_HEAD_DIMS:
            raise ValueError(f"q: head dim D={D} has no kernel (built for {ATTN_HEAD_DIMS})")
        if Hq % Hkv:
            raise ValueError(f"q: Hq={Hq} query heads is not a multiple of Hkv={Hkv} KV heads")
        if B > MAX_GRID_Y:
            raise ValueError(f"q: batch B={B} exceeds the grid limit {MAX_GRID_Y}")
        _expect("block_tables", block_tables, np.int32, ndim=2)
        if block_tables.shape[0] != B:
            raise ValueError(f"block_tables: {block_tables.shape[0]} rows for batch B={B}")
        _expect("context_lens", context_lens, np.int32, (B,))
        _expect("out", out, np.float16, (B, Hq, D))
        name = f"vk_paged_attention_decode_d{D}"
        launch(self.fn[name], (Hq, B), (VK_ATTN_WARPS * WARP,),
               [_ptr(q), _ptr(k_pool), _ptr(v_pool), _ptr(block_tables), _ptr(context_lens),
                _ptr(out), np.int32(Hq), np.int32(Hkv), np.int32(BS),
                np.int32(block_tables.shape[1]), np.float32(1.0 / math.sqrt(D))],
               stream, name=name)

    # ------------------------------------------------------------------------- projector pieces

    def merge_layernorm(self, x, gamma, beta, out, merge: int, order: str, stream: Stream,
                        eps: float = LN_EPS) -> None:
        """x fp16 [N_img, S*S, C] -> out fp16 [N_img * S2*S2, m*m*C], LayerNorm'ed."""
        _expect("x", x, np.float16, ndim=3)
        n_img, tokens, C = x.shape
        S = math.isqrt(tokens)
        if S * S != tokens:
            raise ValueError(f"x: {tokens} tokens per image is not a square grid")
        if order not in ORDER_CODES:
            raise ValueError(f"order: expected one of {sorted(ORDER_CODES)}, got {order!r}")
        L, S2 = merge * merge * C, reference.merged_side(S, merge)
        _expect("gamma", gamma, np.float16, (L,))
        _expect("beta", beta, np.float16, (L,))
        _expect("out", out, np.float16, (n_img * S2 * S2, L))
        launch(self.fn["vk_merge_layernorm_kernel"], (n_img * S2 * S2,), (VK_LN_THREADS,),
               [_ptr(x), _ptr(gamma), _ptr(beta), _ptr(out), np.int32(S), np.int32(C),
                np.int32(merge), np.int32(ORDER_CODES[order]), np.float32(eps)],
               stream, name="vk_merge_layernorm_kernel")

    def layernorm(self, x, gamma, beta, out, stream: Stream, eps: float = LN_EPS) -> None:
        """x fp16 [rows, cols] -> out (may be x itself)."""
        _expect("x", x, np.float16, ndim=2)
        rows, cols = x.shape
        _expect("gamma", gamma, np.float16, (cols,))
        _expect("beta", beta, np.float16, (cols,))
        _expect("out", out, np.float16, (rows, cols))
        launch(self.fn["vk_layernorm_kernel"], (rows,), (VK_LN_THREADS,),
               [_ptr(x), _ptr(gamma), _ptr(beta), _ptr(out), np.int32(cols), np.float32(eps)],
               stream, name="vk_layernorm_kernel")

    def gemm_bias_act(self, a, w, bias, out, gelu: bool, stream: Stream,
                      dst_offsets: DeviceArray | None = None, rows_per_img: int = 0) -> None:
        """out[dest(r)] = act(a [rows, K] @ w [N, K]^T + bias [N]); dest(r) = r, or with
        dst_offsets (int32 [N_img]) dst_offsets[r // rows_per_img] + r % rows_per_img."""
        _expect("a", a, np.float16, ndim=2)
        rows, K = a.shape
        _expect("w", w, np.float16, ndim=2)
        N = w.shape[0]
        _expect("w", w, np.float16, (N, K))
        if bias is not None:
            _expect("bias", bias, np.float16, (N,))
        _expect("out", out, np.float16, ndim=2)
        if out.shape[1] != N:
            raise ValueError(f"out: {out.shape[1]} columns for N={N} features")
        if dst_offsets is None and out.shape[0] != rows:
            raise ValueError(f"out: {out.shape[0]} rows for {rows} input rows")
        if dst_offsets is not None:
            _expect("dst_offsets", dst_offsets, np.int32, (rows // max(rows_per_img, 1),))
            if rows_per_img <= 0 or rows % rows_per_img:
                raise ValueError(f"rows_per_img={rows_per_img} does not divide rows={rows}")
        grid = (math.ceil(N / VK_GEMM_BN), math.ceil(rows / VK_GEMM_BM))
        if grid[1] > MAX_GRID_Y:
            raise ValueError(f"a: {rows} rows exceed the GEMM grid limit")
        launch(self.fn["vk_gemm_bias_act_kernel"], grid, (VK_GEMM_THREADS,),
               [_ptr(a), _ptr(w), _ptr(bias), _ptr(out), np.int32(rows), np.int32(N),
                np.int32(K), np.int32(int(gelu)), _ptr(dst_offsets), np.int32(rows_per_img),
                np.int32(out.shape[0])],
               stream, name="vk_gemm_bias_act_kernel")
