"""Host-side text for a decoding row: incremental detokenization and stop strings.

A row's text is built incrementally the way TGI/vLLM do it: decode a short window of recent tokens
twice (with and without the newest ones) and append the difference, so the cost per step does not
grow with the length of the answer, and a multi-byte character split over several byte-level
tokens (a trailing U+FFFD) is held back until it completes.

Stop strings are matched on that text as tokens arrive; the row keeps the tokens up to and
including the one that completed the match, and its text ends before the stop string (OpenAI
semantics). Streamed deltas hold back the last `len(longest stop) - 1` characters, so a client
never receives the start of a stop string that later completes.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

Decode = Callable[[Sequence[int]], str]


class TextStream:
    """The growing text of one row; `push` tokens, read `delta()` for streaming."""

    def __init__(self, decode: Decode, stop: Sequence[str] = ()):
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""  # decoded text of tokens[:_read]
        self._prefix = 0  # window start: tokens before it are final text
        self._read = 0  # tokens already turned into `text`
        self._emitted = 0  # characters handed out by delta()
        self.stop_match: Optional[tuple[str, int]] = None  # (stop string, its start in `text`)

    @property
    def stopped(self) -> bool:
        return self.stop_match is not None

    def push(self, ids: Sequence[int]) -> Optional[int]:
        """Appends tokens. Returns the number of tokens the row keeps when a stop string completed
        (later tokens are ignored), else None."""
        if self.stopped:
            return len(self.tokens)
        if not self.stop:  # nothing to match: one window decode for the whole batch of tokens
            self.tokens.extend(int(t) for t in ids)
            self._advance()
            return None
        for t in ids:
            self.tokens.append(int(t))
            before = len(self.text)
            self._advance()
            if len(self.text) > before and self._match(max(0, before - self._hold)):
                return len(self.tokens)
        return None

    def _advance(self) -> None:
        if self._read == len(self.tokens):
            return
        prefix_text = self._decode(self.tokens[self._prefix : self._read])
        new_text = self._decode(self.tokens[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.tokens)

    def _match(self, start: int) -> bool:
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        index, s = min(hits)
        self.stop_match = (s, index)
        return True

    def delta(self, final: bool = False) -> str:
        """Text not yet handed out. Before the end, keeps back what could start a stop string."""
        end = len(self.text)
        if self.stop_match is not None:
            end = self.stop_match[1]
        elif not final:
            end = max(self._emitted, end - self._hold)
        out = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out


def final_text(decode: Decode, tokens: Sequence[int], stream: Optional[TextStream], drop_last: bool) -> str:
    """The finished row's text: a full decode of its tokens (less a trailing stop token), cut before
    the stop string when one ended it."""
    ids = list(tokens[:-1] if drop_last else tokens)
    text = decode(ids)
    if stream is not None and stream.stop_match is not None:
        s, index = stream.stop_match
        cut = text.find(s)
        text = text[:cut] if cut >= 0 else stream.text[:index]
    return text
