"""Multi-scale vision engine: tiles -> vision.onnx (tower, one batch per image) -> merge -> projector.onnx.

Two strategies, picked by the manifest's vision.multiscale (vila_edge/multiscale.py has the math):
- S2 (VILA1.5-3b-s2): the square image at the largest scale, every scale cut into tower-sized tiles,
  maps merged and area-resized to scale 0's map, projector over the whole map: one unit per image.
- DYNAMIC_S2 (NVILA-8B/15B): a request's only image is tiled at every scale (1 + 4 + i*j tiles), maps
  merged and resized to the last scale's (32j x 32i), cut into 32x32 blocks for the projector and
  merged back: one unit of 256*i*j tokens. Several images or frames take the square path of the first
  scale with the tower's channels repeated once per scale (the `block_size is None` branch of
  NVlabs/VILA@b760c34:llava/model/llava_arch.py merge_features_for_dynamic_s2).

Tower features are cached per tile (content digest of the normalised pixels) and projected features
per unit (digest of its tiles), so a repeated view costs neither the tower nor the projector.
"""
import hashlib
import threading
import time
from collections import OrderedDict

import numpy as np

from vila_edge.families import DYNAMIC_S2, S2
from vila_edge.multiscale import (chessboard_merge, chessboard_split, dynamic_s2_tiles, map_to_tokens, merge_scales,
                                  s2_tiles, tokens_to_map)
from vila_edge.preprocess import PixelSpec, image_tiles, load_image, normalize

CACHE_BYTES = 256 * 2**20   # tower tiles + projected units; one NVILA-8B image is ~80 MB of fp32 tiles


class FeatureCache:
    """A thread-safe LRU of arrays, bounded in bytes."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value: np.ndarray) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += value.nbytes - (old.nbytes if old is not None else 0)
            self._items[key] = value
            while self.bytes > self.max_bytes and len(self._items) > 1:
                self.bytes -= self._items.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


def _digest(*parts: bytes) -> bytes:
    return hashlib.blake2b(b"".join(parts), digest_size=16).digest()


class MultiScaleEncoder:
    def __init__(self, runner, pixels: PixelSpec, vision, dtype: str, tile_batch: int | None = None):
        """`runner`: the backend's VisionRunner (encode = the tower, project = the projector); `vision`:
        the manifest's VisionInfo; `tile_batch`: most tiles per tower call (None: a whole image's tiles
        in one call, the fastest on a GPU; bound it where activation memory is tight)."""
        self.runner, self.pixels, self.info = runner, pixels, vision
        self.dtype, self.tile_batch = np.dtype(dtype), tile_batch
        self._cache = FeatureCache()
        self.tower_seconds = 0.0      # time spent in the tower since the caller last reset it (benchmarks)
        self._combine = {S2: self._s2, DYNAMIC_S2: self._dynamic_s2}[vision.multiscale]

    def clear_cache(self) -> None:
        """Forget every cached feature (benchmarks time cold encodes; nothing else needs this)."""
        self._cache.clear()

    def encode(self, image, single: bool = True) -> tuple:
        """One image -> ([features [T, H]], [digest]): one unit per image. `single`: the request's
        only image (dynamic_s2 tiles it; otherwise it takes the plain square path)."""
        feats, digest = self._combine(load_image(image), single)
        return [feats], [digest]

    def encode_all(self, images: list, single: bool) -> list:
        """Several images -> [(features, digests)] per image. On the several-images path of dynamic_s2
        (video frames, multi-image prompts) every image's tile goes through the tower in one batch
        and every uncached projection in one projector call, as VILA stacks them."""
        if single or self.info.multiscale != DYNAMIC_S2:
            return [self.encode(img, single) for img in images]
        tiles = np.stack([normalize(load_image(img), self.pixels) for img in images])      # (n, 3, r, r)
        feats, digests = self.tower_features(tiles)
        keys = [_digest(b"plain", d) for d in digests]
        units = [self._cache.get(b"u" + k) for k in keys]
        todo = [i for i, u in enumerate(units) if u is None]
        if todo:
            plain = np.tile(tokens_to_map(feats[todo]), (1, 1, 1, len(self.info.scales)))  # (m, S, S, C * scales)
            for i, u in zip(todo, self._project(plain)):
                units[i] = u
                self._cache.put(b"u" + keys[i], u)
        return [([u], [k]) for u, k in zip(units, keys)]

    def tower_features(self, tiles: np.ndarray) -> tuple:
        """[N, 3, r, r] normalised tiles -> ([N, S*S, C] tower features, tile digests); cached tiles
        are skipped, the rest run as one batch (or tile_batch-sized chunks)."""
        digests = [_digest(t.tobytes()) for t in tiles]
        feats = [self._cache.get(b"t" + d) for d in digests]
        missing = [i for i, f in enumerate(feats) if f is None]
        step = self.tile_batch or max(len(missing), 1)
        for lo in range(0, len(missing), step):
            idx = missing[lo: lo + step]
            t = time.perf_counter()
            out = self.runner.encode(tiles[idx])
            self.tower_seconds += time.perf_counter() - t
            for i, f in zip(idx, out):
                feats[i] = f
                self._cache.put(b"t" + digests[i], f)
        return np.stack(feats), digests

    def _project(self, blocks: np.ndarray) -> np.ndarray:
        """(n, S, S, C) maps -> (n, T, H) projected tokens."""
        x = map_to_tokens(blocks).astype(self.dtype)
        return self.runner.project(np.ascontiguousarray(x))

    def _cached_unit(self, key: bytes, build) -> tuple:
        feats = self._cache.get(b"u" + key)
        if feats is None:
            feats = build()
            self._cache.put(b"u" + key, feats)
        return feats, key

    def _s2(self, img, single: bool) -> tuple:
        v = self.info
        pixels = image_tiles(img, self.pixels)                               # (1, 3, S_max, S_max)
        tiles, splits = s2_tiles(pixels, v.scales, v.max_split)
        feats, digests = self.tower_features(tiles)
        return self._cached_unit(_digest(b"s2", *digests), lambda: self._merge_s2(feats, splits))

    def _merge_s2(self, feats: np.ndarray, splits: list) -> np.ndarray:
        maps, lo = [], 0
        for n in splits:
            maps.append(chessboard_merge(tokens_to_map(feats[lo: lo + n * n]), n, n))   # (1, n*S, n*S, C)
            lo += n * n
        return self._project(merge_scales(maps, self.info.resize_output_to))[0]         # (T, H)

    def _dynamic_s2(self, img, single: bool) -> tuple:
        v = self.info
        if not single:
            tile = normalize(img, self.pixels)[None]                          # (1, 3, r, r)
            feats, digests = self.tower_features(tile)
            plain = np.tile(tokens_to_map(feats), (1, 1, 1, len(v.scales)))  # (1, S, S, C * scales)
            return self._cached_unit(_digest(b"plain", *digests), lambda: self._project(plain)[0])
        pil_tiles, (rows, cols) = dynamic_s2_tiles(img, v.scales, v.image_size, v.max_tiles)
        feats, digests = self.tower_features(np.stack([normalize(t, self.pixels) for t in pil_tiles]))
        key = _digest(b"dyn", f"{rows}x{cols}".encode(), *digests)     # the grid too: 5x2 and 2x5 differ
        return self._cached_unit(key, lambda: self._merge_dynamic(feats, rows, cols))

    def _merge_dynamic(self, feats: np.ndarray, rows: int, cols: int) -> np.ndarray:
        v = self.info
        maps, lo = [], 0
        for r, c in [(s // v.scales[0],) * 2 for s in v.scales[:-1]] + [(rows, cols)]:
            maps.append(chessboard_merge(tokens_to_map(feats[lo: lo + r * c]), r, c))  # (1, r*S, c*S, C)
            lo += r * c
        merged = merge_scales(maps, v.resize_output_to)                  # (1, H, W, C * scales)
        last = v.resize_output_to == len(v.scales) - 1
        r, c = (rows, cols) if last else (v.scales[v.resize_output_to] // v.scales[0],) * 2
        out = self._project(chessboard_split(merged, r, c))         # (r*c, T, H), blocks row-major
        return map_to_tokens(chessboard_merge(tokens_to_map(out), r, c))[0]   # (T * r * c, H)
