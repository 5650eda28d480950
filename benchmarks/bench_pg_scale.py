"""PostgreSQL at scale: exchanges/s stored by 1, 2 and 4 writer processes into one PostgreSQL at once.

    python -m benchmarks.bench_pg_scale              # ~1.5 min; --exchanges, --repeats, --processes

No HTTP (a server process's HTTP work would cap it long before the database: ~5,000 JSON exchanges/s
per core here): each process is a writer as the middleware runs it, fed the captured records of N JSON
exchanges (`bench_writer.make_records`), started together; the figure is all the exchanges over the
wall time until the last process has stored its share, and the rows are counted afterwards. Alongside:
each writer's own CPU and PostgreSQL's CPU (every ``postgres`` process, from /proc), to show where the
bottleneck sits on this 2-core machine. Goal (issue #12): ≥ 10,000 exchanges/s per writer process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import text

from qwen_persist.config import build_settings
from qwen_persist.engine import make_engine
from qwen_persist.writer import Writer

from .bench_writer import make_records
from .common import CLOCK_TICKS, fresh_database, machine, postgres_available, spread, workspace

CHILD = [sys.executable, "-m", "benchmarks.bench_pg_scale", "--child"]


def _child(url: str, exchanges: int, start_at: float, seed: int) -> dict[str, float]:
    records = make_records(exchanges, 0)
    for record in records:  # ids unique across the processes
        record.request_id = f"{seed}-{record.request_id}"
        record.capture_id = f"{seed}-{record.capture_id}"
    settings = build_settings(database_url=url, queue_size=len(records) + 10)
    engine = make_engine(url)
    with engine.connect():
        pass
    writer = Writer(settings, engine)
    writer.start()
    time.sleep(max(0.0, start_at - time.time()))
    began, cpu = time.monotonic(), time.process_time()
    for record in records:
        writer.submit(record)
    while writer.stats().written < len(records):
        time.sleep(0.005)
    elapsed, used = time.monotonic() - began, time.process_time() - cpu
    stats = writer.close()
    engine.dispose()
    return {"elapsed": elapsed, "cpu": used, "written": stats.written, "failed": stats.failed}


def _postgres_cpu() -> float:
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.split("(", 1)[1].split(")", 1)[0] == "postgres":
            # Backends exit with their connection: their CPU is then in the postmaster's cutime/cstime.
            fields = stat.rsplit(")", 1)[1].split()
            total += sum(int(value) for value in fields[11:15])
    return total / CLOCK_TICKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=20_000, help="per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, exchanges, start_at, seed = args.child
        print(json.dumps(_child(url, int(exchanges), float(start_at), int(seed))))
        return
    if not postgres_available():
        sys.exit("PostgreSQL is not reachable (BENCH_POSTGRES_URL)")
    print(machine())
    counts = [int(n) for n in args.processes.split(",")]
    results: dict[int, dict[str, list[float]]] = {n: {} for n in counts}
    problems: list[str] = []
    with workspace() as workdir:
        for repeat in range(args.repeats):
            for n in counts:
                with fresh_database("postgresql", workdir) as url:
                    start_at = time.time() + 3.0  # every child has built its records by then
                    children = [
                        subprocess.Popen(
                            [*CHILD, url, str(args.exchanges), str(start_at), str(seed)],
                            stdout=subprocess.PIPE,
                            text=True,
                        )
                        for seed in range(n)
                    ]
                    time.sleep(max(0.0, start_at - time.time()))
                    pg_before = _postgres_cpu()
                    outcomes = [json.loads(child.communicate(timeout=600)[0]) for child in children]
                    pg_used = _postgres_cpu() - pg_before
                    engine = make_engine(url)
                    with engine.connect() as conn:
                        rows = conn.execute(text("SELECT count(*) FROM responses")).scalar_one()
                    engine.dispose()
                total = n * args.exchanges
                if rows != total or any(o["failed"] for o in outcomes):
                    problems.append(f"{n} processes, repeat {repeat}: {rows} rows of {total}")
                wall = max(o["elapsed"] for o in outcomes)
                figures = {
                    "total_per_s": total / wall,
                    "per_process_per_s": total / wall / n,
                    "writer_cpu_us": 1e6 * sum(o["cpu"] for o in outcomes) / total,
                    "postgres_cpu_us": 1e6 * pg_used / total,
                }
                for key, value in figures.items():
                    results[n].setdefault(key, []).append(value)
                print(
                    f"  repeat {repeat} {n} process(es): {figures['total_per_s']:8.0f} exchanges/s,"
                    f" writer CPU {figures['writer_cpu_us']:.1f} µs, PostgreSQL CPU"
                    f" {figures['postgres_cpu_us']:.1f} µs per exchange; rows {rows}/{total}",
                    flush=True,
                )
    print(f"\n{args.exchanges} JSON exchanges per process, {args.repeats} repeats; median [min..max]")
    header = f"{'processes':>9} {'exchanges/s':>24} {'per process':>24}"
    print(header + f" {'writer µs/exch':>22} {'postgres µs/exch':>22}")
    for n in counts:
        r = results[n]
        print(
            f"{n:>9} {spread(r['total_per_s'], '{:.0f}'):>24} {spread(r['per_process_per_s'], '{:.0f}'):>24}"
            f" {spread(r['writer_cpu_us'], '{:.1f}'):>22} {spread(r['postgres_cpu_us'], '{:.1f}'):>22}"
        )
    one = statistics.median(results[counts[0]]["per_process_per_s"])
    verdict = "met" if one >= 10_000 else "NOT met"
    print(f"goal >= 10,000 exchanges/s per writer process ({counts[0]}): {one:.0f} {verdict}")
    if problems:
        print("PROBLEMS:", *problems, sep="\n  ")
        sys.exit(1)
    print("every exchange stored: yes")


if __name__ == "__main__":
    main()
