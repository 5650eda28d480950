"""Recorded traffic for the read-side tests: real exchanges written through the real middleware.

`record_traffic` runs the fake upstream and the example proxy (wrapped in `PersistenceMiddleware`) under
uvicorn, drives them with the openai SDK, and returns what the client saw, so tests can compare what the
read side gives back with what actually happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fake_upstream
import openai
import openai_proxy
from support import serve

MODELS = ("fake-text", "fake-reasoning", "fake-tool", "fake-length")


@dataclass
class Seen:
    """One exchange as the client saw it."""

    request_id: str  # the X-Request-Id the client received
    model: str
    stream: bool
    session: str | None  # the X-Session-Id the client sent
    completion_id: str | None  # None for an error
    status: int
    metadata: dict[str, str] | None = None
    content: str | None = None


@dataclass
class Traffic:
    seen: list[Seen] = field(default_factory=list)

    def ok(self) -> list[Seen]:
        return [item for item in self.seen if item.status == 200]

    def errors(self) -> list[Seen]:
        return [item for item in self.seen if item.status != 200]


def _send(
    client: openai.OpenAI,
    traffic: Traffic,
    *,
    model: str,
    stream: bool,
    text: str,
    session: str | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    headers = {"x-session-id": session} if session else {}
    extra: dict[str, Any] = {"metadata": metadata} if metadata else {}
    if stream:
        extra["stream_options"] = {"include_usage": True}
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            stream=stream,
            extra_headers=headers,
            **extra,
        )
    except openai.APIStatusError as exc:
        traffic.seen.append(
            Seen(
                exc.response.headers["x-request-id"], model, stream, session, None, exc.status_code, metadata
            )
        )
        return
    request_id = raw.headers["x-request-id"]
    parsed: Any = raw.parse()
    if stream:
        ids, parts = set(), []
        for chunk in parsed:
            ids.add(chunk.id)
            parts.extend(choice.delta.content or "" for choice in chunk.choices)
        (completion_id,) = ids
        content = "".join(parts)
    else:
        completion_id, content = parsed.id, parsed.choices[0].message.content
    traffic.seen.append(Seen(request_id, model, stream, session, completion_id, 200, metadata, content))


def record_traffic(database_url: str, tmp_path: Path, *, rounds: int = 1, **options: Any) -> Traffic:
    """Per round: 8 successful exchanges over four models (JSON and streamed, some in named sessions, some
    with client metadata) and two errors (429 and 500). Returns when every row is stored. ``options`` go
    to the middleware."""
    traffic = Traffic()
    with serve(fake_upstream.create_app()) as upstream:
        # A generous shutdown: on a loaded machine the last batches must reach the database, not the
        # journal, or the read-side tests would see fewer rows than the client sent.
        app = openai_proxy.create_app(
            f"{upstream}/v1",
            "",
            database_url=database_url,
            spill_dir=str(tmp_path / "spill"),
            shutdown_timeout=60,
            **options,
        )
        with serve(app) as proxy:
            client = openai.OpenAI(base_url=f"{proxy}/v1", api_key="sk-test", max_retries=0)
            for r in range(rounds):
                for i, model in enumerate(MODELS):
                    _send(client, traffic, model=model, stream=False, text=f"json {r}.{i}", session="s-alpha")
                    _send(
                        client,
                        traffic,
                        model=model,
                        stream=True,
                        text=f"stream {r}.{i}",
                        metadata={"team": "blue" if i % 2 else "red", "round": str(r)},
                    )
                _send(
                    client, traffic, model="fake-error-429", stream=False, text=f"limit {r}", session="s-beta"
                )
                _send(
                    client, traffic, model="fake-error-500", stream=True, text=f"boom {r}", session="s-beta"
                )
    return traffic
