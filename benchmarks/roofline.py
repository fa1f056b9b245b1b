"""Rooflines for the peer comparison: what this host can do at most, and how close each system comes.

A ratio against a peer only means something next to the ceiling both run under. Here:
  - ceilings, measured on this host with the benchmark's thread count: streaming read bandwidth
    (decode streams the weights), fp32 GEMM (ONNX Runtime's MLAS and torch's), int8 GEMM (MLAS
    u8 x s8) and the int4 GEMV that int4 decode runs (ORT MatMulNBits, accuracy level 4, at the
    engine's group size);
  - work, counted from the checkpoint's shapes: matmul FLOPs of a one-image prompt (vision tower,
    projector, LLM prefill; 2 FLOPs per multiply-add; norms, activations and softmax not counted),
    and the bytes one decode step reads (weights + KV of the context) for vila_edge and llama.cpp.
Achieved = work / measured time. Bounds = work / ceiling.
"""
import numpy as np

from vila_edge_export.onnx_graph import IR_VERSION, OPSET
from benchmarks.common import best_seconds, host_read_gbs
from vila_edge.kv_cache import KVLayout

GEMM_SHAPE = (1024, 2560, 2560)           # M, K, N: a 3B-class prefill matmul
GEMV_SHAPE = (2560, 6912)                 # K, N: a 3B-class MLP projection, one row
GEMV_COPIES = 16                          # distinct weights, 16 x 9 MB: more than the last-level cache


def _session(nodes, inputs, outputs, inits, threads, domains=("",)):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "ceiling", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, OPSET if d == "" else 1) for d in domains])
    model.ir_version = IR_VERSION
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_gemm_ops(threads: int, int8: bool) -> float:
    """ORT MatMul (fp32, GFLOP/s) or MatMulInteger (u8 x s8, GOP/s) on GEMM_SHAPE."""
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = GEMM_SHAPE
    rng = np.random.default_rng(0)
    if int8:
        w, x, op, xt, yt = (rng.integers(-127, 128, (k, n)).astype(np.int8), np.ones((m, k), np.uint8),
                            "MatMulInteger", TensorProto.UINT8, TensorProto.INT32)
    else:
        w, x, op, xt, yt = (rng.standard_normal((k, n), dtype=np.float32), np.ones((m, k), np.float32),
                            "MatMul", TensorProto.FLOAT, TensorProto.FLOAT)
    sess = _session([helper.make_node(op, ["x", "w"], ["y"])], [helper.make_tensor_value_info("x", xt, [m, k])],
                    [helper.make_tensor_value_info("y", yt, [m, n])], [numpy_helper.from_array(w, "w")], threads)
    return 2 * m * k * n / best_seconds(lambda: sess.run(None, {"x": x})) / 1e9


def torch_gemm_gflops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    m, k, n = GEMM_SHAPE
    a, b = torch.ones(m, k), torch.randn(k, n, generator=torch.Generator().manual_seed(0))
    return 2 * m * k * n / best_seconds(lambda: a @ b) / 1e9


def int4_gemv_gbs(threads: int, group: int) -> float:
    """GB/s of int4 weights (codes + fp32 scales) that ORT MatMulNBits (accuracy level 4) streams
    through one-row products, over GEMV_COPIES distinct weights so they come from DRAM."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = GEMV_SHAPE
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i in range(GEMV_COPIES):
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, k // group, group // 2), dtype=np.uint8), f"q{i}"),
                  numpy_helper.from_array(rng.random(n * (k // group), dtype=np.float32) * 0.01, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"q{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=group, accuracy_level=4))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    sess = _session(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], outs, inits, threads,
                    domains=("", "com.microsoft"))
    x = rng.standard_normal((1, k), dtype=np.float32)
    nbytes = GEMV_COPIES * (n * k // 2 + n * (k // group) * 4)
    return nbytes / best_seconds(lambda: sess.run(None, {"x": x}), repeats=10) / 1e9


def ceilings(threads: int, group: int | None) -> dict:
    out = {"threads": threads, "read_gbs": host_read_gbs(threads),
           "ort_fp32_gemm_gflops": ort_gemm_ops(threads, int8=False),
           "ort_int8_gemm_gops": ort_gemm_ops(threads, int8=True),
           "torch_fp32_gemm_gflops": torch_gemm_gflops(threads)}
    if group:
        out["int4_gemv_gbs"], out["int4_group"] = int4_gemv_gbs(threads, group), group
    return out


# ---- work ---------------------------------------------------------------------------------------

def _projector_macs_per_token(kind: str, mm: int, hidden: int) -> int:
    """Multiply-adds per output token of vila_edge_export/projector.py's layers (the same table)."""
    table = {"linear": mm * hidden,
             "mlp2x_gelu": mm * hidden + hidden * hidden,
             "mlp_downsample": 4 * mm * hidden + hidden * hidden,
             "mlp_downsample_2x2_fix": 4 * mm * hidden + hidden * hidden,
             "mlp_downsample_3x3_fix": 9 * mm * 3 * mm + 3 * mm * hidden + hidden * hidden}
    if kind not in table:
        raise ValueError(f"unknown projector type {kind!r}")
    return table[kind]


def vision_flops(spec) -> int:
    """One tile through the tower up to the selected layer, then the projector."""
    v, p = spec.vision, spec.projector
    t = (v.image_size // v.patch) ** 2
    layers = v.select_layer if v.select_layer >= 0 else v.layers + 1 + v.select_layer
    per_layer = t * (4 * v.hidden * v.hidden + 2 * v.hidden * v.intermediate) + 2 * t * t * v.hidden
    patch = t * 3 * v.patch * v.patch * v.hidden
    merged = t // (p.merge * p.merge) if p.merge > 1 else t
    return 2 * (patch + layers * per_layer + merged * _projector_macs_per_token(p.kind, p.in_channels, p.out_channels))


def prefill_flops(llm, tokens: int) -> int:
    """LLM prefill of `tokens` positions, causal attention, the vocab projection on the last one."""
    q, kv = llm.heads * llm.head_dim, llm.kv_heads * llm.head_dim
    linear = llm.hidden * (2 * q + 2 * kv) + 3 * llm.hidden * llm.intermediate   # q, o, k, v; gate, up, down
    attention = 2 * q * tokens * (tokens + 1) // 2                                # QK^T and PV over the causal half
    return 2 * (llm.layers * (tokens * linear + attention) + llm.hidden * llm.vocab_size)


def prompt_flops(spec, prompt_tokens: int) -> int | None:
    """Matmul FLOPs of a one-image prompt; None for tiled image modes (tile count not fixed)."""
    if spec.image_mode not in ("resize", "pad"):
        return None
    return vision_flops(spec) + prefill_flops(spec.llm, prompt_tokens)


def gguf_step_bytes(path: str) -> int:
    """Bytes of a GGUF's tensors one decode step reads: all but the token embedding, which is read
    whole only when it doubles as the output projection (no output.weight)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def kv_bytes_per_token(llm, dtype: str) -> int:
    """KV bytes of one position of `llm` (an LLMSpec) in a cache of `dtype`."""
    return KVLayout(llm.layers, llm.kv_heads, llm.head_dim, 1, dtype).bytes_per_token
