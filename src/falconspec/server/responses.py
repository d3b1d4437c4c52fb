"""OpenAI response bodies and stream chunks, plus falconspec's per-request ``speculative`` field.

Chat: ``chat.completion`` / ``chat.completion.chunk`` objects; completions: ``text_completion``. The last chunk
of a stream (the one with ``finish_reason``) carries ``speculative``, and ``usage`` unless
``stream_options.include_usage`` asked for OpenAI's usage chunk (no choices, just ``usage``) after it: usage comes
exactly once either way.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

from ..metrics import SpecStats


def usage(stats: SpecStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens}


def speculative(stats: SpecStats, drafter: str) -> dict:
    """``SpecStats.to_dict()`` with the per-cycle list folded into a histogram: ``accepted_histogram[a]`` is the
    number of cycles that accepted ``a`` drafted tokens."""
    out = stats.to_dict()
    per_cycle = out.pop("accepted_per_cycle")
    counts = Counter(per_cycle)
    out["accepted_histogram"] = [counts.get(a, 0) for a in range(max(per_cycle, default=-1) + 1)]
    out["drafter"] = drafter
    return out


class ResponseBuilder:
    """Bodies for one request; ``kind`` is ``"chat"`` or ``"completion"``."""

    def __init__(self, kind: str, model: str, drafter: str):
        if kind not in ("chat", "completion"):
            raise ValueError(f"kind must be 'chat' or 'completion', got {kind!r}")
        self.kind, self.model, self.drafter = kind, model, drafter
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def full(self, text: str, finish_reason: str, stats: SpecStats) -> dict:
        """The non-streaming answer."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                       "finish_reason": finish_reason}])
        body["usage"] = usage(stats)
        body["speculative"] = speculative(stats, self.drafter)
        return body

    def chunk(self, text: str | None = None, *, role: bool = False, finish_reason: str | None = None,
              stats: SpecStats | None = None, with_usage: bool = True) -> dict:
        """One stream chunk: new ``text``, the chat ``role`` opener, or the final chunk (``finish_reason``, with
        ``speculative`` and, if ``with_usage``, ``usage`` from ``stats``)."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text or "", "logprobs": None,
                                                       "finish_reason": finish_reason}])
        if stats is not None:
            if with_usage:
                body["usage"] = usage(stats)
            body["speculative"] = speculative(stats, self.drafter)
        return body

    def usage_chunk(self, stats: SpecStats) -> dict:
        """OpenAI's ``stream_options.include_usage`` chunk: no choices, just usage."""
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion", [])
        body["usage"] = usage(stats)
        return body


def sse(payload: dict | str) -> str:
    """One server-sent event: ``data: <json>`` (or a literal such as ``[DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
