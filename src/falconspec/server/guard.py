"""What stands between the network and the routes: request ids, Host check, API key, body limit, read timeouts,
and the last-resort 500.

``Guard`` is pure ASGI (it never buffers a response). For every HTTP request it, in order:

1. gives the request an id (``x-request-id`` response header, ``request.state.request_id``, the logs);
2. refuses a Host header outside ``allowed_hosts`` (421, Starlette ``TrustedHostMiddleware`` matching rules);
3. refuses a missing or wrong ``Authorization: Bearer`` key (401; ``/health`` stays open for load balancers);
4. refuses a ``Content-Length`` above ``max_body_bytes`` at once, before reading the body (413), reads the body
   counting the bytes as they arrive (413 as soon as a chunked body passes the limit) within ``read_timeout``
   (408), then replays it to the app;
5. answers an exception that escapes the app with a generic 500 naming the request id; the traceback goes to the
   log only, never to the client, and the connection stays usable.

Refusals that leave a request body unread close the connection (``Connection: close``).

uvicorn itself has no timeout for reading request headers: a connection that sends half a request line stays open.
``HeaderTimeoutH11Protocol`` adds one (h11 is uvicorn's default HTTP implementation without httptools);
``h11_max_incomplete_event_size`` (uvicorn's default 16 KiB) bounds the headers' size.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid

import h11
import uvicorn
from starlette.datastructures import Headers
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError
from .settings import ServerSettings

log = logging.getLogger("falconspec.server")

OPEN_PATHS = ("/health",)  # answered without an API key


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class Guard:
    """ASGI middleware enforcing ``settings`` (resolved: ``max_body_bytes`` is set); see the module docstring."""

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self.hosts = [h.lower() for h in settings.allowed_hosts]
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req-" + uuid.uuid4().hex[:20]
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        headers = Headers(scope=scope)
        refusal = self._check_host(headers) or self._check_key(scope["path"], headers) or self._check_length(headers)
        if refusal is not None:
            log.info("%s %s %s refused: %d %s", request_id, scope["method"], scope["path"], refusal.status,
                     refusal.code)
            await _close_after(refusal).response()(scope, receive, send_with_id)
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.settings.read_timeout)
        except _ClientGone:
            return
        except _BodyTooLarge:
            log.info("%s: body above %d bytes refused", request_id, self.settings.max_body_bytes)
            await _close_after(_too_large(self.settings.max_body_bytes)).response()(scope, receive, send_with_id)
            return
        except asyncio.TimeoutError:
            log.info("%s: body not received within %g s", request_id, self.settings.read_timeout)
            error = APIError(408, f"the request body did not arrive within {self.settings.read_timeout:g} s",
                             code="request_timeout")
            await _close_after(error).response()(scope, receive, send_with_id)
            return

        try:
            await self.app(scope, _replay(body, receive), send_with_id)
        except Exception:
            log.exception("%s %s %s failed", request_id, scope["method"], scope["path"])
            if started:  # mid-stream: nothing more can be said; uvicorn closes the connection
                return
            error = APIError(500, f"internal server error (request id {request_id}); the details are in the server "
                                  "log", type="server_error", code="internal_error")
            await error.response()(scope, receive, send_with_id)

    # ---------------------------------------------------------------- checks, each an APIError or None
    def _check_host(self, headers: Headers) -> APIError | None:
        if "*" in self.hosts:
            return None
        host = headers.get("host", "").lower()
        host = host[1:host.find("]")] if host.startswith("[") else host.split(":")[0]  # drop the port
        for pattern in self.hosts:
            if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
                return None
        return APIError(421, "this server does not answer for that Host (--allowed-hosts)", code="invalid_host")

    def _check_key(self, path: str, headers: Headers) -> APIError | None:
        if self.key is None or path in OPEN_PATHS:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.key):
            return None
        message = ("Incorrect API key provided" if token else
                   "You didn't provide an API key: send it as an 'Authorization: Bearer <key>' header")
        return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _check_length(self, headers: Headers) -> APIError | None:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return _too_large(self.settings.max_body_bytes)
        return None

    async def _read_body(self, receive) -> bytes:
        chunks, size, limit = [], 0, self.settings.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that hands the app the body read already, then the connection's own messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        if pending:
            return pending.pop()
        return await receive()

    return replay


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
                    code="request_too_large")


def _close_after(error: APIError) -> APIError:
    error.headers = {**(error.headers or {}), "Connection": "close"}
    return error


# -------------------------------------------------------------------- uvicorn
class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete ``header_timeout``
    seconds after it opened or after its previous response (uvicorn's keep-alive timer stops at the first byte)."""

    header_timeout = 30.0

    def connection_made(self, transport) -> None:
        self._header_timer = None
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request headers within %g s", self.client,
                     self.header_timeout)
            self.transport.close()


class Server(uvicorn.Server):
    """``uvicorn.Server`` that ends open generations as soon as a graceful shutdown starts.

    uvicorn runs the app's lifespan shutdown only once every connection has closed (or after
    ``timeout_graceful_shutdown``, by cancelling them), so a stream would hang until then and be cut off.
    Here ``on_shutdown`` (``OpenAIServer.shutdown``) runs first: each open stream gets an error event and
    ``data: [DONE]``, and the connections close by themselves.
    """

    def __init__(self, config: uvicorn.Config, on_shutdown):
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        log.info("shutting down: ending open requests")
        await asyncio.to_thread(self.on_shutdown)
        await super().shutdown(sockets)


def make_server(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                timeout_graceful_shutdown: float = 5, **config) -> Server:
    """A uvicorn server for an app from ``create_app``, with the app's read timeout on request headers."""
    server = app.state.server
    protocol = type("H11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": server.settings.read_timeout})
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                               timeout_graceful_shutdown=timeout_graceful_shutdown, **config)
    return Server(uv_config, server.shutdown)
