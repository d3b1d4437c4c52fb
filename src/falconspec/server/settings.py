"""The server's limits and security options, with their defaults (``falconspec serve`` flags of the same names).

``None`` for a limit that depends on the model means "derive it from the context" (``resolve``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

MIB = 1024 * 1024
MAX_TOKENS_CAP = 2048  # the default max_tokens limit is a quarter of the context, at most this


@dataclass(frozen=True)
class ServerSettings:
    max_tokens_limit: int | None = None  # per request; None: min(2048, context // 4); no max_tokens means this
    request_timeout: float | None = 300.0  # seconds from admission (queue wait included) to the end; None: none
    max_body_bytes: int | None = None  # None: max(1 MiB, 32 bytes per context token)
    read_timeout: float = 30.0  # seconds to receive a request's headers, and then its body
    api_key: str | None = None  # if set, every endpoint but /health needs "Authorization: Bearer <key>"
    allowed_hosts: tuple[str, ...] = ("*",)  # Host header values ("*.example.com" wildcards); "*" = any
    docs: bool = False  # serve /docs, /redoc and /openapi.json
    allow_special_tokens_in_content: bool = False  # special tokens in chat content act as control tokens

    def __post_init__(self) -> None:
        for name in ("max_tokens_limit", "max_body_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or None for the default), got {value!r}")
        for name in ("request_timeout", "read_timeout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.read_timeout is None:
            raise ValueError("read_timeout must be a number of seconds > 0")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (None turns authentication off)")
        if not self.allowed_hosts or any(not h for h in self.allowed_hosts):
            raise ValueError(f"allowed_hosts must be non-empty host names (or '*'), got {self.allowed_hosts!r}")

    def resolve(self, context: int) -> ServerSettings:
        """These settings with the context-dependent defaults filled in, for a model with ``context`` positions."""
        return replace(self, max_tokens_limit=self.max_tokens_limit or max(1, min(MAX_TOKENS_CAP, context // 4)),
                       max_body_bytes=self.max_body_bytes or max(MIB, 32 * context))
