"""Read a VILA-U checkpoint (mit-han-lab/vila-u@096623c layout): config.json "vila_u_llama" + llm/ +
vision_tower/ (rqvaesiglip + rqtransformer) + mm_projector/.

Both published structures: 256 px (16x16 grid, depth 4, decoded as is) and 384 px (27x27, depth 16,
latent bilinearly resized to decoder_latent_shape before decoding). Every check names the file and
the field; fields this reader does not know fail rather than being ignored.
"""
import os
from dataclasses import dataclass, field

from vila_edge_export.checkpoint import _need, _read_json, _sub_config, read_llm, LLMSpec
from vila_edge.errors import CheckpointError
from vila_edge.families import VILA_U, detect_family

ADDED_TOKENS = ("<im_start>", "<im_end>", "<vi_start>", "<vi_end>")
# SigLIP towers a `pretrained_model` hub id names: hidden, intermediate, layers, heads, patch, image
# size (vila-u.md §1.6; dims from the public SigLIP configs [unverified here]). The layer count is
# taken from the weights (a fixture may have fewer).
SIGLIP_HUB = {"google/siglip-large-patch16-256": (1024, 4096, 24, 16, 16, 256),
              "google/siglip-so400m-patch14-384": (1152, 4304, 27, 16, 14, 384)}
TOP_KEYS = {"architectures", "model_type", "hidden_size", "mm_hidden_size", "image_aspect_ratio",
            "num_video_frames", "mm_use_im_start_end", "mm_use_vi_start_end", "mm_use_im_patch_token",
            "mm_vision_select_layer", "mm_projector_type", "model_dtype", "resume_path", "transformers_version",
            "llm_cfg", "vision_tower_cfg", "mm_projector_cfg", "tune_language_model", "tune_mm_projector",
            "tune_vision_tower", "interpolate_mode", "drop_path_rate", "mm_projector_lr", "_name_or_path",
            "chat_template", "vision_resolution", "conv_mode"}
RQVAE_KEYS = {"model_type", "architectures", "embed_dim", "n_embed", "latent_shape", "code_shape",
              "shared_codebook", "restart_unused_codes", "ddconfig", "decay", "latent_loss_weight",
              "decoder_latent_shape", "pretrained_model", "_name_or_path", "transformers_version"}
DD_KEYS = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
           "attn_resolutions", "dropout"}
RQT_KEYS = {"model_type", "architectures", "block_size", "input_embed_dim_1", "input_embed_dim_2", "embed_dim",
            "vocab_size", "head", "embd_pdrop", "cumsum_depth_ctx", "shared_tok_emb", "shared_cls_emb",
            "_name_or_path", "transformers_version"}


@dataclass
class SiglipSpec:
    hidden: int
    intermediate: int
    layers: int              # encoder layers in the file; layers-1 of them run (the last is skipped)
    heads: int
    patch: int
    image_size: int
    ln_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


@dataclass
class VilaUSpec:
    root: str
    llm: LLMSpec
    rope_factor: float       # linear rope_scaling: positions divided by this (1.0 = none)
    siglip: SiglipSpec
    codebook_size: int       # K (each codebook file tensor has K+1 rows: row K is padding)
    depth: int               # D
    shared_codebook: bool
    decoder: dict            # ddconfig
    decoder_latent: list | None   # [h, w] the latent is resized to before decoding, or None
    head: tuple              # depth transformer (E, layers, heads)
    special_ids: dict        # the four added tokens -> ids (the last four of the vocabulary)
    num_video_frames: int
    template: str = "vicuna_v1"   # both resolutions (vila_u/conversation.py:126-129)
    config: dict = field(repr=False, default_factory=dict)

    @property
    def image_tokens(self) -> int:
        return self.siglip.grid ** 2

    def path(self, sub: str) -> str:
        return os.path.join(self.root, sub)


def _unknown(cfg: dict, known: set, where: str) -> None:
    extra = sorted(set(cfg) - known)
    if extra:
        raise CheckpointError(f"{where}: unknown field {extra[0]!r} (this reader knows {sorted(known)})")


def _rope_factor(cfg: dict, where: str) -> float:
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return 1.0
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "linear":
        raise CheckpointError(f"{where}: rope_scaling type {kind!r} not supported; expected 'linear'")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise CheckpointError(f"{where}: rope_scaling factor {factor!r} should be a number >= 1")
    return float(factor)


def _special_ids(root: str, vocab: int) -> dict:
    path = os.path.join(root, "llm", "added_tokens.json")
    ids = _read_json(path)
    want = {t: vocab - 4 + i for i, t in enumerate(ADDED_TOKENS)}   # addressed as vocab-4..vocab-1
    for token, expect in want.items():
        if ids.get(token) != expect:
            raise CheckpointError(f"{path}: field {token!r} is {ids.get(token)!r}; VILA-U needs {expect} "
                                  f"(the four added tokens are the last ids of vocab_size {vocab})")
    return want


def _siglip(rq: dict, root: str, where: str) -> SiglipSpec:
    src = rq.get("pretrained_model", "google/siglip-large-patch16-256")
    if isinstance(src, str) and src in SIGLIP_HUB:
        h, i, layers, heads, p, s = SIGLIP_HUB[src]
        spec = SiglipSpec(h, i, layers, heads, p, s)
    elif isinstance(src, dict) or (isinstance(src, str) and os.path.isfile(os.path.join(root, src, "config.json"))):
        cfg = src if isinstance(src, dict) else _read_json(os.path.join(root, src, "config.json"))
        cfg = cfg.get("vision_config", cfg)
        spec = SiglipSpec(*(_need(cfg, k, f"{where}: rqvaesiglip.pretrained_model", int) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
            "image_size")), ln_eps=float(cfg.get("layer_norm_eps", 1e-6)))
    else:
        raise CheckpointError(f"{where}: rqvaesiglip.pretrained_model {src!r} unknown; expected one of "
                              f"{sorted(SIGLIP_HUB)} or a SigLIP config")
    if spec.layers < 2:
        raise CheckpointError(f"{where}: SigLIP needs >= 2 layers (quantization follows the second-to-last)")
    return spec


def _tower_weights(root: str, spec: VilaUSpec) -> None:
    """Cross-check the safetensors header against the config; the SigLIP layer count comes from it."""
    from safetensors import safe_open

    path = os.path.join(root, "vision_tower", "model.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    with safe_open(path, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    prefix = "rqvaesiglip.siglip_model.vision_model.encoder.layers."
    layers = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
    if not layers or layers != set(range(len(layers))):
        raise CheckpointError(f"{path}: no contiguous {prefix}* layers")
    spec.siglip.layers = len(layers)
    books = 1 if spec.shared_codebook else spec.depth
    for d in range(books):
        key = f"rqvaesiglip.quantizer.codebooks.{d}.weight"
        want = (spec.codebook_size + 1, spec.siglip.hidden)
        if shapes.get(key) != want:
            raise CheckpointError(f"{path}: {key} has shape {shapes.get(key)}; config says {want} (K + padding row, C)")
    pos = shapes.get("rqtransformer.pos_emb_d")
    if pos != (1, spec.depth, spec.head[0]):
        raise CheckpointError(f"{path}: rqtransformer.pos_emb_d has shape {pos}; config says (1, {spec.depth}, {spec.head[0]})")


def read_vila_u(root: str) -> VilaUSpec:
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: not a directory")
    top = _read_json(os.path.join(root, "config.json"))
    if top.get("model_type") != VILA_U:
        raise CheckpointError(f"config.json: model_type {top.get('model_type')!r} is not {VILA_U!r}")
    _unknown(top, TOP_KEYS, "config.json")
    if top.get("mm_use_im_patch_token"):
        raise CheckpointError("config.json: mm_use_im_patch_token true is not supported (it shifts the added ids)")
    if top.get("image_aspect_ratio", "resize") != "resize":
        raise CheckpointError(f"config.json: image_aspect_ratio {top['image_aspect_ratio']!r}; VILA-U uses 'resize'")
    llm_cfg = _sub_config(root, top, "llm")
    rope_factor = _rope_factor(llm_cfg, "llm/config.json")
    llm = read_llm({k: v for k, v in llm_cfg.items() if k != "rope_scaling"}, "llm/config.json")
    proj = _sub_config(root, top, "mm_projector")
    if proj.get("mm_projector_type") != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector/config.json: mm_projector_type {proj.get('mm_projector_type')!r}; "
                              "VILA-U uses 'mlp2x_gelu'")
    where = "vision_tower/config.json"
    vt = _sub_config(root, top, "vision_tower")
    if vt.get("model_type") != "rqvaesigliptransformer_model":
        raise CheckpointError(f"{where}: model_type {vt.get('model_type')!r} is not 'rqvaesigliptransformer_model'")
    rq, rqt = _need(vt, "rqvaesiglip", where, dict), _need(vt, "rqtransformer", where, dict)
    _unknown(rq, RQVAE_KEYS, f"{where}: rqvaesiglip")
    _unknown(rqt, RQT_KEYS, f"{where}: rqtransformer")
    dd = _need(rq, "ddconfig", where, dict)
    _unknown(dd, DD_KEYS, f"{where}: rqvaesiglip.ddconfig")
    siglip = _siglip(rq, os.path.join(root, "vision_tower"), where)
    C, K = _need(rq, "embed_dim", where, int), _need(rq, "n_embed", where, int)
    latent, code = _need(rq, "latent_shape", where, list), _need(rq, "code_shape", where, list)
    g = siglip.grid
    checks = [("hidden_size", vt.get("hidden_size"), C), ("rqvaesiglip.latent_shape", latent, [g, g, C]),
              ("rqvaesiglip.code_shape[:2]", code[:2], [g, g]), ("SigLIP hidden_size", siglip.hidden, C),
              ("rqtransformer.input_embed_dim_1", rqt.get("input_embed_dim_1"), C),
              ("rqtransformer.input_embed_dim_2", rqt.get("input_embed_dim_2"), llm.hidden),
              ("rqtransformer.vocab_size", rqt.get("vocab_size"), K),
              ("rqtransformer.block_size[2]", (rqt.get("block_size") or [0, 0, 0])[2], code[2])]
    for name, got, want in checks:
        if got != want:
            raise CheckpointError(f"{where}: {name} is {got!r}; expected {want!r} (from the other fields)")
    if top.get("mm_hidden_size", C) != C:
        raise CheckpointError(f"config.json: mm_hidden_size {top['mm_hidden_size']} != rqvaesiglip.embed_dim {C}")
    dec_latent = rq.get("decoder_latent_shape")
    if dec_latent is not None and (not isinstance(dec_latent, list) or len(dec_latent) < 2):
        raise CheckpointError(f"{where}: rqvaesiglip.decoder_latent_shape {dec_latent!r} should be null or [h, w, ...]")
    head = _need(rqt, "head", where, dict)
    E, n_layer = _need(rqt, "embed_dim", where, int), _need(head, "n_layer", f"{where}: rqtransformer.head", int)
    n_head = _need(_need(head, "block", f"{where}: rqtransformer.head", dict), "n_head",
                   f"{where}: rqtransformer.head.block", int)
    if E % n_head:
        raise CheckpointError(f"{where}: rqtransformer.embed_dim {E} is not a multiple of head.block.n_head {n_head}")
    spec = VilaUSpec(root=root, llm=llm, rope_factor=rope_factor, siglip=siglip, codebook_size=K, depth=code[2],
                     shared_codebook=bool(rq.get("shared_codebook", False)), decoder=dd,
                     decoder_latent=dec_latent[:2] if dec_latent else None, head=(E, n_layer, n_head),
                     special_ids=_special_ids(root, llm.vocab_size),
                     num_video_frames=int(top.get("num_video_frames", 8)), config=top)
    _tower_weights(root, spec)
    llm.rope_scale = rope_factor
    return spec


def as_checkpoint_spec(root: str, template: str | None = None):
    """The VILA checkpoint view the export stages work from (understanding path), the VILA-U spec
    riding along in `generation`; family and image mode from the registry (vila_edge/families.py)."""
    from vila_edge_export.checkpoint import CheckpointSpec
    from vila_edge_export.onnx_vila_u import projector_spec, vision_spec

    vu = read_vila_u(root)
    if template not in (None, vu.template):
        raise CheckpointError(f"{root}: VILA-U uses the {vu.template} template, not {template!r}")
    family, mode = detect_family(vu.config)
    return CheckpointSpec(root=root, family=family.name, image_mode=mode, template=vu.template, llm=vu.llm,
                          vision=vision_spec(vu), projector=projector_spec(vu), num_video_frames=vu.num_video_frames,
                          min_tiles=1, max_tiles=1, config=vu.config, generation=vu)
