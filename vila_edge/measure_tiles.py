"""Multi-scale measures of `vila-edge bench`: vision time per image by tile count (NVILA dynamic_s2, S2).

Each row encodes fresh noise images whose aspect ratio picks a known last-scale grid (dynamic_s2:
3x3, 5x2, 4x3 -> 14, 15, 17 tiles of the tower's size), feature cache cleared before every image,
and splits the time into the tower (one batch per image) and the rest (tiling, scale merge,
projector). The several-images path (one square tile per image) is the 1-tile row.
"""
import time

import numpy as np

from vila_edge.families import DYNAMIC, DYNAMIC_S2
from vila_edge.measure import spread

DYNAMIC_GRIDS = ((3, 3), (5, 2), (4, 3))     # (cols, rows) of the last scale: 9, 10, 12 tiles


def max_tokens_per_image(v) -> int:
    """An upper bound of one image's feature tokens (+ end text), for sizing the bench's context."""
    if v.multiscale == DYNAMIC_S2:
        return v.tokens_per_image * max(v.max_tiles, 1) + 1
    return v.tokens_per_image * (v.max_tiles + 1 if v.image_mode == DYNAMIC else 1)


def _cases(v) -> list:
    """(label, image width, height, single)."""
    side = v.image_size
    if v.multiscale != DYNAMIC_S2:
        return [("whole image", side, side, True)]
    squares = sum((s // v.scales[0]) ** 2 for s in v.scales[:-1])
    rows = [(f"{c}x{r} last scale, {squares + c * r} tiles", c * side, r * side, True) for c, r in DYNAMIC_GRIDS]
    return [("several-images path, 1 tile", side, side, False)] + rows


def bench_vision_by_tiles(pipe, rng, runs: int, warmup: int) -> list:
    enc, out = pipe.vision, []
    for label, w, h, single in _cases(pipe.manifest.vision):
        total, tower, tokens = [], [], 0
        for i in range(runs + warmup):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            enc.clear_cache()
            enc.tower_seconds = 0.0
            t = time.perf_counter()
            feats, _ = enc.encode(img, single=single)
            if i >= warmup:
                total.append(time.perf_counter() - t)
                tower.append(enc.tower_seconds)
            tokens = sum(len(f) for f in feats)
        s = spread(total)
        out.append({"case": label, "tokens": tokens, "runs": s["runs"], "p50_s": s["median_s"], "p90_s": s["p90_s"],
                    "tower_p50_s": spread(tower)["median_s"]})
    return out
