"""Export stage: the checkpoint's LLM -> int4 linears (RTN, AWQ, GPTQ or AWQ + GPTQ) + a quality report.

AWQ is calibrated on multimodal samples run through the vision tower, projector and splicer (the
activations the LLM will see), plus real English text; quality is measured on held-out text the
calibration never saw (vila_edge_export/calib_text.py).
"""
import math
import os
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image, ImageDraw

from vila_edge_export.awq import awq_quantize, text_calibration_ids
from vila_edge_export.bit_alloc import auto_plan
from vila_edge_export.calib_text import split_texts
from vila_edge_export.checkpoint import CheckpointSpec
from vila_edge_export.options import AUTO_PLAN, QuantOptions, parse_group_plan, quant_options
from vila_edge_export.quality import (EVAL_WINDOW, QualityFloor, bits_per_weight, compare, float_size_bytes,
                                      forward_windows, quantized_size_bytes)
from vila_edge_export.quantize import apply_quantized, int8_linears, rtn_quantize
from vila_edge_export.reference import ReferenceVLM, hf_pixels
from vila_edge_export.reference_s2 import image_features
from vila_edge.families import DYNAMIC, PLACEHOLDER
from vila_edge.preprocess import dynamic_tiles
from vila_edge.templates import get_template

DEFAULT_PROMPTS = ("Describe the image in detail.", "What objects are in the picture and where are they?",
                   "How many shapes are there, and what colours are they?", "What should the robot pick up next?")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def default_images(n: int, size: int = 256) -> list:
    """Deterministic synthetic scenes (coloured shapes on plain backgrounds) for calibration."""
    rng = np.random.default_rng(1234)
    images = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(150, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x, y = (int(v) for v in rng.integers(0, size - 60, 2))
            box, colour = (x, y, x + int(rng.integers(20, 60)), y + int(rng.integers(20, 60))), \
                tuple(int(c) for c in rng.integers(0, 200, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        images.append(img)
    return images


def _calib_inputs(opts: QuantOptions) -> tuple:
    if not opts.calib_dir:
        return default_images(opts.n_images), list(DEFAULT_PROMPTS)
    names = sorted(n for n in os.listdir(opts.calib_dir) if n.lower().endswith(IMAGE_EXTS))
    if not names:
        raise FileNotFoundError(f"{opts.calib_dir}: no calibration images ({', '.join(IMAGE_EXTS)})")
    images = [Image.open(os.path.join(opts.calib_dir, n)).convert("RGB") for n in names]
    prompts_file = os.path.join(opts.calib_dir, "prompts.txt")
    prompts = list(DEFAULT_PROMPTS)
    if os.path.isfile(prompts_file):
        with open(prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()] or prompts
    return images, prompts


@torch.no_grad()
def multimodal_embeds(ref: ReferenceVLM, template, images: list, prompts: list) -> list:
    """One spliced [1, T, C] prompt embedding per image, through the reference's vision path."""
    spec, family, out = ref.spec, ref.family, []
    for i, img in enumerate(images):
        text = template.render([("user", family.part_text + prompts[i % len(prompts)])])
        if spec.scales is not None:      # multi-scale: one unit per image (dynamic_s2 tiles a lone image)
            out.append(ref.embed(ref.tokenize(text), image_features(ref, spec, [img])))
            continue
        tiles = (dynamic_tiles(img, spec.vision.image_size, spec.min_tiles, spec.max_tiles)
                 if spec.image_mode == DYNAMIC else [img])
        feats = list(ref.encode_images(np.concatenate([hf_pixels(spec, t) for t in tiles])))
        text = text.replace(PLACEHOLDER, family.image_text(len(tiles), spec.image_mode), 1)
        out.append(ref.embed(ref.tokenize(text), feats))
    return out


def eval_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """The first n_tokens ids of the held-out text: what every quality figure is measured on."""
    ids = [i for t in split_texts("eval") for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    return torch.tensor(ids[:n_tokens])


def quantize_model(ref: ReferenceVLM, opts: QuantOptions, template_source: str | None, progress: bool):
    """ref.llm (left as it is) -> QuantizedLLM with opts' method, group size and lm_head bits."""
    model = ref.llm
    opts = quant_options(opts)       # a bare QuantOptions: the CPU target's zero-point choice and group
    if opts.group_plan != AUTO_PLAN:
        plan = parse_group_plan(opts.group_plan)
        int8 = tuple(int8_linears(model, opts.group_size, True, opts.zero_point, opts.max_bpw, plan))
    if opts.method == "rtn":
        return rtn_quantize(model, opts.group_size, auto_group=True, lm_head_bits=opts.lm_head_bits,
                            zero_point=opts.zero_point, int8=int8, plan=plan)
    template = get_template(ref.spec.template, template_source)
    images, prompts = _calib_inputs(opts)
    if hasattr(ref, "prompt_embeds"):        # VILA-U (reference_vila_u.py): its own tower and splice
        calib = [ref.prompt_embeds(p, [im]) for im, p in zip(images[: opts.n_images], prompts * len(images))]
    else:
        calib = multimodal_embeds(ref, template, images[: opts.n_images], prompts)
    text = text_calibration_ids(ref.tokenizer, split_texts("calib"), opts.text_seqlen, opts.n_text) if opts.n_text else []
    embed = model.get_input_embeddings()
    with torch.no_grad():
        calib += [embed(ids.unsqueeze(0)) for ids in text]                    # each [1, T, C]
    if opts.group_plan == AUTO_PLAN:
        alloc, _ = auto_plan(model, calib, text, opts.zero_point, opts.max_bpw)
        plan = {name: g for name, (bits, g) in alloc.items()}
        int8 = tuple(name for name, (bits, g) in alloc.items() if bits == 8)
    return awq_quantize(model, calib, opts.group_size, progress=progress, auto_group=True,
                        lm_head_bits=opts.lm_head_bits, zero_point=opts.zero_point, int8=int8,
                        gptq=opts.gptq_rounding, search=opts.method == "awq", plan=plan,
                        ranges=opts.range_search, act_order=opts.act_order)


def quantize_llm(spec: CheckpointSpec, opts: QuantOptions, template_source: str | None, progress: bool) -> tuple:
    """-> (float weights {name: np fp32}, {linear: (codes, scales, G, bits)}, report dict)."""
    if spec.generation is not None:          # VILA-U: its RQ-VAE tower is not VILA's SigLIP
        from vila_edge_export.reference_vila_u import VilaUReference
        ref = VilaUReference(spec.generation)
    else:
        ref = ReferenceVLM(spec, torch.float32)
    qllm = quantize_model(ref, opts, template_source, progress)
    report = _quality(ref, qllm, opts)
    weights = {k: v.float().numpy() for k, v in qllm.state_dict.items()}
    # (codes, scales, G, bits), + zeros for a linear with zero points (export/onnx_graph.py Graph.linear)
    quant = {name: (q.codes.numpy(), q.scales.float().numpy(), q.group, q.bits)
             + (() if q.zeros is None else (q.zeros.numpy(),)) for name, q in qllm.linears.items()}
    return weights, quant, report


def _quality(ref: ReferenceVLM, qllm, opts: QuantOptions) -> dict:
    """The quality report of qllm against ref.llm on held-out text; leaves ref.llm quantized."""
    window = min(EVAL_WINDOW, ref.spec.llm.max_positions)
    ids = eval_ids(ref.tokenizer, opts.eval_tokens)
    fp = forward_windows(ref.llm, ids, window, window // 2)
    float_bytes = float_size_bytes(ref.llm)
    # In place: ref.llm is not needed as float after this, and a copy of a 3B model in fp32 (12 GB)
    # would double the export's peak memory.
    quantized = apply_quantized(ref.llm, qllm, in_place=True)
    q = forward_windows(quantized, ids, window, window // 2)
    report = compare(qllm.method, q, fp, quantized_size_bytes(qllm), float_bytes, window, window // 2)
    result = asdict(report)
    result["groups"] = sorted({w.group for w in qllm.linears.values()})
    result["group_plan"] = opts.group_plan
    result["quantized_linears"] = len(qllm.linears)
    result["lm_head_bits"] = qllm.lm_head_bits
    result["bits_per_weight"] = bits_per_weight(qllm)
    result["int8_linears"] = sorted(n for n, q in qllm.linears.items() if q.bits == 8 and n != "lm_head")
    if opts.max_ppl_increase_pct is not None:
        floor = QualityFloor(opts.max_ppl_increase_pct, opts.min_top1_agreement)
        result["floor"] = asdict(floor)
        floor.check(report)          # raises QualityError: the export stops, nothing is written
    if not math.isfinite(report.ppl):
        raise ValueError(f"{qllm.method}: perplexity is not finite")
    return result
