// Helpers shared by the kernels: warp/block reductions and launch checking.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#define VK_WARP 32

// Scalar arguments are validated before launching; a bad one is the caller's bug, reported as
// cudaErrorInvalidValue rather than a kernel that reads out of bounds.
#define VK_REQUIRE(cond) \
  do {                   \
    if (!(cond)) return cudaErrorInvalidValue; \
  } while (0)

// A launch error (bad configuration, missing binary for this GPU) shows up here, not later.
static inline cudaError_t vk_launch_status(void) { return cudaGetLastError(); }

__device__ __forceinline__ float vk_warp_sum(float v) {
#pragma unroll
  for (int o = VK_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float vk_warp_max(float v) {
#pragma unroll
  for (int o = VK_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block; every thread gets the result. scratch holds one float per warp.
// Ends with a barrier so scratch can be reused by the next call.
__device__ __forceinline__ float vk_block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % VK_WARP, warp = threadIdx.x / VK_WARP;
  const int n_warps = (blockDim.x + VK_WARP - 1) / VK_WARP;
  v = vk_warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < n_warps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// nn.GELU() default: exact erf form, not the tanh approximation.
__device__ __forceinline__ float vk_gelu_erf(float v) {
  return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
}
