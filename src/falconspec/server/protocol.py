"""OpenAI request bodies and their translation into ``SpeculativeGenerator.stream`` arguments.

Types are checked strictly by pydantic (``"0.5"`` is not a temperature); values are checked here, before the
request is queued, with OpenAI parameter names in the messages, so a streaming request fails with a 400 rather
than with an error event after a 200. The generator checks everything again.

Defaults follow OpenAI: ``temperature`` 1.0 (send 0 for greedy; below 1e-5 is greedy too), ``top_p`` 1.0, ``n`` 1.
No ``max_tokens`` means the server's ``max_tokens_limit`` (``--max-tokens-limit``), or the rest of the context if
that is shorter; a larger ``max_tokens`` is refused. ``top_k`` and ``ignore_eos`` are extensions, as in vLLM. OpenAI
parameters this server does not implement (penalties, logprobs, tools, ...) are refused unless left neutral;
fields it does not know are ignored.

Chat roles are system, user and assistant (``developer``, OpenAI's newer name for system, is taken as system), and
tool if the chat template knows it. Special tokens in message content are text, not control tokens, unless the server
allows them (``--allow-special-tokens-in-content``); a plain completions prompt is encoded as given. Text must be
valid Unicode: a lone surrogate (``"\\ud800"`` in JSON) is refused with a 400.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict

from ..request import (
    RequestError,
    check_budget,
    check_input_ids,
    check_prompt,
    check_sampling,
    check_stop,
    check_text,
)
from ..target import TargetModel
from .errors import bad_request

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role

# parameters refused unless they hold one of these neutral values (or are absent / null)
UNSUPPORTED = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False,),
    "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "echo": (False,), "best_of": (1,), "suffix": ("",), "audio": (),
    "modalities": (["text"],), "prediction": (),
}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class _CommonRequest(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension: 0 or -1 = off
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension: keep generating through EOS (benchmarks)
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    best_of: Any = None


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are given
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None


class CompletionRequest(_CommonRequest):
    prompt: str | list[str] | list[int]
    echo: Any = None
    suffix: Any = None


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: the prompt's tokens and the generator arguments."""

    prompt_ids: list[int]  # [prompt_len]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    stream: bool
    include_usage: bool

    def stream_kwargs(self) -> dict:
        """Arguments of ``SpeculativeGenerator.stream`` (the prompt is passed as the ids counted for ``usage``)."""
        return {"input_ids": self.prompt_ids, "max_new_tokens": self.max_new_tokens, "stop": self.stop,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "ignore_eos": self.ignore_eos}


def prepare_chat(req: ChatCompletionRequest, target: TargetModel, max_tokens_limit: int,
                 special_tokens_in_content: bool = False) -> PreparedRequest:
    """Validate and tokenize a chat request (blocking: the server calls it off the event loop)."""
    _check_supported(req)
    if not req.messages:
        raise bad_request("messages is empty: send at least one {'role': ..., 'content': ...} message", "messages")
    roles = target.chat_roles
    messages = []
    for i, m in enumerate(req.messages):
        role = ROLE_ALIASES.get(m.role, m.role)
        if role not in roles:
            raise bad_request(f"messages[{i}] has role {m.role!r}; this model's chat template takes "
                              f"{', '.join(sorted(roles))}", "messages", "invalid_role")
        with _as_bad_request():
            messages.append({"role": role, "content": check_text(_message_text(m, i), f"messages[{i}].content")})
    _check_chars(target, sum(len(m["content"]) for m in messages), "messages")
    try:
        prompt_ids = target.encode(messages=messages, special_tokens_in_content=special_tokens_in_content)
    except (ValueError, TemplateError) as err:
        raise bad_request(f"cannot format messages with the model's chat template: {err}", "messages") from err
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    return _prepare(req, target, prompt_ids, "messages", max_tokens, name, max_tokens_limit)


def prepare_completion(req: CompletionRequest, target: TargetModel, max_tokens_limit: int) -> PreparedRequest:
    """Validate and tokenize a completions request (blocking: the server calls it off the event loop)."""
    _check_supported(req)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise bad_request(f"prompt holds {len(prompt)} prompts; this server takes one per request: send one "
                              "request per prompt", "prompt")
        prompt = prompt[0]
    with _as_bad_request():
        if isinstance(prompt, str):
            _check_chars(target, len(check_prompt(prompt)), "prompt")
            prompt_ids = target.encode(prompt=prompt)
        else:  # token ids
            prompt_ids = check_input_ids(prompt, target.vocab_size, "prompt")
    return _prepare(req, target, prompt_ids, "prompt", req.max_tokens, "max_tokens", max_tokens_limit)


# -------------------------------------------------------------------- shared checks
def _prepare(req: _CommonRequest, target: TargetModel, prompt_ids: list[int], prompt_param: str,
             max_tokens: int | None, max_tokens_param: str, max_tokens_limit: int) -> PreparedRequest:
    if req.n is not None and req.n != 1:
        raise bad_request(f"n = {req.n} is not supported: this server returns one choice; send n requests", "n")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = 0 if req.top_k in (None, -1) else req.top_k  # -1: off, as in vLLM
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    with _as_bad_request():
        check_sampling(temperature, top_p, top_k, req.seed)
        stop = check_stop(req.stop)
        room = check_budget(len(prompt_ids), max_tokens, target.max_context, prompt_param=prompt_param,
                            param=max_tokens_param)
    if max_tokens is None:
        max_tokens = min(room, max_tokens_limit)
    elif max_tokens > max_tokens_limit:
        raise bad_request(f"{max_tokens_param} = {max_tokens} is above this server's limit of {max_tokens_limit} "
                          "tokens per request (--max-tokens-limit)", max_tokens_param, "max_tokens_limit_exceeded")
    options = req.stream_options
    return PreparedRequest(prompt_ids, max_tokens, temperature, top_p, top_k, req.seed, stop, req.ignore_eos,
                           bool(req.stream), bool(options and options.include_usage))


@contextlib.contextmanager
def _as_bad_request():
    """The shared validator's errors (:mod:`falconspec.request`) as OpenAI-style 400 responses."""
    try:
        yield
    except RequestError as err:
        raise bad_request(str(err), err.param, err.code) from None


def _check_chars(target: TargetModel, chars: int, param: str) -> None:
    """Refuse a text surely longer than the context before tokenizing it: no token is longer than
    ``target.max_token_chars`` characters."""
    context = target.max_context
    if chars >= context * target.max_token_chars:
        raise bad_request(f"the prompt has {chars} characters, so at least {chars // target.max_token_chars} tokens; "
                          f"the model's context is {context} tokens: shorten the prompt", param,
                          "context_length_exceeded")


def _check_supported(req: _CommonRequest) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = getattr(req, name, None)
        if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
            raise bad_request(f"{name} is not supported by this server: leave it unset", name, "unsupported_parameter")


def _message_text(message: ChatMessage, index: int) -> str:
    """A message's text: a string, or the concatenated text of its content parts (text parts only)."""
    content = message.content
    if content is None:
        raise bad_request(f"messages[{index}] has no content (tool calls are not supported)", "messages")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"messages[{index}] has a {part.type!r} content part: only text parts are supported",
                              "messages")
        texts.append(part.text)
    return "".join(texts)
