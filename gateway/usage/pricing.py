"""The price table (`pricing:` in the config) and the cost of a record, in integer micro-units.

Prices are per million tokens, written as decimal text (`"0.50"`) and read with `Decimal`, so
that money never passes through a float. Each price becomes an integer number of micro-units
per million tokens (so a price finer than a micro-unit per million tokens is refused); a
record's cost is the exact sum of tokens × price over all its kinds, divided by a million and
rounded up to the micro-unit. Cached prompt tokens (`prompt_tokens_details.cached_tokens`,
which OpenAI counts inside `prompt_tokens`) cost `cached_prompt` when the entry has one, the
prompt price otherwise.

A model's entries each apply from their `effective_from` (a date: midnight UTC; or an ISO 8601
time with an offset) until the next one's, so a price change never reaches back: a record is
priced by its own `started_at`. A model without a price (or a request before its first
entry's date) costs 0, with no `price_id`, and `usage summary` flags it.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

MICROS = 1_000_000  # micro-units per unit of the currency
PER = 1_000_000  # tokens a price is given for

# ISO 4217 active codes (and the funds/precious-metal codes that a ledger may use).
_CODES = """
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP
BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB
EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY
KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR
MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB
RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD
TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG
XDR XOF XPD XPF XPT XSU XUA YER ZAR ZMW ZWG ZWL
"""
CURRENCIES = frozenset(_CODES.split())

_KINDS = ("prompt", "completion", "cached_prompt")
_ENTRY_FIELDS = {"effective_from", *_KINDS}


class PricingError(ValueError):
    """A bad price table; the message names the field (`pricing.models.m[0].prompt`)."""


@dataclass(frozen=True, slots=True)
class Price:
    """One entry of a model's prices: micro-units per million tokens of each kind."""

    price_id: str  # `<model>@<effective_from, UTC>`
    effective_from: int  # epoch seconds
    prompt: int
    completion: int
    cached_prompt: int | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """Micro-units for these tokens (rounded up); cached tokens are part of the prompt's."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        cached_rate = self.prompt if self.cached_prompt is None else self.cached_prompt
        exact = (prompt_tokens - cached) * self.prompt + cached * cached_rate + completion_tokens * self.completion
        return -(-exact // PER)

    def text(self) -> dict[str, str | None]:
        """The entry's prices as decimal text per million tokens (for APIs and the CLI)."""
        return {
            "prompt": money_text(self.prompt),
            "completion": money_text(self.completion),
            "cached_prompt": None if self.cached_prompt is None else money_text(self.cached_prompt),
        }


@dataclass(frozen=True, slots=True)
class Pricing:
    """The deployment's currency and each model's entries, oldest first."""

    currency: str = "USD"
    models: Mapping[str, tuple[Price, ...]] = field(default_factory=dict)

    def price(self, model: str, at: float) -> Price | None:
        """The entry in force for `model` at epoch `at`, if any."""
        entries = self.models.get(model)
        if not entries:
            return None
        i = bisect.bisect_right([p.effective_from for p in entries], at) - 1
        return entries[i] if i >= 0 else None

    def unpriced(self, models: Any) -> list[str]:
        """Those of `models` with no price at all."""
        return sorted(m for m in models if m not in self.models)


def money_text(micros: int) -> str:
    """`12500000` → `"12.50"` (at least two decimals, at most six, no float)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    digits = f"{frac:06d}".rstrip("0")
    return f"{sign}{whole}.{digits.ljust(2, '0')}"


def parse_money(value: Any, name: str) -> int:
    """Decimal text (or an integer) → micro-units; never through a float. Raises PricingError."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        if isinstance(value, float):
            raise PricingError(f"{name}: write the amount as quoted decimal text like \"0.50\" "
                               f"(money is never read through a float), got {value!r}")  # fmt: skip
        raise PricingError(f'{name}: expected a decimal number as text like "0.50", got {value!r}')
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise PricingError(f"{name}: not a decimal number: {value!r}") from None
    if not amount.is_finite():
        raise PricingError(f"{name}: not a finite number: {value!r}")
    if amount < 0:
        raise PricingError(f"{name}: must not be negative, got {value!r}")
    micros = amount * MICROS
    if micros != micros.to_integral_value():
        raise PricingError(f"{name}: finer than a micro-unit (at most 6 decimals), got {value!r}")
    return int(micros)


def _instant(value: Any, name: str) -> int:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise PricingError(f"{name}: expected a date like 2026-01-01 or an ISO 8601 time, got {value!r}") from None
    else:
        raise PricingError(f"{name}: expected a date like 2026-01-01 or an ISO 8601 time, got {value!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _stamp(epoch: int) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%d") if epoch % 86400 == 0 else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_pricing(raw: Any, name: str = "pricing") -> Pricing:
    """The `pricing:` section → `Pricing` (None → an empty table). Raises PricingError."""
    if raw is None:
        return Pricing()
    if not isinstance(raw, Mapping):
        raise PricingError(f"{name}: expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in ("currency", "models"):
            raise PricingError(f"{name}.{key}: unknown setting")
    currency = raw.get("currency", "USD")
    if not isinstance(currency, str) or currency.strip().upper() not in CURRENCIES:
        raise PricingError(f"{name}.currency: not an ISO 4217 currency code: {currency!r}")
    currency = currency.strip().upper()
    models_raw = raw.get("models") or {}
    if not isinstance(models_raw, Mapping):
        raise PricingError(f"{name}.models: expected a mapping of model id to a list of prices")
    models: dict[str, tuple[Price, ...]] = {}
    for model, entries in models_raw.items():
        where = f"{name}.models.{model}"
        if not isinstance(model, str) or not model:
            raise PricingError(f"{where}: a model id must be a non-empty string")
        if isinstance(entries, Mapping):
            entries = [entries]
        if not isinstance(entries, list) or not entries:
            raise PricingError(f"{where}: expected a list of prices ({{effective_from, prompt, completion}})")
        prices: list[Price] = []
        seen: dict[int, int] = {}
        for i, entry in enumerate(entries):
            at = f"{where}[{i}]"
            if not isinstance(entry, Mapping):
                raise PricingError(f"{at}: expected a mapping with prompt and completion")
            for key in entry:
                if key not in _ENTRY_FIELDS:
                    raise PricingError(f"{at}.{key}: unknown setting")
            for key in ("prompt", "completion"):
                if key not in entry:
                    raise PricingError(f"{at}.{key}: required (a price per million tokens)")
            start = _instant(entry["effective_from"], f"{at}.effective_from") if "effective_from" in entry else 0
            if start in seen:
                raise PricingError(f"{at}.effective_from: overlaps {where}[{seen[start]}] "
                                   f"(both from {_stamp(start)})")  # fmt: skip
            seen[start] = i
            cached = entry.get("cached_prompt")
            prices.append(Price(
                price_id=f"{model}@{_stamp(start)}",
                effective_from=start,
                prompt=parse_money(entry["prompt"], f"{at}.prompt"),
                completion=parse_money(entry["completion"], f"{at}.completion"),
                cached_prompt=None if cached is None else parse_money(cached, f"{at}.cached_prompt"),
            ))  # fmt: skip
        models[model] = tuple(sorted(prices, key=lambda p: p.effective_from))
    return Pricing(currency=currency, models=models)


def cached_tokens(usage: Mapping[str, Any] | None) -> int:
    """`prompt_tokens_details.cached_tokens` of an upstream's usage block, else 0."""
    if not usage:
        return 0
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, Mapping):
        return 0
    value = details.get("cached_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
