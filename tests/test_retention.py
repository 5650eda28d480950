"""Deleting history: `qwen-persist cleanup`, the pruning repository behind it, and the ``retention``
option's background passes, on SQLite and PostgreSQL. Whatever goes, nothing is left half: no response
without its request, no request or response without its session.

The data is real traffic recorded through the middleware, aged by moving its timestamps back (what the
passing of days would do), plus hand-made requests still waiting for their response.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import fake_upstream
import openai
import openai_proxy
import pytest
from sqlalchemy import exists, func, insert, not_, select, update
from support import find_middleware, serve
from traffic import record_traffic

from qwen_persist import ConfigurationError, retention
from qwen_persist.cli import main
from qwen_persist.config import build_settings
from qwen_persist.engine import make_engine
from qwen_persist.migrate import upgrade
from qwen_persist.models import requests_table, responses_table, sessions_table
from qwen_persist.repositories import History
from qwen_persist.repositories.pruning import PENDING_GRACE_MS, PruneCounts
from qwen_persist.sessions import now_ms, session_row

DAY = 86_400_000
_req, _resp, _s = requests_table.c, responses_table.c, sessions_table.c


# ----------------------------------------------------------------------------------------------- helpers


def age(
    url: str, *, sessions: list[str] | None = None, request_ids: list[int] | None = None, ms: int
) -> None:
    """Move exchanges ``ms`` into the past: every exchange of ``sessions`` (and the sessions themselves),
    or the requests ``request_ids`` (with their responses)."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if sessions:
                ids = list(conn.execute(select(_req.id).where(_req.session_id.in_(sessions))).scalars())
                conn.execute(
                    update(sessions_table)
                    .where(_s.id.in_(sessions))
                    .values(
                        created_at=_s.created_at - ms,
                        updated_at=_s.updated_at - ms,
                        last_accessed=_s.last_accessed - ms,
                        expires_at=_s.expires_at - ms,
                    )
                )
            else:
                ids = list(request_ids or [])
            conn.execute(
                update(requests_table)
                .where(_req.id.in_(ids))
                .values(timestamp=_req.timestamp - ms, created_at=_req.created_at - ms)
            )
            conn.execute(
                update(responses_table)
                .where(_resp.request_id.in_(ids))
                .values(timestamp=_resp.timestamp - ms, created_at=_resp.created_at - ms)
            )
    finally:
        engine.dispose()


def pending_request(url: str, session: str, *, at: int, session_expires: int | None = None) -> int:
    """A request without a response (in flight, or its response never came), in a session of its own."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            row = session_row(session, "still waiting", 1, at, 1_800_000)
            if session_expires is not None:
                row["expires_at"] = session_expires
            conn.execute(insert(sessions_table).values(**row))
            return int(
                conn.execute(
                    insert(requests_table)
                    .values(
                        request_id=f"pending-{session}",
                        session_id=session,
                        timestamp=at,
                        created_at=at,
                        method="POST",
                        path="/v1/chat/completions",
                        openai_request={
                            "model": "m",
                            "messages": [{"role": "user", "content": "still waiting"}],
                        },
                        model="m",
                        stream=True,
                    )
                    .returning(_req.id)
                ).scalar_one()
            )
    finally:
        engine.dispose()


def expire(url: str, sessions: list[str]) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(update(sessions_table).where(_s.id.in_(sessions)).values(expires_at=now_ms() - 1000))
    finally:
        engine.dispose()


def rows(url: str) -> dict[str, set[Any]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {
                "sessions": set(conn.execute(select(_s.id)).scalars()),
                "requests": set(conn.execute(select(_req.id)).scalars()),
                "responses": set(conn.execute(select(_resp.request_id)).scalars()),
            }
    finally:
        engine.dispose()


def orphans(url: str) -> dict[str, int]:
    """Rows whose partner or session is gone: all zero, always."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:

            def count(table: Any, condition: Any) -> int:
                return int(
                    conn.execute(select(func.count()).select_from(table).where(condition)).scalar_one()
                )

            return {
                "responses without request": count(
                    responses_table, not_(exists(select(_req.id).where(_req.id == _resp.request_id)))
                ),
                "requests without session": count(
                    requests_table, not_(exists(select(_s.id).where(_s.id == _req.session_id)))
                ),
                "responses without session": count(
                    responses_table, not_(exists(select(_s.id).where(_s.id == _resp.session_id)))
                ),
            }
    finally:
        engine.dispose()


NO_ORPHANS = {"responses without request": 0, "requests without session": 0, "responses without session": 0}


def session_requests(url: str, session: str) -> list[int]:
    with History(url) as history:
        return [e.request.id for e in history.requests.iter_exchanges() if e.request.session_id == session]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def aged(migrated_url: str, tmp_path: Path) -> dict[str, Any]:
    """Recorded traffic where s-alpha is ten days old, s-beta is live with one ten-day-old exchange, and
    two requests still wait for their response: one for ten days (in an old session), one for an hour."""
    record_traffic(migrated_url, tmp_path)
    beta = session_requests(migrated_url, "s-beta")
    age(migrated_url, sessions=["s-alpha"], ms=10 * DAY)
    age(migrated_url, request_ids=beta[:1], ms=10 * DAY)
    now = now_ms()
    old = pending_request(migrated_url, "s-pending-old", at=now - 10 * DAY, session_expires=now - 10 * DAY)
    young = pending_request(migrated_url, "s-pending-young", at=now - 3_600_000)
    return {
        "url": migrated_url,
        "alpha": session_requests(migrated_url, "s-alpha"),
        "beta": beta,
        "old_pending": old,
        "young_pending": young,
        "before": rows(migrated_url),
    }


# ---------------------------------------------------------------------------------------------- cleanup


def test_cleanup_older_than(aged: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    url, alpha, beta = aged["url"], aged["alpha"], aged["beta"]
    assert len(alpha) == 4 and len(beta) == 2
    gone = {*alpha, beta[0], aged["old_pending"]}
    expected = {"requests": len(gone), "responses": len(gone) - 1, "sessions": 2}  # s-alpha, s-pending-old

    status, out, _ = cli(
        capsys, "cleanup", "--older-than", "7d", "--dry-run", "--json", "--database-url", url
    )
    assert status == 0
    report = json.loads(out)
    assert {key: report[key] for key in expected} == expected and report["dry_run"] is True
    assert rows(url) == aged["before"]  # a dry run deletes nothing

    status, out, _ = cli(capsys, "cleanup", "--older-than", "7d", "--batch-size", "2", "--database-url", url)
    assert status == 0
    assert out.startswith("deleted 6 requests, 5 responses, 2 sessions: history older than 1w (before ")
    after = rows(url)
    assert after["requests"] == aged["before"]["requests"] - gone
    assert after["responses"] == aged["before"]["responses"] - gone
    assert after["sessions"] == aged["before"]["sessions"] - {"s-alpha", "s-pending-old"}
    # s-beta is live: its recent exchange and the session stay. The young pending request stays too.
    assert beta[1] in after["requests"] and "s-beta" in after["sessions"]
    assert aged["young_pending"] in after["requests"]
    assert orphans(url) == NO_ORPHANS

    status, out, _ = cli(capsys, "cleanup", "--older-than", "7d", "--dry-run", "--database-url", url)
    assert out.startswith("would delete 0 requests, 0 responses, 0 sessions: history older than 1w (before ")


def test_cleanup_never_takes_a_request_whose_response_may_still_come(
    aged: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url = aged["url"]
    # Everything older than a millisecond: the hour-old pending request is within its day of grace.
    status, out, _ = cli(capsys, "cleanup", "--older-than", "1ms", "--json", "--database-url", url)
    assert status == 0
    after = rows(url)
    assert after["requests"] == {aged["young_pending"]}
    assert after["responses"] == set()
    # Sessions go once expired and empty: the live ones stay, empty or not.
    assert after["sessions"] == aged["before"]["sessions"] - {"s-alpha", "s-pending-old"}
    assert orphans(url) == NO_ORPHANS
    assert json.loads(out)["requests"] == len(aged["before"]["requests"]) - 1


def test_cleanup_expired(aged: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    url = aged["url"]
    expire(url, ["s-beta"])  # s-alpha and s-pending-old expired with their age
    now = now_ms()
    waiting = pending_request(url, "s-expired-waiting", at=now - 60_000, session_expires=now - 1000)
    expected = {"requests": 4 + 2 + 1, "responses": 6, "sessions": 3}  # s-expired-waiting keeps its request
    status, out, _ = cli(capsys, "cleanup", "--expired", "--dry-run", "--json", "--database-url", url)
    report = json.loads(out)
    assert status == 0 and {key: report[key] for key in expected} == expected
    status, out, _ = cli(capsys, "cleanup", "--expired", "--batch-size", "3", "--database-url", url)
    assert status == 0
    assert out == "deleted 7 requests, 6 responses, 3 sessions: expired sessions and their history\n"
    after = rows(url)
    assert not after["sessions"] & {"s-alpha", "s-beta", "s-pending-old"}
    assert "s-expired-waiting" in after["sessions"] and waiting in after["requests"]
    assert aged["young_pending"] in after["requests"]
    assert orphans(url) == NO_ORPHANS
    # The sessions API's purge goes the same way.
    with History(url) as history:
        assert history.sessions.purge_expired() == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cleanup", "--older-than", "soon"], "--older-than: 'soon' is not a duration"),
        (["cleanup", "--older-than", "0d"], "--older-than: '0d' must be longer than zero"),
    ],
)
def test_cleanup_mistakes(
    migrated_url: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = cli(capsys, *argv, "--database-url", migrated_url)
    assert status == 1 and out == "" and message in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        main(["cleanup", "--database-url", migrated_url])  # neither --expired nor --older-than
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main(["cleanup", "--expired", "--older-than", "1d", "--database-url", migrated_url])


# ---------------------------------------------------------------------------------------------- pruning


def test_pruning_counts_match_deletions_whatever_the_batch(aged: dict[str, Any]) -> None:
    url = aged["url"]
    with History(url) as history:
        now = now_ms()
        cutoff = now - 7 * DAY
        counted = history.pruning.count_older_than(cutoff, now=now)
        assert counted == PruneCounts(requests=6, responses=5, sessions=2)
        deleted = history.pruning.delete_older_than(cutoff, batch_size=1, now=now)
        assert deleted == counted
        assert history.pruning.delete_older_than(cutoff, batch_size=1, now=now) == PruneCounts()
        with pytest.raises(ValueError, match="batch_size"):
            history.pruning.delete_older_than(cutoff, batch_size=0)
        # A stop asked for ends the work before the next batch.
        stop = threading.Event()
        stop.set()
        assert history.pruning.delete_expired(stop=stop) == PruneCounts()
    assert orphans(url) == NO_ORPHANS
    assert PENDING_GRACE_MS == DAY


# -------------------------------------------------------------------------------------- retention option


def test_retention_option_values() -> None:
    assert build_settings().retention_ms is None  # off by default
    assert build_settings(retention="30d").retention_ms == 30 * DAY
    assert build_settings(retention=timedelta(hours=12)).retention_ms == DAY // 2
    assert build_settings(environ={"QWEN_PERSIST_RETENTION": "2w"}).retention_ms == 14 * DAY
    assert build_settings(environ={"QWEN_PERSIST_RETENTION": "off"}).retention_ms is None
    assert build_settings(retention="7d", environ={"QWEN_PERSIST_RETENTION": "2w"}).retention_ms == 7 * DAY
    for bad, message in (
        ("30", "retention must be a duration"),
        ("a month", "retention must be a duration"),
        (30, "retention must be a duration"),
        ("10s", "at least one minute"),
        (timedelta(0), "at least one minute"),
    ):
        with pytest.raises(ConfigurationError, match=message):
            build_settings(retention=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="QWEN_PERSIST_RETENTION must be a duration"):
        build_settings(environ={"QWEN_PERSIST_RETENTION": "forever"})
    assert retention.describe(30 * DAY) == "30d" and retention.describe(90 * 60_000) == "90m"


def test_retention_deletes_old_history_in_the_background(
    migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(retention, "FIRST_PASS", 0.2)
    monkeypatch.setattr(retention, "INTERVAL", 0.5)
    record_traffic(migrated_url, tmp_path / "old")
    age(migrated_url, sessions=["s-alpha", "s-beta"], ms=3 * DAY)
    old = set(session_requests(migrated_url, "s-alpha") + session_requests(migrated_url, "s-beta"))
    kept = rows(migrated_url)["requests"] - old
    caplog.set_level(logging.INFO, logger="qwen_persist")

    with serve(fake_upstream.create_app()) as upstream:
        app = openai_proxy.create_app(
            f"{upstream}/v1", "", database_url=migrated_url, spill_dir=str(tmp_path / "spill"), retention="2d"
        )
        with serve(app) as proxy:
            client = openai.OpenAI(base_url=f"{proxy}/v1", api_key="sk-test", max_retries=0)
            client.chat.completions.create(model="fake-text", messages=[{"role": "user", "content": "new"}])
            middleware = find_middleware(app)
            assert middleware.retention is not None
            expected = PruneCounts(requests=6, responses=6, sessions=2)
            deadline = time.monotonic() + 60
            # Until the pass has ended, not just until the requests are gone: its sessions go after them,
            # and leaving now would stop the thread mid-pass.
            while rows(migrated_url)["requests"] & old or middleware.retention.deleted != expected:
                assert time.monotonic() < deadline, "the retention pass never came"
                time.sleep(0.2)
            assert middleware.retention.passes >= 1
            # The request path went on meanwhile.
            client.chat.completions.create(model="fake-text", messages=[{"role": "user", "content": "newer"}])
        thread = middleware.retention._thread
        assert thread is not None and not thread.is_alive()  # stopped with the app

    after = rows(migrated_url)
    assert kept < after["requests"] and len(after["requests"] - kept) == 2  # the two new ones
    assert after["responses"] == after["requests"]
    assert not after["sessions"] & {"s-alpha", "s-beta"}
    assert orphans(migrated_url) == NO_ORPHANS
    assert middleware.retention.deleted == PruneCounts(requests=6, responses=6, sessions=2)
    assert any(
        "retention (2d) deleted 6 requests, 6 responses and 2 sessions" in r.message for r in caplog.records
    )


def test_a_failed_retention_pass_is_logged_and_retried(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(retention, "FIRST_PASS", 0.05)
    monkeypatch.setattr(retention, "INTERVAL", 0.2)
    engine = make_engine(database_url)
    pruner = retention.Retention(engine, DAY)
    try:
        pruner.start()  # no tables yet: each pass fails
        deadline = time.monotonic() + 30
        while not any("retention pass failed" in r.message for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert pruner._thread is not None and pruner._thread.is_alive()
        upgrade(database_url)
        while pruner.passes == 0:
            assert time.monotonic() < deadline, "no pass succeeded after the schema came"
            time.sleep(0.05)
    finally:
        pruner.stop()
        engine.dispose()
    assert pruner._thread is not None and not pruner._thread.is_alive()
