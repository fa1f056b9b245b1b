"""Random-weight VILA-U checkpoints in the real layout (mit-han-lab/vila-u@096623c), any shape.

    python -m vila_edge_export.fixtures OUT --kind vila-u [--shape tiny|tiny-384|vila-u-7b-256] [--llm-layers N]
    python -m vila_edge_export.fixtures_vila_u OUT --shape vila-u-7b-256 --llm-layers 1 --head-layers 1   # benchmarks

Layout (vila-u.md §1): config.json (model_type "vila_u_llama"), llm/ (Llama, the four added tokens
<im_start> <im_end> <vi_start> <vi_end> the last ids of the vocabulary, rope_scaling linear x2 as
context_length_extension saves it [inferred]), mm_projector/ (mlp2x_gelu), vision_tower/ (one
model.safetensors with rqvaesiglip.* -- SigLIP, per-depth codebooks with a padding row and EMA
buffers, post_quant_conv, the pixel decoder -- and rqtransformer.*, the depth transformer).
Key names follow mit-han-lab/vila-u@096623c:vila_u/model/vila_u_arch.py:113-141 (prefixes stripped
by the saver) and the module trees of RQS/ (= vila_u/model/multimodal_encoder/rqvaesigliptransformer/).
"""
import json
import os

from vila_edge.atomic import atomic_dir
from vila_edge_export.fixtures import CORPUS, MARKER

ADDED_TOKENS = ("<im_start>", "<im_end>", "<vi_start>", "<vi_end>")   # vila_u_arch.py:540-545 add order
# SigLIP configs named by `pretrained_model` (vila-u.md §1.6 table; dims from the public SigLIP
# configs [unverified here]): hidden, intermediate, layers, heads, patch, image size.
SIGLIP_HUB = {"google/siglip-large-patch16-256": (1024, 4096, 24, 16, 16, 256),
              "google/siglip-so400m-patch14-384": (1152, 4304, 27, 16, 14, 384)}
SHAPES = {
    # llm: (hidden, layers, heads, intermediate, rows or None = tokenizer size)
    # siglip: (hidden, intermediate, layers, heads, patch, image size); hub id or None = local config
    # K codebook rows, D depth, ddconfig, depth head (E, layers, heads), decoder_latent_shape
    "tiny": dict(llm=(64, 2, 4, 128, None), siglip=(64, 128, 3, 4, 8, 32), hub=None, K=32, D=3,
                 dd=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=32),
                 head=(32, 2, 4), dec_latent=None),
    # The 384 structure at a tiny size: 30 // 8 = 3x3 grid ("valid" conv drops 6 px), latent
    # bilinearly resized to 2x2 before decoding (vila-u.md §8).
    "tiny-384": dict(llm=(64, 2, 4, 128, None), siglip=(64, 128, 3, 4, 8, 30), hub=None, K=32, D=4,
                     dd=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], z_channels=32),
                     head=(32, 2, 4), dec_latent=[2, 2]),
    # vila-u-7b-256 (vila-u.md §1.6 table; ddconfig and head sizes [inferred, unverified]).
    "vila-u-7b-256": dict(llm=(4096, 32, 32, 11008, 32004), siglip=SIGLIP_HUB["google/siglip-large-patch16-256"],
                          hub="google/siglip-large-patch16-256", K=16384, D=4,
                          dd=dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                                  z_channels=256),
                          head=(2560, 6, 40), dec_latent=None),
}


def build_tokenizer(out_dir: str, rows: int | None) -> tuple[int, dict]:
    """Byte-level BPE (nothing can be downloaded; the real one is Llama-2's sentencepiece) whose last
    four ids are ADDED_TOKENS; with `rows`, unused fillers first so they land at rows-4..rows-1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    if rows:
        tok.add_special_tokens([f"<unused{i}>" for i in range(rows - 4 - tok.get_vocab_size())])
    tok.add_special_tokens(list(ADDED_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_max_length=2048, padding_side="right")
    fast.save_pretrained(out_dir)
    ids = {t: tok.token_to_id(t) for t in ADDED_TOKENS}
    with open(os.path.join(out_dir, "added_tokens.json"), "w") as f:
        json.dump(ids, f, indent=2, sort_keys=True)
    return tok.get_vocab_size(), {"bos": tok.token_to_id("<s>"), "eos": tok.token_to_id("</s>")}


def _llm(shape, vocab: int, ids: dict, out_dir: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inter, _ = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=0,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():        # peaky logits: greedy parity needs top-1 margins far above float noise
        for layer in model.model.layers:   # fan-in scaled (not 0.02): the last hidden state must depend
            for lin in (*layer.self_attn.children(), *layer.mlp.children()):    # on the prompt, for CFG
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.normal_(0.0, 1.5 / lin.in_features ** 0.5)
        model.lm_head.weight.normal_(0.0, 2.0 / hidden ** 0.5)
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    model.to(dtype).save_pretrained(out_dir)
    # transformers 4.36.2's form (the version VILA-U pins, environment_setup.sh:28), with the
    # context_length_extension rope_scaling (language_model/builder.py:13-20,34-35) [inferred].
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": heads, "hidden_act": "silu", "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
           "vocab_size": vocab, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": 0,
           "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": str(dtype).split(".")[-1],
           "model_max_length": 4096, "tokenizer_padding_side": "right", "transformers_version": "4.36.2",
           "_name_or_path": "./llm"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids["bos"], "do_sample": True, "eos_token_id": ids["eos"], "max_length": 4096,
                   "pad_token_id": 0, "temperature": 0.9, "top_p": 0.6, "transformers_version": "4.36.2"},
                  f, indent=2, sort_keys=True)
    return raw


def _siglip_state(s, with_text: bool) -> dict:
    """SigLIP weights under rqvaesiglip.siglip_model.* (the text model is unused at inference; the
    real file has it, the big fixture leaves it out to fit this machine)."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    hidden, inter, layers, heads, patch, size = s
    vcfg = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                patch_size=patch, image_size=size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    if with_text:
        model = SiglipModel(SiglipConfig(vision_config=vcfg, text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)))
    else:      # transformers 5 drops SiglipVisionModel's "vision_model." prefix; real files have it
        model = SiglipVisionModel(SiglipVisionConfig(**vcfg))
    state = {k if with_text or k.startswith("vision_model.") else "vision_model." + k: v
             for k, v in model.state_dict().items()}
    return {"rqvaesiglip.siglip_model." + k: v for k, v in state.items()}, vcfg


def _rq_state(shape, llm_hidden: int) -> dict:
    """Codebooks (K+1 rows, row K = padding, RQS/rqvaesiglip/quantizations.py:18,34), post_quant_conv,
    the decoder (vila_edge_export/reference_vila_u.py's modules carry the real names) and rqtransformer.*."""
    import torch
    from vila_edge_export.reference_vila_u import DepthTransformer, PixelDecoder

    C, K, D, dd = shape["siglip"][0], shape["K"], shape["D"], shape["dd"]
    state = {}
    for d in range(D):
        book = torch.randn(K + 1, C)
        book[K] = 0.0
        state[f"rqvaesiglip.quantizer.codebooks.{d}.weight"] = book
        state[f"rqvaesiglip.quantizer.codebooks.{d}.cluster_size_ema"] = torch.ones(K)
        state[f"rqvaesiglip.quantizer.codebooks.{d}.embed_ema"] = book[:K].clone()
    conv = torch.nn.Conv2d(C, dd["z_channels"], 1)
    state["rqvaesiglip.post_quant_conv.weight"], state["rqvaesiglip.post_quant_conv.bias"] = conv.weight, conv.bias
    dec = PixelDecoder(**dd, resolution=_resolution(shape))
    state.update({"rqvaesiglip.decoder." + k: v for k, v in dec.state_dict().items()})
    E, n_layer, n_head = shape["head"]
    head = DepthTransformer(C, llm_hidden, E, n_layer, n_head, K, D)
    with torch.no_grad():   # peaky depth logits (greedy parity needs margins) that depend on h and the codes
        head.classifier_mlp.linear.weight.normal_(0.0, 4.0 / E ** 0.5)
        head.in_mlp_2.weight.normal_(0.0, 2.0 / llm_hidden ** 0.5)
        head.in_mlp_1.weight.normal_(0.0, 1.0 / C ** 0.5)
    state.update({"rqtransformer." + k: v for k, v in head.state_dict().items()})
    return state


def _resolution(shape) -> int:
    """ddconfig resolution: the decoder's output side (latent side x 2^(levels-1))."""
    side = (shape["dec_latent"] or [shape["siglip"][5] // shape["siglip"][4]])[0]
    return side * 2 ** (len(shape["dd"]["ch_mult"]) - 1)


def _tower_config(shape, llm_hidden: int, siglip_cfg: dict) -> dict:
    C, K, D = shape["siglip"][0], shape["K"], shape["D"]
    grid = shape["siglip"][5] // shape["siglip"][4]
    dd = dict(double_z=False, in_channels=3, out_ch=3, dropout=0.0, resolution=_resolution(shape), **shape["dd"])
    E, n_layer, n_head = shape["head"]
    return {"architectures": ["RQVAESIGLIPTransformer"], "model_type": "rqvaesigliptransformer_model",
            "hidden_size": C, "_name_or_path": "./vision_tower",
            "rqvaesiglip": {"model_type": "rqvaesiglip_model", "architectures": ["RQVAESiglipModel"],
                            "embed_dim": C, "n_embed": K, "latent_shape": [grid, grid, C],
                            "code_shape": [grid, grid, D], "shared_codebook": False,
                            "restart_unused_codes": True, "ddconfig": dd, "decay": 0.99,
                            "latent_loss_weight": 0.25, "decoder_latent_shape": shape["dec_latent"],
                            # a hub id for the real shapes; else a SigLIP config inline, as a local
                            # dir would provide (vila-u.md §8)
                            "pretrained_model": shape["hub"] or siglip_cfg},
            "rqtransformer": {"model_type": "rqtransformer_model", "architectures": ["RQTransformer"],
                              "block_size": [grid, grid, D], "input_embed_dim_1": C,
                              "input_embed_dim_2": llm_hidden, "embed_dim": E, "vocab_size": K,
                              "head": {"n_layer": n_layer, "block": {"n_head": n_head}}}}


def write_vila_u(tmp: str, shape_name: str, dtype: str, llm_layers: int | None, vision_layers: int | None,
                 head_layers: int | None = None) -> None:
    """Fill `tmp` (fixtures.write_fixture's temporary dir) with a VILA-U checkpoint."""
    import torch

    shape = dict(SHAPES[shape_name])
    hidden, layers, heads, inter, rows = shape["llm"]
    shape["llm"] = (hidden, llm_layers or layers, heads, inter, rows)
    if head_layers:
        shape["head"] = (shape["head"][0], head_layers, shape["head"][2])
    if vision_layers:
        shape["siglip"] = shape["siglip"][:2] + (vision_layers,) + shape["siglip"][3:]
    torch_dtype = getattr(torch, dtype)
    # Real shapes are initialised in the checkpoint dtype (half the peak memory of fp32).
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if shape_name.startswith("tiny") else torch_dtype)
    try:
        _write(tmp, shape, torch_dtype, dtype, rows, hidden)
    finally:
        torch.set_default_dtype(old)


def _write(tmp, shape, torch_dtype, dtype, rows, hidden):
    import torch
    from safetensors.torch import save_file

    llm_dir, vt_dir, mp_dir = (os.path.join(tmp, d) for d in ("llm", "vision_tower", "mm_projector"))
    vocab, ids = build_tokenizer(llm_dir, rows)
    llm_cfg = _llm(shape["llm"], vocab, ids, llm_dir, torch_dtype)
    os.makedirs(vt_dir)
    state, siglip_cfg = _siglip_state(shape["siglip"], with_text=shape["hub"] is None)
    state.update(_rq_state(shape, hidden))
    save_file({k: v.detach().to(torch_dtype).contiguous() for k, v in state.items()},
              os.path.join(vt_dir, "model.safetensors"), metadata={"format": "pt"})
    del state
    tower_cfg = _tower_config(shape, hidden, siglip_cfg)
    with open(os.path.join(vt_dir, "config.json"), "w") as f:
        json.dump(tower_cfg, f, indent=2)
    size = shape["siglip"][5]
    with open(os.path.join(vt_dir, "preprocessor_config.json"), "w") as f:   # saved, never read (§1.6)
        json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"height": size, "width": size},
                   "crop_size": {"height": size, "width": size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                   "resample": 3, "rescale_factor": 1 / 255}, f, indent=2)
    C = shape["siglip"][0]
    proj = torch.nn.Module()          # MultimodalProjector.layers (base_projector.py:42-49)
    proj.layers = torch.nn.Sequential(torch.nn.Linear(C, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    os.makedirs(mp_dir)
    save_file({k: v.detach().to(torch_dtype).contiguous() for k, v in proj.state_dict().items()},
              os.path.join(mp_dir, "model.safetensors"))
    proj_cfg = {"_name_or_path": "./mm_projector", "architectures": ["MultimodalProjector"],
                "model_type": "v2l_projector", "mm_projector_type": "mlp2x_gelu"}
    with open(os.path.join(mp_dir, "config.json"), "w") as f:
        json.dump(proj_cfg, f, indent=2)
    top = {"architectures": ["VILAULlamaModel"], "model_type": "vila_u_llama", "hidden_size": hidden,
           "mm_hidden_size": C, "image_aspect_ratio": "resize", "num_video_frames": 8,
           "mm_use_im_start_end": True, "mm_use_vi_start_end": True, "mm_use_im_patch_token": False,
           "mm_vision_select_layer": -2, "mm_projector_type": "mlp2x_gelu", "model_dtype": f"torch.{dtype}",
           "resume_path": None, "transformers_version": "4.36.2",
           "llm_cfg": llm_cfg, "vision_tower_cfg": tower_cfg, "mm_projector_cfg": proj_cfg}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(top, f, indent=2)


def write_fixture(out: str, shape: str = "tiny", dtype: str = "bfloat16", seed: int = 0,
                  llm_layers: int | None = None, vision_layers: int | None = None, head_layers: int | None = None) -> str:
    """Atomic write (temp dir renamed into place); an existing `out` is replaced only if it is a fixture."""
    import torch

    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MARKER)):
        raise FileExistsError(f"{out}: exists and is not a fixture written by vila-edge; choose another path")
    torch.manual_seed(seed)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with atomic_dir(out, prefix=".fixture-") as tmp:
        write_vila_u(tmp, shape, dtype, llm_layers, vision_layers, head_layers)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(f"random weights: kind vila-u, shape {shape}, seed {seed}\n")
    return out


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    for part in ("llm", "vision", "head"):
        ap.add_argument(f"--{part}-layers", type=int, default=None, help=f"override the shape's {part} layer count")
    a = ap.parse_args(argv)
    print(write_fixture(a.out, a.shape, a.dtype, a.seed, a.llm_layers, a.vision_layers, a.head_layers))


if __name__ == "__main__":
    main()
