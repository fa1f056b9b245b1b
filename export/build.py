"""checkpoint -> engine directory: vision.onnx, llm.onnx, embeddings, tokenizer, template, manifest.

    vila-edge export CHECKPOINT OUT [--dtype fp32|fp16] [--quant none|rtn|awq] [--lm-head-bits 8|4|0] [--target cpu]

The directory is built under a temporary name beside OUT and renamed into place only when every
file is written and both graphs load in ONNX Runtime, so an interrupted export never leaves a
directory that looks complete.
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from export.checkpoint import CheckpointSpec, load_vision_weights, load_weights, read_checkpoint
from export.onnx_graph import OPSET, save
from export.onnx_llm import build_llm, lm_head_rows
from export.onnx_vision import build_vision, tokens_per_image
from vila_edge.errors import CheckpointError
from vila_edge.families import MEDIA_TOKEN, get_family
from vila_edge.manifest import FORMAT_VERSION, LLMInfo, Manifest, TokenInfo, VisionInfo
from vila_edge.templates import get_template
from vila_edge.version import __version__

DTYPES = {"fp32": "float32", "fp16": "float16"}
TARGETS = ("cpu",)
MEDIA_TOKENS = ("<image>", "<vila/video>", "<vila/sentinel>")
FILES = {"vision": "vision.onnx", "llm": "llm.onnx", "embeddings": "embed_tokens.npy",
         "tokenizer": "tokenizer.json", "report": "export_report.json"}


@dataclass
class ExportOptions:
    dtype: str = "fp32"
    quant: str = "none"
    group_size: int | None = None          # None: export/quantize.py's default for the zero-point choice
    lm_head_bits: int | None = None        # quant rtn/awq: 8 (default), 4 or 0 (float); quant none: float
    zero_point: bool | None = None         # int4 linears with a zero point per group; None: the target's default
    max_bpw: float | None = 4.5            # int8 for the outer down_projs while the decoder stays <= this; None: all int4
    target: str = "cpu"
    template: str | None = None
    token_order: str | None = None
    progress: bool = True
    calib_dir: str | None = None           # AWQ calibration images (+ prompts.txt); default: synthetic scenes
    eval_tokens: int = 4096                # held-out text tokens of the 4-bit quality report (two passes)
    # Quality floor of a 4-bit export on held-out text (export/quality.py DEFAULT_FLOOR); None: report
    # only, never stop.
    max_ppl_increase_pct: float | None = 15.0
    min_top1_agreement: float = 0.80


def _tokenizer(spec: CheckpointSpec, out_dir: str):
    """Copy llm/tokenizer.json, converting a slow (sentencepiece) tokenizer once if that is all there is."""
    from tokenizers import Tokenizer

    src = spec.path("llm/tokenizer.json")
    dst = os.path.join(out_dir, FILES["tokenizer"])
    if os.path.isfile(src):
        shutil.copyfile(src, dst)
    else:
        # [unverified] VILA1.5 loads the Llama tokenizer with use_fast=False, legacy=False; the fast
        # conversion is assumed to give the same ids. Check on the real tokenizer.model.
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(spec.path("llm"), use_fast=True, legacy=False)
        tok.backend_tokenizer.save(dst)
    return Tokenizer.from_file(dst)


def _tokenizer_config(spec: CheckpointSpec) -> dict:
    path = spec.path("llm/tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _special(cfg: dict, key: str):
    value = cfg.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(spec: CheckpointSpec, tok_cfg: dict) -> str | None:
    jinja = spec.path("llm/chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    return tok_cfg.get("chat_template")


def _token_info(spec: CheckpointSpec, tok, tok_cfg: dict, template) -> TokenInfo:
    ids = lambda texts: [i for i in (tok.token_to_id(t) for t in texts if t) if i is not None]
    stop = set(spec.llm.eos_ids) | set(ids([_special(tok_cfg, "eos_token")])) | set(ids(template.stop_texts))
    gen_cfg = spec.path("llm/generation_config.json")
    if os.path.isfile(gen_cfg):
        with open(gen_cfg, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        stop |= set([eos] if isinstance(eos, int) else eos or [])
    image_id = tok.token_to_id("<image>")
    if get_family(spec.family).splice == MEDIA_TOKEN and image_id is None:
        raise CheckpointError(f"{spec.path('llm')}: the tokenizer has no '<image>' token, which "
                              f"{spec.family} checkpoints splice images at")
    bos = _special(tok_cfg, "bos_token")
    return TokenInfo(bos_id=tok.token_to_id(bos) if bos else spec.llm.bos_id, stop_ids=sorted(stop),
                     image_token_id=image_id, never_sample=sorted(ids(MEDIA_TOKENS)))


def _np(tensors: dict, dtype: str) -> dict:
    """Torch tensors -> numpy in the graph dtype, one at a time: a 3B checkpoint never holds a
    second full fp32 copy (the ONNX initializers are the only other copy)."""
    import torch

    target = getattr(torch, dtype)
    return {k: tensors.pop(k).to(target).numpy() for k in list(tensors)}


def quant_options(opts: ExportOptions):
    """The quantizer's settings (export/llm_quant.py QuantOptions) an export with `opts` uses."""
    from export.llm_quant import METHODS, QuantOptions
    from export.quality import QualityFloor
    if opts.quant not in METHODS:
        raise ValueError(f"quant {opts.quant!r} unknown; expected one of {METHODS}")
    floor = (None if opts.max_ppl_increase_pct is None
             else QualityFloor(opts.max_ppl_increase_pct, opts.min_top1_agreement))
    zero_point, group = quant_defaults(opts.target, opts.zero_point, opts.group_size)
    return QuantOptions(method=opts.quant, group_size=group, lm_head_bits=_lm_head_bits(opts),
                        zero_point=zero_point, max_bpw=opts.max_bpw,
                        calib_dir=opts.calib_dir, eval_tokens=opts.eval_tokens, floor=floor)


def _quantize(spec, opts):
    """-> (float weights as numpy fp32, {linear: (codes, scales, G, bits[, zeros])}, quant info for the manifest)."""
    from export.llm_quant import quantize_llm
    qopts = quant_options(opts)
    jinja = _chat_template(spec, _tokenizer_config(spec))
    weights, quant, report = quantize_llm(spec, qopts, jinja, opts.progress)
    # int8_linears: decoder linears stored as symmetric int8 (mixed precision, QuantOptions.max_bpw)
    return weights, quant, {"method": opts.quant, "group_size": qopts.group_size, "bits": 4,
                            "symmetric": not qopts.zero_point,
                            "lm_head_bits": qopts.lm_head_bits, "int8_linears": report["int8_linears"],
                            "report": report}


def quant_defaults(target: str, zero_point: bool | None, group: int | None) -> tuple[bool, int]:
    """(zero_point, G) of a 4-bit export: zero points where the target's runtime takes them (ORT's
    MatMulNBits does; TensorRT's int4 does not, contracts.md), G by that choice (export/quantize.py)."""
    from export.quantize import DEFAULT_GROUP, DEFAULT_ZERO_POINT_GROUP, ZERO_POINT_TARGETS
    zp = target in ZERO_POINT_TARGETS if zero_point is None else zero_point
    return zp, group or (DEFAULT_ZERO_POINT_GROUP if zp else DEFAULT_GROUP)


def _lm_head_bits(opts) -> int:
    from export.quantize import DEFAULT_LM_HEAD_BITS, LM_HEAD_BITS
    if opts.lm_head_bits is None:
        return DEFAULT_LM_HEAD_BITS if opts.quant != "none" else 0
    if opts.lm_head_bits not in LM_HEAD_BITS:
        raise ValueError(f"lm_head_bits {opts.lm_head_bits!r} unknown; expected one of {LM_HEAD_BITS}")
    if opts.lm_head_bits and opts.quant == "none":
        raise ValueError(f"lm_head_bits {opts.lm_head_bits} needs quant rtn or awq (quant none keeps every "
                         f"weight float)")
    return opts.lm_head_bits


def _embed_dtype(opts, dtype: str) -> str:
    """fp16 rows for fp16 and quantized engines (the runtime casts gathered rows to the graph's input
    dtype); fp32 engines keep fp32 so they stay equal to the fp32 reference."""
    return "float16" if opts.quant != "none" or dtype == "float16" else dtype


def _steps(progress: bool, total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="export", unit="step", disable=not progress)


def export_engine(checkpoint: str, out: str, opts: ExportOptions | None = None) -> Manifest:
    opts = opts or ExportOptions()
    if opts.dtype not in DTYPES:
        raise ValueError(f"dtype {opts.dtype!r} unknown; expected one of {sorted(DTYPES)}")
    if opts.target not in TARGETS:
        raise ValueError(f"target {opts.target!r}: only {TARGETS} engines can be built (TensorRT engines for "
                         f"Orin are not implemented yet)")
    dtype = DTYPES[opts.dtype]
    _lm_head_bits(opts)
    bar = _steps(opts.progress, 7)
    spec = read_checkpoint(checkpoint, opts.template, opts.token_order)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        bar.set_postfix_str("vision"); bar.update()
        vision = build_vision(spec.vision, spec.projector, _np(load_vision_weights(spec), dtype),
                              _np(load_weights(spec.path("mm_projector")), dtype), dtype)
        save(vision.model(), os.path.join(tmp, FILES["vision"]))
        bar.set_postfix_str("llm weights"); bar.update()
        if opts.quant == "none":
            llm_weights, quant, quant_info = _np(load_weights(spec.path("llm")), dtype), {}, {"method": "none"}
        else:
            llm_weights, quant, quant_info = _quantize(spec, opts)
        bar.set_postfix_str("llm graph"); bar.update()
        save(build_llm(spec.llm, llm_weights, dtype, quant).model(), os.path.join(tmp, FILES["llm"]))
        bar.set_postfix_str("embeddings"); bar.update()
        embed = llm_weights["model.embed_tokens.weight"][: spec.llm.vocab_size]
        np.save(os.path.join(tmp, FILES["embeddings"]), embed.astype(_embed_dtype(opts, dtype)))
        bar.set_postfix_str("tokenizer"); bar.update()
        manifest = _write_metadata(spec, tmp, dtype, quant_info, lm_head_rows(llm_weights, quant), opts)
        bar.set_postfix_str("verify"); bar.update()
        _verify(tmp)
        sizes = _file_bytes(tmp)          # every file but the report itself
        with open(os.path.join(tmp, FILES["report"]), "w") as f:
            json.dump({"quant": quant_info, "engine_bytes": sum(sizes.values()), "file_bytes": sizes,
                       "embeddings_dtype": _embed_dtype(opts, dtype)}, f, indent=2)
        publish(tmp, out)
        bar.set_postfix_str("done"); bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return manifest


def _write_metadata(spec, tmp, dtype, quant_info, logits_size: int, opts) -> Manifest:
    import onnx
    import onnxruntime

    tok = _tokenizer(spec, tmp)
    tok_cfg = _tokenizer_config(spec)
    files = dict(FILES)
    jinja = _chat_template(spec, tok_cfg)
    if spec.template == "auto":
        if not jinja:
            raise CheckpointError(f"{spec.path('llm')}: template 'auto' but no chat_template in "
                                  f"tokenizer_config.json or chat_template.jinja")
        with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(jinja)
        files["chat_template"] = "chat_template.jinja"
    special = (_special(tok_cfg, "bos_token") or "", _special(tok_cfg, "eos_token") or "")
    template = get_template(spec.template, jinja, special)
    llm, vis, proj = spec.llm, spec.vision, spec.projector
    manifest = Manifest(
        format_version=FORMAT_VERSION, exporter_version=__version__, family=spec.family, template=spec.template,
        dtype=dtype, quant=quant_info, num_video_frames=spec.num_video_frames,
        llm=LLMInfo(llm.hidden, llm.layers, llm.heads, llm.kv_heads, llm.head_dim, llm.vocab_size,
                    int(logits_size), llm.max_positions),
        vision=VisionInfo(vis.image_size, tokens_per_image(vis, proj), vis.mean, vis.std, spec.image_mode,
                          spec.min_tiles, spec.max_tiles, proj.token_order),
        tokens=_token_info(spec, tok, tok_cfg, template), files=files,
        build={"target": opts.target, "opset": OPSET, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
               "checkpoint": os.path.abspath(spec.root), "projector": proj.kind,
               "special_tokens": list(special)})
    manifest.write(tmp)
    return manifest


def _file_bytes(path: str) -> dict:
    return {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))}


def _verify(engine_dir: str) -> None:
    """Both graphs must load in ONNX Runtime before the directory counts as an engine."""
    import onnxruntime as ort

    for name in (FILES["vision"], FILES["llm"]):
        ort.InferenceSession(os.path.join(engine_dir, name), providers=["CPUExecutionProvider"])


def publish(tmp: str, out: str) -> None:
    """Rename the finished temp dir `tmp` to `out`, replacing an older `out` only once the new one
    is complete. mkdtemp makes 0700 and files may come 0600: published as 0755 / 0644 like any
    other directory, so other users (a robot's service account) can read the engine."""
    for d, _, files in os.walk(tmp):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(out)))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)
