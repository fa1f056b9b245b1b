"""A thin, checked layer over cuda-python's driver API: device, stream, memory, module, launch.

Every driver call goes through `check`, which raises CudaError naming the call and the CUDA
error. Plain cuMemAlloc only (no managed memory: on Orin the GPU shares DRAM with the CPU and the
KV budget is explicit), explicit non-blocking streams (never the legacy default stream).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cuda.bindings import driver as cu


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the driver's error."""


def check(result, what: str):
    """Unwrap cuda-python's (CUresult, *values) return, raising CudaError on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        name = cu.cuGetErrorName(err)[1]
        text = cu.cuGetErrorString(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(err)
        text = text.decode() if isinstance(text, bytes) else ""
        raise CudaError(f"{what} failed: {name}: {text}")
    return values[0] if len(values) == 1 else tuple(values)


def probe() -> tuple[bool, str]:
    """(True, device name) when a driver and a GPU answer, else (False, why) — never raises."""
    try:
        check(cu.cuInit(0), "cuInit")
        count = check(cu.cuDeviceGetCount(), "cuDeviceGetCount")
        if count < 1:
            return False, "the CUDA driver reports no GPU"
        name = check(cu.cuDeviceGetName(256, check(cu.cuDeviceGet(0), "cuDeviceGet")),
                     "cuDeviceGetName")
        return True, name.split(b"\0", 1)[0].decode()
    except Exception as e:  # no libcuda (DynamicLibNotFoundError), no device, driver too old
        return False, f"no usable CUDA driver: {type(e).__name__}: {e}"


class Device:
    """The primary context of one GPU, made current on this thread."""

    def __init__(self, ordinal: int = 0):
        check(cu.cuInit(0), "cuInit")
        self.handle = check(cu.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
        self.context = check(cu.cuDevicePrimaryCtxRetain(self.handle), "cuDevicePrimaryCtxRetain")
        check(cu.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        raw = check(cu.cuDeviceGetName(256, self.handle), "cuDeviceGetName")
        self.name = raw.split(b"\0", 1)[0].decode()
        attr = cu.CUdevice_attribute
        major = check(cu.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.handle), "cuDeviceGetAttribute")
        minor = check(cu.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.handle), "cuDeviceGetAttribute")
        self.compute_capability = (major, minor)

    def close(self) -> None:
        if self.context is not None:
            check(cu.cuDevicePrimaryCtxRelease(self.handle), "cuDevicePrimaryCtxRelease")
            self.context = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Stream:
    """A non-blocking stream: it never synchronises with the legacy default stream."""

    def __init__(self):
        self.handle = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING.value),
                            "cuStreamCreate")

    def synchronize(self) -> None:
        check(cu.cuStreamSynchronize(self.handle), "cuStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            check(cu.cuStreamDestroy(self.handle), "cuStreamDestroy")
            self.handle = None


@dataclass
class DeviceArray:
    """A contiguous row-major device buffer with a numpy shape and dtype. Free it explicitly."""

    ptr: int
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @classmethod
    def alloc(cls, shape, dtype) -> "DeviceArray":
        shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        nbytes = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1)
        ptr = check(cu.cuMemAlloc(nbytes), f"cuMemAlloc({nbytes} bytes for {shape} {dtype})")
        return cls(int(ptr), shape, dtype)

    @classmethod
    def from_numpy(cls, a: np.ndarray, stream: Stream) -> "DeviceArray":
        out = cls.alloc(a.shape, a.dtype)
        out.upload(a, stream)
        return out

    def upload(self, a: np.ndarray, stream: Stream) -> None:
        """Copy host -> device and wait: the host array may be pageable and freed after."""
        if a.shape != self.shape or a.dtype != self.dtype:
            raise ValueError(f"upload: host {a.shape} {a.dtype} != device {self.shape} {self.dtype}")
        a = np.ascontiguousarray(a)
        check(cu.cuMemcpyHtoDAsync(self.ptr, a.ctypes.data, a.nbytes, stream.handle),
              f"cuMemcpyHtoDAsync({a.nbytes} bytes)")
        stream.synchronize()

    def to_numpy(self, stream: Stream) -> np.ndarray:
        """Wait for the stream's work, then copy device -> host."""
        out = np.empty(self.shape, self.dtype)
        check(cu.cuMemcpyDtoHAsync(out.ctypes.data, self.ptr, out.nbytes, stream.handle),
              f"cuMemcpyDtoHAsync({out.nbytes} bytes)")
        stream.synchronize()
        return out

    def free(self) -> None:
        if self.ptr:
            check(cu.cuMemFree(self.ptr), "cuMemFree")
            self.ptr = 0


class Module:
    """A loaded cubin/fatbin and the named kernels in it."""

    def __init__(self, path: Path, kernel_names):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"kernel binary {path} not found: build it with "
                                    f"`python kernels/build.py` (make kernels)")
        self.image = np.frombuffer(path.read_bytes(), dtype=np.uint8)  # kept alive while loaded
        self.handle = check(cu.cuModuleLoadData(self.image.ctypes.data),
                            f"cuModuleLoadData({path}) (built for this GPU's sm_XY?)")
        self.functions = {}
        for name in kernel_names:
            self.functions[name] = check(cu.cuModuleGetFunction(self.handle, name.encode()),
                                         f"cuModuleGetFunction({name!r} in {path})")

    def close(self) -> None:
        if self.handle is not None:
            check(cu.cuModuleUnload(self.handle), "cuModuleUnload")
            self.handle = None


def launch(function, grid, block, args, stream: Stream, shared_bytes: int = 0,
           name: str = "kernel") -> None:
    """cuLaunchKernel with args given as numpy scalars (np.uint64 for pointers, np.int32,
    np.float32) in the kernel's parameter order. The driver copies the parameter values before
    returning, so the temporaries here may die right after."""
    values = [np.array(a) for a in args]  # 0-d arrays: stable addresses for the param values
    params = np.array([v.ctypes.data for v in values], dtype=np.uint64)
    gx, gy, gz = (tuple(grid) + (1, 1))[:3]
    bx, by, bz = (tuple(block) + (1, 1))[:3]
    check(cu.cuLaunchKernel(function, gx, gy, gz, bx, by, bz, shared_bytes, stream.handle,
                            params.ctypes.data, 0),
          f"cuLaunchKernel({name}, grid={(gx, gy, gz)}, block={(bx, by, bz)})")


class Timer:
    """CUDA events around work on a stream; elapsed milliseconds as measured by the GPU."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.start = check(cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DEFAULT.value), "cuEventCreate")
        self.stop = check(cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DEFAULT.value), "cuEventCreate")

    def __enter__(self):
        check(cu.cuEventRecord(self.start, self.stream.handle), "cuEventRecord")
        return self

    def __exit__(self, *exc):
        check(cu.cuEventRecord(self.stop, self.stream.handle), "cuEventRecord")

    def elapsed_ms(self) -> float:
        check(cu.cuEventSynchronize(self.stop), "cuEventSynchronize")
        return float(check(cu.cuEventElapsedTime(self.start, self.stop), "cuEventElapsedTime"))

    def close(self) -> None:
        check(cu.cuEventDestroy(self.start), "cuEventDestroy")
        check(cu.cuEventDestroy(self.stop), "cuEventDestroy")
