"""Torch reference of VILA-U (arXiv 2409.04429): understanding and image generation, eager, fp32.

Transcribed from mit-han-lab/vila-u@096623c (RQS/ = vila_u/model/multimodal_encoder/
rqvaesigliptransformer/, TR/ = vila_u/train/transformers_replace/), sharing nothing with the runtime:
- SigLIP to the second-to-last layer, residual quantization, sum of the chosen codebook rows
  (RQS/rqvaesiglip/modeling_rqvaesiglip.py:48-68, RQS/rqvaesiglip/quantizations.py:32-58,242-269);
- pixel decoder (RQS/rqvaesiglip/modules.py:12-249, the RQ-VAE / taming topology; the two bf16
  casts at modules.py:32 and modeling_rqvaesiglip.py:74 are left out: this reference is fp32);
- depth transformer (RQS/rqtransformer/modeling_rqtransformer.py:79-177, attention.py:15-105);
- generation loop (vila_u/model/vila_u_arch.py:614-640, TR/models/llama/modeling_llama.py:861-872,
  1045-1069): cond rows then uncond rows, left-padded, CFG on the depth logits only, codes shared.
The LLM is transformers' Llama with eager attention (the reference runs flash-attn: a CPU port
swaps in eager causal attention plus the padding mask, vila-u.md §8).
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- pixel decoder (RQS/rqvaesiglip/modules.py) -------------------------------------------------

def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention, 1x1-conv q/k/v/proj_out, scale c^-0.5."""
    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        B, C, H, W = h.shape
        q = self.q(h).reshape(B, C, H * W).permute(0, 2, 1)          # (B, HW, C)
        k = self.k(h).reshape(B, C, H * W)                           # (B, C, HW)
        w = torch.softmax(torch.bmm(q, k) * C ** -0.5, dim=2)        # (B, HW query, HW key)
        v = self.v(h).reshape(B, C, H * W)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PixelDecoder(nn.Module):
    """Decoder(ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution), out_ch 3."""
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution, out_ch=3, **_):
        super().__init__()
        levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResBlock(block_in, block_in), AttnBlock(block_in), \
            ResBlock(block_in, block_in)
        ups = []
        for lvl in reversed(range(levels)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResBlock(block_in, ch * ch_mult[lvl]))
                block_in = ch * ch_mult[lvl]
                if res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if lvl != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out, self.conv_out = _norm(block_in), nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(range(len(self.up))):
            up = self.up[lvl]
            for j, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[j](h)
            if lvl != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- depth transformer (RQS/rqtransformer/) -----------------------------------------------------

class CausalAttention(nn.Module):
    def __init__(self, E, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.proj = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x):
        B, T, E = x.shape
        split = lambda t: t.reshape(B, T, self.heads, E // self.heads).transpose(1, 2)   # (B, H, T, Dh)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = q @ k.transpose(-1, -2) / math.sqrt(E // self.heads)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).tril().logical_not(), float("-inf"))
        return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, E))


class Block(nn.Module):
    def __init__(self, E, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = CausalAttention(E, heads)
        self.mlp = nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(), nn.Linear(4 * E, E))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DepthTransformer(nn.Module):
    """in_mlp_1 (C->E) for partial code sums, in_mlp_2 (LLM hidden->E), pos_emb_d, pre-LN blocks,
    classifier_mlp (LayerNorm, Linear E->K) shared by every depth."""
    def __init__(self, C, llm_hidden, E, n_layer, n_head, K, D):
        super().__init__()
        self.in_mlp_1, self.in_mlp_2 = nn.Linear(C, E), nn.Linear(llm_hidden, E)
        self.pos_emb_d = nn.Parameter(torch.randn(1, D, E) * 0.02)
        self.head_transformer = nn.Module()
        self.head_transformer.blocks = nn.ModuleList(Block(E, n_head) for _ in range(n_layer))
        self.classifier_mlp = nn.Module()
        self.classifier_mlp.layer_norm, self.classifier_mlp.linear = nn.LayerNorm(E), nn.Linear(E, K)

    def logits(self, h, partial_sums):
        """h (B, llm_hidden), partial_sums (B, d, C): sums of the first 1..d chosen rows -> (B, K) for depth d."""
        x = self.in_mlp_2(h)[:, None]
        if partial_sums.shape[1]:
            x = torch.cat([x, self.in_mlp_1(partial_sums)], dim=1)
        x = x + self.pos_emb_d[:, :x.shape[1]]
        for block in self.head_transformer.blocks:
            x = block(x)
        return self.classifier_mlp.linear(self.classifier_mlp.layer_norm(x[:, -1]))


def sample_codes(logits, temperature, top_k, top_p, generator):
    """RQS/rqtransformer/modeling_rqtransformer.py:16-74; temperature 0 = argmax (tests)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.nan_to_num(logits, nan=float("-inf")).softmax(-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p                      # mass of the tokens ranked above
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---- the whole model --------------------------------------------------------------------------

# vicuna_v1 (vila_u/conversation.py:106-118), both resolutions.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def understanding_prompt(query: str, images: int) -> str:
    """vila_u/utils/media.py:87-93: "<image>\\n" per image before the text; no <im_start> wrapper."""
    return f"{SYSTEM} USER: " + "<image>\n" * images + f"{query.strip()} ASSISTANT:"


def generation_prompts(prompt: str, video: bool = False) -> tuple[str, str]:
    """(cond, uncond): vila_u/utils/tokenizer.py:56-59 (video ends in <vi_start>); the negative prompt
    " " strips to "" and renders without the separator (vila_arch.py:622-623 + conversation.py:54-55);
    the video negative prompt ending in <vi_start> too is [inferred]."""
    start = "<vi_start>" if video else "<im_start>"
    return f"{SYSTEM} USER: {prompt.strip()} ASSISTANT: {start}", f"{SYSTEM} USER:ASSISTANT: {start}"


VIDEO_FRAMES = 8     # GENERATION_VIDEO_FRAMES, vila_arch.py:642-671


def tokenize(tokenizer, prompt: str) -> list:
    """vila_u/mm_utils.py:183-197: [BOS], text chunks tokenized alone with their BOS dropped, -200 per <image>."""
    ids = [tokenizer.bos_token_id]
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids += tokenizer(chunk).input_ids[1:]
    return ids


IMAGE_TOKEN_INDEX = -200


class VilaUReference:
    def __init__(self, spec, dtype=torch.float32):
        from transformers import AutoTokenizer, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel
        from vila_edge_export.checkpoint import load_weights

        self.spec, self.dtype = spec, dtype
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path("llm"))
        # eager attention: the reference runs flash-attn (causal + key padding), numerically the same
        self.llm = LlamaForCausalLM.from_pretrained(spec.path("llm"), dtype=dtype, attn_implementation="eager").eval()
        s = spec.siglip
        self.siglip = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, patch_size=s.patch, image_size=s.image_size, layer_norm_eps=s.ln_eps,
            hidden_act="gelu_pytorch_tanh", vision_use_head=False)).to(dtype).eval()
        w = load_weights(spec.path("vision_tower"), dtype)
        pre = "rqvaesiglip.siglip_model.vision_model."
        tower = {k[len(pre):]: v for k, v in w.items() if k.startswith(pre) and not k[len(pre):].startswith("head.")}
        missing = self.siglip.load_state_dict(tower, strict=False).missing_keys   # transformers 5: no vision_model.
        if missing:
            raise KeyError(f"SigLIP weights missing: {missing[:3]}")
        K, D = spec.codebook_size, spec.depth
        self.codebooks = [w[f"rqvaesiglip.quantizer.codebooks.{0 if spec.shared_codebook else d}.weight"] for d in range(D)]
        C = spec.siglip.hidden
        self.post_quant_conv = nn.Conv2d(C, spec.decoder["z_channels"], 1).to(dtype)
        self.post_quant_conv.load_state_dict({"weight": w["rqvaesiglip.post_quant_conv.weight"],
                                              "bias": w["rqvaesiglip.post_quant_conv.bias"]})
        self.decoder = PixelDecoder(**spec.decoder).to(dtype).eval()
        self.decoder.load_state_dict(_sub(w, "rqvaesiglip.decoder."))
        E, n_layer, n_head = spec.head
        self.head = DepthTransformer(C, spec.llm.hidden, E, n_layer, n_head, K, D).to(dtype).eval()
        self.head.load_state_dict(_sub(w, "rqtransformer."))
        pw = load_weights(spec.path("mm_projector"), dtype)
        self.projector = nn.Sequential(nn.Linear(C, spec.llm.hidden), nn.GELU(), nn.Linear(spec.llm.hidden, spec.llm.hidden))
        self.projector.to(dtype).load_state_dict(_sub(pw, "layers."))

    def pixels(self, image) -> torch.Tensor:
        """image_aspect_ratio "resize": PIL resize to S (bicubic), then (x/255 - 0.5) / 0.5 (mean = std
        = 0.5; the processor's other defaults [unverified]) -> (1, 3, S, S)."""
        import numpy as np
        from PIL import Image

        S = self.spec.siglip.image_size
        x = np.asarray(image.convert("RGB").resize((S, S), Image.BICUBIC), dtype=np.float32) / 255.0
        return torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1)[None].to(self.dtype)

    @torch.no_grad()
    def encode(self, pixels):
        """(N, 3, S, S) -> codes (N, g, g, D) int64, z_q (N, g, g, C)."""
        hidden = self.siglip(pixel_values=pixels, output_hidden_states=True).hidden_states
        x = hidden[self.spec.siglip.layers - 1]                    # output of layer L-2 (index 0 = embeddings)
        N, T, C = x.shape
        g = int(math.isqrt(T))
        r, agg, codes = x.reshape(N * T, C), torch.zeros(N * T, C, dtype=x.dtype), []
        for book in self.codebooks:
            c = book[:self.spec.codebook_size]                     # row K is padding, never chosen
            dist = (r * r).sum(1, keepdim=True) + (c * c).sum(1)[None] - 2.0 * r @ c.T
            k = dist.argmin(1)
            codes.append(k)
            r, agg = r - c[k], agg + c[k]
        return torch.stack(codes, -1).reshape(N, g, g, -1), agg.reshape(N, g, g, C)

    def code_sum(self, codes):
        """(..., D) -> (..., C): sum over depth of each depth's codebook row."""
        return sum(book[codes[..., d]] for d, book in enumerate(self.codebooks))

    @torch.no_grad()
    def decode(self, codes):
        """(N, g, g, D) -> uint8 (N, H, W, 3): (x + 1) * 127.5, clamped, truncated (vila_arch.py:638, inference.py:8-14)."""
        z = self.code_sum(codes).permute(0, 3, 1, 2)               # (N, C, g, g)
        if self.spec.decoder_latent:
            z = F.interpolate(z, size=tuple(self.spec.decoder_latent), mode="bilinear", align_corners=False)
        x = self.decoder(self.post_quant_conv(z))
        return ((x.float() + 1) * 127.5).clamp(0, 255).permute(0, 2, 3, 1).numpy().astype("uint8")

    @torch.no_grad()
    def prompt_embeds(self, query: str, images: list) -> torch.Tensor:
        """(1, T, hidden): a one-turn question about `images`, each -200 spliced with the projector
        of that image's z_q (vila_arch.py:285-338). Also AWQ's calibration input (llm_quant.py)."""
        ids = tokenize(self.tokenizer, understanding_prompt(query, len(images)))
        embed = self.llm.get_input_embeddings()
        feats = iter(self.projector(self.encode(self.pixels(im))[1].flatten(1, 2))[0] for im in images)
        parts = [next(feats) if t == IMAGE_TOKEN_INDEX else embed(torch.tensor([t]))[0:1] for t in ids]
        return torch.cat([p if p.dim() == 2 else p[None] for p in parts])[None]

    @torch.no_grad()
    def understand(self, query: str, images: list, max_new_tokens: int = 16) -> list:
        """Greedy reply ids (stops after EOS) for a one-turn question about `images`."""
        x = self.prompt_embeds(query, images)
        out, past, reply = self.llm(inputs_embeds=x, use_cache=True), None, []
        for _ in range(max_new_tokens):
            past = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            reply.append(tok)
            if tok in self.spec.llm.eos_ids:
                break
            out = self.llm(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        return reply

    @torch.no_grad()
    def generate_codes(self, prompt: str, n: int = 1, cfg: float = 3.0, temperature: float = 1.0,
                       top_k: int = 900, top_p: float = 0.96, generator=None, video: bool = False,
                       positions: int | None = None, timing: dict | None = None, text_head: bool = False):
        """-> codes (n, g, g, D); video: (n, VIDEO_FRAMES, g, g, D), max_new_tokens = T * frames and
        frame f = positions f*T .. f*T+T-1 (vila_arch.py:642-671). Rows: n cond then n uncond,
        left-padded with id 0 and mask 0. positions: stop after that many (benchmarks; codes (n, positions, D)).
        Benchmarks: timing (a dict) gets prefill_s, llm_s (prefill + steps + their projector inputs),
        depth_s (depth transformer + sampling) and, with text_head, text_head_s: the official loop's
        dummy text token at every step (_text_head), which does not change the codes."""
        cond, uncond = (tokenize(self.tokenizer, p) for p in generation_prompts(prompt, video))
        rows = [cond] * n + [uncond] * n
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)      # TR/models/llama/modeling_llama.py:1107-1113
        t0 = time.perf_counter()
        out = self.llm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        timing = {} if timing is None else timing
        took = time.perf_counter() - t0
        timing.update(prefill_s=took, llm_s=took, depth_s=0.0, text_head_s=0.0)
        text_rng = torch.Generator().manual_seed(0)
        codes = []
        frames = VIDEO_FRAMES if video else 1
        for t in range(positions or self.spec.image_tokens * frames):
            t0 = time.perf_counter()
            if t:
                x = self.projector(self.code_sum(torch.cat([codes[-1], codes[-1]])))[:, None]   # (2n, 1, hidden)
                mask = torch.cat([mask, torch.ones(2 * n, 1, dtype=mask.dtype)], 1)
                pos = pos[:, -1:] + 1
                out = self.llm.model(inputs_embeds=x, attention_mask=mask, position_ids=pos,
                                     past_key_values=out.past_key_values, use_cache=True)
            t1 = time.perf_counter()
            codes.append(self._depth(out.last_hidden_state[:, -1], n, cfg, temperature, top_k, top_p, generator))
            timing["llm_s"] += t1 - t0
            timing["depth_s"] += time.perf_counter() - t1
            if text_head:
                self._text_head(out.last_hidden_state, codes[-1], text_rng, timing)
        if positions:
            return torch.stack(codes, 1)
        g = self.spec.siglip.grid
        shape = (n, frames, g, g, self.spec.depth) if video else (n, g, g, self.spec.depth)
        return torch.stack(codes, 1).reshape(shape)

    def _text_head(self, hidden, codes, rng, timing: dict) -> None:
        """The official loop's dummy text token, whose cost the official loop pays at every position
        (TR/models/llama/modeling_llama.py:1045-1073; TR/generation/utils.py:2884-2909 `sample`):
        lm_head over the LLM output with its last row replaced by projector(z_q of this position's
        codes), then the llm's generation_config sampler (temperature 0.9, top-k 50 -- transformers'
        default --, top-p 0.6) on the last row and one draw per row. The token is discarded (vila-u.md
        §5.6), drawn from its own generator so the codes' random stream is the same with or without it."""
        from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)
        t0 = time.perf_counter()
        warp = LogitsProcessorList([TemperatureLogitsWarper(0.9), TopKLogitsWarper(50), TopPLogitsWarper(0.6)])
        z = self.projector(self.code_sum(torch.cat([codes, codes])))[:, None]               # (2n, 1, hidden)
        logits = self.llm.lm_head(torch.cat([hidden[:, :-1], z], 1)).float()
        scores = warp(None, logits[:, -1])
        torch.multinomial(scores.softmax(-1), 1, generator=rng)
        timing["text_head_s"] += time.perf_counter() - t0

    def _depth(self, h, n, cfg, temperature, top_k, top_p, generator):
        """One position's D codes (n, D): CFG on the depth logits only; the codes are shared by both rows."""
        partial, total, picked = h.new_zeros(2 * n, 0, self.spec.siglip.hidden), 0, []
        for d, book in enumerate(self.codebooks):
            logits = self.head.logits(h, partial)                  # (2n, K)
            logits = logits[n:] + cfg * (logits[:n] - logits[n:])
            k = sample_codes(logits, temperature, top_k, top_p, generator)
            picked.append(k)
            total = total + book[torch.cat([k, k])]
            partial = torch.cat([partial, total[:, None]], 1)
        return torch.stack(picked, -1)


def _sub(w: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
