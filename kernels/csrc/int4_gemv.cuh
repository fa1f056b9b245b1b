// int4 weight-only GEMV, y[M, N] = x[M, K] @ dequant(B)^T, for decode batches M = 1..4.
// One warp per output feature n: each lane streams 16 bytes (32 codes) of row n per step, so a
// warp reads 512 contiguous bytes per step; x rows are re-read from L1/L2 by the block's warps.
// fp32 accumulation; the group scale is applied once per 32 codes (G % 32 == 0, so the 32 codes
// of a lane never straddle a group).
#pragma once

#include "common.cuh"
#include "vila_kernels.h"

#define VK_GEMV_CODES_PER_LANE 32

template <int M>
__device__ __forceinline__ void int4_gemv_warp(const __half* __restrict__ x,
                                               const uint8_t* __restrict__ b,
                                               const __half* __restrict__ scales,
                                               __half* __restrict__ y, int N, int K, int G) {
  const int lane = threadIdx.x % VK_WARP;
  const int n = blockIdx.x * VK_GEMV_WARPS + threadIdx.x / VK_WARP;
  if (n >= N) return;  // the whole warp leaves: edge block of N, no barriers follow
  const uint8_t* b_row = b + (size_t)n * (K / 2);  // [K/G, G/2] of row n is K/2 contiguous bytes
  const __half* s_row = scales + (size_t)n * (K / G);

  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;

  for (int k0 = lane * VK_GEMV_CODES_PER_LANE; k0 < K; k0 += VK_WARP * VK_GEMV_CODES_PER_LANE) {
    const uint4 packed = *reinterpret_cast<const uint4*>(b_row + k0 / 2);  // 16 B = 32 codes
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
    // Little-endian: byte j of word i is byte 4i+j of the row chunk, holding k = 8i+2j (low
    // nibble) and 8i+2j+1 (high nibble); codes are stored unsigned as q + 8.
    float w[VK_GEMV_CODES_PER_LANE];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t byte = (words[i] >> (8 * j)) & 0xffu;
        w[8 * i + 2 * j] = (float)(int)(byte & 0xfu) - 8.f;
        w[8 * i + 2 * j + 1] = (float)(int)(byte >> 4) - 8.f;
      }
    }
    const float s = __half2float(s_row[k0 / G]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)m * K + k0);  // 4 x 8 halves
      float dot = 0.f;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const uint4 xx = xv[v];
        const __half2* h2 = reinterpret_cast<const __half2*>(&xx);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const float2 f = __half22float2(h2[p]);
          dot = fmaf(f.x, w[8 * v + 2 * p], dot);
          dot = fmaf(f.y, w[8 * v + 2 * p + 1], dot);
        }
      }
      acc[m] = fmaf(s, dot, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = vk_warp_sum(acc[m]);
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) y[(size_t)m * N + n] = __float2half(acc[m]);
  }
}

// One entry point per batch size so M is a compile-time constant (registers, unrolling).
#define VK_GEMV_ENTRY(MM)                                                                     \
  extern "C" __global__ void __launch_bounds__(VK_GEMV_WARPS * VK_WARP) vk_int4_gemv_m##MM(  \
      const __half* __restrict__ x, const uint8_t* __restrict__ b,                            \
      const __half* __restrict__ scales, __half* __restrict__ y, int N, int K, int G) {       \
    int4_gemv_warp<MM>(x, b, scales, y, N, K, G);                                             \
  }
VK_GEMV_ENTRY(1)
VK_GEMV_ENTRY(2)
VK_GEMV_ENTRY(3)
VK_GEMV_ENTRY(4)
#undef VK_GEMV_ENTRY

extern "C" cudaError_t vk_int4_gemv(const __half* x, const uint8_t* b, const __half* scales,
                                    __half* y, int M, int N, int K, int G, cudaStream_t stream) {
  VK_REQUIRE(x && b && scales && y);
  VK_REQUIRE(M >= 1 && M <= VK_GEMV_MAX_M && N > 0 && K > 0);
  VK_REQUIRE(G == 32 || G == 64 || G == 128);
  VK_REQUIRE(K % G == 0);
  // 16-byte vector loads of x rows and weight rows.
  VK_REQUIRE((uintptr_t)x % 16 == 0 && (uintptr_t)b % 16 == 0);
  const dim3 grid((N + VK_GEMV_WARPS - 1) / VK_GEMV_WARPS), block(VK_GEMV_WARPS * VK_WARP);
  switch (M) {
    case 1: vk_int4_gemv_m1<<<grid, block, 0, stream>>>(x, b, scales, y, N, K, G); break;
    case 2: vk_int4_gemv_m2<<<grid, block, 0, stream>>>(x, b, scales, y, N, K, G); break;
    case 3: vk_int4_gemv_m3<<<grid, block, 0, stream>>>(x, b, scales, y, N, K, G); break;
    default: vk_int4_gemv_m4<<<grid, block, 0, stream>>>(x, b, scales, y, N, K, G); break;
  }
  return vk_launch_status();
}
