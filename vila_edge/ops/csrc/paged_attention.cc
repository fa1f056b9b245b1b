// vila_edge::PagedAttention: causal GQA attention of a varlen batch over a paged KV pool (CPU).
//
// The inputs follow vLLM's paged attention metadata (vllm-project/vllm@v0.6.0:vllm/attention/backends/
// abstract.py), so a TensorRT plugin of the same name can serve the same graph on Orin:
//   0 qkv              [.., T, (Hq + 2 Hkv) * D]  T tokens of B sequences, flattened: each row [q | k | v]
//                                         (packed as GroupQueryAttention takes it: one input, no Split)
//   1 key_cache,       [NB, BS, Hkv, D]   one layer's pool blocks; the new K and V rows are written IN
//   2 value_cache                         PLACE at slot_mapping, then attended with the past
//   3 block_tables     [B, max_blocks] int32: sequence b's position p lives in block table[b][p / BS]
//   4 seq_lens         [B] int32: context length of each sequence, its new tokens included
//   5 query_start_loc  [B + 1] int32: tokens of sequence b are qsl[b] .. qsl[b+1]-1
//   6 slot_mapping     [T] int32: pool row (block * BS + row) of each new token
//   7 cos_cache,       [max_positions, D / 2] (optional, both or neither): q and k are rotated here
//   8 sin_cache        (RoPE, halves not interleaved: RotaryEmbedding's interleaved=0) at their
//                      positions; without them q and k arrive rotated
// Output: [.., T, Hq * D]. Query token i of sequence b sits at position
// seq_lens[b] - n_b + i and attends positions 0..that one (causal). Head h reads KV head h / (Hq / Hkv).
// Attributes: num_heads, num_kv_heads, scale (0: 1 / sqrt(D)). Types: float and float16 (accumulated
// in float32, as the softmax of the standard-op graphs is).
//
// Writing an input in place: ORT's CPU provider hands a custom op the caller's buffer (an OrtValue
// bound over the runtime's numpy pool), and nothing else in the graph reads the pools, so the write
// is visible to the runtime after the run and to later layers of no one else.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#if defined(__x86_64__) && !defined(VILA_EDGE_OPS_NO_AVX2)   // the macro: test the portable path here
#include <immintrin.h>
#endif
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(Ort::Float16_t x) { return x.ToFloat(); }
inline void from_f32(float x, float* out) { *out = x; }
inline void from_f32(float x, Ort::Float16_t* out) { *out = Ort::Float16_t(x); }
// float16 graphs round where transformers' fp16 eager attention does (scores, scaled scores, probs),
// so greedy picks match the reference (docs/contracts.md); float graphs keep float32 throughout.
inline float round_as(float x, const float*) { return x; }
inline float round_as(float x, const Ort::Float16_t*) { return Ort::Float16_t(x).ToFloat(); }

// The two inner loops over a run of `count` consecutive positions of one block (rows `stride` floats
// apart), for the `rep` query heads of one KV head:
//   qk: scores[r * n + j] = q[r] . k[j]          pv: acc[r] += sum_j scores[r * n + j] v[j]
// AVX2+FMA when this CPU has them (chosen at run time, so the library stays portable: no -march),
// else plain loops any compiler vectorises at its baseline (SSE2, NEON).
void qk_plain(const float* q, int64_t rep, int64_t d, const float* k, int64_t stride, int64_t count,
              float* scores, int64_t n) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t r = 0; r < rep; ++r) {
      float lanes[8] = {};
      int64_t i = 0;
      for (; i + 8 <= d; i += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += q[r * d + i + l] * k[j * stride + i + l];
      float s = 0.f;
      for (; i < d; ++i) s += q[r * d + i] * k[j * stride + i];
      for (int l = 0; l < 8; ++l) s += lanes[l];
      scores[r * n + j] = s;
    }
}

void pv_plain(const float* scores, int64_t n, int64_t rep, int64_t d, const float* v, int64_t stride,
              int64_t count, float* acc) {
  for (int64_t r = 0; r < rep; ++r)
    for (int64_t j = 0; j < count; ++j)
      for (int64_t i = 0; i < d; ++i) acc[r * d + i] += scores[r * n + j] * v[j * stride + i];
}

#if defined(__x86_64__) && !defined(VILA_EDGE_OPS_NO_AVX2)   // the macro: test the portable path here
__attribute__((target("avx2,fma"))) void qk_avx2(const float* q, int64_t rep, int64_t d, const float* k,
                                                int64_t stride, int64_t count, float* scores, int64_t n) {
  if (d % 8) return qk_plain(q, rep, d, k, stride, count, scores, n);
  for (int64_t j = 0; j < count; ++j, k += stride)
    for (int64_t r = 0; r < rep; ++r) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * d + i), _mm256_loadu_ps(k + i), a);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      scores[r * n + j] = _mm_cvtss_f32(h);
    }
}

__attribute__((target("avx2,fma"))) void pv_avx2(const float* scores, int64_t n, int64_t rep, int64_t d,
                                                const float* v, int64_t stride, int64_t count, float* acc) {
  if (d % 8) return pv_plain(scores, n, rep, d, v, stride, count, acc);
  for (int64_t r = 0; r < rep; ++r)
    for (int64_t i = 0; i < d; i += 8) {
      __m256 a = _mm256_loadu_ps(acc + r * d + i);
      for (int64_t j = 0; j < count; ++j)
        a = _mm256_fmadd_ps(_mm256_set1_ps(scores[r * n + j]), _mm256_loadu_ps(v + j * stride + i), a);
      _mm256_storeu_ps(acc + r * d + i, a);
    }
}
#endif

struct Kernels {
  void (*qk)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t);
  void (*pv)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, float*);
};

Kernels pick_kernels() {
#if defined(__x86_64__) && !defined(VILA_EDGE_OPS_NO_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {qk_avx2, pv_avx2};
#endif
  return {qk_plain, pv_plain};
}

const Kernels kKernels = pick_kernels();

// `count` rows of one head from a pool block as float: the rows in place (float pools, `stride` apart),
// or converted into tmp (float16 pools; then d apart).
inline const float* rows_f32(const float* x, int64_t, int64_t, int64_t, float*, int64_t* stride) { return x; }
inline const float* rows_f32(const Ort::Float16_t* x, int64_t count, int64_t d, int64_t row, float* tmp,
                             int64_t* stride) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t i = 0; i < d; ++i) tmp[j * d + i] = x[j * row + i].ToFloat();
  *stride = d;
  return tmp;
}

template <typename T>
struct Work {
  const float* q;         // [T, Hq, D] float32, rotated and scaled
  const T* kc;
  const T* vc;
  T* out;
  const int32_t* tables;
  const int32_t* seq_lens;
  const int32_t* qsl;
  int64_t batch, max_blocks, block_size, hq, hkv, d;
  int64_t splits;         // parts of the context per (token, KV head), each one work item
  float* partial;         // splits > 1: per item [rep] max, [rep] sum, [rep, D] unnormalised output
  float scale;            // float16: applied to the rounded scores (q arrives unscaled); float: 1 (q prescaled)
};

// One (token, KV head, split) item: the Hq / Hkv query heads that share the KV head (GQA: each K and
// V row is read once for all of them) over the split's blocks of the visible positions: scores,
// softmax, weighted sum of V. One split writes the output; several (a decode token: its few heads
// would leave threads idle) leave (max, sum, output) partials that `merge` combines.
template <typename T>
void attend_one(void* data, size_t index) {
  const Work<T>& w = *static_cast<const Work<T>*>(data);
  const int64_t split = static_cast<int64_t>(index) % w.splits, item = static_cast<int64_t>(index) / w.splits;
  const int64_t t = item / w.hkv, kvh = item % w.hkv;
  int64_t b = 0;
  while (b + 1 < w.batch && w.qsl[b + 1] <= t) ++b;             // B is small: a scan beats a search
  const int64_t n_new = w.qsl[b + 1] - w.qsl[b];
  const int64_t n_all = w.seq_lens[b] - n_new + (t - w.qsl[b]) + 1;   // visible positions 0..n_all-1
  const int64_t rep = w.hq / w.hkv, d = w.d, row = w.hkv * d;     // elements per pool row
  const int32_t* table = w.tables + b * w.max_blocks;
  const int64_t bs = w.block_size, blocks = (n_all + bs - 1) / bs;
  const int64_t lo = blocks * split / w.splits * bs, hi = std::min(n_all, blocks * (split + 1) / w.splits * bs);
  const int64_t n = std::max<int64_t>(hi - lo, 0);
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(rep * (n + d + 2) + bs * d));
  float* acc = buf.data();                 // [rep, D]
  float* scores = acc + rep * d;           // [rep, n]
  float* top = scores + rep * n;           // [rep]: score maxima
  float* total = top + rep;                // [rep]: softmax denominators
  float* tmp = total + rep;                // [BS, D]: a float16 block's rows as float
  const float* qf = w.q + (t * w.hq + kvh * rep) * d;            // heads kvh*rep .. kvh*rep+rep-1
  for (int64_t p0 = lo; p0 < hi; p0 += bs) {                      // block by block: rows `row` apart
    int64_t stride = row;
    const int64_t count = std::min(bs, hi - p0);
    const float* k = rows_f32(w.kc + int64_t(table[p0 / bs]) * bs * row + kvh * d, count, d, row, tmp, &stride);
    kKernels.qk(qf, rep, d, k, stride, count, scores + (p0 - lo), n);
  }
  constexpr bool half = !std::is_same<T, float>::value;
  for (int64_t r = 0; r < rep; ++r) {
    float* sc = scores + r * n;
    if (half)
      for (int64_t p = 0; p < n; ++p) sc[p] = round_as(round_as(sc[p], w.kc) * w.scale, w.kc);
    top[r] = -INFINITY;
    for (int64_t p = 0; p < n; ++p) top[r] = sc[p] > top[r] ? sc[p] : top[r];
    float sum = 0.f;
    for (int64_t p = 0; p < n; ++p) sum += (sc[p] = std::exp(sc[p] - top[r]));
    total[r] = sum;
    if (half) {                 // probabilities rounded, as softmax(..., dtype=float32).to(float16)
      for (int64_t p = 0; p < n; ++p) sc[p] = round_as(sc[p] / sum, w.kc);
      total[r] = 1.f;
    }
  }
  std::memset(acc, 0, sizeof(float) * rep * d);
  for (int64_t p0 = lo; p0 < hi; p0 += bs) {
    int64_t stride = row;
    const int64_t count = std::min(bs, hi - p0);
    const float* v = rows_f32(w.vc + int64_t(table[p0 / bs]) * bs * row + kvh * d, count, d, row, tmp, &stride);
    kKernels.pv(scores + (p0 - lo), n, rep, d, v, stride, count, acc);
  }
  if (w.splits > 1) {
    float* out = w.partial + static_cast<int64_t>(index) * rep * (d + 2);
    std::memcpy(out, top, sizeof(float) * rep);
    std::memcpy(out + rep, total, sizeof(float) * rep);
    std::memcpy(out + 2 * rep, acc, sizeof(float) * rep * d);
    return;
  }
  for (int64_t r = 0; r < rep; ++r) {
    T* o = w.out + (t * w.hq + kvh * rep + r) * d;
    for (int64_t i = 0; i < d; ++i) from_f32(acc[r * d + i] / total[r], o + i);
  }
}

// Splits' partials -> output: each rescaled by exp(its max - the overall max) (flash-decoding).
template <typename T>
void merge(const Work<T>& w, int64_t tokens) {
  const int64_t rep = w.hq / w.hkv, d = w.d, size = rep * (d + 2);
  std::vector<float> acc(static_cast<size_t>(d));
  for (int64_t item = 0; item < tokens * w.hkv; ++item) {
    const float* part = w.partial + item * w.splits * size;
    for (int64_t r = 0; r < rep; ++r) {
      float top = -INFINITY, total = 0.f;
      for (int64_t s = 0; s < w.splits; ++s) top = std::max(top, part[s * size + r]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < w.splits; ++s) {
        const float* p = part + s * size;
        if (p[rep + r] == 0.f) continue;                    // an empty split
        const float scale = std::exp(p[r] - top);
        total += p[rep + r] * scale;
        for (int64_t i = 0; i < d; ++i) acc[i] += p[2 * rep + r * d + i] * scale;
      }
      const int64_t t = item / w.hkv, kvh = item % w.hkv;
      T* o = w.out + (t * w.hq + kvh * rep + r) * d;
      for (int64_t i = 0; i < d; ++i) from_f32(acc[i] / total, o + i);
    }
  }
}

// heads rows of D values from src to float dst, rotated at `pos` when cos is given (x1 c - x2 s, x2 c + x1 s).
template <typename T>
void load_heads(const T* src, int64_t heads, int64_t d, const T* cos, const T* sin, int64_t pos, float mul,
                float* dst) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h, src += d, dst += d) {
    if (!cos) {
      for (int64_t i = 0; i < d; ++i) dst[i] = to_f32(src[i]) * mul;
      continue;
    }
    for (int64_t i = 0; i < half; ++i) {
      const float c = to_f32(cos[pos * half + i]), s = to_f32(sin[pos * half + i]);
      const float x1 = to_f32(src[i]), x2 = to_f32(src[i + half]);
      dst[i] = (x1 * c - x2 * s) * mul;
      dst[i + half] = (x2 * c + x1 * s) * mul;
    }
  }
}

constexpr int64_t kDecodeSplits = 4;    // context parts per KV head of a decode token
constexpr int64_t kSplitFrom = 256;     // context length from which a decode token is split

template <typename T>
struct PagedAttention {
  PagedAttention(const OrtApi* api, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    hq_ = ki.GetAttribute<int64_t>("num_heads");
    hkv_ = ki.GetAttribute<int64_t>("num_kv_heads");
    scale_ = ki.GetAttribute<float>("scale");
    if (hq_ < 1 || hkv_ < 1 || hq_ % hkv_)
      ORT_CXX_API_THROW("PagedAttention: num_heads must be a positive multiple of num_kv_heads", ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<T>& query, const Ort::Custom::Tensor<T>& key_cache, const Ort::Custom::Tensor<T>& value_cache,
               const Ort::Custom::Tensor<int32_t>& block_tables, const Ort::Custom::Tensor<int32_t>& seq_lens,
               const Ort::Custom::Tensor<int32_t>& query_start_loc, const Ort::Custom::Tensor<int32_t>& slot_mapping,
               std::optional<const Ort::Custom::Tensor<T>*> cos_cache,
               std::optional<const Ort::Custom::Tensor<T>*> sin_cache, Ort::Custom::Tensor<T>& output) {
    const auto& cshape = key_cache.Shape();
    if (cshape.size() != 4 || value_cache.Shape() != cshape || cshape[2] != hkv_)
      ORT_CXX_API_THROW("PagedAttention: key_cache and value_cache must both be [NB, BS, num_kv_heads, D]",
                        ORT_INVALID_ARGUMENT);
    const int64_t nb = cshape[0], bs = cshape[1], d = cshape[3], row = hkv_ * d;
    const int64_t tokens = slot_mapping.NumberOfElement(), batch = seq_lens.NumberOfElement();
    if (query.NumberOfElement() != tokens * (hq_ + 2 * hkv_) * d)
      ORT_CXX_API_THROW("PagedAttention: qkv is not [T, (num_heads + 2 num_kv_heads) * D] for slot_mapping's T tokens",
                        ORT_INVALID_ARGUMENT);
    const bool rotary = cos_cache.has_value() && sin_cache.has_value();
    if (cos_cache.has_value() != sin_cache.has_value() ||
        (rotary && ((*cos_cache)->Shape().size() != 2 || (*cos_cache)->Shape()[1] != d / 2 ||
                    (*sin_cache)->Shape() != (*cos_cache)->Shape())))
      ORT_CXX_API_THROW("PagedAttention: cos_cache and sin_cache go together, each [max_positions, D / 2]",
                        ORT_INVALID_ARGUMENT);
    const auto& tshape = block_tables.Shape();
    if (tshape.size() != 2 || tshape[0] != batch || query_start_loc.NumberOfElement() != batch + 1)
      ORT_CXX_API_THROW("PagedAttention: block_tables [B, max_blocks], seq_lens [B], query_start_loc [B+1]",
                        ORT_INVALID_ARGUMENT);
    const int32_t* qsl = query_start_loc.Data();
    const int32_t* lens = seq_lens.Data();
    const int32_t* tables = block_tables.Data();
    const int32_t* slots = slot_mapping.Data();
    if (qsl[0] != 0 || qsl[batch] != tokens)
      ORT_CXX_API_THROW("PagedAttention: query_start_loc must run from 0 to T", ORT_INVALID_ARGUMENT);
    const int64_t max_pos = rotary ? (*cos_cache)->Shape()[0] : INT64_MAX;
    for (int64_t b = 0; b < batch; ++b) {       // every read below stays inside the pool, tables and caches
      const int64_t n = qsl[b + 1] - qsl[b];
      if (n < 0 || lens[b] < n || lens[b] > tshape[1] * bs || lens[b] > max_pos)
        ORT_CXX_API_THROW("PagedAttention: seq_lens must cover each sequence's new tokens and fit its table "
                          "(and the rotary caches)", ORT_INVALID_ARGUMENT);
      for (int64_t i = 0; i < (lens[b] + bs - 1) / bs; ++i)
        if (tables[b * tshape[1] + i] < 0 || tables[b * tshape[1] + i] >= nb)
          ORT_CXX_API_THROW("PagedAttention: block_tables names a block outside the pool", ORT_INVALID_ARGUMENT);
    }
    for (int64_t t = 0; t < tokens; ++t)
      if (slots[t] < 0 || slots[t] >= nb * bs)
        ORT_CXX_API_THROW("PagedAttention: slot_mapping names a row outside the pool", ORT_INVALID_ARGUMENT);

    // New rows: q to float (rotated, scaled), k (rotated) and v into the pool in place (file comment).
    const int64_t qstride = (hq_ + 2 * hkv_) * d, kstride = qstride;
    const T* qsrc = query.Data();
    const T* ksrc = qsrc + hq_ * d;
    const T* vsrc = ksrc + hkv_ * d;
    const T* cos = rotary ? (*cos_cache)->Data() : nullptr;
    const T* sin = rotary ? (*sin_cache)->Data() : nullptr;
    T* kc = const_cast<T*>(key_cache.Data());
    T* vc = const_cast<T*>(value_cache.Data());
    const float scale = scale_ > 0 ? scale_ : 1.f / std::sqrt(float(d));
    constexpr bool half = !std::is_same<T, float>::value;     // float16 normalises per split: never split
    // Per calling thread: one kernel object serves every concurrent Run of the session.
    thread_local std::vector<float> qf_, kf_;
    qf_.resize(static_cast<size_t>(tokens * hq_ * d));
    kf_.resize(static_cast<size_t>(row));
    for (int64_t b = 0, t = 0; b < batch; ++b) {
      for (; t < qsl[b + 1]; ++t) {
        const int64_t pos = lens[b] - (qsl[b + 1] - t);
        load_heads(qsrc + t * qstride, hq_, d, cos, sin, pos, half ? 1.f : scale, qf_.data() + t * hq_ * d);
        T* krow = kc + int64_t(slots[t]) * row;
        if (rotary) {
          load_heads(ksrc + t * kstride, hkv_, d, cos, sin, pos, 1.f, kf_.data());
          for (int64_t i = 0; i < row; ++i) from_f32(kf_[i], krow + i);
        } else {
          std::memcpy(krow, ksrc + t * kstride, sizeof(T) * row);
        }
        std::memcpy(vc + int64_t(slots[t]) * row, vsrc + t * kstride, sizeof(T) * row);
      }
    }
    std::vector<int64_t> oshape = query.Shape();
    oshape.back() = hq_ * d;
    // A lone decode token over a long context: its Hkv heads alone would leave threads idle, so
    // each is split in kDecodeSplits parts of the context. Short contexts run inline: there the
    // thread pool's wake-up costs more than it saves (measured, benchmarks/results/paged-op-*).
    const int64_t splits = !half && tokens == 1 && lens[0] >= kSplitFrom ? kDecodeSplits : 1;
    thread_local std::vector<float> partial;
    partial.resize(static_cast<size_t>(splits > 1 ? tokens * hkv_ * splits * (hq_ / hkv_) * (d + 2) : 0));
    Work<T> w{qf_.data(), kc, vc, output.Allocate(oshape), tables, lens, qsl, batch, tshape[1], bs, hq_, hkv_, d,
              splits, partial.data(), half ? scale : 1.f};
    const size_t total = static_cast<size_t>(tokens * hkv_ * splits);
    Ort::KernelContext ctx(context);
    if (tokens > 1 || splits > 1) {
      ctx.ParallelFor(attend_one<T>, total, 0, &w);
    } else {
      for (size_t i = 0; i < total; ++i) attend_one<T>(&w, i);
    }
    if (splits > 1) merge(w, tokens);
  }

  int64_t hq_, hkv_;
  float scale_;
};

}  // namespace

static const char* kDomain = "vila_edge";

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  // One domain and op set for the process: ORT keeps pointers to them for every session.
  static Ort::CustomOpDomain domain{nullptr};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> ops[2];
  static std::once_flag once;
  try {
    std::call_once(once, [] {
      domain = Ort::CustomOpDomain(kDomain);
      ops[0].reset(Ort::Custom::CreateLiteCustomOp<PagedAttention<float>>("PagedAttention", "CPUExecutionProvider"));
      ops[1].reset(Ort::Custom::CreateLiteCustomOp<PagedAttention<Ort::Float16_t>>("PagedAttention",
                                                                                     "CPUExecutionProvider"));
      domain.Add(ops[0].get());
      domain.Add(ops[1].get());
    });
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
