"""checkpoint -> engine directory: vision.onnx, llm.onnx, embeddings, tokenizer, template, manifest.

    vila-edge export CHECKPOINT OUT [--dtype fp32|fp16] [--quant none|rtn|awq|gptq] [--lm-head-bits 8|4|0] [--target cpu|orin] [--embed-bits 8|4|0]

`export_engine` chains three stages, each a command that reads files and writes files
(`python -m vila_edge_export.stages`): quantize (stage_quantize.py: int4 codes, scales and a quant
config; skipped for float engines) -> graphs (stage_graphs.py: ONNX graphs, embedding table and a
sidecar) -> engine (`engine_stage` here: tokenizer, template, manifest). Each stage builds its
directory under a temporary name beside its output and renames it into place when complete (the
engine only once its graphs load in ONNX Runtime), so an interrupted export never leaves a
directory that looks complete. Before anything is written the engine's OUT is checked
(output_dir.py: never the checkpoint, never a directory of other files).
"""
import json
import os
import shutil

from vila_edge_export.checkpoint import CheckpointSpec, read_checkpoint
from vila_edge_export.onnx_graph import OPSET
from vila_edge_export.onnx_vision import tokens_per_image
from vila_edge_export.options import DTYPES, TARGETS, ExportOptions, QuantOptions  # noqa: F401 (callers' names)
from vila_edge_export.output_dir import check_output, make_temp_dir
from vila_edge_export.recorded import recorded_options
from vila_edge_export.weights_check import checkpoint_faults
from vila_edge.atomic import atomic_dir, publish  # noqa: F401 (publish: callers' name)
from vila_edge.errors import CheckpointError
from vila_edge.families import MEDIA_TOKEN, get_family
from vila_edge.manifest import FORMAT_VERSION, LLMInfo, Manifest, TokenInfo, VisionInfo
from vila_edge.templates import get_template
from vila_edge.version import __version__

MEDIA_TOKENS = ("<image>", "<vila/video>", "<vila/sentinel>")
PROJECTOR_FILE = "projector.onnx"     # multi-scale engines only
FILES = {"vision": "vision.onnx", "llm": "llm.onnx", "embeddings": "embed_tokens.npy",
         "tokenizer": "tokenizer.json", "report": "export_report.json"}


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
    try:
        return Tokenizer.from_file(dst)
    except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
        raise CheckpointError(f"{spec.path('llm/tokenizer.json')}: not a tokenizer ({str(e)[:200]})") from e


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


def numpy_weights(tensors: dict, dtype: str) -> dict:
    """Torch tensors -> numpy in the graph dtype, one at a time: a 3B checkpoint never holds a
    second full fp32 copy (the ONNX initializers are the only other copy)."""
    import torch

    target = getattr(torch, dtype)
    return {k: tensors.pop(k).to(target).numpy() for k in list(tensors)}


def chat_template_source(spec: CheckpointSpec) -> str | None:
    return _chat_template(spec, _tokenizer_config(spec))


def embed_dtype(opts, dtype: str) -> str:
    """fp16 rows for fp16 and quantized engines (the runtime casts gathered rows to the graph's input
    dtype); fp32 engines keep fp32 so they stay equal to the fp32 reference."""
    return "float16" if opts.quant.quantized or dtype == "float16" else dtype


def steps(progress: bool, total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", disable=not progress)


def read_spec(checkpoint: str, opts: ExportOptions, token_order: str | None = None) -> CheckpointSpec:
    """The checkpoint, validated against the options that depend on its family."""
    return read_checkpoint(checkpoint, opts.template, token_order or opts.token_order)


def export_engine(checkpoint: str, out: str, opts: ExportOptions | None = None) -> Manifest:
    """The stages in a row, through files in a work directory beside `out` (removed afterwards)."""
    from vila_edge_export.stage_graphs import graphs_stage
    from vila_edge_export.stage_quantize import quantize_stage

    opts = opts or ExportOptions()
    check_output(checkpoint, out)
    read_spec(checkpoint, opts)                     # a bad checkpoint fails before any work
    # The work dir carries an owner file like the engine's temp dir: a killed export's is removed
    # by the next export into the same parent (output_dir.clean_stale).
    work = make_temp_dir(os.path.dirname(os.path.abspath(out)))
    try:
        quantized = quantize_stage(checkpoint, os.path.join(work, "quant"), opts) if opts.quant.quantized else None
        graphs = graphs_stage(checkpoint, os.path.join(work, "graphs"), opts, quantized)
        return engine_stage(checkpoint, graphs, out, opts, move=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def engine_stage(checkpoint: str, graphs: str, out: str, opts: ExportOptions, move: bool = False) -> Manifest:
    """Export stage 3: the graphs stage's directory + the checkpoint's tokenizer and configs -> the
    engine directory (tokenizer, template, manifest), verified in ONNX Runtime and published
    atomically. `move` takes the graph files instead of copying them (the one-shot export)."""
    from vila_edge_export.stage_graphs import SIDECAR

    sidecar_path = os.path.join(graphs, SIDECAR)
    if not os.path.isfile(sidecar_path):
        raise CheckpointError(f"{sidecar_path}: missing; not a graphs stage output (vila_edge_export.stages graphs)")
    with open(sidecar_path, encoding="utf-8") as f:
        sidecar = json.load(f)
    spec = read_spec(checkpoint, opts, sidecar["token_order"])
    check_output(checkpoint, out)
    parent = os.path.dirname(os.path.abspath(out))
    with steps(opts.progress, 3, "engine") as bar, atomic_dir(out, tmp=make_temp_dir(parent)) as tmp:
        bar.set_postfix_str("graphs"); bar.update()
        for name in sorted(os.listdir(graphs)):
            if name != SIDECAR:
                (shutil.move if move else shutil.copyfile)(os.path.join(graphs, name), os.path.join(tmp, name))
        bar.set_postfix_str("tokenizer"); bar.update()
        with checkpoint_faults(spec.root):
            manifest = _write_metadata(spec, tmp, sidecar, opts)
        bar.set_postfix_str("verify"); bar.update()
        _verify(tmp)
        sizes = _file_bytes(tmp)          # every file but the report itself
        with open(os.path.join(tmp, FILES["report"]), "w") as f:
            json.dump({"quant": sidecar["quant"], "engine_bytes": sum(sizes.values()), "file_bytes": sizes,
                       "embeddings_dtype": sidecar["embeddings_dtype"]}, f, indent=2)
    if opts.target == "orin":
        build_trt_cache(out, manifest)     # after publishing: TensorRT keys its cache by the graph's path
    return manifest


def tensorrt_profile(manifest: Manifest) -> dict:
    """min/opt/max of every dynamic axis for TensorRT (vila_edge/trt_profile.py), for the runtime's
    defaults: its context length (capped by the model), prefill chunk and KV block size."""
    from vila_edge.llm import PREFILL_CHUNK, KVConfig
    from vila_edge.pipeline import DEFAULT_CONTEXT
    from vila_edge.trt_profile import profiles

    return profiles(manifest, min(DEFAULT_CONTEXT, manifest.llm.max_positions), PREFILL_CHUNK, KVConfig().block_size)


def build_trt_cache(engine_dir: str, manifest: Manifest) -> bool:
    """Where TensorRT is installed, load the graphs on ORT's TensorRT provider once: that builds the
    engine cache (engine_dir/trt_cache). False (nothing done) elsewhere: the first load on the device
    builds it (vila_edge/targets.py says so). Experimental: not yet run on a machine with TensorRT."""
    from vila_edge.backend import OrtSession
    from vila_edge.devices import check_active, providers, trt_builder_missing

    if trt_builder_missing() is not None:
        return False
    profile = manifest.build["tensorrt"]
    for role in ("vision", "llm"):
        path = os.path.join(engine_dir, manifest.files[role])
        session = OrtSession(path, None, providers("tensorrt", engine_dir, manifest, profile[role]))
        check_active(session.session, "tensorrt", path)
    return True


def _write_metadata(spec, tmp, sidecar: dict, opts) -> Manifest:
    import onnx
    import onnxruntime

    dtype = sidecar["dtype"]
    tok = _tokenizer(spec, tmp)
    tok_cfg = _tokenizer_config(spec)
    files = dict(FILES, embeddings=sidecar["embeddings"], **sidecar.get("files", {}))
    if os.path.isfile(os.path.join(tmp, FILES["llm"] + ".data")):
        files["llm_data"] = FILES["llm"] + ".data"      # external tensors: loaded, so counted by the ledger
    if spec.scales is not None:
        files["projector"] = PROJECTOR_FILE
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
    llm, vis, proj, scales = spec.llm, spec.vision, spec.projector, spec.scales
    manifest = Manifest(
        format_version=FORMAT_VERSION, exporter_version=__version__, family=spec.family, template=spec.template,
        dtype=dtype, kv_dtype=sidecar.get("kv_dtype", dtype), quant=sidecar["quant"], num_video_frames=spec.num_video_frames,
        llm=LLMInfo(hidden=llm.hidden, layers=llm.layers, heads=llm.heads, kv_heads=llm.kv_heads,
                    head_dim=llm.head_dim, vocab_size=llm.vocab_size, logits_size=int(sidecar["logits_size"]),
                    max_positions=llm.max_positions, intermediate=llm.intermediate),
        vision=VisionInfo(image_size=vis.image_size, tokens_per_image=tokens_per_image(vis, proj), mean=vis.mean,
                          std=vis.std, image_mode=spec.image_mode, min_tiles=spec.min_tiles,
                          max_tiles=spec.max_tiles, token_order=proj.token_order,
                          multiscale=scales.kind if scales else "", scales=scales.scales if scales else [],
                          max_split=scales.max_split if scales else 0,
                          resize_output_to=scales.resize_output_to if scales else 0, grid=vis.grid),
        tokens=_token_info(spec, tok, tok_cfg, template), files=files,
        capabilities=list(sidecar.get("capabilities", [])), generation=dict(sidecar.get("generation", {})),
        build={"target": opts.target, "graph": sidecar["graph"], "opset": OPSET, "onnx": onnx.__version__,
               "onnxruntime": onnxruntime.__version__,
               "checkpoint": os.path.abspath(spec.root), "projector": proj.kind,
               "special_tokens": list(special), "options": recorded_options(opts)})
    if opts.target == "orin":
        manifest.build["tensorrt"] = tensorrt_profile(manifest)
    manifest.write(tmp)
    return manifest


def _file_bytes(path: str) -> dict:
    return {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path)) if not f.startswith(".")}


def _verify(engine_dir: str) -> None:
    """Every graph must load in ONNX Runtime before the directory counts as an engine."""
    import onnxruntime as ort

    from vila_edge import ops
    from vila_edge_export.build_vila_u import FILES as GENERATION_FILES

    optional = (PROJECTOR_FILE, *GENERATION_FILES.values())     # present only for some families
    options = ort.SessionOptions()
    ops.register(options)            # the fused LLM graph's PagedAttention
    for name in (FILES["vision"], FILES["llm"], *optional):
        path = os.path.join(engine_dir, name)
        if name not in optional or os.path.isfile(path):
            ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
