"""Write random-weight VILA checkpoints in the exact real layout, any shape
(NVlabs/VILA@1c88211:llava/model/llava_arch.py).

    python -m vila_edge_export.fixtures OUT --kind vila1.5 [--projector mlp_downsample] [--shape tiny|vila1.5-3b]
    python -m vila_edge_export.fixtures OUT --kind nvila --shape nvila-8b --llm-layers 2   # NVILA-8B shapes, fewer LLM layers
    python -m vila_edge_export.fixtures OUT --kind vila-u --shape tiny|tiny-384|vila-u-7b-256 [--llm-layers 2]

Used by the tests (tiny shapes) and the benchmarks (real shapes). Tokenizers are trained here on a
small built-in corpus, with each family's special tokens, because nothing can be downloaded.
"""
import argparse
import json
import os

from vila_edge.atomic import atomic_dir

KINDS = {
    # kind: (llm arch, template, image_aspect_ratio, transformers_version, default projector, special tokens)
    "vila1.5": ("llama", "vicuna_v1", "resize", "4.36.2", "mlp_downsample", "llama2"),
    "vila1.5-llama3": ("llama", "llama_3", "resize", "4.36.2", "mlp_downsample", "llama3"),
    "nvila-lite": ("qwen2", "auto", "dynamic", "4.46.0", "mlp_downsample_3x3_fix", "qwen2"),
    "nvila": ("qwen2", "auto", "dynamic_s2", "4.46.0", "mlp_downsample", "qwen2"),
    "vila1.5-s2": ("llama", "vicuna_v1", "resize", "4.36.2", "mlp_downsample", "llama2"),
}
# Multi-scale kinds: s2_scales as multiples of the tower's image size, and the config keys of the
# real checkpoints (vila-formats.md §1.2 NVILA-8B: 448,896,1344 / split 448 / output idx -1, no
# max_tiles key; §2 VILA1.5-3b-s2: --s2_scales 384,768 --s2_max_split_size 384).
MULTISCALE = {
    "nvila": ((1, 2, 3), {"dynamic_s2": True, "s2": False, "s2_resize_output_to_scale_idx": -1}),
    "vila1.5-s2": ((1, 2), {"dynamic_s2": False, "s2": True}),
}
SHAPES = {
    # name: llm (hidden, layers, heads, kv_heads, intermediate), vision (size, patch, hidden, layers, heads, inter)
    # 104 = 7 * 14 + 6: like SigLIP-so400m's 384 = 27 * 14 + 6, the patch conv drops the last 6 pixels.
    "tiny": ((64, 2, 4, 2, 128), (104, 14, 32, 3, 2, 64)),
    "tiny-448": ((64, 2, 4, 2, 128), (112, 14, 32, 3, 2, 64)),
    "vila1.5-3b": ((2560, 32, 20, 20, 6912), (384, 14, 1152, 27, 16, 4304)),
    "nvila-lite-2b": ((1536, 28, 12, 2, 8960), (448, 14, 1152, 27, 16, 4304)),
    "nvila-8b": ((3584, 28, 28, 4, 18944), (448, 14, 1152, 27, 16, 4304)),
}
# Rows of embed_tokens/lm_head at the real shapes (Efficient-Large-Model/VILA1.5-3b llm/config.json:
# its Llama has 32000); the fixture tokenizer keeps its few hundred tokens, the rest are rows no text reaches, as
# in a checkpoint whose embeddings were resized. NVILA-Lite-2B keeps the tokenizer's size: its
# media ids must stay >= the LLM vocabulary (151648 there), which a padded table would cover.
LLM_ROWS = {"vila1.5-3b": 32000}
MARKER = "FIXTURE"        # file in every fixture's root: what may be overwritten
QWEN2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
                  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT: What is in the "
          "image? Describe the picture. How many objects are there? The robot sees a red cube on the left "
          "and a blue ball on the right. Which image has more circles? Answer the question with one word. "
          "You are a helpful language and vision assistant.").split(". ")


def _specials(kind: str) -> dict:
    tokens = KINDS[kind][5]
    if tokens == "llama2":
        return {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "extra": [], "media": []}
    if tokens == "llama3":
        return {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "unk": None,
                "extra": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"], "media": []}
    return {"bos": None, "eos": "<|im_end|>", "unk": None, "extra": ["<|endoftext|>", "<|im_start|>"],
            "media": ["<vila/sentinel>", "<image>", "<vila/video>"]}


def build_tokenizer(kind: str, vocab: int, out_dir: str) -> tuple[int, dict]:
    """Train a byte-level BPE; returns (ids below the media tokens, special ids). Media tokens get
    the last ids, outside the LLM's vocabulary, as NVILA's <image> (151649 >= 151648) is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = _specials(kind)
    base = [t for t in (sp["unk"], sp["bos"], sp["eos"]) if t] + sp["extra"]
    tok = Tokenizer(models.BPE(unk_token=sp["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=base, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    llm_vocab = tok.get_vocab_size()
    tok.add_special_tokens(sp["media"])
    if sp["bos"]:
        bos_id = tok.token_to_id(sp["bos"])
        tok.post_processor = processors.TemplateProcessing(single=f"{sp['bos']} $A", special_tokens=[(sp["bos"], bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=sp["bos"], eos_token=sp["eos"], unk_token=sp["unk"],
                                   model_max_length=2048, padding_side="right")
    if KINDS[kind][1] == "auto":
        fast.chat_template = QWEN2_TEMPLATE
    fast.save_pretrained(out_dir)
    ids = {name: tok.token_to_id(sp[name]) for name in ("bos", "eos") if sp[name]}
    return llm_vocab, ids


def _llm(arch: str, shape, vocab: int, ids: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter = shape
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                  bos_token_id=ids.get("bos"), eos_token_id=ids["eos"], tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(rms_norm_eps=1e-5, rope_theta=10000.0, **common)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(rms_norm_eps=1e-6, rope_theta=1e6, **common)
        model = Qwen2ForCausalLM(cfg)
    # Peaky random logits: greedy equivalence tests need top-1 margins far above float noise.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 2.0 / hidden ** 0.5)
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    return model


def _vision(shape):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    size, patch, hidden, layers, heads, inter = shape
    cfg = SiglipVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, image_size=size, patch_size=patch, vision_use_head=False)
    proc = SiglipImageProcessor(size={"height": size, "width": size}, resample=3, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3, rescale_factor=1 / 255)
    return SiglipVisionModel(cfg), proc


def _save_tower(tower, out_dir: str) -> None:
    """save_pretrained, then re-key to the "vision_model." names real VILA checkpoints carry."""
    from safetensors.torch import load_file, save_file
    from vila_edge_export.checkpoint import SIGLIP_PREFIX

    tower.save_pretrained(out_dir)
    path = os.path.join(out_dir, "model.safetensors")
    state = {SIGLIP_PREFIX + k: v for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})


def _projector(kind: str, mm: int, hidden: int):
    from safetensors.torch import save_file
    from vila_edge_export.projector import build_projector

    module = build_projector(kind, mm, hidden, "row")
    return module, lambda path: save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)


def _sub_cfg(model, name: str, arch: str) -> dict:
    cfg = model.config.to_dict()
    cfg.update({"_name_or_path": f"./{name}", "architectures": [arch]})
    return cfg


def _init_dtype(torch_dtype, shape: str):
    """Big shapes are initialised directly in the checkpoint dtype (half the peak memory); tiny ones
    in fp32 then cast, as before."""
    import torch
    return torch.float32 if shape.startswith("tiny") else torch_dtype


def _with_default_dtype(dtype, make):
    import torch
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return make()
    finally:
        torch.set_default_dtype(old)


def write_fixture(out: str, kind: str = "vila1.5", projector: str | None = None, shape: str = "tiny",
                  dtype: str = "bfloat16", seed: int = 0, shard: bool = False, vocab: int = 400,
                  llm_layers: int | None = None, vision_layers: int | None = None) -> str:
    """Write a checkpoint to `out` atomically (a temp dir renamed into place). An existing `out`
    is replaced only if it is itself a fixture (holds MARKER): never a real checkpoint.
    `llm_layers` / `vision_layers` override the shape's layer counts (benchmarks that must fit a
    small machine keep every width and shrink depth; per-layer costs scale linearly)."""
    import torch

    if kind in OTHER_LAYOUTS:
        return OTHER_LAYOUTS[kind](out, shape=shape, dtype=dtype, seed=seed, llm_layers=llm_layers,
                                   vision_layers=vision_layers)
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MARKER)):
        raise FileExistsError(f"{out}: exists and is not a fixture written by vila-edge; choose another path")

    arch, template, aspect, tf_version, default_proj, _ = KINDS[kind]
    projector = projector or default_proj
    llm_shape, vis_shape = SHAPES[shape]
    llm_shape = llm_shape[:1] + (llm_layers or llm_shape[1],) + llm_shape[2:]
    vis_shape = vis_shape[:3] + (vision_layers or vis_shape[3],) + vis_shape[4:]
    multiples, ms_keys = MULTISCALE.get(kind, ((1,), {}))
    scales = [m * vis_shape[0] for m in multiples]
    mm_hidden = vis_shape[2] * len(scales)
    torch.manual_seed(seed)
    with atomic_dir(out, prefix=".fixture-") as tmp:
        llm_dir, vt_dir, mp_dir = (os.path.join(tmp, d) for d in ("llm", "vision_tower", "mm_projector"))
        llm_vocab, ids = build_tokenizer(kind, vocab, llm_dir)
        torch_dtype = getattr(torch, dtype)
        init = _init_dtype(torch_dtype, shape)
        llm = _with_default_dtype(init, lambda: _llm(arch, llm_shape, max(llm_vocab, LLM_ROWS.get(shape, 0)), ids))
        llm = llm.to(torch_dtype)
        llm.save_pretrained(llm_dir, max_shard_size="200KB" if shard else "5GB")
        llm_cfg = _sub_cfg(llm, "llm", llm.config.architectures[0] if llm.config.architectures else
                           ("LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"))
        del llm
        tower, proc = _with_default_dtype(init, lambda: _vision(vis_shape))
        if ms_keys.get("s2"):
            # VILA1.5's SiglipVisionTowerS2 sets the processor to the largest scale before saving it
            # [unverified for the released file]; the reader must not insist on the tower's size.
            proc.size = {"height": scales[-1], "width": scales[-1]}
        _save_tower(tower.to(torch_dtype), vt_dir)
        proc.save_pretrained(vt_dir)
        tower_cfg = _sub_cfg(tower, "vision_tower", "SiglipVisionModel")
        del tower
        proj, save_proj = _projector(projector, mm_hidden, llm_shape[0])
        proj.to(torch_dtype)
        os.makedirs(mp_dir)
        save_proj(os.path.join(mp_dir, "model.safetensors"))
        proj_cfg = {"_name_or_path": "./mm_projector", "architectures": ["MultimodalProjector"],
                    "model_type": "v2l_projector", "mm_projector_type": projector}
        with open(os.path.join(mp_dir, "config.json"), "w") as f:
            json.dump(proj_cfg, f, indent=2)
        top = {
            "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": llm_shape[0],
            "mm_hidden_size": mm_hidden, "image_aspect_ratio": aspect, "interpolate_mode": "linear",
            "vision_resolution": -1, "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": template == "auto", "num_video_frames": 8,
            "s2": False, "dynamic_s2": False, "min_tiles": 1, "max_tiles": 12,
            "s2_scales": ",".join(str(s) for s in scales), "s2_max_split_size": vis_shape[0],
            "model_dtype": f"torch.{dtype}", "transformers_version": tf_version,
            "llm_cfg": llm_cfg,
            "vision_tower_cfg": tower_cfg,
            "mm_projector_cfg": proj_cfg,
        }
        top.update(ms_keys)
        if aspect == "dynamic_s2":      # NVILA-8B's config has no tiling keys: max_tiles defaults to 12
            del top["min_tiles"], top["max_tiles"]
        if template != "auto":
            top["conv_mode"] = template
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(top, f, indent=2, default=str)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(f"random weights: kind {kind}, shape {shape}, seed {seed}\n")
    return out


def _vila_u(out, **kw):
    from vila_edge_export.fixtures_vila_u import write_fixture as write_vila_u
    return write_vila_u(out, **kw)


# Kinds whose checkpoint layout is not the three-folder VILA one: kind -> writer(out, shape=, dtype=,
# seed=, llm_layers=, vision_layers=). VILA-U: vila_edge_export/fixtures_vila_u.py (its own shapes).
OTHER_LAYOUTS = {"vila-u": _vila_u}
OTHER_SHAPES = ("tiny-384", "vila-u-7b-256")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--kind", choices=sorted(KINDS) + sorted(OTHER_LAYOUTS), default="vila1.5")
    ap.add_argument("--projector", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES) + list(OTHER_SHAPES), default="tiny")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", action="store_true", help="write llm/ as several safetensors shards")
    ap.add_argument("--llm-layers", type=int, default=None, help="override the shape's LLM layer count")
    ap.add_argument("--vision-layers", type=int, default=None, help="override the shape's SigLIP layer count")
    args = ap.parse_args(argv)
    print(write_fixture(args.out, args.kind, args.projector, args.shape, args.dtype, args.seed, args.shard,
                        llm_layers=args.llm_layers, vision_layers=args.vision_layers))


if __name__ == "__main__":
    main()
