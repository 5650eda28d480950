"""The read commands (`qwen-persist sessions|requests|show|stats|export|tail`) on SQLite and PostgreSQL,
through the real entry point, over traffic recorded through the real middleware: what they print, their
exit codes, and their one-line errors.

`cleanup` and the retention option are in test_retention.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fake_upstream
import openai
import openai_proxy
import pydantic
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from support import ROOT, serve
from traffic import Traffic, record_traffic

from qwen_persist.cli import main
from qwen_persist.export import exchange_document
from qwen_persist.migrate import upgrade
from qwen_persist.repositories import History, RequestFilter

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SYSTEM = "You are a weather assistant. Use the tool."
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@dataclass
class Recorded:
    url: str
    traffic: Traffic
    tool_request_ids: list[str]  # the s-tools conversation, in order

    @property
    def total(self) -> int:
        return len(self.traffic.seen) + len(self.tool_request_ids)


def _tool_conversation(url: str, tmp_path: Path) -> list[str]:
    """A session with a system prompt, a tool call, its result, the answer and a follow-up with
    reasoning: every kind of turn a transcript shows."""
    ids: list[str] = []
    with serve(fake_upstream.create_app()) as upstream:
        app = openai_proxy.create_app(
            f"{upstream}/v1", "", database_url=url, spill_dir=str(tmp_path / "spill")
        )
        with serve(app) as proxy:
            client = openai.OpenAI(base_url=f"{proxy}/v1", api_key="sk-test", max_retries=0)
            headers = {"x-session-id": "s-tools"}
            messages: list[Any] = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What's the weather in Paris?"},
            ]
            raw = client.chat.completions.with_raw_response.create(
                model="fake-tool", messages=messages, tools=[WEATHER_TOOL], extra_headers=headers
            )
            ids.append(raw.headers["x-request-id"])
            call = raw.parse().choices[0].message
            assert call.tool_calls
            messages.append(call.model_dump(exclude_none=True))
            messages.append(
                {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "18 C and sunny"}
            )
            raw = client.chat.completions.with_raw_response.create(
                model="fake-tool", messages=messages, tools=[WEATHER_TOOL], extra_headers=headers
            )
            ids.append(raw.headers["x-request-id"])
            messages.append(raw.parse().choices[0].message.model_dump(exclude_none=True))
            messages.append({"role": "user", "content": "Should I take an umbrella?"})
            raw = client.chat.completions.with_raw_response.create(
                model="fake-reasoning", messages=messages, extra_headers=headers
            )
            ids.append(raw.headers["x-request-id"])
    return ids


@pytest.fixture(scope="module")
def recorded(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    upgrade(module_database_url)
    tmp = tmp_path_factory.mktemp("traffic")
    traffic = record_traffic(module_database_url, tmp)
    tools = _tool_conversation(module_database_url, tmp)
    return Recorded(module_database_url, traffic, tools)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def stored(url: str, **filters: Any) -> list[Any]:
    with History(url) as history:
        return list(history.requests.iter_exchanges(RequestFilter(**filters)))


# --------------------------------------------------------------------------------------------- requests


def test_requests_json_is_every_exchange_newest_first(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "requests", "--json", "-n", "100", "--database-url", recorded.url)
    assert status == 0 and err == ""
    lines = json_lines(out)
    assert len(lines) == recorded.total
    stamps = [(line["timestamp"], line["id"]) for line in lines]
    assert stamps == sorted(stamps, reverse=True)
    # Each line is the stored exchange, whole: the same document the repository gives.
    by_id = {exchange.request.id: exchange for exchange in stored(recorded.url)}
    for line in lines:
        assert line == json.loads(json.dumps(exchange_document(by_id[line["id"]])))
    seen = {item.request_id for item in recorded.traffic.seen} | set(recorded.tool_request_ids)
    assert {line["request_id"] for line in lines} == seen


def _failed(exchange: Any) -> bool:
    response = exchange.response
    return response.error is not None or (response.status_code or 0) >= 400


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "fake-tool"], lambda e: e.request.model == "fake-tool"),
        (["--errors"], _failed),
        (["--no-errors"], lambda e: not _failed(e)),
        (["--session", "s-beta"], lambda e: e.request.session_id == "s-beta"),
        (["--stream", "--no-errors"], lambda e: e.request.stream and not _failed(e)),
        (["--status", "429"], lambda e: e.response.status_code == 429),
    ],
)
def test_requests_filters(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], argv: list[str], expected: Any
) -> None:
    status, out, _ = run(capsys, "requests", "--json", "-n", "1000", *argv, "--database-url", recorded.url)
    assert status == 0
    got = {line["request_id"] for line in json_lines(out)}
    # Checked against the stored rows (every exchange has its response here), read without the filter.
    want = {e.request.request_id for e in stored(recorded.url) if expected(e)}
    assert got == want and want
    # And against what the client saw, where it says the same.
    if argv == ["--errors"]:
        assert got == {item.request_id for item in recorded.traffic.errors()}


def test_requests_since_and_until(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    url = recorded.url
    assert (
        len(
            json_lines(
                run(capsys, "requests", "--json", "-n", "1000", "--since", "1h", "--database-url", url)[1]
            )
        )
        == recorded.total
    )
    assert run(capsys, "requests", "--json", "--since", "2999-01-01", "--database-url", url)[1] == ""
    assert (
        run(capsys, "requests", "--json", "--until", "2000-01-01T00:00:00Z", "--database-url", url)[1] == ""
    )
    status, out, _ = run(capsys, "requests", "--until", "2000-01-01", "--database-url", url)
    assert status == 0 and "no exchanges" in out


def test_requests_table_piped_is_plain_and_aligned(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "requests", "-n", "3", "--database-url", recorded.url)
    assert status == 0
    assert not ANSI.search(out)
    lines = out.splitlines()
    header = lines[0]
    for column in ("id", "time (UTC)", "model", "status", "tokens in/out", "request id", "session"):
        assert column in header
    newest = sorted(stored(recorded.url), key=lambda e: (e.request.timestamp, e.request.id))[-3:]
    rows = lines[1:4]
    for row, exchange in zip(rows, reversed(newest), strict=True):
        assert exchange.request.request_id in row and row.startswith(str(exchange.request.id))
        # Aligned: every row's request id starts in the header's column.
        assert row.index(exchange.request.request_id) == header.index("request id")
    assert all(line == line.rstrip() for line in lines)
    assert "3 exchanges, newest first (more with -n)" in out


def test_tables_fit_a_terminal(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # rich treats stdout as a terminal of COLUMNS cells when TTY_COMPATIBLE is set.
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "90")
    for command in (["requests"], ["sessions"], ["stats"], ["show", "s-tools"]):
        status, out, _ = run(capsys, *command, "--database-url", recorded.url)
        assert status == 0
        assert ANSI.search(out), command  # colour and styles on a terminal
        plain = ANSI.sub("", out)
        assert max(len(line) for line in plain.splitlines()) <= 90, command
    status, out, _ = run(capsys, "requests", "--database-url", recorded.url)
    assert "not shown for want of width" in ANSI.sub("", out)
    # The row ids (for `show --row`) and models stay whole.
    newest = max(stored(recorded.url), key=lambda e: (e.request.timestamp, e.request.id))
    assert re.search(rf"^{newest.request.id}\s+\S+ \S+\s+{newest.request.model}\s", ANSI.sub("", out), re.M)


# --------------------------------------------------------------------------------------------- sessions


def test_sessions(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "sessions", "--json", "-n", "100", "--database-url", recorded.url)
    assert status == 0
    sessions = json_lines(out)
    ids = [session["id"] for session in sessions]
    assert {"s-alpha", "s-beta", "s-tools"} <= set(ids)
    assert len(ids) == len(set(ids)) == len({e.request.session_id for e in stored(recorded.url)})
    accessed = [session["last_accessed"] for session in sessions]
    assert accessed == sorted(accessed, reverse=True)
    assert all(session["expired"] is False for session in sessions)
    assert run(capsys, "sessions", "--json", "--expired", "--database-url", recorded.url)[1] == ""
    assert len(
        json_lines(
            run(capsys, "sessions", "--json", "--active", "-n", "100", "--database-url", recorded.url)[1]
        )
    ) == len(ids)
    status, out, _ = run(capsys, "sessions", "-n", "2", "--database-url", recorded.url)
    assert status == 0 and out.splitlines()[0].split()[:2] == ["session", "created"]
    assert out.splitlines()[1].split()[0] == ids[0]
    assert "2 sessions, most recently used first (more with -n)" in out


# ------------------------------------------------------------------------------------------------- show


def test_show_a_session_as_a_transcript(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "show", "s-tools", "--database-url", recorded.url)
    assert status == 0 and err == ""
    assert out.startswith("Session s-tools (3 exchanges)")
    exchanges = stored(recorded.url, session_id="s-tools")
    # Turn by turn, in order, each with its facts.
    positions = [out.index(f"request {exchange.request.request_id}") for exchange in exchanges]
    assert positions == sorted(positions)
    first = exchanges[0]
    assert f"#{first.request.id} · " in out and "fake-tool" in out and "fake-reasoning" in out
    response = first.response
    assert response is not None
    assert f"tokens {response.prompt_tokens} in / {response.completion_tokens} out" in out
    assert f"{response.duration_ms} ms (first byte {response.first_byte_ms} ms)" in out
    assert "200 tool_calls" in out
    for pattern in (
        rf"^system\s+{re.escape(SYSTEM)}$",
        r"^user\s+What's the weather in Paris\?$",
        r"^assistant\s+calls get_weather",
        r'"city": "Paris"',
        r"^tool \(\S+\)\s+18 C and sunny$",  # the tool result
        r"^assistant\s+The tool says: 18 C and sunny",  # the answer
        r"^user\s+Should I take an umbrella\?$",
        r"^assistant thinking\s+The user wants an echo",  # reasoning
        r"\(earlier messages as above\)",
    ):
        assert re.search(pattern, out, re.M), pattern
    call_id = response.openai_response["choices"][0]["message"]["tool_calls"][0]["id"]
    assert f"tool ({call_id})" in out and f"[{call_id}]" in out
    # Continued turns show only what is new: the question and the system prompt appear once.
    assert out.count("What's the weather in Paris?") == 1 and out.count(SYSTEM) == 1


def test_show_a_request_and_an_error(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    ok = recorded.traffic.ok()[0]
    status, out, _ = run(capsys, "show", ok.request_id, "--database-url", recorded.url)
    assert status == 0
    assert out.startswith(f"Request {ok.request_id}")
    assert ok.content and ok.content in out
    failed = next(item for item in recorded.traffic.errors() if item.status == 429)
    status, out, _ = run(capsys, "show", failed.request_id, "--database-url", recorded.url)
    assert status == 0
    assert "error  HTTP 429: Fake upstream error 429 for model fake-error-429." in out


def test_show_markdown_json_row_and_file(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = recorded.url
    status, markdown, _ = run(capsys, "show", "s-tools", "--markdown", "--database-url", url)
    assert status == 0
    assert markdown.startswith("# Session s-tools (3 exchanges)\n")
    assert markdown.count("\n## ") == 3
    for text in (
        "**system**",
        "**user**",
        "**tool** (`",
        "Calls `get_weather`",
        "```json",
        "<details><summary>Reasoning",
    ):
        assert text in markdown, text
    target = tmp_path / "conversation.md"
    assert run(capsys, "show", "s-tools", "--markdown", "-o", str(target), "--database-url", url)[:2] == (
        0,
        "",
    )
    assert target.read_text() == markdown

    status, out, _ = run(capsys, "show", "s-tools", "--json", "--database-url", url)
    exchanges = stored(url, session_id="s-tools")
    assert [line["request_id"] for line in json_lines(out)] == [e.request.request_id for e in exchanges]
    assert json_lines(out)[0] == json.loads(json.dumps(exchange_document(exchanges[0])))

    row = exchanges[1].request.id
    status, out, _ = run(capsys, "show", "--row", str(row), "--json", "--database-url", url)
    assert status == 0 and json_lines(out)[0]["id"] == row
    assert (
        "--json and --markdown"
        in run(capsys, "show", "s-tools", "--json", "--markdown", "--database-url", url)[2]
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "no-such-id"], "no request or session has the id 'no-such-id'"),
        (["show", "--row", "999999"], "no request row has id 999999"),
        (["show", "--row", "abc"], "--row: 'abc' is not a numeric id"),
        (["requests", "--since", "yesterday"], "--since: 'yesterday' is not a time: an ISO date or time"),
        (["requests", "--until", "soon"], "or a duration ago (90s, 15m, 2h, 7d, 2w)"),
        (["sessions", "--since", "yesterday"], "or a duration ago (90s, 15m, 2h, 7d, 2w)"),
        (["requests", "-n", "0"], "--limit: must be >= 1"),
        (["requests", "-n", "5000"], "--limit: must be <= 1000"),
        (["tail", "-n", "2000"], "--lines: must be <= 1000"),
        (["stats", "--by", "week"], "--by: one or more of model, day, hour"),
        (["stats", "--by", "day,hour"], "--by: day and hour cannot be combined"),
        (["requests", "--since", "2026-01-02", "--until", "2026-01-01"], "--until: is before since"),
    ],
)
def test_mistakes_are_one_line_errors(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = run(capsys, *argv, "--database-url", recorded.url)
    assert status == 1 and out == ""
    assert err.startswith("qwen-persist: error: ") and err.count("\n") == 1, err
    assert message in err


def test_counts_in_the_right_number(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    url = recorded.url
    assert run(capsys, "requests", "-n", "1", "--database-url", url)[1].endswith(
        "\n1 exchange, newest first (more with -n)\n"
    )
    assert run(capsys, "requests", "-n", "2", "--database-url", url)[1].endswith(
        "\n2 exchanges, newest first (more with -n)\n"
    )
    assert run(capsys, "sessions", "-n", "1", "--database-url", url)[1].endswith(
        "\n1 session, most recently used first (more with -n)\n"
    )
    sessions: dict[str, int] = {}
    for exchange in stored(url):
        sessions[exchange.request.session_id] = sessions.get(exchange.request.session_id, 0) + 1
    single = next(session for session, number in sessions.items() if number == 1)
    status, _, err = run(capsys, "export", "--session", single, "--database-url", url)
    assert status == 0 and "exported 1 exchange to stdout as jsonl" in err


# ------------------------------------------------------------------------------------------------ stats


def test_stats_per_day_and_model(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "stats", "--json", "--database-url", recorded.url)
    assert status == 0
    rows = json_lines(out)
    assert all(set(row["group"]) == {"day", "model"} for row in rows)
    assert sum(row["count"] for row in rows) == recorded.total
    exchanges = stored(recorded.url)
    for row in rows:
        mine = [e for e in exchanges if e.request.model == row["group"]["model"]]
        assert row["count"] == len(mine)
        assert row["completion_tokens"] == sum(e.response.completion_tokens or 0 for e in mine)
        assert row["errors"] == sum(1 for e in mine if _failed(e))
        assert row["error_rate"] == row["errors"] / len(mine)
        durations = sorted(e.response.duration_ms for e in mine)
        assert row["duration_ms"]["p50"] == pytest.approx(_median(durations))
        assert min(durations) <= row["duration_ms"]["p99"] <= max(durations)


def _median(values: list[int]) -> float:
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def test_stats_table_and_groupings(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    url = recorded.url
    status, out, _ = run(capsys, "stats", "--by", "model", "--database-url", url)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["model", "exchanges", "errors", "error"]
    total = next(line for line in lines if line.startswith("all "))
    errors = sum(1 for e in stored(url) if _failed(e))
    assert total.split()[1:4] == [str(recorded.total), str(errors), f"{errors / recorded.total * 100:.1f}%"]
    assert re.search(r"^fake-error-429\s+1\s+1\s+100\.0%", out, re.M)
    hours = json_lines(run(capsys, "stats", "--by", "hour", "--json", "--database-url", url)[1])
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00Z", row["group"]["hour"]) for row in hours)
    models = json_lines(
        run(capsys, "stats", "--by", "model", "--json", "--model", "fake-text", "--database-url", url)[1]
    )
    assert [row["group"] for row in models] == [{"model": "fake-text"}]


# ----------------------------------------------------------------------------------------------- export


def test_export_jsonl_is_every_exchange_whole(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, err = run(capsys, "export", "--database-url", recorded.url)
    assert status == 0
    assert f"exported {recorded.total} exchanges to stdout as jsonl" in err
    lines = json_lines(out)
    expected = [json.loads(json.dumps(exchange_document(e))) for e in stored(recorded.url)]
    assert lines == expected  # oldest first, every field, documents as stored
    target = tmp_path / "all.jsonl"
    status, out, err = run(
        capsys, "export", "-o", str(target), "--model", "fake-text", "--database-url", recorded.url
    )
    assert status == 0 and out == ""
    assert json_lines(target.read_text()) == [line for line in expected if line["model"] == "fake-text"]
    assert not list(tmp_path.glob("*.partial"))


def test_export_openai_chat_is_valid_fine_tuning_data(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "export", "--format", "openai-chat", "--database-url", recorded.url)
    assert status == 0
    successes = [e for e in stored(recorded.url) if e.response is not None and e.response.succeeded]
    lines = out.splitlines()
    assert len(lines) == len(successes) and f"exported {len(successes)} exchanges" in err
    messages_type = pydantic.TypeAdapter(list[ChatCompletionMessageParam])
    tools_type = pydantic.TypeAdapter(list[ChatCompletionToolParam])
    for line, exchange in zip(lines, successes, strict=True):
        example = json.loads(line)  # each line parses on its own
        assert set(example) <= {"messages", "tools", "parallel_tool_calls"}
        messages = example["messages"]
        messages_type.validate_python(messages)
        if "tools" in example:
            assert example["tools"] == exchange.request.openai_request["tools"]
            tools_type.validate_python(example["tools"])
        known_calls: set[str] = set()
        for message in messages:
            assert message["role"] in ("system", "user", "assistant", "tool")
            assert set(message) <= {"role", "content", "name", "tool_calls", "tool_call_id"}
            for call in message.get("tool_calls", []):
                assert set(call) == {"id", "type", "function"} and call["type"] == "function"
                assert isinstance(call["id"], str) and isinstance(call["function"]["name"], str)
                json.loads(call["function"]["arguments"])
                known_calls.add(call["id"])
            if message["role"] == "tool":
                assert message["tool_call_id"] in known_calls
            if message["role"] != "assistant" or "tool_calls" not in message:
                assert isinstance(message["content"], str)
        # The request's messages, then the stored completion's message as the assistant turn.
        sent = exchange.request.openai_request["messages"]
        assert [m["role"] for m in messages[:-1]] == [m["role"] for m in sent]
        assert [m.get("content") for m in messages[:-1]] == [m.get("content") for m in sent]
        stored_reply = exchange.response.openai_response["choices"][0]["message"]
        expected = {"role": "assistant"}
        if stored_reply.get("tool_calls"):
            expected["tool_calls"] = [
                {"id": c["id"], "type": c["type"], "function": c["function"]}
                for c in stored_reply["tool_calls"]
            ]
            if stored_reply.get("content") is not None:
                expected["content"] = stored_reply["content"]
        else:
            expected["content"] = stored_reply["content"]
        assert messages[-1] == expected


# ------------------------------------------------------------------------------------------------- tail


def _cli(*argv: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "qwen_persist.cli", *argv], env=env, text=True, **kwargs)


def test_tail_prints_exchanges_as_they_are_stored(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    first = record_traffic(database_url, tmp_path / "one")
    tail = _cli(
        "tail",
        "--json",
        "-n",
        "2",
        "--interval",
        "0.2",
        "--database-url",
        database_url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert tail.stdout is not None
        before = [json.loads(tail.stdout.readline()) for _ in range(2)]  # the last two stored
        newest = sorted(stored(database_url), key=lambda e: e.request.id)[-2:]
        assert [line["id"] for line in before] == [e.request.id for e in newest]
        second = record_traffic(database_url, tmp_path / "two")
        lines = [json.loads(tail.stdout.readline()) for _ in second.seen]
        assert {line["request_id"] for line in lines} == {item.request_id for item in second.seen}
        assert all(line["response"] is not None for line in lines)
        assert not {line["request_id"] for line in lines} & {item.request_id for item in first.seen}
    finally:
        tail.send_signal(signal.SIGINT)
        _, err = tail.communicate(timeout=30)
    assert tail.returncode == 0, err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------- failures, exits


def test_database_problems_are_one_line_errors(
    database_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not migrated (an empty database): says which command fixes it.
    if database_url.startswith("sqlite"):
        Path(database_url.removeprefix("sqlite:///")).touch()
    status, out, err = run(capsys, "requests", "--database-url", database_url)
    assert status == 1 and out == ""
    assert "is not migrated" in err and "run: qwen-persist db upgrade --database-url " in err
    # Behind this version's schema: the same fix.
    upgrade(database_url, "0005_capture_identity")
    status, _, err = run(capsys, "stats", "--database-url", database_url)
    assert status == 1 and "older than this version's; run: qwen-persist db upgrade" in err
    upgrade(database_url)
    assert run(capsys, "requests", "--database-url", database_url)[0] == 0
    # Through QWEN_PERSIST_DATABASE_URL as well.
    monkeypatch.setenv("QWEN_PERSIST_DATABASE_URL", database_url)
    assert run(capsys, "sessions")[:2] == (0, "no sessions\n")


def test_a_missing_sqlite_file_is_reported_not_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QWEN_PERSIST_DATABASE_URL", raising=False)
    for command in (
        ["requests"],
        ["sessions"],
        ["show", "x"],
        ["stats"],
        ["export"],
        ["tail"],
        ["cleanup", "--expired"],
    ):
        status, out, err = run(capsys, *command)  # the default URL: ./qwen_persist.db
        assert status == 1 and out == ""
        assert err.startswith("qwen-persist: error: no database at qwen_persist.db: the SQLite file does not")
        assert err.endswith("give the right one with --database-url or QWEN_PERSIST_DATABASE_URL\n")
    assert list(tmp_path.iterdir()) == []


def test_exit_codes_and_no_traceback_from_the_console_script(recorded: Recorded, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qwen_persist.cli", "requests", "-n", "2", "--database-url", recorded.url],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "" and len(done.stdout.splitlines()) == 4
    for argv, code in (
        (["show", "nope", "--database-url", recorded.url], 1),
        (["requests", "--database-url", "postgresql://root@127.0.0.1:1/nowhere"], 1),
        (["requests", "--database-url", "sqlite:///" + str(tmp_path / "missing.db")], 1),
        (["requests", "--database-url", "nonsense://"], 1),
        (["requests", "--bogus"], 2),  # argparse's usage error
    ):
        done = subprocess.run(
            [sys.executable, "-m", "qwen_persist.cli", *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=120,
            check=False,
        )
        assert done.returncode == code, (argv, done.stderr)
        assert "Traceback" not in done.stderr and done.stdout == ""
        if code == 1:
            assert done.stderr.startswith("qwen-persist: error: ") and done.stderr.count("\n") == 1, (
                done.stderr
            )


def test_a_closed_pipe_ends_quietly(recorded: Recorded) -> None:
    done = subprocess.run(
        f"{sys.executable} -m qwen_persist.cli export --database-url '{recorded.url}' | head -c 100",
        shell=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )
    assert len(done.stdout) == 100
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_export_shows_a_progress_bar_on_a_terminal(recorded: Recorded, tmp_path: Path) -> None:
    import pty

    control, terminal = pty.openpty()
    target = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwen_persist.cli",
            "export",
            "-o",
            str(target),
            "--database-url",
            recorded.url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(control, 4096)
        except OSError:  # the terminal closed with the child
            break
        if not chunk:
            break
        seen += chunk
    assert child.wait(timeout=120) == 0
    os.close(control)
    text = ANSI.sub("", seen.decode("utf-8", "replace"))
    assert "exporting" in text and f"{recorded.total}/{recorded.total}" in text  # the bar, counted out
    assert f"exported {recorded.total} exchanges to {target} as jsonl" in text
    assert len(target.read_text().splitlines()) == recorded.total
    # Not when asked, nor when the data itself goes to the terminal's stream.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_persist.cli",
            "export",
            "--no-progress",
            "-o",
            str(target),
            "--database-url",
            recorded.url,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and "exporting" not in done.stderr
