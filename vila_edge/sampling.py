"""Next-token choice from logits: greedy, temperature, top-k, top-p, repetition penalty, seed.

Semantics follow transformers' logits processors (RepetitionPenaltyLogitsProcessor, TopK, TopP),
applied in that order after masking ids outside the original vocabulary and, for structured
output, the ids a grammar forbids next (vila_edge/constrain.py).
"""
import math
from dataclasses import dataclass, field

import numpy as np

from vila_edge.errors import EngineError, GenerationConfigError, GrammarError


NAN_LOGITS = ("the model produced NaN logits: the engine's weights are corrupt (NaN/Inf) or it overflowed its "
              "dtype; rebuild the engine from a checked checkpoint")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0        # 0 = greedy
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 1 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple = field(default_factory=tuple)   # stop strings, besides the model's stop tokens
    # Structured output (at most one): the answer is JSON valid under this schema (a dict or its
    # JSON text), exactly one of these strings, or a full match of this regex (Rust regex syntax).
    json_schema: "dict | str | None" = None
    choices: "list | None" = None
    regex: "str | None" = None

    def __post_init__(self):
        _int(self, "max_new_tokens", 1)
        _real(self, "temperature", 0.0)
        _int(self, "top_k", 0)
        _real(self, "top_p", 0.0, upper=1.0, open_low=True)
        _real(self, "repetition_penalty", 0.0, open_low=True)
        if self.seed is not None:
            _int(self, "seed", 0)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise GenerationConfigError(f"stop must be a string or a list of strings, got "
                                        f"{type(self.stop).__name__}") from None
        for s in stop:
            if not isinstance(s, str) or not s:
                raise GenerationConfigError(f"stop strings must be non-empty strings (an empty one would end "
                                            f"every answer before it starts), got {s!r}")
            _check_text(s, "stop string")
        self.stop = stop
        if self.stop and self.constrained:
            raise GrammarError("stop strings cannot be combined with json_schema/choices/regex: "
                               "a stop string could cut the structured answer short")

    @property
    def constrained(self) -> bool:
        return any(v is not None for v in (self.json_schema, self.choices, self.regex))


class SeenIds:
    """The distinct ids of a prompt and its generation so far, kept incrementally for the repetition
    penalty: each step adds one id in O(1) instead of re-scanning the whole history."""

    def __init__(self, vocab_size: int, ids=()):
        self._mask = np.zeros(vocab_size, bool)
        self._ids = np.empty(vocab_size, np.int64)   # distinct ids in first-seen order
        self._n = 0
        for i in np.asarray(ids, np.int64).tolist():
            self.add(i)

    def add(self, token: int) -> None:
        if 0 <= token < len(self._mask) and not self._mask[token]:
            self._mask[token] = True
            self._ids[self._n] = token
            self._n += 1

    def ids(self) -> np.ndarray:
        return self._ids[: self._n]


def _int(cfg, name: str, low: int) -> None:
    """An int >= low (bool and float are refused: 2.5 tokens is a mistake, not a request)."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise GenerationConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise GenerationConfigError(f"{name} must be >= {low}, got {value}")
    setattr(cfg, name, int(value))


def _real(cfg, name: str, low: float, upper: float = math.inf, open_low: bool = False) -> None:
    """A finite number in [low, upper] ((low, upper] with open_low): NaN compares false everywhere
    and would silently switch a processor off."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise GenerationConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < low or (open_low and value == low) or value > upper:
        bounds = f"{'(' if open_low else '['}{low:g}, {upper:g}]" if upper != math.inf else \
            f"{'>' if open_low else '>='} {low:g}"
        raise GenerationConfigError(f"{name} must be finite and {'in ' if upper != math.inf else ''}{bounds}, "
                                    f"got {value}")
    setattr(cfg, name, value)


def _check_text(text: str, what: str) -> None:
    """Text must be encodable as UTF-8 (lone surrogates from a bad decode are not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationConfigError(f"{what} {text!r} is not valid Unicode text ({e.reason} at {e.start}); "
                                    f"decode your input with errors='replace'") from None


class Sampler:
    def __init__(self, cfg: GenerationConfig, vocab_size: int, never_sample: list, constraint=None):
        self.cfg = cfg
        self.constraint = constraint      # constrain.Constraint: masks each step, follows each choice
        self.vocab_size = vocab_size
        self.never = np.asarray([i for i in never_sample if i < vocab_size], np.int64)
        self._never = frozenset(self.never.tolist())
        self.rng = np.random.default_rng(cfg.seed)
        # Plain greedy: the argmax of the logits as given, no masked copy (_greedy)
        self._greedy = constraint is None and cfg.temperature == 0 and cfg.repetition_penalty == 1.0

    def __call__(self, logits: np.ndarray, history) -> int:
        """logits [V'] float32 (V' >= vocab_size); history: ids generated or prompted so far, as an
        array or a SeenIds (the decode loop's: no per-step rebuild)."""
        if self._greedy:
            tok = self._greedy_pick(logits)
            if tok is not None:
                return tok
        x = np.array(logits[: self.vocab_size], dtype=np.float32)
        if np.isnan(x).any():   # argmax would pick a NaN: an answer of garbage or "" instead of an error
            raise EngineError(NAN_LOGITS)
        x[self.never] = -np.inf
        if self.constraint is None:
            return self._choose(x, history)
        allowed = self.constraint.allowed()
        if not allowed.any():
            raise GrammarError("the grammar allows no token of this engine's vocabulary here")
        x[~allowed] = -np.inf
        tok = self._choose(x, history)
        self.constraint.accept(tok)
        return tok

    def _greedy_pick(self, logits: np.ndarray) -> int | None:
        """Greedy without copying or masking the logits: numpy's argmax returns the first NaN when there
        is one (the error below, as the masked path raises), else the first maximum, which is the masked
        path's answer unless it is a never-sampled id; None then (the masked path decides)."""
        view = logits[: self.vocab_size]
        tok = int(view.argmax())
        if view[tok] != view[tok]:
            raise EngineError(NAN_LOGITS)
        return None if tok in self._never else tok

    def _choose(self, x: np.ndarray, history: np.ndarray) -> int:
        """x [vocab_size] float32 logits (masked ids at -inf), modified in place."""
        cfg = self.cfg
        if cfg.repetition_penalty != 1.0:
            seen = history.ids() if isinstance(history, SeenIds) else \
                np.unique(history[(history >= 0) & (history < self.vocab_size)])
            x[seen] = np.where(x[seen] > 0, x[seen] / cfg.repetition_penalty, x[seen] * cfg.repetition_penalty)
        if cfg.temperature == 0:
            return int(np.argmax(x))
        scaled = x / cfg.temperature
        if np.isinf(scaled.max()):   # a tiny temperature overflowed (inf - inf = NaN): greedy is its limit
            return int(np.argmax(x))
        x = scaled
        if cfg.top_k:
            kth = np.partition(x, -min(cfg.top_k, len(x)))[-min(cfg.top_k, len(x))]
            x[x < kth] = -np.inf
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            cut = np.searchsorted(cum, cfg.top_p) + 1
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))
