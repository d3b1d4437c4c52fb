"""One validator for generation requests: the library (``SpeculativeGenerator.stream``), the CLI and the server.

Every check raises :class:`RequestError`, a ``ValueError`` that also names the offending parameter (``param``, in
the caller's own spelling: ``max_tokens`` for the server, ``max_new_tokens`` for the library) and, where the OpenAI
API has one, an error ``code``; the server turns it into its 400 response as it is.

:func:`check_request` checks what needs no model (exactly one prompt source, ``max_new_tokens``, sampling, stop
strings, ``ignore_eos``); :func:`check_input_ids`, :func:`check_prompt` and :func:`check_budget` check the prompt
against the model's vocabulary and context once it is known.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

if typing.TYPE_CHECKING:
    from .sampling import SamplingParams

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


class RequestError(ValueError):
    """An invalid generation request: ``param`` names the parameter, ``code`` is an OpenAI-style error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: the prompt as given (one of the three), the budget, the sampling and the stops."""

    prompt: str | None
    messages: list[dict] | None
    input_ids: list[int] | None
    max_new_tokens: int
    params: SamplingParams
    stop: list[str]
    ignore_eos: bool


def check_request(prompt=None, messages=None, input_ids=None, *, max_new_tokens=128, stop=None, temperature=0.0,
                  top_p=1.0, top_k=0, seed=None, ignore_eos=False) -> GenerationRequest:
    """Check everything about a request that needs no model; the arguments of ``SpeculativeGenerator.stream``."""
    from .sampling import (
        SamplingParams,  # SamplingParams checks its values with this module
    )

    if sum(x is not None for x in (prompt, messages, input_ids)) != 1:
        raise RequestError("give exactly one of prompt, messages or input_ids")
    if prompt is not None:
        check_prompt(prompt)
    if messages is not None:
        check_messages(messages)
    if input_ids is not None:
        input_ids = check_input_ids(input_ids)
    check_max_new_tokens(max_new_tokens)
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")
    return GenerationRequest(prompt, messages, input_ids, max_new_tokens,
                             SamplingParams(temperature, top_p, top_k, seed), check_stop(stop), ignore_eos)


# -------------------------------------------------------------------- the prompt
def check_prompt(prompt, param: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise RequestError(f"{param} must be a string, got {type(prompt).__name__}", param)
    if not prompt.strip():
        raise RequestError(f"{param} is empty", param)
    return check_text(prompt, param)


def check_messages(messages, param: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"{param} must be a non-empty list of {{'role': ..., 'content': ...}} messages", param)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"{param}[{i}] needs string 'role' and 'content' fields, got {m!r}", param)
        check_text(m["content"], f"{param}[{i}].content")
    return messages


def check_input_ids(input_ids, vocab_size: int | None = None, param: str = "input_ids") -> list[int]:
    """Token ids as a list of ints, non-empty, and within the vocabulary once it is known."""
    try:
        ids = [int(t) for t in input_ids]
    except (TypeError, ValueError):
        raise RequestError(f"{param} must be a list of token ids", param) from None
    if not ids:
        raise RequestError(f"{param} is empty: the prompt has no tokens", param)
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
        raise RequestError(f"{param} token ids must lie in [0, {vocab_size})", param)
    return ids


def check_text(text: str, param: str) -> str:
    """``text`` if it is valid Unicode (encodable as UTF-8); JSON's ``"\\ud800"`` decodes to a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(f"{param} is not valid Unicode: it holds a lone surrogate (U+{ord(text[err.start]):04X}) "
                           f"at character {err.start}; send UTF-8 text", param.split("[")[0],
                           "invalid_unicode") from None
    return text


# -------------------------------------------------------------------- budget
def check_max_new_tokens(value, param: str = "max_new_tokens") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"{param} must be an integer >= 1, got {value!r}", param)
    return value


def check_budget(prompt_len: int, max_new_tokens: int | None, context: int, *, prompt_param: str = "prompt",
                 param: str = "max_new_tokens") -> int:
    """The prompt and ``max_new_tokens`` within the model's ``context``; returns the room left after the prompt."""
    if prompt_len >= context:
        raise RequestError(f"the prompt has {prompt_len} tokens; the model's context is {context} tokens: shorten "
                           "the prompt", prompt_param, "context_length_exceeded")
    room = context - prompt_len
    if max_new_tokens is not None:
        check_max_new_tokens(max_new_tokens, param)
        if max_new_tokens > room:
            raise RequestError(f"the prompt ({prompt_len} tokens) + {param} ({max_new_tokens}) exceeds the model's "
                               f"context of {context}: ask for at most {room} new tokens", param,
                               "context_length_exceeded")
    return room


# -------------------------------------------------------------------- sampling and stops
def check_sampling(temperature, top_p, top_k, seed) -> None:
    """The values of :class:`~.sampling.SamplingParams` (``top_k`` 0 = off)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise RequestError(f"temperature must be a number, got {temperature!r}", "temperature")
    if not math.isfinite(temperature) or temperature < 0:
        raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}", "temperature")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p!r}", "top_p")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}", "top_k")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RequestError(f"seed must be an integer or None, got {seed!r}", "seed")
        if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise RequestError(f"seed must be in [-2**63, 2**64), got {seed}", "seed")


def check_stop(stop) -> list[str]:
    """Stop strings as a list: None, one string, or a list of them; each non-empty valid Unicode."""
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or not s for s in stops):
        raise RequestError(f"stop must be a non-empty string or a list of them, got {stop!r}", "stop")
    return [check_text(s, "stop") for s in stops]
