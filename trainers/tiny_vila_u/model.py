"""vila-u-tiny-shapes in torch: VILA-U's architecture at toy size, trained here, saved in VILA-U's layout.

Modules carry the real checkpoint names (mit-han-lab/vila-u@096623c; RQS/ = vila_u/model/multimodal_encoder/
rqvaesigliptransformer/), so saving is a prefix per part:
  rq.siglip_model     SigLIP (vision + a tiny text model for the contrastive loss)  -> rqvaesiglip.siglip_model.*
  rq.quantizer        per-depth codebooks, K+1 rows (row K: padding), EMA buffers    -> rqvaesiglip.quantizer.*
  rq.post_quant_conv, rq.decoder   the pixel decoder (vila_edge_export/reference_vila_u.py's modules)
  depth_head          the depth transformer (same)                                   -> rqtransformer.*
  projector           mlp2x_gelu                                                      -> mm_projector/layers.*
  llm                 Llama with <im_start> <im_end> <vi_start> <vi_end> last in the vocabulary -> llm/
Understanding reuses trainers/tiny_shapes/model.py's TinyVila (splicing at -200, the vicuna_v1
prompts the runtime renders, the question loss); only the image features differ: projector(sum of
the chosen codebook rows), as VILA-U reads them (RQS/rqvaesiglip/modeling_rqvaesiglip.py:48-68).
"""
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn

from trainers.tiny_shapes.model import TinyVila, _write_json, save_tokenizer
from vila_edge.atomic import atomic_dir
from vila_edge_export.fixtures_vila_u import ADDED_TOKENS, _tower_config
from vila_edge_export.reference_vila_u import DepthTransformer, PixelDecoder

# Toy sizes. 48 px in 16 px patches: a 3x3 grid, one position per scene cell (scenes.GRID).
SIGLIP = dict(hidden=64, intermediate=256, layers=3, heads=4, patch=16, image_size=48)
K, D = 128, 4                                   # codebook rows, residual depth
DECODER = dict(ch=32, ch_mult=[1, 1, 1, 2, 2], num_res_blocks=0, attn_resolutions=[], z_channels=64)
HEAD = (64, 2, 4)                               # depth transformer: E, layers, heads
LLM = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384)
ROPE_SCALING = {"type": "linear", "factor": 2.0}   # as context_length_extension saves it (vila-u.md §1.4)
EMA_DECAY = 0.99                                # rqvaesiglip "decay" (RQS/rqvaesiglip/quantizations.py)


def tower_shape() -> dict:
    """The shape dict vila_edge_export/fixtures_vila_u.py writes configs from."""
    s = SIGLIP
    return dict(siglip=(s["hidden"], s["intermediate"], s["layers"], s["heads"], s["patch"], s["image_size"]),
                hub=None, K=K, D=D, dd=DECODER, head=HEAD, dec_latent=None)


class Codebook(nn.Module):
    """VQEmbedding: K+1 rows, the last a padding row never chosen; EMA-updated, not by gradients."""

    def __init__(self, k: int, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k + 1, c), requires_grad=False)
        self.register_buffer("cluster_size_ema", torch.zeros(k))
        self.register_buffer("embed_ema", torch.zeros(k, c))

    @torch.no_grad()
    def ema_update(self, r: torch.Tensor, codes: torch.Tensor, gen: torch.Generator,
                   weight: torch.Tensor | None = None) -> None:
        """RQ-VAE's EMA k-means step on residuals r (N, C); rows unused for long restart at a random
        residual (restart_unused_codes). weight (N,), mean 1: each residual's share of the k-means
        (training-time balance of what the rows describe; None: all equal, as RQ-VAE)."""
        k = self.embed_ema.shape[0]
        onehot = F.one_hot(codes, k).float()                                   # (N, K)
        if weight is not None:
            onehot = onehot * weight[:, None]
        self.cluster_size_ema.mul_(EMA_DECAY).add_(onehot.sum(0), alpha=1 - EMA_DECAY)
        self.embed_ema.mul_(EMA_DECAY).add_(onehot.T @ r, alpha=1 - EMA_DECAY)
        n = self.cluster_size_ema.sum()
        size = (self.cluster_size_ema + 1e-5) / (n + k * 1e-5) * n
        self.weight[:k] = self.embed_ema / size[:, None]
        dead = self.cluster_size_ema < 0.03
        if dead.any():
            n = int(dead.sum())
            pick = (torch.randint(len(r), (n,), generator=gen) if weight is None
                    else torch.multinomial(weight, n, replacement=True, generator=gen))
            self.weight[:k][dead] = r[pick]
            self.embed_ema[dead], self.cluster_size_ema[dead] = r[pick], 1.0

    @torch.no_grad()
    def init_from(self, r: torch.Tensor, gen: torch.Generator) -> None:
        k = self.embed_ema.shape[0]
        pick = torch.randint(len(r), (k,), generator=gen)
        self.weight[:k], self.embed_ema[:], self.cluster_size_ema[:] = r[pick], r[pick], 1.0


class RQVAESiglip(nn.Module):
    def __init__(self, siglip_cfg):
        from transformers import SiglipModel

        super().__init__()
        self.siglip_model = SiglipModel(siglip_cfg)
        C = SIGLIP["hidden"]
        self.quantizer = nn.Module()
        self.quantizer.codebooks = nn.ModuleList(Codebook(K, C) for _ in range(D))
        self.post_quant_conv = nn.Conv2d(C, DECODER["z_channels"], 1)
        self.decoder = PixelDecoder(**DECODER, resolution=SIGLIP["image_size"])

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, T, C): SigLIP up to the second-to-last layer (the last is skipped,
        RQS/rqvaesiglip/modeling_rqvaesiglip.py:63)."""
        vm = self.siglip_model.vision_model
        x = vm.embeddings(pixels)
        for layer in vm.encoder.layers[:-1]:
            x = layer(x, None)
        return x

    def quantize(self, x: torch.Tensor) -> tuple:
        """x (N, T, C) -> codes (N, T, D), z_q (N, T, C), residuals before each depth (D, N*T, C)."""
        N, T, C = x.shape
        r, agg, codes, residuals = x.reshape(N * T, C).detach(), 0, [], []
        for book in self.quantizer.codebooks:
            c = book.weight[:K]
            dist = (r * r).sum(1, keepdim=True) + (c * c).sum(1)[None] - 2.0 * r @ c.T
            k = dist.argmin(1)
            residuals.append(r)
            codes.append(k)
            r, agg = r - c[k], agg + c[k]
        return torch.stack(codes, -1).reshape(N, T, D), agg.reshape(N, T, C), torch.stack(residuals)

    def code_sum(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., C)."""
        return sum(book.weight[codes[..., d]] for d, book in enumerate(self.quantizer.codebooks))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, T, C) -> (N, 3, S, S) in about [-1, 1]."""
        N, T, C = z.shape
        g = int(T ** 0.5)
        return self.decoder(self.post_quant_conv(z.transpose(1, 2).reshape(N, C, g, g)))

    def pooled(self, z: torch.Tensor) -> torch.Tensor:
        """The contrastive image embedding of z (N, T, C): the last layer, post-LN and MAP head."""
        vm = self.siglip_model.vision_model
        return vm.head(vm.post_layernorm(vm.encoder.layers[-1](z, None)))


class TinyVilaU(TinyVila):
    def __init__(self, llm_cfg, siglip_cfg, tokenizer):
        from transformers import LlamaForCausalLM

        nn.Module.__init__(self)
        self.tokenizer = tokenizer
        self.rq = RQVAESiglip(siglip_cfg)
        C, H = SIGLIP["hidden"], llm_cfg.hidden_size
        self.depth_head = DepthTransformer(C, H, *HEAD, K, D)
        self.projector = nn.Sequential(nn.Linear(C, H), nn.GELU(), nn.Linear(H, H))
        self.llm = LlamaForCausalLM(llm_cfg)
        self.llm.config._attn_implementation = "eager"     # attention supervision reads the probabilities

    @property
    def image_size(self) -> int:
        return SIGLIP["image_size"]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, T, H]: projector(z_q) from the frozen tower."""
        with torch.no_grad():
            z = self.rq.quantize(self.rq.features(pixels))[1]
        return self.projector(z)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.rq.quantize(self.rq.features(pixels))[0]

    def depth_logits(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depth transformer over every depth: h (M, H), codes (M, D) -> (M, D, K)
        (RQS/rqtransformer/modeling_rqtransformer.py:100-124: s_0 = in_mlp_2(h), s_d = in_mlp_1(sum of
        the first d chosen rows))."""
        dh = self.depth_head
        rows = torch.stack([b.weight[codes[:, d]] for d, b in enumerate(self.rq.quantizer.codebooks)], 1)
        partial = rows.cumsum(1)[:, :-1]                                      # (M, D-1, C)
        x = torch.cat([dh.in_mlp_2(h)[:, None], dh.in_mlp_1(partial)], 1) + dh.pos_emb_d
        for block in dh.head_transformer.blocks:
            x = block(x)
        return dh.classifier_mlp.linear(dh.classifier_mlp.layer_norm(x))

    # ---- the VILA-U layout --------------------------------------------------------------------
    def save(self, root: str) -> None:
        keep = {n: os.path.join(root, n) for n in ("examples", "README.md") if os.path.exists(os.path.join(root, n))}
        with atomic_dir(root) as tmp:
            self._write(tmp)
            for name, src in keep.items():
                (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, os.path.join(tmp, name))

    def _write(self, tmp: str) -> None:
        from safetensors.torch import save_file

        bf16 = lambda state: {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}  # noqa: E731
        llm_dir, vt_dir, mp_dir = (os.path.join(tmp, d) for d in ("llm", "vision_tower", "mm_projector"))
        self.llm.to(torch.bfloat16).save_pretrained(llm_dir, safe_serialization=True)
        self.llm.float()
        save_tokenizer(self.tokenizer, llm_dir)
        vocab = len(self.tokenizer)
        _write_json(os.path.join(llm_dir, "added_tokens.json"),
                    {t: self.tokenizer.convert_tokens_to_ids(t) for t in sorted(ADDED_TOKENS)})
        llm_cfg = llm_config_436(self.llm.config, vocab)
        _write_json(os.path.join(llm_dir, "config.json"), llm_cfg)
        os.makedirs(vt_dir)
        state = {"rqvaesiglip." + k: v for k, v in self.rq.state_dict().items()}
        state.update({"rqtransformer." + k: v for k, v in self.depth_head.state_dict().items()})
        save_file(bf16(state), os.path.join(vt_dir, "model.safetensors"), metadata={"format": "pt"})
        vcfg = self.rq.siglip_model.config.vision_config
        siglip_cfg = dict(hidden_size=vcfg.hidden_size, intermediate_size=vcfg.intermediate_size,
                          num_hidden_layers=vcfg.num_hidden_layers, num_attention_heads=vcfg.num_attention_heads,
                          patch_size=vcfg.patch_size, image_size=vcfg.image_size, hidden_act=vcfg.hidden_act,
                          layer_norm_eps=vcfg.layer_norm_eps)
        tower_cfg = _tower_config(tower_shape(), self.llm.config.hidden_size, siglip_cfg)
        _write_json(os.path.join(vt_dir, "config.json"), tower_cfg)
        S = SIGLIP["image_size"]
        _write_json(os.path.join(vt_dir, "preprocessor_config.json"),   # saved, never read (vila-u.md §1.6)
                    {"image_processor_type": "CLIPImageProcessor", "size": {"height": S, "width": S},
                     "crop_size": {"height": S, "width": S}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                     "resample": 3, "rescale_factor": 1 / 255})
        os.makedirs(mp_dir)
        save_file(bf16({"layers." + k: v for k, v in self.projector.state_dict().items()}),
                  os.path.join(mp_dir, "model.safetensors"), metadata={"format": "pt"})
        proj_cfg = {"_name_or_path": "./mm_projector", "architectures": ["MultimodalProjector"],
                    "model_type": "v2l_projector", "mm_projector_type": "mlp2x_gelu"}
        _write_json(os.path.join(mp_dir, "config.json"), proj_cfg)
        H, C = self.llm.config.hidden_size, SIGLIP["hidden"]
        _write_json(os.path.join(tmp, "config.json"), {
            "architectures": ["VILAULlamaModel"], "model_type": "vila_u_llama", "hidden_size": H,
            "mm_hidden_size": C, "image_aspect_ratio": "resize", "num_video_frames": 8,
            "mm_use_im_start_end": True, "mm_use_vi_start_end": True, "mm_use_im_patch_token": False,
            "mm_vision_select_layer": -2, "mm_projector_type": "mlp2x_gelu", "model_dtype": "torch.bfloat16",
            "resume_path": None, "transformers_version": "4.36.2",
            "llm_cfg": llm_cfg, "vision_tower_cfg": tower_cfg, "mm_projector_cfg": proj_cfg})
        _write_json(os.path.join(llm_dir, "generation_config.json"), {
            "bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 1024, "pad_token_id": 0,
            "temperature": 0.9, "top_p": 0.6, "transformers_version": "4.36.2"})


def llm_config_436(cfg, vocab: int) -> dict:
    """llm/config.json as transformers 4.36.2 writes it (the version VILA-U pins), rope_scaling included."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "rope_scaling": dict(ROPE_SCALING), "vocab_size": vocab, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False, "attention_bias": False,
            "torch_dtype": "bfloat16", "model_max_length": cfg.max_position_embeddings,
            "tokenizer_padding_side": "right", "transformers_version": "4.36.2", "_name_or_path": "./llm"}


def build_configs(vocab: int):
    from transformers import LlamaConfig, SiglipConfig

    llm = LlamaConfig(vocab_size=vocab, num_key_value_heads=LLM["num_attention_heads"], rms_norm_eps=1e-5,
                      rope_scaling=dict(ROPE_SCALING, rope_type="linear"), rope_theta=10000.0,
                      tie_word_embeddings=False, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, hidden_act="silu", **LLM)
    s = SIGLIP
    siglip = SiglipConfig(
        vision_config=dict(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                           num_attention_heads=s["heads"], patch_size=s["patch"], image_size=s["image_size"],
                           hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        text_config=dict(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=1,
                         num_attention_heads=s["heads"], vocab_size=vocab, max_position_embeddings=96,
                         projection_size=s["hidden"], bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return llm, siglip
