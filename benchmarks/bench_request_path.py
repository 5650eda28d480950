"""What the middleware's request path costs the event loop, without HTTP and without the writer.

    python -m benchmarks.bench_request_path                       # ~1 minute
    python -m benchmarks.bench_request_path --baseline 2724ffa    # also an earlier commit, side by side

A tiny ASGI app (a JSON completion; a stream of 20 or 2,000 SSE events, one ``http.response.body``
message each) is driven in process by a fake server whose ``receive``/``send`` behave like uvicorn's
(the body, then a wait until the response completes or the client leaves). Variants: the app bare, and
wrapped by `PersistenceMiddleware` with the writer's ``submit``/``feed_stream`` replaced by a sink that
drops the record, so only the request path is measured; ``--baseline REV`` adds the same middleware as
it was at commit REV (``git archive`` into a temporary package). Variants alternate within each repeat.

CPU time is read with `time.thread_time_ns` around the event loop, which runs in this thread and is the
only thread (the writer is never started). Reported: µs added per exchange over bare, and per SSE event
((added for a stream - added for a JSON exchange) / events), median [min..max] over the repeats. Then,
per exchange: the garbage-collector-tracked objects still alive once the exchanges have ended, and the
objects only a collection frees (reference cycles), with the collector off while the exchanges run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Coroutine
from io import BytesIO
from pathlib import Path
from typing import Any

from .common import ROOT, machine, spread

BODY = json.dumps(
    {
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in three words."},
        ],
        "stream": False,
    }
).encode()

# What the openai SDK sends, as uvicorn hands it over (lower-case names, bytes).
HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"accept", b"application/json"),
    (b"content-type", b"application/json"),
    (b"user-agent", b"OpenAI/Python 1.99.0"),
    (b"x-stainless-lang", b"python"),
    (b"x-stainless-package-version", b"1.99.0"),
    (b"x-stainless-os", b"Linux"),
    (b"x-stainless-arch", b"x64"),
    (b"x-stainless-runtime", b"CPython"),
    (b"x-stainless-runtime-version", b"3.11.7"),
    (b"authorization", b"Bearer sk-bench-0123456789"),
    (b"x-stainless-async", b"false"),
    (b"x-stainless-retry-count", b"0"),
    (b"x-stainless-read-timeout", b"600"),
    (b"content-length", str(len(BODY)).encode()),
]

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there, friend."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
    }
).encode()
JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(COMPLETION)).encode())]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def _event(index: int) -> bytes:
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "bench-model",
        "choices": [{"index": 0, "delta": {"content": f" word{index}"}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


EVENTS = [_event(i) for i in range(2000)]
DONE = b"data: [DONE]\n\n"


class FakeServer:
    """One request/response cycle, shaped like uvicorn's: the body in one message, then ``receive``
    waits until the response is complete (or the client leaves) and answers ``http.disconnect``."""

    __slots__ = ("complete", "event", "read")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.complete = False
        self.read = False

    async def receive(self) -> dict[str, Any]:
        if not self.read:
            self.read = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        if not self.complete:
            await self.event.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
            self.event.set()


def scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": list(HEADERS),
        "state": {},
    }


async def _read_body(receive: Any) -> None:
    while (await receive()).get("more_body"):
        pass


async def json_app(scope: Any, receive: Any, send: Any) -> None:
    await _read_body(receive)
    await asyncio.sleep(0)  # the upstream call: the exchange spans loop iterations, as a real one does
    await send({"type": "http.response.start", "status": 200, "headers": list(JSON_HEADERS)})
    await send({"type": "http.response.body", "body": COMPLETION, "more_body": False})


def sse_app(events: int) -> Callable[[Any, Any, Any], Coroutine[Any, Any, None]]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        for index in range(events):
            await send({"type": "http.response.body", "body": EVENTS[index], "more_body": True})
            await asyncio.sleep(0)  # the next event from upstream
        await send({"type": "http.response.body", "body": DONE, "more_body": False})

    return app


SCENARIOS: dict[str, tuple[Any, int, int]] = {  # name: (app, SSE events, exchanges per measurement)
    "json": (json_app, 0, 4000),
    "sse20": (sse_app(20), 20, 1000),
    "sse2000": (sse_app(2000), 2000, 32),
}
CONCURRENCY = 16  # exchanges in flight at once, each its own task as a server runs them


class _Sink:
    """Stands in for the writer: takes the record and drops it (only the request path is measured)."""

    def submit(self, record: Any) -> None:
        pass

    def feed_stream(self, handoff: Any) -> None:
        pass


def _wrap(package: str, app: Any, workdir: Path) -> Any:
    middleware_module = importlib.import_module(f"{package}.middleware")
    middleware = middleware_module.PersistenceMiddleware(
        app, database_url=f"sqlite:///{workdir / 'never-written.db'}", spill_dir=str(workdir / "spill")
    )
    sink = _Sink()
    middleware.writer.submit = sink.submit
    middleware.writer.feed_stream = sink.feed_stream
    middleware._published = True  # nothing to publish: no app state, no retention
    return middleware


async def _drive(asgi: Any, count: int) -> None:
    async def one() -> None:
        server = FakeServer()
        await asgi(scope(), server.receive, server.send)

    async def worker(share: int) -> None:
        for _ in range(share):
            await asyncio.get_running_loop().create_task(one())

    await asyncio.gather(*(worker(count // CONCURRENCY) for _ in range(CONCURRENCY)))


def measure(loop: asyncio.AbstractEventLoop, asgi: Any, count: int) -> float:
    """CPU µs per exchange of ``count`` exchanges (rounded down to a multiple of CONCURRENCY)."""
    count = max(CONCURRENCY, count - count % CONCURRENCY)
    gc.collect()
    started = time.thread_time_ns()
    loop.run_until_complete(_drive(asgi, count))
    return (time.thread_time_ns() - started) / 1000 / count


def leftovers(loop: asyncio.AbstractEventLoop, asgi: Any, count: int) -> tuple[float, float]:
    """(tracked objects still alive after the exchanges ended, objects only a collection frees),
    per exchange."""
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        loop.run_until_complete(_drive(asgi, count))
        alive = len(gc.get_objects()) - before
        cyclic = gc.collect()
    finally:
        gc.enable()
    return (alive - cyclic) / count, cyclic / count


def baseline_package(revision: str, workdir: Path) -> str:
    """The package as of ``revision``, importable as ``qwen_persist_at_<rev>``."""
    name = "qwen_persist_at_" + "".join(c for c in revision if c.isalnum())
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "qwen_persist"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(workdir / "baseline", filter="data")
    (workdir / "baseline" / "qwen_persist").rename(workdir / "baseline" / name)
    sys.path.insert(0, str(workdir / "baseline"))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline", metavar="REV", help="also measure the middleware as of this commit")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the exchanges per measurement")
    args = parser.parse_args()
    print(machine())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    with tempfile.TemporaryDirectory(prefix="qp-reqpath-") as tmp:
        workdir = Path(tmp)
        packages = {"wrapped": "qwen_persist"}
        if args.baseline:
            packages[f"at {args.baseline}"] = baseline_package(args.baseline, workdir)
        variants: dict[str, dict[str, Any]] = {"bare": {name: app for name, (app, _, _) in SCENARIOS.items()}}
        for label, package in packages.items():
            variants[label] = {name: _wrap(package, app, workdir) for name, (app, _, _) in SCENARIOS.items()}
        for apps in variants.values():  # warm-up: imports, caches, first-call paths
            for name, asgi in apps.items():
                measure(loop, asgi, max(CONCURRENCY, SCENARIOS[name][2] // 10))
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for name, (_, _, count) in SCENARIOS.items():
                for label, apps in variants.items():
                    times.setdefault((label, name), []).append(
                        measure(loop, apps[name], int(count * args.scale))
                    )
        print(f"\nCPU µs per exchange on the loop thread, {args.repeats} repeats, median [min..max]")
        for name in SCENARIOS:
            print(
                f"  {name:8s} "
                + "  ".join(f"{label} {spread(times[label, name], '{:.1f}')}" for label in variants)
            )
        print("\nadded over bare, µs (per repeat: the variant minus bare of the same repeat)")
        added: dict[tuple[str, str], list[float]] = {}
        for label in packages:
            for name in SCENARIOS:
                added[label, name] = [
                    w - b for w, b in zip(times[label, name], times["bare", name], strict=True)
                ]
            per_event = {
                name: [
                    (s - j) / events for s, j in zip(added[label, name], added[label, "json"], strict=True)
                ]
                for name, (_, events, _) in SCENARIOS.items()
                if events
            }
            print(
                f"  {label:14s} per JSON exchange {spread(added[label, 'json'], '{:.1f}')}; "
                + "; ".join(
                    f"{name} exchange {spread(added[label, name], '{:.1f}')}, "
                    f"per event {spread(values, '{:.2f}')}"
                    for name, values in per_event.items()
                )
            )
        print(
            "\nper exchange: gc-tracked objects left alive after it ended"
            " / objects freed only by a collection"
        )
        for label, apps in variants.items():
            cells = []
            for name, asgi in apps.items():
                alive, cyclic = leftovers(loop, asgi, max(CONCURRENCY, SCENARIOS[name][2] // 4))
                cells.append(f"{name} {alive:.2f} / {cyclic:.2f}")
            print(f"  {label:14s} " + "; ".join(cells))
    loop.close()


if __name__ == "__main__":
    main()
