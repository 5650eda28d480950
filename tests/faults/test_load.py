"""Load without faults: the baseline every fault scenario is measured against."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .conftest import Backend, Proxies
from .counts import Verdict, judge, stored_exchanges, wait_stored
from .load import plan, run_load

pytestmark = pytest.mark.fault


def test_300_concurrent_mixed_requests_are_stored_once_without_crosstalk(
    backend: Backend, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    proxy = proxies.start(backend.url)
    # Half streams, a fifth of those slow (about 0.8 s each), continuing 30 sessions: all 300 at once.
    calls = plan(300, stream_every=2, slow_every=5, sessions=30)
    outcomes = run_load([proxy.base_url], calls, concurrency=300, deadline=60, request_timeout=60)
    wait_stored(backend.url, [o.call.token for o in outcomes if o.accepted], timeout=20)
    proxy.terminate()
    verdict = judge(
        f"load 300 concurrent [{backend.name}]", outcomes, stored_exchanges(backend.url), [proxy.spill_dir]
    )
    report(verdict)
    assert verdict.ok, verdict.explain()
