"""vila-tiny-shapes in torch: VILA1.5's architecture at toy size, for training and as an eval backend.

SigLIP tower -> hidden_states[-2] (all patches, no post-LN, no head) -> mlp_downsample projector,
VILA1.5 column-major token order (vila_edge_export/projector.py) -> Llama, with each "<image>" of the
prompt replaced by the image's projected tokens (-200 convention). Text goes through vicuna_v1.
Saved in VILA's own layout, weights in bf16. Sources: NVlabs/VILA@1c88211: llava/model/multimodal_encoder/
vision_encoder.py, llava/mm_utils.py (tokenizer_image_token), llava/conversation.py,
llava/model/llava_arch.py (save_pretrained).
"""
import json
import os
import shutil

import numpy as np
import torch
from torch import nn

from trainers.tiny_shapes.attention_targets import attention_terms
from vila_edge_export.projector import build_projector
from vila_edge.atomic import atomic_dir
from vila_edge.families import COLUMN_MAJOR, IMAGE_TOKEN_INDEX, RESIZE
from vila_edge.preprocess import PixelSpec, normalize
from vila_edge.splice import tokenizer_image_token
from vila_edge.templates import get_template

TEMPLATE = get_template("vicuna_v1")    # the runtime's, so training prompts are the ones it renders
SPECIALS = ("<unk>", "<s>", "</s>")   # ids 0, 1, 2 as in Llama-2's tokenizer
PROJECTOR_TYPE = "mlp_downsample"
SELECT_LAYER = -2                      # mm_vision_select_layer of every VILA1.5 checkpoint
MEAN = STD = (0.5, 0.5, 0.5)           # SigLIP preprocessing
# Training pads tokens and image batches to multiples of this: oneDNN's bf16 kernels are built
# per shape, and a new shape every step costs more than the padding.
SHAPE_BUCKET = 16
# transformers < 5 (VILA1.5 used 4.36) names SiglipVisionModel weights "vision_model.*"; 5.x drops
# the wrapper. Files are written the 4.x way, as real VILA checkpoints are
# (NVlabs/VILA@1c88211:llava/model/llava_arch.py).
SIGLIP_PREFIX = "vision_model."


def render_prompt(turns: list) -> str:
    """vicuna_v1 through the runtime's template: turns are (user, answer-or-None), every answer but
    the last one given; ends with "ASSISTANT:", or with the last answer and its "</s>"."""
    messages = []
    for user, answer in turns[:-1]:
        if answer is None:
            raise ValueError(f"turn {user!r}: only the last turn may be unanswered")
        messages += [("user", user), ("assistant", answer)]
    user, answer = turns[-1]
    prompt = TEMPLATE.render(messages + [("user", user)])
    return prompt if answer is None else prompt + " " + answer + TEMPLATE.stop_texts[0]


def tokenize_prompt(tok, prompt: str) -> list:
    """The runtime's tokenizer_image_token with this tokenizer (which adds BOS to every chunk)."""
    return tokenizer_image_token(lambda chunk: tok(chunk).input_ids, prompt, tok.bos_token_id)


def answer_ids(tok, answer: str) -> list:
    return tok.encode(" " + answer, add_special_tokens=False) + [tok.eos_token_id]


def encode_conversation(tok, turns: list) -> tuple:
    """ids of the whole conversation and labels (-100 except on answer tokens + their </s>).

    Each answer span is checked to equal answer_ids(answer) at the exact position where the prompt
    of its round ends, so greedy decoding from that prompt can reproduce it token for token.
    """
    ids = tokenize_prompt(tok, render_prompt(turns))
    labels = [-100] * len(ids)
    for k, (_, answer) in enumerate(turns):
        start = len(tokenize_prompt(tok, render_prompt(turns[:k] + [(turns[k][0], None)])))
        span = answer_ids(tok, answer)
        if ids[start:start + len(span)] != span:
            raise ValueError(f"answer {answer!r} does not tokenize the same inside the conversation")
        labels[start:start + len(span)] = span
    return ids, labels


def build_tokenizer(corpus: list, vocab_size: int):
    """A Llama-like BPE: Metaspace ("▁") pieces, a dummy prefix only at the start of each encoded
    text (so "</s>USER:" has no space, as Llama with legacy=False), BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Punctuation is its own piece, as in Llama's SentencePiece vocabulary: "triangle?" is
    # "▁triangle" + "?", the same word piece as in "a red triangle".
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation(behavior="isolated")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # Every printable ASCII character and "\n" is in the alphabet, so no text maps to <unk>.
    alphabet = [chr(c) for c in range(33, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=1024, padding_side="right")


def preprocess(img, size: int) -> np.ndarray:
    """PIL -> CHW float32 through the runtime's VILA1.5 "resize" + SiglipImageProcessor path."""
    return normalize(img.convert("RGB"), PixelSpec(size=size, mean=MEAN, std=STD, mode=RESIZE))


class TinyVila(nn.Module):
    def __init__(self, llm_cfg, vision_cfg, tokenizer):
        from transformers import LlamaForCausalLM, SiglipVisionModel

        super().__init__()
        self.tokenizer = tokenizer
        self.tower = SiglipVisionModel(vision_cfg)
        self.projector = build_projector(PROJECTOR_TYPE, vision_cfg.hidden_size, llm_cfg.hidden_size, COLUMN_MAJOR)
        self.llm = LlamaForCausalLM(llm_cfg)
        # Eager attention: training supervises attention probabilities (trainers/tiny_shapes/attention_targets.py),
        # which SDPA does not return. Not saved: the exported graph has its own attention.
        self.llm.config._attn_implementation = "eager"

    @property
    def image_size(self) -> int:
        return self.tower.config.image_size

    def pixels(self, images: list) -> torch.Tensor:
        return torch.from_numpy(np.stack([preprocess(im, self.image_size) for im in images]))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, T_img, H]: hidden_states[-2] of the tower through the projector."""
        train_tower = torch.is_grad_enabled() and any(p.requires_grad for p in self.tower.parameters())
        with torch.set_grad_enabled(train_tower):
            out = self.tower(pixel_values=pixels, output_hidden_states=True)
        return self.projector(out.hidden_states[SELECT_LAYER])

    def embed(self, ids_batch: list, feats: torch.Tensor, bucket: int = 1) -> tuple:
        """Splice features at the -200 ids (in order, no extra tokens); right-pad to a multiple of
        `bucket`. -> (embeds, mask)."""
        table = self.llm.get_input_embeddings()
        rows, k = [], 0
        for ids in ids_batch:
            ids_t = torch.tensor(ids)
            text = table(ids_t.clamp(min=0))                         # (T, H); -200 rows are dropped below
            parts, last = [], 0
            for pos in (ids_t == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
                parts += [text[last:pos], feats[k]]
                k, last = k + 1, pos + 1
            rows.append(torch.cat(parts + [text[last:]]))
        if k != len(feats):
            raise ValueError(f"{k} <image> placeholders for {len(feats)} images")
        T = -(-max(len(r) for r in rows) // bucket) * bucket
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        out = rows[0].new_zeros(len(rows), T, rows[0].shape[-1])
        for b, r in enumerate(rows):
            out[b, :len(r)], mask[b, :len(r)] = r, 1
        return out, mask

    def spliced_labels(self, ids_batch: list, labels_batch: list, n_img_tokens: int, T: int) -> torch.Tensor:
        out = torch.full((len(ids_batch), T), -100)
        for b, (ids, labels) in enumerate(zip(ids_batch, labels_batch)):
            row = []
            for i, l in zip(ids, labels):
                row += [-100] * n_img_tokens if i == IMAGE_TOKEN_INDEX else [l]
            out[b, :len(row)] = torch.tensor(row)
        return out

    def loss(self, ids_batch, labels_batch, pixels, groups: int = 2) -> torch.Tensor:
        """Mean next-token loss over labelled tokens. The batch runs as `groups` sub-batches of
        similar length (few-shot prompts are twice as long as single-image ones): less padding."""
        return self.loss_features(ids_batch, labels_batch, self.bucketed_features(pixels), groups)

    def bucketed_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """image_features with the batch padded to a multiple of SHAPE_BUCKET (see there)."""
        n = len(pixels)
        if not n:
            return torch.zeros(0, 0, self.llm.config.hidden_size)
        pad = -n % SHAPE_BUCKET
        return self.image_features(torch.cat([pixels, pixels.new_zeros(pad, *pixels.shape[1:])]))[:n]

    def loss_features(self, ids_batch, labels_batch, feats: torch.Tensor, groups: int = 2,
                      attention: tuple | None = None) -> torch.Tensor:
        """`loss` with the image tokens given: [N_images, T_img, H], in placeholder order.

        attention: (targets per row from attention_targets.conversation_targets, weight): adds
        weight * the mean attention cross-entropy of the supervised heads."""
        n_img = [sum(i == IMAGE_TOKEN_INDEX for i in ids) for ids in ids_batch]
        first = [sum(n_img[:b]) for b in range(len(ids_batch))]
        order = sorted(range(len(ids_batch)), key=lambda b: len(ids_batch[b]) + n_img[b] * feats.shape[1])
        total, count, att_sum, att_n = 0.0, 0, 0.0, 0
        size = -(-len(order) // groups)
        for g in range(0, len(order), size):
            members = order[g:g + size]
            f = [feats[first[b] + k] for b in members for k in range(n_img[b])]
            embeds, mask = self.embed([ids_batch[b] for b in members], f, SHAPE_BUCKET)
            labels = self.spliced_labels([ids_batch[b] for b in members], [labels_batch[b] for b in members],
                                         feats.shape[1], embeds.shape[1])
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, output_attentions=attention is not None)
            logits = out.logits.float()
            total = total + nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                        ignore_index=-100, reduction="sum")
            count += int((labels[:, 1:] != -100).sum())
            if attention is not None:
                s, n = attention_terms(out.attentions, [attention[0][b] for b in members])
                att_sum, att_n = att_sum + s, att_n + n
        loss = total / max(1, count)
        return loss + attention[1] * att_sum / max(1, att_n) if attention is not None else loss

    @torch.no_grad()
    def generate(self, images: list, user_message: str, max_new_tokens: int = 16) -> str:
        """Greedy answer to one user message holding one "<image>" per image."""
        ids = tokenize_prompt(self.tokenizer, render_prompt([(user_message, None)]))
        feats = self.image_features(self.pixels(images)) if images else []
        embeds, _ = self.embed([ids], feats)
        out, past, eos = [], None, self.tokenizer.eos_token_id
        for _ in range(max_new_tokens):
            res = self.llm(inputs_embeds=embeds, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            embeds = self.llm.get_input_embeddings()(torch.tensor([[nxt]]))
        return self.tokenizer.decode(out)

    def save(self, root: str) -> None:
        """Write VILA's layout (config.json + llm/ + vision_tower/ + mm_projector/) atomically, bf16."""
        # Written by hand or by train_tiny.write_examples, not by save: carried over to the new copy.
        keep = {n: os.path.join(root, n) for n in ("examples", "README.md") if os.path.exists(os.path.join(root, n))}
        with atomic_dir(root) as tmp:
            self._write(tmp, keep)

    def _write(self, tmp: str, keep: dict) -> None:
        from safetensors.torch import save_file
        from transformers import SiglipImageProcessorPil

        llm = _bf16_copy(self.llm)
        llm.save_pretrained(os.path.join(tmp, "llm"), safe_serialization=True)
        save_tokenizer(self.tokenizer, os.path.join(tmp, "llm"))
        tower = _bf16_copy(self.tower)
        tower.config.architectures = ["SiglipVisionModel"]
        tower.config.save_pretrained(os.path.join(tmp, "vision_tower"))
        state = {SIGLIP_PREFIX + k: v.contiguous() for k, v in tower.state_dict().items()}
        save_file(state, os.path.join(tmp, "vision_tower", "model.safetensors"), metadata={"format": "pt"})
        S = self.image_size
        SiglipImageProcessorPil(size={"height": S, "width": S}, resample=3, rescale_factor=1 / 255,
                                image_mean=list(MEAN), image_std=list(STD), do_resize=True, do_rescale=True,
                                do_normalize=True).save_pretrained(os.path.join(tmp, "vision_tower"))
        os.makedirs(os.path.join(tmp, "mm_projector"))
        _write_json(os.path.join(tmp, "mm_projector", "config.json"), PROJECTOR_CFG)
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in self.projector.state_dict().items()}
        save_file(state, os.path.join(tmp, "mm_projector", "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "config.json"), top_config(llm.config, tower.config))
        for name, src in keep.items():
            (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, os.path.join(tmp, name))

    @classmethod
    def load(cls, root: str, dtype=torch.float32) -> "TinyVila":
        """Load the saved layout; bf16 weights are upcast to `dtype` for the forward."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, LlamaConfig, SiglipVisionConfig

        tok = AutoTokenizer.from_pretrained(os.path.join(root, "llm"))
        m = cls(LlamaConfig.from_pretrained(os.path.join(root, "llm")),
                SiglipVisionConfig.from_pretrained(os.path.join(root, "vision_tower")), tok)
        for sub, mod in (("llm", m.llm), ("vision_tower", m.tower), ("mm_projector", m.projector)):
            state = load_file(os.path.join(root, sub, "model.safetensors"))
            if sub == "vision_tower":
                state = {k.removeprefix(SIGLIP_PREFIX): v for k, v in state.items()}
            mod.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        return m.to(dtype).eval()


PROJECTOR_CFG = {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
                 "mm_projector_type": PROJECTOR_TYPE}


def save_tokenizer(tok, folder: str) -> None:
    """save_pretrained, plus what transformers 4.x (VILA1.5's 4.36) needs to load it as a fast
    tokenizer: a class name it knows and special_tokens_map.json."""
    tok.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(path, cfg)
    _write_json(os.path.join(folder, "special_tokens_map.json"),
                {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token})


def _bf16_copy(module):
    import copy

    m = copy.deepcopy(module).to(torch.bfloat16)
    m.config.dtype = torch.bfloat16
    return m


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def top_config(llm_cfg, vision_cfg) -> dict:
    """The top-level config.json of a VILA1.5 checkpoint (as Efficient-Large-Model/VILA1.5-3b's), for these
    sizes."""
    llm = json.loads(llm_cfg.to_json_string(use_diff=False))
    theta = llm.get("rope_parameters", {}).get("rope_theta", 10000.0)
    # Readers written for transformers 4.36 (VILA1.5's version) look for these flat fields.
    llm.update({"_name_or_path": "./llm", "architectures": ["LlamaForCausalLM"], "rope_theta": theta,
                "rope_scaling": None, "torch_dtype": "bfloat16", "dtype": "bfloat16", "model_max_length": 1024,
                "tokenizer_model_max_length": 1024, "tokenizer_padding_side": "right"})
    vis = json.loads(vision_cfg.to_json_string(use_diff=False))
    vis.update({"_name_or_path": "./vision_tower", "architectures": ["SiglipVisionModel"],
                "torch_dtype": "bfloat16", "dtype": "bfloat16"})
    return {
        "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
        "hidden_size": llm_cfg.hidden_size, "mm_hidden_size": vision_cfg.hidden_size,
        "image_aspect_ratio": "resize", "interpolate_mode": "linear", "vision_resolution": -1,
        "mm_vision_select_layer": SELECT_LAYER, "mm_vision_select_feature": "cls_patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "num_video_frames": 8,
        "s2": False, "dynamic_s2": False, "model_dtype": "torch.bfloat16", "transformers_version": "4.36.2",
        "conv_mode": "vicuna_v1", "llm_cfg": llm, "vision_tower_cfg": vis,
        "mm_projector_cfg": {"_name_or_path": "./mm_projector", **PROJECTOR_CFG},
    }
