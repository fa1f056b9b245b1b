"""Every CUDA kernel against its numpy oracle (vila_edge/cuda/reference.py), on a GPU.

Shapes of VILA1.5-3B (H=2560, C=1152, S=27, MLP 6912, Hq=Hkv=20, D=128) and NVILA-Lite-2B
(H=1536, C=1152, S=32 3x3, MLP 8960, Hq=12, Hkv=2, D=128), plus odd sizes and edge blocks.
Skips cleanly without cuda-python, a driver, a GPU, or (if the library is not built) nvcc.

Tolerances: inputs are identical fp16 values on both sides and all sums are fp32, so the
differences are the kernels' fp16 output rounding (2^-11 relative) plus fp32 summation order;
the projector oracle also rounds its intermediates to fp16 where the kernels store them.
"""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cuda.bindings.driver", reason="cuda-python is not installed")

from vila_edge.cuda import driver  # noqa: E402

_ok, _why = driver.probe()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

from vila_edge import int4  # noqa: E402
from vila_edge.cuda import abi  # noqa: E402
from vila_edge.cuda import reference as ref  # noqa: E402
from vila_edge.cuda.driver import DeviceArray  # noqa: E402
from vila_edge.cuda.kernels import Kernels, default_fatbin_path  # noqa: E402
from vila_edge.cuda.projector import GpuProjector  # noqa: E402
from vila_edge.families import COLUMN_MAJOR, ROW_MAJOR  # noqa: E402

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


class Gpu:
    def __init__(self):
        self.device = driver.Device(0)
        self.stream = driver.Stream()
        self.kernels = None
        self.live = []

    def put(self, a: np.ndarray) -> DeviceArray:
        d = DeviceArray.from_numpy(np.ascontiguousarray(a), self.stream)
        self.live.append(d)
        return d

    def empty(self, shape, dtype) -> DeviceArray:
        d = DeviceArray.alloc(shape, dtype)
        self.live.append(d)
        return d

    def get(self, d: DeviceArray) -> np.ndarray:
        return d.to_numpy(self.stream)

    def free_all(self):
        while self.live:
            self.live.pop().free()

    def close(self):
        self.free_all()
        if self.kernels is not None:
            self.kernels.close()
        self.stream.close()
        self.device.close()


def built_archs(fatbin: Path) -> list[str]:
    """SM versions in the fatbin, from the resources.json kernels/build.py writes beside it."""
    resources = fatbin.with_name("resources.json")
    if not fatbin.is_file() or not resources.is_file():
        return []
    return json.loads(resources.read_text())["archs"]


def build_for_this_gpu(out: Path, compute_capability) -> Path:
    """A private build when `make kernels` has not run (needs nvcc)."""
    if shutil.which("nvcc") is None:
        pytest.skip(f"{default_fatbin_path()} is not built and nvcc is not on PATH")
    spec = importlib.util.spec_from_file_location("kernels_build", REPO / "kernels" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    major, minor = compute_capability
    build.build(out, archs=(f"{major}{minor}",), shared=False)
    return out / default_fatbin_path().name


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    g = Gpu()
    try:
        fatbin, cc = default_fatbin_path(), g.device.compute_capability
        if f"{cc[0]}{cc[1]}" not in built_archs(fatbin):
            fatbin = build_for_this_gpu(tmp_path_factory.mktemp("kernels"), cc)
        g.kernels = Kernels(fatbin)
        yield g
    finally:
        g.close()


@pytest.fixture(autouse=True)
def _free_after_each_test(gpu):
    yield
    gpu.free_all()


def assert_close(got, want, rtol, atol_frac):
    """|got - want| <= atol_frac * max|want| + rtol * |want|, naming the worst element."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    assert np.isfinite(got).all(), "kernel output has NaN/inf"
    tol = atol_frac * np.abs(want).max() + rtol * np.abs(want)
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert (err <= tol).all(), f"max excess at {worst}: got {got[worst]}, want {want[worst]}"


# ----------------------------------------------------------------------------- int4 GEMV

MODEL_GEMV = [  # (N, K): q/o proj, MLP up, MLP down of each LLM
    (2560, 2560), (6912, 2560), (2560, 6912),  # VILA1.5-3B (Sheared-LLaMA-2.7B)
    (1536, 1536), (8960, 1536), (1536, 8960), (256, 1536),  # NVILA-Lite-2B (Qwen2.5-1.5B), k/v
]
ODD_GEMV = [(1, 128), (3, 64), (37, 320), (4099, 384), (5, 1024 + 32)]  # edge blocks of N and K


def run_gemv(gpu, M, N, K, G, seed=0):
    r = np.random.default_rng(seed)
    w = r.standard_normal((N, K)).astype(np.float32)
    packed, scales = int4.pack_matmulnbits(*int4.quantize(w, G), G)
    x = r.standard_normal((M, K)).astype(np.float16)
    y = gpu.empty((M, N), np.float16)
    gpu.kernels.int4_gemv(gpu.put(x), gpu.put(packed), gpu.put(scales), y, gpu.stream)
    return gpu.get(y), ref.int4_gemv(x, packed, scales)


@pytest.mark.parametrize("N,K", MODEL_GEMV)
@pytest.mark.parametrize("M", [1, 4])
def test_int4_gemv_model_shapes(gpu, M, N, K):
    assert_close(*run_gemv(gpu, M, N, K, 128), rtol=4e-3, atol_frac=2e-3)


@pytest.mark.parametrize("N,K,G", [(N, K, G) for N, K in ODD_GEMV for G in abi.GEMV_GROUPS
                                   if K % G == 0])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_int4_gemv_odd_shapes_and_groups(gpu, M, N, K, G):
    assert_close(*run_gemv(gpu, M, N, K, G, seed=N + K), rtol=4e-3, atol_frac=2e-3)


def test_int4_gemv_rejects_batch_of_five(gpu):
    x = gpu.empty((5, 128), np.float16)
    with pytest.raises(ValueError, match="batch M=5"):
        gpu.kernels.int4_gemv(x, gpu.empty((8, 1, 64), np.uint8), gpu.empty((8, 1), np.float16),
                              gpu.empty((5, 8), np.float16), gpu.stream)


# ----------------------------------------------------------------------------- paged attention


def paged_case(B, Hq, Hkv, D, BS, lens, seed=0):
    """Shuffled distinct blocks per sequence. Every pool slot no sequence owns — spare blocks and
    the rows past the context in each last block — is NaN, so reading one poisons the output."""
    r = np.random.default_rng(seed)
    per_seq = [max(1, -(-L // BS)) for L in lens]
    NB = sum(per_seq) + 5
    ids = r.permutation(NB)
    tables = np.zeros((B, max(per_seq) + 2), np.int32)  # spare table columns stay 0
    k = np.full((NB, BS, Hkv, D), np.nan, np.float16)
    v = np.full((NB, BS, Hkv, D), np.nan, np.float16)
    at = 0
    for b, (n, L) in enumerate(zip(per_seq, lens)):
        tables[b, :n] = ids[at:at + n]
        at += n
        for t in range(L):
            blk, row = tables[b, t // BS], t % BS
            k[blk, row] = r.standard_normal((Hkv, D))
            v[blk, row] = r.standard_normal((Hkv, D))
    q = r.standard_normal((B, Hq, D)).astype(np.float16)
    return q, k, v, tables, np.array(lens, np.int32)


@pytest.mark.parametrize("B,Hq,Hkv,D,BS,lens", [
    (1, 20, 20, 128, 16, [577]),                 # VILA1.5-3B, one image + prompt
    (4, 20, 20, 128, 32, [1, 32, 33, 1000]),     # edge blocks, exact blocks
    (1, 12, 2, 128, 16, [300]),                  # NVILA-Lite-2B GQA
    (3, 12, 2, 128, 32, [7, 64, 129]),
    (2, 9, 3, 64, 16, [15, 17]),                 # SmolLM2-style D=64
    (2, 8, 8, 64, 32, [5, 2049]),
])
def test_paged_attention_decode(gpu, B, Hq, Hkv, D, BS, lens):
    q, k, v, tables, ctx = paged_case(B, Hq, Hkv, D, BS, lens, seed=sum(lens))
    out = gpu.empty((B, Hq, D), np.float16)
    gpu.kernels.paged_attention_decode(gpu.put(q), gpu.put(k), gpu.put(v), gpu.put(tables),
                                       gpu.put(ctx), out, gpu.stream)
    want = ref.paged_attention_decode(q, np.nan_to_num(k), np.nan_to_num(v), tables, ctx)
    assert_close(gpu.get(out), want, rtol=1e-2, atol_frac=3e-3)


def test_paged_attention_empty_context_gives_zeros(gpu):
    q, k, v, tables, _ = paged_case(2, 4, 2, 64, 16, [3, 3])
    ctx = np.array([0, 3], np.int32)
    out = gpu.empty((2, 4, 64), np.float16)
    gpu.kernels.paged_attention_decode(gpu.put(q), gpu.put(k), gpu.put(v), gpu.put(tables),
                                       gpu.put(ctx), out, gpu.stream)
    got = gpu.get(out)
    assert (got[0] == 0).all() and np.isfinite(got[1]).all()


# ----------------------------------------------------------------------------- projector


def random_projector(merge, C, H, seed=0):
    r = np.random.default_rng(seed)
    L, fc1_out = merge * merge * C, (H if merge == 2 else 3 * C)

    def lin(o, i):
        w = (r.standard_normal((o, i), np.float32) / math.sqrt(i)).astype(np.float16)
        return w, (0.1 * r.standard_normal(o)).astype(np.float16)

    def ln(d):
        return ((1 + 0.1 * r.standard_normal(d)).astype(np.float16),
                (0.1 * r.standard_normal(d)).astype(np.float16))

    ln0, fc1 = ln(L), lin(fc1_out, L)
    if merge == 2:
        return ref.ProjectorWeights(2, *ln0, *fc1, *lin(H, H))
    return ref.ProjectorWeights(3, *ln0, *fc1, *lin(H, 3 * C), *ln(3 * C), *lin(H, H))


@pytest.mark.parametrize("merge,S,C,H,order,n_img", [
    (2, 27, 1152, 2560, COLUMN_MAJOR, 2),  # VILA1.5-3B: 27 -> 28, 196 tokens
    (3, 32, 1152, 1536, ROW_MAJOR, 2),     # NVILA-Lite-2B: 32 -> 33, 121 tokens
    (2, 5, 40, 72, ROW_MAJOR, 3),          # odd sizes: partial GEMM tiles everywhere
    (3, 7, 24, 40, COLUMN_MAJOR, 1),
])
def test_projector_splice(gpu, merge, S, C, H, order, n_img):
    r = np.random.default_rng(S)
    w = random_projector(merge, C, H, seed=S)
    T = ref.merged_side(S, merge) ** 2
    x = r.standard_normal((n_img, S * S, C)).astype(np.float16)
    # Text rows around and between the images: they must come back bit-identical.
    offsets = np.array([3 + i * (T + 5) for i in range(n_img)], np.int32)
    emb_host = r.standard_normal((int(offsets[-1]) + T + 4, H)).astype(np.float16)
    emb = gpu.put(emb_host)
    proj = GpuProjector(gpu.kernels, w, S, max_images=n_img, order=order, stream=gpu.stream)
    try:
        proj(gpu.put(x), emb, offsets, gpu.stream)
        got = gpu.get(emb)
    finally:
        proj.close()
    feats = ref.projector(x, w, order, fp16_intermediates=True)  # (N_img, T, H)
    covered = np.zeros(emb_host.shape[0], bool)
    for o in offsets:
        covered[o:o + T] = True
    np.testing.assert_array_equal(got[~covered], emb_host[~covered])
    want = ref.splice(emb_host.astype(np.float32), feats, offsets)
    assert_close(got[covered], want[covered], rtol=1e-2, atol_frac=1e-2)


@pytest.mark.parametrize("merge,S,order", [(2, 27, COLUMN_MAJOR), (2, 27, ROW_MAJOR),
                                           (3, 32, ROW_MAJOR), (3, 8, COLUMN_MAJOR)])
def test_merge_layernorm(gpu, merge, S, order):
    C = 1152 if S >= 27 else 24
    r = np.random.default_rng(S)
    x = r.standard_normal((2, S * S, C)).astype(np.float16)
    L = merge * merge * C
    g = (1 + 0.1 * r.standard_normal(L)).astype(np.float16)
    b = (0.1 * r.standard_normal(L)).astype(np.float16)
    rows = 2 * ref.merged_side(S, merge) ** 2
    out = gpu.empty((rows, L), np.float16)
    gpu.kernels.merge_layernorm(gpu.put(x), gpu.put(g), gpu.put(b), out, merge, order, gpu.stream)
    want = ref.layer_norm(ref.merge_tokens(x, merge, order), g, b).reshape(rows, L)
    assert_close(gpu.get(out), want, rtol=2e-3, atol_frac=1e-3)


def test_projector_rejects_offsets_past_the_buffer(gpu):
    w = random_projector(2, 8, 16)
    proj = GpuProjector(gpu.kernels, w, 4, max_images=1, order=ROW_MAJOR, stream=gpu.stream)
    try:
        with pytest.raises(ValueError, match="outside the embedding buffer"):
            proj(gpu.empty((1, 16, 8), np.float16), gpu.empty((6, 16), np.float16),
                 np.array([3]), gpu.stream)
    finally:
        proj.close()
