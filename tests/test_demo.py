"""`qwen-persist demo` end to end on a temporary SQLite file: what it prints and what it stored."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from qwen_persist.cli import main
from qwen_persist.cpus import available_cpus
from qwen_persist.demo import add_parser, run_demo
from qwen_persist.engine import make_engine
from qwen_persist.models import Request, Response, Session


@pytest.fixture
def demo_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, str, Path]:
    """The demo as a user runs it: with the default writer ("auto"; the suite otherwise pins "thread")."""
    monkeypatch.delenv("QWEN_PERSIST_WRITER", raising=False)
    db_path = tmp_path / "demo.db"
    database_url = f"sqlite:///{db_path}"
    with caplog.at_level(logging.INFO, logger="qwen_persist"):
        assert run_demo(database_url) == 0
    chosen = "process" if os.name == "posix" and available_cpus() >= 2 else "thread"
    assert f"writer=auto chose the {chosen}" in caplog.text
    captured = capsys.readouterr()
    return database_url, captured.out + captured.err, db_path


def test_demo_stores_the_conversation(demo_run: tuple[str, str, Path]) -> None:
    database_url, output, _ = demo_run
    engine = make_engine(database_url)
    try:
        with DbSession(engine) as db:
            counts = [db.scalar(select(func.count()).select_from(t)) for t in (Session, Request, Response)]
            # The question and its streamed follow-up share a session; the tool round trip and the error
            # have one each.
            assert counts == [3, 5, 5]
            rows = db.execute(
                select(Request, Response)
                .join(Response, Response.request_id == Request.id)
                .order_by(Request.id)
            ).all()
    finally:
        engine.dispose()
    by_model: dict[str, list[tuple[Request, Response]]] = {}
    for request, response in rows:
        by_model.setdefault(request.model or "", []).append((request, response))

    [(_, error_response)] = by_model["fake-error-429"]
    assert error_response.status_code == 429
    assert error_response.openai_response["error"]["code"] == "rate_limit_exceeded"

    tool_finishes = [(q.stream, r.finish_reason) for q, r in by_model["fake-tool"]]
    assert tool_finishes == [(True, "tool_calls"), (False, "stop")]
    streamed_call = by_model["fake-tool"][0][1].openai_response["choices"][0]["message"]["tool_calls"][0]
    assert streamed_call["function"]["arguments"] in output  # the fragments the client joined

    [(first, _), (follow_up, streamed)] = by_model["fake-text"]
    assert (first.stream, follow_up.stream) == (False, True)
    assert first.session_id == follow_up.session_id
    streamed_text = streamed.openai_response["choices"][0]["message"]["content"]
    assert streamed_text.startswith("Echo: And does it keep streamed answers too?")
    assert f"assistant: {streamed_text}\n" in output  # what the client received, as the demo printed it
    assert streamed.finish_reason == "stop" and streamed.total_tokens is not None
    assert all(r.status_code == 200 for q, r in rows if q.model != "fake-error-429")


def test_demo_output_is_readable(demo_run: tuple[str, str, Path]) -> None:
    _, output, db_path = demo_run
    assert str(db_path.resolve()) in output
    assert f"qwen-persist requests --database-url sqlite:///{db_path.resolve()}\n" in output
    assert "sqlite3" not in output and "select " not in output
    for heading in ("sessions", "requests", "responses"):
        assert f"\n{heading}\n" in output
    # No log noise: no uvicorn/httpx lines, no tracebacks, no warnings.
    for noise in ("INFO", "WARNING", "Traceback", "Uvicorn running", "HTTP Request:"):
        assert noise not in output


def test_demo_subcommand(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="qwen-persist")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", "--database-url", f"sqlite:///{tmp_path / 'x.db'}"])
    assert args.database_url.endswith("x.db")
    assert callable(args.handler)
    assert parser.parse_args(["demo"]).database_url == "sqlite:///qwen_persist.db"


def test_the_commands_the_demo_suggests_work(
    demo_run: tuple[str, str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, output, _ = demo_run
    monkeypatch.chdir(tmp_path)
    commands = [
        line.strip()
        for line in output.splitlines()
        if line.strip().startswith("qwen-persist ") and "--database-url" in line
    ]
    assert [shlex.split(command)[1] for command in commands] == [
        "requests",
        "show",
        "show",
        "stats",
        "export",
    ]
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
        out = capsys.readouterr().out
        assert out or "export" in command
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 4  # the successful exchanges


def test_demo_against_an_unreachable_database_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before any traffic: no conversation journaled for later, no traceback."""
    monkeypatch.chdir(tmp_path)
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    status = main(["demo", "--database-url", "postgresql://user:secret@127.0.0.1:1/nowhere"])
    out, err = capsys.readouterr()
    assert status == 1 and "Traceback" not in out + err
    [line] = err.strip().splitlines()
    assert line.startswith("qwen-persist: error: database postgresql") and "secret" not in line
    assert list(tmp_path.iterdir()) == []  # no journal left behind
