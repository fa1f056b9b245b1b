"""Image features projected on the device, straight into the LLM's bound input-embedding buffer.

A `DeviceImage` stands in a Tokens span where host feature rows would: the tower features of one
image in device memory and the projector that maps them (vila_edge/cuda/projector.py GpuProjector,
the fused projector + splice kernels of kernels/csrc/projector.cuh). The device runner
(vila_edge/ort_device_runner.py) launches the projector for each such span after uploading the text
rows, writing the image's rows at their offset in the buffer the graph reads: no host round trip of
the features. A span that a prefill chunk cuts (Tokens.slice) is projected whole into scratch and
its rows copied in.

`HostProjector` is the numpy twin of GpuProjector's call (the oracle of vila_edge/cuda/reference.py
over host pointers): with it the same runner code runs on ORT's CPU provider in CI. EXPERIMENTAL on
a GPU: nothing in Pipeline produces DeviceImage spans yet (its vision graph returns projected rows).
"""
import ctypes
from dataclasses import dataclass

import numpy as np

from vila_edge.cuda import reference as ref


@dataclass(frozen=True)
class DeviceImage:
    """Rows lo..hi-1 of the projector's output for tower features `x` (a device array [1, S*S, C])."""
    x: object
    projector: object
    lo: int = 0
    hi: int | None = None

    @property
    def stop(self) -> int:
        return self.projector.tokens_per_image if self.hi is None else self.hi

    @property
    def whole(self) -> bool:
        return self.lo == 0 and self.stop == self.projector.tokens_per_image

    def __len__(self) -> int:
        return self.stop - self.lo

    def __getitem__(self, s: slice) -> "DeviceImage":
        """Tokens.slice cuts spans with rows[a:b]: the same cut of the image's rows."""
        a, b, step = s.indices(len(self))
        if step != 1:
            raise ValueError("a DeviceImage takes contiguous slices only")
        return DeviceImage(self.x, self.projector, self.lo + a, self.lo + max(a, b))


def _view(ptr: int, shape, dtype) -> np.ndarray:
    """A numpy array over host memory at `ptr` (HostMemory regions)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype).reshape(shape)


class HostProjector:
    """GpuProjector's interface on host memory: the numpy oracle with fp16 intermediates, rows
    written at dst_offsets of `emb` (any object with ptr, shape, dtype)."""

    def __init__(self, weights: ref.ProjectorWeights, S: int, order: str):
        weights.validate()
        self.weights, self.S, self.order = weights, S, order
        self.H = weights.hidden
        self.tokens_per_image = ref.merged_side(S, weights.merge) ** 2

    def __call__(self, x, emb, dst_offsets, stream=None) -> None:
        feats = _view(x.ptr, x.shape, x.dtype)
        rows = ref.projector(feats, self.weights, self.order, fp16_intermediates=True).astype(np.float16)
        out = _view(emb.ptr, emb.shape, emb.dtype)
        ref.check_splice(np.asarray(dst_offsets), self.tokens_per_image, len(out))
        for i, o in enumerate(np.asarray(dst_offsets)):
            out[o: o + self.tokens_per_image] = rows[i]
