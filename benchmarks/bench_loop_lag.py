"""How long the event loop waits while the writer works: loop lag and collector pauses, in process.

    python -m benchmarks.bench_loop_lag                # ~1 minute; --gc-freeze to freeze set-up objects

No HTTP: streamed exchanges (20 SSE events each) are driven straight through the ASGI app at a fixed
rate (default 500/s, SPEC §10), bare, wrapped with the writer thread ("wrapped") and with the writer
process ("process"), on SQLite, all pinned to one core (``--cores``), while a ticker task asks for a
1 ms sleep over and over; how late each tick wakes is the loop's lag, what any request arriving then
would wait. Each variant runs in a fresh process (so one's garbage does not bill the other),
alternating over the repeats; it reports lag p50/p99/max, the longest full-collection (gen 2) pause,
and CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import machine, spread

EVENTS = 20


def _chunk(index: int, finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-lag",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "bench-model",
        "choices": [{"index": 0, "delta": {"content": f" word{index}"}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def _stream_app(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    for index in range(EVENTS):
        await send({"type": "http.response.body", "body": _chunk(index), "more_body": True})
    await send({"type": "http.response.body", "body": _chunk(EVENTS, "stop") + b"data: [DONE]\n\n"})


def _child(variant: str, rate: float, seconds: float, freeze: bool) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    from qwen_persist import PersistenceMiddleware
    from qwen_persist.migrate import upgrade

    workdir = tempfile.mkdtemp(prefix="qp-lag-")
    app: Any = _stream_app
    middleware: PersistenceMiddleware | None = None
    if variant in ("wrapped", "process"):
        url = f"sqlite:///{workdir}/lag.db"
        upgrade(url)
        writer = "thread" if variant == "wrapped" else "process"
        middleware = app = PersistenceMiddleware(
            _stream_app, database_url=url, spill_dir=workdir, writer=writer
        )
    pauses: list[float] = []
    started: list[float] = []

    def on_collect(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses.append((time.perf_counter() - started.pop()) * 1000)

    gc.callbacks.append(on_collect)
    if freeze:
        gc.freeze()
    body = json.dumps(
        {"model": "bench-model", "stream": True, "messages": [{"role": "user", "content": "hello there"}]}
    ).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def run() -> list[float]:
        lags: list[float] = []

        async def ticker() -> None:
            while True:
                before = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append((time.perf_counter() - before - 0.001) * 1000)

        if middleware is not None:
            middleware.writer.start()
            await middleware.writer.barrier(30)  # the writer process has started before the clock does
        ticking = asyncio.ensure_future(ticker())
        start = time.perf_counter()
        for sent in range(int(rate * seconds)):
            await app(dict(scope), receive, send)
            delay = start + (sent + 1) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        ticking.cancel()
        if middleware is not None:
            stats = await middleware.aclose()
            assert stats.written == stats.accepted, stats
        return lags

    cpu_before = os.times()
    lags = sorted(asyncio.run(run()))
    cpu_after = os.times()
    return {
        "lag_p50": lags[len(lags) // 2],
        "lag_p99": lags[int(len(lags) * 0.99)],
        "lag_max": lags[-1],
        "gc2_max": max(pauses, default=0.0),
        # The writer process is a child, waited for at close: its CPU is in the children's fields.
        "cpu_s": sum(after - before for after, before in zip(cpu_after[:4], cpu_before[:4], strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--cores", default="0", help="cores to pin each run to (taskset list), '' for none")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gc-freeze", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.rate, args.seconds, args.gc_freeze)))
        return
    print(machine())
    results: dict[str, dict[str, list[float]]] = {}
    for repeat in range(args.repeats):
        for variant in ("bare", "wrapped", "process"):
            command = [sys.executable, "-m", "benchmarks.bench_loop_lag", "--child", variant]
            if args.cores and shutil.which("taskset"):
                command = ["taskset", "-c", args.cores, *command]
            command += ["--rate", str(args.rate), "--seconds", str(args.seconds)]
            command += ["--gc-freeze"] if args.gc_freeze else []
            outcome = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            for key, value in outcome.items():
                results.setdefault(variant, {}).setdefault(key, []).append(value)
            print(f"  repeat {repeat} {variant:8} " + " ".join(f"{k} {v:.2f}" for k, v in outcome.items()))
    freeze = " with gc.freeze()" if args.gc_freeze else ""
    print(f"\n{args.rate:.0f} streamed exchanges/s for {args.seconds:g} s{freeze}; median [min..max], ms")
    print(
        f"{'variant':8} {'lag p50':>22} {'lag p99':>22} {'lag max':>22} {'gen2 pause max':>22} {'CPU s':>22}"
    )
    for variant, values in results.items():
        row = (spread(values[key]) for key in ("lag_p50", "lag_p99", "lag_max", "gc2_max", "cpu_s"))
        print(f"{variant:8} " + " ".join(f"{cell:>22}" for cell in row))
    bare = {key: statistics.median(results["bare"][key]) for key in ("lag_p99", "lag_max")}
    for variant in ("wrapped", "process"):
        p99 = statistics.median(results[variant]["lag_p99"]) - bare["lag_p99"]
        worst = statistics.median(results[variant]["lag_max"]) - bare["lag_max"]
        print(
            f"goal {variant}: lag p99 <= bare + 0.5 ms: +{p99:.2f} {'met' if p99 <= 0.5 else 'NOT met'};"
            f" max <= bare + 5 ms: +{worst:.2f} {'met' if worst <= 5 else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
