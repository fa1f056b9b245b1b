"""Model families: how each VILA generation splices media, tiles images and orders projector tokens.

The only place that knows what tells the families apart: export calls `detect_family` on a
checkpoint's config.json, the runtime reads the family by name from the manifest. A new family is
one more entry in FAMILIES. Facts from VILA's code, NVlabs/VILA@1c88211 (VILA1.5) and NVlabs/VILA@36f6adc
(NVILA): llava/conversation.py, llava/mm_utils.py, llava/model/llava_arch.py,
llava/model/multimodal_projector/base_projector.py.
"""
import re
from dataclasses import dataclass

from vila_edge.errors import CheckpointError

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

PLACEHOLDER = "<image>"  # where an image goes in prompt text, in every family

# VILA1.5's IMAGE_TOKEN_INDEX (llava/constants.py at 1c88211): never a real vocabulary id.
IMAGE_TOKEN_INDEX = -200

# config.json model_type: each names a checkpoint layout, and the exporter has one reader per layout.
LLAVA = "llava_llama"         # the three-folder VILA layout (llm/, vision_tower/, mm_projector/)
VILA_U = "vila_u_llama"       # VILA-U: an RQ-VAE tower + depth transformer in vision_tower/ (mit-han-lab/vila-u@096623c)


@dataclass(frozen=True)
class Family:
    name: str
    splice: str             # SENTINEL or MEDIA_TOKEN
    image_modes: tuple      # accepted image_aspect_ratio values
    token_order: str        # default order of mlp_downsample tokens for this era
    media_end_text: str     # text embedded after each image's features ("" or "\n")
    # Text an image becomes when the user passes a list of parts: VILA1.5's run_vila writes
    # "<image>\n"; NVILA's extract_media writes "<image>".
    part_text: str
    # With DYNAMIC tiling the prompt's <image> becomes this text once per tile
    # (NVlabs/VILA@b760c34:llava/mm_utils.py dynamic_preprocess).
    tile_text: str
    # The era: checkpoints saved by transformers >= this version (config.json transformers_version).
    # Of the families that accept a checkpoint's image mode, the newest era it reaches is its family.
    since_transformers: tuple = (0, 0)
    # Chat template when config.json has no conv_mode; None: look the model path up in path_templates.
    default_template: str | None = None
    # VILA's CONVERSATION_MODE_MAPPING: a substring of the model path picks the template.
    path_templates: tuple = ()
    # A config.json switch the family's image modes go with: set exactly when the mode is one of
    # them (NVILA-8B/15B: dynamic_s2 true with image_aspect_ratio "dynamic_s2").
    config_switch: str | None = None
    # config.json model_type: the three-folder VILA layout, or a family's own (VILA-U: vila_u_llama,
    # its RQ-VAE tower in vision_tower/; vila_edge_export/checkpoint_vila_u.py).
    model_type: str = LLAVA
    # Writes images too (VILA-U): a depth transformer over the LLM's last hidden state picks residual
    # codes, a pixel decoder paints them (vila_edge/imagine.py).
    generates_images: bool = False

    def projector_order(self, projector_type: str) -> str:
        """Default token order of a projector: only `mlp_downsample` changed order between eras
        (trap 1); the `_fix` variants were written row-major."""
        return self.token_order if projector_type == "mlp_downsample" else ROW_MAJOR

    def image_text(self, tiles: int, image_mode: str) -> str:
        """What one image's placeholder becomes before tokenizing: one tile_text per tile when tiled."""
        return self.tile_text * tiles if image_mode == DYNAMIC else PLACEHOLDER


FAMILIES = {
    "vila1.5": Family("vila1.5", SENTINEL, (RESIZE, PAD), COLUMN_MAJOR, "", "<image>\n", "<image>",
                      path_templates=(("vila1.5-3b", "vicuna_v1"), ("vila1.5-8b", "llama_3"),
                                      ("vila1.5-13b", "vicuna_v1"), ("vila1.5-40b", "hermes-2"))),
    # NVILA-era checkpoints (transformers >= 4.46, media token in the tokenizer) with plain resize
    # are NVILA-Lite configured without tiling.
    "nvila-lite": Family("nvila-lite", MEDIA_TOKEN, (DYNAMIC, RESIZE), ROW_MAJOR, "\n", "<image>",
                         "<image>\n", since_transformers=(4, 46), default_template="auto"),
    # NVILA-8B/15B: NVILA-era splice and token order; dynamic_s2 gives one <image> per image, its
    # features (all tiles and scales merged) followed by "\n" (NVlabs/VILA@b760c34:llava/model/llava_arch.py).
    # A video is its frames as images, one <image> + "\n" each, never pooled: extract_media at
    # b760c34:llava/utils/media.py puts the frames in media["image"] (since c7869a6; the 36f6adc
    # release sent them to the video encoder, TSPVideoEncoder where a config names it), so
    # generate_content never reaches a video encoder.
    "nvila": Family("nvila", MEDIA_TOKEN, (DYNAMIC_S2,), ROW_MAJOR, "\n", "<image>", "<image>",
                    since_transformers=(4, 46), default_template="auto", config_switch="dynamic_s2"),
    # VILA-U: VILA1.5's -200 splice, one token per grid position (mlp2x_gelu, no merge), no
    # <im_start> wrapper at inference (mit-han-lab/vila-u@096623c:vila_u/utils/media.py:87-93),
    # vicuna_v1 for both resolutions (vila_u/conversation.py:126-129).
    "vila-u": Family("vila-u", SENTINEL, (RESIZE,), ROW_MAJOR, "", "<image>\n", "<image>",
                     default_template="vicuna_v1", model_type=VILA_U,
                     generates_images=True),
}
# Config switches of VILA variants with no family here yet, and what they are. (`s2`, VILA1.5-3b-s2's
# multi-scale tower, is a vila1.5 checkpoint: vila_edge_export/checkpoint.py reads its scales.)
UNSUPPORTED = {"ps3": "PS3, the high-resolution vision tower"}
DEFAULT_TRANSFORMERS = "4.36.2"  # VILA1.5's configs predate the field


def detect_family(config: dict) -> tuple[Family, str]:
    """A checkpoint's top-level config.json -> (family, image mode)."""
    mode = config.get("image_aspect_ratio", RESIZE)
    layouts = sorted({f.model_type for f in FAMILIES.values()})
    if config.get("model_type", LLAVA) not in layouts:
        raise CheckpointError(f"config.json: model_type {config.get('model_type')!r} not supported; expected one of "
                              f"{layouts}")
    own_layout = [f for f in FAMILIES.values() if f.model_type != LLAVA and f.model_type == config.get("model_type")]
    if own_layout:                 # a family with its own model_type (VILA-U) is decided by it alone
        return own_layout[0], mode
    for key, what in UNSUPPORTED.items():
        if config.get(key) or mode == key:
            raise CheckpointError(f"config.json: {key} ({what}) is not supported yet; supported families: "
                                  + ", ".join(f"{f.name} ({', '.join(f.image_modes)})" for f in FAMILIES.values()))
    for f in FAMILIES.values():
        if f.config_switch and bool(config.get(f.config_switch)) != (mode in f.image_modes):
            raise CheckpointError(f"config.json: {f.config_switch} {config.get(f.config_switch)!r} with image_aspect_ratio "
                                  f"{mode!r}; {f.name} needs both ({f.config_switch} true, {f.image_modes[0]!r})")
    takes_mode = [f for f in FAMILIES.values() if mode in f.image_modes and f.model_type == LLAVA]
    if not takes_mode:
        modes = sorted({m for f in FAMILIES.values() for m in f.image_modes})
        raise CheckpointError(f"config.json: image_aspect_ratio {mode!r} not supported; expected one of {modes}")
    version = str(config.get("transformers_version", DEFAULT_TRANSFORMERS))
    major_minor = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    reached = [f for f in takes_mode if major_minor >= f.since_transformers]
    # A mode no family of the checkpoint's era has (dynamic tiles in an old config) decides alone.
    return max(reached or takes_mode, key=lambda f: f.since_transformers), mode


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]
