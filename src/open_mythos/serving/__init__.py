"""`mythos serve`: an OpenAI-compatible HTTP server (FastAPI) on the inference engine."""

from .app import build_app, make_server, serve_in_thread

__all__ = ["build_app", "make_server", "serve_in_thread"]
