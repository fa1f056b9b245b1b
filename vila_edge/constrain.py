"""Structured output: a token mask that keeps generation inside a JSON schema, a regex or a choice.

Built on llguidance (guidance-ai/llguidance; benchmarks/bench_constrain.py measured it against
outlines-core on this project's tokenizers, see benchmarks/results/constrain/constrain.md): a Rust matcher
with no torch dependency and manylinux aarch64 wheels, that reads the engine's tokenizer.json
directly and computes each step's mask in microseconds by walking the tokenizer's token trie.

    g = Grammars(tokenizer_path, vocab_size, stop_ids, never_sample)
    c = g.constraint(GenerationConfig(json_schema={...}))  # None when unconstrained
    allowed = c.allowed()      # bool [vocab_size]: ids the next step may take
    c.accept(token_id)         # after sampling

The mask never allows ids at or beyond the original vocabulary nor media tokens (never_sample);
a stop token is allowed only where the grammar may end, so a finished generation always parses.
"""
import json
import re
import threading

import numpy as np

from vila_edge.errors import GrammarError

# JSON without optional whitespace: a small model cannot wander off into endless blanks, and the
# output is what `json.dumps(..., separators=(",", ":"))` would print.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":",
                "whitespace_pattern": None}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:     # a runtime dependency; only a broken install lacks it
        raise GrammarError("structured output needs llguidance: pip install 'llguidance>=1.6'") from e
    return llguidance


def grammar_source(json_schema=None, choices=None, regex=None) -> str | None:
    """llguidance grammar (Lark) for the one constraint given, or None. Raises GrammarError.

    The answer may open with one space: chat templates end with "ASSISTANT:" and the like, and a
    model's natural first token is " green" or " {"; forbidding it would force unnatural tokens.
    The text the pipeline returns starts after that space (Conversation drops it)."""
    given = [n for n, v in (("json_schema", json_schema), ("choices", choices), ("regex", regex)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise GrammarError(f"give one of json_schema, choices or regex, not {' and '.join(given)}")
    if json_schema is not None:
        try:
            schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
        except json.JSONDecodeError as e:
            raise GrammarError(f"json_schema is not valid JSON: {e}") from e
        if not isinstance(schema, dict):
            raise GrammarError(f"json_schema must be a JSON object (a dict), got {type(schema).__name__}")
        body = "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})
    elif regex is not None:
        if not isinstance(regex, str) or not regex:
            raise GrammarError("regex must be a non-empty string")
        body = "/" + re.sub(r"(?<!\\)/", r"\\/", regex) + "/"
    else:
        if (not isinstance(choices, (list, tuple)) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise GrammarError("choices must be a non-empty list of non-empty strings")
        # Lark string literals take JSON's escapes (llguidance's own grammar_from("choice") does this).
        body = "(" + " | ".join(json.dumps(c) for c in choices) + ")"
    try:
        return _llguidance().LLMatcher.grammar_from_lark('start: " "? ' + body)
    except (ValueError, TypeError, RuntimeError) as e:
        raise GrammarError(f"cannot compile the {given[0]}: {e}") from e


def grammar_tokenizer(path: str, stop_ids: list):
    """llguidance's view of a tokenizer.json: read natively where llguidance knows the decoder
    (byte-level BPE as in Qwen2/SmolLM2, SentencePiece byte fallback as in Llama-2), else through
    the token-bytes wrapper below (the bundled model's Metaspace BPE without byte fallback)."""
    ll = _llguidance()
    try:
        return _with_eos(ll.LLTokenizer, path, stop_ids)
    except ValueError:
        return _with_eos(ll.LLTokenizer, ll.TokenizerWrapper(_MetaspaceTokens(path, stop_ids)), stop_ids)


def _with_eos(make, source, stop_ids: list):
    """Every stop id may end a match (llguidance 1.9 takes a list); older releases (1.6.1, the newest
    aarch64 wheel on some indexes) take one id: the first stop id then ends every answer."""
    try:
        return make(source, eos_token=stop_ids)
    except TypeError:
        return make(source, eos_token=stop_ids[0])


class _MetaspaceTokens:
    """Token bytes of a Metaspace tokenizer: its pieces with U+2581 read as a space."""

    def __init__(self, path: str, stop_ids: list):
        from tokenizers import Tokenizer
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        decoder = spec.get("decoder") or {}
        # llguidance tokenizes text it forces mid-sequence: a prepended "▁" would add a space.
        self._tok = Tokenizer.from_str(json.dumps(_no_prepend(spec)))
        if decoder.get("type") != "Metaspace":
            raise GrammarError(f"{path}: structured output does not support this tokenizer's decoder "
                               f"({decoder.get('type')})")
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        n = self._tok.get_vocab_size(with_added_tokens=True)
        pieces = [self._tok.id_to_token(i) or "" for i in range(n)]
        self.tokens = [p.encode() if p in specials else p.replace(decoder.get("replacement", "\u2581"), " ").encode()
                       for p in pieces]
        self.special_token_ids = [i for i, p in enumerate(pieces) if p in specials]
        self.eos_token_id = stop_ids[0]
        self.bos_token_id = None

    def __call__(self, text: str) -> list:
        return self._tok.encode(text, add_special_tokens=False).ids


def _no_prepend(node):
    """The tokenizer spec with every Metaspace's prepend_scheme set to "never"."""
    if isinstance(node, dict):
        out = {k: _no_prepend(v) for k, v in node.items()}
        if out.get("type") == "Metaspace":
            out["prepend_scheme"] = "never"
        return out
    if isinstance(node, list):
        return [_no_prepend(v) for v in node]
    return node


class Grammars:
    """Compiles constraints against one engine's tokenizer (loaded once, on first use)."""

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_ids: list, never_sample: list):
        self.tokenizer_path, self.vocab_size = tokenizer_path, vocab_size
        self.stop_ids = [int(i) for i in stop_ids]
        self.never = np.asarray([i for i in never_sample if 0 <= i < vocab_size], np.int64)
        self._tok = None
        self._lock = threading.Lock()

    def tokenizer(self):
        with self._lock:
            if self._tok is None:
                self._tok = grammar_tokenizer(self.tokenizer_path, self.stop_ids)
            return self._tok

    def constraint(self, cfg) -> "Constraint | None":
        """The Constraint a GenerationConfig asks for (json_schema / choices / regex), or None."""
        source = grammar_source(cfg.json_schema, cfg.choices, cfg.regex)
        if source is None:
            return None
        tok = self.tokenizer()
        err = _llguidance().LLMatcher.validate_grammar(source, tok)
        if err:
            raise GrammarError("the grammar library cannot compile this constraint: "
                               + " ".join(line.strip() for line in err.splitlines()))
        return Constraint(_llguidance().LLMatcher(tok, source, log_level=0), self.vocab_size, self.never)


class Constraint:
    """One generation's grammar state: the mask of the next step, advanced by each sampled id."""

    def __init__(self, matcher, vocab_size: int, never: np.ndarray):
        self.matcher, self.vocab_size, self.never = matcher, vocab_size, never
        self._check()

    def allowed(self) -> np.ndarray:
        """bool [vocab_size]: True where the next token may be taken."""
        words = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)      # u32 words, little-endian
        self._check()
        mask = np.unpackbits(words, bitorder="little")[: self.vocab_size].astype(bool)
        if len(mask) < self.vocab_size:    # ids the tokenizer does not know: never text
            mask = np.concatenate([mask, np.zeros(self.vocab_size - len(mask), bool)])
        mask[self.never] = False
        return mask

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(int(token_id)):
            self._check()
            raise GrammarError(f"token {token_id} is not allowed by the grammar here")

    def is_complete(self) -> bool:
        """Whether the text so far is a whole match (the grammar may end here)."""
        return self.matcher.is_accepting()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"grammar: {self.matcher.get_error()}")
