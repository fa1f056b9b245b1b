"""The device runner's memory primitives on a GPU (vila_edge/device_memory.py CudaMemory) against
their host twin, on the copy patterns the runner issues: block gathers (one 2-D copy per run of
blocks over every layer's K and V), row scatters and single-row copies. Needs cuda-python and a GPU,
not ONNX Runtime (buffers come from cuMemAlloc here), so make device-check runs it."""
import numpy as np
import pytest

pytest.importorskip("cuda.bindings.driver", reason="cuda-python is not installed")

from vila_edge.cuda import driver  # noqa: E402

_ok, _why = driver.probe()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

from vila_edge.device_memory import CudaMemory, HostMemory  # noqa: E402

pytestmark = pytest.mark.gpu

L, NB, BS, H, D = 3, 11, 4, 2, 8          # pool [L, 2, NB, BS, H, D] fp16
BLOCK = BS * H * D * 2
PITCH = NB * BLOCK


@pytest.fixture(scope="module")
def cuda():
    mem = CudaMemory(0)
    yield mem
    mem.stream.close()
    mem.device.close()


def both(cuda, host_pool):
    """The same pool on the host (numpy) and on the device, plus a zeroed staging area on each."""
    dev = driver.DeviceArray.alloc(host_pool.shape, host_pool.dtype)
    cuda.upload(dev.ptr, host_pool)
    stage_h = np.zeros((L, 2, NB, BS, H, D), np.float16)
    stage_d = driver.DeviceArray.alloc(stage_h.shape, np.float16)
    cuda.upload(stage_d.ptr, stage_h)
    return dev, stage_h, stage_d


@pytest.mark.parametrize("runs", [[(0, 5, 2), (2, 1, 1), (3, 8, 3)], [(0, 0, NB)]])
def test_block_gather_matches_host(cuda, runs):
    rng = np.random.default_rng(len(runs))
    pool = rng.standard_normal((L, 2, NB, BS, H, D)).astype(np.float16)
    dev, stage_h, stage_d = both(cuda, pool)
    host = HostMemory()
    try:
        for k, first, count in runs:       # ort_device_runner.DeviceLLMRunner._past's calls
            host.copy2d(stage_h.ctypes.data + k * BLOCK, PITCH, pool.ctypes.data + first * BLOCK, PITCH,
                        count * BLOCK, 2 * L)
            cuda.copy2d(stage_d.ptr + k * BLOCK, PITCH, dev.ptr + first * BLOCK, PITCH, count * BLOCK, 2 * L)
        got = stage_d.to_numpy(cuda.stream)
        np.testing.assert_array_equal(got, stage_h)
        want = np.concatenate([pool[:, :, f:f + c] for _, f, c in runs], axis=2)
        np.testing.assert_array_equal(got[:, :, :want.shape[2]], want)
    finally:
        dev.free(), stage_d.free()


def test_single_row_copy(cuda):
    rows = np.arange(6 * 16, dtype=np.float16).reshape(6, 16)
    dev = driver.DeviceArray.from_numpy(rows, cuda.stream)
    try:
        cuda.copy2d(dev.ptr + 0, 64, dev.ptr + 4 * 32, 64, 64, 1)   # rows 4-5 -> rows 0-1
        got = dev.to_numpy(cuda.stream)
        np.testing.assert_array_equal(got[:2], rows[4:6])
        np.testing.assert_array_equal(got[2:], rows[2:])
    finally:
        dev.free()
