"""The family registry: detection from config.json, and the facts each family carries.

Sources: NVlabs/VILA@1c88211 and NVlabs/VILA@36f6adc, llava/model/llava_arch.py and llava/mm_utils.py.
"""
import pytest

from vila_edge.errors import CheckpointError
from vila_edge.families import COLUMN_MAJOR, ROW_MAJOR, detect_family, get_family


@pytest.mark.parametrize("config, name, mode", [
    ({"image_aspect_ratio": "resize", "transformers_version": "4.36.2"}, "vila1.5", "resize"),
    ({"image_aspect_ratio": "pad"}, "vila1.5", "pad"),                      # no version: VILA1.5-era
    ({}, "vila1.5", "resize"),
    ({"image_aspect_ratio": "resize", "transformers_version": "4.46.0"}, "nvila-lite", "resize"),
    ({"image_aspect_ratio": "dynamic", "transformers_version": "4.46.0"}, "nvila-lite", "dynamic"),
    ({"image_aspect_ratio": "dynamic", "transformers_version": "4.36.2"}, "nvila-lite", "dynamic"),
    # NVILA-8B/15B: dynamic_s2 needs both the switch and the mode; VILA1.5-3b-s2 is a vila1.5 checkpoint.
    ({"image_aspect_ratio": "dynamic_s2", "dynamic_s2": True, "transformers_version": "4.46.0"}, "nvila",
     "dynamic_s2"),
    ({"image_aspect_ratio": "resize", "s2": True}, "vila1.5", "resize"),
])
def test_detect_family(config, name, mode):
    family, got_mode = detect_family(config)
    assert (family.name, got_mode) == (name, mode)


@pytest.mark.parametrize("config, words", [
    ({"image_aspect_ratio": "dynamic_s2"}, "dynamic_s2"),
    ({"image_aspect_ratio": "dynamic", "dynamic_s2": True}, "dynamic_s2"),
    ({"image_aspect_ratio": "resize", "ps3": True}, "ps3"),
    ({"image_aspect_ratio": "anyres"}, "'anyres' not supported"),
    ({"model_type": "llava_qwen"}, r"model_type 'llava_qwen' not supported; expected one of \['llava_llama', 'vila_u_llama'\]"),
])
def test_detect_family_refuses(config, words):
    with pytest.raises(CheckpointError, match=words):
        detect_family(config)


def test_projector_order_by_era():
    # Trap 1: only VILA1.5's mlp_downsample is column-major; every _fix variant is row-major.
    vila, nvila = get_family("vila1.5"), get_family("nvila-lite")
    assert vila.projector_order("mlp_downsample") == COLUMN_MAJOR
    assert vila.projector_order("mlp_downsample_2x2_fix") == ROW_MAJOR
    assert nvila.projector_order("mlp_downsample") == ROW_MAJOR
    assert nvila.projector_order("mlp_downsample_3x3_fix") == ROW_MAJOR


def test_image_text():
    assert get_family("nvila-lite").image_text(3, "dynamic") == "<image>\n<image>\n<image>\n"
    assert get_family("nvila-lite").image_text(1, "resize") == "<image>"
    assert get_family("vila1.5").image_text(1, "pad") == "<image>"
