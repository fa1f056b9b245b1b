// Fused VILA projector + splice (NVlabs/VILA@1c88211:llava/model/multimodal_projector/base_projector.py).
//   merge + LayerNorm: gather the m x m neighbourhood of each merged token (zero row/column
//   padding, channel order (dy, dx, c), row- or column-major token order) and normalise it;
//   then tiled GEMMs with bias and optional exact GELU. The last GEMM writes its rows straight
//   into the LLM input-embedding buffer at each image's destination row ("splice"), so no
//   separate copy runs and rows outside the images are never touched.
// Intermediates are stored fp16 (as the PyTorch fp16 module does); all sums are fp32.
#pragma once

#include "common.cuh"
#include "vila_kernels.h"

#define VK_GEMM_BK 16
#define VK_GEMM_TM (VK_GEMM_BM / 16)  // outputs per thread along rows (16 x 16 threads)
#define VK_GEMM_TN (VK_GEMM_BN / 16)
// The tile loader fills As and Ws rows with one index, and threads form a 16 x 16 grid.
static_assert(VK_GEMM_BM == VK_GEMM_BN, "square output tiles");
static_assert(VK_GEMM_THREADS == 256, "a 16 x 16 thread grid");

// LayerNorm of one row of L values produced by get(e); the block writes out_row[0..L).
// Two passes (mean, then centred variance) for accuracy; get() is cheap to call again.
template <typename Get>
__device__ __forceinline__ void layernorm_row(Get get, int L, const __half* __restrict__ gamma,
                                              const __half* __restrict__ beta,
                                              __half* __restrict__ out_row, float eps) {
  __shared__ float scratch[VK_LN_THREADS / VK_WARP];
  float sum = 0.f;
  for (int e = threadIdx.x; e < L; e += blockDim.x) sum += get(e);
  const float mean = vk_block_sum(sum, scratch) / L;
  float sq = 0.f;
  for (int e = threadIdx.x; e < L; e += blockDim.x) {
    const float d = get(e) - mean;
    sq = fmaf(d, d, sq);
  }
  const float rstd = rsqrtf(vk_block_sum(sq, scratch) / L + eps);
  // In-place use (out_row aliasing the input) is safe: every read of pass 3 happens in the
  // thread that writes that element, and passes 1-2 ended at the barriers above.
  for (int e = threadIdx.x; e < L; e += blockDim.x) {
    const float v = (get(e) - mean) * rstd;
    out_row[e] = __float2half(fmaf(v, __half2float(gamma[e]), __half2float(beta[e])));
  }
}

// x [n_img, S*S, C] -> out [n_img * S2*S2, m*m*C]; one block per merged token.
extern "C" __global__ void __launch_bounds__(VK_LN_THREADS)
    vk_merge_layernorm_kernel(const __half* __restrict__ x, const __half* __restrict__ gamma,
                              const __half* __restrict__ beta, __half* __restrict__ out, int S,
                              int C, int merge, int order, float eps) {
  const int S2 = (S + merge - 1) / merge, T = S2 * S2;
  const int row = blockIdx.x, img = row / T, t = row % T;
  const int i = order == VK_ORDER_ROW_MAJOR ? t / S2 : t % S2;  // merged grid row
  const int j = order == VK_ORDER_ROW_MAJOR ? t % S2 : t / S2;  // merged grid column
  const int L = merge * merge * C;
  const __half* src = x + (size_t)img * S * S * C;  // [S, S, C], patches row-major
  auto get = [=](int e) -> float {
    const int c = e % C, cell = e / C, dy = cell / merge, dx = cell % merge;  // (dy, dx, c)
    const int y = merge * i + dy, xx = merge * j + dx;
    // Past the grid: the zero row VILA pads at the bottom / zero column at the right.
    return (y < S && xx < S) ? __half2float(src[((size_t)y * S + xx) * C + c]) : 0.f;
  };
  layernorm_row(get, L, gamma, beta, out + (size_t)row * L, eps);
}

// x [rows, cols] -> out [rows, cols] (may alias x); one block per row.
extern "C" __global__ void __launch_bounds__(VK_LN_THREADS)
    vk_layernorm_kernel(const __half* x, const __half* __restrict__ gamma,
                        const __half* __restrict__ beta, __half* out, int cols, float eps) {
  const __half* src = x + (size_t)blockIdx.x * cols;
  auto get = [=](int e) -> float { return __half2float(src[e]); };
  layernorm_row(get, cols, gamma, beta, out + (size_t)blockIdx.x * cols, eps);
}

// out[dest(r), n] = act(a[r] . w[n] + bias[n]). a [rows, K], w [N, K] (nn.Linear), fp32 sums.
// Block tile BM x BN, K in steps of BK through shared memory; thread (ty, tx) of a 16 x 16 grid
// owns rows ty + 16*i and columns tx + 16*j, so shared reads along n are conflict-free and
// global writes of a half-warp are contiguous.
extern "C" __global__ void __launch_bounds__(VK_GEMM_THREADS)
    vk_gemm_bias_act_kernel(const __half* __restrict__ a, const __half* __restrict__ w,
                            const __half* __restrict__ bias, __half* __restrict__ out, int rows,
                            int N, int K, int gelu, const int32_t* __restrict__ dst_offsets,
                            int rows_per_img, int out_rows) {
  __shared__ float As[VK_GEMM_BK][VK_GEMM_BM + 4];  // k-major: the inner loop reads along rows
  __shared__ float Ws[VK_GEMM_BK][VK_GEMM_BN + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int m0 = blockIdx.y * VK_GEMM_BM, n0 = blockIdx.x * VK_GEMM_BN;
  float acc[VK_GEMM_TM][VK_GEMM_TN];
#pragma unroll
  for (int i = 0; i < VK_GEMM_TM; ++i)
#pragma unroll
    for (int j = 0; j < VK_GEMM_TN; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < K; k0 += VK_GEMM_BK) {
    // Each tile is BM x BK (= BN x BK) values; consecutive threads read consecutive k.
#pragma unroll
    for (int p = tid; p < VK_GEMM_BM * VK_GEMM_BK; p += VK_GEMM_THREADS) {
      const int r = p / VK_GEMM_BK, kk = p % VK_GEMM_BK, gk = k0 + kk;
      const int gm = m0 + r, gn = n0 + r;
      As[kk][r] = (gm < rows && gk < K) ? __half2float(a[(size_t)gm * K + gk]) : 0.f;
      Ws[kk][r] = (gn < N && gk < K) ? __half2float(w[(size_t)gn * K + gk]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < VK_GEMM_BK; ++kk) {
      float av[VK_GEMM_TM], wv[VK_GEMM_TN];
#pragma unroll
      for (int i = 0; i < VK_GEMM_TM; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < VK_GEMM_TN; ++j) wv[j] = Ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < VK_GEMM_TM; ++i)
#pragma unroll
        for (int j = 0; j < VK_GEMM_TN; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < VK_GEMM_TM; ++i) {
    const int gm = m0 + ty + 16 * i;
    if (gm >= rows) continue;
    const int dest = dst_offsets ? dst_offsets[gm / rows_per_img] + gm % rows_per_img : gm;
    if (dest < 0 || dest >= out_rows) continue;  // never write outside the embedding buffer
#pragma unroll
    for (int j = 0; j < VK_GEMM_TN; ++j) {
      const int gn = n0 + tx + 16 * j;
      if (gn >= N) continue;
      float v = acc[i][j] + (bias ? __half2float(bias[gn]) : 0.f);
      if (gelu) v = vk_gelu_erf(v);
      out[(size_t)dest * N + gn] = __float2half(v);
    }
  }
}

extern "C" cudaError_t vk_merge_layernorm(const __half* x, const __half* gamma, const __half* beta,
                                          __half* out, int n_img, int S, int C, int merge,
                                          int order, float eps, cudaStream_t stream) {
  VK_REQUIRE(x && gamma && beta && out);
  VK_REQUIRE(n_img > 0 && S > 0 && C > 0 && (merge == 2 || merge == 3));
  VK_REQUIRE(order == VK_ORDER_ROW_MAJOR || order == VK_ORDER_COL_MAJOR);
  const int S2 = (S + merge - 1) / merge;
  vk_merge_layernorm_kernel<<<n_img * S2 * S2, VK_LN_THREADS, 0, stream>>>(x, gamma, beta, out, S,
                                                                           C, merge, order, eps);
  return vk_launch_status();
}

extern "C" cudaError_t vk_layernorm(const __half* x, const __half* gamma, const __half* beta,
                                    __half* out, int rows, int cols, float eps,
                                    cudaStream_t stream) {
  VK_REQUIRE(x && gamma && beta && out && rows > 0 && cols > 0);
  vk_layernorm_kernel<<<rows, VK_LN_THREADS, 0, stream>>>(x, gamma, beta, out, cols, eps);
  return vk_launch_status();
}

extern "C" cudaError_t vk_gemm_bias_act(const __half* a, const __half* w, const __half* bias,
                                        __half* out, int rows, int N, int K, int gelu,
                                        const int32_t* dst_offsets, int rows_per_img,
                                        int out_rows, cudaStream_t stream) {
  VK_REQUIRE(a && w && out && rows > 0 && N > 0 && K > 0 && (gelu == 0 || gelu == 1));
  VK_REQUIRE(!dst_offsets || rows_per_img > 0);
  VK_REQUIRE((rows + VK_GEMM_BM - 1) / VK_GEMM_BM <= 65535);
  const dim3 grid((N + VK_GEMM_BN - 1) / VK_GEMM_BN, (rows + VK_GEMM_BM - 1) / VK_GEMM_BM);
  vk_gemm_bias_act_kernel<<<grid, VK_GEMM_THREADS, 0, stream>>>(a, w, bias, out, rows, N, K, gelu,
                                                                dst_offsets, rows_per_img, out_rows);
  return vk_launch_status();
}

// The LayerNorm eps of nn.LayerNorm's default, used by every VILA projector.
#define VK_PROJECTOR_LN_EPS 1e-5f

static inline size_t vk_align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Scratch layout: merged [R, m*m*C] | h1 [R, fc1 out] | h2 [R, H] (3x3 only), 256-B aligned.
static inline void vk_projector_sizes(int n_img, int S, int C, int merge, int H, size_t* merged,
                                      size_t* h1, size_t* h2) {
  const size_t S2 = (S + merge - 1) / merge, R = (size_t)n_img * S2 * S2;
  *merged = vk_align256(R * merge * merge * C * sizeof(__half));
  *h1 = vk_align256(R * (merge == 2 ? H : 3 * C) * sizeof(__half));
  *h2 = merge == 3 ? vk_align256(R * H * sizeof(__half)) : 0;
}

extern "C" size_t vk_projector_workspace_bytes(int n_img, int S, int C, int merge, int H) {
  size_t merged, h1, h2;
  vk_projector_sizes(n_img, S, C, merge, H, &merged, &h1, &h2);
  return merged + h1 + h2;
}

#define VK_TRY(call)                  \
  do {                                \
    cudaError_t err_ = (call);        \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

extern "C" cudaError_t vk_projector_splice(const __half* x, vk_projector_weights w, __half* emb,
                                           const int32_t* dst_offsets, int n_img, int S, int C,
                                           int merge, int order, int H, int emb_rows,
                                           void* workspace, cudaStream_t stream) {
  VK_REQUIRE(merge == 2 || merge == 3);
  VK_REQUIRE(w.ln0_g && w.ln0_b && w.fc1_w && w.fc2_w && emb && dst_offsets && workspace);
  VK_REQUIRE(merge == 2 || (w.ln1_g && w.ln1_b && w.fc3_w));
  size_t merged_bytes, h1_bytes, h2_bytes;
  vk_projector_sizes(n_img, S, C, merge, H, &merged_bytes, &h1_bytes, &h2_bytes);
  __half* merged = (__half*)workspace;
  __half* h1 = (__half*)((char*)workspace + merged_bytes);
  __half* h2 = (__half*)((char*)workspace + merged_bytes + h1_bytes);
  const int S2 = (S + merge - 1) / merge, T = S2 * S2, R = n_img * T, L = merge * merge * C;

  VK_TRY(vk_merge_layernorm(x, w.ln0_g, w.ln0_b, merged, n_img, S, C, merge, order,
                            VK_PROJECTOR_LN_EPS, stream));
  if (merge == 2) {
    VK_TRY(vk_gemm_bias_act(merged, w.fc1_w, w.fc1_b, h1, R, H, L, 1, NULL, 0, R, stream));
    return vk_gemm_bias_act(h1, w.fc2_w, w.fc2_b, emb, R, H, H, 0, dst_offsets, T, emb_rows,
                            stream);
  }
  VK_TRY(vk_gemm_bias_act(merged, w.fc1_w, w.fc1_b, h1, R, 3 * C, L, 1, NULL, 0, R, stream));
  VK_TRY(vk_layernorm(h1, w.ln1_g, w.ln1_b, h1, R, 3 * C, VK_PROJECTOR_LN_EPS, stream));
  VK_TRY(vk_gemm_bias_act(h1, w.fc2_w, w.fc2_b, h2, R, H, 3 * C, 1, NULL, 0, R, stream));
  return vk_gemm_bias_act(h2, w.fc3_w, w.fc3_b, emb, R, H, H, 0, dst_offsets, T, emb_rows, stream);
}
