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

# Decoding a huge image on an 8 GB Orin can take the whole process down: refuse above this.
MAX_PIXELS = 64 * 1024 * 1024
MAX_SIDE = 32768


@dataclass(frozen=True)
class PixelSpec:
    size: int           # square input side of the vision tower
    mean: tuple
    std: tuple
    mode: str           # families.RESIZE / PAD / DYNAMIC
    min_tiles: int = 1
    max_tiles: int = 12


def load_image(src) -> Image.Image:
    """A PIL RGB image from a path, a PIL image or an HWC uint8 array, checked for size."""
    if isinstance(src, (str, os.PathLike)):
        img = _open(os.fspath(src))
    elif isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        img = _from_array(src)
    else:
        raise ImageError(f"unsupported image type {type(src).__name__}; pass a path, a PIL image or an HWC uint8 array")
    w, h = img.size
    if w < 1 or h < 1 or w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
        raise ImageError(f"image of {w}x{h} pixels is outside the accepted size (1 to {MAX_PIXELS} pixels, "
                         f"sides up to {MAX_SIDE})")
    return img.convert("RGB")


def _open(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise ImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{path}: {w}x{h} pixels exceeds the limit of {MAX_PIXELS}")
            img.load()
            return img.copy()
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode image ({e})") from e


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"image array must be uint8 HWC, got dtype {a.dtype}")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)):
        return Image.fromarray(a.squeeze(-1) if a.ndim == 3 and a.shape[2] == 1 else a)
    raise ImageError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")


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
    """A list of frames (images/arrays/paths), a directory of images, an animated GIF, or a video
    file (needs the optional `av` package) -> `num_frames` PIL images."""
    if isinstance(src, (list, tuple)):
        frames = list(src)
        return [load_image(frames[i]) for i in frame_indices(len(frames), num_frames)]
    path = os.fspath(src)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
        return load_video([os.path.join(path, n) for n in names], num_frames)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: video not found")
    if path.lower().endswith(".gif"):
        with Image.open(path) as gif:
            total = getattr(gif, "n_frames", 1)
            frames = []
            for i in frame_indices(total, num_frames):
                gif.seek(int(i))
                frames.append(gif.convert("RGB"))
            return frames
    return _decode_video(path, num_frames)


def _decode_video(path: str, num_frames: int) -> list:
    try:
        import av
    except ImportError as e:
        raise ImageError(f"{path}: decoding video files needs PyAV (pip install 'vila-edge[video]'); "
                         f"or pass a list of frames") from e
    try:
        with av.open(path) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
    except av.error.FFmpegError as e:
        raise ImageError(f"{path}: cannot decode video ({e})") from e
    return [frames[i].convert("RGB") for i in frame_indices(len(frames), num_frames)]
