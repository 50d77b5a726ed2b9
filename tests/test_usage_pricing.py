"""The price table: parsing and its refusals (naming the field), costs in integer micro-units,
and a price change that never reaches back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.config import ConfigError, parse_settings
from gateway.usage.pricing import PricingError, cached_tokens, money_text, parse_money, parse_pricing

MIDNIGHT = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


def table() -> dict:
    return {"currency": "usd", "models": {"crimson-falcon-4": [
        {"effective_from": "2026-03-01", "prompt": "1.00", "completion": "3.00"},
        {"effective_from": "2026-01-01", "prompt": "0.50", "completion": "1.50", "cached_prompt": "0.05"},
    ]}}  # fmt: skip


def test_cost_in_micros_with_cached_tokens() -> None:
    pricing = parse_pricing(table())
    assert pricing.currency == "USD"
    price = pricing.price("crimson-falcon-4", MIDNIGHT - 1)
    assert price is not None and price.price_id == "crimson-falcon-4@2026-01-01"
    # 800 × 0.50 + 200 × 0.05 + 100 × 1.50 per million = 560 micro-units
    assert price.cost(1000, 100, 200) == 560
    assert isinstance(price.cost(1000, 100, 200), int)
    assert price.cost(1, 0) == 1  # half a micro-unit is rounded up
    assert price.cost(0, 0) == 0
    assert price.cost(10, 0, 99) == 1  # cached can never exceed the prompt: 10 × 0.05 = 0.5 → 1


def test_price_change_at_midnight_is_never_retroactive() -> None:
    pricing = parse_pricing(table())
    before, after = pricing.price("crimson-falcon-4", MIDNIGHT - 0.001), pricing.price("crimson-falcon-4", MIDNIGHT)
    assert before is not None and after is not None
    assert (before.price_id, after.price_id) == ("crimson-falcon-4@2026-01-01", "crimson-falcon-4@2026-03-01")
    assert (before.cost(1_000_000, 0), after.cost(1_000_000, 0)) == (500_000, 1_000_000)
    assert after.cost(1000, 0, 1000) == 1000  # no cached_prompt in this entry: the prompt price
    assert pricing.price("crimson-falcon-4", datetime(2025, 12, 31, tzinfo=UTC).timestamp()) is None
    assert pricing.price("indigo-owl-4", MIDNIGHT) is None
    assert pricing.unpriced(["crimson-falcon-4", "indigo-owl-4"]) == ["indigo-owl-4"]


def test_money_is_read_as_decimal_text() -> None:
    assert parse_money("0.1", "p") + parse_money("0.2", "p") == parse_money("0.3", "p") == 300_000
    assert parse_money(2, "p") == 2_000_000
    assert parse_money("0.000001", "p") == 1
    assert money_text(12_500_000) == "12.50" and money_text(560) == "0.00056" and money_text(0) == "0.00"


@pytest.mark.parametrize(
    ("entry", "field", "why"),
    [
        ({"prompt": "-1", "completion": "1"}, "prompt", "negative"),
        ({"prompt": "abc", "completion": "1"}, "prompt", "not a decimal"),
        ({"prompt": "1", "completion": "NaN"}, "completion", "finite"),
        ({"prompt": 0.5, "completion": "1"}, "prompt", "float"),
        ({"prompt": "1", "completion": "0.0000001"}, "completion", "micro-unit"),
        ({"prompt": "1", "completion": "1", "cached_prompt": True}, "cached_prompt", "decimal"),
        ({"prompt": "1"}, "completion", "required"),
        ({"prompt": "1", "completion": "1", "effective_from": "soon"}, "effective_from", "date"),
        ({"prompt": "1", "completion": "1", "discount": "1"}, "discount", "unknown"),
    ],
)
def test_bad_prices_name_the_field(entry: dict, field: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"pricing": {"models": {"m": [entry]}}})
    assert f"pricing.models.m[0].{field}" in str(caught.value) and why in str(caught.value)


def test_bad_currency_and_overlap_refuse_to_start() -> None:
    with pytest.raises(ConfigError, match=r"pricing\.currency: not an ISO 4217"):
        parse_settings({"pricing": {"currency": "XYZ"}})
    two = [{"effective_from": "2026-01-01", "prompt": "1", "completion": "1"},
           {"effective_from": "2026-01-01T00:00:00Z", "prompt": "2", "completion": "2"}]  # fmt: skip
    with pytest.raises(ConfigError, match=r"pricing\.models\.m\[1\]\.effective_from: overlaps pricing\.models\.m\[0\]"):
        parse_settings({"pricing": {"models": {"m": two}}})
    with pytest.raises(PricingError, match=r"pricing\.models\.m\[1\]\.effective_from: overlaps"):
        parse_pricing({"models": {"m": [{"prompt": "1", "completion": "1"}, {"prompt": "2", "completion": "2"}]}})
    with pytest.raises(ConfigError, match=r"pricing\.rounding: unknown setting"):
        parse_settings({"pricing": {"rounding": "up"}})


def test_cached_tokens_from_usage() -> None:
    assert cached_tokens({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 4}}) == 4
    assert cached_tokens({"prompt_tokens_details": {"cached_tokens": "4"}}) == 0
    assert cached_tokens({"prompt_tokens_details": None}) == 0
    assert cached_tokens(None) == 0
