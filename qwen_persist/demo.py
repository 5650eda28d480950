"""``qwen-persist demo``: a short recorded conversation, end to end, with nothing to configure.

It starts the bundled fake upstream and the forwarding proxy from ``examples/`` (the proxy wrapped in
`PersistenceMiddleware`, tables created with ``auto_upgrade=True``) under uvicorn on 127.0.0.1, talks to
the proxy with httpx as any OpenAI client would, shuts both down (which flushes the recorder), and prints
what landed in the database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session as DbSession

from ._bundled import load_example
from .engine import DEFAULT_DATABASE_URL, make_engine
from .models import Request, Response, Session

UPSTREAM_KEY = "sk-demo-upstream"  # the proxy's key for the fake upstream; never stored
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``qwen-persist demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="run a fake upstream and a recorded proxy, talk to it, and show what was stored",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Deliberately not $QWEN_PERSIST_DATABASE_URL: a demo should not write into a real store unasked.
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=DEFAULT_DATABASE_URL,
        help=f"where to record (default: {DEFAULT_DATABASE_URL}, a file in the current folder)",
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from .cli import _database_errors, database_url

    url = database_url(args)

    def reachable() -> None:
        # Before any traffic: a database that cannot be reached is one line and exit status 1, not a
        # conversation recorded into the journal followed by a traceback.
        engine = make_engine(url)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()

    _database_errors(url, reachable)
    return run_demo(url)


def run_demo(database_url: str) -> int:
    """Run the demo against ``database_url``; print the conversation and the stored rows. Returns 0."""
    print("qwen-persist demo")
    print("=================")
    transcript = asyncio.run(_converse(database_url))
    session_id = _print_stored(database_url, transcript.request_ids)
    _print_where(database_url, transcript.request_ids, session_id)
    return 0


# --- servers --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _serving(app: Callable[..., Any]) -> AsyncIterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port with its lifespan; leaving runs its shutdown."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. uvicorn does not set it on sockets handed to it, and without it
    # every reused keep-alive connection waits ~40 ms for a delayed ACK (Nagle), which the timings show.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():  # startup failed; uvicorn has logged why
                await task
                raise RuntimeError("a demo server failed to start")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


# --- the conversation -----------------------------------------------------------------------------------


@dataclass
class Transcript:
    """What the client saw: the request ids the proxy echoed, in order."""

    request_ids: list[str] = field(default_factory=list)


async def _converse(database_url: str) -> Transcript:
    fake_upstream = load_example("fake_upstream")
    openai_proxy = load_example("openai_proxy")
    upstream_app: Callable[..., Any] = fake_upstream.create_app(api_key=UPSTREAM_KEY)
    transcript = Transcript()
    async with _serving(upstream_app) as upstream_url:
        proxy_app: Callable[..., Any] = openai_proxy.create_app(
            f"{upstream_url}/v1", UPSTREAM_KEY, database_url=database_url, auto_upgrade=True
        )
        async with _serving(proxy_app) as proxy_url:
            print(f"fake upstream  {upstream_url}/v1")
            print(f"proxy          {proxy_url}/v1   (wrapped in PersistenceMiddleware)")
            async with httpx.AsyncClient(base_url=f"{proxy_url}/v1", timeout=30) as client:
                await _talk(client, transcript)
        # The proxy's lifespan shutdown has now flushed every queued record to the database.
    return transcript


async def _talk(client: httpx.AsyncClient, transcript: Transcript) -> None:
    async def post(body: dict[str, Any]) -> httpx.Response:
        response = await client.post("/chat/completions", json=body)
        transcript.request_ids.append(response.headers["x-request-id"])
        return response

    _heading("1. A question (JSON)")
    question = {"role": "user", "content": "What does qwen_persist record?"}
    answer = (await post({"model": "fake-text", "messages": [question]})).json()["choices"][0]["message"]
    _say("you", question["content"])
    _say("assistant", answer["content"])

    _heading("2. A follow-up, streamed, in the same conversation (same first message = same session)")
    follow_up = {"role": "user", "content": "And does it keep streamed answers too?"}
    body = {
        "model": "fake-text",
        "messages": [question, answer, follow_up],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _say("you", follow_up["content"])
    streamed = await _stream(client, body, transcript)
    _say("assistant", "".join(streamed["content"]))

    _heading("3. A tool call round trip (the call is streamed in argument fragments)")
    ask = {"role": "user", "content": "What's the weather in Paris?"}
    _say("you", ask["content"])
    body = {
        "model": "fake-tool",
        "messages": [ask],
        "tools": [WEATHER_TOOL],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    call = await _stream(client, body, transcript)
    tool_call = {
        "id": call["tool_call_id"],
        "type": "function",
        "function": {"name": call["tool_name"], "arguments": "".join(call["arguments"])},
    }
    _say("assistant", f"calls {tool_call['function']['name']}({tool_call['function']['arguments']})")
    result = "18 degrees C and sunny"
    _say("tool", result)
    messages = [
        ask,
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": tool_call["id"], "content": result},
    ]
    final = (await post({"model": "fake-tool", "messages": messages, "tools": [WEATHER_TOOL]})).json()
    _say("assistant", final["choices"][0]["message"]["content"])

    _heading("4. An upstream error (the fake upstream answers 429)")
    failed = await post({"model": "fake-error-429", "messages": [{"role": "user", "content": "One more?"}]})
    _say("proxy", f"HTTP {failed.status_code}: {failed.json()['error']['message']}")


async def _stream(client: httpx.AsyncClient, body: dict[str, Any], transcript: Transcript) -> dict[str, Any]:
    """POST a streamed request; gather the content and tool-call fragments the client receives."""
    got: dict[str, Any] = {"content": [], "arguments": [], "tool_call_id": None, "tool_name": None}
    async with client.stream("POST", "/chat/completions", json=body) as response:
        transcript.request_ids.append(response.headers["x-request-id"])
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                delta = choice["delta"]
                if delta.get("content"):
                    got["content"].append(delta["content"])
                for fragment in delta.get("tool_calls") or []:
                    got["tool_call_id"] = fragment.get("id") or got["tool_call_id"]
                    function = fragment.get("function") or {}
                    got["tool_name"] = function.get("name") or got["tool_name"]
                    got["arguments"].append(function.get("arguments") or "")
    return got


def _heading(text: str) -> None:
    print(f"\n{text}")


def _say(who: str, text: object) -> None:
    print(f"   {who + ':':<11}{text}")


# --- what was stored ------------------------------------------------------------------------------------


def _print_stored(database_url: str, request_ids: Sequence[str]) -> str | None:
    """Print the stored rows; returns the session of the first exchange."""
    engine = make_engine(database_url)
    try:
        with DbSession(engine) as db:
            requests = db.scalars(
                select(Request).where(Request.request_id.in_(request_ids)).order_by(Request.id)
            ).all()
            responses = {
                r.request_id: r
                for r in db.scalars(select(Response).where(Response.request_id.in_([q.id for q in requests])))
            }
            session_ids = list(dict.fromkeys(q.session_id for q in requests))
            by_id = {s.id: s for s in db.scalars(select(Session).where(Session.id.in_(session_ids)))}
            sessions = [by_id[i] for i in session_ids if i in by_id]
    finally:
        engine.dispose()

    counts = f"{len(sessions)} sessions, {len(requests)} requests, {len(responses)} responses"
    _heading(f"What the proxy stored ({counts})")
    _heading("sessions")
    _table(
        ["id", "first user message", "messages", "created"],
        [[s.id, s.first_user_message, s.message_count, _clock(s.created_at)] for s in sessions],
    )
    _heading("requests")
    _table(
        ["id", "session", "request_id", "model", "stream", "last message"],
        [
            [
                q.id,
                q.session_id,
                q.request_id,
                q.model,
                "yes" if q.stream else "no",
                _last_message(q.openai_request),
            ]
            for q in requests
        ],
    )
    _heading("responses")
    rows = []
    for q in requests:
        r = responses.get(q.id)
        if r is None:
            rows.append([q.id, "-", "-", "-", "-", "-", "(no response row)"])
            continue
        tokens = (
            "-" if r.total_tokens is None else f"{r.prompt_tokens}+{r.completion_tokens}={r.total_tokens}"
        )
        rows.append(
            [q.id, r.status_code, r.finish_reason, tokens, r.first_byte_ms, r.duration_ms, _outcome(r)]
        )
    _table(["request", "status", "finish", "tokens", "ttfb ms", "total ms", "reply / error"], rows)
    return requests[0].session_id if requests else None


def _print_where(database_url: str, request_ids: Sequence[str], session_id: str | None) -> None:
    url = make_url(database_url)
    _heading("Where it is")
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        path = Path(url.database).resolve()
        print(f"   database:  {path}")
        shown = f"sqlite:///{path}"
    else:
        shown = url.render_as_string(hide_password=True)
        print(f"   database:  {shown}")
    option = f"--database-url {shlex.quote(shown)}"
    print("   look at it with qwen-persist:")
    commands = [
        ("requests", "the exchanges, newest first"),
        (
            f"show {shlex.quote(session_id)}" if session_id else "sessions",
            "the first conversation, turn by turn",
        ),
        (
            f"show {request_ids[min(2, len(request_ids) - 1)]} --json" if request_ids else "requests --json",
            "one exchange (a streamed tool call), as stored",
        ),
        ("stats --by model", "counts, errors, tokens, latency percentiles"),
        ("export --format openai-chat -o train.jsonl", "fine-tuning data from the successful exchanges"),
    ]
    for command, what in commands:
        print(f"     qwen-persist {command} {option}")
        print(f"       # {what}")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], max_width: int = 32) -> None:
    """Print rows as an aligned text table; long cells are cut to ``max_width`` with '...'."""
    cells = [[_cell(value, max_width) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    print("   " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print("   " + "  ".join("-" * w for w in widths))
    for row in cells:
        print("   " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("   (none)")


def _cell(value: object, max_width: int) -> str:
    text = "-" if value is None else " ".join(str(value).split())  # one line per row
    return text if len(text) <= max_width else text[: max_width - 3] + "..."


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000))


def _last_message(body: Any) -> str:
    messages = body.get("messages") if isinstance(body, dict) else None
    if not messages:
        return ""
    last = messages[-1]
    return f"{last.get('role')}: {last.get('content')}"


def _outcome(response: Response) -> str:
    """The stored reply in a few words: its text, its tool call, or the error."""
    if response.error:
        return f"error: {response.error}"
    body = response.openai_response
    if not isinstance(body, dict) or not body.get("choices"):
        return ""
    message = body["choices"][0].get("message") or {}
    if message.get("tool_calls"):
        function = message["tool_calls"][0]["function"]
        return f"{function['name']}({function['arguments']})"
    return str(message.get("content") or "")
