"""PostgreSQL under faults, on a throwaway cluster of our own: refusing connections, stopped and started
again, backends terminated mid-batch, a server that hangs, a 1 ms statement timeout."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import pytest

from .conftest import FAULT_QUEUE_SIZE, SHUTDOWN_TIMEOUT, Backend, Proxies
from .counts import Verdict, journal_tokens, judge
from .harness import HungServer
from .load import LoadRun
from .scenario import log_lines, mixed_calls, settle, traffic_with_fault

pytestmark = pytest.mark.fault

QUEUE = {"queue_size": FAULT_QUEUE_SIZE}
EXIT_GRACE = 2.0  # seconds a SIGTERMed proxy may take beyond its shutdown_timeout


def test_postgres_refusing_at_start_then_started(
    pg_backend: Backend, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    cluster = pg_backend.cluster
    assert cluster is not None
    cluster.refuse()  # the proxy starts while nothing listens, and traffic begins so
    proxy = proxies.start(pg_backend.url, options=QUEUE)
    outcomes = traffic_with_fault([proxy.base_url], lambda: None, cluster.start, warmup=0, hold=3.0)
    verdict = settle(
        "postgres refusing at start, started after 3 s", pg_backend.url, [proxy], outcomes, report
    )
    assert verdict.ok, verdict.explain()


def test_postgres_stopped_and_restarted_mid_traffic(
    pg_backend: Backend, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    cluster = pg_backend.cluster
    assert cluster is not None
    proxy = proxies.start(pg_backend.url, options=QUEUE)
    outcomes = traffic_with_fault([proxy.base_url], cluster.stop, cluster.start, hold=3.0)
    verdict = settle("postgres stopped 3 s mid-traffic", pg_backend.url, [proxy], outcomes, report)
    assert verdict.ok, verdict.explain()


def test_postgres_backends_terminated_mid_batch(
    pg_backend: Backend, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    """Every 0.1 s for 3 s, every connection to the scenario's database is terminated: the writer loses
    its connection in the middle of batches, and at times between a COMMIT and its answer."""
    cluster = pg_backend.cluster
    assert cluster is not None and pg_backend.database is not None
    proxy = proxies.start(pg_backend.url, options=QUEUE)
    done = threading.Event()
    terminated = 0

    def terminator() -> None:
        nonlocal terminated
        while not done.wait(0.1):
            terminated += cluster.terminate_backends(pg_backend.database)

    thread = threading.Thread(target=terminator, daemon=True)
    outcomes = traffic_with_fault([proxy.base_url], thread.start, done.set, hold=3.0)
    thread.join(10)
    verdict = settle(
        "postgres backends terminated every 0.1 s for 3 s", pg_backend.url, [proxy], outcomes, report
    )
    print(f"backends terminated: {terminated}")
    assert terminated > 0, "the scenario never caught a connection"
    assert verdict.ok, verdict.explain()


def test_postgres_statement_timeout_1ms(
    pg_backend: Backend, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    """``statement_timeout = 1ms`` on the cluster (ALTER SYSTEM, so open sessions get it too) for 3 s.

    The writer's statements alone finish within 1 ms here, so the timeout would never fire; as on a busy
    server, another session holds ``requests`` locked for 20 ms of every 100 ms meanwhile, and a
    statement that waits for it is cancelled."""
    cluster, database = pg_backend.cluster, pg_backend.database
    assert cluster is not None and database is not None
    proxy = proxies.start(pg_backend.url, options=QUEUE)
    done = threading.Event()

    def contender() -> None:
        with cluster.admin(database) as conn:
            while not done.wait(0.08):
                with conn.transaction():
                    conn.execute("LOCK TABLE requests IN EXCLUSIVE MODE")
                    time.sleep(0.02)

    thread = threading.Thread(target=contender, daemon=True)

    def inject() -> None:
        cluster.set_statement_timeout("1ms")
        thread.start()

    def clear() -> None:
        done.set()
        thread.join(10)
        cluster.set_statement_timeout(None)

    outcomes = traffic_with_fault([proxy.base_url], inject, clear, hold=3.0)
    verdict = settle("postgres statement_timeout 1 ms for 3 s", pg_backend.url, [proxy], outcomes, report)
    cancelled = log_lines(proxy, r"statement timeout")
    print("proxy said:", *log_lines(proxy, r"WARNING|ERROR"), sep="\n  ")
    assert cancelled, "the timeout never cancelled a statement of the writer"
    assert verdict.ok, verdict.explain()


def test_postgres_that_hangs(proxies: Proxies, report: Callable[[Verdict], None]) -> None:
    """The database accepts TCP connections and never answers. Requests must still succeed promptly; on
    SIGTERM the proxy must exit within shutdown_timeout + 2 s with every accepted exchange in its
    journal (there is no database to store them in)."""
    with HungServer() as hung:
        proxy = proxies.start(hung.url(), options=QUEUE)
        load = LoadRun([proxy.base_url], mixed_calls(150), concurrency=32, spacing=0.02, deadline=30).start()
        outcomes = load.join(60)
        elapsed = proxy.terminate(limit=SHUTDOWN_TIMEOUT + EXIT_GRACE + 5)
    journalled = journal_tokens(proxy.spill_dir)
    accepted = [o.call.token for o in outcomes if o.accepted]
    verdict = judge(
        "postgres hangs (TCP accepted, no answer)", outcomes, [], [proxy.spill_dir], must_store=[]
    )
    # Nothing can be stored; "lost" here is what is not in the journal either.
    verdict.lost = sorted(set(accepted) - journalled)
    slowest = max((o.seconds for o in outcomes if o.sent), default=0.0)
    report(verdict)
    print(f"slowest request {slowest:.2f} s; exit {elapsed:.2f} s after SIGTERM")
    print(f"connections the hung server holds: {hung.accepted}")
    problems = verdict.problems()
    if slowest > 3.0:
        problems.append(f"a request took {slowest:.2f} s (prompt means well under the 3 s allowed here)")
    limit = SHUTDOWN_TIMEOUT + EXIT_GRACE
    if not elapsed <= limit:
        shown = "did not exit (killed)" if math.isinf(elapsed) else f"exited after {elapsed:.2f} s"
        problems.append(f"SIGTERM: {shown}, limit {limit:.1f} s")
    assert not problems, "; ".join(problems)
