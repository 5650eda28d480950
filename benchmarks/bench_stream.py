"""Throughput of stream reconstruction: SSE decoding alone, and decoding plus accumulation.

Run ``python benchmarks/bench_stream.py``. Workloads:

* ``chat``: a realistic ~20-event answer (role, content tokens, finish, usage chunk, ``[DONE]``);
* ``chat-500``: the same shape with 496 content tokens, 500 events;
* ``long``: a long answer with reasoning, content and a tool call whose arguments arrive in fragments.

Each is delivered two ways: one network chunk per event, as an ASGI app writes them (what a stream over
``max_body_bytes`` is rebuilt from, while it passes), and as one whole body (what the writer rebuilds a
kept stream from). Decode + accumulate is measured on the general path (``fast_path=False``: every event
through the SSE decoder and the general merge) and on the default fast path, side by side, next to the
floor: one ``orjson.loads`` of each JSON event's data, nothing else (``[DONE]`` is not parsed).

Each figure is the median over several repeats, with the min-max range; a repeat runs the workload enough
times to last about 0.2 s so timer resolution does not matter. Figures per event divide by all events.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from qwen_persist.completion import reconstruct_stream
from qwen_persist.sse import SSEDecoder

REPEATS = 7
REPEAT_SECONDS = 0.2
# 16 tokens: with the role, finish, usage and [DONE] events the stream has 20 events.
ANSWER = "Sure! Here is a short answer: the capital of Norway is Oslo, right by the Oslofjord."
BASE = {
    "id": "chatcmpl-bench",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "qwen3-max",
}


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def _choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        **BASE,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_stream(count: int = 16) -> list[bytes]:
    """``count`` content tokens, with the role, finish, usage and [DONE] events ``count + 4`` events."""
    words = ANSWER.split()
    tokens = [words[i % len(words)] for i in range(count)]
    events = [_event(_choice({"role": "assistant", "content": ""}))]
    events += [_event(_choice({"content": token + " "})) for token in tokens]
    events.append(_event(_choice({}, "stop")))
    usage = {"prompt_tokens": 25, "completion_tokens": len(tokens), "total_tokens": 25 + len(tokens)}
    events.append(_event({**BASE, "choices": [], "usage": usage}))
    events.append(_event("[DONE]"))
    return events


def long_stream(tokens: int = 4000) -> list[bytes]:
    words = ["reasoning", "about", "the", "question,", "naïve", "café", "🙂", "then"]
    events = [_event(_choice({"role": "assistant", "content": ""}))]
    events += [
        _event(_choice({"reasoning_content": words[i % len(words)] + " "})) for i in range(tokens // 2)
    ]
    events += [_event(_choice({"content": words[i % len(words)] + " "})) for i in range(tokens // 2)]
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "search", "arguments": ""}}
    events.append(_event(_choice({"tool_calls": [call]})))
    arguments = json.dumps({"query": "long " * 200})
    for start in range(0, len(arguments), 8):
        fragment = {"index": 0, "function": {"arguments": arguments[start : start + 8]}}
        events.append(_event(_choice({"tool_calls": [fragment]})))
    events.append(_event(_choice({}, "tool_calls")))
    events.append(_event("[DONE]"))
    return events


def decode_only(chunks: list[bytes]) -> None:
    decoder = SSEDecoder()
    for chunk in chunks:
        decoder.feed(chunk)
    decoder.close()


def decode_and_accumulate(chunks: list[bytes]) -> None:
    reconstruct_stream(chunks).completion  # noqa: B018 - building the completion is part of the work


def general_path(chunks: list[bytes]) -> None:
    reconstruct_stream(chunks, fast_path=False).completion  # noqa: B018


def floor_work(chunks: list[bytes]) -> Callable[[list[bytes]], None]:
    """One orjson.loads per JSON event of ``chunks``: the data bytes are cut out beforehand."""
    datas = [chunk[len(b"data: ") : -2] for chunk in chunks if chunk != b"data: [DONE]\n\n"]

    def work(_: list[bytes]) -> None:
        for data in datas:
            orjson.loads(data)

    return work


def measure(work: Callable[[list[bytes]], None], chunks: list[bytes]) -> list[float]:
    """Seconds per run of the workload, one figure per repeat."""
    runs = 1
    while True:  # calibrate so one repeat lasts about REPEAT_SECONDS
        start = time.perf_counter()
        for _ in range(runs):
            work(chunks)
        elapsed = time.perf_counter() - start
        if elapsed >= REPEAT_SECONDS / 4:
            runs = max(1, int(runs * REPEAT_SECONDS / elapsed))
            break
        runs *= 4
    timings = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(runs):
            work(chunks)
        timings.append((time.perf_counter() - start) / runs)
    return timings


def report(name: str, work: Callable[[list[bytes]], None], chunks: list[bytes], events: int) -> float:
    """Print one row; return the median µs per event."""
    timings = measure(work, chunks)
    size = sum(map(len, chunks))
    median, fastest, slowest = statistics.median(timings), min(timings), max(timings)

    def spread(per_run: Callable[[float], float], unit: str, digits: int = 1) -> str:
        values = sorted((per_run(fastest), per_run(slowest)))
        return f"{per_run(median):,.{digits}f} {unit} [{values[0]:,.{digits}f}..{values[1]:,.{digits}f}]"

    print(
        f"  {name:<34} {spread(lambda t: t / events * 1e6, 'µs/event', 2):<30} "
        f"{spread(lambda t: events / t, 'events/s', 0):<40} {spread(lambda t: size / t / 1e6, 'MB/s')}"
    )
    return median / events * 1e6


def main() -> None:
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{REPEATS} repeats of ~{REPEAT_SECONDS}s; median [min..max]")
    for label, events in (("chat", chat_stream()), ("chat-500", chat_stream(496)), ("long", long_stream())):
        whole = [b"".join(events)]
        count = len(events)
        print(f"{label}: {count} events, {sum(map(len, events)) / 1024:,.1f} KiB")
        floor = report("floor: orjson.loads per event", floor_work(events), events, count)
        report("decode only, chunk per event", decode_only, events, count)
        for delivery, chunks in (("chunk per event", events), ("whole body", whole)):
            general = report(f"general path, {delivery}", general_path, chunks, count)
            fast = report(f"fast path, {delivery}", decode_and_accumulate, chunks, count)
            print(
                f"  {'':<34} general ÷ fast {general / fast:.2f}, "
                f"general ÷ floor {general / floor:.2f}, fast ÷ floor {fast / floor:.2f}"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
