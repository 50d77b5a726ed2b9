"""The floor: a minimal aiohttp pass-through proxy, with no auth, limits, metrics or logs.

It forwards every request to one upstream and relays the answer: a JSON body read whole, an
event stream chunk by chunk as the upstream's bytes arrive. It runs on uvloop with aiohttp's
access log off, like the gateway, so the two differ only by the gateway's own work.

    python -m bench.passthrough --upstream http://127.0.0.1:9001 --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)

# Hop-by-hop fields and those the client library sets itself.
_DROP = frozenset((
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "host", "content-length", "content-encoding", "accept-encoding", "date", "server",
))  # fmt: skip


def _copy(headers: object) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _DROP}  # type: ignore[attr-defined]


async def proxy(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    url = request.app[UPSTREAM] + request.rel_url.raw_path_qs
    async with session.request(request.method, url, data=body, headers=_copy(request.headers)) as up:
        headers = _copy(up.headers)
        if up.content_type != "text/event-stream":
            return web.Response(status=up.status, body=await up.read(), headers=headers)
        response = web.StreamResponse(status=up.status, headers=headers)
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    app[SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    yield
    await app[SESSION].close()


def create_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="upstream root, e.g. http://127.0.0.1:9001")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(create_app(args.upstream), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
