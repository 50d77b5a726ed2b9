"""EventPipe on its own: what reaches the client transport, and which outcome the handler hears."""

from __future__ import annotations

import asyncio

from gateway.api.relay import CLIENT_GONE, CUT, DONE, IDLE, PAUSED, EventPipe
from gateway.api.sse import SSERelay


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 16_384, 65_536

    def is_closing(self) -> bool:
        return self.closing


class FakeUpstream:
    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def _pipe(transport: FakeTransport, upstream: FakeUpstream, *, chunked: bool = True, first: float = 5, idle: float = 5) -> EventPipe:
    return EventPipe(transport, chunked, SSERelay(hide_usage=False), upstream, first, idle)  # type: ignore[arg-type]


async def test_whole_events_go_out_as_chunks_and_the_end_is_heard():
    transport, upstream = FakeTransport(), FakeUpstream()
    pipe = _pipe(transport, upstream)
    pipe.body(b'data: {"a":1}\n\ndata: {"b"')
    pipe.body(b":2}\n\n")
    pipe.end(None)
    assert await pipe.wait() == DONE
    pipe.close()
    assert transport.written == [b'f\r\ndata: {"a":1}\n\n\r\n', b'f\r\ndata: {"b":2}\n\n\r\n']


async def test_unchunked_for_http_1_0_clients():
    transport, upstream = FakeTransport(), FakeUpstream()
    pipe = _pipe(transport, upstream, chunked=False)
    pipe.body(b"data: x\n\n")
    pipe.close()
    assert transport.written == [b"data: x\n\n"]


async def test_a_full_client_buffer_pauses_the_upstream_until_resumed():
    transport, upstream = FakeTransport(), FakeUpstream()
    pipe = _pipe(transport, upstream)
    pipe.body(b"data: " + b"x" * 70_000 + b"\n\n")
    assert upstream.paused
    pipe.body(b"data: late\n\n")  # already in flight when the pause came: still relayed, in order
    assert await pipe.wait() == PAUSED
    assert transport.written[-1].endswith(b"data: late\n\n\r\n")
    pipe.resume()
    assert not upstream.paused
    pipe.end(ValueError("cut"))
    assert await pipe.wait() == CUT
    pipe.close()


async def test_time_waiting_for_the_client_is_not_the_upstreams_idle_time():
    transport, upstream = FakeTransport(), FakeUpstream()
    pipe = _pipe(transport, upstream, first=0.2, idle=0.2)
    pipe.body(b"data: " + b"x" * 70_000 + b"\n\n")  # the client is slow: paused
    assert await pipe.wait() == PAUSED
    await asyncio.sleep(0.5)  # longer than the idle deadline, but the upstream is paused by us
    pipe.resume()
    waiting = asyncio.ensure_future(pipe.wait())
    await asyncio.sleep(0.1)
    assert not waiting.done()  # 0.1 s since the resume: within the deadline
    assert await asyncio.wait_for(waiting, 1) == IDLE  # then nothing came for 0.2 s
    pipe.close()


async def test_first_byte_then_idle_deadlines():
    transport, upstream = FakeTransport(), FakeUpstream()
    pipe = _pipe(transport, upstream, first=0.1, idle=5)
    assert await asyncio.wait_for(pipe.wait(), 1) == IDLE
    pipe.close()

    pipe = _pipe(transport, upstream, first=0.1, idle=0.3)
    await asyncio.sleep(0.05)
    pipe.body(b"data: 1\n\n")  # from now on the idle deadline
    waiting = asyncio.ensure_future(pipe.wait())
    await asyncio.sleep(0.15)
    assert not waiting.done()
    assert await asyncio.wait_for(waiting, 1) == IDLE
    pipe.close()


async def test_a_closed_client_ends_the_relay_and_the_first_outcome_stands():
    transport, upstream = FakeTransport(), FakeUpstream()
    pipe = _pipe(transport, upstream)
    transport.closing = True
    pipe.body(b"data: 1\n\n")
    pipe.end(None)
    assert await pipe.wait() == CLIENT_GONE
    assert transport.written == []
    pipe.close()


def test_what_include_usage_added_is_hidden_from_a_client_that_did_not_ask():
    events = (
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n'
        b'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": "b"}}], "usage": null}\n\n'
        b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
        b"data: [DONE]\n\n"
    )
    hidden = SSERelay(hide_usage=True)
    assert hidden.feed(events) == (
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        b'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": "b"}}]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert hidden.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert hidden.content_events == 2 and hidden.done

    shown = SSERelay(hide_usage=False)
    assert shown.feed(events) == events
    assert shown.usage == hidden.usage
