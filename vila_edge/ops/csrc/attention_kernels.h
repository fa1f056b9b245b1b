// The inner loops of vila_edge::PagedAttention (paged_attention.cc) over a run of `count` consecutive
// positions of one pool block, for the `rep` query heads that share one KV head (GQA: each K and V
// row is read once for all of them). Pool rows are `stride` elements apart, of float or float16 (C):
//   qk:      scores[r * n + j] = q[r] . k[j]
//   pv:      acc[r] += sum_j scores[r * n + j] v[j]
//   exp_sum: x[j] = exp(x[j] - top), returns the sum;   top: max of x
// AVX2 + FMA + F16C when this CPU has them (chosen once at run time, so the library stays portable:
// no -march), else plain loops any compiler vectorises at its baseline (SSE2, NEON), float16 rows
// converted one by one. Define VILA_EDGE_OPS_NO_AVX2 to build (and test) only the portable path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) && !defined(VILA_EDGE_OPS_NO_AVX2)
#define VILA_EDGE_AVX2 1
#include <immintrin.h>
#endif

namespace vila_edge_kernels {

inline float to_f32(float x) { return x; }
inline float to_f32(Ort::Float16_t x) { return x.ToFloat(); }

template <typename C>
struct Kernels {
  void (*qk)(const float* q, int64_t rep, int64_t d, const C* k, int64_t stride, int64_t count, float* scores,
             int64_t n);
  void (*pv)(const float* scores, int64_t n, int64_t rep, int64_t d, const C* v, int64_t stride, int64_t count,
             float* acc);
  float (*exp_sum)(float* x, int64_t n, float top);
  float (*top)(const float* x, int64_t n);
};

template <typename C>
void qk_plain(const float* q, int64_t rep, int64_t d, const C* k, int64_t stride, int64_t count, float* scores,
              int64_t n) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t r = 0; r < rep; ++r) {
      float lanes[8] = {};          // 8 partial sums: a vectorisable reduction without -ffast-math
      int64_t i = 0;
      for (; i + 8 <= d; i += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += q[r * d + i + l] * to_f32(k[j * stride + i + l]);
      float s = 0.f;
      for (; i < d; ++i) s += q[r * d + i] * to_f32(k[j * stride + i]);
      for (int l = 0; l < 8; ++l) s += lanes[l];
      scores[r * n + j] = s;
    }
}

template <typename C>
void pv_plain(const float* scores, int64_t n, int64_t rep, int64_t d, const C* v, int64_t stride, int64_t count,
              float* acc) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t i = 0; i < d; ++i) {
      const float x = to_f32(v[j * stride + i]);
      for (int64_t r = 0; r < rep; ++r) acc[r * d + i] += scores[r * n + j] * x;
    }
}

inline float exp_sum_plain(float* x, int64_t n, float top) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - top));
  return sum;
}

inline float top_plain(const float* x, int64_t n) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

#ifdef VILA_EDGE_AVX2
#define VE_AVX2 __attribute__((target("avx2,fma,f16c")))

VE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
VE_AVX2 inline __m256 load8(const Ort::Float16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

VE_AVX2 inline float hsum(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// One query head: eight rows at a time, eight independent FMA chains, then one transposing reduction to
// 8 scores (a horizontal sum per score costs more than its dot product at D = 64).
template <typename C>
VE_AVX2 void qk_rows8(const float* q, int64_t d, const C* k, int64_t stride, int64_t count, float* scores) {
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    __m256 a[8];
    for (int m = 0; m < 8; ++m) a[m] = _mm256_setzero_ps();
    const C* kj = k + j * stride;
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int m = 0; m < 8; ++m) a[m] = _mm256_fmadd_ps(qv, load8(kj + m * stride + i), a[m]);
    }
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    _mm256_storeu_ps(scores + j, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                               _mm256_permute2f128_ps(u0, u1, 0x31)));
  }
  for (; j < count; ++j) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + j * stride + i), a);
    scores[j] = hsum(a);
  }
}

// One query head: four 8-wide column chunks at once (four independent FMA chains over the rows).
template <typename C>
VE_AVX2 void pv_cols32(const float* scores, int64_t d, const C* v, int64_t stride, int64_t count, float* acc) {
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    __m256 a0 = _mm256_loadu_ps(acc + i), a1 = _mm256_loadu_ps(acc + i + 8);
    __m256 a2 = _mm256_loadu_ps(acc + i + 16), a3 = _mm256_loadu_ps(acc + i + 24);
    for (int64_t j = 0; j < count; ++j) {
      const __m256 p = _mm256_set1_ps(scores[j]);
      const C* vj = v + j * stride + i;
      a0 = _mm256_fmadd_ps(p, load8(vj), a0);
      a1 = _mm256_fmadd_ps(p, load8(vj + 8), a1);
      a2 = _mm256_fmadd_ps(p, load8(vj + 16), a2);
      a3 = _mm256_fmadd_ps(p, load8(vj + 24), a3);
    }
    _mm256_storeu_ps(acc + i, a0), _mm256_storeu_ps(acc + i + 8, a1);
    _mm256_storeu_ps(acc + i + 16, a2), _mm256_storeu_ps(acc + i + 24, a3);
  }
  for (; i < d; i += 8) {
    __m256 a = _mm256_loadu_ps(acc + i);
    for (int64_t j = 0; j < count; ++j) a = _mm256_fmadd_ps(_mm256_set1_ps(scores[j]), load8(v + j * stride + i), a);
    _mm256_storeu_ps(acc + i, a);
  }
}

// GQA: R (2 or 3) query heads at once over the rows of their shared KV head, so each K and V chunk is
// loaded (and, from a float16 pool, converted) once for the R heads instead of R times: at SmolLM2's
// rep 3 the conversions were one per FMA (cache-resident decode 1.08-1.13x, prefill 1.1-1.4x; a decode
// step's pass over the pool is bound by its cache misses: benchmarks/results/gqa-kernel). 4 rows (qk)
// or 4 column chunks (pv) x R heads of accumulators + R query / score registers + 1 loaded chunk
// = 16 ymm registers at R 3.
// Every FMA chain runs in the one-head loops' order: the same bits, except the scores of a block's last
// rows short of a group of 8 (the one-head loop sums each with hsum, these 4 rows at a time).
VE_AVX2 inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

template <typename C, int R>
VE_AVX2 void qk_heads(const float* q, int64_t d, const C* k, int64_t stride, int64_t count, float* scores,
                      int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    __m256 a[R][4];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < 4; ++m) a[r][m] = _mm256_setzero_ps();
    const C* kj = k + j * stride;
    for (int64_t i = 0; i < d; i += 8) {
      __m256 qv[R];
      for (int r = 0; r < R; ++r) qv[r] = _mm256_loadu_ps(q + r * d + i);
      for (int m = 0; m < 4; ++m) {
        const __m256 kv = load8(kj + m * stride + i);
        for (int r = 0; r < R; ++r) a[r][m] = _mm256_fmadd_ps(qv[r], kv, a[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) _mm_storeu_ps(scores + r * n + j, reduce4(a[r][0], a[r][1], a[r][2], a[r][3]));
  }
  for (; j < count; ++j) {
    __m256 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 kv = load8(k + j * stride + i);
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * d + i), kv, a[r]);
    }
    for (int r = 0; r < R; ++r) scores[r * n + j] = hsum(a[r]);
  }
}

template <typename C, int R>
VE_AVX2 void pv_heads(const float* scores, int64_t n, int64_t d, const C* v, int64_t stride, int64_t count,
                      float* acc) {
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    __m256 a[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) a[r][c] = _mm256_loadu_ps(acc + r * d + i + 8 * c);
    for (int64_t j = 0; j < count; ++j) {
      __m256 p[R];
      for (int r = 0; r < R; ++r) p[r] = _mm256_set1_ps(scores[r * n + j]);
      const C* vj = v + j * stride + i;
      for (int c = 0; c < 4; ++c) {
        const __m256 x = load8(vj + 8 * c);
        for (int r = 0; r < R; ++r) a[r][c] = _mm256_fmadd_ps(p[r], x, a[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(acc + r * d + i + 8 * c, a[r][c]);
  }
  for (; i < d; i += 8) {
    __m256 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_loadu_ps(acc + r * d + i);
    for (int64_t j = 0; j < count; ++j) {
      const __m256 x = load8(v + j * stride + i);
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(_mm256_set1_ps(scores[r * n + j]), x, a[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + r * d + i, a[r]);
  }
}

// Heads in groups of 3 (a group of 4 left: 2 + 2), a lone head through the one-head loops.
inline int take_heads(int64_t left) { return left == 4 ? 2 : static_cast<int>(std::min<int64_t>(left, 3)); }

template <typename C>
VE_AVX2 void qk_avx2(const float* q, int64_t rep, int64_t d, const C* k, int64_t stride, int64_t count,
                     float* scores, int64_t n) {
  if (d % 8) return qk_plain(q, rep, d, k, stride, count, scores, n);
  for (int64_t r = 0; r < rep;) {
    const int g = take_heads(rep - r);
    if (g == 3) qk_heads<C, 3>(q + r * d, d, k, stride, count, scores + r * n, n);
    else if (g == 2) qk_heads<C, 2>(q + r * d, d, k, stride, count, scores + r * n, n);
    else qk_rows8(q + r * d, d, k, stride, count, scores + r * n);
    r += g;
  }
}

template <typename C>
VE_AVX2 void pv_avx2(const float* scores, int64_t n, int64_t rep, int64_t d, const C* v, int64_t stride,
                     int64_t count, float* acc) {
  if (d % 8) return pv_plain(scores, n, rep, d, v, stride, count, acc);
  for (int64_t r = 0; r < rep;) {
    const int g = take_heads(rep - r);
    if (g == 3) pv_heads<C, 3>(scores + r * n, n, d, v, stride, count, acc + r * d);
    else if (g == 2) pv_heads<C, 2>(scores + r * n, n, d, v, stride, count, acc + r * d);
    else pv_cols32(scores + r * n, d, v, stride, count, acc + r * d);
    r += g;
  }
}

// exp(x) for x <= 0 (scores minus their max): Cephes' expf (2^k e^r, |r| <= ln2 / 2, degree-5
// polynomial; ~1 ulp, as glibc's expf to float32 precision), inputs below -87.3 clamped (e^-87.3 is
// float's smallest normal: such a weight is lost against the max's 1 either way).
VE_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);       // x - k ln2, ln2 in two parts
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

VE_AVX2 float exp_sum_avx2(float* x, int64_t n, float top) {
  const __m256 t = _mm256_set1_ps(top);
  __m256 s = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), t));
    _mm256_storeu_ps(x + j, e);
    s = _mm256_add_ps(s, e);
  }
  float sum = hsum(s);
  if (j < n) {                        // the tail through the same polynomial: one exp for every lane
    float tail[8] = {};
    std::memcpy(tail, x + j, sizeof(float) * (n - j));
    _mm256_storeu_ps(tail, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), t)));
    for (int64_t l = 0; l < n - j; ++l) sum += (x[j + l] = tail[l]);
  }
  return sum;
}

VE_AVX2 float top_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  float out = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
  for (; j < n; ++j) out = x[j] > out ? x[j] : out;
  return out;
}
#undef VE_AVX2
#endif

template <typename C>
Kernels<C> pick() {
#ifdef VILA_EDGE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return {qk_avx2<C>, pv_avx2<C>, exp_sum_avx2, top_avx2};
#endif
  return {qk_plain<C>, pv_plain<C>, exp_sum_plain, top_plain};
}

// This CPU's kernels for pool rows of C, picked on first use.
template <typename C>
const Kernels<C>& kernels() {
  static const Kernels<C> k = pick<C>();
  return k;
}

}  // namespace vila_edge_kernels
