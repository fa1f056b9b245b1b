"""NVILA dynamic_s2 and VILA1.5-3b-s2 against the torch reference transcribed from upstream
(vila_edge_export/reference_s2.py), hand-computed token counts, the scale-merge math against torch, the
vision cache, and the checkpoint reader's refusals.

Tolerances: features within 1e-5 of the reference's largest magnitude (fp32; ORT and torch sum in
different orders, the observed error is ~1e-6); greedy tokens exactly equal.
"""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vila_edge_export.checkpoint import read_checkpoint
from vila_edge_export.reference import ReferenceVLM
from vila_edge_export.reference_s2 import image_features
from vila_edge import Pipeline
from vila_edge.errors import CheckpointError
from vila_edge.multiscale import area_resize, bicubic_resize, chessboard_merge, chessboard_split
from vila_edge.splice import IMAGE_POSITION

MAX_NEW = 12
TOKENS_PER_BLOCK = 16      # tiny-448: 112 px / 14 = 8x8 patches, 2x2 merge -> 4x4 (256 at 448 px / 32x32)


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def refs(checkpoint):
    made = {}

    def get(name):
        if name not in made:
            spec = read_checkpoint(checkpoint(name))
            made[name] = (spec, ReferenceVLM(spec, torch.float32))
        return made[name]
    return get


CASES = {
    "nvila-wide": ("nvila-s2", [(300, 100)], None),
    "nvila-tall": ("nvila-s2", [(80, 200)], None),        # 2 x 5: 16 -> 40 rows is a 2.5x area resize
    "nvila-several": ("nvila-s2", [(150, 120), (64, 200)], None),
    "nvila-video": ("nvila-s2", [], [(120, 90)] * 3),
    "vila1.5-s2": ("vila1.5-3b-s2", [(160, 90)], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_features_equal_reference(case, refs, engine):
    name, sizes, video = CASES[case]
    spec, ref = refs(name)
    pipe = Pipeline(engine(name))
    images = [_noise(w, h, i) for i, (w, h) in enumerate(sizes)]
    frames = [_noise(w, h, 10 + i) for i, (w, h) in enumerate(video or [])]
    prompt = "<image>\n" * len(images) + "What changed?" if images else "What happens?"
    conv = pipe.conversation()
    conv.send(images or None, prompt, video=frames or None, max_new_tokens=MAX_NEW)
    # The reference: video frames are images placed first (NVlabs/VILA@b760c34:llava/utils/media.py
    # extract_media writes "<image>" per frame), each image through VILA's own vision code.
    media = frames + images
    expected_feats = image_features(ref, spec, media)
    assert len(conv.tiles) == len(media)
    scale = max(float(f.abs().max()) for f in expected_feats)
    for ours, theirs in zip(conv.tiles, expected_feats):
        assert ours.shape == tuple(theirs.shape)
        assert np.abs(ours - theirs.numpy()).max() <= 1e-5 * scale
    rendered = pipe.template.render([("user", pipe.family.part_text * len(frames) + prompt)])
    embeds = ref.embed(ref.tokenize(rendered), expected_feats)
    stops = set(pipe.manifest.tokens.stop_ids)
    expected = [i for i in ref.generate(embeds, MAX_NEW, stops) if i not in stops]
    assert conv.last_stats["prompt_tokens"] == embeds.shape[1]
    assert conv.last_ids == expected and expected
    conv.close()


@pytest.mark.parametrize("w,h,grid", [
    (112, 112, (3, 3)),      # 1:1 -> 3x3 = 9, the minimum ((336 / 112)^2)
    (300, 100, (6, 2)),      # 3:1 exactly -> 6 cols x 2 rows
    (100, 300, (2, 6)),      # 1:3
    (200, 100, (5, 2)),      # 2:1: 5x2 (2.5) beats 4x3 (1.33); 4x2 = 8 is under the minimum
    (400, 300, (4, 3)),      # 4:3 -> 12
    (1000, 100, (10, 1)),    # 10:1 -> 10 x 1
])
def test_nvila_single_image_token_count(engine, w, h, grid):
    """256 * i * j + 1 at NVILA-8B shapes (vila-formats.md §5.4); 16 * i * j + 1 at the tiny shape."""
    pipe = Pipeline(engine("nvila-s2"))
    feats, digests = pipe.vision.encode(_noise(w, h, 1), single=True)
    tokens = TOKENS_PER_BLOCK * grid[0] * grid[1]
    assert [f.shape[0] for f in feats] == [tokens]
    sp = pipe.splicer.splice(pipe.splicer.expand("<image>What?", [1]), digests, [tokens])
    newline = pipe.tokenizer.encode("\n").ids
    assert len(newline) == 1 and (sp.ids == IMAGE_POSITION).sum() == tokens
    start = sp.spans[0][0]
    assert sp.ids[start + tokens: start + tokens + 1].tolist() == newline


@pytest.mark.parametrize("w,h,grid", [
    (1920, 1080, (4, 3)),    # 16:9 = 1.78: 4x3 (1.33, off by 0.44) beats 5x2 (2.5, off by 0.72)
    (1080, 1920, (2, 5)),    # 0.5625: 2x5 (0.4, off by 0.16) beats 3x4 (0.75, off by 0.19)
    (640, 480, (4, 3)),      # 4:3 exactly
    (448, 448, (3, 3)),      # square: the 9-tile minimum
    (4000, 300, (12, 1)),    # 13.3: the widest grid within 12 tiles
])
def test_nvila_8b_tiles_and_tokens_by_aspect_ratio(w, h, grid):
    """At NVILA-8B's scales (448, 896, 1344; max_tiles 12): 1 + 4 + i*j tiles of 448 px and
    256 * i * j feature tokens (+ one "\n"); the same grid as the transcribed upstream preprocess."""
    from vila_edge_export.reference_s2 import dynamic_s2_preprocess
    from vila_edge.multiscale import dynamic_s2_tiles

    img = Image.new("RGB", (w, h), (90, 30, 200))
    tiles, (rows, cols) = dynamic_s2_tiles(img, [448, 896, 1344], 448, 12)
    assert (cols, rows) == grid and len(tiles) == 1 + 4 + cols * rows
    assert all(t.size == (448, 448) for t in tiles)
    upstream, block_size = dynamic_s2_preprocess(img, [448, 896, 1344], 12, 448)
    assert block_size == (rows, cols) and len(upstream) == len(tiles)
    assert 256 * cols * rows == {(4, 3): 3072, (2, 5): 2560, (3, 3): 2304, (12, 1): 3072}[grid]


def test_nvila_several_images_take_the_plain_path(engine):
    """Two images: each is one 112-px square (4x4 merged tokens) + "\\n", whatever its aspect ratio."""
    pipe = Pipeline(engine("nvila-s2"))
    conv = pipe.conversation()
    conv.send([_noise(300, 100, 2), _noise(100, 300, 3)], "<image><image>Compare.", max_new_tokens=1)
    assert [t.shape[0] for t in conv.tiles] == [TOKENS_PER_BLOCK, TOKENS_PER_BLOCK]
    conv.close()


def test_vila15_s2_token_count_and_channels(engine):
    """S2 keeps VILA1.5's 196 tokens (here 7x7 patches -> 4x4 = 16) on 2 x 32 channels."""
    pipe = Pipeline(engine("vila1.5-3b-s2"))
    v = pipe.manifest.vision
    assert (v.multiscale, v.scales, v.max_split, v.resize_output_to) == ("s2", [104, 208], 104, 0)
    assert pipe.vision.runner.projector.session.get_inputs()[0].shape[-1] == 2 * 32
    feats, _ = pipe.vision.encode(_noise(50, 80, 4))
    assert [f.shape[0] for f in feats] == [16]


class _Counting:
    """Wraps an ORT session, counting calls and the batch sizes they got."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, feeds):
        self.batches.append(len(feeds["pixel_values"]))
        return self.session.run(feeds)


def test_tiles_run_as_one_batch_and_are_reused(engine):
    pipe = Pipeline(engine("nvila-s2"))
    tower = pipe.vision.runner.session = _Counting(pipe.vision.runner.session)
    img = _noise(300, 100, 5)
    first, _ = pipe.vision.encode(img, single=True)
    assert tower.batches == [1 + 4 + 12]               # every tile of the image in one tower call
    again, _ = pipe.vision.encode(img, single=True)
    assert tower.batches == [17] and np.array_equal(first[0], again[0])
    pipe.vision.encode(img, single=False)                # the plain square tile is the dynamic path's first
    assert tower.batches == [17]
    pipe.vision.clear_cache()
    pipe.vision.encode(img, single=False)
    assert tower.batches == [17, 1]
    frames = [_noise(90, 60, 20 + i) for i in range(3)]   # several images / video frames: one batch
    units = pipe.vision.encode_all(frames, single=False)
    assert tower.batches == [17, 1, 3]
    pipe.vision.clear_cache()
    for (feats, _), frame in zip(units, frames):           # batched == one at a time (float noise only)
        alone = pipe.vision.encode(frame, single=False)[0][0]
        np.testing.assert_allclose(feats[0], alone, atol=1e-5 * np.abs(alone).max(), rtol=0)


def test_merge_math_equals_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 208, 208)).astype(np.float32)
    for size in (104, 208, 50):
        expected = F.interpolate(torch.from_numpy(x), size=size, mode="bicubic").numpy()
        np.testing.assert_allclose(bicubic_resize(x, size), expected, atol=2e-6, rtol=0)
    y = rng.standard_normal((1, 5, 16, 24)).astype(np.float32)                     # (B, C, H, W)
    for hw in ((32, 48), (24, 36), (7, 5)):
        expected = F.interpolate(torch.from_numpy(y), size=hw, mode="area").numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(area_resize(y.transpose(0, 2, 3, 1), *hw), expected, atol=1e-6, rtol=0)
    tiles = rng.standard_normal((6, 3, 3, 2)).astype(np.float32)                    # (tiles, h, w, C)
    merged = chessboard_merge(tiles, 2, 3)                 # 2 rows x 3 cols of tiles
    assert np.array_equal(merged[0, 3:6, 6:9], tiles[1 * 3 + 2])
    assert np.array_equal(chessboard_split(merged, 2, 3), tiles)


def _edited(checkpoint, tmp_path, name, **changes):
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint(name), root)
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(changes)
    (root / "config.json").write_text(json.dumps(cfg))
    return str(root)


def test_reader_defaults_and_refusals(checkpoint, tmp_path):
    spec = read_checkpoint(checkpoint("nvila-s2"))
    assert "max_tiles" not in spec.config and spec.max_tiles == 12
    assert (spec.family, spec.scales.scales, spec.scales.resize_output_to) == ("nvila", [112, 224, 336], 2)
    with pytest.raises(CheckpointError, match="dynamic_s2"):
        read_checkpoint(_edited(checkpoint, tmp_path / "a", "nvila-s2", dynamic_s2=False))
    with pytest.raises(CheckpointError, match="s2_scales"):
        read_checkpoint(_edited(checkpoint, tmp_path / "b", "vila1.5-3b-s2", s2_scales="104,260"))
    with pytest.raises(CheckpointError, match="s2 with image_aspect_ratio 'pad'"):
        read_checkpoint(_edited(checkpoint, tmp_path / "d", "vila1.5-3b-s2", image_aspect_ratio="pad"))
    with pytest.raises(CheckpointError, match="ps3"):
        read_checkpoint(_edited(checkpoint, tmp_path / "e", "nvila-s2", ps3=True))
    with pytest.raises(CheckpointError, match="mm_hidden_size"):
        read_checkpoint(_edited(checkpoint, tmp_path / "c", "vila1.5-3b-s2", s2_scales="104,208,312"))


def test_bench_rows_by_tile_count(engine, tmp_path, capsys):
    """`vila-edge bench` on a dynamic_s2 engine: the vision rows by tile count (keys and tile/token
    counts only; speed lives in benchmarks/), printed and in benchmarks/engine.py's table."""
    from benchmarks.engine import tile_rows
    from vila_edge import cli
    rc = cli.main(["bench", engine("nvila-s2"), "--json", str(tmp_path / "b.json"), "--contexts", "32",
                   "--images", "1", "--prefill-tokens", "32", "--decode-steps", "2", "--repeats", "1", "--warmup", "0"])
    assert rc == 0
    result = json.loads((tmp_path / "b.json").read_text())
    rows = result["vision_by_tiles"]
    assert [(r["case"], r["tokens"]) for r in rows] == [
        ("several-images path, 1 tile", 16), ("3x3 last scale, 14 tiles", 144),
        ("5x2 last scale, 15 tiles", 160), ("4x3 last scale, 17 tiles", 192)]
    assert all(0 < r["tower_p50_s"] <= r["p50_s"] for r in rows)
    assert result["vision"]["tokens_per_image"] == 144 and result["ttft"][0]["prompt_tokens"] > 144
    assert "vision, 4x3 last scale, 17 tiles" in capsys.readouterr().out
    assert any(line.startswith("| 4x3 last scale, 17 tiles | 192 |") for line in tile_rows(rows))