"""``falconspec serve``: an OpenAI-compatible HTTP server (chat, completions, SSE streaming, /metrics).

Continuous batching: up to ``--max-batch`` requests generate together, joining and leaving the batch at cycle
boundaries; ``--max-queue`` more may wait for a place, further ones get 429. Example:
``falconspec serve --model smollm2-135m --drafter pld --port 8000``, then point an OpenAI client at
``http://127.0.0.1:8000/v1`` with model ``smollm2-135m``. Before exposing it beyond localhost, set ``--api-key``
(or FALCONSPEC_API_KEY) and ``--allowed-hosts``. SIGTERM or Ctrl-C ends open streams with an error event and
``data: [DONE]``, then stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from .common import add_model_args, load_model_and_drafter

API_KEY_ENV = "FALCONSPEC_API_KEY"
DEFAULT_MAX_BATCH = 8  # a batch of 8 tree verifications stays a few-row product on a small CPU model


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible server with speculative decoding",
                                   description=__doc__)
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s); set --api-key before binding beyond localhost")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send and /v1/models lists (default: the --model value)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="requests generated at once, in one batch (continuous batching: requests join and "
                             "leave it at cycle boundaries); 1 = one at a time (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait for a place in the batch; more get 429 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for generation (default: torch's choice); 1 is often fastest "
                             "on a machine shared with other CPU-heavy processes")
    limits = parser.add_argument_group("limits and security (see the README's server section)")
    limits.add_argument("--max-tokens-limit", type=int, default=None,
                        help="most tokens one request may generate, and what a request without max_tokens gets "
                             "(default: a quarter of the context, at most 2048)")
    limits.add_argument("--request-timeout", type=float, default=300.0,
                        help="seconds from a request's admission (queue wait included) until it is given up: 504, "
                             "or an error event on a stream; 0 = none (default: %(default)s)")
    limits.add_argument("--max-body-bytes", type=int, default=None,
                        help="largest request body; larger ones get 413 before they are read (default: 32 bytes per "
                             "context token, at least 1 MiB)")
    limits.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds to receive a request's headers, and then its body (default: %(default)s)")
    limits.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: the "
                             f"{API_KEY_ENV} environment variable; none: no authentication)")
    limits.add_argument("--allowed-hosts", default="*",
                        help="comma-separated Host header values to answer, '*.example.com' wildcards; others get "
                             "421 (default: %(default)s, any)")
    limits.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (default: off)")
    limits.add_argument("--allow-special-tokens-in-content", action="store_true",
                        help="let special tokens written in chat message content act as control tokens (default: "
                             "they are encoded as text, as vLLM and the OpenAI API do)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..batch import BatchGenerator
    from ..generate import SpeculativeGenerator
    from ..server import ServerSettings, create_app, make_server

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    settings = ServerSettings(
        max_tokens_limit=args.max_tokens_limit, request_timeout=args.request_timeout or None,
        max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()), docs=args.docs,
        allow_special_tokens_in_content=args.allow_special_tokens_in_content)
    logging.getLogger("falconspec").setLevel(args.log_level.upper())  # cancellations, timeouts, shutdown, errors
    target, drafter = load_model_and_drafter(args)
    generator = SpeculativeGenerator(target, drafter, matmul_path=args.matmul_path)
    app = create_app(generator, model_name=args.served_model_name or args.model, max_queue=args.max_queue,
                     worker_thread=False, settings=settings,
                     batch=BatchGenerator.from_generator(generator, args.max_batch))
    # HTTP on a helper thread, generation on this (main) thread, the one that loaded the model: see scheduler.py.
    # On shutdown the server ends open generations first (guard.Server), so the 5 s grace is rarely needed.
    server = make_server(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    http = threading.Thread(target=server.run, name="falconspec-http", daemon=True)
    http.start()
    scheduler = app.state.server.scheduler

    def stop(signum, frame) -> None:
        # uvicorn installs no handlers off the main thread. Only set flags here: an exception raised into the
        # generation (as KeyboardInterrupt would be) skips the end of the stream its client is waiting for.
        logging.getLogger("falconspec.server").info("%s received: shutting down", signal.Signals(signum).name)
        if server.should_exit:
            server.force_exit = True  # a second signal: do not wait for the open connections
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stop_when_http_ends = threading.Thread(target=lambda: (http.join(), scheduler.stop()), daemon=True)
    stop_when_http_ends.start()
    scheduler.run_forever()  # returns once the scheduler is stopped (on shutdown, or when the HTTP server ended)
    http.join(10)
    return 0 if server.started else 1
