"""Incremental Server-Sent Events decoder following the WHATWG event-stream parsing rules.

The decoder is fed raw network chunks, split anywhere (inside a UTF-8 sequence, between a CR and its LF),
and returns the events completed by each chunk. Bytes are decoded one whole line at a time, so a character
split across chunks decodes correctly and invalid UTF-8 turns into U+FFFD instead of raising.

Work is linear in the input: each chunk is split into lines once (``bytes.splitlines`` in C), and an
unfinished line is kept as a list of pieces, joined and decoded once when its terminator arrives.

Deliberate departure from the standard: at the end of the stream the standard discards an event that
never got its terminating blank line. A recorder wants that tail (it is often the last tokens before a
connection dropped), so :meth:`SSEDecoder.close` dispatches it and reports the stream as ``unterminated``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

__all__ = ["SSEDecoder", "ServerSentEvent"]

_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event.

    ``id`` is the last event id in force at dispatch (``None`` if the stream never set one); ``retry`` is the
    reconnection time given inside this event's own block, if any.
    """

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Push-style decoder: ``feed`` network chunks, then ``close`` at end of stream."""

    __slots__ = (
        "_after_cr",
        "_data",
        "_event",
        "_first_line",
        "_last_id",
        "_partial",
        "_retry",
        "events",
        "unterminated",
    )

    def __init__(self) -> None:
        # Pieces of a line whose terminator has not arrived yet, joined once when it does: each byte is
        # copied a bounded number of times however many chunks the line spans.
        self._partial: list[bytes] = []
        self._after_cr = False  # the previous chunk ended with CR: an LF opening the next one is its pair
        self._first_line = True  # a UTF-8 BOM is only stripped from the very start of the stream
        self._data: list[str] = []
        self._event = ""
        self._retry: int | None = None
        self._last_id: str | None = None
        self.events = 0
        self.unterminated = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume one network chunk and return the events it completed."""
        if not chunk:
            return []
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._after_cr = chunk[-1:] == b"\r"
        out: list[ServerSentEvent] = []
        partial = self._partial
        for piece in chunk.splitlines(keepends=True):
            if piece[-1:] == b"\n":
                # CRLF can only occur as a whole inside one piece, so this cut is safe.
                body = piece[:-2] if piece[-2:] == b"\r\n" else piece[:-1]
            elif piece[-1:] == b"\r":
                body = piece[:-1]
            else:
                partial.append(piece)  # only the last piece can be unterminated
                break
            if partial:
                partial.append(body)
                line = b"".join(partial).decode("utf-8", "replace")
                partial.clear()
            else:
                line = body.decode("utf-8", "replace")
            event = self._line(line)
            if event is not None:
                out.append(event)
        return out

    def at_event_boundary(self) -> bool:
        """Whether nothing of a line or an event block is pending: the bytes fed next start a new block.

        A caller may then parse whole events of the plain shape (one ``data:`` line, no CR) itself and
        report them with `passed`, handing the decoder only the rest; the decoder ends up as if fed it all.
        """
        return not (self._partial or self._data or self._after_cr or self._event or self._retry is not None)

    def passed(self, events: int) -> None:
        """Account for ``events`` whole plain events a caller parsed itself at an event boundary.

        Such an event changes nothing here but the count and, being a line, the start of the stream: a BOM
        in a later line is not stripped.
        """
        if events:
            self.events += events
            self._first_line = False

    def close(self) -> list[ServerSentEvent]:
        """End of stream: flush a final line and event that had no terminator, flagging ``unterminated``."""
        out: list[ServerSentEvent] = []
        if self._partial:
            line = b"".join(self._partial).decode("utf-8", "replace")
            self._partial.clear()
            if self._first_line:
                line = line.removeprefix(_BOM)  # a stream holding nothing but a BOM is empty, not cut
                self._first_line = False
            if line:
                self.unterminated = True
                event = self._line(line)
                if event is not None:
                    out.append(event)
        if self._data:
            self.unterminated = True
            out.append(self._dispatch())
        self._after_cr = False
        return out

    def _line(self, line: str) -> ServerSentEvent | None:
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[1:]
        if not line:
            if self._data:
                return self._dispatch()
            # A blank line without data dispatches nothing but still ends the event block.
            self._event = ""
            self._retry = None
            return None
        if line[0] == ":":
            return None  # comment, typically a keep-alive
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            # More digits than int() converts (sys.get_int_max_str_digits) raise; no usable delay anyway.
            with contextlib.suppress(ValueError):
                self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent:
        event = ServerSentEvent(
            event=self._event or "message",
            data="\n".join(self._data),
            id=self._last_id,
            retry=self._retry,
        )
        self._data = []
        self._event = ""
        self._retry = None
        self.events += 1
        return event
