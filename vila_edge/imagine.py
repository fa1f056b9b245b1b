"""VILA-U image generation: the LLM writes one grid position per step, a depth transformer picks
that position's residual codes, a convolutional decoder paints the grid.

The loop of mit-han-lab/vila-u@096623c (vila_u/model/vila_u_arch.py:614-640,
vila_u/train/transformers_replace/models/llama/modeling_llama.py:861-872,1045-1069,
vila_u/model/multimodal_encoder/rqvaesigliptransformer/rqtransformer/modeling_rqtransformer.py:16-177):
- the conditional prompt "<SYS> USER: {prompt} ASSISTANT: <im_start>" and the unconditional
  "<SYS> USER:ASSISTANT: <im_start>" run as one batch of two sequences through the same paged KV
  cache (vila_edge/image_rows.py; the reference left-pads them into one tensor, the same arithmetic);
  the unconditional prompt's blocks are cached by the prefix cache and reused across requests;
- at each position: the final-norm hidden state of both sequences -> depth transformer, D times;
  classifier-free guidance on the depth logits only, l_u + cfg (l_c - l_u); one sampled code shared
  by both sequences; the next LLM input of both is projector(sum of the codes' codebook rows);
- the reference's dummy text token per step (lm_head on the image input) is skipped;
- cfg_scale 1 gives the conditional logits exactly, so the unconditional sequence is not run;
- video (vila_arch.py:642-671): the prompts end in <vi_start> instead, VIDEO_FRAMES grids follow one
  another with no separator, frame f = positions f*T .. f*T+T-1.
"""
import hashlib
import time

import numpy as np

from vila_edge.errors import PromptError, UsageError
from vila_edge.image_rows import Rows

# vicuna_v1 (vila_u/conversation.py:106-118); generation prompts vila_u/utils/tokenizer.py:56-57, the
# negative prompt " " strips to "" and renders without the separator (vila_arch.py:622-623).
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
COND, UNCOND = SYSTEM + " USER: {prompt} ASSISTANT: ", SYSTEM + " USER:ASSISTANT: "
MAX_IMAGES = 16                  # per call: each image is grid^2 LLM steps on two sequences
MAX_CFG = 20.0
# GENERATION_VIDEO_FRAMES (vila_arch.py:642-671); the unconditional video prompt ending in <vi_start>
# like the conditional one is [inferred] from the image path (vila-u.md §4-5).
VIDEO_FRAMES = 8
MAX_VIDEOS = 4


def _check(pipe, what, prompt, n, cfg_scale, temperature, top_k, top_p) -> None:
    most = MAX_VIDEOS if what == "generate_video" else MAX_IMAGES
    if "generate_image" not in pipe.manifest.capabilities or pipe.imager is None:
        raise UsageError(f"{pipe.engine_dir}: this engine ({pipe.manifest.family}) cannot generate images or "
                         f"videos; export a VILA-U checkpoint")
    if what == "generate_video" and "vi_start_id" not in pipe.manifest.generation:
        raise UsageError(f"{pipe.engine_dir}: its manifest has no generation.vi_start_id; re-export the checkpoint")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"{what}: the prompt is empty")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= most:
        raise UsageError(f"{what}: n={n!r} out of range; expected an integer in 1..{most}")
    if not 0.0 <= cfg_scale <= MAX_CFG:
        raise UsageError(f"{what}: cfg_scale={cfg_scale!r} out of range; expected 0..{MAX_CFG} (1 = off)")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise UsageError(f"{what}: temperature {temperature} >= 0, top_k {top_k} >= 0 and "
                         f"top_p {top_p} in (0, 1] expected")


def prompt_ids(pipe, prompt: str, video: bool = False) -> tuple:
    """(cond ids, uncond ids): [BOS] + text + <im_start> (<vi_start> for video). User text never
    becomes control tokens."""
    tok, gen = pipe.tokenizer, pipe.manifest.generation
    what = "generate_video" if video else "generate_image"
    specials = [t.content for t in tok.get_added_tokens_decoder().values()] + ["<image>"]
    found = [s for s in specials if s in prompt]
    if found:
        raise PromptError(f"{what}: the prompt contains the control token {found[0]!r}")
    bos = [pipe.manifest.tokens.bos_id] if pipe.manifest.tokens.bos_id is not None else []
    last = gen["vi_start_id" if video else "im_start_id"]
    ids = lambda text: bos + tok.encode(text, add_special_tokens=False).ids + [last]
    return ids(COND.format(prompt=prompt.strip())), ids(UNCOND)


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> int:
    """modeling_rqtransformer.py:16-74 on one row: /T, top-k (ties kept), softmax, top-p keeping the
    token that crosses p, renormalise, draw. temperature 0: argmax. Works on the top-k candidates
    only (in index order, as the full row would be): K = 16384 codes, ~1000 draws per image."""
    if temperature == 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    keep = np.flatnonzero(x >= np.partition(x, -top_k)[-top_k]) if top_k and top_k < len(x) else np.arange(len(x))
    p = np.exp(x[keep] - x[keep].max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]               # mass ranked above each token
        p[order[before >= top_p]] = 0.0
        p /= p.sum()
    return int(keep[min(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"), len(p) - 1)])


def _code_key(codes: np.ndarray) -> int:
    """Prefix-cache key of an image position: equal only for equal codes (negative: never a text id)."""
    return -1 - int.from_bytes(hashlib.blake2b(b"vila-u" + codes.astype(np.int64).tobytes(), digest_size=7).digest(),
                               "little")


def _position(imager, hidden: np.ndarray, depth: int, cfg: float, pick) -> np.ndarray:
    """This position's D codes: depth steps over both rows, CFG on the logits, one code shared;
    pick(d, guided logits) -> the code at depth d."""
    codes, cache = np.zeros((len(hidden), 0), np.int64), imager.depth_cache(len(hidden))
    for d in range(depth):
        logits, cache = imager.depth_logits(hidden, codes, cache)       # (rows, K)
        guided = logits[0] if len(logits) == 1 else logits[1] + cfg * (logits[0] - logits[1])
        codes = np.concatenate([codes, np.full((len(hidden), 1), pick(d, guided), np.int64)], axis=1)
    return codes[0]


def generate_image(pipe, prompt: str, *, n=1, cfg_scale=3.0, temperature=1.0, top_k=900, top_p=0.96,
                   seed=None, progress=None) -> list:
    """n PIL images (H, W, RGB); pipe.last_image_stats: seconds in LLM steps, depth steps, decoder."""
    codes = generate_codes(pipe, prompt, n=n, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, progress=progress)
    return [frames[0] for frames in _decode(pipe, codes[:, None])]


def generate_video(pipe, prompt: str, *, n=1, cfg_scale=3.0, temperature=1.0, top_k=900, top_p=0.96,
                   seed=None, progress=None) -> list:
    """n videos, each a list of VIDEO_FRAMES PIL frames; sampling and stats as generate_image."""
    codes = generate_codes(pipe, prompt, n=n, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, progress=progress, frames=VIDEO_FRAMES)
    return _decode(pipe, codes)


def strip(frames: list):
    """Frames side by side in one PIL image (mit-han-lab/vila-u@096623c:inference.py:17-24)."""
    from PIL import Image

    out = Image.new("RGB", (sum(f.width for f in frames), frames[0].height))
    for i, f in enumerate(frames):
        out.paste(f, (i * f.width, 0))
    return out


def _decode(pipe, codes: np.ndarray) -> list:
    """codes (n, frames, g, g, D) -> n lists of PIL images, one decoder pass per frame."""
    from PIL import Image

    t0 = time.perf_counter()
    out = [[Image.fromarray(pipe.imager.decode(f[None])[0]) for f in item] for item in codes]
    pipe.last_image_stats["decoder_s"] = time.perf_counter() - t0
    return out


def generate_codes(pipe, prompt: str, *, n=1, cfg_scale=3.0, temperature=1.0, top_k=900, top_p=0.96,
                   seed=None, progress=None, frames=None) -> np.ndarray:
    """-> codes (n, g, g, D) int64 in raster order; with `frames` (video): (n, frames, g, g, D)."""
    what = "generate_image" if frames is None else "generate_video"
    _check(pipe, what, prompt, n, cfg_scale, temperature, top_k, top_p)
    gen = pipe.manifest.generation
    g, depth = gen["grid"], gen["depth"]
    T = g * g * (frames or 1)
    cond, uncond = prompt_ids(pipe, prompt, video=frames is not None)
    if len(cond) + T > pipe.max_context:
        raise PromptError(f"{what}: the prompt ({len(cond)} tokens) and the {T} positions to generate exceed "
                          f"the context of {pipe.max_context}")
    rng = np.random.default_rng(seed)
    pick = lambda t, d, logits: sample(logits, temperature, top_k, top_p, rng)
    rows = [cond] if cfg_scale == 1.0 else [cond, uncond]
    stats = {"llm_s": 0.0, "depth_s": 0.0, "decoder_s": 0.0, "cached_tokens": []}
    counter = _Progress(progress, n * T)
    out = np.stack([_codes(pipe, rows, T, cfg_scale, pick, stats, counter).reshape(frames or 1, g, g, depth)
                    for _ in range(n)])
    pipe.last_image_stats = stats
    return out[:, 0] if frames is None else out


def forced_argmax(pipe, prompt: str, codes: np.ndarray, *, cfg_scale=3.0, video=False) -> np.ndarray:
    """Teacher forcing: feed `codes` ((g, g, D), or (frames, g, g, D) for video: another runtime's
    output) as the history and return this engine's argmax code at every (position, depth) given
    that history, shaped like `codes`. Agreement with `codes` measures an engine (int4, fp16)
    against the reference without one early disagreement changing every later position."""
    what = "generate_video" if video else "generate_image"
    _check(pipe, what, prompt, 1, cfg_scale, 0.0, 0, 1.0)
    gen = pipe.manifest.generation
    want = ((VIDEO_FRAMES,) if video else ()) + (gen["grid"], gen["grid"], gen["depth"])
    if np.shape(codes) != want:
        raise UsageError(f"forced_argmax: codes of shape {list(np.shape(codes))}; this engine's are {list(want)}")
    flat = np.asarray(codes, np.int64).reshape(-1, gen["depth"])
    best = np.zeros_like(flat)

    def pick(t, d, logits):
        best[t, d] = int(np.argmax(logits))
        return int(flat[t, d])
    cond, uncond = prompt_ids(pipe, prompt, video)
    pipe.last_image_stats = {"llm_s": 0.0, "depth_s": 0.0, "decoder_s": 0.0, "cached_tokens": []}
    _codes(pipe, [cond] if cfg_scale == 1.0 else [cond, uncond], len(flat), cfg_scale, pick,
           pipe.last_image_stats, _Progress(None, len(flat)))
    return best.reshape(np.shape(codes))


class _Progress:
    def __init__(self, callback, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def step(self) -> None:
        self.done += 1
        if self.callback:
            self.callback(self.done, self.total)


def _codes(pipe, rows: list, T: int, cfg: float, pick, stats: dict, counter: _Progress) -> np.ndarray:
    """One image's (or video's) T positions -> codes (T, D); pick(t, d, guided logits) -> code."""
    depth = pipe.manifest.generation["depth"]
    stats.setdefault("sample_s", 0.0)

    def timed(t, d, logits):          # sampling's share of depth_s
        t0 = time.perf_counter()
        code = pick(t, d, logits)
        stats["sample_s"] += time.perf_counter() - t0
        return code
    t0 = time.perf_counter()
    seqs = Rows(pipe, rows, T)
    stats["prefill_s"] = stats.get("prefill_s", 0.0) + time.perf_counter() - t0      # part of llm_s
    stats["llm_s"] += time.perf_counter() - t0
    stats["cached_tokens"].append(seqs.cached)        # per row: prompt positions the prefix cache had
    try:
        codes = np.zeros((T, depth), np.int64)
        for t in range(T):
            if t:
                t0 = time.perf_counter()
                seqs.feed(pipe.imager.embed_codes(codes[t - 1][None]), _code_key(codes[t - 1]))
                stats["llm_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            codes[t] = _position(pipe.imager, seqs.hidden, depth, cfg, lambda d, logits: timed(t, d, logits))
            stats["depth_s"] += time.perf_counter() - t0
            counter.step()
    finally:
        seqs.close()
    return codes
