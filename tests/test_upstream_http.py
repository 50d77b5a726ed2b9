"""The upstream HTTP/1.1 client against raw servers: framing, keep-alive, stale connections, errors."""

from __future__ import annotations

import asyncio
import gc
import gzip

import pytest

from gateway.upstream import client as upstream_http
from gateway.upstream.client import Target, UpstreamBroken, UpstreamClient, UpstreamConnectError, request_head
from tests.raw_server import RawServer


def reply(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b\r\n%b" % (
        len(body), b"".join(e + b"\r\n" for e in extra), body)  # fmt: skip


async def test_connections_are_kept_alive_and_reused():
    async def answer(reader, writer, number):
        writer.write(reply(b'{"ok":true}'))

    client = UpstreamClient()
    async with RawServer(answer) as server:
        for _ in range(3):
            response = await client.post(server.target, b"{}", {"X-Test": "1"})
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json"
            assert await response.read() == b'{"ok":true}'
        assert server.connections == 1
        assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nX-Test: 1\r\n" in server.requests[0] and server.requests[0].endswith(b"\r\n\r\n{}")
    await client.close()


async def test_a_pooled_connection_the_server_closed_is_replaced_without_an_error():
    async def answer(reader, writer, number):
        if len(server.requests) == 2:  # the second request, on the kept-alive connection: close, no answer
            writer.transport.abort()
            return
        writer.write(reply(b"answer %d" % number))

    client = UpstreamClient()
    async with RawServer(answer) as server:
        assert await (await client.post(server.target, b"1", {})).read() == b"answer 1"
        assert await (await client.post(server.target, b"2", {})).read() == b"answer 2"
        assert server.connections == 2 and len(server.requests) == 3  # the second was sent twice
    await client.close()


async def test_a_fresh_connection_closed_before_an_answer_is_an_error_not_a_retry():
    async def answer(reader, writer, number):
        writer.transport.abort()

    client = UpstreamClient()
    async with RawServer(answer) as server:
        with pytest.raises(UpstreamBroken):
            await client.post(server.target, b"{}", {})
        assert len(server.requests) == 1
    await client.close()


@pytest.mark.parametrize("piece", [1, 7, 10_000])
async def test_chunked_bodies_are_decoded_however_they_are_split(piece):
    events = [b"data: {\"n\": %d}\n\n" % i for i in range(50)]
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw += b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"

    async def answer(reader, writer, number):
        for i in range(0, len(raw), piece):
            writer.write(raw[i : i + piece])
            await writer.drain()

    client = UpstreamClient()
    async with RawServer(answer) as server:
        response = await client.post(server.target, b"{}", {})
        assert response.content_type == "text/event-stream"
        got: list[bytes] = []
        ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        response.deliver(got.append, ended.set_result)
        assert await asyncio.wait_for(ended, 5) is None
        assert b"".join(got) == b"".join(events)
        # the connection went back to the pool: the next request reuses it
        await (await client.post(server.target, b"{}", {})).read()
        assert server.connections == 1
    await client.close()


async def test_bodies_ended_by_the_close_and_gzip_bodies():
    async def answer(reader, writer, number):
        if number == 1:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + b"x" * 100_000)
            writer.transport.close()
        else:
            packed = gzip.compress(b"hello " * 1000)
            writer.write(reply(packed, b"Content-Encoding: gzip"))

    client = UpstreamClient()
    async with RawServer(answer) as server:
        assert await (await client.post(server.target, b"{}", {})).read() == b"x" * 100_000
        assert await (await client.post(server.target, b"{}", {})).read() == b"hello " * 1000
    await client.close()


async def test_a_body_cut_short_is_an_error():
    async def answer(reader, writer, number):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.transport.abort()

    client = UpstreamClient()
    async with RawServer(answer) as server:
        response = await client.post(server.target, b"{}", {})
        with pytest.raises(UpstreamBroken):
            await response.read()
    await client.close()


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH_9.2\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx",
                                     b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"y" * 70_000 + b"\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\n" + b"X-Endless: " + b"y" * 200_000])  # fmt: skip
async def test_an_answer_that_is_not_http_is_an_error(garbage):
    async def answer(reader, writer, number):
        writer.write(garbage)

    client = UpstreamClient()
    async with RawServer(answer) as server:
        with pytest.raises(UpstreamBroken):
            await client.post(server.target, b"{}", {})
    await client.close()


async def test_interim_answers_are_skipped():
    async def answer(reader, writer, number):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b"final"))

    client = UpstreamClient()
    async with RawServer(answer) as server:
        response = await client.post(server.target, b"{}", {})
        assert response.status == 200 and await response.read() == b"final"
    await client.close()


async def test_refused_connections_and_connection_close():
    client = UpstreamClient()
    async with RawServer(lambda r, w, n: asyncio.sleep(0)) as server:
        target = server.target
    with pytest.raises(UpstreamConnectError):
        await client.post(target, b"{}", {})

    async def answer(reader, writer, number):
        writer.write(reply(b"bye", b"Connection: close"))

    async with RawServer(answer) as server:
        await (await client.post(server.target, b"{}", {})).read()
        await asyncio.sleep(0.05)
        assert client.idle_connections() == 0
    await client.close()


async def test_a_cancelled_request_does_not_leave_its_connection_for_reuse():
    async def answer(reader, writer, number):
        if number == 1:
            await asyncio.sleep(5)
        writer.write(reply(b"ok"))

    client = UpstreamClient()
    async with RawServer(answer) as server:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.post(server.target, b"{}", {})
        assert await (await client.post(server.target, b"{}", {})).read() == b"ok"
        assert server.connections == 2
    await client.close()


async def test_idle_connections_are_closed_after_the_keepalive(monkeypatch):
    monkeypatch.setattr(upstream_http, "KEEPALIVE_SECONDS", 0.2)

    async def answer(reader, writer, number):
        writer.write(reply(b"ok"))

    client = UpstreamClient()
    async with RawServer(answer) as server:
        await (await client.post(server.target, b"{}", {})).read()
        assert client.idle_connections() == 1
        await asyncio.sleep(0.5)
        assert client.idle_connections() == 0
    await client.close()


def test_headers_with_line_breaks_are_never_sent():
    target = Target("http://upstream:9000/base/v1/chat/completions")
    head = request_head(target, {"Authorization": "Bearer k"}, 2)
    assert head == b"POST /base/v1/chat/completions HTTP/1.1\r\nHost: upstream:9000\r\nContent-Length: 2\r\nAuthorization: Bearer k\r\n\r\n"
    with pytest.raises(ValueError):
        request_head(target, {"X-Evil": "a\r\nHost: elsewhere"}, 2)
    with pytest.raises(ValueError):
        request_head(target, {"X-Evil\r\nHost": "elsewhere"}, 2)


async def test_requests_leave_no_reference_cycles_for_the_garbage_collector():
    """A cycle per request would make the collector's full passes, and their pauses, frequent."""
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"

    async def answer(reader, writer, number):
        writer.write(raw)

    client = UpstreamClient()
    async with RawServer(answer) as server:
        await (await client.post(server.target, b"{}", {})).read()
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                response = await client.post(server.target, b"{}", {})
                await response.read()
                response.close()
                response = await client.post(server.target, b"{}", {})
                ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
                response.deliver(lambda piece: None, ended.set_result)
                await ended
                response.close()
            assert gc.collect() == 0
        finally:
            gc.enable()
    await client.close()


def _self_signed(tmp_path) -> tuple[str, str]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return str(cert_file), str(key_file)


async def test_https_upstreams_are_verified(tmp_path):
    import ssl

    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        writer.write(reply(b"over tls"))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    target = Target(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions")
    async with server:
        trusting = UpstreamClient(ssl.create_default_context(cafile=cert))
        assert await (await trusting.post(target, b"{}", {})).read() == b"over tls"
        await trusting.close()
        default = UpstreamClient()  # the system's CAs: this certificate is not trusted
        with pytest.raises(UpstreamConnectError):
            await default.post(target, b"{}", {})
        await default.close()


async def test_a_body_read_whole_is_bounded(monkeypatch):
    monkeypatch.setattr(upstream_http, "MAX_READ_BYTES", 100_000)

    async def answer(reader, writer, number):
        writer.write(reply(b"z" * 150_000))

    client = UpstreamClient()
    async with RawServer(answer) as server:
        response = await client.post(server.target, b"{}", {})
        with pytest.raises(UpstreamBroken):
            await response.read()
    await client.close()
