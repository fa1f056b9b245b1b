"""Pipeline: the user-facing entry. images + prompt -> preprocess -> vision -> splice -> LLM -> text.

    pipe = Pipeline("engines/vila-tiny")
    pipe.chat("photo.jpg", "What is on the table?")
    pipe.chat(["Compare", img_a, "with", img_b, "- what moved?"])
    conv = pipe.conversation(); conv.send(frame, "Where is the cup?"); conv.send(None, "And now?")
"""
import itertools
import os
import threading
import time

import numpy as np
from tokenizers import Tokenizer

from vila_edge.backend import OrtSession
from vila_edge.errors import PromptError
from vila_edge.families import get_family
from vila_edge.llm import KVConfig, LLMEngine
from vila_edge.manifest import Manifest
from vila_edge.preprocess import PixelSpec, load_video
from vila_edge.sampling import GenerationConfig, Sampler
from vila_edge.splice import IMAGE_POSITION, PLACEHOLDER, Splicer
from vila_edge.templates import get_template
from vila_edge.vision import VisionEncoder

DEFAULT_CONTEXT = 4096
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _is_image_part(part) -> bool:
    """In a parts list a string is text, unless it names an existing image file."""
    if not isinstance(part, str):
        return True
    return part.lower().endswith(IMAGE_EXTS) and os.path.isfile(part)


def engine_template(engine_dir: str, m: Manifest):
    """The chat template an engine was exported with (its jinja file where it has one)."""
    jinja = None
    if "chat_template" in m.files:
        with open(os.path.join(engine_dir, m.files["chat_template"]), encoding="utf-8") as f:
            jinja = f.read()
    return get_template(m.template, jinja, tuple(m.build.get("special_tokens", ("", ""))))


class Pipeline:
    def __init__(self, engine_dir: str, *, threads: int | None = None, max_context: int | None = None,
                 kv: KVConfig | None = None, int4_accuracy_level: int = 4):
        m = self.manifest = Manifest.load(engine_dir)
        self.engine_dir = engine_dir
        self.family = get_family(m.family)
        self.tokenizer = Tokenizer.from_file(os.path.join(engine_dir, m.files["tokenizer"]))
        self.template = engine_template(engine_dir, m)
        v = m.vision
        pixels = PixelSpec(size=v.image_size, mean=tuple(v.mean), std=tuple(v.std), mode=v.image_mode,
                           min_tiles=v.min_tiles, max_tiles=v.max_tiles)
        self.vision = VisionEncoder(OrtSession(os.path.join(engine_dir, m.files["vision"]), threads), pixels, m.dtype)
        # (V, C); fp16 in quantized and fp16 engines, rows are cast to the graph's input dtype when gathered.
        self.embeddings = np.load(os.path.join(engine_dir, m.files["embeddings"]), mmap_mode="r")
        self.max_context = min(max_context or DEFAULT_CONTEXT, m.llm.max_positions)
        weights = sum(os.path.getsize(os.path.join(engine_dir, f)) for f in m.files.values())
        llm = OrtSession(os.path.join(engine_dir, m.files["llm"]), threads, int4_accuracy_level=int4_accuracy_level)
        self.embeds_dtype = llm.input_dtype("inputs_embeds")
        self.llm = LLMEngine(llm, m.llm, m.dtype,
                             kv or KVConfig(), self.max_context, weights)
        self.splicer = Splicer(self.tokenizer, self.family, m.tokens, v.tokens_per_image, v.image_mode)
        self._seq_ids = itertools.count()
        self._ids_lock = threading.Lock()

    def chat(self, images=None, prompt: str | None = None, *, system: str | None = None, video=None, **gen) -> str:
        """One question, one answer. `gen`: GenerationConfig fields (max_new_tokens, temperature, ...)."""
        return "".join(self.stream(images, prompt, system=system, video=video, **gen))

    def stream(self, images=None, prompt: str | None = None, *, system: str | None = None, video=None, **gen):
        """Like chat, yielding text pieces as they are decoded."""
        conv = self.conversation(system)
        try:
            yield from conv.stream(images, prompt, video=video, **gen)
        finally:
            conv.close()

    def conversation(self, system: str | None = None) -> "Conversation":
        return Conversation(self, system)

    def new_seq_id(self) -> int:
        with self._ids_lock:
            return next(self._seq_ids)

    def user_message(self, images, prompt, video) -> tuple:
        """(text with one <image> per image, [image sources]) from the accepted input forms."""
        if prompt is None and isinstance(images, (list, tuple)) and any(isinstance(p, str) for p in images):
            text, sources = "", []
            for part in images:
                if _is_image_part(part):
                    text += self.family.part_text
                    sources.append(part)
                else:
                    text += part
        else:
            if prompt is None:
                raise PromptError("no prompt: pass a prompt string, or a list of text and image parts")
            sources = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
            text = prompt
            if sources and PLACEHOLDER not in text:
                text = self.family.part_text * len(sources) + text
        if video is not None:
            frames = load_video(video, self.manifest.num_video_frames)
            text = self.family.part_text * len(frames) + text    # frames come first, as VILA's video prompts
            sources = frames + sources
        return text, sources

    def embed(self, ids: np.ndarray, spans: list, tiles: list) -> np.ndarray:
        """[T, C] input embeddings: table rows for text ids, tile features at their spans."""
        text = ids != IMAGE_POSITION
        bad = ids[text & ((ids < 0) | (ids >= len(self.embeddings)))]
        if len(bad):
            raise PromptError(f"prompt contains token ids {sorted(set(bad.tolist()))[:5]} that are not text "
                              f"(outside the {len(self.embeddings)}-row embedding table); remove stray media tokens")
        out = np.empty((len(ids), self.embeddings.shape[1]), self.embeds_dtype)
        out[text] = self.embeddings[ids[text]]
        for start, k in spans:
            out[start: start + len(tiles[k])] = tiles[k]
        return out

    def token_embeds(self, ids: list) -> np.ndarray:
        """[T, C] table rows of text ids, in the LLM graph's input dtype."""
        return self.embeddings[ids].astype(self.embeds_dtype)


class Conversation:
    """A multi-turn chat. Its KV stays in the pool between turns: the next turn's prompt re-uses
    every full block of the previous turn's prefix (hash hits) and computes only what is new."""

    def __init__(self, pipe: Pipeline, system: str | None = None):
        self.pipe, self.system = pipe, system
        self.messages = []            # (role, text) with <image> placeholders
        self.tiles, self.digests, self.tiles_per_image = [], [], []
        self.seq = None
        self.last_stats = {}
        self.last_ids = []            # token ids generated by the last turn (stop token excluded)

    def send(self, images=None, prompt: str | None = None, *, video=None, **gen) -> str:
        return "".join(self.stream(images, prompt, video=video, **gen))

    def stream(self, images=None, prompt: str | None = None, *, video=None, **gen):
        pipe, t0 = self.pipe, time.perf_counter()
        cfg = GenerationConfig(**gen)
        text, sources = pipe.user_message(images, prompt, video)
        tiles, digests, counts = list(self.tiles), list(self.digests), list(self.tiles_per_image)
        for src in sources:
            feats, ds = pipe.vision.encode(src)
            tiles += list(feats)
            digests += ds
            counts.append(len(ds))
        t_vision = time.perf_counter() - t0
        messages = self.messages + [("user", text)]
        rendered = pipe.splicer.expand(pipe.template.render(messages, self.system), counts)
        sp = pipe.splicer.splice(rendered, digests)
        if len(sp.ids) >= pipe.max_context:
            raise PromptError(f"prompt is {len(sp.ids)} tokens ({len(sp.spans)} image tiles x "
                              f"{pipe.manifest.vision.tokens_per_image} tokens included); the engine's context "
                              f"holds {pipe.max_context}: shorten the prompt or use fewer images")
        seq = pipe.new_seq_id()
        budget = min(cfg.max_new_tokens, pipe.max_context - len(sp.ids))    # new tokens at most
        logits, cached = pipe.llm.prefill(seq, pipe.embed(sp.ids, sp.spans, tiles), sp.keys, budget)
        if self.seq is not None:
            pipe.llm.release(self.seq)
        self.seq = seq
        self.tiles, self.digests, self.tiles_per_image = tiles, digests, counts
        reply = yield from self._generate(logits, sp, cfg, budget, t0)
        self.messages = messages + [("assistant", reply.strip())]
        self.last_stats.update(prompt_tokens=len(sp.ids), cached_tokens=cached, vision_s=t_vision)

    def _generate(self, logits, sp, cfg: GenerationConfig, budget: int, t0: float):
        pipe = self.pipe
        tokens = pipe.manifest.tokens
        sampler = Sampler(cfg, pipe.manifest.llm.vocab_size, tokens.never_sample)
        stops = set(tokens.stop_ids)
        history, out_ids, shown, text = list(sp.ids[sp.ids >= 0]), [], 0, ""
        hold = max((len(s) for s in cfg.stop), default=1) - 1
        t_first, reason = None, "length"
        for step in range(budget):
            nxt = sampler(logits, np.asarray(history, np.int64))
            t_first = t_first or time.perf_counter()
            if nxt in stops:
                reason = "stop"
                break
            out_ids.append(nxt)
            history.append(nxt)
            text = pipe.tokenizer.decode(out_ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in cfg.stop if s in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                break
            safe = len(text) - hold
            if text.endswith("\ufffd"):   # an incomplete UTF-8 sequence: wait for its next byte
                safe = min(safe, len(text) - 1)
            if safe > shown:
                yield text[shown:safe]
                shown = safe
            if step + 1 < budget:
                try:
                    logits = pipe.llm.extend(self.seq, pipe.token_embeds([nxt]), np.asarray([nxt], np.int64))
                except BaseException:
                    self.seq = None   # the engine dropped the sequence
                    raise
        if len(text) > shown:
            yield text[shown:]
        t_end = time.perf_counter()
        self.last_ids = out_ids
        self.last_stats = {"finish_reason": reason, "new_tokens": len(out_ids),
                           "ttft_s": (t_first or t_end) - t0,
                           "decode_tok_s": (len(out_ids) - 1) / (t_end - t_first) if t_first and len(out_ids) > 1
                           and t_end > t_first else 0.0}
        return text

    def close(self) -> None:
        if self.seq is not None:
            self.pipe.llm.release(self.seq)
            self.seq = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
