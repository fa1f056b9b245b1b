// Paged-attention decode: one query token per sequence against its paged K/V cache.
// One block per (query head, sequence); each of its VK_ATTN_WARPS warps walks every
// VK_ATTN_WARPS-th token with an online softmax (running max m, sum l, accumulator in fp32),
// then the warps' partial states are merged through shared memory. Lane l owns head dims
// [l*D/32, (l+1)*D/32), so a warp reads one token's D-vector of K (and V) in one coalesced pass.
#pragma once

#include "common.cuh"
#include "vila_kernels.h"

template <int N>
__device__ __forceinline__ void load_halves(const __half* __restrict__ p, float (&out)[N]) {
  static_assert(N % 2 == 0, "head dim / 32 must be even (D in {64, 128})");
#pragma unroll
  for (int i = 0; i < N; i += 2) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(p + i));
    out[i] = f.x;
    out[i + 1] = f.y;
  }
}

template <int D>
__device__ __forceinline__ void paged_attention_decode_block(
    const __half* __restrict__ q, const __half* __restrict__ k_pool,
    const __half* __restrict__ v_pool, const int32_t* __restrict__ block_tables,
    const int32_t* __restrict__ context_lens, __half* __restrict__ out, int Hq, int Hkv, int BS,
    int max_blocks, float scale) {
  constexpr int VPL = D / VK_WARP;  // values per lane: 2 for D=64, 4 for D=128
  const int h = blockIdx.x, b = blockIdx.y;
  const int lane = threadIdx.x % VK_WARP, warp = threadIdx.x / VK_WARP;
  const int kvh = h / (Hq / Hkv);  // GQA: Hq/Hkv consecutive query heads share a KV head
  // A context longer than its table is a caller bug; clamping keeps the reads inside the table.
  const int ctx = min(context_lens[b], max_blocks * BS);
  const int32_t* table = block_tables + (size_t)b * max_blocks;

  float qv[VPL];
  load_halves<VPL>(q + ((size_t)b * Hq + h) * D + lane * VPL, qv);
#pragma unroll
  for (int i = 0; i < VPL; ++i) qv[i] *= scale;

  float m = -INFINITY, l = 0.f, acc[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) acc[i] = 0.f;

  for (int t = warp; t < ctx; t += VK_ATTN_WARPS) {
    const int blk = table[t / BS];
    // pool [NB, BS, Hkv, D]: token t is row t % BS of block table[t / BS]
    const size_t off = (((size_t)blk * BS + t % BS) * Hkv + kvh) * D + lane * VPL;
    float kv[VPL];
    load_halves<VPL>(k_pool + off, kv);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) s = fmaf(qv[i], kv[i], s);
    s = vk_warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float alpha = expf(m - m_new);  // 0 for the warp's first token (m = -inf)
    const float p = expf(s - m_new);
    l = l * alpha + p;
    float vv[VPL];
    load_halves<VPL>(v_pool + off, vv);
#pragma unroll
    for (int i = 0; i < VPL; ++i) acc[i] = fmaf(p, vv[i], acc[i] * alpha);
    m = m_new;
  }

  __shared__ float s_m[VK_ATTN_WARPS], s_l[VK_ATTN_WARPS];
  __shared__ float s_acc[VK_ATTN_WARPS][D];
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < VPL; ++i) s_acc[warp][lane * VPL + i] = acc[i];
  __syncthreads();

  float g_max = -INFINITY;
  for (int w = 0; w < VK_ATTN_WARPS; ++w) g_max = fmaxf(g_max, s_m[w]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float denom = 0.f, num = 0.f;
    for (int w = 0; w < VK_ATTN_WARPS; ++w) {
      if (s_l[w] == 0.f) continue;  // warp saw no token (context shorter than the warp count)
      const float c = expf(s_m[w] - g_max);
      denom = fmaf(s_l[w], c, denom);
      num = fmaf(s_acc[w][d], c, num);
    }
    // An empty context attends to nothing: zeros, not NaN.
    out[((size_t)b * Hq + h) * D + d] = __float2half(denom > 0.f ? num / denom : 0.f);
  }
}

#define VK_ATTN_ENTRY(DD)                                                                        \
  extern "C" __global__ void __launch_bounds__(VK_ATTN_WARPS * VK_WARP)                          \
      vk_paged_attention_decode_d##DD(const __half* __restrict__ q,                              \
                                      const __half* __restrict__ k_pool,                         \
                                      const __half* __restrict__ v_pool,                         \
                                      const int32_t* __restrict__ block_tables,                  \
                                      const int32_t* __restrict__ context_lens,                  \
                                      __half* __restrict__ out, int Hq, int Hkv, int BS,         \
                                      int max_blocks, float scale) {                             \
    paged_attention_decode_block<DD>(q, k_pool, v_pool, block_tables, context_lens, out, Hq,     \
                                     Hkv, BS, max_blocks, scale);                                \
  }
VK_ATTN_ENTRY(64)
VK_ATTN_ENTRY(128)
#undef VK_ATTN_ENTRY

extern "C" cudaError_t vk_paged_attention_decode(const __half* q, const __half* k_pool,
                                                 const __half* v_pool, const int32_t* block_tables,
                                                 const int32_t* context_lens, __half* out, int B,
                                                 int Hq, int Hkv, int D, int BS, int max_blocks,
                                                 cudaStream_t stream) {
  VK_REQUIRE(q && k_pool && v_pool && block_tables && context_lens && out);
  VK_REQUIRE(B > 0 && B <= 65535 && Hq > 0 && Hkv > 0 && Hq % Hkv == 0);
  VK_REQUIRE(BS > 0 && max_blocks > 0);
  VK_REQUIRE(D == VK_ATTN_D_SMALL || D == VK_ATTN_D_LARGE);
  const dim3 grid(Hq, B), block(VK_ATTN_WARPS * VK_WARP);
  const float scale = 1.f / sqrtf((float)D);
  if (D == VK_ATTN_D_SMALL)
    vk_paged_attention_decode_d64<<<grid, block, 0, stream>>>(
        q, k_pool, v_pool, block_tables, context_lens, out, Hq, Hkv, BS, max_blocks, scale);
  else
    vk_paged_attention_decode_d128<<<grid, block, 0, stream>>>(
        q, k_pool, v_pool, block_tables, context_lens, out, Hq, Hkv, BS, max_blocks, scale);
  return vk_launch_status();
}
