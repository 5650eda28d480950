"""The read commands on whatever a client or an upstream sent: odd body shapes render, awkward documents
export, and ``tail`` with a response filter sees exchanges that finish out of order.

Data goes through the real middleware in front of a scripted upstream (`scripted`): the request bodies
are the client's, the replies whatever the test scripts, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from support import ROOT, serve

from qwen_persist import PersistenceMiddleware, jsonlib, transcript
from qwen_persist.cli import main
from qwen_persist.commands.lists import exchange_preview, request_row
from qwen_persist.export import exchange_document, exchange_json, openai_chat_example
from qwen_persist.migrate import upgrade
from qwen_persist.repositories import ExchangeRecord, History, RequestFilter
from qwen_persist.repositories.rows import RequestRecord, ResponseRecord

# ---------------------------------------------------------------------------------- scripted upstream


@dataclass
class Reply:
    """What the upstream answers to a request naming a model: ``body`` as JSON (bytes as they are) with
    ``status``, once ``release`` is set (when given)."""

    body: Any
    status: int = 200
    release: threading.Event | None = None


@dataclass
class Scripted:
    replies: dict[str, Reply] = field(default_factory=dict)

    async def completions(self, request: Request) -> Response:
        model = jsonlib.loads(await request.body()).get("model")
        reply = self.replies.get(model, Reply({"error": {"message": "unknown model"}}, 404))
        if reply.release is not None:
            await anyio.to_thread.run_sync(reply.release.wait, abandon_on_cancel=True)
        body = reply.body if isinstance(reply.body, bytes) else jsonlib.dumpb(reply.body)
        return Response(body, reply.status, media_type="application/json")

    def app(self) -> Starlette:
        async def models(_: Request) -> Response:
            return JSONResponse({"object": "list", "data": []})

        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.completions, methods=["POST"]),
                Route("/v1/models", models),
            ]
        )


@contextmanager
def recorder(url: str, tmp_path: Path, script: Scripted) -> Iterator[httpx.Client]:
    """A client of the real middleware (around the scripted upstream) recording into ``url``; everything
    is stored when the block ends."""
    upgrade(url)
    app = PersistenceMiddleware(script.app(), database_url=url, spill_dir=str(tmp_path / "spill"))
    with serve(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client


def post(client: httpx.Client, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else jsonlib.dumpb(body)
    return client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ------------------------------------------------------------------------------------ odd shapes, fuzzed

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_part = _json | st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio"]) | _json},
    optional={"text": _json, "image_url": _json | st.fixed_dictionaries({"url": _json | st.just("data:")})},
)
_function = _json | st.fixed_dictionaries({}, optional={"name": _json, "arguments": _json | st.text()})
_call = _json | st.fixed_dictionaries({}, optional={"id": _json, "type": _json, "function": _function})
_message = _json | st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]) | _json,
        "content": _json | st.lists(_part, max_size=3),
        "tool_calls": _json | st.lists(_call, max_size=2),
        "function_call": _function,
        "tool_call_id": _json,
        "name": _json,
        "reasoning_content": _json,
        "refusal": _json,
    },
)
_request = _json | st.fixed_dictionaries(
    {}, optional={"model": _json, "messages": _json | st.lists(_message, max_size=4), "tools": _json}
)
_response = _json | st.fixed_dictionaries(
    {},
    optional={"choices": _json | st.lists(_json | st.fixed_dictionaries({}, optional={"message": _message}))},
)


def _exchange(request: Any, response: Any, status: int | None, error: str | None) -> ExchangeRecord:
    requested = RequestRecord(
        1, "req-1", "sess-1", None, 1_700_000_000_000, 1_700_000_000_000, "POST", "/v1/chat/completions",
        request, None, "m", False, None, None, None,
    )  # fmt: skip
    if status is None and error is None:
        return ExchangeRecord(requested, None)
    names = [f.name for f in ResponseRecord.__dataclass_fields__.values()]
    values: dict[str, Any] = dict.fromkeys(names)
    values.update(id=1, request_id=1, timestamp=1_700_000_000_500, status_code=status, error=error)
    values["openai_response"] = response
    return ExchangeRecord(requested, ResponseRecord(**values))


@settings(max_examples=400)
@given(
    request=_request,
    response=_response,
    status=st.none() | st.sampled_from([200, 302, 400, 500]),
    error=st.none() | st.text(max_size=5),
    previous=st.none() | _request,
)
def test_every_body_shape_renders(
    request: Any, response: Any, status: int | None, error: str | None, previous: Any
) -> None:
    """`show`'s transcript (terminal, plain, Markdown), the list rows and the exports take any JSON a
    client or an upstream can have sent, without raising."""
    exchanges = [_exchange(request, response, status, error)]
    if previous is not None:  # a turn before it, so the "continued" comparison runs too
        exchanges.insert(0, _exchange(previous, response, status, error))
    turns = transcript.build(exchanges)
    assert len(turns) == len(exchanges)
    for terminal in (True, False):
        file = io.StringIO()
        Console(file=file, force_terminal=terminal, width=80).print(
            *transcript.render(turns, "title", terminal=terminal)
        )
        assert "title" in file.getvalue()
    assert transcript.markdown(turns, "title").startswith("# title")
    for exchange in exchanges:
        assert " → " in exchange_preview(exchange)
        assert request_row(exchange)[0] == 1
        document = json.loads(exchange_json(exchange))
        assert document["openai_request"] == json.loads(jsonlib.dumps(exchange.request.openai_request))
        example = openai_chat_example(exchange)
        if example is not None:
            assert json.loads(jsonlib.dumpb(example))["messages"][-1]["role"] == "assistant"


def test_odd_shapes_through_the_proxy_never_give_a_traceback(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reported crashes, end to end: ``tool_calls`` that is not a list, in a request's message and in
    a reply; every read command prints them."""
    odd_reply = {
        "object": "chat.completion",
        "choices": [{"message": {"role": "assistant", "content": None, "tool_calls": {"a": 1}}}],
    }
    script = Scripted({"dict": Reply(odd_reply)})
    for name, calls in (("number", 1.5), ("int", 5), ("true", True)):
        script.replies[name] = Reply(
            {"choices": [{"message": {"role": "assistant", "content": [7], "tool_calls": calls}}]}
        )
    with recorder(database_url, tmp_path, script) as client:
        sent = [
            post(client, {"model": "dict", "messages": [{"role": "user", "content": "hi", "tool_calls": 5}]}),
            post(client, {"model": "number", "messages": [{"content": {"x": 1}, "tool_calls": True}, 3]}),
            post(client, {"model": "int", "messages": [{"role": "assistant", "tool_calls": 1.5}]}),
            post(client, {"model": "true", "messages": "not a list"}),
        ]
    assert [response.status_code for response in sent] == [200, 200, 200, 200]
    for argv in (
        ["requests"],
        ["requests", "--json"],
        ["export"],
        ["export", "--format", "openai-chat"],
        *(["show", response.headers["x-request-id"]] for response in sent),
        *(["show", response.headers["x-request-id"], "--markdown"] for response in sent),
    ):
        status, out, err = cli(capsys, *argv, "--database-url", database_url)
        assert status == 0 and "Traceback" not in err, (argv, err)
        assert out
    status, out, _ = cli(capsys, "requests", "--database-url", database_url)
    assert "  hi →\n" in out  # the first exchange's row: its reply's calls (a dict) are no call


# ---------------------------------------------------------------------------------------------- export

# JSON text as a client or an upstream may send it: NUL in a string (stored escaped, so read back parsed)
# with an integer wider than 64 bits, which orjson does not write. (A lone surrogate is the other value
# orjson refuses; the writer does not store one, so no stored document holds it.)
NUL_AND_WIDE = (
    b'{"model":"m","seed":123456789012345678901234567890,'
    b'"messages":[{"role":"user","content":"nul\\u0000here"}]}'
)
NUL_REPLY = (
    b'{"object":"chat.completion","choices":[{"message":{"role":"assistant","content":"a\\u0000b"},'
    b'"finish_reason":"stop"}],"system_fingerprint":123456789012345678901234567890,'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


def test_export_writes_documents_orjson_cannot(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = Scripted({"m": Reply(NUL_REPLY)})
    with recorder(database_url, tmp_path, script) as client:
        assert post(client, NUL_AND_WIDE).status_code == 200
        assert (
            post(client, {"model": "m", "messages": [{"role": "user", "content": "plain"}]}).status_code
            == 200
        )
    with History(database_url) as history:
        exchanges = list(history.requests.iter_exchanges(RequestFilter()))
    assert exchanges[0].response is not None
    assert exchanges[0].response.openai_response["choices"][0]["message"]["content"] == "a\x00b"
    assert exchanges[0].request.openai_request["seed"] == 123456789012345678901234567890
    assert exchanges[0].request.openai_request["messages"][0]["content"] == "nul\x00here"

    status, out, err = cli(capsys, "export", "--database-url", database_url)
    assert status == 0 and "Traceback" not in err
    assert f"exported {len(exchanges)} exchanges" in err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [json.loads(jsonlib.dumps(exchange_document(e))) for e in exchanges]
    assert lines[0]["openai_request"]["seed"] == 123456789012345678901234567890
    assert lines[0]["openai_request"]["messages"][0]["content"] == "nul\x00here"

    status, out, err = cli(capsys, "export", "--format", "openai-chat", "--database-url", database_url)
    assert status == 0 and "Traceback" not in err
    examples = [json.loads(line) for line in out.splitlines()]
    assert [example["messages"][0]["content"] for example in examples] == ["nul\x00here", "plain"]
    assert [example["messages"][1]["content"] for example in examples] == ["a\x00b", "a\x00b"]


# ------------------------------------------------------------------------------------------------ tail


class Lines:
    """A command's stdout, read in a thread, so a test can wait for a line with a time limit."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        stdout = process.stdout
        threading.Thread(target=lambda: [self.lines.put(line) for line in stdout], daemon=True).start()

    def next(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.lines.get(timeout=60)))
        except queue.Empty:
            raise AssertionError("tail printed nothing for 60 s") from None


def _stored(url: str, model: str) -> bool:
    with History(url) as history:
        return any(e.request.model == model for e in history.requests.iter_exchanges(RequestFilter()))


@pytest.mark.parametrize("flag", ["--errors", "--no-errors"])
def test_tail_judges_a_late_answer_by_its_response(database_url: str, tmp_path: Path, flag: str) -> None:
    """A streamed request that fails slowly, sent before a fast one: ``--errors`` prints it when its 500
    arrives (its request id was passed long before), ``--no-errors`` never prints it."""
    release = threading.Event()
    script = Scripted(
        {
            "slow": Reply({"error": {"message": "upstream broke"}}, 500, release),
            "fast": Reply({"error": {"message": "bad request"}}, 400),
            "ok": Reply({"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}),
        }
    )
    printed = "fast" if flag == "--errors" else "ok"  # what the filter lets through, answered at once

    def send(client: httpx.Client, model: str, stream: bool = False) -> str:
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": model}]}
        return post(client, body).headers["x-request-id"]

    with recorder(database_url, tmp_path, script) as client:
        first = send(client, printed)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        argv = ["tail", "--json", "-n", "1", "--interval", "0.2", flag, "--database-url", database_url]
        tail = subprocess.Popen(
            [sys.executable, "-m", "qwen_persist.cli", *argv],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        slow: list[str] = []
        sender = threading.Thread(target=lambda: slow.append(send(client, "slow", stream=True)))
        try:
            lines = Lines(tail)
            assert lines.next()["request_id"] == first  # tail is running
            sender.start()
            while not _stored(database_url, "slow"):  # its request is stored, its response is not
                time.sleep(0.05)
            fast = send(client, printed)
            assert lines.next()["request_id"] == fast
            time.sleep(3)  # longer than tail takes to count the fast one's id as seen (2 s on PostgreSQL)
            release.set()
            sender.join(timeout=60)
            marker = send(client, printed)  # stored after the slow one's response
            if flag == "--errors":
                got = {lines.next()["request_id"], lines.next()["request_id"]}
                assert got == {slow[0], marker}
            else:
                # The poll that sees the marker sees the slow response too: the next line, printed by a
                # later poll, is the next marker's, with nothing between.
                got = [lines.next()["request_id"]]
                last = send(client, printed)
                got.append(lines.next()["request_id"])
                assert got == [marker, last]
        finally:
            release.set()
            tail.send_signal(signal.SIGINT)
            _, err = tail.communicate(timeout=30)
        assert tail.returncode == 0 and "Traceback" not in err, err
