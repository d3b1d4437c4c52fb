"""An OpenAI-compatible HTTP server with speculative decoding: ``falconspec serve`` or ``create_app(generator)``."""

from .app import OpenAIServer, create_app
from .guard import make_server
from .settings import ServerSettings

__all__ = ["OpenAIServer", "ServerSettings", "create_app", "make_server"]
