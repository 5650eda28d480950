"""qwen_persist: record OpenAI-compatible chat completion traffic in a database.

Wrap a proxy app with `PersistenceMiddleware`, run the migrations (`qwen-persist db upgrade`), and every
``/v1/chat/completions`` exchange, JSON or streamed, lands in the ``sessions`` / ``requests`` /
``responses`` tables.
"""

from .bodies import restore_nul
from .completion import ChatCompletionAccumulator, StreamReconstructor, StreamResult, reconstruct_stream
from .config import ConfigurationError, Settings
from .engine import make_engine
from .exchange import Exchange, current_exchange
from .middleware import PersistenceMiddleware, middleware_of
from .models import metadata
from .repositories import (
    History,
    InvalidParameter,
    Pagination,
    RequestFilter,
    ResponseFilter,
    SessionFilter,
)
from .sessions import SessionInfo, SessionManager
from .sse import ServerSentEvent, SSEDecoder
from .writer import WriterStats

__all__ = [
    "ChatCompletionAccumulator",
    "ConfigurationError",
    "Exchange",
    "History",
    "InvalidParameter",
    "Pagination",
    "PersistenceMiddleware",
    "RequestFilter",
    "ResponseFilter",
    "SSEDecoder",
    "ServerSentEvent",
    "SessionFilter",
    "SessionInfo",
    "SessionManager",
    "Settings",
    "StreamReconstructor",
    "StreamResult",
    "WriterStats",
    "current_exchange",
    "make_engine",
    "metadata",
    "middleware_of",
    "reconstruct_stream",
    "restore_nul",
]

__version__ = "0.1.0"
