"""Incremental detokenisation with stop strings.

Decodes only a short window of recent ids per token (vLLM's prefix/read offsets), holds back text
that ends in an incomplete UTF-8 sequence, and holds back a tail that could still grow into a stop
string, so that a stop string never reaches the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Detokenizer:
    tokenizer: Any
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # everything decoded so far
    sent: int = 0  # characters of `text` already streamed
    stopped: bool = False

    def add(self, token_id: int) -> str:
        """Add one token; returns the text that can be streamed now."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._releasable()

    def flush(self) -> str:
        """At the end of the stream: whatever is left (unless a stop string ended it)."""
        if self.stopped:
            return ""
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out

    def _releasable(self) -> str:
        if self.stopped:
            return ""
        if self.stop:
            search_from = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for s in self.stop if (i := self.text.find(s, search_from)) != -1]
            if hits:
                self.stopped = True
                end = min(hits)
                out = self.text[self.sent : end]
                self.sent = end
                return out
            end = max(self.sent, len(self.text) - self._partial_stop_suffix())
        else:
            end = len(self.text)
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the text that could still become a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold
