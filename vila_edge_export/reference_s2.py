"""Torch reference of multi-scale vision: VILA1.5-3b-s2's s2wrapper and NVILA's dynamic_s2.

Transcribed from the upstream code, sharing nothing with the runtime (vila_edge/multiscale.py):
- s2wrapper: bfshi/scaling_on_scales@9c008a3:s2wrapper/core.py `forward` and s2wrapper/utils.py
  (VILA1.5 used it through VisionTowerS2, NVlabs/VILA@1c88211:llava/model/multimodal_encoder/
  vision_encoder.py, with img_sizes = sorted s2_scales and the processor resized to the largest).
- dynamic_s2: NVlabs/VILA@b760c34:llava/mm_utils.py `dynamic_s2_preprocess`, `find_closest_aspect_ratio`,
  and llava/model/llava_arch.py `merge_chessboard`, `split_chessboard`, `merge_features_for_dynamic_s2`,
  `encode_images`; a request with several images uses `process_images` (the processor's square resize).
Pixels come from transformers' SiglipImageProcessor with the size VILA sets on it.
"""
import math

import torch
import torch.nn.functional as F
from PIL import Image

from vila_edge.families import DYNAMIC_S2


def processor_pixels(spec, image: Image.Image, size: int) -> torch.Tensor:
    """[1, 3, size, size] from transformers' SiglipImageProcessor with size set as VILA sets it."""
    from transformers import SiglipImageProcessor

    proc = SiglipImageProcessor.from_pretrained(spec.path("vision_tower"))
    proc.size = {"height": size, "width": size}
    return torch.from_numpy(proc(images=[image.convert("RGB")], return_tensors="np")["pixel_values"])


def split_chessboard(x, nh, nw):
    _, _, h_all, w_all = x.shape
    h, w = h_all // nh, w_all // nw
    return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(nh) for j in range(nw)], dim=0)


def merge_chessboard(x, nh, nw):
    if x.dim() == 3:
        n = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], n, n, x.shape[2]).permute(0, 3, 1, 2)     # b (h w) c -> b c h w
    b = x.shape[0] // (nh * nw)
    return torch.cat([torch.cat([x[(i * nw + j) * b:(i * nw + j + 1) * b] for j in range(nw)], dim=-1)
                      for i in range(nh)], dim=-2)


def s2_forward(model, x, img_sizes, max_split_size, resize_output_to_idx=0):
    """s2wrapper.forward with output_shape='bnc', num_prefix_token=0, split_forward=False."""
    num_splits = [math.ceil(size / max_split_size) for size in img_sizes]
    inputs = [split_chessboard(F.interpolate(x.to(torch.float32), size=size, mode="bicubic").to(x.dtype), n, n)
              for size, n in zip(img_sizes, num_splits)]
    outs = [merge_chessboard(model(i), n, n) for i, n in zip(inputs, num_splits)]
    output_size = outs[resize_output_to_idx].shape[-2]
    out = torch.cat([F.interpolate(o.to(torch.float32), size=output_size, mode="area").to(o.dtype) for o in outs],
                    dim=1)
    return out.flatten(2).transpose(1, 2)                                  # b c h w -> b (h w) c


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff, best_ratio, area = float("inf"), (1, 1), width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def dynamic_s2_preprocess(image, s2_scales, max_num, image_size):
    orig_width, orig_height = image.size
    min_num = (s2_scales[-1] // s2_scales[0]) ** 2
    processed = []
    for scale in s2_scales[:-1]:
        side = image_size * (scale // s2_scales[0])
        resized = image.resize((side, side))
        per_row = side // image_size
        for i in range((scale // s2_scales[0]) ** 2):
            box = ((i % per_row) * image_size, (i // per_row) * image_size,
                   (i % per_row + 1) * image_size, (i // per_row + 1) * image_size)
            processed.append(resized.crop(box))
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda x: x[0] * x[1])
    ratio = find_closest_aspect_ratio(orig_width / orig_height, ratios, orig_width, orig_height, image_size)
    width, height = image_size * ratio[0], image_size * ratio[1]
    resized = image.resize((width, height))
    per_row = width // image_size
    for i in range(ratio[0] * ratio[1]):
        box = ((i % per_row) * image_size, (i // per_row) * image_size,
               (i % per_row + 1) * image_size, (i // per_row + 1) * image_size)
        processed.append(resized.crop(box))
    return processed, (ratio[1], ratio[0])


def merge_features_for_dynamic_s2(image_features, block_sizes, scales, resize_idx):
    out, new_block_sizes, cnt = [], [], 0
    for block_size in block_sizes:
        if block_size is None:
            cur = image_features[cnt: cnt + 1]
            n = int(cur.shape[1] ** 0.5)
            cur = cur.reshape(1, n, n, -1).permute(0, 3, 1, 2).repeat(1, len(scales), 1, 1)
            out.append(cur)
            new_block_sizes.append((1, 1))
            cnt += 1
            continue
        per_scale = []
        for scale in scales[:-1]:
            k = scale // scales[0]
            per_scale.append(merge_chessboard(image_features[cnt: cnt + k * k], k, k))
            cnt += k * k
        per_scale.append(merge_chessboard(image_features[cnt: cnt + block_size[0] * block_size[1]], *block_size))
        cnt += block_size[0] * block_size[1]
        size = per_scale[resize_idx].shape[-2:]
        out.append(torch.cat([F.interpolate(f.to(torch.float32), size=size, mode="area").to(f.dtype)
                              for f in per_scale], dim=1))
        last = resize_idx in (len(scales) - 1, -1)
        new_block_sizes.append(block_size if last else (scales[resize_idx] // scales[0],) * 2)
    return out, new_block_sizes


@torch.no_grad()
def encode_dynamic_s2(ref, images: torch.Tensor, block_sizes: list, scales, resize_idx) -> list:
    """LlavaMetaModel.encode_images with dynamic_s2: [N tiles, 3, r, r] -> [[T, H] per image]."""
    feats, new_block_sizes = merge_features_for_dynamic_s2(ref.tower_features(images), block_sizes, scales,
                                                           resize_idx)
    feats = [split_chessboard(x, *bs) for x, bs in zip(feats, new_block_sizes)]
    feats = torch.cat([x.flatten(2).transpose(1, 2) for x in feats], dim=0)   # b c h w -> b (h w) c
    feats = list(ref.projector(feats).split([bs[0] * bs[1] for bs in new_block_sizes], dim=0))
    feats = [merge_chessboard(x, *bs) for x, bs in zip(feats, new_block_sizes)]
    return [x[0].flatten(1).transpose(0, 1) for x in feats]                  # 1 c h w -> (h w) c


@torch.no_grad()
def image_features(ref, spec, images: list) -> list:
    """The features [T, H] of each image of one request, as VILA computes them for a multi-scale spec."""
    sc = spec.scales
    if sc.kind == DYNAMIC_S2:
        if len(images) == 1:
            tiles, block_size = dynamic_s2_preprocess(images[0], sc.scales, spec.max_tiles, spec.vision.image_size)
            pixels = torch.cat([processor_pixels(spec, t, sc.scales[0]) for t in tiles]).to(ref.dtype)
            return encode_dynamic_s2(ref, pixels, [block_size], sc.scales, sc.resize_output_to)
        pixels = torch.cat([processor_pixels(spec, im, sc.scales[0]) for im in images]).to(ref.dtype)
        return encode_dynamic_s2(ref, pixels, [None] * len(images), sc.scales, sc.resize_output_to)
    if spec.image_mode != "resize":
        raise ValueError(f"reference S2 covers image_aspect_ratio 'resize' (VILA1.5-3b-s2), not {spec.image_mode!r}")
    out = []
    for im in images:
        # VILA1.5 process_image "resize": PIL's default resize to the processor size (the largest scale).
        x = processor_pixels(spec, im.convert("RGB").resize((sc.scales[-1],) * 2), sc.scales[-1]).to(ref.dtype)
        feats = s2_forward(ref.tower_features, x, sc.scales, sc.max_split, sc.resize_output_to)
        out.append(ref.projector(feats)[0])
    return out

