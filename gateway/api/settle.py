"""How a finished request is counted: its token counts (the upstream's usage, else the
gateway's estimate), the tpm reconciliation and lease release, and its usage record, handed to
the usage writer as one settlement."""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.api.sse import SSERelay
from gateway.api.validation import ChatRequest
from gateway.limits.buckets import Grant
from gateway.state import AppState, Exchange
from gateway.usage.pricing import cached_tokens
from gateway.usage.records import Settlement, UsageRecord


def json_usage(payload: bytes) -> tuple[dict[str, Any] | None, int | None]:
    """The upstream's usage block, and ⌈characters / 4⌉ of the replies for when it has none."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    usage = body.get("usage")
    if isinstance(usage, dict):
        return usage, None
    chars = 0
    for choice in body.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
    return None, (chars + 3) // 4


def _count(usage: dict[str, Any], name: str) -> int | None:
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def settle(
    state: AppState,
    ex: Exchange,
    chat: ChatRequest,
    grant: Grant,
    reached: bool,
    status: int,
    usage: dict[str, Any] | None,
    relay: SSERelay | None,
    json_estimate: int | None,
) -> None:
    prompt = completion = None
    if usage is not None:
        prompt, completion = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
    if prompt is not None and completion is not None:
        source = "upstream"
    elif relay is not None:  # the upstream took the stream: its prompt, and each content event relayed
        source, prompt, completion = "estimated", chat.prompt_estimate, relay.content_events
    elif json_estimate is not None:
        source, prompt, completion = "estimated", chat.prompt_estimate, json_estimate
    elif reached and status == 499:  # the client left while the upstream worked on the prompt
        source, prompt, completion = "estimated", chat.prompt_estimate, 0
    else:  # an upstream error or nothing came back: nothing generated that anyone received
        source, prompt, completion = "estimated", 0, 0
    ex.prompt_tokens, ex.completion_tokens, ex.usage_source = prompt, completion, source
    keys, args = state.limiter.finish_call(grant, prompt + completion)
    record = None
    if reached:
        cached = cached_tokens(usage) if source == "upstream" else 0
        price = state.settings.pricing.price(chat.model, ex.started_wall)
        record = UsageRecord(
            request_id=ex.request_id,
            key_id=ex.key_id or "",
            org=ex.org,
            model=chat.model,
            status=status,
            stream=chat.stream,
            prompt_tokens=prompt,
            completion_tokens=completion,
            usage_source=source,
            started_at=ex.started_wall,
            duration_ms=int((time.perf_counter() - ex.started) * 1000),
            cached_tokens=cached,
            cost_micros=0 if price is None else price.cost(prompt, completion, cached),
            currency="" if price is None else state.settings.pricing.currency,
            price_id="" if price is None else price.price_id,
        )
    state.usage.submit(Settlement(keys, args, record))
