"""Read a VILA checkpoint in NVIDIA's layout: config.json + llm/ + vision_tower/ + mm_projector/.

Layout and config facts: NVlabs/VILA@1c88211:llava/model/llava_arch.py (save_pretrained) and
llava/model/builder.py. Every check names the file and
field it read, so a user with a wrong tree knows what to fix.
"""
import json
import os
from dataclasses import dataclass, field

from vila_edge.errors import CheckpointError
from vila_edge.families import COLUMN_MAJOR, DYNAMIC_S2, LLAVA, RESIZE, ROW_MAJOR, S2, VILA_U, Family, detect_family

SUBDIRS = ("llm", "vision_tower", "mm_projector")
LLM_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# Projector types and the merge factor of their DownSampleBlock (1 = no merge),
# llava/model/multimodal_projector/base_projector.py.
PROJECTORS = {"linear": 1, "mlp2x_gelu": 1, "mlp_downsample": 2, "mlp_downsample_2x2_fix": 2,
              "mlp_downsample_3x3_fix": 3, "mlp_downsample_3x3_s2": 3, "mlp_downsample_3x3_s2_new": 3}
TEMPLATES = ("vicuna_v1", "llama_3", "hermes-2", "auto")


@dataclass
class LLMSpec:
    arch: str               # "llama" or "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab_size: int         # rows of the original vocabulary; ids >= this are never sampled
    rms_eps: float
    rope_theta: float
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool
    bos_id: int | None
    eos_ids: list
    raw: dict = field(repr=False, default_factory=dict)
    # Linear rope_scaling factor: positions divided by it (VILA-U's llm/config.json, 2.0 [inferred]).
    rope_scale: float = 1.0


@dataclass
class VisionSpec:
    image_size: int
    patch: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    ln_eps: float
    act: str                # hidden_act of the SigLIP MLP
    select_layer: int       # index into hidden_states (embeddings, layer0, ..., layerN-1)
    mean: list
    std: list
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def layers_run(self) -> int:
        """Encoder layers needed to produce hidden_states[select_layer]."""
        return self.select_layer % (self.layers + 1)


@dataclass
class ProjectorSpec:
    kind: str
    merge: int
    token_order: str        # COLUMN_MAJOR or ROW_MAJOR (meaningful when merge > 1)
    in_channels: int
    out_channels: int


@dataclass
class ScalesSpec:
    """Multi-scale vision (vila-formats.md §2 S2, §5.2 dynamic_s2): tower features of several scales
    concatenated on channels, so the projector sees vision.hidden * len(scales) channels."""
    kind: str               # families.S2 or families.DYNAMIC_S2
    scales: list            # square sides in pixels, ascending (VILA sorts s2_scales)
    max_split: int          # tile side: every tile is one tower input
    resize_output_to: int   # index into scales: every scale's map is area-resized to this one's


@dataclass
class CheckpointSpec:
    root: str
    family: str
    image_mode: str
    template: str
    llm: LLMSpec
    vision: VisionSpec
    projector: ProjectorSpec
    num_video_frames: int
    min_tiles: int
    max_tiles: int
    config: dict = field(repr=False, default_factory=dict)
    scales: ScalesSpec | None = None
    generation: object = None   # VILA-U: export.checkpoint_vila_u.VilaUSpec (image generation graphs)

    def path(self, sub: str) -> str:
        return os.path.join(self.root, sub)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except PermissionError as e:
        raise CheckpointError(f"{path}: permission denied; make the checkpoint readable by this user") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _need(cfg: dict, key: str, where: str, kind=None):
    if key not in cfg:
        raise CheckpointError(f"{where}: missing field {key!r}")
    value = cfg[key]
    if kind is not None and not isinstance(value, kind):
        raise CheckpointError(f"{where}: field {key!r} should be {kind}, got {value!r}")
    return value


def _sub_config(root: str, top: dict, sub: str) -> dict:
    """Sub-config from the inline `<sub>_cfg` dict, else from `<sub>/config.json`."""
    inline = top.get(f"{sub}_cfg")
    if isinstance(inline, dict):
        return inline
    return _read_json(os.path.join(root, sub, "config.json"))


def _rope_theta(cfg: dict, where: str) -> float:
    scaling = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if kind != "default":
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported (only default RoPE)")
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))


def read_llm(cfg: dict, where: str) -> LLMSpec:
    archs = _need(cfg, "architectures", where, list)
    if not archs or archs[0] not in LLM_ARCHS:
        raise CheckpointError(f"{where}: architectures {archs} not supported; expected one of {sorted(LLM_ARCHS)}")
    arch = LLM_ARCHS[archs[0]]
    hidden = _need(cfg, "hidden_size", where, int)
    heads = _need(cfg, "num_attention_heads", where, int)
    if hidden % heads:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    eos = cfg.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return LLMSpec(
        arch=arch, hidden=hidden, layers=_need(cfg, "num_hidden_layers", where, int), heads=heads,
        kv_heads=kv_heads, head_dim=cfg.get("head_dim") or hidden // heads,
        intermediate=_need(cfg, "intermediate_size", where, int),
        vocab_size=_need(cfg, "vocab_size", where, int), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg, where), max_positions=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama has them only with attention_bias.
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_id=cfg.get("bos_token_id"), eos_ids=eos_ids, raw=cfg)


def read_vision(cfg: dict, top: dict, preproc: dict, where: str, check_size: bool = True) -> VisionSpec:
    archs = cfg.get("architectures") or ["SiglipVisionModel"]
    mtype = cfg.get("model_type", "siglip_vision_model")
    if "Siglip" not in archs[0] and "siglip" not in mtype:
        raise CheckpointError(f"{where}: vision tower {archs[0]!r} ({mtype}) not supported; only SigLIP")
    select = top.get("mm_vision_select_layer", -2)
    feature = top.get("mm_vision_select_feature", "cls_patch")
    if feature != "cls_patch":
        # SigLIP has no CLS token: "patch" would drop a real patch and break the square grid.
        raise CheckpointError(f"config.json: mm_vision_select_feature {feature!r} not supported; expected 'cls_patch'")
    layers = _need(cfg, "num_hidden_layers", where, int)
    if not -(layers + 1) <= select <= layers:
        raise CheckpointError(f"config.json: mm_vision_select_layer {select} out of range for {layers} layers")
    image_size = _need(cfg, "image_size", where, int)
    patch = _need(cfg, "patch_size", where, int)
    if patch <= 0 or image_size < patch:
        raise CheckpointError(f"{where}: image_size {image_size} and patch_size {patch}: no patch fits")
    # image_size need not be a multiple: SigLIP-so400m-patch14-384 (every VILA1.5) has 384 = 27 * 14
    # + 6, and its patch conv (stride 14, no padding) keeps 27 x 27 patches, dropping 6 pixels.
    size = preproc.get("size") or {}
    proc_size = size.get("height", size.get("shortest_edge", image_size))
    if check_size and proc_size != image_size:
        raise CheckpointError(f"vision_tower/preprocessor_config.json: size {size} does not match "
                              f"vision_tower image_size {image_size}")
    resample = preproc.get("resample", 3)
    if resample != 3:
        raise CheckpointError(f"vision_tower/preprocessor_config.json: resample {resample} not supported; expected 3 (BICUBIC)")
    return VisionSpec(
        image_size=image_size, patch=patch, hidden=_need(cfg, "hidden_size", where, int), layers=layers,
        heads=_need(cfg, "num_attention_heads", where, int),
        intermediate=_need(cfg, "intermediate_size", where, int),
        ln_eps=float(cfg.get("layer_norm_eps", 1e-6)), act=cfg.get("hidden_act", "gelu_pytorch_tanh"),
        select_layer=select, mean=list(preproc.get("image_mean", [0.5, 0.5, 0.5])),
        std=list(preproc.get("image_std", [0.5, 0.5, 0.5])), raw=cfg)


def _template(root: str, top: dict, family: Family, override: str | None) -> str:
    name = override or top.get("conv_mode") or family.default_template
    if name is None:
        base = os.path.basename(os.path.normpath(root)).lower()
        name = next((t for key, t in family.path_templates if key in base), None)
    if name is None:
        raise CheckpointError(f"{root}: cannot tell the chat template (no 'conv_mode' in config.json and the "
                              f"directory name matches none of {[k for k, _ in family.path_templates]}); "
                              f"pass one of {TEMPLATES}")
    if name not in TEMPLATES:
        raise CheckpointError(f"chat template {name!r} unknown; expected one of {TEMPLATES}")
    return name


def read_projector(root: str, top: dict, family: Family, llm_hidden: int, order: str | None) -> ProjectorSpec:
    cfg = _sub_config(root, top, "mm_projector")
    where = "mm_projector/config.json"
    kind = cfg.get("mm_projector_type") or top.get("mm_projector_type")
    if kind is None:
        raise CheckpointError(f"{where}: missing field 'mm_projector_type'")
    if kind not in PROJECTORS:
        raise CheckpointError(f"{where}: mm_projector_type {kind!r} unknown; supported: {sorted(PROJECTORS)}")
    mm_hidden = _need(top, "mm_hidden_size", "config.json", int)
    if order is None:
        order = family.projector_order(kind)
    if order not in (COLUMN_MAJOR, ROW_MAJOR):
        raise CheckpointError(f"token order {order!r} unknown; expected {COLUMN_MAJOR!r} or {ROW_MAJOR!r}")
    return ProjectorSpec(kind=kind, merge=PROJECTORS[kind], token_order=order, in_channels=mm_hidden,
                         out_channels=llm_hidden)


def read_checkpoint(root: str, template: str | None = None, token_order: str | None = None) -> CheckpointSpec:
    """Parse and cross-check a checkpoint's configs. Weights are read later by `load_weights`.
    The registry tells the family from config.json (families.detect_family); the family's layout
    (its model_type) picks the reader."""
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: not a directory")
    top = _read_json(os.path.join(root, "config.json"))
    for sub in SUBDIRS:
        if not os.path.isdir(os.path.join(root, sub)):
            raise CheckpointError(f"{root}: missing subfolder {sub}/ (a VILA checkpoint has {', '.join(SUBDIRS)})")
    _need(top, "model_type", "config.json", str)
    family, mode = detect_family(top)
    return READERS[family.model_type](root, top, family, mode, template, token_order)


def _read_vila_u(root: str, top: dict, family: Family, mode: str, template: str | None, token_order: str | None):
    """VILA-U's own tower layout: vila_edge_export/checkpoint_vila_u.py (it imports this module). Its
    mlp2x_gelu projector keeps the grid's order: token_order (the stages pass the recorded one) has
    nothing to reorder."""
    from vila_edge_export.checkpoint_vila_u import as_checkpoint_spec
    return as_checkpoint_spec(root, template)


def _read_llava(root: str, top: dict, family: Family, mode: str, template: str | None,
                token_order: str | None) -> CheckpointSpec:
    """The three-folder VILA layout: llm/ + vision_tower/ (SigLIP) + mm_projector/."""
    llm = read_llm(_sub_config(root, top, "llm"), "llm/config.json")
    if top.get("hidden_size", llm.hidden) != llm.hidden:
        raise CheckpointError(f"config.json: hidden_size {top['hidden_size']} != llm hidden_size {llm.hidden}")
    preproc_path = os.path.join(root, "vision_tower", "preprocessor_config.json")
    preproc = _read_json(preproc_path) if os.path.isfile(preproc_path) else {}
    # S2 towers set the processor's size themselves (to the largest / first scale), whatever the file says.
    multiscale = bool(top.get("s2")) or mode == DYNAMIC_S2
    vision = read_vision(_sub_config(root, top, "vision_tower"), top, preproc, "vision_tower/config.json",
                         check_size=not multiscale)
    scales = read_scales(top, mode, vision) if multiscale else None
    projector = read_projector(root, top, family, llm.hidden, token_order)
    channels = vision.hidden * (len(scales.scales) if scales else 1)
    if projector.in_channels != channels:
        raise CheckpointError(f"config.json: mm_hidden_size {projector.in_channels} != vision_tower hidden_size "
                              f"{vision.hidden} x {len(scales.scales) if scales else 1} scale(s)")
    return CheckpointSpec(
        root=root, family=family.name, image_mode=mode, template=_template(root, top, family, template), llm=llm,
        vision=vision, projector=projector, num_video_frames=int(top.get("num_video_frames", 8)),
        min_tiles=int(top.get("min_tiles", 1)), max_tiles=int(top.get("max_tiles", 12)), config=top, scales=scales)


# One reader per checkpoint layout the registry knows (Family.model_type).
READERS = {LLAVA: _read_llava, VILA_U: _read_vila_u}


def read_scales(top: dict, mode: str, vision: VisionSpec) -> ScalesSpec:
    """s2_scales / s2_max_split_size / s2_resize_output_to_scale_idx, checked against the tower: every
    tile VILA cuts must be exactly one tower input (the SigLIP position table has a fixed size)."""
    where = "config.json"
    raw = _need(top, "s2_scales", where)
    try:
        scales = sorted(int(s) for s in (raw.split(",") if isinstance(raw, str) else raw))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: s2_scales {raw!r} is not a list of integers") from e
    split = int(_need(top, "s2_max_split_size", where))
    kind = DYNAMIC_S2 if mode == DYNAMIC_S2 else S2
    if kind == S2 and mode != RESIZE:
        raise CheckpointError(f"{where}: s2 with image_aspect_ratio {mode!r} is not supported; only 'resize' "
                              f"(VILA1.5-3b-s2)")
    # Default 0: getattr(args, "s2_resize_output_to_scale_idx", 0) in VisionTowerS2 / VisionTowerDynamicS2
    # (NVlabs/VILA@b760c34:llava/model/multimodal_encoder/vision_encoder.py); NVILA-8B's config says -1.
    idx = int(top.get("s2_resize_output_to_scale_idx", 0))
    if not scales or scales[0] <= 0 or not -len(scales) <= idx < len(scales):
        raise CheckpointError(f"{where}: s2_scales {raw!r} with s2_resize_output_to_scale_idx {idx} is not usable")
    size = vision.image_size
    if kind == DYNAMIC_S2:
        # dynamic_s2_preprocess cuts image_size tiles, image_size = the processor size = scales[0].
        bad = scales[0] != size or split != size or any(s % scales[0] for s in scales)
    else:
        # s2wrapper: scale s is cut into ceil(s / split)^2 tiles of s / ceil(s / split) pixels.
        bad = any(s % -(-s // split) or s // -(-s // split) != size for s in scales)
    if bad:
        raise CheckpointError(f"{where}: s2_scales {scales} with s2_max_split_size {split} do not cut into "
                              f"{size}-pixel tiles (vision_tower image_size); not supported")
    return ScalesSpec(kind=kind, scales=scales, max_split=split, resize_output_to=idx % len(scales))


def _safetensor_files(folder: str) -> list:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _need(_read_json(index), "weight_map", index, dict)
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    paths = [os.path.join(folder, f) for f in files]
    for p in paths:
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: listed in the shard index but missing")
    return paths


def load_weights(folder: str, dtype=None) -> dict:
    """All tensors of a sub-folder (single or sharded safetensors; bf16/fp16/fp32) as torch tensors."""
    from safetensors import safe_open

    tensors = {}
    for path in _safetensor_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    tensors[key] = t.to(dtype) if dtype is not None else t
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{path}: cannot read safetensors ({e})") from e
    return tensors


# transformers < 5 saved SiglipVisionModel under "vision_model." (the real VILA files); 5.x drops it.
SIGLIP_PREFIX = "vision_model."


def load_vision_weights(spec: CheckpointSpec, dtype=None) -> dict:
    """vision_tower/ tensors with canonical (unprefixed) SigLIP names."""
    return {k[len(SIGLIP_PREFIX):] if k.startswith(SIGLIP_PREFIX) else k: v
            for k, v in load_weights(spec.path("vision_tower"), dtype).items()}
