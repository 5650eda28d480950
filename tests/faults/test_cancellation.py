"""Clients that vanish at every phase of an exchange, among ordinary traffic: each still leaves exactly
one request row and one response row."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .conftest import Backend, Proxies
from .counts import Verdict, judge, judge_vanished, row_counts, stored_exchanges
from .harness import wait_until
from .load import PHASES, Call, LoadRun, new_run, plan, vanish_all

pytestmark = pytest.mark.fault

PER_PHASE = 8
# A client that leaves right after its body may be gone before or after the answer is written; either
# record is right. In every other phase the exchange is cut short, so it must say client_disconnected.
DISCONNECTED = {"before_body", "mid_body", "mid_stream"}


def test_clients_vanishing_at_every_phase(
    backend: Backend, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    proxy = proxies.start(backend.url)
    run = new_run()
    ordinary = LoadRun(
        [proxy.base_url], plan(60, run=run, stream_every=2, slow_every=2), concurrency=16, spacing=0.04
    ).start()
    jobs: list[tuple[str, Call]] = []
    for phase in PHASES:
        for number in range(PER_PHASE):
            index = 1000 + len(jobs)
            slow = phase == "mid_stream"
            call = Call(
                index=index,
                token=f"qpf-{run}-{index:05d}",
                stream=slow or number % 2 == 0,
                request_id=f"qpf-{run}-vanish-{phase}-{number}",
                delay_ms=40 if slow else 0,
                filler_words=20 if slow else 0,
            )
            jobs.append((phase, call))
    vanished = vanish_all(proxy.base_url, jobs)
    outcomes = ordinary.join()
    ids = [client.request_id for client in vanished]
    wait_until(lambda: row_counts(backend.url, ids) == (len(ids), len(ids)), timeout=15, interval=0.25)
    proxy.terminate()

    stored = stored_exchanges(backend.url)
    verdict = judge(f"clients vanishing at every phase [{backend.name}]", outcomes, stored, [proxy.spill_dir])
    mine = {row.request_id for row in stored}
    verdict.sent += len(vanished)
    verdict.stored += sum(1 for request_id in ids if request_id in mine)
    verdict.lost += [request_id for request_id in ids if request_id not in mine]
    verdict.notes += judge_vanished(vanished, stored, disconnected=DISCONNECTED)
    report(verdict)
    for client in vanished:
        if client.note:
            print(f"{client.phase} {client.request_id}: {client.note}")
    assert verdict.ok, verdict.explain()
