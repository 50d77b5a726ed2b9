"""Rate limits against a real redis-server: exact admission, headers, reconciliation, leases."""

from __future__ import annotations

import asyncio
import math

from gateway.store.names import concurrency_set, limit_tag
from tests.conftest import auth, chat_body

CHAT = "/v1/chat/completions"


async def test_rpm_admits_exactly_the_limit_under_a_concurrent_burst(gateway, http):
    key, record = await gateway.create_key("burst", rpm=30)

    async def call() -> tuple[int, dict[str, str], dict]:
        async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
            return resp.status, dict(resp.headers), await resp.json()

    results = await asyncio.gather(*(call() for _ in range(50)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 30
    assert statuses.count(429) == 20
    for status, headers, body in results:
        if status != 429:
            continue
        assert body["error"]["type"] == "requests"
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert "requests per minute" in body["error"]["message"] and "key" in body["error"]["message"]
        # 30 rpm refills one request every 2 s: the wait comes from the bucket, not a window.
        retry_ms = int(headers["retry-after-ms"])
        assert 1 <= retry_ms <= 2000
        assert headers["Retry-After"] == str(max(1, math.ceil(retry_ms / 1000)))
        assert headers["x-ratelimit-limit-requests"] == "30"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        for name in ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
                     "x-ratelimit-reset-requests"):  # fmt: skip
            assert name in headers
        assert "x-should-retry" not in headers


async def test_successful_responses_carry_the_six_headers(gateway, http):
    key, _ = await gateway.create_key("hdr", rpm=100, tpm=10_000)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=10), headers=auth(key)) as resp:
        assert resp.status == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "100"
        assert resp.headers["x-ratelimit-remaining-requests"] == "99"
        assert resp.headers["x-ratelimit-reset-requests"] == "600ms"
        assert resp.headers["x-ratelimit-limit-tokens"] == "10000"
        # reserved: prompt estimate (2 + 4 + ⌈6/4⌉ = 8) + max_tokens 10
        assert resp.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 18)
        assert resp.headers["x-ratelimit-reset-tokens"] == "108ms"
    async with http.post(gateway.url + CHAT, json=chat_body(stream=True), headers=auth(key)) as resp:
        assert resp.status == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "100"
        assert "x-ratelimit-remaining-tokens" in resp.headers
        await resp.read()


async def test_tpm_reservation_is_reconciled_with_real_usage(gateway, http):
    # 600 tpm refills 10 tokens per second; each step below takes well under 100 ms.
    key, _ = await gateway.create_key("tpm", tpm=600)
    headers = {**auth(key), "x-mock-tokens": "5"}
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=50), headers=headers) as resp:
        assert resp.status == 200
        usage = (await resp.json())["usage"]
        first_remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
    assert usage == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}
    assert first_remaining == 600 - (8 + 50)
    await gateway.settled()
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=50), headers=headers) as resp:
        assert resp.status == 200
        second_remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
    # After the refund only the 13 real tokens stay charged, then the new reservation of 58.
    expected = 600 - 13 - 58
    assert expected <= second_remaining <= expected + 3


async def test_usage_beyond_the_reservation_is_charged(gateway):
    _, record = await gateway.create_key("charge", tpm=6000)
    plan = await gateway.state.plan_for(record)
    grant = await gateway.state.limiter.acquire(plan, "req-charge", 10)
    keys, args = gateway.state.limiter.finish_call(grant, 50)
    redis = gateway.state.store.redis
    assert await gateway.state.store.scripts.finish(keys=keys, args=args) == 1
    # A retried settlement changes nothing: the lease is gone.
    assert await gateway.state.store.scripts.finish(keys=keys, args=args) == 0
    tpm_key = next(b.redis_key for b in plan.buckets if b.kind == "tokens")
    level = float(await redis.hget(tpm_key, "level"))
    assert 6000 - 50 <= level <= 6000 - 50 + 2


async def test_a_request_that_can_never_fit_says_do_not_retry(gateway, http):
    key, _ = await gateway.create_key("small", tpm=100)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=500), headers=auth(key)) as resp:
        assert resp.status == 429
        body = await resp.json()
        assert resp.headers["x-should-retry"] == "false"
        assert int(resp.headers["Retry-After"]) >= 1
        assert "retry-after-ms" in resp.headers
    assert body["error"]["type"] == "tokens"
    assert body["error"]["code"] == "rate_limit_exceeded"
    # Without an explicit max_tokens the default allowance is capped to the bucket: it fits.
    async with http.post(gateway.url + CHAT, json=chat_body(), headers=auth(key)) as resp:
        assert resp.status == 200


async def test_a_denied_request_debits_no_bucket(gateway, http):
    key, record = await gateway.create_key("both", rpm=10, tpm=100)
    slow = {**auth(key), "x-mock-interval-ms": "100", "x-mock-tokens": "5"}
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=80, stream=True), headers=slow) as held:
        assert held.status == 200
        assert held.headers["x-ratelimit-remaining-requests"] == "9"
        assert held.headers["x-ratelimit-remaining-tokens"] == "12"
        # The stream still holds its 88 reserved tokens: this one cannot fit now.
        async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=80), headers=auth(key)) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"]["type"] == "tokens"
            assert int(resp.headers["retry-after-ms"]) > 0
            assert resp.headers["x-ratelimit-remaining-requests"] == "9"
        await held.read()
    rpm_key = next(b.redis_key for b in (await gateway.state.plan_for(record)).buckets if b.kind == "requests")
    assert float(await gateway.state.store.redis.hget(rpm_key, "level")) < 9.5


async def test_concurrency_limit_and_release(gateway, http):
    key, record = await gateway.create_key("conc", max_concurrent=2)
    slow = {**auth(key), "x-mock-interval-ms": "100", "x-mock-tokens": "5"}
    streams = [http.post(gateway.url + CHAT, json=chat_body(stream=True), headers=slow) for _ in range(2)]
    opened = [await s.__aenter__() for s in streams]
    assert [r.status for r in opened] == [200, 200]
    async with http.post(gateway.url + CHAT, json=chat_body(), headers=auth(key)) as resp:
        assert resp.status == 429
        body = await resp.json()
        assert body["error"]["type"] == "concurrency"
        assert resp.headers["Retry-After"] == "1"
    for resp, ctx in zip(opened, streams, strict=True):
        await resp.read()
        await ctx.__aexit__(None, None, None)
    await gateway.settled()
    members = await gateway.state.store.redis.zcard(concurrency_set(limit_tag(record.key_id, None), record.key_id))
    assert members == 0
    async with http.post(gateway.url + CHAT, json=chat_body(), headers=auth(key)) as resp:
        assert resp.status == 200


async def test_concurrency_slot_is_released_when_the_upstream_fails(gateway, http):
    key, record = await gateway.create_key("fail", max_concurrent=1)
    for _ in range(3):
        async with http.post(gateway.url + CHAT, json=chat_body(),
                             headers={**auth(key), "x-mock-status": "500"}) as resp:  # fmt: skip
            assert resp.status == 500
        await gateway.settled()
    async with http.post(gateway.url + CHAT, json=chat_body(), headers=auth(key)) as resp:
        assert resp.status == 200


async def test_limits_are_shared_by_two_replicas(make_gateway, http):
    first = await make_gateway()
    second = await make_gateway()
    key, _ = await first.create_key("shared", rpm=20)

    async def call(url: str) -> int:
        async with http.post(url + CHAT, json=chat_body(), headers=auth(key)) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(call(gw.url) for gw in (first, second) for _ in range(20)))
    assert statuses.count(200) == 20
    assert statuses.count(429) == 20
