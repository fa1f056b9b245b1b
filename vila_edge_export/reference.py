"""The torch reference of the whole VILA forward: the oracle every engine is compared against.

Built from transformers' own SigLIP / Llama / Qwen2 modules (eager attention) and VILA's projector
(vila_edge_export/projector.py), tokenized with transformers' tokenizer and spliced as VILA's own code does
(NVlabs/VILA@1c88211:llava/mm_utils.py, llava/model/llava_arch.py). Nothing here is shared with the ONNX
builders or the runtime except the chat-template strings and image tiling, which have their own
tests against hand-written values.
"""
import numpy as np
import torch

from vila_edge_export.checkpoint import CheckpointSpec, load_vision_weights, load_weights
from vila_edge_export.projector import build_projector
from vila_edge.families import IMAGE_TOKEN_INDEX, SENTINEL, get_family


def _hf_llm(spec: CheckpointSpec, dtype):
    from transformers import AutoConfig, LlamaForCausalLM, Qwen2ForCausalLM

    cfg = AutoConfig.from_pretrained(spec.path("llm"))
    cfg._attn_implementation = "eager"
    cls = LlamaForCausalLM if spec.llm.arch == "llama" else Qwen2ForCausalLM
    model = cls(cfg)
    state = load_weights(spec.path("llm"))
    if spec.llm.tie_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def _hf_tower(spec: CheckpointSpec, dtype):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig.from_pretrained(spec.path("vision_tower"))
    cfg._attn_implementation = "eager"
    tower = SiglipVisionModel(cfg)
    missing, unexpected = tower.load_state_dict(load_vision_weights(spec), strict=False)
    # post_layernorm and the pooling head are never used by VILA (hidden_states[-2]).
    unused = ("post_layernorm", "head")
    bad = [k for k in missing if not k.startswith(unused)] + list(unexpected)
    if bad:
        raise KeyError(f"vision_tower weights do not match SigLIP: {bad[:5]}")
    return tower.to(dtype).eval()


class ReferenceVLM:
    def __init__(self, spec: CheckpointSpec, dtype=torch.float32):
        from transformers import AutoTokenizer

        self.spec, self.dtype = spec, dtype
        self.family = get_family(spec.family)
        self.llm = _hf_llm(spec, dtype)
        self.tower = _hf_tower(spec, dtype)
        p = spec.projector
        self.projector = build_projector(p.kind, p.in_channels, p.out_channels, p.token_order)
        self.projector.load_state_dict(load_weights(spec.path("mm_projector")), strict=True)
        self.projector.to(dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path("llm"))

    @torch.no_grad()
    def tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] -> [N, S*S, C]: hidden_states[select_layer], cast to the input dtype (§2)."""
        x = pixels.to(self.dtype)
        return self.tower(x, output_hidden_states=True).hidden_states[self.spec.vision.select_layer].to(x.dtype)

    @torch.no_grad()
    def encode_images(self, pixels: np.ndarray) -> torch.Tensor:
        """[N, 3, R, R] normalised pixels -> [N, tokens, H] projected features (one-scale towers)."""
        return self.projector(self.tower_features(torch.from_numpy(pixels)))

    def tokenize(self, prompt: str) -> list:
        """VILA's tokenizer_image_token (SENTINEL) or plain tokenization (MEDIA_TOKEN)."""
        tok = self.tokenizer
        if self.family.splice != SENTINEL:
            return tok(prompt).input_ids
        # VILA's own loop again, not vila_edge.splice.join_image_chunks: the oracle stays independent
        # of the runtime it checks (tests/test_equivalence.py).
        chunks = [tok(c).input_ids for c in prompt.split("<image>")]
        ids, offset = [], 0
        if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
            offset = 1
            ids.append(chunks[0][0])
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[offset:])
        return ids

    @torch.no_grad()
    def embed(self, ids: list, features: list) -> torch.Tensor:
        """Splice: each media marker takes the next image's features (+ end tokens for NVILA)."""
        table = self.llm.get_input_embeddings()
        media_id = (IMAGE_TOKEN_INDEX if self.family.splice == SENTINEL
                    else self.tokenizer.convert_tokens_to_ids("<image>"))
        end = self.tokenizer(self.family.media_end_text).input_ids if self.family.media_end_text else []
        parts, text, k = [], [], 0
        for i in ids:
            if i != media_id:
                text.append(i)
                continue
            if text:
                parts.append(table(torch.tensor(text)))
                text = []
            parts.append(features[k].to(self.dtype))
            if end:
                parts.append(table(torch.tensor(end)))
            k += 1
        if k != len(features):
            raise ValueError(f"prompt has {k} image markers but {len(features)} images")
        if text:
            parts.append(table(torch.tensor(text)))
        return torch.cat(parts)[None]                               # (1, T, H)

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds=embeds).logits[0, -1].float()

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, max_new_tokens: int, stop_ids: set) -> list:
        """Greedy decoding with HF's own KV cache, sampling only ids of the original vocabulary."""
        vocab = self.spec.llm.vocab_size
        out = self.llm(inputs_embeds=embeds, use_cache=True)
        past, ids = out.past_key_values, []
        logits = out.logits[0, -1]
        for _ in range(max_new_tokens):
            nxt = int(torch.argmax(logits[:vocab]))
            ids.append(nxt)
            if nxt in stop_ids:
                break
            step = self.llm.get_input_embeddings()(torch.tensor([[nxt]]))
            out = self.llm(inputs_embeds=step, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        return ids


def hf_pixels(spec: CheckpointSpec, image) -> np.ndarray:
    """Pixels by transformers' own SigLIP image processor (the independent preprocessing oracle)."""
    from transformers import SiglipImageProcessor

    proc = SiglipImageProcessor.from_pretrained(spec.path("vision_tower"))
    return proc(images=[image.convert("RGB")], return_tensors="np")["pixel_values"]
