"""Images and video in, normalised pixel tiles out.

As NVlabs/VILA@1c88211:llava/mm_utils.py process_images (resize, pad) and NVlabs/VILA@b760c34:llava/mm_utils.py
dynamic_preprocess (NVILA-Lite tiles).

Pixel math follows transformers' SiglipImageProcessor, which VILA uses: PIL BICUBIC resize,
x * (1/255) in float64 cast to float32, then (x - mean) / std, channels first.
"""
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vila_edge.errors import ImageError
from vila_edge.families import DYNAMIC, PAD

# Memory per request is bounded by the decoded image: every input is at most MAX_PIXELS pixels
# (16.8 MP: 4096x4096, 5472x3078, a 4K camera frame twice over), checked from the file header
# before anything is decoded, so a small file that declares a huge canvas (a decompression bomb:
# a 210 KB PNG of 8192x8192 decodes to 192 MiB of RGB) is refused without allocating it. The RGB
# copy is 48 MiB at the cap and preprocessing keeps a few such copies: a request's image memory
# stays around 200 MiB, which an 8 GB Orin Nano can afford beside a 3B int4 model. Larger JPEGs
# are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (PIL's draft) until they fit: the vision
# tower sees at most a few hundred pixels per side, so nothing it could use is lost.
MAX_PIXELS = 4096 * 4096
MAX_SIDE = 16384           # panoramas: one side may be long, the pixel count still bounds memory
JPEG_SCALES = (2, 4, 8)    # the reductions libjpeg's DCT scaling offers (PIL Image.draft)
# 16-bit and 32-bit integer images are scaled to 8 bits by their range (convert("RGB") clips them:
# a 16-bit grayscale image would come out white); float images are taken as 0..1.
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


@dataclass(frozen=True)
class PixelSpec:
    size: int           # square input side of the vision tower
    mean: tuple
    std: tuple
    mode: str           # families.RESIZE / PAD / DYNAMIC
    min_tiles: int = 1
    max_tiles: int = 12


def load_image(src) -> Image.Image:
    """A PIL RGB image from a path, a PIL image or an HWC uint8/uint16 array, checked for size."""
    if isinstance(src, (str, os.PathLike)):
        img = _open(os.fspath(src))
    elif isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        img = _from_array(src)
    else:
        raise ImageError(f"unsupported image type {type(src).__name__}; pass a path, a PIL image or an HWC uint8 array")
    _check_size(*img.size, "image")
    try:
        return _to_rgb(img)
    except (OSError, ValueError, TypeError) as e:   # PIL: unsupported conversions, truncated data
        raise ImageError(f"image of mode {img.mode} cannot be converted to RGB ({e})") from e


def _check_size(w: int, h: int, what: str) -> None:
    if w < 1 or h < 1 or w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
        raise ImageError(f"{what} of {w}x{h} pixels is outside the accepted size (1 to {MAX_PIXELS} pixels, "
                         f"sides up to {MAX_SIDE}: preprocess.MAX_PIXELS bounds memory per request); "
                         f"downscale it first")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in WIDE_MODES or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if img.mode == "F" else a * (255.0 / WIDE_MODES[img.mode])
        img = Image.fromarray(np.clip(np.nan_to_num(a) + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def _open(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise ImageError(f"{path}: image file not found")
    if not os.access(path, os.R_OK):
        raise ImageError(f"{path}: permission denied; make the file readable by this user")
    try:
        with Image.open(path) as img:
            w, h = img.size   # from the header: nothing is decoded yet
            if img.format == "JPEG" and w * h > MAX_PIXELS:
                scale = next((s for s in JPEG_SCALES if -(-w // s) * -(-h // s) <= MAX_PIXELS), JPEG_SCALES[-1])
                img.draft("RGB", (-(-w // scale), -(-h // scale)))
                w, h = img.size
            _check_size(w, h, path)
            img.load()   # decoded data outlives the file handle: no copy (it would double the peak)
            return img
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode image ({e})") from e


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"image array must be uint8 (or uint16) HWC, got dtype {a.dtype}")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise ImageError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    _check_size(a.shape[1], a.shape[0], "image array")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype == np.uint16:   # 16-bit cameras (depth, thermal, machine vision): scale, never clip
        a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def normalize(img: Image.Image, spec: PixelSpec) -> np.ndarray:
    """[3, size, size] float32."""
    if img.size != (spec.size, spec.size):
        img = img.resize((spec.size, spec.size), Image.BICUBIC)
    x = (np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32)      # (H, W, 3)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return x.transpose(2, 0, 1)                                                    # (3, H, W)


def expand_to_square(img: Image.Image, mean: tuple) -> Image.Image:
    """VILA's expand2square: pad the short side with the mean colour, image centred."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def tile_grid(width: int, height: int, size: int, min_tiles: int, max_tiles: int) -> tuple:
    """(cols, rows) closest to the aspect ratio (VILA/InternVL find_closest_aspect_ratio)."""
    ratios = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles}, key=lambda r: (r[0] * r[1], r))
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for i, j in ratios:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and area > 0.5 * size * size * i * j:
            best = (i, j)
    return best


def dynamic_tiles(img: Image.Image, size: int, min_tiles: int, max_tiles: int) -> list:
    """Row-major size x size crops of the image resized to the chosen grid, plus a thumbnail when
    there is more than one tile (NVILA-Lite `dynamic`, NVlabs/VILA@b760c34:llava/mm_utils.py dynamic_preprocess)."""
    cols, rows = tile_grid(img.width, img.height, size, min_tiles, max_tiles)
    resized = img.resize((size * cols, size * rows), Image.BICUBIC)
    tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
             for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(img.resize((size, size), Image.BICUBIC))
    return tiles


def image_tiles(src, spec: PixelSpec) -> np.ndarray:
    """One image -> [n_tiles, 3, size, size] float32 (n_tiles = 1 unless DYNAMIC)."""
    img = load_image(src)
    if spec.mode == DYNAMIC:
        tiles = dynamic_tiles(img, spec.size, spec.min_tiles, spec.max_tiles)
    else:
        tiles = [expand_to_square(img, spec.mean) if spec.mode == PAD else img]
    return np.stack([normalize(t, spec) for t in tiles])


def frame_indices(total: int, wanted: int) -> np.ndarray:
    """Evenly spaced frame indices, first and last included (VILA's linspace sampling)."""
    if total < 1:
        raise ImageError("video has no frames")
    return np.round(np.linspace(0, total - 1, min(wanted, total))).astype(int)


def load_video(src, num_frames: int) -> list:
    """`num_frames` evenly spaced frames of a video source: see sources.sample_frames (lazy video
    files, folders, GIFs, frame lists and iterators, cameras)."""
    from vila_edge.sources import sample_frames     # sources imports this module
    return sample_frames(src, num_frames)
