"""Projector + splice on the GPU: vision features -> rows of the LLM input-embedding buffer.

The same launch sequence as vk_projector_splice in kernels/csrc/projector.cuh:
  merge+LN -> fc1 (+GELU) [-> LN -> fc2 (+GELU)] -> last Linear written at the splice rows.
Weights are uploaded once and scratch is allocated once for up to max_images images, so a
prefill allocates nothing.
"""

import numpy as np

from vila_edge.cuda import reference
from vila_edge.cuda.driver import DeviceArray, Stream
from vila_edge.cuda.kernels import Kernels


class GpuProjector:
    """fp16 projector weights on the device plus scratch for max_images images of side S."""

    def __init__(self, kernels: Kernels, weights: reference.ProjectorWeights, S: int,
                 max_images: int, order: str, stream: Stream):
        weights.validate()
        self.kernels, self.order, self.S, self.max_images = kernels, order, S, max_images
        self.merge, self.C, self.H = weights.merge, weights.channels, weights.hidden
        S2 = reference.merged_side(S, self.merge)
        self.tokens_per_image = S2 * S2
        names = ["ln0_g", "ln0_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b"]
        if self.merge == 3:
            names += ["ln1_g", "ln1_b", "fc3_w", "fc3_b"]
        self.w = {n: DeviceArray.from_numpy(getattr(weights, n).astype(np.float16), stream)
                  for n in names}
        R = max_images * self.tokens_per_image
        fc1_out = self.w["fc1_w"].shape[0]
        self.merged = DeviceArray.alloc((R, self.merge * self.merge * self.C), np.float16)
        self.h1 = DeviceArray.alloc((R, fc1_out), np.float16)
        self.h2 = DeviceArray.alloc((R, self.H), np.float16) if self.merge == 3 else None
        self.offsets = DeviceArray.alloc((max_images,), np.int32)

    def __call__(self, x: DeviceArray, emb: DeviceArray, dst_offsets: np.ndarray,
                 stream: Stream) -> None:
        """x fp16 [N_img, S*S, C]; emb fp16 [T_total, H]; dst_offsets int [N_img] (host):
        image i's S2*S2 projected tokens land in emb rows dst_offsets[i] .. + S2*S2 - 1."""
        n_img = x.shape[0]
        if x.shape != (n_img, self.S * self.S, self.C):
            raise ValueError(f"x: expected shape (N_img, {self.S * self.S}, {self.C}), got {x.shape}")
        if not 1 <= n_img <= self.max_images:
            raise ValueError(f"x: {n_img} images, this projector was sized for 1..{self.max_images}")
        if emb.shape[1:] != (self.H,) or emb.dtype != np.float16:
            raise ValueError(f"emb: expected fp16 [T_total, {self.H}], got {emb.dtype} {emb.shape}")
        offsets = np.asarray(dst_offsets, dtype=np.int32)
        if offsets.shape != (n_img,):
            raise ValueError(f"dst_offsets: expected {n_img} offsets, got shape {offsets.shape}")
        T = self.tokens_per_image
        reference.check_splice(offsets, T, emb.shape[0])
        R = n_img * T
        k, w = self.kernels, self.w
        # Views of the first R rows of the scratch buffers (same pointers, smaller shapes).
        merged = DeviceArray(self.merged.ptr, (R, self.merged.shape[1]), np.float16)
        h1 = DeviceArray(self.h1.ptr, (R, self.h1.shape[1]), np.float16)
        dev_offsets = DeviceArray(self.offsets.ptr, (n_img,), np.int32)
        dev_offsets.upload(offsets, stream)  # waits for the stream: once per prefill, not per step

        k.merge_layernorm(x, w["ln0_g"], w["ln0_b"], merged, self.merge, self.order, stream)
        k.gemm_bias_act(merged, w["fc1_w"], w["fc1_b"], h1, True, stream)
        if self.merge == 2:
            k.gemm_bias_act(h1, w["fc2_w"], w["fc2_b"], emb, False, stream, dev_offsets, T)
            return
        h2 = DeviceArray(self.h2.ptr, (R, self.H), np.float16)
        k.layernorm(h1, w["ln1_g"], w["ln1_b"], h1, stream)  # in place: see layernorm_row
        k.gemm_bias_act(h1, w["fc2_w"], w["fc2_b"], h2, True, stream)
        k.gemm_bias_act(h2, w["fc3_w"], w["fc3_b"], emb, False, stream, dev_offsets, T)

    def close(self) -> None:
        for a in [*self.w.values(), self.merged, self.h1, self.h2, self.offsets]:
            if a is not None:
                a.free()
