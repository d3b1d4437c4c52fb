"""``falconspec serve``: an OpenAI-compatible HTTP server (chat, completions, SSE streaming, /metrics).

One request generates at a time; ``--max-queue`` more may wait, further ones get 429. Example:
``falconspec serve --model smollm2-135m --drafter pld --port 8000``, then point an OpenAI client at
``http://127.0.0.1:8000/v1`` with model ``smollm2-135m``.
"""

from __future__ import annotations

import argparse
import signal
import threading

from .common import add_model_args, load_model_and_drafter


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible server with speculative decoding",
                                   description=__doc__)
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s); the API has no authentication")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send and /v1/models lists (default: the --model value)")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait behind the running one; more get 429 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for generation (default: torch's choice); 1 is often fastest "
                             "on a machine shared with other CPU-heavy processes")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..generate import SpeculativeGenerator
    from ..server import create_app

    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    target, drafter = load_model_and_drafter(args)
    app = create_app(SpeculativeGenerator(target, drafter, matmul_path=args.matmul_path), model_name=args.served_model_name or args.model,
                     max_queue=args.max_queue, worker_thread=False)
    # HTTP on a helper thread, generation on this (main) thread, the one that loaded the model: see scheduler.py.
    # A streaming generation can be long: do not wait for it forever on shutdown.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="falconspec-http", daemon=True)
    http.start()
    scheduler = app.state.server.scheduler
    signal.signal(signal.SIGTERM, _interrupt)  # uvicorn installs no handlers off the main thread: stop as on Ctrl-C
    stop_when_http_ends = threading.Thread(target=lambda: (http.join(), scheduler.stop()), daemon=True)
    stop_when_http_ends.start()
    try:
        scheduler.run_forever()  # returns once the scheduler is stopped (the HTTP server ended)
    except KeyboardInterrupt:
        server.should_exit = True
        scheduler.stop()
    http.join(10)
    return 0 if server.started else 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
