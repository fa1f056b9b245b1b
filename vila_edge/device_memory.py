"""The three memory primitives the device runner needs, for host memory and for a CUDA device.

The runner (vila_edge/ort_device_runner.py) addresses its buffers by pointer and byte offset and
binds them to ONNX Runtime with IOBinding; only these primitives differ between devices, so the
CPU implementation runs the same runner code CI can test:

    alloc(shape, dtype) -> Region     a buffer owned by an ORT OrtValue (the device's allocator)
    upload(dst, host)                 host array -> device bytes at pointer dst
    copy2d(dst, dpitch, src, spitch, width, height)
                                      `height` rows of `width` bytes, rows `pitch` bytes apart: one
                                      call moves a block of every layer's K and V (pool [L, 2, NB, ...])
"""
import ctypes
from dataclasses import dataclass

import numpy as np


@dataclass
class Region:
    """A contiguous buffer: its address, numpy shape and dtype, and the object that owns it."""
    ptr: int
    shape: tuple
    dtype: np.dtype
    owner: object

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class HostMemory:
    """ORT's CPU provider: numpy buffers (wrapped as OrtValues, no copy), memmove copies."""
    device_type, device_id = "cpu", 0

    def alloc(self, shape, dtype) -> Region:
        import onnxruntime as ort
        a = np.empty(shape, dtype)
        a.fill(0)                              # touch every page now (np.zeros would map them lazily)
        return Region(a.ctypes.data, tuple(shape), np.dtype(dtype), ort.OrtValue.ortvalue_from_numpy(a))

    def upload(self, dst: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        ctypes.memmove(dst, host.ctypes.data, host.nbytes)

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)

    def make_current(self) -> None:
        """Nothing to bind on the host."""


class CudaMemory:
    """One GPU: OrtValues from ORT's CUDA allocator, async copies on the stream ORT's session runs on
    (user_compute_stream), so copies, kernels and graph runs are ordered without a synchronise."""
    device_type = "cuda"

    def __init__(self, device_id: int = 0):
        from vila_edge.cuda.driver import Device, Stream
        self.device_id = device_id
        self.device = Device(device_id)          # the primary context: the one ORT's CUDA EP uses
        self.stream = Stream()

    def alloc(self, shape, dtype) -> Region:
        import onnxruntime as ort
        v = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), "cuda", self.device_id)
        return Region(v.data_ptr(), tuple(shape), np.dtype(dtype), v)

    def upload(self, dst: int, host: np.ndarray) -> None:
        from cuda.bindings import driver as cu

        from vila_edge.cuda.driver import check
        host = np.ascontiguousarray(host)
        # From pageable memory the driver stages the bytes before returning: `host` may die after.
        check(cu.cuMemcpyHtoDAsync(dst, host.ctypes.data, host.nbytes, self.stream.handle),
              f"cuMemcpyHtoDAsync({host.nbytes} bytes)")

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        from cuda.bindings import driver as cu

        from vila_edge.cuda.driver import check
        if height == 1:
            check(cu.cuMemcpyDtoDAsync(dst, src, width, self.stream.handle), f"cuMemcpyDtoDAsync({width} bytes)")
            return
        # Pitches are per-(layer, K|V) slabs of the pool: below the driver's 2 GiB pitch limit for
        # pools up to 2 GiB per layer.
        p = cu.CUDA_MEMCPY2D()
        p.srcMemoryType = p.dstMemoryType = cu.CUmemorytype.CU_MEMORYTYPE_DEVICE
        p.srcDevice, p.srcPitch, p.dstDevice, p.dstPitch = src, spitch, dst, dpitch
        p.WidthInBytes, p.Height = width, height
        check(cu.cuMemcpy2DAsync(p, self.stream.handle), f"cuMemcpy2DAsync({height} x {width} bytes)")

    def make_current(self) -> None:
        """Driver calls need the context current on the calling thread (server worker threads)."""
        from cuda.bindings import driver as cu

        from vila_edge.cuda.driver import check
        check(cu.cuCtxSetCurrent(self.device.context), "cuCtxSetCurrent")
