"""Pixels, tiling, token counts and video sampling."""
import numpy as np
import pytest
from PIL import Image

from conftest import data
from vila_edge_export.checkpoint import read_checkpoint
from vila_edge_export.reference import hf_pixels
from vila_edge import Pipeline
from vila_edge.families import RESIZE
from vila_edge.preprocess import PixelSpec, frame_indices, load_image, load_video, normalize, tile_grid
from vila_edge.splice import IMAGE_POSITION


@pytest.mark.parametrize("size", [(160, 120), (31, 200), (98, 98)])
def test_pixels_equal_transformers_siglip_processor(checkpoint, size):
    spec = read_checkpoint(checkpoint("vila1.5-3b-downsample"))
    img = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = normalize(img, PixelSpec(spec.vision.image_size, (0.5,) * 3, (0.5,) * 3, RESIZE))
    np.testing.assert_allclose(ours, hf_pixels(spec, img)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("w,h,grid", [(448, 448, (1, 1)), (896, 448, (2, 1)), (448, 1344, (1, 3)),
                                      (800, 600, (4, 3)), (1000, 100, (10, 1)), (4000, 100, (12, 1)),
                                      (100, 4000, (1, 12))])
def test_tile_grid_hand_cases(w, h, grid):
    assert tile_grid(w, h, 448, 1, 12) == grid


def test_nvila_lite_token_count(engine):
    """NVILA-Lite dynamic: a 2:1 image -> 2 tiles + thumbnail; each tile = its features + "\\n"."""
    pipe = Pipeline(engine("nvila-lite-3x3"))
    size = pipe.manifest.vision.image_size
    img = Image.new("RGB", (2 * size, size), (10, 200, 30))
    feats, digests = pipe.vision.encode(img)
    assert feats.shape[:2] == (3, pipe.manifest.vision.tokens_per_image)
    tokens = pipe.manifest.vision.tokens_per_image
    assert tokens == ((112 // 14 + 2) // 3) ** 2 == 9      # 8x8 patches padded to 9x9, merged 3x3
    text = pipe.splicer.expand("<image>What?", [3])
    assert text == "<image>\n<image>\n<image>\nWhat?"
    sp = pipe.splicer.splice(text, digests)
    newline = pipe.tokenizer.encode("\n").ids
    assert [k for _, k in sp.spans] == [0, 1, 2]
    for start, _ in sp.spans:
        assert (sp.ids[start:start + tokens] == IMAGE_POSITION).all()
        assert sp.ids[start + tokens: start + tokens + len(newline)].tolist() == newline
    assert (sp.ids == IMAGE_POSITION).sum() == 3 * tokens


def test_vila15_token_count(engine):
    """VILA1.5: one image = exactly tokens_per_image positions (-200 sentinel, nothing added)."""
    pipe = Pipeline(engine("vila1.5-3b-downsample"))
    tokens = pipe.manifest.vision.tokens_per_image
    assert tokens == ((104 // 14 + 1) // 2) ** 2 == 16       # 7x7 padded to 8x8, merged 2x2 (real: 27 -> 196)
    feats, digests = pipe.vision.encode(data("robot_scene.png"))
    sp = pipe.splicer.splice("<image>\nWhat?", digests)
    plain = pipe.tokenizer.encode("\nWhat?").ids[1:]            # drop the chunk's BOS, as VILA does
    assert sp.ids.tolist() == [pipe.manifest.tokens.bos_id] + [IMAGE_POSITION] * tokens + plain


def test_frame_sampling():
    assert frame_indices(100, 8).tolist() == [0, 14, 28, 42, 57, 71, 85, 99]
    assert frame_indices(3, 8).tolist() == [0, 1, 2]
    frames = [np.full((8, 8, 3), i, np.uint8) for i in range(20)]
    out = load_video(frames, 4)
    assert [np.asarray(f)[0, 0, 0] for f in out] == [0, 6, 13, 19]


def test_gif_video(tmp_path):
    frames = [Image.new("RGB", (16, 16), (i * 20, 0, 0)) for i in range(10)]
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert len(load_video(str(path), 4)) == 4


def test_array_and_grayscale_inputs():
    assert load_image(np.zeros((5, 7), np.uint8)).size == (7, 5)
    assert load_image(np.zeros((5, 7, 4), np.uint8)).mode == "RGB"


def test_video_chat_uses_num_video_frames(engine):
    pipe = Pipeline(engine("vila1.5-3b-downsample"))
    frames = [np.full((20, 20, 3), i * 8, np.uint8) for i in range(30)]
    conv = pipe.conversation()
    conv.send(None, "What happens?", video=frames, max_new_tokens=2)
    n = pipe.manifest.num_video_frames
    assert len(conv.tiles) == n
    assert conv.last_stats["prompt_tokens"] > n * pipe.manifest.vision.tokens_per_image
    conv.close()


def test_parts_list_equals_placeholder_prompt(engine):
    """[image, text] parts become the family's part text ("<image>\\n" for VILA1.5), and a prompt
    without placeholders gets one per image in front, as VILA's run_vila does."""
    pipe = Pipeline(engine("vila1.5-3b-downsample"))
    img = data("robot_scene.png")
    runs = []
    for args in (([img, "What is this?"], None), (img, "<image>\nWhat is this?"), (img, "What is this?")):
        conv = pipe.conversation()
        conv.send(*args, max_new_tokens=5)
        runs.append((conv.messages[0], conv.last_ids))
        conv.close()
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0] == ("user", "<image>\nWhat is this?")
