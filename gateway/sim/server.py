"""The simulator's HTTP side: `POST /v1/chat/completions` (JSON and SSE, `stream_options.
include_usage`) answered with the mock upstream's deterministic text at the pace the engine sets,
`GET /metrics`, `GET /health`, `GET /v1/models`.

A request is parsed by the mock's parser (the same 400s, naming `param`), its prompt turned into
words and block ids by `gateway.upstream.blocks`, and its answer length is the `x-mock-tokens`
header when given, else `max_tokens`/`max_completion_tokens`, else 16, cut by `stop` strings as the
mock cuts it; `n` choices decode as one sequence of the longest. `x-mock-status` still forces an
error; the mock's other timing headers are validated and ignored (the engine sets the timing).
A prompt over `max_model_len` words, or one whose prompt and answer need more blocks than the
whole cache, is a 400 (`context_length_exceeded`). A stream sends its headers at once and its
first event (role and first token) when the engine has the first token; the usage's
`prompt_tokens` is the prompt's word count, the simulator's token. A client that goes away frees
its slot and blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.mock.requests import BadMockRequest, Controls, Plan, error_body, forced_error, parse_body
from gateway.mock.text import Token, apply_stop, generate_tokens
from gateway.sim.calibration import SimConfig
from gateway.sim.engine import Engine, SimRequest
from gateway.sim.metrics import SimMetrics
from gateway.upstream.blocks import block_hashes, prompt_words

ENGINE_KEY: Final = web.AppKey("liutong_sim_engine", Engine)
METRICS_KEY: Final = web.AppKey("liutong_sim_metrics", SimMetrics)
CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024
DEFAULT_TOKENS: Final = 16
_DONE: Final = b"data: [DONE]\n\n"


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def _bad(message: str, param: str | None, code: str | None = None) -> web.Response:
    return _json(400, error_body(message, "invalid_request_error", param, code))


def _choices(plan: Plan, count: int) -> list[tuple[list[Token], str]]:
    out = []
    for c in range(plan.n):
        tokens = generate_tokens(plan.model, plan.prompt, count, c)
        cut = apply_stop(tokens, plan.stops) if plan.stops else None
        capped = plan.cap is not None and plan.cap <= count
        out.append((cut, "stop") if cut is not None else (tokens, "length" if capped else "stop"))
    return out


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    try:
        controls = Controls.parse(request.headers)
        body, plan = parse_body(await request.read())
    except BadMockRequest as exc:
        return _bad(exc.message, exc.param)
    if controls.status is not None:
        return _json(controls.status, forced_error(controls.status))
    limit = engine.config.max_model_len
    words = prompt_words(body["messages"], limit + 1)
    if len(words) > limit:
        return _bad(f"the prompt is longer than this server's max_model_len of {limit} tokens", "messages",
                    "context_length_exceeded")  # fmt: skip
    if "x-mock-tokens" in request.headers:
        count = controls.tokens if plan.cap is None else min(controls.tokens, plan.cap)
    else:
        count = plan.cap if plan.cap is not None else DEFAULT_TOKENS
    choices = _choices(plan, count)
    longest = max(len(tokens) for tokens, _ in choices)
    sim = SimRequest(block_hashes(words, block_tokens=engine.config.block_tokens), len(words), max(1, longest))
    if not engine.fits_ever(sim):
        return _bad(f"prompt and answer need {engine.blocks_needed(sim)} KV blocks, the server has "
                    f"{engine.config.kv_blocks}", "messages", "context_length_exceeded")  # fmt: skip
    sim.changed = asyncio.Event()
    completion_id = "chatcmpl-" + os.urandom(12).hex()
    engine.submit(sim)
    try:
        if plan.stream:
            return await _stream(request, sim, plan, choices, completion_id)
        while sim.state != "finished":
            await sim.changed.wait()
            sim.changed.clear()
        return _json(200, orjson.dumps(_completion(plan, choices, completion_id, len(words))))
    except (asyncio.CancelledError, ConnectionResetError):
        engine.abort(sim)
        raise


def _usage(prompt_tokens: int, choices: list[tuple[list[Token], str]]) -> dict[str, int]:
    completion = sum(len(tokens) for tokens, _ in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _completion(plan: Plan, choices: list[tuple[list[Token], str]], completion_id: str, prompt: int) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plan.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(t for t, _ in tokens)},
                "finish_reason": reason,
            }
            for i, (tokens, reason) in enumerate(choices)
        ],
        "usage": _usage(prompt, choices),
    }


async def _stream(
    request: web.Request, sim: SimRequest, plan: Plan, choices: list[tuple[list[Token], str]], completion_id: str
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    base: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": plan.model}  # fmt: skip
    usage_null = b',"usage":null' if plan.include_usage else b""
    head = b"data: " + orjson.dumps(base)[:-1] + b',"choices":[{"index":'
    mid, end = b',"delta":{"content":', b'},"finish_reason":null}]' + usage_null + b"}\n\n"

    def event(choices_json: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {**base, "choices": choices_json, **extra}
        if plan.include_usage and "usage" not in extra:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    assert sim.changed is not None  # type narrowing: set by the handler before submit
    sent = 0
    while True:
        await sim.changed.wait()
        sim.changed.clear()
        ready = sim.generated
        if ready > sent:
            out = bytearray()
            if sent == 0:
                role = {"role": "assistant", "content": ""}
                for i in range(len(choices)):
                    out += event([{"index": i, "delta": role, "finish_reason": None}])
            for k in range(sent, ready):
                for i, (tokens, _) in enumerate(choices):
                    if k < len(tokens):
                        out += head + str(i).encode() + mid + tokens[k][1] + end
            sent = ready
            await resp.write(bytes(out))
        if sim.state == "finished":
            break
    tail = bytearray()
    for i, (_, reason) in enumerate(choices):
        tail += event([{"index": i, "delta": {}, "finish_reason": reason}])
    if plan.include_usage:
        tail += event([], usage=_usage(sim.prompt_tokens, choices))
    await resp.write(bytes(tail) + _DONE)
    await resp.write_eof()
    return resp


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _health(request: web.Request) -> web.Response:
    return _json(200, b'{"status":"ok"}')


async def _models(request: web.Request) -> web.Response:
    name = request.app[ENGINE_KEY].config.model_name
    data = [{"id": name, "object": "model", "created": 1700000000, "owned_by": "liutong-sim"}]
    return _json(200, orjson.dumps({"object": "list", "data": data}))


def create_sim_app(config: SimConfig) -> web.Application:
    """One simulated server; its engine loop runs as a task for the app's lifetime."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    engine = Engine(config)
    app[ENGINE_KEY] = engine
    app[METRICS_KEY] = SimMetrics(engine)

    async def engine_loop(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(engine_loop)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    return app


async def start_sim_upstream(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve a simulator on a socket (port 0 = a free one); the caller awaits `runner.cleanup()`."""
    runner = web.AppRunner(create_sim_app(config), handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


async def _serve(config: SimConfig, host: str, port: int) -> None:
    runner, bound = await start_sim_upstream(config, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    print(f"Liutong sim upstream listening on http://{shown}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run_sim_upstream(config: SimConfig, host: str, port: int) -> None:
    """Run a simulator until SIGINT or SIGTERM (the `liutong-gateway sim-upstream` command)."""
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(config, host, port))
