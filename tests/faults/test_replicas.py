"""Replicas on one database: two proxy processes, or one uvicorn with two workers, continuing the same
sessions, and clients sending the same X-Request-Id to each. Every request must be stored, none taken
for a replay of another."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .conftest import Backend, Proxies
from .counts import Verdict
from .harness import ProxyProcess
from .load import plan, run_load
from .scenario import log_lines, settle

pytestmark = pytest.mark.fault


@pytest.mark.parametrize("topology", ["two-processes", "workers-2"])
def test_replicas_share_sessions_and_client_request_ids(
    backend: Backend, topology: str, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    running: list[ProxyProcess]
    if topology == "two-processes":
        running = [proxies.start(backend.url, name=f"replica-{name}") for name in "ab"]
        urls = [proxy.base_url for proxy in running]
    else:
        running = [proxies.start(backend.url, name="workers", workers=2)]
        urls = [running[0].base_url] * 2
    # 100 pairs: both calls of a pair send one X-Request-Id, at the same moment, one to each replica (with
    # two workers, to the one port the kernel shares between them); all continue 10 sessions.
    calls = plan(200, stream_every=3, targets=2, sessions=10, shared_request_ids=2)
    outcomes = run_load(urls, calls, concurrency=64, spacing=0.03, burst=2, deadline=60)
    verdict = settle(f"replicas {topology} [{backend.name}]", backend.url, running, outcomes, report)
    for proxy in running:
        print(f"{proxy.log_path.name} said:", *log_lines(proxy, r"WARNING|ERROR|stopped"), sep="\n  ")
    assert verdict.ok, verdict.explain()
