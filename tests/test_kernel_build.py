"""The CUDA kernels compile for Orin (sm_87) and Hopper (sm_90) without spills, the Python
side agrees with the C header, and the C ABI rejects bad arguments — all without a GPU."""

import ctypes
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from vila_edge.cuda import abi

REPO = Path(__file__).resolve().parents[1]
HEADER = REPO / "kernels" / "csrc" / "vila_kernels.h"
CUDA_INVALID_VALUE = 1  # cudaErrorInvalidValue


def load_build_script():
    spec = importlib.util.spec_from_file_location("kernels_build", REPO / "kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_header_defines_match_python_abi():
    defines = dict(re.findall(r"^#define (VK_\w+) (\d+)\s*$", HEADER.read_text(), re.M))
    assert defines, f"no VK_* defines found in {HEADER}"
    for name, value in defines.items():
        assert getattr(abi, name) == int(value), f"{name}: header {value}, abi.py {getattr(abi, name)}"


def test_ptxas_parser_reads_registers_and_spills():
    log = """ptxas info    : Compiling entry function 'vk_k' for 'sm_87'
ptxas info    : Function properties for vk_k
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4160 bytes smem, 396 bytes cmem[0]
"""
    (rec,) = load_build_script().parse_ptxas(log)
    assert rec == {"kernel": "vk_k", "arch": "sm_87", "registers": 255, "spill_stores": 4,
                   "spill_loads": 12, "stack_bytes": 8, "smem_bytes": 4160}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    build = load_build_script()
    out = tmp_path_factory.mktemp("kernels")
    records = build.build(out, archs=("87", "90"), shared=True)
    print(build.format_table(records))
    return out, records


@pytest.mark.slow
def test_every_kernel_compiles_for_both_archs(built):
    out, records = built
    assert (out / abi.FATBIN_NAME).stat().st_size > 0
    got = {(r["kernel"], r["arch"]) for r in records}
    want = {(k, a) for k in abi.KERNEL_NAMES for a in ("sm_87", "sm_90")}
    assert got == want


@pytest.mark.slow
def test_no_kernel_spills_registers(built):
    # Spills go to local memory, which on Orin is the same LPDDR5 the weights stream from.
    spilling = [r for r in built[1] if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, spilling


class ProjectorWeightsC(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in
                ("ln0_g", "ln0_b", "fc1_w", "fc1_b", "ln1_g", "ln1_b", "fc2_w", "fc2_b",
                 "fc3_w", "fc3_b")]


@pytest.fixture(scope="module")
def lib(built):
    # The launchers validate before touching CUDA, so these calls need no driver.
    lib = ctypes.CDLL(str(built[0] / abi.SHARED_NAME))
    lib.vk_projector_workspace_bytes.restype = ctypes.c_size_t
    return lib


def P(addr=256):
    return ctypes.c_void_p(addr)


@pytest.mark.slow
def test_c_abi_exports_every_launcher(lib):
    for name in ("vk_int4_gemv", "vk_paged_attention_decode", "vk_merge_layernorm",
                 "vk_layernorm", "vk_gemm_bias_act", "vk_projector_splice",
                 "vk_projector_workspace_bytes"):
        assert hasattr(lib, name), name


@pytest.mark.slow
@pytest.mark.parametrize("M,N,K,G,x_addr", [
    (5, 8, 128, 128, 256),   # M beyond the decode batches
    (1, 8, 128, 48, 256),    # unsupported group
    (1, 8, 96, 64, 256),     # K not a multiple of G
    (1, 8, 128, 128, 258),   # x not 16-byte aligned
    (0, 8, 128, 128, 256),
])
def test_int4_gemv_rejects_bad_arguments(lib, M, N, K, G, x_addr):
    assert lib.vk_int4_gemv(P(x_addr), P(), P(), P(), M, N, K, G, None) == CUDA_INVALID_VALUE


@pytest.mark.slow
@pytest.mark.parametrize("Hq,Hkv,D", [(12, 5, 128), (12, 2, 80), (12, 2, 256)])
def test_paged_attention_rejects_bad_arguments(lib, Hq, Hkv, D):
    err = lib.vk_paged_attention_decode(P(), P(), P(), P(), P(), P(), 1, Hq, Hkv, D, 16, 4, None)
    assert err == CUDA_INVALID_VALUE


@pytest.mark.slow
def test_projector_rejects_bad_merge_and_missing_3x3_weights(lib):
    w = ProjectorWeightsC(*([256] * 4 + [None, None] + [256] * 2 + [None, None]))
    args = (P(), w, P(), P(), 1, 32, 8, 3, 0, 16, 121, P(), None)
    assert lib.vk_projector_splice(*args) == CUDA_INVALID_VALUE  # 3x3 without ln1 / fc3
    args = (P(), w, P(), P(), 1, 32, 8, 4, 0, 16, 64, P(), None)
    assert lib.vk_projector_splice(*args) == CUDA_INVALID_VALUE  # merge 4


@pytest.mark.slow
def test_projector_workspace_bytes(lib):
    def a256(n):
        return -(-n // 256) * 256

    # VILA1.5-3B: 196 tokens of 4C=4608, hidden 2560; NVILA-Lite-2B: 121 tokens, 9C, 3C, H=1536.
    assert lib.vk_projector_workspace_bytes(1, 27, 1152, 2, 2560) == \
        a256(196 * 4608 * 2) + a256(196 * 2560 * 2)
    assert lib.vk_projector_workspace_bytes(2, 32, 1152, 3, 1536) == \
        a256(242 * 10368 * 2) + a256(242 * 3456 * 2) + a256(242 * 1536 * 2)
