"""Text beside the decode loop: incremental detokenisation, stop strings, hold-back. O(1) per token.

tokenizers' DecodeStream turns ids into text pieces and waits while a UTF-8 character is split across
tokens (byte fallback, byte-level BPE). Stop strings are searched only in the text not yet shown,
which the hold-back keeps at least (longest stop - 1) characters long, so a stop string that spans
pieces is found and nothing of it is ever shown.
"""
from tokenizers.decoders import DecodeStream


class TextStreamer:
    def __init__(self, tokenizer, stop: tuple = (), drop_leading_space: bool = False):
        """`drop_leading_space`: the reply's first character is dropped when it is a space (a grammar
        lets a constrained answer open with one, vila_edge/constrain.py)."""
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self._drop_space = drop_leading_space
        self._stream = DecodeStream(skip_special_tokens=True)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._pending = ""      # decoded, not yet shown: held back for a stop string's start
        self._shown = []
        self.stopped = False    # a stop string was found; the text ends before it

    def push(self, token: int) -> str:
        """Add one generated id; returns the text that is now safe to show (may be "")."""
        piece = self._stream.step(self.tokenizer, token)
        if not piece or self.stopped:
            return ""
        if self._drop_space:
            self._drop_space = False
            piece = piece[1:] if piece.startswith(" ") else piece
        if not self.stop:        # nothing to search for or hold back: the piece is shown as it is
            self._shown.append(piece)
            return piece
        self._pending += piece
        cut = min((i for i in (self._pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
        else:
            safe = len(self._pending) - self._hold
            if safe <= 0:
                return ""
            out, self._pending = self._pending[:safe], self._pending[safe:]
        self._shown.append(out)
        return out

    def finish(self) -> str:
        """The held-back rest, once generation has ended."""
        out, self._pending = self._pending, ""
        self._shown.append(out)
        return out

    @property
    def text(self) -> str:
        """Everything shown so far (after finish: the whole reply)."""
        return "".join(self._shown)
