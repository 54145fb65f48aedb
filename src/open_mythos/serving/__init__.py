"""`mythos serve`: an OpenAI-compatible HTTP server (FastAPI) on the depth-batching engine."""

from .app import build_app, serve_in_thread

__all__ = ["build_app", "serve_in_thread"]
