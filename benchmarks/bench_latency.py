"""Added latency on streams at a fixed arrival rate, and server CPU per exchange at that load.

    python -m benchmarks.bench_latency               # ~2 minutes; --quick for a smoke run

An open-loop client (asyncio, raw sockets, pinned to core 1) sends SSE chat completion requests on a
fixed schedule (default 500 req/s) whatever the server does, over a pool of keep-alive connections; a
request whose connection is busy takes another (opened ahead). Latency is measured from the *scheduled*
send time, so a server that falls behind is charged for it (no coordinated omission).

For each of bare, wrapped (SQLite), wrapped (PostgreSQL), interleaved over the repeats, it prints time to
first byte and to the first SSE event, p50 and p99, and the server's CPU time per exchange (user + system
of the whole process from /proc, writer thread included). Added = wrapped - bare, per repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

from .common import (
    CLIENT_CORE,
    exit_with_persistence_check,
    fresh_database,
    machine,
    percentile,
    pin_self,
    postgres_available,
    server,
    spread,
    workspace,
)

BODY = (
    b'{"model":"bench-model","stream":true,"messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"Question number %d about foxes?"}]}'
)


@dataclass(slots=True)
class Sample:
    first_byte_ms: float
    first_event_ms: float
    total_ms: float


class Pool:
    """Idle keep-alive connections; a request never waits for one (it opens a new one instead)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def fill(self, n: int) -> None:
        for _ in range(n):
            self.idle.append(await asyncio.open_connection("127.0.0.1", self.port))

    async def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.idle:
            return self.idle.pop()
        return await asyncio.open_connection("127.0.0.1", self.port)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def one_request(pool: Pool, n: int, scheduled: float, out: list[Sample] | None) -> None:
    reader, writer = await pool.take()
    body = BODY % n
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    buffer = await reader.read(65536)
    first_byte = time.perf_counter()
    first_event = None
    while True:
        if first_event is None and b"data:" in buffer:
            first_event = time.perf_counter()
        # Chunked transfer encoding ends with an empty chunk; the SSE payload never ends that way.
        if buffer.endswith(b"0\r\n\r\n"):
            break
        data = await reader.read(65536)
        if not data:
            raise RuntimeError("server closed the connection mid-response")
        buffer = buffer[-16:] + data  # only the tail matters for the end test
        if first_event is None and b"data:" in buffer:
            first_event = time.perf_counter()
    done = time.perf_counter()
    pool.idle.append((reader, writer))
    if out is not None:
        assert first_event is not None
        out.append(
            Sample(
                (first_byte - scheduled) * 1000,
                (first_event - scheduled) * 1000,
                (done - scheduled) * 1000,
            )
        )


async def open_loop(port: int, rate: float, seconds: float, warmup: float) -> list[Sample]:
    """Fire ``rate`` requests/s for ``warmup + seconds``; keep samples of the last ``seconds``."""
    pool = Pool(port)
    await pool.fill(32)
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    tasks: list[asyncio.Task[None]] = []
    total = int((warmup + seconds) * rate)
    skip = int(warmup * rate)
    start = time.perf_counter() + 0.05
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one_request(pool, i, scheduled, samples if i >= skip else None)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    pool.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--writers", default="wrapped,process,process-free", help="wrapped variants to run")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.seconds = 1, 2.0
    pin_self(CLIENT_CORE)
    print(machine())
    backends = ["sqlite", "postgresql"] if postgres_available() else ["sqlite"]
    # wrapped: the writer thread; process / process-free: the writer process, pinned with the server or
    # free to use the client's core too (see bench_throughput).
    variants: list[tuple[str, str | None]] = [("bare", None)]
    variants += [(writer, backend) for backend in backends for writer in args.writers.split(",")]

    results: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    problems: list[str] = []
    with workspace() as workdir:
        for repeat in range(args.repeats):
            base: dict[str, float] = {}
            for variant, backend in variants:
                name = variant if backend is None else f"{variant}-{backend}"
                with fresh_database(backend or "sqlite", workdir) as url:
                    with server(variant, url if backend else None, workdir) as run:
                        asyncio.run(open_loop(run.port, args.rate, 0.5, 0.0))  # warm up, not counted
                        cpu_before = run.cpu_seconds()
                        samples = asyncio.run(open_loop(run.port, args.rate, args.seconds, 0.0))
                        time.sleep(0.3)  # let the writer store the last batch: its CPU counts too
                        cpu = run.cpu_seconds() - cpu_before
                    if backend and not run.all_persisted:
                        problems.append(
                            f"{name} repeat {repeat}: answered {run.answered}, rows {run.requests_rows}"
                        )
                figures = {
                    "ttfb_p50": percentile([s.first_byte_ms for s in samples], 50),
                    "ttfb_p99": percentile([s.first_byte_ms for s in samples], 99),
                    "event_p50": percentile([s.first_event_ms for s in samples], 50),
                    "event_p99": percentile([s.first_event_ms for s in samples], 99),
                    "total_p99": percentile([s.total_ms for s in samples], 99),
                    "cpu_ms": cpu * 1000 / len(samples),
                }
                if not base:
                    base = figures
                for key, value in figures.items():
                    results[name][key].append(value)
                    results[name]["added_" + key].append(value - base[key])
                results[name]["cpu_ratio"].append(figures["cpu_ms"] / base["cpu_ms"])
                f = figures
                print(
                    f"  repeat {repeat} {name:20} ttfb p50 {f['ttfb_p50']:.3f} p99 {f['ttfb_p99']:.3f} ms,"
                    f" first event p99 {f['event_p99']:.3f} ms, cpu {f['cpu_ms']:.3f} ms/exchange",
                    flush=True,
                )

    print(
        f"\n{args.rate:g} req/s open loop, SSE of 20 events, {args.repeats} x {args.seconds:g} s;"
        " median [min..max]"
    )
    header = (
        f"{'variant':20} {'TTFB p50 ms':>24} {'TTFB p99 ms':>24} {'added p99 ms':>26} {'1st event p99':>24}"
    )
    print(header + f" {'CPU ms/exch':>24} {'CPU ÷ bare':>22}")
    for variant, backend in variants:
        name = variant if backend is None else f"{variant}-{backend}"
        r = results[name]
        print(
            f"{name:20} {spread(r['ttfb_p50']):>24} {spread(r['ttfb_p99']):>24}"
            f" {spread(r['added_ttfb_p99']):>26}"
            f" {spread(r['event_p99']):>24} {spread(r['cpu_ms']):>24} {spread(r['cpu_ratio']):>22}"
        )
    for variant, backend in variants[1:]:
        name = f"{variant}-{backend}"
        added = statistics.median(results[name]["added_ttfb_p99"])
        verdict = "met" if added <= 1.0 else "NOT met"
        print(f"goal added TTFB p99 <= 1 ms ({name}, {args.rate:g}/s): {added:.3f} ms {verdict}")
    exit_with_persistence_check(problems)


if __name__ == "__main__":
    main()
