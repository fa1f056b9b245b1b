// vila_edge::SiluMul: the SwiGLU gate of a Llama MLP, silu(gate) * up, from one fused gate|up projection.
//
//   0 gate_up  [.., 2 I] float: each row [gate | up], as one MatMulNBits over the concatenated weights
//                               writes it (vila_edge_export/onnx_llm_fused.py _mlp)
// Output:      [.., I]   gate / (1 + exp(-gate)) * up, in float.
// It replaces Split -> Sigmoid -> Mul -> Mul (ORT fuses the middle two into QuickGelu): three kernel
// launches per layer and the split's two copies, which cost more than the arithmetic of a decode row
// (1536 values at SmolLM2's width). ORT's own SwiGLU contrib op (with `up` omitted it reads the same
// [gate | up] rows) has no CPU kernel in onnxruntime 1.32, nor has MatMulNBitsMlp.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"
#undef ORT_API_MANUAL_INIT

#include <cmath>
#include <vector>

namespace {

// Rows per parallel task of a prefill chunk; a decode step (one row) runs inline: there the thread
// pool's wake-up costs more than the row.
constexpr int64_t kRowsPerTask = 8;

struct Rows {
  const float* in;
  float* out;
  int64_t rows, width;      // width: I
};

void gate_rows(void* data, size_t task) {
  const Rows& r = *static_cast<const Rows*>(data);
  const int64_t lo = static_cast<int64_t>(task) * kRowsPerTask;
  const int64_t hi = lo + kRowsPerTask < r.rows ? lo + kRowsPerTask : r.rows;
  for (int64_t row = lo; row < hi; ++row) {
    const float* g = r.in + row * 2 * r.width;
    const float* u = g + r.width;
    float* y = r.out + row * r.width;
    for (int64_t i = 0; i < r.width; ++i) y[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
}

void silu_mul(OrtKernelContext* context, const Ort::Custom::Tensor<float>& gate_up, Ort::Custom::Tensor<float>& output) {
  std::vector<int64_t> shape = gate_up.Shape();
  if (shape.empty() || shape.back() % 2)
    ORT_CXX_API_THROW("SiluMul: gate_up must be [.., 2 I] (gate then up in each row)", ORT_INVALID_ARGUMENT);
  const int64_t width = shape.back() / 2;
  shape.back() = width;
  Rows r{gate_up.Data(), output.Allocate(shape), width ? gate_up.NumberOfElement() / (2 * width) : 0, width};
  const size_t tasks = static_cast<size_t>((r.rows + kRowsPerTask - 1) / kRowsPerTask);
  if (tasks > 1) {
    Ort::KernelContext(context).ParallelFor(gate_rows, tasks, 0, &r);
  } else if (tasks == 1) {
    gate_rows(&r, 0);
  }
}

}  // namespace

// Called once from RegisterCustomOps (paged_attention.cc): the op, for the domain's lifetime.
Ort::Custom::OrtLiteCustomOp* CreateSiluMulOp() {
  return Ort::Custom::CreateLiteCustomOp("SiluMul", "CPUExecutionProvider", silu_mul);
}
