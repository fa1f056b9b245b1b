"""Model families: how each VILA generation splices media, tiles images and orders projector tokens.

The runtime reads a family by name from the manifest; export picks it from the checkpoint config.
Facts from ../shared/reference/vila-formats.md (§0 traps, §4.3 splicing, §5 preprocessing).
"""
from dataclasses import dataclass

SENTINEL = "sentinel"        # VILA1.5: <image> -> IMAGE_TOKEN_INDEX (-200) -> features, nothing else
MEDIA_TOKEN = "media_token"  # NVILA: <image> is a real token -> features + embed("\n") per image/tile

RESIZE = "resize"    # squash to the tower's square input (VILA1.5 image_aspect_ratio "resize")
PAD = "pad"          # expand2square with the mean colour, then resize
DYNAMIC = "dynamic"  # InternVL-style tiles + thumbnail (NVILA-Lite)
# NVILA-8B/15B: one image tiled at every s2 scale, features merged across scales (§5.2);
# several images or video frames take the plain square path of the first scale instead.
DYNAMIC_S2 = "dynamic_s2"

# Multi-scale towers (the manifest's vision.multiscale; "" = one scale).
# S2: VILA1.5-3b-s2's s2wrapper: the square image at the largest scale is resized (torch bicubic) to
# every scale, each cut into max_split tiles chessboard-wise, maps merged and area-resized to
# scale 0's map, channels concatenated, then the projector (bfshi/scaling_on_scales@9c008a3:s2wrapper/core.py).
S2 = "s2"

COLUMN_MAJOR = "column"  # VILA1.5-era DownSampleBlock (one permute): t = j * S2 + i
ROW_MAJOR = "row"        # NVILA-era DownSampleBlock (two permutes): t = i * S2 + j

# VILA1.5's IMAGE_TOKEN_INDEX (llava/constants.py at 1c88211): never a real vocabulary id.
IMAGE_TOKEN_INDEX = -200


@dataclass(frozen=True)
class Family:
    name: str
    splice: str             # SENTINEL or MEDIA_TOKEN
    image_modes: tuple      # accepted image_aspect_ratio values
    token_order: str        # default order of mlp_downsample tokens for this era
    media_end_text: str     # text embedded after each image's features ("" or "\n")
    # Text an image becomes when the user passes a list of parts: VILA1.5's run_vila writes
    # "<image>\n"; NVILA's extract_media writes "<image>" (§4.3).
    part_text: str
    # With DYNAMIC tiling the prompt's <image> becomes this text once per tile (§5.3).
    tile_text: str
    # Template when the config names none: None = pick by path (VILA's CONVERSATION_MODE_MAPPING).
    default_template: str | None = None
    # Writes images too (VILA-U): a depth transformer over the LLM's last hidden state picks residual
    # codes, a pixel decoder paints them (vila_edge/imagine.py).
    generates_images: bool = False


FAMILIES = {
    "vila1.5": Family("vila1.5", SENTINEL, (RESIZE, PAD), COLUMN_MAJOR, "", "<image>\n", "<image>"),
    "nvila-lite": Family("nvila-lite", MEDIA_TOKEN, (DYNAMIC, RESIZE), ROW_MAJOR, "\n", "<image>",
                         "<image>\n", "auto"),
    # NVILA-8B/15B: NVILA-era splice and token order; dynamic_s2 gives one <image> per image, its
    # features (all tiles and scales merged) followed by "\n" (NVlabs/VILA@b760c34:llava/model/llava_arch.py).
    # A video is its frames as images, one <image> + "\n" each, never pooled: extract_media at
    # b760c34:llava/utils/media.py puts the frames in media["image"] (since c7869a6; the 36f6adc
    # release sent them to the video encoder, TSPVideoEncoder where a config names it), so
    # generate_content never reaches a video encoder.
    "nvila": Family("nvila", MEDIA_TOKEN, (DYNAMIC_S2,), ROW_MAJOR, "\n", "<image>", "<image>", "auto"),
    # VILA-U: VILA1.5's -200 splice, one token per grid position (mlp2x_gelu, no merge), no
    # <im_start> wrapper at inference (mit-han-lab/vila-u@096623c:vila_u/utils/media.py:87-93),
    # vicuna_v1 for both resolutions (vila_u/conversation.py:126-129).
    "vila-u": Family("vila-u", SENTINEL, (RESIZE,), ROW_MAJOR, "", "<image>\n", "<image>", "vicuna_v1",
                     generates_images=True),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]
