"""Incremental `text/event-stream` decoder following the WHATWG EventSource parsing rules.

https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

Bytes may arrive in any chunking: a chunk can end inside a line, between the CR and LF of a CRLF, or inside a
multi-byte UTF-8 character. Messages come out of `feed()` as soon as the blank line ending them has arrived.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

BOM = "\ufeff"
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SSEMessage:
    event: str
    data: str
    # The last event id in effect when the message was dispatched (WHATWG `lastEventId`); None when no id.
    id: str | None = None
    # The reconnection time (ms) in effect when the message was dispatched, if the server ever sent one.
    retry: int | None = None


class SSEDecoder:
    """Turns the bytes of one or more event streams into SSEMessages.

    `last_event_id` is the id to send as `Last-Event-ID` when reconnecting: it only moves when a blank line
    arrives, so an event cut off mid-way never advances it. None stands for WHATWG's empty string ("no id").
    """

    def __init__(self, *, last_event_id: str | None = None) -> None:
        self.last_event_id: str | None = last_event_id or None
        self.retry: int | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new stream (a reconnect): partial lines and events are dropped, the last id is kept."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_stream_start = True
        self._after_cr = False
        self._partial: list[str] = []
        self._data: list[str] = []
        self._event_type = ""
        self._id_buffer = self.last_event_id or ""

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        """Decode one chunk of the stream; return the messages it completed."""
        text = self._decode(chunk)
        if not text:
            return []
        if "\n" not in text and "\r" not in text:
            # No line ends here: keep the piece and join once, so a long line in tiny chunks stays linear.
            self._partial.append(text)
            return []
        self._partial.append(text)
        buffered = "".join(self._partial)
        lines = buffered.split("\n") if "\r" not in buffered else _LINE_END.split(buffered)
        # The last piece has no line end yet. A trailing CR already ended its line, leaving "" here.
        self._partial = [lines.pop()]
        self._after_cr = buffered.endswith("\r")
        return self._process(lines)

    def _decode(self, chunk: bytes) -> str:
        text = self._utf8.decode(chunk)
        if not text:
            return text
        if self._at_stream_start:
            self._at_stream_start = False
            if text.startswith(BOM):
                text = text[1:]
        if self._after_cr:
            # The CR that ended the previous chunk and this LF are one line end.
            self._after_cr = False
            if text.startswith("\n"):
                text = text[1:]
        return text

    def _process(self, lines: list[str]) -> list[SSEMessage]:
        messages: list[SSEMessage] = []
        for line in lines:
            if not line:
                message = self._dispatch()
                if message is not None:
                    messages.append(message)
            elif line[0] != ":":
                name, _, value = line.partition(":")
                self._field(name, value[1:] if value.startswith(" ") else value)
        return messages

    def _field(self, name: str, value: str) -> None:
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id" and "\0" not in value:
            self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        # Any other field name is ignored, as the standard says.

    def _dispatch(self) -> SSEMessage | None:
        self.last_event_id = self._id_buffer or None
        data, event_type = self._data, self._event_type
        self._data, self._event_type = [], ""
        if not data:
            return None
        return SSEMessage(
            event=event_type or "message", data="\n".join(data), id=self.last_event_id, retry=self.retry
        )
