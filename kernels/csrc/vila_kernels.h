// C ABI of the vila_edge CUDA kernels (Orin hot path).
//
// Every launcher takes an explicit stream, validates its scalar arguments, launches, and returns
// the launch's cudaError_t (cudaErrorInvalidValue for bad arguments) — it never synchronises.
// All tensors are device pointers, contiguous, row-major, in the layouts of docs/contracts.md.
// Shape legend: M batch rows, N out features, K in features, G quant group, B batch, Hq/Hkv heads,
// D head dim, NB blocks, BS block size, S grid side, C channels, H LLM hidden size.
//
// The VK_* geometry constants are shared with the Python loader (vila_edge/cuda/kernels.py);
// tests/test_kernel_build.py checks that both sides agree.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// int4 GEMV: one warp per output feature, VK_GEMV_WARPS warps per block.
#define VK_GEMV_WARPS 4
#define VK_GEMV_MAX_M 4
// Paged attention decode: one block of VK_ATTN_WARPS warps per (batch, query head).
#define VK_ATTN_WARPS 8
// Head dims with a compiled instantiation (one kernel per D).
#define VK_ATTN_D_SMALL 64
#define VK_ATTN_D_LARGE 128
// Projector: one block of VK_LN_THREADS threads per LayerNorm row; GEMM tiles of
// VK_GEMM_BM x VK_GEMM_BN outputs computed by VK_GEMM_THREADS threads.
#define VK_LN_THREADS 256
#define VK_GEMM_BM 64
#define VK_GEMM_BN 64
#define VK_GEMM_THREADS 256
// Token order of merged projector tokens (t = i*S2 + j or t = j*S2 + i).
#define VK_ORDER_ROW_MAJOR 0
#define VK_ORDER_COL_MAJOR 1

#ifdef __cplusplus
extern "C" {
#endif

// y[M, N] = x[M, K] @ dequant(B)^T. B uint8 [N, K/G, G/2] (even k in the low nibble, q + 8),
// scales fp16 [N, K/G]. M in 1..4, G in {32, 64, 128}, K % G == 0, any N.
cudaError_t vk_int4_gemv(const __half* x, const uint8_t* b, const __half* scales, __half* y,
                         int M, int N, int K, int G, cudaStream_t stream);

// out[B, Hq, D] = softmax(q k^T / sqrt(D)) v over context_lens[b] tokens gathered through
// block_tables[B, max_blocks] from pools [NB, BS, Hkv, D]. Hq % Hkv == 0, D in {64, 128}.
// context_lens[b] == 0 gives zeros; context_lens[b] > max_blocks * BS is clamped (caller bug).
cudaError_t vk_paged_attention_decode(const __half* q, const __half* k_pool, const __half* v_pool,
                                      const int32_t* block_tables, const int32_t* context_lens,
                                      __half* out, int B, int Hq, int Hkv, int D, int BS,
                                      int max_blocks, cudaStream_t stream);

// Projector pieces. out rows of vk_merge_layernorm: [N_img * S2 * S2, m*m*C], S2 = ceil(S / m).
cudaError_t vk_merge_layernorm(const __half* x, const __half* gamma, const __half* beta, __half* out,
                               int n_img, int S, int C, int merge, int order, float eps,
                               cudaStream_t stream);
cudaError_t vk_layernorm(const __half* x, const __half* gamma, const __half* beta, __half* out,
                         int rows, int cols, float eps, cudaStream_t stream);
// out[dest(r), n] = act(a[r, :] . w[n, :] + bias[n]) for r < rows, n < N; a [rows, K], w [N, K].
// dest(r) = r when dst_offsets is NULL, else dst_offsets[r / rows_per_img] + r % rows_per_img;
// rows with dest(r) outside [0, out_rows) are skipped. gelu: 0 none, 1 exact erf GELU.
cudaError_t vk_gemm_bias_act(const __half* a, const __half* w, const __half* bias, __half* out,
                             int rows, int N, int K, int gelu, const int32_t* dst_offsets,
                             int rows_per_img, int out_rows, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

// The whole projector + splice. 2x2 (mlp_downsample): LN(4C) -> fc1(4C,H) -> GELU -> fc2(H,H).
// 3x3 (mlp_downsample_3x3_fix): LN(9C) -> fc1(9C,3C) -> GELU -> ln1(3C) -> fc2(3C,H) -> GELU
// -> fc3(H,H). ln1_* and fc3_* are NULL for 2x2. Weights are nn.Linear W[out, in].
typedef struct {
  const __half *ln0_g, *ln0_b;
  const __half *fc1_w, *fc1_b;
  const __half *ln1_g, *ln1_b;
  const __half *fc2_w, *fc2_b;
  const __half *fc3_w, *fc3_b;
} vk_projector_weights;

#ifdef __cplusplus
extern "C" {
#endif

// Bytes of scratch vk_projector_splice needs for n_img images (fp16 intermediates).
size_t vk_projector_workspace_bytes(int n_img, int S, int C, int merge, int H);
// x fp16 [n_img, S*S, C] -> emb fp16 [emb_rows, H] rows dst_offsets[i] .. + S2*S2 - 1.
cudaError_t vk_projector_splice(const __half* x, vk_projector_weights w, __half* emb,
                                const int32_t* dst_offsets, int n_img, int S, int C, int merge,
                                int order, int H, int emb_rows, void* workspace,
                                cudaStream_t stream);

#ifdef __cplusplus
}
#endif
