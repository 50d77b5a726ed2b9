"""Routing settings: defaults, every bad value stops start-up naming its field, env and file agree."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, PrefixAffinity, load_settings, parse_settings


def _model(**spec):
    return parse_settings({"models": {"m": {"upstreams": ["http://127.0.0.1:9001"], **spec}}}).models["m"]


def test_defaults_are_prefix_affinity_with_local_load():
    route = _model()
    assert route.routing == "prefix_affinity"
    assert route.metrics_path is None and route.load_poll_interval == 0.5
    assert route.prefix_affinity == PrefixAffinity()


def test_every_setting_is_read():
    route = _model(routing="round_robin", metrics_path="/metrics", load_poll_interval=0.25,
                   prefix_affinity={"max_blocks": 64, "index_blocks": 1000, "waiting_tokens": 100,
                                    "running_tokens": 2.5, "kv_tokens": 0, "inflight_tokens": 50,
                                    "load_bound": 0})  # fmt: skip
    assert route.routing == "round_robin" and route.metrics_path == "/metrics"
    assert route.load_poll_interval == 0.25
    assert route.prefix_affinity == PrefixAffinity(64, 1000, 100.0, 2.5, 0.0, 50.0, 0.0)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"routing": "random"}, "models.m.routing"),
        ({"routing": 3}, "models.m.routing"),
        ({"prefix_affinity": {"waiting_tokens": -1}}, "models.m.prefix_affinity.waiting_tokens"),
        ({"prefix_affinity": {"running_tokens": "lots"}}, "models.m.prefix_affinity.running_tokens"),
        ({"prefix_affinity": {"kv_tokens": float("nan")}}, "models.m.prefix_affinity.kv_tokens"),
        ({"prefix_affinity": {"inflight_tokens": float("inf")}}, "models.m.prefix_affinity.inflight_tokens"),
        ({"prefix_affinity": {"load_bound": 0.5}}, "models.m.prefix_affinity.load_bound"),
        ({"prefix_affinity": {"load_bound": True}}, "models.m.prefix_affinity.load_bound"),
        ({"prefix_affinity": {"max_blocks": 0}}, "models.m.prefix_affinity.max_blocks"),
        ({"prefix_affinity": {"max_blocks": 5000}}, "models.m.prefix_affinity.max_blocks"),
        ({"prefix_affinity": {"index_blocks": 1.5}}, "models.m.prefix_affinity.index_blocks"),
        ({"prefix_affinity": {"weight": 1}}, "models.m.prefix_affinity.weight"),
        ({"prefix_affinity": [1]}, "models.m.prefix_affinity"),
        ({"metrics_path": "metrics"}, "models.m.metrics_path"),
        ({"metrics_path": ""}, "models.m.metrics_path"),
        ({"load_poll_interval": 0}, "models.m.load_poll_interval"),
        ({"load_poll_interval": 0.01}, "models.m.load_poll_interval"),
        ({"upstreams": [{"url": "http://127.0.0.1:9001", "weight": 0}]}, "models.m.upstreams[0].weight"),
        ({"upstreams": [{"url": "http://127.0.0.1:9001", "weight": "x"}]}, "models.m.upstreams[0].weight"),
    ],
)
def test_a_bad_routing_value_names_its_field(spec, field):
    with pytest.raises(ConfigError) as caught:
        _model(**spec)
    assert str(caught.value).startswith(field + ":")


def test_a_bad_routing_value_in_a_file_stops_start_up(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("models:\n  m:\n    upstreams: [http://127.0.0.1:9001]\n    routing: fastest\n")
    with pytest.raises(ConfigError, match=r"^models\.m\.routing: expected one of prefix_affinity"):
        load_settings(str(path), env={})
    env = {"LIUTONG_MODELS": '{"m": {"upstreams": ["http://127.0.0.1:9001"], "routing": "least_outstanding"}}'}
    assert load_settings(None, env=env).models["m"].routing == "least_outstanding"
