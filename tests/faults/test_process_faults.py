"""The proxy process itself is stopped under load: SIGTERM (graceful) with the database up and down, and
SIGKILL (a crash) during an outage. After a restart with the database up, what was accepted must be
stored, without anyone running ``qwen-persist replay``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest

from .conftest import FAULT_QUEUE_SIZE, FLUSH_INTERVAL, SHUTDOWN_TIMEOUT, Backend, Proxies
from .counts import Verdict, sqlite_integrity
from .load import LoadRun
from .scenario import log_lines, mixed_calls, settle

pytestmark = pytest.mark.fault

QUEUE = {"queue_size": FAULT_QUEUE_SIZE}
EXIT_GRACE = 2.0  # seconds a SIGTERMed proxy may take beyond its shutdown_timeout
RACE_WINDOW = 1.0  # seconds before the load stopped in which a refused call is a race, not a failure


@pytest.mark.parametrize("database", ["up", "down"])
def test_sigterm_under_load(
    backend: Backend, database: str, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    proxy = proxies.start(backend.url, options=QUEUE)
    load = LoadRun([proxy.base_url], mixed_calls(400), concurrency=64, spacing=0.01, deadline=30).start()
    load.wait_finished(60, timeout=30)
    if database == "down":
        backend.outage()
    time.sleep(1.5)
    # No new requests from here; those in flight (slow streams among them) must complete.
    stopped_at = time.monotonic()
    load.stop.set()
    time.sleep(0.1)
    elapsed = proxy.terminate(limit=SHUTDOWN_TIMEOUT + EXIT_GRACE + 10)
    outcomes = load.join()
    backend.recover()
    restarted = proxies.restart(proxy)
    # A call the driver began just as it was told to stop may reach the proxy after it stopped listening
    # (refused), or on a keep-alive connection it was closing: the proxy never accepted it, so nothing
    # was in flight to complete. On a loaded machine the driver's own loop lags enough for a few.
    raced = [o for o in outcomes if o.failed and not o.accepted and o.started >= stopped_at - RACE_WINDOW]
    verdict = settle(
        f"SIGTERM under load, database {database} [{backend.name}]",
        backend.url,
        [restarted],
        outcomes,
        report,
        failures=[o for o in outcomes if o.failed and all(o is not r for r in raced)],
    )
    print(f"{len(raced)} calls begun as the load stopped were refused before the proxy accepted them")
    print(f"exit {elapsed:.2f} s after SIGTERM")
    print("proxy said:", *log_lines(proxy, r"WARNING|ERROR|stopped"), sep="\n  ")
    problems = verdict.problems()
    limit = SHUTDOWN_TIMEOUT + EXIT_GRACE
    if not elapsed <= limit:
        shown = "did not exit (killed)" if math.isinf(elapsed) else f"exited after {elapsed:.2f} s"
        problems.append(f"SIGTERM: {shown}, limit {limit:.1f} s")
    assert not problems, "; ".join(problems)


def test_sigkill_under_load_during_outage(
    backend: Backend, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    """Killed 2 s into an outage. Everything whose response had finished more than one flush interval
    before the kill must be stored after a restart; what was in flight at the kill is not counted."""
    proxy = proxies.start(backend.url, options=QUEUE)
    load = LoadRun([proxy.base_url], mixed_calls(400), concurrency=64, spacing=0.01, deadline=30).start()
    load.wait_finished(60, timeout=30)
    backend.outage()
    time.sleep(2.0)
    killed_at = time.monotonic()
    proxy.kill()
    load.stop.set()
    outcomes = load.join()
    backend.recover()
    restarted = proxies.restart(proxy)
    before = [o for o in outcomes if o.sent and o.finished < killed_at]
    must_store = [o.call.token for o in before if o.ok and o.finished < killed_at - FLUSH_INTERVAL]
    verdict = settle(
        f"SIGKILL during outage [{backend.name}]",
        backend.url,
        [restarted],
        outcomes,
        report,
        must_store=must_store,
        failures=[o for o in before if o.failed],
    )
    cut = sum(1 for o in outcomes if o.sent and o.finished >= killed_at)
    print(f"{len(must_store)} finished before the kill (less one flush interval); {cut} cut by the kill")
    problems = verdict.problems()
    if backend.name == "sqlite":
        integrity = sqlite_integrity(backend.url)
        if integrity != "ok":
            problems.append(f"integrity_check: {integrity}")
    assert not problems, "; ".join(problems)
