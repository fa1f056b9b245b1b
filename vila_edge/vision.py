"""The vision engine: pixel tiles -> projected features [tiles, tokens, H], with a content cache.

A robot asks about the same view again and again: features are cached by the digest of the
normalised pixels, which is also the key the KV cache uses to reuse the image's prefix blocks.
"""
import hashlib
import threading
from collections import OrderedDict

import numpy as np

from vila_edge.backend import OrtSession
from vila_edge.preprocess import PixelSpec, image_tiles

TILE_BATCH = 8          # tiles per vision forward pass (bounds activation memory)
CACHE_TILES = 32        # feature cache size, in tiles


class VisionEncoder:
    def __init__(self, session: OrtSession, pixels: PixelSpec, dtype: str):
        self.session, self.pixels, self.dtype = session, pixels, np.dtype(dtype)
        self._cache = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, image) -> tuple:
        """One image (path / PIL / array) -> (features [n_tiles, tokens, H], [digest per tile])."""
        tiles = image_tiles(image, self.pixels)                                # (n, 3, R, R)
        digests = [hashlib.blake2b(t.tobytes(), digest_size=16).digest() for t in tiles]
        feats = [self._get(d) for d in digests]
        missing = [i for i, f in enumerate(feats) if f is None]
        for lo in range(0, len(missing), TILE_BATCH):
            idx = missing[lo: lo + TILE_BATCH]
            out = self.session.run({"pixel_values": tiles[idx].astype(self.dtype)})["image_features"]
            for i, f in zip(idx, out):
                feats[i] = f
                self._put(digests[i], f)
        return np.stack(feats), digests

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
