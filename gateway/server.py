"""Run the gateway: listeners, demo mode, signals and the drain on SIGTERM.

`serve(settings)` starts the main listener (and the admin one when configured) on uvloop.
With no models configured it is in demo mode: the built-in mock upstream starts in-process on
a free loopback port and serves the three seed models. On the embedded store, where no other
process can create keys, a demo key is created and printed once to stderr.
On SIGTERM or SIGINT `/readyz` turns 503 at once, new requests get 503 `draining`, in-flight
requests get up to `drain_grace_seconds` to finish, pending usage records are flushed, and the
process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import structlog
from aiohttp import web

from gateway.app import create_admin_app, create_app
from gateway.config import Settings, with_demo_upstream
from gateway.logs import configure_logging, flush_logs
from gateway.state import STATE

log = structlog.get_logger("liutong.server")


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # not available on this platform: the standard loop works too
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(settings: Settings) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if not settings.models:
            from gateway.mock_upstream import start_mock_upstream

            mock_runner, mock_port = await start_mock_upstream("127.0.0.1", 0)
            stack.push_async_callback(mock_runner.cleanup)
            settings = with_demo_upstream(settings, f"http://127.0.0.1:{mock_port}")
            log.warning("demo_mode", message="No models configured: serving the seed models from the built-in "
                        "mock upstream.", upstream=f"http://127.0.0.1:{mock_port}")  # fmt: skip

        app = create_app(settings)
        state = app[STATE]
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, settings.listen.host, settings.listen.port, reuse_address=True).start()
        if settings.admin_listen is not None:
            admin_runner = web.AppRunner(create_admin_app(app), access_log=None)
            await admin_runner.setup()
            stack.push_async_callback(admin_runner.cleanup)
            await web.TCPSite(admin_runner, settings.admin_listen.host, settings.admin_listen.port).start()

        if state.store.embedded:
            plaintext, _ = await state.keys.create("demo")
            print(
                f"\nLiutong Gateway is listening on http://{settings.listen.host}:{settings.listen.port}\n"
                f"Demo key (embedded store; shown once, gone on restart): {plaintext}\n",
                file=sys.stderr,
                flush=True,
            )
        log.info("listening", host=settings.listen.host, port=settings.listen.port,
                 models=sorted(settings.models), store="embedded" if state.store.embedded else "redis")  # fmt: skip

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

        log.info("draining", inflight=state.inflight, grace_seconds=settings.drain_grace_seconds)
        state.draining = True
        deadline = loop.time() + settings.drain_grace_seconds
        while state.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
    log.info("stopped")


def serve(settings: Settings) -> int:
    configure_logging(settings.log_level)
    install_uvloop()
    try:
        asyncio.run(_serve(settings))
    except OSError as exc:
        log.error("cannot_listen", error=str(exc))
        return 1
    finally:
        flush_logs()
    return 0
