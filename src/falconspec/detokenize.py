"""Incremental detokenisation: the text of a growing token list, decoding only its tail.

Decoding the whole answer every cycle costs O(length) per cycle. Like vLLM's detokenizer, this decodes a short
window instead: the tokens of the last step that produced text (``prefix_offset`` .. ``read_offset``, decoded
only as context) and the tokens added since. The new text is what the window decodes to beyond its context.
While the window's text ends in U+FFFD (a multi-byte character split across tokens) nothing is emitted and the
window grows until the character is complete. The context keeps what depends on neighbouring tokens right
(SentencePiece's leading-space rule, byte-level pieces), so the pieces add up to ``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

from typing import Iterable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context tokens (already turned into text)
        self.read_offset = 0  # tokens before this one are turned into text
        self.text = ""  # the text so far

    def add(self, ids: Iterable[int], final: bool = False) -> str:
        """Append token ids; return the new text (possibly empty while a character is incomplete). ``final``: no
        tokens follow, so an incomplete character at the end comes out as U+FFFD, as a full decode shows it."""
        self.ids.extend(ids)
        if self.read_offset == len(self.ids):
            return ""
        context = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.ids[self.prefix_offset:])
        if len(window) <= len(context) or (window.endswith(REPLACEMENT) and not final):
            return ""  # nothing printable yet: wait for more tokens
        new = window[len(context):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new
        return new

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""
