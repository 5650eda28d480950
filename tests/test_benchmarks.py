"""The read-side benchmark cannot rot: its generator and a run of every call, on 2,000 exchanges.

The benchmark itself (`python -m benchmarks.bench_read`, 1,000,000 exchanges) is never part of the test
run; this only checks that the store it generates is the migrated schema filled with rows the read side
reads back as they were meant, and that the command goes through.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from benchmarks import bench_read, read_store
from qwen_persist.engine import make_engine
from qwen_persist.models import FAILED
from qwen_persist.repositories import History, Pagination, RequestFilter

EXCHANGES = 2000


def _schema(url: str) -> dict[str, list[tuple[str, ...]]]:
    """Every table's indexes, unique constraints and foreign keys, by name and columns."""
    engine = make_engine(url)
    try:
        found = inspect(engine)
        schema = {}
        for table in ("sessions", "requests", "responses"):
            schema[table] = sorted(
                [("ix", str(i["name"]), *map(str, i["column_names"])) for i in found.get_indexes(table)]
                + [("uq", str(u["name"]), *u["column_names"]) for u in found.get_unique_constraints(table)]
                + [("fk", str(k["name"]), *k["constrained_columns"]) for k in found.get_foreign_keys(table)]
            )
        return schema
    finally:
        engine.dispose()


def test_generated_store_is_the_migrated_schema_read_back_as_meant(migrated_url: str) -> None:
    before = _schema(migrated_url)
    if migrated_url.startswith("sqlite"):
        sink: read_store.Sink = read_store.SqliteSink(migrated_url.removeprefix("sqlite:///"))
    else:
        sink = read_store.PostgresSink(migrated_url)
    generated = read_store.generate([sink], EXCHANGES, progress=lambda _: None)
    # The indexes and constraints dropped for the load are all back, under their own names.
    assert _schema(migrated_url) == before
    engine = make_engine(migrated_url)
    with engine.connect() as conn:
        counts = [conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in read_store.TABLES]
        statuses = dict(conn.execute(text("SELECT status_code, count(*) FROM responses GROUP BY 1")).all())
        failed = conn.execute(text(f"SELECT count(*) FROM responses WHERE {FAILED}")).scalar_one()
        models = conn.execute(text("SELECT count(DISTINCT model) FROM requests")).scalar_one()
    engine.dispose()
    assert counts == [generated.sessions, EXCHANGES, generated.responses]
    assert EXCHANGES - 5 <= generated.responses <= EXCHANGES and generated.sessions < EXCHANGES / 2
    assert statuses[200] > 0.9 * generated.responses and statuses[429] > 0 and statuses[500] > 0
    assert models == len(read_store.MODELS)
    if migrated_url.startswith("sqlite"):
        with sqlite3.connect(migrated_url.removeprefix("sqlite:///")) as raw:
            assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    with History(migrated_url) as history:
        newest = history.requests.exchanges(None, Pagination(limit=5))
        assert [e.request.timestamp for e in newest.items] == sorted(
            (e.request.timestamp for e in newest.items), reverse=True
        )
        exchange = history.requests.exchange(1)
        assert exchange is not None and exchange.response is not None
        assert exchange.request.openai_request["messages"][1]["role"] == "user"
        assert history.sessions.get(exchange.request.session_id) is not None
        (stats,) = history.stats.summary()
        assert stats.count == EXCHANGES and stats.pending == EXCHANGES - generated.responses
        assert stats.errors == failed >= sum(n for status, n in statuses.items() if status >= 400)
        longest = history.requests.exchanges(RequestFilter(session_id=newest.items[0].request.session_id))
        assert longest.items

        # Every repository call and HTTP probe of the benchmark runs on this store.
        samples = bench_read.draw_samples(history.engine, random.Random(1))
        backend = history.engine.dialect.name
        assert bench_read.warm(backend, migrated_url) >= 0
        args = argparse.Namespace(seed=1, reps=2, budget=1.0, only=None, explain_all=True)
        results = bench_read.run_repository(history, backend, samples, args, lambda _: None)
        assert len(results) == len(bench_read.repository_cases(history, samples))
        assert all(r.n == 2 and r.p95_ms is not None and r.statements for r in results)
        assert all(bench_read.explain(history.engine, *r.statements[-1]) for r in results)
        # Every probe has its route and is answered 200; every GET route of the API has a probe.
        probes = bench_read.run_http(history, backend, samples, args, lambda _: None)
        assert [r.call for r in probes] == [p.name for p in bench_read.http_probes()]
        assert all(r.n == 2 and r.note == "HTTP" for r in probes), [r for r in probes if r.note != "HTTP"]
        assert {r.call: r.rows for r in probes}["GET /chat/completions?limit=20"] == 20


def test_the_command_writes_its_figures_and_reuses_its_store(tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    argv = ["--exchanges", str(EXCHANGES), "--backends", "sqlite", "--store", str(store), "--reps", "2"]
    assert bench_read.main([*argv, "--json", str(tmp_path / "first.json")]) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["generated"]["sqlite"]["exchanges_per_s"] > 0 and first["reused"] == []
    assert {r["call"] for r in first["results"]} >= {"requests.exchange(id)", "stats.summary one day"}
    assert all(r["verdict"] in ("pass", "FAIL", "—", "skipped") for r in first["results"])

    assert bench_read.main([*argv, "--only", "sessions", "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["reused"] == ["sqlite"] and again["generated"] == {}
    assert {r["call"] for r in again["results"] if r["n"]} == {
        r["call"] for r in first["results"] if "sessions" in r["call"] and r["n"]
    }


def test_http_probes_time_the_routes_the_app_has(migrated_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe whose route the app lacks is skipped: with one stand-in route in place (and no other), its
    probes are timed (answered 200 with the page's rows) and the others skipped."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import BaseRoute, Route

    from qwen_persist.api import completions as completions_api
    from qwen_persist.api import history as history_api

    async def requests_list(request: Request) -> JSONResponse:
        store: History = request.app.state.history
        page = await store.requests.alist(None, Pagination(limit=int(request.query_params.get("limit", 100))))
        return JSONResponse({"data": [item.id for item in page.items]})

    def routes(prefix: str) -> list[BaseRoute]:
        return [Route(prefix + "/requests", requests_list, methods=["GET"])]

    monkeypatch.setattr(history_api, "routes", routes)
    monkeypatch.setattr(completions_api, "routes", lambda prefix: [])
    sink: read_store.Sink
    if migrated_url.startswith("sqlite"):
        sink = read_store.SqliteSink(migrated_url.removeprefix("sqlite:///"))
    else:
        sink = read_store.PostgresSink(migrated_url)
    read_store.generate([sink], 300, progress=lambda _: None)
    with History(migrated_url) as history:
        samples = bench_read.draw_samples(history.engine, random.Random(1))
        args = argparse.Namespace(seed=1, reps=3, budget=1.0, only=None, explain_all=False)
        results = {r.call: r for r in bench_read.run_http(history, "b", samples, args, lambda _: None)}
    timed = {name for name, r in results.items() if r.n}
    assert "GET /requests?offset={offset}" in timed and "GET /requests?limit=20&offset={offset20}" in timed
    assert all(name.startswith("GET /requests?") for name in timed)
    assert results["GET /requests?limit=20&offset={offset20}"].rows == 20
    assert results["GET /sessions/{session}"].note == "no route"


@pytest.fixture(autouse=True)
def _no_postgres_store_is_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's PostgreSQL store has a fixed name: a test must never drop a real run's."""
    monkeypatch.setattr(bench_read, "POSTGRES_DATABASE", "qp_bench_read_never_used_by_tests")
