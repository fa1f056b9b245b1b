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
// Attributes: num_heads, num_kv_heads, scale (0: 1 / sqrt(D)). Types (qkv/output, pools): float/float,
// float/float16 (the pool at half the bytes a decode step reads: rows converted as read, new rows
// rounded to float16 as written) and float16/float16; accumulated in float32, as the softmax of the
// standard-op graphs is.
//
// Work items: (token, part of its context), every head inside, so a pool block is read as one run and
// each K and V row once for the query heads sharing it. A decode token alone over a long context is
// cut in parts that run on ORT's intra-op threads and merge as in flash-decoding; batches (several
// tokens) spread over tokens. Inner loops: attention_kernels.h (AVX2/FMA/F16C or portable).
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
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_kernels.h"
#include "swiglu.h"

namespace {

using vila_edge_kernels::Kernels;
using vila_edge_kernels::kernels;
using vila_edge_kernels::to_f32;
inline void from_f32(float x, float* out) { *out = x; }
inline void from_f32(float x, Ort::Float16_t* out) { *out = Ort::Float16_t(x); }
// float16 graphs round where transformers' fp16 eager attention does (scores, scaled scores, probs),
// so greedy picks match the reference (docs/contracts.md); float graphs keep float32 throughout.
inline float round_f16(float x) { return Ort::Float16_t(x).ToFloat(); }

template <typename T, typename C>      // T: the graph's dtype (qkv, output); C: the pool's
struct Work {
  const float* q;         // [T, Hq, D] float32, rotated (and scaled in float graphs)
  const C* kc;
  const C* vc;
  T* out;
  const int32_t* tables;
  const int32_t* seq_lens;
  const int32_t* qsl;
  int64_t batch, max_blocks, block_size, hq, hkv, d;
  int64_t splits;         // parts of the context per token, each one work item
  float* partial;         // splits > 1: per item [Hq] max, [Hq] sum, [Hq, D] unnormalised output
  float scale;            // float16 graphs: applied to the rounded scores (q arrives unscaled); else 1
};

// Hint the next block (all its KV heads: one contiguous run of the pool) into cache while this one
// is computed: blocks are scattered, so the hardware prefetcher cannot guess the jump.
template <typename C>
inline void prefetch_block(const C* p, int64_t elements) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t at = 0; at < elements * int64_t(sizeof(C)); at += 64) __builtin_prefetch(c + at);
}

// One (token, split) item: every query head over the split's blocks of the token's visible positions.
// Block by block, KV head by KV head, so each block is read as one run and each K and V row once for
// the Hq / Hkv query heads that share it (GQA). Then softmax and the weighted sum of V. One split
// writes the output; several (a decode token over a long context: alone it would leave threads idle)
// leave (max, sum, output) partials that `merge` combines.
template <typename T, typename C>
void attend_one(void* data, size_t index) {
  const Work<T, C>& w = *static_cast<const Work<T, C>*>(data);
  const Kernels<C>& kern = kernels<C>();
  constexpr bool half_graph = std::is_same<T, Ort::Float16_t>::value;
  const int64_t split = static_cast<int64_t>(index) % w.splits, t = static_cast<int64_t>(index) / w.splits;
  int64_t b = 0;
  while (b + 1 < w.batch && w.qsl[b + 1] <= t) ++b;             // B is small: a scan beats a search
  const int64_t n_new = w.qsl[b + 1] - w.qsl[b];
  const int64_t n_all = w.seq_lens[b] - n_new + (t - w.qsl[b]) + 1;   // visible positions 0..n_all-1
  const int64_t hq = w.hq, rep = hq / w.hkv, d = w.d, row = w.hkv * d;  // elements per pool row
  const int32_t* table = w.tables + b * w.max_blocks;
  const int64_t bs = w.block_size, blocks = (n_all + bs - 1) / bs;
  const int64_t lo = blocks * split / w.splits * bs, hi = std::min(n_all, blocks * (split + 1) / w.splits * bs);
  const int64_t n = std::max<int64_t>(hi - lo, 0);
  thread_local std::vector<float> buf;        // grows to the longest context once, then reused
  buf.resize(static_cast<size_t>(hq * (n + d + 2)));
  float* acc = buf.data();                 // [Hq, D]
  float* scores = acc + hq * d;            // [Hq, n]
  float* top = scores + hq * n;            // [Hq]: score maxima
  float* total = top + hq;                 // [Hq]: softmax denominators
  const float* qf = w.q + t * hq * d;
  const int64_t block_elems = bs * row;
  for (int64_t p0 = lo; p0 < hi; p0 += bs) {
    const C* k = w.kc + int64_t(table[p0 / bs]) * block_elems;
    if (p0 + bs < hi) prefetch_block(w.kc + int64_t(table[p0 / bs + 1]) * block_elems, std::min(bs, hi - p0 - bs) * row);
    const int64_t count = std::min(bs, hi - p0);
    for (int64_t kvh = 0; kvh < w.hkv; ++kvh)
      kern.qk(qf + kvh * rep * d, rep, d, k + kvh * d, row, count, scores + kvh * rep * n + (p0 - lo), n);
  }
  if (n > 0 && lo < hi)      // V's first block on its way while the softmax runs
    prefetch_block(w.vc + int64_t(table[lo / bs]) * block_elems, std::min(bs, n) * row);
  for (int64_t h = 0; h < hq; ++h) {
    float* sc = scores + h * n;
    if (half_graph) {          // rounded as softmax(q k^T fp16 * scale fp16, dtype=float32).to(float16)
      top[h] = -INFINITY;
      for (int64_t p = 0; p < n; ++p) top[h] = std::max(top[h], sc[p] = round_f16(round_f16(sc[p]) * w.scale));
      float sum = 0.f;
      for (int64_t p = 0; p < n; ++p) sum += (sc[p] = std::exp(sc[p] - top[h]));
      for (int64_t p = 0; p < n; ++p) sc[p] = round_f16(sc[p] / sum);
      total[h] = 1.f;
    } else {
      top[h] = kern.top(sc, n);
      total[h] = kern.exp_sum(sc, n, top[h]);
    }
  }
  std::memset(acc, 0, sizeof(float) * hq * d);
  for (int64_t p0 = lo; p0 < hi; p0 += bs) {
    const C* v = w.vc + int64_t(table[p0 / bs]) * block_elems;
    if (p0 + bs < hi) prefetch_block(w.vc + int64_t(table[p0 / bs + 1]) * block_elems, std::min(bs, hi - p0 - bs) * row);
    const int64_t count = std::min(bs, hi - p0);
    for (int64_t kvh = 0; kvh < w.hkv; ++kvh)
      kern.pv(scores + kvh * rep * n + (p0 - lo), n, rep, d, v + kvh * d, row, count, acc + kvh * rep * d);
  }
  if (w.splits > 1) {
    float* out = w.partial + static_cast<int64_t>(index) * hq * (d + 2);
    std::memcpy(out, top, sizeof(float) * hq);
    std::memcpy(out + hq, total, sizeof(float) * hq);
    std::memcpy(out + 2 * hq, acc, sizeof(float) * hq * d);
    return;
  }
  T* o = w.out + t * hq * d;
  for (int64_t h = 0; h < hq; ++h)
    for (int64_t i = 0; i < d; ++i) from_f32(acc[h * d + i] / total[h], o + h * d + i);
}

// Splits' partials -> output: each rescaled by exp(its max - the overall max) (flash-decoding).
template <typename T, typename C>
void merge(const Work<T, C>& w, int64_t tokens) {
  const int64_t hq = w.hq, d = w.d, size = hq * (d + 2);
  thread_local std::vector<float> acc;
  acc.resize(static_cast<size_t>(d));
  for (int64_t t = 0; t < tokens; ++t) {
    const float* part = w.partial + t * w.splits * size;
    for (int64_t h = 0; h < hq; ++h) {
      float top = -INFINITY, total = 0.f;
      for (int64_t s = 0; s < w.splits; ++s) top = std::max(top, part[s * size + h]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < w.splits; ++s) {
        const float* p = part + s * size;
        if (p[hq + h] == 0.f) continue;                     // an empty split
        const float scale = std::exp(p[h] - top);
        total += p[hq + h] * scale;
        for (int64_t i = 0; i < d; ++i) acc[i] += p[2 * hq + h * d + i] * scale;
      }
      T* o = w.out + (t * hq + h) * d;
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

// A lone decode token's context is cut in parts of >= kSplitLen positions (at most kMaxSplits) run
// in parallel; below 2 parts it runs inline: there the thread pool's wake-up costs more than it
// saves (measured: benchmarks/results/paged-op-*, benchmarks/results/attention/).
constexpr int64_t kSplitLen = 128;
constexpr int64_t kMaxSplits = 16;

template <typename T, typename C>
struct PagedAttention {
  PagedAttention(const OrtApi* api, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    hq_ = ki.GetAttribute<int64_t>("num_heads");
    hkv_ = ki.GetAttribute<int64_t>("num_kv_heads");
    scale_ = ki.GetAttribute<float>("scale");
    if (hq_ < 1 || hkv_ < 1 || hq_ % hkv_)
      ORT_CXX_API_THROW("PagedAttention: num_heads must be a positive multiple of num_kv_heads", ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<T>& query, const Ort::Custom::Tensor<C>& key_cache,
               const Ort::Custom::Tensor<C>& value_cache,
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
    const int64_t qstride = (hq_ + 2 * hkv_) * d;
    const T* qsrc = query.Data();
    const T* ksrc = qsrc + hq_ * d;
    const T* vsrc = ksrc + hkv_ * d;
    const T* cos = rotary ? (*cos_cache)->Data() : nullptr;
    const T* sin = rotary ? (*sin_cache)->Data() : nullptr;
    C* kc = const_cast<C*>(key_cache.Data());
    C* vc = const_cast<C*>(value_cache.Data());
    const float scale = scale_ > 0 ? scale_ : 1.f / std::sqrt(float(d));
    constexpr bool half_graph = std::is_same<T, Ort::Float16_t>::value;   // normalises per split: never split
    // Per calling thread: one kernel object serves every concurrent Run of the session.
    thread_local std::vector<float> qf, kf;
    qf.resize(static_cast<size_t>(tokens * hq_ * d));
    kf.resize(static_cast<size_t>(row));
    for (int64_t b = 0, t = 0; b < batch; ++b) {
      for (; t < qsl[b + 1]; ++t) {
        const int64_t pos = lens[b] - (qsl[b + 1] - t);
        load_heads(qsrc + t * qstride, hq_, d, cos, sin, pos, half_graph ? 1.f : scale, qf.data() + t * hq_ * d);
        load_heads(ksrc + t * qstride, hkv_, d, cos, sin, pos, 1.f, kf.data());   // rounded to C once, below
        C* krow = kc + int64_t(slots[t]) * row;
        C* vrow = vc + int64_t(slots[t]) * row;
        for (int64_t i = 0; i < row; ++i) from_f32(kf[i], krow + i);
        if constexpr (std::is_same<T, C>::value) {
          std::memcpy(vrow, vsrc + t * qstride, sizeof(C) * row);
        } else {
          for (int64_t i = 0; i < row; ++i) from_f32(to_f32(vsrc[t * qstride + i]), vrow + i);
        }
      }
    }
    std::vector<int64_t> oshape = query.Shape();
    oshape.back() = hq_ * d;
    const int64_t splits = !half_graph && tokens == 1 ? std::clamp<int64_t>(lens[0] / kSplitLen, 1, kMaxSplits) : 1;
    thread_local std::vector<float> partial;
    partial.resize(static_cast<size_t>(splits > 1 ? tokens * splits * hq_ * (d + 2) : 0));
    Work<T, C> w{qf.data(), kc, vc, output.Allocate(oshape), tables, lens, qsl, batch, tshape[1], bs, hq_, hkv_, d,
                 splits, partial.data(), half_graph ? scale : 1.f};
    const size_t total = static_cast<size_t>(tokens * splits);
    Ort::KernelContext ctx(context);
    if (total > 1) {
      ctx.ParallelFor(attend_one<T, C>, total, 0, &w);
    } else {
      attend_one<T, C>(&w, 0);
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
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> ops[4];
  static std::once_flag once;
  try {
    std::call_once(once, [] {
      domain = Ort::CustomOpDomain(kDomain);
      using F16 = Ort::Float16_t;     // (graph, pool) dtypes: float/float, float/float16 (half the KV bytes), fp16/fp16
      ops[0].reset(Ort::Custom::CreateLiteCustomOp<PagedAttention<float, float>>("PagedAttention", "CPUExecutionProvider"));
      ops[1].reset(Ort::Custom::CreateLiteCustomOp<PagedAttention<float, F16>>("PagedAttention", "CPUExecutionProvider"));
      ops[2].reset(Ort::Custom::CreateLiteCustomOp<PagedAttention<F16, F16>>("PagedAttention", "CPUExecutionProvider"));
      // float graphs' MLP activation (swiglu.h); float16 graphs keep the standard ops (HF's roundings)
      ops[3].reset(Ort::Custom::CreateLiteCustomOp<vila_edge_swiglu::SwiGLU>("SwiGLU", "CPUExecutionProvider"));
      for (auto& op : ops) domain.Add(op.get());
    });
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
