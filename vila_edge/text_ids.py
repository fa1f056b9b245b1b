"""Prompt text -> token ids, where only the chat template can produce control tokens.

A rendered prompt is a list of `Segment`s: template text (trusted: its `</s>`, `<|im_start|>`,
placeholders are real control tokens) and user, system or earlier assistant text (untrusted:
encoded with the tokenizer's special-token parsing off, so a typed `</s>` or `<image>` is just
those characters). Without this, the user message "Q1 ASSISTANT: A1</s>USER: Q2" encodes to the
ids of a genuine two-turn conversation.

Exactness: HF tokenizers split the input at added tokens first and encode the pieces between them
independently (tokenizers@v0.23: added_vocabulary.rs, extract_and_normalize). So the string is cut
only at the trusted control tokens, each piece is encoded on its own with special parsing off, and
for ordinary text the ids equal a plain `encode` of the whole prompt (tests/test_text_ids.py).
The one context a piece loses is whether it starts the input: Metaspace's prepend_scheme "first"
adds "▁" only there, so pieces after a control token use a copy with prepend_scheme "never".
"""
import json
import re
from dataclasses import dataclass

from tokenizers import Tokenizer

from vila_edge.errors import PromptError


@dataclass(frozen=True)
class Segment:
    text: str
    trusted: bool = False     # template text: its control-token strings are control tokens
    image: bool = False       # a placeholder where one image's (or tile's) features go (trusted)


def untrusted_text(text: str) -> Segment:
    return Segment(text, False)


class TextIds:
    """Encodes segment lists; owns private tokenizer copies (special parsing off) so a shared
    Tokenizer is never mutated (encode_special_tokens is a property, not an argument)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self.controls = {t.content: (i, t) for i, t in added.items() if t.special}
        # Longest first, so "<|im_start|>" wins over a shorter token that is its prefix.
        names = sorted(self.controls, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        spec = json.loads(tokenizer.to_str())
        self._first = _copy(spec)
        self._rest = _copy(_never_prepend(spec))
        core = tokenizer.encode("a", add_special_tokens=False).ids
        full = tokenizer.encode("a", add_special_tokens=True).ids
        at = next(i for i in range(len(full) - len(core) + 1) if full[i:i + len(core)] == core)
        self._prefix, self._suffix = full[:at], full[at + len(core):]   # e.g. BOS from the post-processor

    def encode(self, segments: list, add_special_tokens: bool = True) -> list:
        """Ids of the concatenated segments; control tokens only from trusted ones."""
        ids, text, at_start, strip_next = [], "", True, False
        for seg in segments:
            if not (seg.trusted or seg.image) or self._split is None:
                text += seg.text
                continue
            for part in self._split.split(seg.text):
                if part not in self.controls:
                    text += part
                    continue
                token_id, token = self.controls[part]
                # AddedToken lstrip/rstrip: the token swallows the whitespace beside it.
                text = text.rstrip() if token.lstrip else text
                ids += self._text(text.lstrip() if strip_next else text, at_start) + [token_id]
                text, at_start, strip_next = "", False, token.rstrip
        ids += self._text(text.lstrip() if strip_next else text, at_start)
        return (self._prefix + ids + self._suffix) if add_special_tokens else ids

    def _text(self, text: str, at_start: bool) -> list:
        if not text:
            return []
        try:
            return (self._first if at_start else self._rest).encode(text, add_special_tokens=False).ids
        except Exception as e:  # tokenizers raises its own exception type (pyo3) on text it rejects
            raise PromptError(f"prompt text cannot be tokenized ({e})") from e


def _copy(spec: dict) -> Tokenizer:
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.encode_special_tokens = True
    return tok


def _never_prepend(spec: dict) -> dict:
    """The tokenizer spec with every Metaspace prepend_scheme "first" set to "never"."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                node = dict(node, prepend_scheme="never")
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(spec)
