"""Multi-scale vision in numpy: the tile plans and feature-map merges between tower and projector.

S2 (VILA1.5-3b-s2) follows bfshi/scaling_on_scales@9c008a3:s2wrapper/{core,utils}.py (the same
semantics as the April 2024 code VILA1.5 was trained with, @1629fa5); dynamic S2 (NVILA-8B/15B)
follows NVlabs/VILA@b760c34:llava/model/llava_arch.py (merge_features_for_dynamic_s2,
encode_images) and llava/mm_utils.py (dynamic_s2_preprocess). Shape legend: B batch, C channels,
H/W map sides, R rows of tiles, K columns of tiles; feature maps are channels-last (B, H, W, C).
"""
import math

import numpy as np
from PIL import Image

from vila_edge.preprocess import tile_grid

BICUBIC_A = -0.75    # torch's upsample_bicubic2d coefficient (align_corners=False, no antialias)


def chessboard_merge(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(R*K*B, h, w, C) -> (B, R*h, K*w, C); tile (i, j) of image b is x[(i*K + j)*B + b].
    Maps are channels-last throughout: every copy moves whole rows of w*C floats."""
    n, h, w, c = x.shape
    b = n // (rows * cols)
    x = x.reshape(rows, cols, b, h, w, c)                     # (i, j, B, h, w, C)
    return x.transpose(2, 0, 3, 1, 4, 5).reshape(b, rows * h, cols * w, c)


def chessboard_split(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(B, R*h, K*w, C) -> (R*K*B, h, w, C), the inverse of chessboard_merge."""
    b, hh, ww, c = x.shape
    h, w = hh // rows, ww // cols
    x = x.reshape(b, rows, h, cols, w, c).transpose(1, 3, 0, 2, 4, 5)   # (i, j, B, h, w, C)
    return x.reshape(rows * cols * b, h, w, c)


def tokens_to_map(x: np.ndarray) -> np.ndarray:
    """(B, S*S, C) -> (B, S, S, C): einops 'b (h w) c -> b c h w' with h = w = sqrt(tokens), channels last."""
    b, t, c = x.shape
    s = math.isqrt(t)
    return x.reshape(b, s, s, c)


def map_to_tokens(x: np.ndarray) -> np.ndarray:
    """(B, H, W, C) -> (B, H*W, C), rows first."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


def _area_taps(n_in: int, n_out: int) -> tuple:
    """F.interpolate(mode="area") = adaptive_avg_pool: output o averages inputs lo..hi-1 with
    lo = floor(o * in / out), hi = ceil((o + 1) * in / out). -> (index [out, k], weight [out, k]),
    unused taps weighted 0: a gather per tap is 3-4x faster than a dense matmul on a 96x128x1152 map."""
    o = np.arange(n_out)
    lo, hi = (o * n_in) // n_out, -(-((o + 1) * n_in) // n_out)
    idx = lo[:, None] + np.arange(int((hi - lo).max()))
    w = np.where(idx < hi[:, None], 1.0 / (hi - lo)[:, None], 0.0).astype(np.float32)
    return np.minimum(idx, n_in - 1), w


def area_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, H, W, C) -> (B, height, width, C) in float32, as VILA's `.to(torch.float32)` interpolate."""
    x = x.astype(np.float32, copy=False)
    if x.shape[1:3] == (height, width):
        return x
    ih, wh = _area_taps(x.shape[1], height)
    x = sum(wh[:, k, None, None] * x[:, ih[:, k]] for k in range(ih.shape[1]))      # (B, height, W, C)
    iw, ww = _area_taps(x.shape[2], width)
    return sum(ww[:, k, None] * x[:, :, iw[:, k]] for k in range(iw.shape[1]))       # (B, height, width, C)


def _cubic(t: float) -> np.ndarray:
    """The 4 weights of torch's cubic convolution for fractional offset t (taps idx-1 .. idx+2)."""
    a = BICUBIC_A
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1            # |d| <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a         # 1 < |d| < 2
    return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Rows of torch's bicubic (align_corners=False): source x = (o + 0.5) * in / out - 0.5 in
    float32 as torch computes it, taps clamped to the border (upsample_get_value_bounded)."""
    m = np.zeros((n_out, n_in), np.float64)
    scale, f32 = np.float32(n_in / n_out), np.float32
    for o in range(n_out):
        real = f32(scale * f32(o + 0.5) - f32(0.5))
        idx = math.floor(real)
        for k, wgt in enumerate(_cubic(float(f32(real - idx)))):
            m[o, min(max(idx - 1 + k, 0), n_in - 1)] += wgt
    return m.astype(np.float32)


def bicubic_resize(x: np.ndarray, size: int) -> np.ndarray:
    """(B, C, H, W) float32 -> (B, C, size, size): s2wrapper's F.interpolate(mode="bicubic")."""
    if x.shape[2:] == (size, size):
        return x        # t = 0 everywhere: the taps are (0, 1, 0, 0), an exact copy
    return _bicubic_matrix(x.shape[2], size) @ x @ _bicubic_matrix(x.shape[3], size).T


def s2_tiles(pixels: np.ndarray, scales: list, max_split: int) -> tuple:
    """s2wrapper inputs: [1, 3, S, S] normalised pixels at the largest scale -> (tiles [N, 3, r, r],
    splits per scale). Scale s is resized (bicubic) to s and cut into ceil(s / max_split)^2 tiles."""
    splits = [-(-s // max_split) for s in scales]
    tiles = [chessboard_split(bicubic_resize(pixels, s).transpose(0, 2, 3, 1), n, n)   # (n*n, r, r, 3)
             .transpose(0, 3, 1, 2) for s, n in zip(scales, splits)]                  # (n*n, 3, r, r)
    return np.ascontiguousarray(np.concatenate(tiles)), splits


def dynamic_s2_tiles(img: Image.Image, scales: list, size: int, max_tiles: int) -> tuple:
    """dynamic_s2_preprocess: (PIL tiles of `size` px, (rows, cols) of the last scale). Every scale but
    the last is a square grid of (s / scales[0])^2 tiles; the last takes the grid of 9 <= i*j <=
    max_tiles tiles (min = (last / first)^2) closest to the image's aspect ratio. Row-major crops
    of the image resized with PIL's default filter (BICUBIC for RGB)."""
    grids = [(s // scales[0], s // scales[0]) for s in scales[:-1]]
    cols, rows = tile_grid(img.width, img.height, size, (scales[-1] // scales[0]) ** 2, max_tiles)
    tiles = []
    for r, c in grids + [(rows, cols)]:
        resized = img.resize((size * c, size * r), Image.BICUBIC)
        tiles += [resized.crop((x * size, y * size, (x + 1) * size, (y + 1) * size))
                  for y in range(r) for x in range(c)]
    return tiles, (rows, cols)


def merge_scales(maps: list, out_index: int) -> np.ndarray:
    """Per-scale maps [(1, H_k, W_k, C)] -> (1, H, W, C * scales): each area-resized to map out_index,
    concatenated on channels in scale order."""
    h, w = maps[out_index].shape[1:3]
    return np.concatenate([area_resize(m, h, w) for m in maps], axis=-1)
