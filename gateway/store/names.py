"""Every Redis key the gateway uses, all starting with `liutong:`.

Buckets and the concurrency set of a key share one hash tag with its org's buckets (the org
when it has one), so that one script call can check them all on a Redis Cluster slot.
"""

from __future__ import annotations

PREFIX = "liutong:"

def limit_tag(key_id: str, org: str | None) -> str:
    return f"{{o:{org}}}" if org else f"{{k:{key_id}}}"


def key_bucket(tag: str, key_id: str, kind: str) -> str:
    return f"{PREFIX}{tag}:key:{key_id}:{kind}"


def org_bucket(tag: str, org: str, kind: str) -> str:
    return f"{PREFIX}{tag}:org:{org}:{kind}"


def concurrency_set(tag: str, key_id: str) -> str:
    return f"{PREFIX}{tag}:key:{key_id}:inflight"


def key_record(digest_hex: str) -> str:
    return f"{PREFIX}key:{digest_hex}"


def key_id_index(key_id: str) -> str:
    return f"{PREFIX}keyid:{key_id}"


KEY_IDS = f"{PREFIX}keys"


def org_record(org: str) -> str:
    return f"{PREFIX}org:{org}"


ORGS = f"{PREFIX}orgs"

USAGE_TAG = "{usage}"
USAGE_STREAM = f"{PREFIX}{USAGE_TAG}:records"


def usage_marker(request_id: str) -> str:
    return f"{PREFIX}{USAGE_TAG}:seen:{request_id}"


def usage_aggregate(scope: str, name: str, period: str) -> str:
    """`scope` is `key` or `org`; `period` is `h:YYYYMMDDHH` or `d:YYYYMMDD` (UTC)."""
    return f"{PREFIX}{USAGE_TAG}:agg:{scope}:{name}:{period}"
