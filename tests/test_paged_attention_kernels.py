"""vila_edge::PagedAttention's kernel paths against a float64 numpy oracle: GQA group sizes, head
dims on and off the 8-lane SIMD width, lengths that end mid-block and mid-lane, decode contexts cut
in 2..16 parallel parts, a float16 KV pool under a float32 graph, and the portable (non-AVX2) build
that aarch64 (Jetson) runs.

Tolerances: fp32 pools agree to 2e-5 (float32 accumulation order, and the op's polynomial exp: ~1
ulp, as glibc's expf). A float16 pool under a float32 graph holds K and V rounded to float16, so the
oracle attends over the same rounded rows (numpy's astype(float16), round-to-nearest-even like the
op's conversion): what is left is float32 arithmetic, the same 2e-5. The rounding itself, against
fp32 rows, is bounded separately: |dK| <= 2^-11 |K| moves each score by <= 2^-11 |q||k|, about
1e-3 relative at these magnitudes, so the outputs (convex combinations of V rows, |v| <= ~4) move
by < 1e-2; the test asserts that bound and that it is not zero (the pool really is float16).
"""
import glob
import os
import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from vila_edge import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
META = ["block_tables", "seq_lens", "query_start_loc", "slot_mapping"]


def _session(lib, hq, hkv, kv_dtype, rotary):
    f32 = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
    ins = [f32("qkv")] + [helper.make_tensor_value_info(n, ONNX_TYPE[kv_dtype], None) for n in ("kc", "vc")]
    ins += [helper.make_tensor_value_info(n, TensorProto.INT32, None) for n in META]
    ins += [f32("cos"), f32("sin")] if rotary else []
    node = helper.make_node("PagedAttention", [i.name for i in ins], ["out"], domain=ops.DOMAIN, num_heads=hq,
                            num_kv_heads=hkv, scale=0.0)
    model = helper.make_model(helper.make_graph([node], "paged", ins, [f32("out")]),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(lib)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _case(rng, hq, hkv, d, bs, past, new, kv_dtype, rotary):
    """Feeds for sequences with `past` positions in shuffled pool blocks and `new` tokens, the oracle's
    pools after the write (float64), and attend(kc, vc): the oracle's output over given pools."""
    need = [-(-(p + n) // bs) for p, n in zip(past, new)]
    nb = sum(need) + 3
    blocks = rng.permutation(nb)
    tables, at = np.zeros((len(past), max(need)), np.int32), 0
    for b, k in enumerate(need):
        tables[b, :k], at = blocks[at: at + k], at + k
    slots = np.array([tables[b, p // bs] * bs + p % bs for b in range(len(past))
                      for p in range(past[b], past[b] + new[b])], np.int32)
    seq_lens = (np.array(past) + np.array(new)).astype(np.int32)
    qsl = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    t = len(slots)
    q, k, v = (rng.standard_normal((t, h, d)).astype(np.float32) for h in (hq, hkv, hkv))
    kc, vc = (rng.standard_normal((nb, bs, hkv, d)).astype(kv_dtype) for _ in range(2))
    feeds = {"qkv": np.concatenate([q, k, v], 1).reshape(t, -1), "kc": kc, "vc": vc, "block_tables": tables,
             "seq_lens": seq_lens, "query_start_loc": qsl, "slot_mapping": slots}
    positions = np.concatenate([np.arange(s - n, s) for s, n in zip(seq_lens, new)])
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    if rotary:
        angles = np.arange(int(seq_lens.max()))[:, None] / 100.0 ** (np.arange(d // 2) / (d // 2))
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        feeds.update(cos=cos, sin=sin)
        c, s = cos[positions][:, None].astype(np.float64), sin[positions][:, None].astype(np.float64)
        rot = lambda x: np.concatenate([x[..., : d // 2] * c - x[..., d // 2:] * s,
                                        x[..., d // 2:] * c + x[..., : d // 2] * s], -1)
        q64, k64 = rot(q64), rot(k64)
    kr, vr = kc.astype(np.float64).reshape(-1, hkv, d), vc.astype(np.float64).reshape(-1, hkv, d)
    kr[slots] = k64.astype(kv_dtype)               # new rows rounded to the pool's dtype, then attended
    vr[slots] = v.astype(kv_dtype)

    def attend(kpool, vpool):
        kp, vp = kpool.astype(np.float64).reshape(-1, hkv, d), vpool.astype(np.float64).reshape(-1, hkv, d)
        out = np.zeros((t, hq, d))
        for b in range(len(past)):
            for i in range(new[b]):
                tok, pos = qsl[b] + i, past[b] + i
                rows = tables[b, np.arange(pos + 1) // bs] * bs + np.arange(pos + 1) % bs
                for h in range(hq):
                    sc = kp[rows, h // (hq // hkv)] @ q64[tok, h] / np.sqrt(d)
                    p = np.exp(sc - sc.max())
                    out[tok, h] = p / p.sum() @ vp[rows, h // (hq // hkv)]
        return out.reshape(t, hq * d)
    return feeds, kr.reshape(kc.shape), vr.reshape(vc.shape), attend


def _check(lib, hq, hkv, d, bs, past, new, kv_dtype=np.float32, rotary=True, seed=0):
    feeds, want_kc, want_vc, attend = _case(np.random.default_rng(seed), hq, hkv, d, bs, past, new, kv_dtype, rotary)
    out = _session(lib, hq, hkv, kv_dtype, rotary).run(None, feeds)[0]
    # The pools, written in place: V rows exact; rotated K rows to one step of their dtype (float32
    # vs float64 rotation can round to neighbouring float16 values).
    ulp = 2.0 ** -10 if kv_dtype == np.float16 else 1e-6
    np.testing.assert_allclose(feeds["kc"].astype(np.float64), want_kc, atol=ulp * 4, rtol=ulp)
    np.testing.assert_array_equal(feeds["vc"].astype(np.float64), want_vc)
    # Attention over the pools the op wrote (checked just above), so a K row one float16 step away
    # does not count twice.
    np.testing.assert_allclose(out, attend(feeds["kc"], feeds["vc"]), atol=2e-5, rtol=0)
    return out


CASES = [  # hq, hkv, d, bs, past, new
    (9, 3, 64, 16, [511], [1]),                      # SmolLM2's shape, a decode token: 4 parallel parts
    (9, 3, 64, 16, [2099], [1]),                     # 16 parts (the cap), the last part short
    (8, 1, 64, 16, [300], [1]),                      # one KV head for 8 query heads (MQA), 2 parts
    (4, 4, 80, 16, [131], [1]),                      # MHA at D 80 (VILA1.5-3B): 32 + 32 + 8 lanes
    (6, 2, 20, 5, [37], [1]),                        # D 20 (not 8 lanes: the plain loops), blocks of 5
    (9, 3, 64, 16, [0], [45]),                       # a prefill ending mid-block and mid-lane
    (7, 7, 64, 16, [250, 0, 13, 129], [1, 19, 1, 3]),   # varlen: decodes, a prefill, an extend
    (8, 4, 64, 16, [300], [1]),                      # 2 query heads per KV head: one pass of 2
    (8, 2, 80, 16, [77], [1]),                       # 4 per KV head: two passes of 2, D 80
    (14, 2, 64, 16, [0], [37]),                      # 7 per KV head: 3 + 3 + 1 (the lone-head loops)
]


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("hq, hkv, d, bs, past, new", CASES)
def test_kernels_equal_numpy_oracle(hq, hkv, d, bs, past, new, kv_dtype):
    _check(ops.library_path(), hq, hkv, d, bs, past, new, kv_dtype)


def test_float16_pool_stays_within_its_rounding_bound():
    """The same inputs over a float32 and a float16 pool: outputs differ (the pool is float16), by
    less than the bound of the module docstring."""
    rng_case = dict(hq=9, hkv=3, d=64, bs=16, past=[700], new=[1], kv_dtype=np.float32, rotary=True)
    f32, _, _, _ = _case(np.random.default_rng(3), **rng_case)
    f16 = {k: (v.astype(np.float16) if k in ("kc", "vc") else v) for k, v in f32.items()}
    out32 = _session(ops.library_path(), 9, 3, np.float32, True).run(None, f32)[0]
    out16 = _session(ops.library_path(), 9, 3, np.float16, True).run(None, f16)[0]
    diff = np.abs(out32 - out16).max()
    assert 0 < diff < 1e-2


def _headers() -> str | None:
    for d in (os.environ.get("ORT_INCLUDE_DIR"), os.path.join(ROOT, "build", "ort-headers-1.21.0")):
        if d and os.path.isfile(os.path.join(d, "onnxruntime_c_api.h")):
            return d
    return None


@pytest.fixture(scope="module")
def portable_lib(tmp_path_factory):
    """The op built without its AVX2 kernels: the loops aarch64 and older x86 CPUs run."""
    cxx, headers = shutil.which("g++") or shutil.which("c++"), _headers()
    if not cxx or not headers:
        pytest.skip("needs a C++ compiler and ORT's headers (ORT_INCLUDE_DIR or build/ort-headers-1.21.0)")
    out = str(tmp_path_factory.mktemp("portable") / "portable_ops.so")
    src = os.path.join(ROOT, "vila_edge", "ops", "csrc", "paged_attention.cc")
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-DVILA_EDGE_OPS_NO_AVX2",
                    "-I", headers, src, "-o", out], check=True)
    return out


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6]])
def test_portable_build_equals_numpy_oracle(portable_lib, case, kv_dtype):
    _check(portable_lib, *case, kv_dtype=kv_dtype)


def test_portable_build_swiglu_equals_numpy_oracle(portable_lib):
    """vila_edge::SwiGLU (csrc/swiglu.h, built into the same library) through its portable loop:
    silu(gate) * up against float64, saturated gates included (tests/test_swiglu_op.py: the AVX2 path)."""
    x = (np.random.default_rng(0).standard_normal((3, 2 * 21)) * 6).astype(np.float32)
    x[0, :21] = np.linspace(-200, 200, 21)
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("SwiGLU", ["x"], ["y"], domain=ops.DOMAIN)], "swiglu", [xi],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(portable_lib)
    y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    gate, up = x[:, :21].astype(np.float64), x[:, 21:].astype(np.float64)
    np.testing.assert_allclose(y, gate / (1.0 + np.exp(-gate)) * up, rtol=2e-6, atol=1e-6)
