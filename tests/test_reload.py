"""SIGHUP reloads models, upstreams and default limits without dropping a connection; a bad
new config is rejected and the old one kept."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest
import yaml

from gateway.keys.records import KeyService
from gateway.store.client import open_store
from tests.conftest import SEED_MODELS, GatewayProcess, auth, chat_body

pytestmark = pytest.mark.integration


async def _models(http: aiohttp.ClientSession, url: str, key: str) -> list[str]:
    async with http.get(url + "/v1/models", headers=auth(key)) as resp:
        return sorted(m["id"] for m in (await resp.json())["data"])


async def _wait_for_models(http, url, key, expected: list[str]) -> None:
    for _ in range(100):
        if await _models(http, url, key) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"models never became {expected}")


async def test_sighup_reloads_and_keeps_streams_and_rejects_a_bad_config(tmp_path, redis_url, mock_upstream):
    config = tmp_path / "gw.yaml"
    tree = {
        "redis_url": redis_url,
        "limits": {"default": {"rpm": 1000}},
        "models": {m: {"upstreams": [mock_upstream]} for m in SEED_MODELS},
    }
    config.write_text(yaml.safe_dump(tree))
    store = open_store(redis_url)
    key, _ = await KeyService(store.redis).create("reload")
    await store.close()
    gateway = GatewayProcess(config)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as http:
            assert await _models(http, gateway.url, key) == sorted(SEED_MODELS)
            headers = {**auth(key), "x-mock-tokens": "10", "x-mock-interval-ms": "100"}
            async with http.post(gateway.url + "/v1/chat/completions", json=chat_body(stream=True),
                                 headers=headers) as stream:  # fmt: skip
                assert stream.status == 200
                tree["models"]["new-model-5"] = {"upstreams": [mock_upstream]}
                tree["limits"]["default"]["rpm"] = 500
                config.write_text(yaml.safe_dump(tree))
                gateway.process.send_signal(signal.SIGHUP)
                await _wait_for_models(http, gateway.url, key, sorted([*SEED_MODELS, "new-model-5"]))
                body = await stream.read()
            assert body.endswith(b"data: [DONE]\n\n")  # the stream in flight was not dropped
            async with http.post(gateway.url + "/v1/chat/completions", json=chat_body(model="new-model-5"),
                                 headers=auth(key)) as resp:  # fmt: skip
                assert resp.status == 200
                assert resp.headers["x-ratelimit-limit-requests"] == "500"

            config.write_text("models: [this is: not valid")
            gateway.process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert await _models(http, gateway.url, key) == sorted([*SEED_MODELS, "new-model-5"])
            assert gateway.process.poll() is None
    finally:
        assert gateway.stop() == 0
    assert '"event":"reload_rejected"' in gateway.logs()
    assert '"event":"reloaded"' in gateway.logs()
