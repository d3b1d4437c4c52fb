"""The FastAPI app: OpenAI-compatible routes over one ``SpeculativeGenerator``.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus). Requests are validated and tokenized on the event loop,
then queued for the worker thread (see scheduler.py); a client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..generate import SpeculativeGenerator
from .errors import APIError, install_error_handlers
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, PreparedRequest, prepare_chat, prepare_completion
from .responses import ResponseBuilder, sse
from .scheduler import Job, QueueFullError, Scheduler

DISCONNECT_POLL_SECONDS = 0.25
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIServer:
    """The state behind the routes: one generator, its scheduler and its metrics."""

    def __init__(self, generator: SpeculativeGenerator, model_name: str | None = None, max_queue: int = 16):
        self.generator = generator
        self.model_name = model_name or generator.target.name
        self.drafter_name = generator.drafter.name
        self.metrics = ServerMetrics(self.model_name, self.drafter_name)
        self.scheduler = Scheduler(generator, max_queue, self.metrics)
        self.metrics.track_queue(lambda: self.scheduler.num_running, lambda: self.scheduler.num_waiting)
        self.created = int(time.time())
        self._watchers: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- plain routes
    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "falconspec",
                "max_model_len": self.generator.target.max_context, "drafter": self.drafter_name}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "running": self.scheduler.num_running,
                "waiting": self.scheduler.num_waiting, "max_queue": self.scheduler.max_queue}

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"model {model!r} is not served here; this server serves {self.model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    # ---------------------------------------------------------------- generation
    async def complete(self, request: Request, body: ChatCompletionRequest | CompletionRequest) -> Response:
        self.check_model(body.model)
        target = self.generator.target
        if isinstance(body, ChatCompletionRequest):
            kind, prepared = "chat", prepare_chat(body, target)
        else:
            kind, prepared = "completion", prepare_completion(body, target)
        job = self._submit(prepared)
        self._watch_disconnect(request, job)
        builder = ResponseBuilder(kind, self.model_name, self.drafter_name)
        if prepared.stream:
            return StreamingResponse(self._events(job, builder, prepared.include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        text, last = [], None
        try:
            async for chunk in self.scheduler.results(job):
                text.append(chunk.text)
                last = chunk
        except Exception as err:
            raise _generation_error(err) from err
        if last is None or last.finish_reason is None:  # cancelled: the client has gone away
            raise APIError(499, "the request was cancelled before it finished", code="cancelled")
        return JSONResponse(builder.full("".join(text), last.finish_reason, last.stats))

    def _submit(self, prepared: PreparedRequest) -> Job:
        try:
            return self.scheduler.submit(prepared.stream_kwargs())
        except QueueFullError as err:
            raise APIError(429, str(err), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from err

    async def _events(self, job: Job, builder: ResponseBuilder, include_usage: bool) -> AsyncIterator[str]:
        """The SSE stream: chat role opener, text chunks, the final chunk with statistics, ``[DONE]``."""
        if builder.kind == "chat":
            yield sse(builder.chunk(role=True))
        try:
            async for chunk in self.scheduler.results(job):
                if chunk.text:
                    yield sse(builder.chunk(chunk.text))
                if chunk.finish_reason is not None:
                    yield sse(builder.chunk(finish_reason=chunk.finish_reason, stats=chunk.stats))
                    if include_usage:
                        yield sse(builder.usage_chunk(chunk.stats))
        except Exception as err:  # the status line is sent already: report in the stream, as vLLM does
            yield sse(_generation_error(err).body())
        yield sse("[DONE]")

    def _watch_disconnect(self, request: Request, job: Job) -> None:
        """Cancel ``job`` if its client disconnects (checked every DISCONNECT_POLL_SECONDS until it is done)."""

        async def watch() -> None:
            while not job.done.is_set():
                if await request.is_disconnected():
                    self.scheduler.cancel(job)
                    return
                await asyncio.sleep(DISCONNECT_POLL_SECONDS)

        task = asyncio.create_task(watch())
        self._watchers.add(task)  # the event loop keeps only a weak reference to tasks
        task.add_done_callback(self._watchers.discard)


def _generation_error(err: Exception) -> APIError:
    if isinstance(err, QueueFullError):
        return APIError(503, str(err), type="server_error", code="unavailable")
    if isinstance(err, ValueError):
        return APIError(400, str(err))
    return APIError(500, f"generation failed ({type(err).__name__}): {err}", type="server_error",
                    code="generation_failed")


class _CountRequests:
    """ASGI middleware counting responses by endpoint and status (pure ASGI: it does not buffer streams)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app raises before answering, Starlette's error middleware answers 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.request_done(endpoint, status)


def create_app(generator: SpeculativeGenerator, model_name: str | None = None, max_queue: int = 16,
               worker_thread: bool = True) -> FastAPI:
    """An OpenAI-compatible app serving ``generator`` as ``model_name`` (default: the target's name).

    At most ``max_queue`` requests wait behind the one being generated; more get a 429. With
    ``worker_thread=False`` the app starts no generation worker: call ``app.state.server.scheduler.run_forever()``
    from the thread that should generate (see scheduler.py for why ``falconspec serve`` uses the main thread).
    """
    server = OpenAIServer(generator, model_name, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if worker_thread:
            server.scheduler.start()
        yield
        await asyncio.to_thread(server.scheduler.stop)

    app = FastAPI(title="falconspec", description="OpenAI-compatible speculative decoding server",
                  lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_CountRequests, metrics=server.metrics)
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.complete(request, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.complete(request, body)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict:
        server.check_model(model_id)
        return server.model_card()

    @app.get("/health")
    async def health() -> dict:
        return server.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    return app
