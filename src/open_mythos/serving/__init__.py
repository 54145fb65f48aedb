"""`mythos serve`: an OpenAI-compatible HTTP server (FastAPI) on the inference engine."""

from .app import build_app, serve_in_thread

__all__ = ["build_app", "serve_in_thread"]
