"""The FastAPI app: OpenAI-compatible routes over one ``SpeculativeGenerator``.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus). Requests pass ``Guard`` (guard.py: Host, API key, body size,
read timeout, last-resort 500), are validated and tokenized on a tokenizer thread (long prompts never block the event
loop), then queued for the generation worker, which runs up to ``max_batch`` of them at once through a batch engine
(continuous batching through ``batch.BatchGenerator``, see scheduler.py). A client that disconnects cancels its generation;
so does its deadline (``request_timeout``) and a shutdown, which end an open stream with an error event and
``data: [DONE]``. Limits and security options: settings.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..batch import BatchGenerator
from ..generate import SpeculativeGenerator
from .errors import APIError, install_error_handlers
from .guard import Guard
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, PreparedRequest, prepare_chat, prepare_completion
from .responses import ResponseBuilder, sse
from .scheduler import BatchEngine, Job, QueueFullError, RequestTimeoutError, Scheduler, ShuttingDownError
from .settings import ServerSettings

log = logging.getLogger("falconspec.server")

DISCONNECT_POLL_SECONDS = 0.25
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIServer:
    """The state behind the routes: the served model (``generator``), the batch engine, its scheduler and metrics."""

    def __init__(self, generator: SpeculativeGenerator, model_name: str | None = None, max_queue: int = 16,
                 settings: ServerSettings | None = None, batch: BatchEngine | None = None):
        self.generator = generator
        self.batch = batch if batch is not None else BatchGenerator.from_generator(generator)
        self.settings = (settings or ServerSettings()).resolve(generator.target.max_context)
        self.model_name = model_name or generator.target.name
        self.drafter_name = generator.drafter.name
        self.scheduler = Scheduler(self.batch, max_queue)
        self.metrics = ServerMetrics(self.model_name, self.drafter_name, self.scheduler.max_batch)
        self.scheduler.observer = self.metrics
        self.metrics.track_queue(lambda: self.scheduler.num_running, lambda: self.scheduler.num_waiting)
        self.created = int(time.time())
        self._watchers: set[asyncio.Task] = set()
        # one thread: requests are tokenized one at a time, off the event loop (a tokenizer is not meant to be
        # driven from several threads at once: transformers sets backend flags per call)
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="falconspec-tokenize")

    # ---------------------------------------------------------------- plain routes
    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "falconspec",
                "max_model_len": self.generator.target.max_context, "drafter": self.drafter_name}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "running": self.scheduler.num_running,
                "waiting": self.scheduler.num_waiting, "max_batch": self.scheduler.max_batch,
                "max_queue": self.scheduler.max_queue}

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"model {model!r} is not served here; this server serves {self.model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    # ---------------------------------------------------------------- generation
    async def complete(self, request: Request, body: ChatCompletionRequest | CompletionRequest) -> Response:
        self.check_model(body.model)
        request_id = request.state.request_id
        target, settings = self.generator.target, self.settings
        if isinstance(body, ChatCompletionRequest):
            kind = "chat"
            prepare = functools.partial(prepare_chat, body, target, settings.max_tokens_limit,
                                        settings.allow_special_tokens_in_content)
        else:
            kind, prepare = "completion", functools.partial(prepare_completion, body, target, settings.max_tokens_limit)
        prepared = await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, prepare)
        job = self._submit(prepared, request_id)
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
        except asyncio.CancelledError:
            log.info("request %s: cancelled while generating", request_id)
            raise
        except Exception as err:
            raise _generation_error(err, request_id) from err
        if last is None or last.finish_reason is None:  # cancelled: the client has gone away
            raise APIError(499, "the request was cancelled before it finished", code="cancelled")
        return JSONResponse(builder.full("".join(text), last.finish_reason, last.stats))

    def _submit(self, prepared: PreparedRequest, request_id: str) -> Job:
        try:
            return self.scheduler.submit(prepared.stream_kwargs(), request_id, self.settings.request_timeout)
        except ShuttingDownError as err:
            raise _generation_error(err, request_id) from err
        except QueueFullError as err:
            raise APIError(429, str(err), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from err

    async def _events(self, job: Job, builder: ResponseBuilder, include_usage: bool) -> AsyncIterator[str]:
        """The SSE stream: chat role opener, text chunks, the final chunk, the usage chunk if asked for, ``[DONE]``.

        ``usage`` comes once: on the ``include_usage`` chunk (``choices: []``) if asked for, else on the final chunk.
        """
        if builder.kind == "chat":
            yield sse(builder.chunk(role=True))
        try:
            async for chunk in self.scheduler.results(job):
                if chunk.text:
                    yield sse(builder.chunk(chunk.text))
                if chunk.finish_reason is not None:
                    yield sse(builder.chunk(finish_reason=chunk.finish_reason, stats=chunk.stats,
                                            with_usage=not include_usage))
                    if include_usage:
                        yield sse(builder.usage_chunk(chunk.stats))
        except asyncio.CancelledError:  # the connection is going away: nothing more can be sent
            log.info("request %s: stream cancelled", job.request_id)
            raise
        except Exception as err:  # the status line is sent already: report in the stream, as vLLM does
            log.info("request %s: stream ended with an error event (%s)", job.request_id, type(err).__name__)
            yield sse(_generation_error(err, job.request_id).body())
        yield sse("[DONE]")

    def shutdown(self) -> None:
        """End every generation (blocking; any thread): waiting requests and the running ones get a 503 (an error
        event and ``[DONE]`` on a stream), and no new request is admitted."""
        self.scheduler.stop()

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


def _generation_error(err: Exception, request_id: str) -> APIError:
    """The answer for a failed generation; an unexpected error's text stays in the log (scheduler.py logs it)."""
    if isinstance(err, ShuttingDownError):
        return APIError(503, str(err), type="server_error", code="server_shutting_down")
    if isinstance(err, QueueFullError):
        return APIError(503, str(err), type="server_error", code="unavailable")
    if isinstance(err, RequestTimeoutError):
        return APIError(504, str(err), type="server_error", code="request_timeout")
    if isinstance(err, ValueError):  # the generator's argument checks
        return APIError(400, str(err))
    return APIError(500, f"generation failed (request id {request_id}); the details are in the server log",
                    type="server_error", code="generation_failed")


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
               worker_thread: bool = True, settings: ServerSettings | None = None,
               batch: BatchEngine | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``generator``'s target and drafter as ``model_name`` (default: the target's
    name).

    ``batch``: the engine that generates, an object with the ``BatchGenerator`` interface (batch.py) over the same
    target and drafter; it runs up to ``batch.max_batch`` requests at once (continuous batching). Default:
    a ``BatchGenerator`` over ``generator``'s target and drafter, one request at a time. ``generator``'s target
    tokenizes the requests and names the model. At most ``max_queue`` requests wait for a place in the batch; more
    get a 429. ``settings``: limits and
    security options (default ``ServerSettings()``). With ``worker_thread=False`` the app starts no generation
    worker: call ``app.state.server.scheduler.run_forever()`` from the thread that should generate (see
    scheduler.py for why ``falconspec serve`` uses the main thread). Run it with ``guard.make_server`` to get the
    header read timeout and streams that end cleanly on shutdown.
    """
    server = OpenAIServer(generator, model_name, max_queue, settings, batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if worker_thread:
            server.scheduler.start()
        yield
        await asyncio.to_thread(server.shutdown)
        server._tokenizer_thread.shutdown(wait=False)

    docs = server.settings.docs
    app = FastAPI(title="falconspec", description="OpenAI-compatible speculative decoding server",
                  lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.server = server
    app.add_middleware(Guard, settings=server.settings)
    app.add_middleware(_CountRequests, metrics=server.metrics)  # added last, so outermost: counts Guard's answers too
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
