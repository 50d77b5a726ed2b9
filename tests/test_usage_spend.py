"""Spend on usage records (CONTRACT §8): the gateway prices each record at settlement from its
own tokens (in-process gateway, real `redis-server`, the mock upstream); aggregates, `usage
export` and `usage summary` carry the cost; a price change at midnight never reaches back."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from datetime import UTC, datetime

import aiohttp
import orjson

from gateway.store import names
from gateway.usage.pricing import parse_pricing
from gateway.usage.records import Settlement, UsageRecord
from gateway.usage.writer import UsageWriter
from tests.conftest import GatewayFactory, chat_body, gateway_settings
from tests.test_cli import ok, run_cli
from tests.test_usage_cli import store  # noqa: F401
from tests.test_usage_gateway import post, records

PRICES = {"currency": "EUR", "models": {"crimson-falcon-4": [
    {"effective_from": "2020-01-01", "prompt": "2.50", "completion": "10.00"},
]}}  # fmt: skip


async def test_the_gateway_prices_every_record(
    make_gateway: GatewayFactory, mock_upstream: str, redis_url: str, http: aiohttp.ClientSession
) -> None:
    pricing = parse_pricing(PRICES)
    gateway = await make_gateway(replace(gateway_settings(mock_upstream, redis_url), pricing=pricing))
    key, key_record = await gateway.create_key("spender")
    key_id = key_record.key_id
    body = chat_body(messages=[{"role": "user", "content": "Count me, exactly."}])
    await post(http, gateway, key, "json", body, tokens="7")
    await post(http, gateway, key, "stream", {**body, "stream": True}, tokens="9")
    await post(http, gateway, key, "estimated", {**body, "stream": True}, tokens="9", no_usage="1")
    await post(http, gateway, key, "unpriced", {**body, "model": "indigo-owl-4"}, tokens="5")
    got = await records(gateway)
    for rid in ("json", "stream", "estimated"):
        rec = got[rid]
        want = -(-(rec.prompt_tokens * 2_500_000 + rec.completion_tokens * 10_000_000) // 1_000_000)
        assert (rec.cost_micros, rec.currency, rec.price_id) == (want, "EUR", "crimson-falcon-4@2020-01-01"), rid
        assert rec.cost_micros > 0 and isinstance(rec.cost_micros, int)
    # 11 prompt tokens × 2.50 + 7 completion tokens × 10.00 per million = 97.5 micro-units, rounded up.
    assert (got["json"].prompt_tokens, got["json"].completion_tokens, got["json"].cost_micros) == (11, 7, 98)
    unpriced = got["unpriced"]
    assert (unpriced.cost_micros, unpriced.currency, unpriced.price_id) == (0, "", "")
    # The day's aggregate of the key: the records' cost summed, the unpriced one counted.
    day = datetime.fromtimestamp(got["json"].started_at, UTC).strftime("d:%Y%m%d")
    agg = await gateway.state.store.redis.hgetall(names.usage_aggregate("key", key_id, day))
    assert int(agg[b"cost_micros"]) == sum(r.cost_micros for r in got.values())
    assert int(agg[b"unpriced"]) == 1 and int(agg[b"requests"]) == 4


MIDNIGHT = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
CHANGE = {"currency": "USD", "models": {"crimson-falcon-4": [
    {"effective_from": "2026-01-01", "prompt": "0.50", "completion": "1.50"},
    {"effective_from": "2026-03-01", "prompt": "1.00", "completion": "3.00"},
]}}  # fmt: skip


def priced(rid: str, started_at: float, model: str = "crimson-falcon-4") -> UsageRecord:
    """A record as `api/settle.py` makes it: priced by its own `started_at`."""
    price = parse_pricing(CHANGE).price(model, started_at)
    rec = UsageRecord(request_id=rid, key_id="key_m", org="acme", model=model, status=200, stream=False,
                      prompt_tokens=1000, completion_tokens=1000, usage_source="upstream", started_at=started_at,
                      duration_ms=5)  # fmt: skip
    if price is None:
        return rec
    return replace(rec, cost_micros=price.cost(1000, 1000), currency="USD", price_id=price.price_id)


async def test_a_price_change_at_midnight_in_export_and_summary(store, redis_url: str, tmp_path) -> None:  # noqa: F811
    recs = [priced("before", MIDNIGHT - 0.5), priced("after", MIDNIGHT + 0.5),
            priced("owl", MIDNIGHT + 1, model="indigo-owl-4")]  # fmt: skip
    writer = UsageWriter(store)
    writer.start()
    for rec in recs:
        writer.submit(Settlement([], [], rec, [True, False]))
    await writer.close()
    span = ("--since", "2026-02-28T00:00:00Z", "--until", "2026-03-02T00:00:00Z")
    out = ok(run_cli("usage", "export", *span, "--slack", "3650d", redis_url=redis_url)).stdout
    rows = {r["request_id"]: r for r in map(json.loads, out.splitlines())}
    assert (rows["before"]["cost_micros"], rows["before"]["price_id"], rows["before"]["cost"]) == (
        2000, "crimson-falcon-4@2026-01-01", "0.002")  # fmt: skip
    assert (rows["after"]["cost_micros"], rows["after"]["price_id"], rows["after"]["cost"]) == (
        4000, "crimson-falcon-4@2026-03-01", "0.004")  # fmt: skip
    assert (rows["owl"]["cost_micros"], rows["owl"]["price_id"], rows["owl"]["currency"]) == (0, None, None)
    assert rows["after"]["currency"] == "USD"
    csv_out = ok(run_cli("usage", "export", *span, "--slack", "3650d", "--format", "csv", redis_url=redis_url)).stdout
    assert [r["cost"] for r in csv.DictReader(io.StringIO(csv_out))] == ["0.002", "0.004", "0.00"]
    # The summary, per day: the old price on the 28th, the new one on the 1st, the owl flagged.
    config = tmp_path / "c.yaml"
    config.write_text("models: {crimson-falcon-4: {upstreams: [http://127.0.0.1:9]}, "
                      "indigo-owl-4: {upstreams: [http://127.0.0.1:9]}}\npricing: " + orjson.dumps(CHANGE).decode())  # fmt: skip
    summary = json.loads(ok(run_cli("usage", "summary", "--config", str(config), *span, "--org", "acme",
                                    "--json", redis_url=redis_url)).stdout)  # fmt: skip
    assert summary["currency"] == "USD" and summary["unpriced_models"] == ["indigo-owl-4"]
    by_day = {r["period"]: r for r in summary["rows"]}
    assert (by_day["2026-02-28"]["cost_micros"], by_day["2026-02-28"]["cost"], by_day["2026-02-28"]["unpriced"]) == (
        2000, "0.002", 0)  # fmt: skip
    assert (by_day["2026-03-01"]["cost_micros"], by_day["2026-03-01"]["unpriced"]) == (4000, 1)
    table = ok(run_cli("usage", "summary", "--config", str(config), *span, "--org", "acme", redis_url=redis_url)).stdout
    assert "cost in USD" in table and "0.004*" in table and "indigo-owl-4 have none in the config" in table


def test_spool_lines_keep_the_cost_and_old_lines_still_read() -> None:
    rec = replace(priced("r", MIDNIGHT), cached_tokens=3)
    assert UsageRecord.from_json(rec.to_json()) == rec
    assert UsageRecord.from_fields(dict(zip(rec.fields()[::2], rec.fields()[1::2], strict=True))) == rec
    old = orjson.loads(rec.to_json())
    for name in ("cached_tokens", "cost_micros", "currency", "price_id"):
        del old[name]
    back = UsageRecord.from_json(orjson.dumps(old))
    assert (back.cost_micros, back.price_id, back.request_id) == (0, "", "r")
