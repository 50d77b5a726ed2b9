"""Overlapped admission: a request goes upstream while the store checks its limits, when the
store's last answer leaves ample room; the store's verdict still decides what the client gets.

Against a real redis-server and the mock upstream. Another replica spending the key's budget
is played by writing the bucket in Redis directly; a slow store by `CLIENT PAUSE … WRITE`
(scripts that write wait, PING does not, so the store monitor still sees the store up).
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from gateway.store.names import USAGE_STREAM, concurrency_set, key_bucket, limit_tag
from tests.conftest import auth, chat_body

CHAT = "/v1/chat/completions"


async def _requests_seen(gw) -> int:
    return int((await gw.mock_stats())["requests"])


async def _drain_bucket(redis_url: str, key_id: str) -> None:
    """Empty the key's rpm bucket, as if another replica had just spent it."""
    client = aioredis.from_url(redis_url)
    seconds, micros = await client.time()
    await client.hset(key_bucket(limit_tag(key_id, None), key_id, "rpm"),
                      mapping={"level": 0, "ts": seconds * 1000 + micros // 1000})  # fmt: skip
    await client.aclose()


async def _records_and_leases(redis_url: str, key_id: str, *, at_least: int) -> tuple[dict[bytes, dict], int]:
    """The usage records by request id (after waiting up to 5 s for `at_least` of them), and
    how many concurrency leases the key still holds."""
    client = aioredis.from_url(redis_url)
    try:
        for _ in range(50):
            entries = await client.xrange(USAGE_STREAM)
            if len(entries) >= at_least:
                break
            await asyncio.sleep(0.1)
        leases = await client.zcard(concurrency_set(limit_tag(key_id, None), key_id))
    finally:
        await client.aclose()
    return {fields[b"request_id"]: fields for _, fields in entries}, leases


async def _pause_writes(redis_url: str, ms: int) -> None:
    client = aioredis.from_url(redis_url)
    await client.execute_command("CLIENT", "PAUSE", ms, "WRITE")
    await client.aclose()


async def test_only_a_fresh_answer_with_room_lets_a_request_overlap(gateway, http):
    key, record = await gateway.create_key("fresh", rpm=20)
    plan = await gateway.state.plan_for(record)
    limiter = gateway.state.limiter
    assert not limiter.overlappable(plan, 10)  # no answer from the store yet
    for left in range(19, 16, -1):
        async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
            assert resp.status == 200
            assert resp.headers["x-ratelimit-remaining-requests"] == str(left)
    assert limiter.overlappable(plan, 10)
    # Near the limit every request waits for the store: 10 % of 20 must stay free after it.
    for _ in range(15):
        async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
            assert resp.status == 200
    assert not limiter.overlappable(plan, 10)  # 2 left (and a little refill): 2 - 1 < 2
    await asyncio.sleep(1.1)
    key2, record2 = await gateway.create_key("stale", rpm=1000)
    plan2 = await gateway.state.plan_for(record2)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key2)) as resp:
        assert resp.status == 200
    assert limiter.overlappable(plan2, 10)
    await asyncio.sleep(1.1)  # the answer is no longer fresh
    assert not limiter.overlappable(plan2, 10)


async def test_concurrency_near_its_limit_waits_for_the_store(gateway, http):
    key, record = await gateway.create_key("conc", max_concurrent=2)
    plan = await gateway.state.plan_for(record)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 200
    # The answer counted this request in flight: 1 + 1 > 2 × 0.9.
    assert not gateway.state.limiter.overlappable(plan, 10)


async def test_an_overlapped_request_reaches_the_upstream_while_the_store_decides(gateway, http, redis_url):
    key, _ = await gateway.create_key("overlap", rpm=60)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 200
    await _pause_writes(redis_url, 300)  # under the 0.5 s store timeout
    call = asyncio.create_task(http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)))
    await asyncio.sleep(0.15)
    assert await _requests_seen(gateway) == 2  # forwarded while its acquire waits at the store
    async with await call as resp:
        assert resp.status == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == "58"  # the store's own answer
        await resp.read()


async def test_with_overlap_off_every_request_waits_for_the_store(make_gateway, http, redis_url):
    gateway = await make_gateway(admission_overlap=False)
    key, _ = await gateway.create_key("serial", rpm=1000)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 200
    await _pause_writes(redis_url, 300)
    call = asyncio.create_task(http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)))
    await asyncio.sleep(0.15)
    assert await _requests_seen(gateway) == 1
    async with await call as resp:
        assert resp.status == 200


async def _denied_after_forwarding(gateway, http, redis_url, stream: bool) -> None:
    key, record = await gateway.create_key("denied", rpm=20)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 200
        await resp.read()
    assert gateway.state.limiter.overlappable(await gateway.state.plan_for(record), 10)
    await _drain_bucket(redis_url, record.key_id)
    slow = {"x-mock-first-event-delay-ms": "3000"} if stream else {"x-mock-delay-ms": "3000"}
    started = time.monotonic()
    body = chat_body(max_tokens=4, stream=stream)
    async with http.post(gateway.url + CHAT, json=body, headers={**auth(key), **slow}) as resp:
        assert resp.status == 429
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(resp.headers["retry-after-ms"]) <= 3000
        assert resp.headers["Retry-After"] in ("1", "2", "3")
    # The denial stopped the wait for the slow upstream (3 s) at once.
    assert time.monotonic() - started < 2.0
    assert await _requests_seen(gateway) == 2  # the upstream saw it, the client got a 429
    await gateway.settled()
    records, leases = await _records_and_leases(redis_url, record.key_id, at_least=1)
    assert len(records) == 1 and leases == 0  # no usage record and no lease for the denied request
    for _ in range(50):  # the upstream's connection was dropped, so the mock stops its work
        stats = await gateway.mock_stats()
        if stats["active"] == 0:
            break
        await asyncio.sleep(0.05)
    assert stats["active"] == 0


async def test_a_json_request_denied_after_forwarding_gets_a_429_and_no_record(gateway, http, redis_url):
    await _denied_after_forwarding(gateway, http, redis_url, stream=False)


async def test_a_stream_denied_after_forwarding_gets_a_429_before_any_event(gateway, http, redis_url):
    await _denied_after_forwarding(gateway, http, redis_url, stream=True)


async def test_a_store_lost_after_forwarding_still_serves_and_records_the_request(make_gateway, http, redis_url):
    gateway = await make_gateway(store_timeout=0.3)
    key, record = await gateway.create_key("lost", rpm=1000)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 200
    await _pause_writes(redis_url, 1500)
    # Forwarded before the store stopped answering: served on the store's last answer.
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == "999"
        await resp.read()
    # The next request waits for the store first, and fail_closed refuses it.
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "store_unavailable"
    assert await _requests_seen(gateway) == 2
    await asyncio.sleep(1.5)  # the pause ends; the writer settles what waited
    await gateway.settled(timeout=15)
    records, leases = await _records_and_leases(redis_url, record.key_id, at_least=2)
    assert len(records) == 2 and leases == 0  # both requests the upstream answered


async def test_a_client_gone_before_the_verdict_is_settled_when_it_arrives(make_gateway, http, redis_url):
    gateway = await make_gateway(store_timeout=3.0)
    key, record = await gateway.create_key("leaver", rpm=60)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 200
    await _pause_writes(redis_url, 800)
    headers = {**auth(key), "x-request-id": "req-left-early"}
    call = asyncio.create_task(http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=headers))
    await asyncio.sleep(0.3)  # forwarded and answered upstream; the verdict waits at the store
    assert await _requests_seen(gateway) == 2
    call.cancel()  # the client leaves
    await asyncio.sleep(1.0)  # the pause ends, the store admits it, the late settlement runs
    await gateway.settled()
    records, leases = await _records_and_leases(redis_url, record.key_id, at_least=2)
    assert records[b"req-left-early"][b"status"] == b"499"
    assert leases == 0  # released by the settlement, not left to expire


async def test_new_limits_wait_for_the_store_and_a_refreshed_record_does_not(gateway, http):
    key, record = await gateway.create_key("changing", rpm=100)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 200
    state, limiter = gateway.state, gateway.state.limiter
    plan = await state.plan_for(record)
    assert limiter.overlappable(plan, 10)
    # The same limits read again (the key cache refreshes records): the same plan, still overlappable.
    same = await state.keys.get(record.key_id)
    assert same is not record and await state.plan_for(same) is plan
    # New limits: what the store said about the old ones does not count.
    changed = await state.keys.update(record.key_id, rpm=50)
    new_plan = await state.plan_for(changed)
    assert new_plan != plan
    assert not limiter.overlappable(new_plan, 10)


async def test_an_overlapped_request_after_a_script_flush_reloads_and_is_admitted(gateway, http, redis_url):
    key, _ = await gateway.create_key("flushed", rpm=60)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 200
    client = aioredis.from_url(redis_url)
    try:
        await client.script_flush()
        async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
            assert resp.status == 200
            assert resp.headers["x-ratelimit-remaining-requests"] == "58"  # the store's answer, not a fallback
        sha = gateway.state.store.scripts.acquire.sha
        assert (await client.script_exists(sha)) == [True]
    finally:
        await client.aclose()


def test_a_provisional_grant_without_an_answer_carries_no_limit_headers():
    from gateway.limits.buckets import Bucket, Plan, _Seen

    plan = Plan((Bucket("b:rpm", "requests", "key", 60),), "b:inflight", 0)
    seen = _Seen(plan)
    assert seen.provisional("req-1", 5).headers == {}
    seen.answered([1, 0, 0, 1, 41, 19000])
    grant = seen.provisional("req-2", 5)
    assert grant.plan is plan and grant.reserved_tokens == 5
    assert grant.headers["x-ratelimit-remaining-requests"] == "41"


async def test_an_upstream_error_on_an_overlapped_request_carries_the_store_headers(gateway, http):
    key, _ = await gateway.create_key("failing", rpm=60)
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=auth(key)) as resp:
        assert resp.status == 200
    # The mock closes the connection without an answer: the gateway's own 502.
    headers = {**auth(key), "x-mock-drop-after": "0"}
    async with http.post(gateway.url + CHAT, json=chat_body(max_tokens=4), headers=headers) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"
        assert resp.headers["x-ratelimit-remaining-requests"] == "58"
