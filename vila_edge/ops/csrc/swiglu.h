// vila_edge::SwiGLU: the Llama MLP's gated activation on one packed [gate | up] projection (CPU, float).
//
//   0 x   [.., 2 I]   one fused gate|up MatMulNBits' output, gate first (onnx_llm_fused._mlp)
//   output [.., I]    silu(gate) * up,  silu(a) = a * sigmoid(a) = a / (1 + exp(-a))
//
// One node where the standard ops take three (Split, Sigmoid + Mul fused by ORT into QuickGelu, Mul):
// at SmolLM2's decode step each of those 90 nodes costs more in dispatch than in arithmetic
// (benchmarks/results/graphdiff). ORT 1.32 has com.microsoft SwiGLU with the same packed form, but
// no CPU kernel for it (nor for ONNX's SwiGLU-28): hence ours. Computed in float32 as the standard
// ops are, sigmoid through the attention kernels' exp (Cephes expf, ~1 ulp) on exp(-|a|) <= 1, so
// it neither overflows nor loses the negative tail.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "attention_kernels.h"

namespace vila_edge_swiglu {

inline void swiglu_plain(const float* x, int64_t inter, float* y) {
  for (int64_t i = 0; i < inter; ++i) {
    const float a = x[i], e = std::exp(-std::fabs(a));
    y[i] = a * (a >= 0.f ? 1.f / (1.f + e) : e / (1.f + e)) * x[inter + i];
  }
}

#ifdef VILA_EDGE_AVX2
__attribute__((target("avx2,fma,f16c"))) inline void swiglu_avx2(const float* x, int64_t inter, float* y) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  int64_t i = 0;
  for (; i + 8 <= inter; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i);
    const __m256 e = vila_edge_kernels::exp8(_mm256_or_ps(a, sign));             // exp(-|a|)
    const __m256 num = _mm256_blendv_ps(one, e, a);                              // a < 0: e, else 1
    const __m256 s = _mm256_div_ps(num, _mm256_add_ps(one, e));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(a, s), _mm256_loadu_ps(x + inter + i)));
  }
  for (; i < inter; ++i) {
    const float a = x[i], e = std::exp(-std::fabs(a));
    y[i] = a * (a >= 0.f ? 1.f / (1.f + e) : e / (1.f + e)) * x[inter + i];
  }
}
#endif

using RowFn = void (*)(const float*, int64_t, float*);

inline RowFn pick_row() {
#ifdef VILA_EDGE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return swiglu_avx2;
#endif
  return swiglu_plain;
}

struct Rows {
  const float* x;
  float* y;
  int64_t inter, rows, per_item;
  RowFn fn;
};

inline void rows_item(void* data, size_t index) {
  const Rows& r = *static_cast<const Rows*>(data);
  const int64_t lo = static_cast<int64_t>(index) * r.per_item, hi = std::min(r.rows, lo + r.per_item);
  for (int64_t t = lo; t < hi; ++t) r.fn(r.x + t * 2 * r.inter, r.inter, r.y + t * r.inter);
}

// A decode step's one row runs inline (a thread pool wake-up costs more than its 1536 values);
// prefill rows go in chunks over ORT's intra-op threads.
constexpr int64_t kRowsPerItem = 16;

struct SwiGLU {
  SwiGLU(const OrtApi*, const OrtKernelInfo*) {}

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, Ort::Custom::Tensor<float>& y) {
    std::vector<int64_t> shape = x.Shape();
    if (shape.empty() || shape.back() % 2)
      ORT_CXX_API_THROW("SwiGLU: x must be [.., 2 * inter] (gate | up)", ORT_INVALID_ARGUMENT);
    const int64_t inter = shape.back() / 2;
    shape.back() = inter;
    const int64_t rows = inter ? x.NumberOfElement() / (2 * inter) : 0;
    static const RowFn fn = pick_row();
    Rows r{x.Data(), y.Allocate(shape), inter, rows, kRowsPerItem, fn};
    const int64_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
    if (items > 1) {
      Ort::KernelContext(context).ParallelFor(rows_item, static_cast<size_t>(items), 0, &r);
    } else if (rows) {
      r.per_item = rows;
      rows_item(&r, 0);
    }
  }
};

}  // namespace vila_edge_swiglu
