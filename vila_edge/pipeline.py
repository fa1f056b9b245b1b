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

from vila_edge.errors import PromptError
from vila_edge.families import get_family
from vila_edge.llm import KVConfig, LLMEngine
from vila_edge.manifest import Manifest
from vila_edge.memory import plan
from vila_edge.preprocess import PixelSpec, load_video
from vila_edge.runner import RunnerOptions, Tokens, backend
from vila_edge.sampling import GenerationConfig, Sampler, SeenIds
from vila_edge.splice import PLACEHOLDER, Splicer
from vila_edge.streamer import TextStreamer
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
                 kv: KVConfig | None = None, int4_accuracy_level: int | None = None):
        m = self.manifest = Manifest.load(engine_dir)
        self.engine_dir = engine_dir
        self.family = get_family(m.family)
        self.tokenizer = Tokenizer.from_file(os.path.join(engine_dir, m.files["tokenizer"]))
        self.template = engine_template(engine_dir, m)
        v = m.vision
        pixels = PixelSpec(v.image_size, tuple(v.mean), tuple(v.std), v.image_mode, v.min_tiles, v.max_tiles)
        self.max_context = min(max_context or DEFAULT_CONTEXT, m.llm.max_positions)
        kv = kv or KVConfig()
        opts = RunnerOptions(threads, int4_accuracy_level)
        # One ledger sizes the pool: weights (every loaded file), runner buffers, activations, vision.
        self.memory = plan(engine_dir, m, kv.budget, kv.block_size, self.max_context, opts)
        runners = backend(m)
        self.vision = VisionEncoder(runners.vision(engine_dir, m, opts), pixels)
        self.llm = LLMEngine(runners.llm(engine_dir, m, self.memory.num_blocks, kv.block_size, self.max_context,
                                         opts), kv)
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

    def embed(self, ids: np.ndarray, spans: list, tiles: list) -> Tokens:
        """The LLM's input: text ids, and each tile's feature rows at its span."""
        return Tokens(ids, tuple((start, tiles[k]) for start, k in spans))


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
        """The decode loop: ids in, ids out; text comes from the streamer beside it."""
        pipe = self.pipe
        tokens = pipe.manifest.tokens
        sampler = Sampler(cfg, pipe.manifest.llm.vocab_size, tokens.never_sample)
        seen = SeenIds(pipe.manifest.llm.vocab_size, sp.ids[sp.ids >= 0] if cfg.repetition_penalty != 1.0 else ())
        stops = set(tokens.stop_ids)
        text = TextStreamer(pipe.tokenizer, cfg.stop)
        out_ids = []
        t_first, reason = None, "length"
        for step in range(budget):
            nxt = sampler(logits, seen)
            t_first = t_first or time.perf_counter()
            if nxt in stops:
                reason = "stop"
                break
            out_ids.append(nxt)
            seen.add(nxt)
            piece = text.push(nxt)
            if text.stopped:
                reason = "stop"
            if piece:
                yield piece
            if text.stopped:
                break
            if step + 1 < budget:
                try:
                    logits = pipe.llm.step(self.seq, nxt)
                except BaseException:
                    self.seq = None   # the engine dropped the sequence
                    raise
        rest = text.finish()
        if rest:
            yield rest
        t_end = time.perf_counter()
        self.last_ids = out_ids
        self.last_stats = {"finish_reason": reason, "new_tokens": len(out_ids),
                           "ttft_s": (t_first or t_end) - t0,
                           "decode_tok_s": (len(out_ids) - 1) / (t_end - t_first) if t_first and len(out_ids) > 1
                           and t_end > t_first else 0.0}
        return text.text

    def close(self) -> None:
        if self.seq is not None:
            self.pipe.llm.release(self.seq)
            self.seq = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
