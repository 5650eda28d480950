"""The HTTP API: the history endpoints and the OpenAI Stored Completions API (see `app`)."""

from .app import create_app

__all__ = ["create_app"]
