"""`GET /openapi.json`: the client API's document, generated from the validation's own declarations.

The request schema and the request path's checks come from one `Profile`; a property test holds
them to each other (whatever the schema accepts the gateway accepts, and the other way round),
and the served document is valid OpenAPI 3.1, needs no key and names no configured model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema.exceptions import ValidationError
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec

from gateway.api.openapi import document, profile_schema
from gateway.api.validation import LIUTONG, PROFILES, compile_check, parse_chat_request
from gateway.config import Listen
from gateway.errors import BadRequest
from tests.conftest import GatewayFactory, free_port, gateway_settings

SCHEMA = OAS31Validator(profile_schema(LIUTONG))


def _schema_accepts(body: Any) -> bool:
    try:
        SCHEMA.validate(body)
    except ValidationError:
        return False
    return True


def _gateway_accepts(body: Any) -> bool:
    try:
        parse_chat_request(json.dumps(body).encode())
    except BadRequest:
        return False
    return True


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.sampled_from([0.0, 0.5, 1.5, 2.5, -0.1]),
    st.sampled_from(["", "x", "user", "system", "assistant", "tool"]),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=5)}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), _value, max_size=3),
    _value,
)
_bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.just("crimson-falcon-4"), _value)},
    optional={
        "messages": st.one_of(st.lists(_message, max_size=3), _value),
        **{name: _value for name in LIUTONG.fields if name != "model"},
        **{name: _scalar for name in ("max_tokens", "n", "temperature", "top_p")},
    },
)


@settings(max_examples=600)
@given(_bodies)
def test_the_document_and_the_validation_agree(body: dict[str, Any]) -> None:
    assert _schema_accepts(body) == _gateway_accepts(body), body


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 128, "max_tokens": 2**63 - 1},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": None, "stop": [], "stream_options": {}},
    ],
)
def test_bounds_agree(body: dict[str, Any]) -> None:
    assert _schema_accepts(body) and _gateway_accepts(body)
    for name, bad in (("n", 129), ("max_tokens", 2**63), ("n", 0), ("temperature", 2.01)):
        assert not _schema_accepts({**body, name: bad}) and not _gateway_accepts({**body, name: bad})


def test_a_declaration_cannot_say_more_than_the_check_enforces() -> None:
    with pytest.raises(ValueError, match="pattern"):
        compile_check({"type": "string", "pattern": "^a$"})
    assert compile_check({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]})(None)


def test_the_document_is_valid_and_lists_the_contract_routes() -> None:
    spec = document(list(PROFILES), metrics=True)
    validate_spec(spec)
    assert set(spec["paths"]) == {
        "/v1/chat/completions",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    }
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "404", "413", "415", "429", "502", "503", "504", "default"} <= set(chat["responses"])
    assert "/metrics" not in document(list(PROFILES), metrics=False)["paths"]


async def test_served_without_a_key_and_names_no_configured_model(
    make_gateway: GatewayFactory, mock_upstream: str, redis_url: str, http: aiohttp.ClientSession
) -> None:
    settings_ = gateway_settings(mock_upstream, redis_url)
    secret_model = "internal-only-model-7"
    models = {**settings_.models, secret_model: replace(settings_.models["crimson-falcon-4"], name=secret_model)}
    gw = await make_gateway(replace(settings_, models=models))
    async with http.get(gw.url + "/openapi.json") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        text = await resp.text()
    assert secret_model not in text and "x-request-id" in resp.headers
    spec = json.loads(text)
    validate_spec(spec)
    assert "/metrics" in spec["paths"]

    split = await make_gateway(admin_listen=Listen(host="127.0.0.1", port=free_port()))
    async with http.get(split.url + "/openapi.json") as resp:
        assert "/metrics" not in (await resp.json())["paths"]
