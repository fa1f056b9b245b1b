"""Pipeline: the user-facing entry. images + prompt -> preprocess -> vision -> splice -> LLM -> text.

    pipe = Pipeline()                                   # the bundled model; or an engine or checkpoint dir
    pipe.chat("photo.jpg", "What is on the table?")
    pipe.chat(["Compare ", Image(img_a), " with ", Image(img_b), " - what moved?"])   # vila_edge.parts
    conv = pipe.conversation(); conv.send(frame, "Where is the cup?"); conv.send(None, "And now?")
"""
import itertools
import os
import threading
import time
import weakref

import numpy as np

from vila_edge import engine_check
from vila_edge.cache import resolve_engine
from vila_edge.constrain import Grammars
from vila_edge.errors import EngineError, GenerationConfigError, IncompleteOutput, PromptError, VilaEdgeError
from vila_edge.families import FAMILIES, get_family
from vila_edge.generation import Generation, Request
from vila_edge.llm import KVConfig, LLMEngine
from vila_edge.manifest import REBUILD, Manifest
from vila_edge.memory import plan
from vila_edge.parts import image_list, join_parts
from vila_edge.runner import RunnerOptions, Tokens, backend
from vila_edge.sampling import GenerationConfig, Sampler, SeenIds
from vila_edge.scheduler import Scheduler
from vila_edge.sources import sample_frames
from vila_edge.splice import PLACEHOLDER, Splicer, placeholder_segments
from vila_edge.streamer import TextStreamer
from vila_edge.templates import get_template, render_segments
from vila_edge.text_ids import Segment
from vila_edge.vision import open_vision

DEFAULT_CONTEXT = 4096


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
    def __init__(self, model: str | os.PathLike | None = None, *, threads: int | None = None,
                 max_context: int | None = None, kv: KVConfig | None = None, int4_accuracy_level: int | None = None,
                 export_options: dict | None = None, progress: bool = True, device: str = "cpu"):
        """`model`: None (the bundled model), an engine directory, or a checkpoint directory, exported
        once (with `export_options`, e.g. {"dtype": "fp16"}) into a cache (vila_edge/cache.py).
        `device`: "cpu", or "cuda" / "tensorrt" (experimental, vila_edge/devices.py)."""
        from vila_edge.devices import check_name
        check_name(device)
        engine_dir = resolve_engine(model, export_options, progress)
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
        self.max_context = min(max_context or DEFAULT_CONTEXT, m.llm.max_positions)
        kv = kv or KVConfig()
        opts = RunnerOptions(threads, int4_accuracy_level, device=device)
        # One ledger sizes the pool: weights (every loaded file), runner buffers, activations, vision.
        self.memory = plan(engine_dir, m, kv.budget, kv.block_size, self.max_context, opts)
        runners = backend(m, device)
        self.vision = open_vision(m, runners.vision(engine_dir, m, opts))
        self.llm = LLMEngine(runners.llm(engine_dir, m, self.memory.num_blocks, kv.block_size, self.max_context,
                                         opts), kv)
        # Every chat's LLM work (any thread) runs on the scheduler, decode steps batched;
        # generate_image (imagine.py) still drives self.llm directly, outside it.
        self.scheduler = Scheduler(self.llm)
        engine_check.check_token_ids(m, self.llm.runner.embeddings.rows, self.tokenizer.get_vocab_size(True), fix)
        self.splicer = Splicer(self.tokenizer, self.family, m.tokens, v.tokens_per_image, v.image_mode)
        self.grammars = Grammars(os.path.join(engine_dir, m.files["tokenizer"]), m.llm.vocab_size,
                                 m.tokens.stop_ids, m.tokens.never_sample)
        self._seq_ids = itertools.count()
        self._ids_lock = threading.Lock()
        self.imager = runners.image(engine_dir, m, opts) if "generate_image" in m.capabilities else None

    def chat(self, images=None, prompt: str | None = None, *, system: str | None = None, video=None, **gen) -> str:
        """One question, one answer.

        `images` beside a `prompt`: one image (a path, PIL image, HWC uint8 array or Image(...)) or a
        list/iterable of them. With no prompt, a parts list: Text(...) is always text, Image(...),
        pathlib.Path, PIL images and arrays are images, a plain str ending in an image extension is
        an image path that must exist, any other str is text (vila_edge/parts.py). `video`: a file,
        URL, folder, GIF, list or iterator of frames, or a Camera. `gen`: GenerationConfig fields."""
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

    def watch(self, source, prompt: str, *, every_s: float = 1.0, window: int = 8, interval_s: float = 0.0, **gen):
        """Yield a WatchAnswer every `every_s` seconds of a Camera, a video file/URL/device or an
        iterable of frames, about its last `window` frames (vila_edge/watch.py)."""
        from vila_edge.watch import watch
        return watch(self, source, prompt, every_s, window, interval_s, **gen)

    def generate_image(self, prompt: str, *, n: int = 1, cfg_scale: float = 3.0, temperature: float = 1.0,
                       top_k: int = 900, top_p: float = 0.96, seed: int | None = None, progress=None) -> list:
        """VILA-U: `n` PIL images for `prompt` (vila_edge/imagine.py). temperature 0 = argmax codes;
        `progress(done, total)` after every image position."""
        from vila_edge.imagine import generate_image
        return generate_image(self, prompt, n=n, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, progress=progress)

    def generate_video(self, prompt: str, *, n: int = 1, cfg_scale: float = 3.0, temperature: float = 1.0,
                       top_k: int = 900, top_p: float = 0.96, seed: int | None = None, progress=None) -> list:
        """VILA-U: `n` videos for `prompt`, each a list of 8 PIL frames (vila_edge/imagine.py)."""
        from vila_edge.imagine import generate_video
        return generate_video(self, prompt, n=n, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, progress=progress)

    def new_seq_id(self) -> int:
        with self._ids_lock:
            return next(self._seq_ids)

    def user_message(self, images, prompt, video) -> tuple:
        """([Segment] with one image placeholder per image, [image sources]) from the accepted input
        forms: images + prompt, or a parts list with no prompt (typed as vila_edge/parts.py says);
        `video` any source sources.sample_frames takes (file, folder, frame list or iterator, Camera).
        User text is never parsed for control tokens (text_ids.py); "<image>" in it is a placeholder
        only in the explicit form: images passed and the prompt says where each goes."""
        image = placeholder_segments(self.family.part_text)
        if prompt is None and isinstance(images, (list, tuple)):
            content, sources = join_parts(images, image, _checked_text)
        else:
            if prompt is None:
                raise PromptError("no prompt: pass a prompt string, or a list of text and image parts")
            prompt = _checked_text(prompt, "prompt")
            sources = image_list(images)
            if sources and PLACEHOLDER in prompt:
                # Explicit placeholders (README): the caller passed the images and wrote where they go,
                # so the counts must match (Splicer.expand says so when they do not).
                content = []
                for i, piece in enumerate(prompt.split(PLACEHOLDER)):
                    content += ([Segment(PLACEHOLDER, image=True)] if i else []) + [Segment(piece)]
            else:
                content = image * len(sources) + [Segment(prompt)]
        if video is not None:
            frames = sample_frames(video, self.manifest.num_video_frames)
            content = image * len(frames) + content    # frames come first, as VILA's video prompts
            sources = frames + sources
        return [s for s in content if s.text], sources

    def embed(self, ids: np.ndarray, spans: list, tiles: list) -> Tokens:
        """The LLM's input: text ids, and each tile's feature rows at its span."""
        return Tokens(ids, tuple((start, tiles[k]) for start, k in spans))


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

    def add_turn(self, role: str, text: str, images=()) -> None:
        """Append a past turn without generating (a stateless server replays a client's history).
        A user turn takes send()'s (images, prompt) form, an assistant turn its reply; both are kept
        as send() keeps them, so the next prompt's prefix hits the blocks earlier requests left."""
        if role == "user":
            content, sources = self.pipe.user_message(list(images) or None, text, None)
        elif role == "assistant" and not images:
            content, sources = [Segment(_checked_text(text, "assistant turn").strip())], []   # untrusted
        else:
            raise PromptError(f"a past turn is role 'user' (text and images) or 'assistant' (text), got {role!r}"
                              + (" with images" if images else ""))
        single = not self.tiles_per_image and len(sources) == 1     # as stream() encodes a lone image
        for feats, ds in self.pipe.vision.encode_all(sources, single):
            self.tiles += list(feats)
            self.digests += ds
            self.tiles_per_image.append(len(ds))
        self.turns.append((role, [s for s in content if s.text]))

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
                                        f"top_p, repetition_penalty, seed, stop, json_schema, choices, regex") from None
        constraint = pipe.grammars.constraint(cfg)     # compiled before any work: errors come first
        text, sources = pipe.user_message(images, prompt, video)
        tiles, digests, counts = list(self.tiles), list(self.digests), list(self.tiles_per_image)
        single = not counts and len(sources) == 1      # NVILA's dynamic_s2 tiles only a lone image
        for feats, ds in pipe.vision.encode_all(sources, single):
            tiles += list(feats)
            digests += ds
            counts.append(len(ds))
        t_vision = time.perf_counter() - t0
        messages = self.turns + [("user", text)]
        rendered = pipe.splicer.expand(render_segments(pipe.template, messages, self.system), counts)
        sp = pipe.splicer.splice(rendered, digests, [len(t) for t in tiles])
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
        gen = self._generation(sp, cfg, constraint)
        req = pipe.scheduler.submit(Request(seq, embeds, sp.keys, budget, gen))
        try:
            while True:     # the scheduler's thread prefills, decodes and samples; text comes here
                kind, value = gen.events.get()
                if kind == "text":
                    yield value
                elif kind == "admitted":    # the prompt's KV is in the pool (as prefill returning was)
                    self.tiles, self.digests, self.tiles_per_image = tiles, digests, counts
                    self.last_stats = {"prompt_tokens": len(sp.ids), "cached_tokens": value, "vision_s": t_vision}
                elif kind == "error":
                    raise value
                else:
                    break
        finally:   # finished: the sequence is this conversation's until the next turn; else stop it
            if pipe.scheduler.cancel(req):
                self.seq = seq
        reply = self._finish(gen, t0, constraint, cfg)
        self.turns = messages + [("assistant", [Segment(reply.strip())])]   # model text: untrusted too

    def _generation(self, sp, cfg: GenerationConfig, constraint) -> Generation:
        """The per-sequence decode state the scheduler steps: ids in, ids out, text beside."""
        pipe = self.pipe
        tokens = pipe.manifest.tokens
        sampler = Sampler(cfg, pipe.manifest.llm.vocab_size, tokens.never_sample, constraint)
        seen = SeenIds(pipe.manifest.llm.vocab_size, sp.ids[sp.ids >= 0] if cfg.repetition_penalty != 1.0 else ())
        # A grammar lets an answer open with one space (constrain.py): it is not part of the answer.
        text = TextStreamer(pipe.tokenizer, cfg.stop, drop_leading_space=constraint is not None)
        return Generation(sampler, tokens.stop_ids, text, seen)

    def _finish(self, gen: Generation, t0: float, constraint, cfg: GenerationConfig) -> str:
        self.last_ids = list(gen.ids)
        self.last_stats.update(gen.stats(), ttft_s=(gen.times[0] if gen.times else time.perf_counter()) - t0)
        if constraint is not None and gen.reason == "length":
            raise IncompleteOutput(f"max_new_tokens={cfg.max_new_tokens} ended the answer before its "
                                   f"json_schema/choices/regex was complete: raise max_new_tokens", gen.text.text)
        return gen.text.text

    def close(self) -> None:
        if self.seq is not None:
            self.pipe.llm.release(self.seq)
            self.seq = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
