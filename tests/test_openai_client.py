"""The official `openai` client, pointed at the gateway with `base_url`, works unchanged."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Gateway

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain quantum entanglement in simple terms."},
]


def client_for(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=10)


async def test_non_streaming(gateway, key):
    async with client_for(gateway, key) as client:
        completion = await client.chat.completions.create(
            model="crimson-falcon-4", messages=MESSAGES, temperature=0.7, max_tokens=512
        )
    assert completion.object == "chat.completion"
    assert completion.model == "crimson-falcon-4"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_streaming(gateway, key):
    async with client_for(gateway, key) as client:
        stream = await client.chat.completions.create(
            model="indigo-owl-4", messages=[{"role": "user", "content": "Hello!"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 16
    assert all(c.usage is None for c in chunks)  # the gateway's own usage chunk stays hidden


async def test_streaming_with_usage(gateway, key):
    async with client_for(gateway, key) as client:
        stream = await client.chat.completions.create(
            model="amber-phoenix-4",
            messages=[{"role": "user", "content": "Hello!"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


async def test_models_list(gateway):
    key, _ = await gateway.create_key("two", models=("crimson-falcon-4", "indigo-owl-4"))
    async with client_for(gateway, key) as client:
        models = await client.models.list()
    assert sorted(m.id for m in models.data) == ["crimson-falcon-4", "indigo-owl-4"]


async def test_authentication_error(gateway):
    async with client_for(gateway, "lt_" + "x" * 40) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="crimson-falcon-4", messages=MESSAGES)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


async def test_not_found_error(gateway, key):
    async with client_for(gateway, key) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


async def test_bad_request_error(gateway, key):
    async with client_for(gateway, key) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="crimson-falcon-4", messages=MESSAGES, temperature=3)
    assert caught.value.param == "temperature"


async def test_rate_limit_error(gateway):
    key, _ = await gateway.create_key("one", rpm=1)
    async with client_for(gateway, key) as client:
        await client.chat.completions.create(model="crimson-falcon-4", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="crimson-falcon-4", messages=MESSAGES)
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"]


async def test_upstream_error_passes_through(gateway, key):
    async with client_for(gateway, key) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(
                model="crimson-falcon-4", messages=MESSAGES, extra_headers={"x-mock-status": "500"}
            )
    assert caught.value.status_code == 500
