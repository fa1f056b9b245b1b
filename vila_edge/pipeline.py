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
import weakref

import numpy as np
from tokenizers import Tokenizer

from vila_edge import engine_check
from vila_edge.backend import OrtSession
from vila_edge.errors import EngineError, GenerationConfigError, PromptError, VilaEdgeError
from vila_edge.families import FAMILIES, get_family
from vila_edge.llm import KVConfig, LLMEngine
from vila_edge.manifest import REBUILD, Manifest
from vila_edge.preprocess import PixelSpec, load_video
from vila_edge.sampling import GenerationConfig, Sampler
from vila_edge.splice import IMAGE_POSITION, PLACEHOLDER, Splicer, placeholder_segments
from vila_edge.templates import get_template, render_segments
from vila_edge.text_ids import Segment
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
    special = m.build.get("special_tokens", ("", ""))
    if not (isinstance(special, (list, tuple)) and len(special) == 2 and all(isinstance(s, str) for s in special)):
        raise EngineError(f"{engine_dir}/manifest.json: build.special_tokens is {special!r}; expected "
                          f"[bos, eos] strings; " + REBUILD.format(out=engine_dir))
    try:
        return get_template(m.template, jinja, tuple(special))
    except VilaEdgeError as e:
        raise EngineError(f"{engine_dir}: {e}; " + REBUILD.format(out=engine_dir)) from e


def _checked_text(text, what: str) -> str:
    """User text must be a str that UTF-8 can encode (lone surrogates from a bad decode cannot)."""
    if not isinstance(text, str):
        raise PromptError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{what} is not valid Unicode text ({e.reason} at index {e.start}); decode your "
                          f"input with errors='replace'") from None
    return text


def _release_held(llm, held: list) -> None:
    """A garbage-collected Conversation's KV goes back to the pool (weakref.finalize callback)."""
    if held[0] is not None:
        llm.release_later(held[0])


class Pipeline:
    def __init__(self, engine_dir: str, *, threads: int | None = None, max_context: int | None = None,
                 kv: KVConfig | None = None, int4_accuracy_level: int = 4):
        m = self.manifest = Manifest.load(engine_dir)
        self.engine_dir = engine_dir
        fix = REBUILD.format(out=engine_dir)
        if m.family not in FAMILIES:
            raise EngineError(f"{engine_dir}/manifest.json: family {m.family!r} unknown to this runtime "
                              f"(known: {sorted(FAMILIES)}); {fix}")
        self.family = get_family(m.family)
        self.tokenizer = engine_check.load_tokenizer(os.path.join(engine_dir, m.files["tokenizer"]), fix)
        self.template = engine_template(engine_dir, m)
        v = m.vision
        pixels = PixelSpec(v.image_size, tuple(v.mean), tuple(v.std), v.image_mode, v.min_tiles, v.max_tiles)
        self.vision = VisionEncoder(OrtSession(os.path.join(engine_dir, m.files["vision"]), threads), pixels, m.dtype)
        engine_check.check_vision(self.vision.session.session, m, os.path.join(engine_dir, m.files["vision"]), fix)
        # (V, C); fp16 in quantized and fp16 engines, rows are cast to the graph's input dtype when gathered.
        self.embeddings = engine_check.load_embeddings(os.path.join(engine_dir, m.files["embeddings"]), m, fix)
        engine_check.check_token_ids(m, len(self.embeddings), self.tokenizer.get_vocab_size(True), fix)
        self.max_context = min(max_context or DEFAULT_CONTEXT, m.llm.max_positions)
        weights = sum(os.path.getsize(os.path.join(engine_dir, f)) for f in m.files.values())
        llm = OrtSession(os.path.join(engine_dir, m.files["llm"]), threads, int4_accuracy_level=int4_accuracy_level)
        engine_check.check_llm(llm.session, m, os.path.join(engine_dir, m.files["llm"]), fix)
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
        """([Segment] with one image placeholder per image, [image sources]) from the accepted input
        forms. User text is never parsed for control tokens (text_ids.py); "<image>" in it is a
        placeholder only in the explicit form: images passed and the prompt says where each goes."""
        image = placeholder_segments(self.family.part_text)
        if prompt is None and isinstance(images, (list, tuple)) and any(isinstance(p, str) for p in images):
            content, sources = [], []
            for part in images:
                if _is_image_part(part):
                    content += image
                    sources.append(part)
                else:
                    content.append(Segment(_checked_text(part, "text part")))
        else:
            if prompt is None:
                raise PromptError("no prompt: pass a prompt string, or a list of text and image parts")
            prompt = _checked_text(prompt, "prompt")
            sources = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
            if sources and PLACEHOLDER in prompt:
                # Explicit placeholders (README): the caller passed the images and wrote where they go,
                # so the counts must match (Splicer.expand says so when they do not).
                content = []
                for i, piece in enumerate(prompt.split(PLACEHOLDER)):
                    content += ([Segment(PLACEHOLDER, image=True)] if i else []) + [Segment(piece)]
            else:
                content = image * len(sources) + [Segment(prompt)]
        if video is not None:
            frames = load_video(video, self.manifest.num_video_frames)
            content = image * len(frames) + content    # frames come first, as VILA's video prompts
            sources = frames + sources
        return [s for s in content if s.text], sources

    def embed(self, ids: np.ndarray, spans: list, tiles: list) -> np.ndarray:
        """[T, C] input embeddings: table rows for text ids, tile features at their spans."""
        text = ids != IMAGE_POSITION
        bad = ids[text & ((ids < 0) | (ids >= len(self.embeddings)))]
        if len(bad):
            raise EngineError(f"{self.engine_dir}: its tokenizer produced ids {sorted(set(bad.tolist()))[:5]} "
                              f"outside the {len(self.embeddings)}-row embedding table: tokenizer.json and "
                              f"embed_tokens.npy do not belong together; " + REBUILD.format(out=self.engine_dir))
        out = np.empty((len(ids), self.embeddings.shape[1]), self.embeds_dtype)
        out[text] = self.embeddings[ids[text]]
        for start, k in spans:
            if tiles[k].shape != (self.splicer.tokens_per_tile, out.shape[1]):   # every row written once
                raise EngineError(f"{self.engine_dir}: vision graph returned features {list(tiles[k].shape)}, "
                                  f"manifest.json says [{self.splicer.tokens_per_tile}, {out.shape[1]}]; "
                                  + REBUILD.format(out=self.engine_dir))
            out[start: start + len(tiles[k])] = tiles[k]
        return out

    def token_embeds(self, ids: list) -> np.ndarray:
        """[T, C] table rows of text ids, in the LLM graph's input dtype."""
        return self.embeddings[ids].astype(self.embeds_dtype)


class Conversation:
    """A multi-turn chat. Its KV stays in the pool between turns: the next turn's prompt re-uses
    every full block of the previous turn's prefix (hash hits) and computes only what is new."""

    def __init__(self, pipe: Pipeline, system: str | None = None):
        self.pipe = pipe
        self.system = None if system is None else _checked_text(system, "system prompt")
        self.turns = []               # (role, [Segment]): user text untrusted, images as placeholders
        self.tiles, self.digests, self.tiles_per_image = [], [], []
        # The sequence whose KV this conversation holds, in a list the finalizer shares: a
        # conversation dropped without close() gives its blocks back when it is garbage-collected.
        self._held = [None]
        weakref.finalize(self, _release_held, pipe.llm, self._held)
        self.last_stats = {}
        self.last_ids = []            # token ids generated by the last turn (stop token excluded)

    def send(self, images=None, prompt: str | None = None, *, video=None, **gen) -> str:
        return "".join(self.stream(images, prompt, video=video, **gen))

    @property
    def messages(self) -> list:
        """(role, text) of every turn so far, images shown as their <image> placeholders."""
        return [(role, "".join(s.text for s in segments)) for role, segments in self.turns]

    @property
    def seq(self):
        return self._held[0]

    @seq.setter
    def seq(self, seq_id) -> None:
        self._held[0] = seq_id

    def stream(self, images=None, prompt: str | None = None, *, video=None, **gen):
        pipe, t0 = self.pipe, time.perf_counter()
        try:
            cfg = GenerationConfig(**gen)
        except TypeError as e:   # an unknown option name
            raise GenerationConfigError(f"{e}; generation options are max_new_tokens, temperature, top_k, "
                                        f"top_p, repetition_penalty, seed, stop") from None
        text, sources = pipe.user_message(images, prompt, video)
        tiles, digests, counts = list(self.tiles), list(self.digests), list(self.tiles_per_image)
        for src in sources:
            feats, ds = pipe.vision.encode(src)
            tiles += list(feats)
            digests += ds
            counts.append(len(ds))
        t_vision = time.perf_counter() - t0
        messages = self.turns + [("user", text)]
        rendered = pipe.splicer.expand(render_segments(pipe.template, messages, self.system), counts)
        sp = pipe.splicer.splice(rendered, digests)
        if len(sp.ids) >= pipe.max_context:
            raise PromptError(f"prompt is {len(sp.ids)} tokens ({len(sp.spans)} image tiles x "
                              f"{pipe.manifest.vision.tokens_per_image} tokens included); the engine's context "
                              f"holds {pipe.max_context}: shorten the prompt or use fewer images")
        seq = pipe.new_seq_id()
        budget = min(cfg.max_new_tokens, pipe.max_context - len(sp.ids))    # new tokens at most
        embeds = pipe.embed(sp.ids, sp.spans, tiles)
        # The previous turn's blocks go back before the new allocation: their full blocks stay
        # cached for the prefix hit, and a thread never waits for blocks while holding others.
        self.close()
        logits, cached = pipe.llm.prefill(seq, embeds, sp.keys, budget)
        self.seq = seq
        self.tiles, self.digests, self.tiles_per_image = tiles, digests, counts
        reply = yield from self._generate(logits, sp, cfg, budget, t0)
        self.turns = messages + [("assistant", [Segment(reply.strip())])]   # model text: untrusted too
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
