"""Incremental detokenisation with stop strings, for a backend that decodes token by token."""

from __future__ import annotations


class TextTracker:
    """Turns one sample's growing token list into text deltas.

    Text is held back while it could still be the start of a stop string, or while it ends
    in a partial UTF-8 character ("\ufffd"), so no delta is ever taken back. When a stop
    string appears the text is cut before it (the tokens that spelled it stay in token_ids,
    as vLLM does), and `stopped` turns True.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._tok.decode(self.ids, skip_special_tokens=True)
        if self._stop:
            cut = min(
                (i for i in (text.find(s, max(0, self.emitted - self._hold)) for s in self._stop) if i >= 0), default=-1
            )
            if cut >= 0:
                self.stopped = True
                return self._take(text[:cut], len(text[:cut]))
        if text.endswith("\ufffd"):
            return ""
        return self._take(text, len(text) - self._hold)

    def finish(self) -> str:
        """The held-back rest, at the end of the sample."""
        if self.stopped:
            return ""
        text = self._tok.decode(self.ids, skip_special_tokens=True)
        return self._take(text, len(text))

    def _take(self, text: str, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = text[self.emitted : upto]
        self.emitted = upto
        return out
