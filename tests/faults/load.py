"""The load driver: concurrent chat completions (JSON and SSE) through the proxy, bounded in count and
time, each remembered with what the client saw; and clients that vanish at a chosen phase.

Every request carries a token of its own in its user message (``qpf-<run>-<index>``). The fake upstream
echoes the last user message, so the token ties a request, its reply and its stored rows together
whatever request id the rows end up under.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

TOKEN_RE = re.compile(r"qpf-[0-9a-f]{8}-\d{5}")
PATH = "/v1/chat/completions"


def new_run() -> str:
    """A run id: tokens of different scenarios sharing a database never collide."""
    return uuid.uuid4().hex[:8]


@dataclass(frozen=True, slots=True)
class Call:
    """One planned request."""

    index: int
    token: str
    stream: bool
    target: int = 0  # which base URL (replica) it goes to
    request_id: str | None = None  # the X-Request-Id the client sends, if any
    session_id: str | None = None  # the X-Session-Id the client sends, if any
    delay_ms: int = 0  # the fake upstream's pause between stream chunks
    filler_words: int = 0  # more words in the prompt: a longer echo, so a longer stream

    @property
    def prompt(self) -> str:
        filler = " ".join(f"w{i}" for i in range(self.filler_words))
        return f"Question {self.token}: what is six times seven? {filler}".rstrip()

    def body(self) -> dict[str, Any]:
        return {
            "model": "fake-text",
            "stream": self.stream,
            "messages": [{"role": "user", "content": self.prompt}],
        }

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.request_id is not None:
            headers["x-request-id"] = self.request_id
        if self.session_id is not None:
            headers["x-session-id"] = self.session_id
        if self.delay_ms:
            headers["x-fake-delay-ms"] = str(self.delay_ms)
        return headers


def plan(
    count: int,
    *,
    run: str | None = None,
    stream_every: int = 2,
    slow_every: int = 0,
    slow_delay_ms: int = 40,
    slow_words: int = 20,
    targets: int = 1,
    sessions: int = 0,
    shared_request_ids: int = 0,
) -> list[Call]:
    """``count`` calls: every ``stream_every``-th is an SSE stream (0: none), of which every
    ``slow_every``-th is slow (about ``slow_words`` chunks ``slow_delay_ms`` apart); they go round-robin
    over ``targets`` base URLs; with ``sessions`` > 0 they continue that many sessions (X-Session-Id) in
    turn; with ``shared_request_ids`` = k > 1, each k consecutive calls send one client X-Request-Id
    (with ``targets`` = k, the same id reaches every replica)."""
    run = run or new_run()
    calls: list[Call] = []
    streams = 0
    for index in range(count):
        stream = stream_every > 0 and index % stream_every == stream_every - 1
        slow = False
        if stream:
            streams += 1
            slow = slow_every > 0 and streams % slow_every == 0
        calls.append(
            Call(
                index=index,
                token=f"qpf-{run}-{index:05d}",
                stream=stream,
                target=index % targets,
                request_id=f"qpf-{run}-rid-{index // shared_request_ids:05d}"
                if shared_request_ids > 1
                else None,
                session_id=f"qpf-{run}-session-{index % sessions}" if sessions else None,
                delay_ms=slow_delay_ms if slow else 0,
                filler_words=slow_words if slow else 0,
            )
        )
    return calls


@dataclass(slots=True)
class Outcome:
    """What the client saw of one call. Times are ``time.monotonic()``."""

    call: Call
    sent: bool = False
    status: int | None = None
    error: str | None = None
    request_id: str | None = None  # the X-Request-Id received
    done: bool = False  # a stream ended with data: [DONE]; a JSON body parsed as a completion
    echoed: bool = False  # the reply carries this call's own token: no cross-talk on the way back
    started: float = math.nan
    finished: float = math.nan

    @property
    def ok(self) -> bool:
        return self.sent and self.error is None and self.status == 200 and self.done and self.echoed

    @property
    def failed(self) -> bool:
        return self.sent and not self.ok

    @property
    def accepted(self) -> bool:
        """The proxy answered it (it has an X-Request-Id): the middleware holds an exchange for it."""
        return self.request_id is not None

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    def describe(self) -> str:
        kind = "sse" if self.call.stream else "json"
        return f"{self.call.token} {kind} status={self.status} done={self.done} error={self.error}"


async def _exchange(client: httpx.AsyncClient, base_url: str, outcome: Outcome) -> None:
    call = outcome.call
    async with client.stream("POST", base_url + PATH, json=call.body(), headers=call.headers()) as response:
        outcome.status = response.status_code
        outcome.request_id = response.headers.get("x-request-id")
        if response.status_code != 200:
            body = await response.aread()
            outcome.error = f"HTTP {response.status_code}: {body[:200]!r}"
            return
        text = ""
        if call.stream:
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    outcome.done = True
                elif line.startswith("data: {"):
                    for choice in json.loads(line[6:]).get("choices") or ():
                        text += (choice.get("delta") or {}).get("content") or ""
        else:
            data = json.loads(await response.aread())
            outcome.done = bool(data.get("choices"))
            if outcome.done:
                text = data["choices"][0]["message"].get("content") or ""
        outcome.echoed = call.token in text
        if outcome.done and not outcome.echoed:
            outcome.error = f"reply does not echo {call.token}: {text[:120]!r}"


async def drive(
    base_urls: Sequence[str],
    calls: Sequence[Call],
    *,
    concurrency: int = 64,
    spacing: float = 0.0,
    burst: int = 1,
    deadline: float = 120.0,
    request_timeout: float = 30.0,
    stop: threading.Event | None = None,
    progress: list[Outcome] | None = None,
) -> list[Outcome]:
    """Send ``calls`` (``burst`` at a time, ``spacing`` seconds between bursts, at most ``concurrency``
    in flight) and return one outcome per call, in order. No call starts after ``stop`` is set or
    ``deadline`` seconds; calls still running at the deadline are cancelled and marked so."""
    outcomes = [Outcome(call) for call in calls]
    if progress is not None:
        progress.extend(outcomes)  # the caller can watch them fill in
    gate = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    def stopped() -> bool:
        return (stop is not None and stop.is_set()) or loop.time() - begin > deadline

    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as client:

        async def one(outcome: Outcome) -> None:
            async with gate:
                if stopped():
                    return
                outcome.sent = True
                outcome.started = time.monotonic()
                try:
                    await _exchange(client, base_urls[outcome.call.target], outcome)
                except asyncio.CancelledError:
                    outcome.error = "cancelled at the driver's deadline"
                    raise
                except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
                    outcome.error = f"{type(exc).__name__}: {exc}"
                finally:
                    outcome.finished = time.monotonic()

        tasks: list[asyncio.Task[None]] = []
        for number, outcome in enumerate(outcomes):
            wait = begin + (number // max(1, burst)) * spacing - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if stopped():
                break
            tasks.append(asyncio.create_task(one(outcome)))
        if tasks:
            remaining = max(0.1, deadline + request_timeout - (loop.time() - begin))
            _, pending = await asyncio.wait(tasks, timeout=remaining)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
    return outcomes


def run_load(base_urls: Sequence[str], calls: Sequence[Call], **options: Any) -> list[Outcome]:
    """``drive`` to the end, from synchronous code."""
    return asyncio.run(drive(base_urls, calls, **options))


class LoadRun:
    """``drive`` in a background thread, so a test can break things while the traffic flows."""

    def __init__(self, base_urls: Sequence[str], calls: Sequence[Call], **options: Any) -> None:
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self._result: list[Outcome] | None = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                self._result = run_load(base_urls, calls, stop=self.stop, progress=self.outcomes, **options)
            except BaseException as exc:  # surfaced by join()
                self._error = exc

        self._thread = threading.Thread(target=target, name="load", daemon=True)

    def start(self) -> LoadRun:
        self._thread.start()
        return self

    def finished(self) -> int:
        return sum(1 for outcome in list(self.outcomes) if not math.isnan(outcome.finished))

    def wait_finished(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until ``count`` calls have finished: "mid-traffic" for the fault that follows."""
        deadline = time.monotonic() + timeout
        while self.finished() < count and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        return self.finished() >= count

    def join(self, timeout: float = 180.0) -> list[Outcome]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop.set()
            self._thread.join(30)
        if self._error is not None:
            raise self._error
        assert self._result is not None, "the load thread did not finish"
        return self._result


# -- clients that vanish -------------------------------------------------------------------------------

PHASES = ("before_body", "mid_body", "before_response", "mid_stream")


@dataclass(slots=True)
class Vanished:
    """A client that sent X-Request-Id ``request_id`` and went away at ``phase``."""

    phase: str
    request_id: str
    token: str
    note: str = ""
    events_read: int = field(default=0)


def vanish(base_url: str, phase: str, call: Call, timeout: float = 10.0) -> Vanished:
    """Send ``call`` over a raw socket and close the connection at ``phase``: after the headers (the body
    announced but never sent), half-way through the body, right after the whole body (before any of the
    response), or after the first events of a stream."""
    assert call.request_id is not None, "a vanishing call needs its own X-Request-Id to be found again"
    split = urlsplit(base_url)
    body = json.dumps(call.body()).encode()
    head = [
        f"POST {PATH} HTTP/1.1",
        f"Host: {split.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"X-Request-Id: {call.request_id}",
    ]
    head += [f"{name}: {value}" for name, value in call.headers().items() if name != "x-request-id"]
    request = ("\r\n".join(head) + "\r\n\r\n").encode()
    result = Vanished(phase, call.request_id, call.token)
    with socket.create_connection((split.hostname or "127.0.0.1", split.port or 80), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if phase == "before_body":
            sock.sendall(request)
            time.sleep(0.3)  # the server has the headers and waits for the body
        elif phase == "mid_body":
            sock.sendall(request + body[: len(body) // 2])
            time.sleep(0.3)
        elif phase == "before_response":
            sock.sendall(request + body)
        elif phase == "mid_stream":
            sock.sendall(request + body)
            received = b""
            deadline = time.monotonic() + timeout
            while received.count(b"data: {") < 3 and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    result.note = "the server closed first"
                    break
                received += chunk
            result.events_read = received.count(b"data: {")
        else:
            raise ValueError(f"unknown phase {phase!r}")
        # RST rather than FIN: the peer learns at once, as when a client process dies.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return result


def vanish_all(base_url: str, jobs: Sequence[tuple[str, Call]], threads: int = 8) -> list[Vanished]:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda job: vanish(base_url, job[0], job[1]), jobs))
