from tests.conftest import auth, chat_body


async def test_json_roundtrip(gateway, key, http):
    async with http.post(gateway.url + "/v1/chat/completions", json=chat_body(), headers=auth(key)) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["usage"]["completion_tokens"] == 16
