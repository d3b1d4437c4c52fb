"""An OpenAI-compatible HTTP server with speculative decoding: ``falconspec serve`` or ``create_app(generator)``."""

from .app import OpenAIServer, create_app

__all__ = ["OpenAIServer", "create_app"]
