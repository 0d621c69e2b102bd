"""Streaming text out of token ids: never a broken UTF-8 character, stop strings across tokens.

Tokens map to exact byte strings (a byte-level BPE token may hold half of an emoji); an incremental
UTF-8 decoder holds incomplete bytes back until the character is whole. Stop strings are matched on
the decoded text, so one can span several tokens; text that might still become a stop string is held
back until it cannot.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    def __init__(self, token_bytes: list[bytes | None]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """Text completed by this token ('' while a character is still partial, or for specials)."""
        piece = self._token_bytes[token] if 0 <= token < len(self._token_bytes) else None
        return self._decoder.decode(piece, final=False) if piece else ""

    def flush(self) -> str:
        """At the end of generation: whatever bytes remain (a cut-off character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds the first stop string in a stream of text pieces; text after it is discarded."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text now safe to emit. After a stop string is seen, sets `stopped` and emits up to it."""
        if self.stopped or not text:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """End of stream without a stop string: the held text was not a stop after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        for length in range(min(self._longest - 1, len(buffer)), 0, -1):
            tail = buffer[-length:]
            if any(s.startswith(tail) for s in self.stops):
                return length
        return 0
