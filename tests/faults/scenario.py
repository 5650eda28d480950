"""The shape most scenarios share: traffic flows, a fault comes and goes in the middle of it, then the
proxy settles, stops gracefully, and what the clients saw is held against what is stored."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from .counts import Verdict, judge, stored_exchanges, wait_stored
from .harness import ProxyProcess
from .load import Call, LoadRun, Outcome, plan

SETTLE_SECONDS = 15.0  # how long stored rows may take to appear once the fault is gone


def mixed_calls(count: int = 240, **options: Any) -> list[Call]:
    """Half streams, a quarter of those slow (about 0.8 s), the rest quick JSON answers."""
    options.setdefault("stream_every", 2)
    options.setdefault("slow_every", 4)
    return plan(count, **options)


def traffic_with_fault(
    urls: Sequence[str],
    inject: Callable[[], object],
    clear: Callable[[], object],
    *,
    calls: Sequence[Call] | None = None,
    spacing: float = 0.02,
    warmup: int = 40,
    hold: float = 3.0,
    concurrency: int = 64,
) -> list[Outcome]:
    """Send ``calls`` (default 240 mixed, one every ``spacing`` s: about 5 s of traffic); after ``warmup``
    of them have finished, ``inject`` the fault, keep it ``hold`` seconds, ``clear`` it. ``warmup`` 0
    injects before the first request. The fault is cleared even if something fails meanwhile."""
    load = LoadRun(urls, calls or mixed_calls(), concurrency=concurrency, spacing=spacing, deadline=60)
    if warmup == 0:
        inject()
    load.start()
    try:
        if warmup:
            load.wait_finished(warmup, timeout=30)
            inject()
        time.sleep(hold)
    finally:
        clear()
    return load.join()


def settle(
    scenario: str,
    database_url: str,
    proxies: Sequence[ProxyProcess],
    outcomes: Sequence[Outcome],
    report: Callable[[Verdict], None],
    *,
    must_store: Collection[str] | None = None,
    failures: Collection[Outcome] | None = None,
    timeout: float = SETTLE_SECONDS,
    extra_journal_dirs: Sequence[Path] = (),
) -> Verdict:
    """Wait (bounded) for the accepted exchanges to be stored, stop the proxies still running (SIGTERM),
    judge and report. The caller asserts ``verdict.ok`` (after any checks of its own)."""
    wanted = must_store if must_store is not None else [o.call.token for o in outcomes if o.accepted]
    wait_stored(database_url, wanted, timeout)
    for proxy in proxies:
        if proxy.alive:
            proxy.terminate()
    journal_dirs = sorted({proxy.spill_dir for proxy in proxies} | set(extra_journal_dirs))
    verdict = judge(
        scenario,
        outcomes,
        stored_exchanges(database_url),
        journal_dirs,
        must_store=must_store,
        failures=failures,
    )
    report(verdict)
    return verdict


def log_lines(proxy: ProxyProcess, pattern: str, limit: int = 5) -> list[str]:
    """The proxy log's distinct lines matching ``pattern`` (timestamps stripped), for the report."""
    seen: list[str] = []
    for line in proxy.log_path.read_text(errors="replace").splitlines():
        if re.search(pattern, line):
            text = re.sub(r"^\S+ \S+ pid=\d+ ", "", line)
            if text not in seen:
                seen.append(text)
    return seen[:limit]
