"""The vision engine: pixel tiles -> projected features [tiles, tokens, H], with a content cache.

A robot asks about the same view again and again: features are cached by the digest of the
normalised pixels, which is also the key the KV cache uses to reuse the image's prefix blocks.
"""
import hashlib
import threading
from collections import OrderedDict

import numpy as np

from vila_edge.families import S2
from vila_edge.preprocess import PixelSpec, image_tiles
from vila_edge.runner import VisionRunner

TILE_BATCH = 8          # tiles per vision forward pass (bounds activation memory)
CACHE_TILES = 32        # feature cache size, in tiles


class VisionEncoder:
    def __init__(self, runner: VisionRunner, pixels: PixelSpec):
        self.runner, self.pixels = runner, pixels
        self._cache = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, image, single: bool = True) -> tuple:
        """One image (path / PIL / array) -> (features [n_tiles, tokens, H], [digest per tile]).
        `single` (the request's only image) changes nothing here: every image is tiled alike."""
        tiles = image_tiles(image, self.pixels)                                # (n, 3, R, R)
        digests = [hashlib.blake2b(t.tobytes(), digest_size=16).digest() for t in tiles]
        feats = [self._get(d) for d in digests]
        missing = [i for i, f in enumerate(feats) if f is None]
        for lo in range(0, len(missing), TILE_BATCH):
            idx = missing[lo: lo + TILE_BATCH]
            out = self.runner.encode(tiles[idx])
            for i, f in zip(idx, out):
                feats[i] = f
                self._put(digests[i], f)
        return np.stack(feats), digests

    def encode_all(self, images: list, single: bool) -> list:
        """[(features, digests)] per image (each image's tiles are one batch already)."""
        return [self.encode(img, single) for img in images]

    def clear_cache(self) -> None:
        """Forget every cached feature (benchmarks time cold encodes; nothing else needs this)."""
        with self._lock:
            self._cache.clear()

    def _get(self, digest):
        with self._lock:
            feats = self._cache.get(digest)
            if feats is not None:
                self._cache.move_to_end(digest)
            return feats

    def _put(self, digest, feats) -> None:
        with self._lock:
            self._cache[digest] = feats
            while len(self._cache) > CACHE_TILES:
                self._cache.popitem(last=False)


def open_vision(m, runner: VisionRunner):
    """The vision encoder an engine's manifest describes, over its backend's runner: one graph (tower +
    projector), or for multi-scale engines the tower and the projector with the scale merge between
    (vision_s2.py)."""
    v = m.vision
    if not v.multiscale:
        pixels = PixelSpec(v.image_size, tuple(v.mean), tuple(v.std), v.image_mode, v.min_tiles, v.max_tiles)
        return VisionEncoder(runner, pixels)
    from vila_edge.vision_s2 import MultiScaleEncoder
    # S2 squashes (or pads) the image to the largest scale first; dynamic_s2 tiles at scales[0].
    side = v.scales[-1] if v.multiscale == S2 else v.image_size
    pixels = PixelSpec(side, tuple(v.mean), tuple(v.std), v.image_mode, v.min_tiles, v.max_tiles)
    return MultiScaleEncoder(runner, pixels, v, m.dtype)
