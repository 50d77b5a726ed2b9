"""Server-sent events as bytes: cut at event boundaries, look inside only the usage chunk.

`SSERelay.feed(chunk)` returns the bytes that may go to the client now: every complete event
received so far, unchanged and in order (a partial event waits for its end, nothing else
does). JSON is never re-encoded; an event is parsed only when it mentions `"usage"` with a
value, to read the upstream's token counts. When the gateway asked for usage on a client's
behalf (the client did not), what that adds is taken out again: the usage-only chunk
(`"choices": []`) and the `"usage": null` field that servers put in every other chunk.

Estimator when the upstream reports no usage (cut stream, server without `include_usage`):
completion tokens = the number of relayed delta events with non-empty `"content"` (servers
stream about one token per event); such records are marked `usage_source: estimated`.
"""

from __future__ import annotations

from typing import Any

import orjson

_BOUNDARY = b"\n\n"
# A content delta and an empty one, as compact JSON and as JSON with spaces (Python's default).
_CONTENTS = ((b'"content":"', b'"content":""'), (b'"content": "', b'"content": ""'))
_USAGE = b'"usage"'
_NULL_USAGE = (b'"usage":null', b'"usage": null')
_HIDDEN_NULLS = (b',"usage":null', b', "usage": null')
_DONE = b"data: [DONE]"


class SSERelay:
    __slots__ = ("_buffer", "_hide_usage", "usage", "content_events", "done")

    def __init__(self, *, hide_usage: bool) -> None:
        self._buffer = b""
        self._hide_usage = hide_usage
        self.usage: dict[str, Any] | None = None
        self.content_events = 0
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self._buffer or b"\r" in chunk or not chunk.endswith(_BOUNDARY):
            complete = self._complete(chunk)
            if not complete:
                return b""
        else:  # the usual case: whole events, ending on an event boundary
            complete = chunk
        for content, empty in _CONTENTS:
            contents = complete.count(content)
            if contents:
                self.content_events += contents - complete.count(empty)
        if _DONE in complete:
            self.done = True
        mentions = complete.count(_USAGE)
        if not mentions:
            return complete
        nulls = complete.count(_NULL_USAGE[0]) + complete.count(_NULL_USAGE[1])
        if mentions > nulls:
            complete = self._take_usage(complete)
        if nulls and self._hide_usage:  # the `"usage": null` that include_usage adds to every chunk
            complete = complete.replace(_HIDDEN_NULLS[0], b"").replace(_HIDDEN_NULLS[1], b"")
        return complete

    def _complete(self, chunk: bytes) -> bytes:
        """The complete events among what is buffered and `chunk`; the rest stays buffered."""
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        data = self._buffer + chunk if self._buffer else chunk
        end = data.rfind(_BOUNDARY)
        if end < 0:
            self._buffer = data
            return b""
        end += 2
        complete, self._buffer = data[:end], data[end:]
        return complete

    def rest(self) -> bytes:
        """What is left when the upstream ends: an event without its final blank line."""
        rest, self._buffer = self._buffer, b""
        return rest

    def _take_usage(self, complete: bytes) -> bytes:
        kept: list[bytes] = []
        for event in complete.split(_BOUNDARY)[:-1]:
            if _USAGE in event and not any(null in event for null in _NULL_USAGE):
                parsed = _parse_data(event)
                if parsed is not None and isinstance(parsed.get("usage"), dict):
                    self.usage = parsed["usage"]
                    if self._hide_usage and parsed.get("choices") == []:
                        continue
            kept.append(event + _BOUNDARY)
        return b"".join(kept)


def _parse_data(event: bytes) -> dict[str, Any] | None:
    payload = b"\n".join(
        line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    )
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None
