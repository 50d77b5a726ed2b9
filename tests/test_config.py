"""Unit tests of `gateway.config.load_settings(path, env)` (CONTRACT §6): the example YAML loads,
`LIUTONG_*` variables win over the file, and every bad value raises `ConfigError` naming its
field, so that `serve` refuses to start with a message an operator can act on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, Limits, Listen, Settings, Timeouts, load_settings

REPO = Path(__file__).resolve().parent.parent

# CONTRACT §6, verbatim.
EXAMPLE = """\
listen: {host: 0.0.0.0, port: 8080}
redis_url: redis://127.0.0.1:6379/0     # omit for the embedded store
models:
  crimson-falcon-4:
    upstreams: [http://127.0.0.1:9001, http://127.0.0.1:9002]
  indigo-owl-4:
    upstreams: [http://127.0.0.1:9003]
limits:
  default: {rpm: 600, tpm: 200000, max_concurrent: 32}
timeouts: {connect: 5, first_byte: 60, idle: 60, total: 600}   # seconds; a model may override
max_body_bytes: 8388608                                         # larger request bodies get 413
# admin_listen: {host: 0.0.0.0, port: 8081}                    # moves /metrics and /admin/ here
"""

MODELS_OK = "models:\n  crimson-falcon-4:\n    upstreams: [http://127.0.0.1:9001]\n"


@pytest.fixture
def write(tmp_path: Path):
    def write(text: str | bytes, name: str = "gateway.yaml") -> str:
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return str(path)

    return write


def config_error(path: str | None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env or {})
    return str(info.value)


# --- good files -----------------------------------------------------------------------------


def test_contract_example_loads(write):
    settings = load_settings(write(EXAMPLE), {})
    assert settings.listen == Listen(host="0.0.0.0", port=8080)
    assert settings.admin_listen is None
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.limits == Limits(rpm=600, tpm=200_000, max_concurrent=32)
    assert settings.timeouts == Timeouts(connect=5, first_byte=60, idle=60, total=600)
    assert settings.max_body_bytes == 8_388_608
    assert set(settings.models) == {"crimson-falcon-4", "indigo-owl-4"}
    falcon = settings.models["crimson-falcon-4"]
    assert falcon.name == "crimson-falcon-4"
    assert list(falcon.upstreams) == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    assert falcon.timeouts == settings.timeouts
    assert list(settings.models["indigo-owl-4"].upstreams) == ["http://127.0.0.1:9003"]


def test_empty_file_and_no_file_give_the_defaults(write):
    defaults = Settings()
    for settings in (load_settings(write(""), {}), load_settings(None, {})):
        assert settings.listen == Listen(host="0.0.0.0", port=8080)
        assert settings.redis_url is None  # the embedded store
        assert settings.limits == defaults.limits
        assert settings.timeouts == defaults.timeouts
        assert settings.max_body_bytes == 8 * 1024 * 1024
        assert dict(settings.models) == {}


def test_a_model_may_override_timeouts(write):
    text = EXAMPLE.replace(
        "    upstreams: [http://127.0.0.1:9003]\n",
        "    upstreams: [http://127.0.0.1:9003]\n    timeouts: {first_byte: 5, idle: 7.5}\n",
    )
    settings = load_settings(write(text), {})
    assert settings.models["indigo-owl-4"].timeouts == Timeouts(connect=5, first_byte=5, idle=7.5, total=600)
    assert settings.models["crimson-falcon-4"].timeouts == Timeouts(connect=5, first_byte=60, idle=60, total=600)


def test_upstream_trailing_slash_is_dropped(write):
    # The gateway calls `<url>/v1/chat/completions`: a trailing slash would double it.
    text = "models:\n  m:\n    upstreams: ['http://127.0.0.1:9001/', 'https://up.example']\n"
    settings = load_settings(write(text), {})
    assert list(settings.models["m"].upstreams) == ["http://127.0.0.1:9001", "https://up.example"]


def test_admin_listen_and_rediss(write):
    text = EXAMPLE.replace("# admin_listen", "admin_listen").replace("redis://127", "rediss://127")
    settings = load_settings(write(text), {})
    assert settings.admin_listen == Listen(host="0.0.0.0", port=8081)
    assert settings.redis_url == "rediss://127.0.0.1:6379/0"


# --- the environment wins -------------------------------------------------------------------


def test_environment_overrides_the_file(write):
    env = {
        "LIUTONG_REDIS_URL": "redis://cache.internal:6380/2",
        "LIUTONG_LISTEN_PORT": "9090",
        "LIUTONG_TIMEOUTS_FIRST_BYTE": "2.5",
        "LIUTONG_LIMITS_DEFAULT_RPM": "100",
        "LIUTONG_MODELS": '{"amber-phoenix-4": {"upstreams": ["http://10.0.0.5:8000"]}}',
    }
    settings = load_settings(write(EXAMPLE), env)
    assert settings.redis_url == "redis://cache.internal:6380/2"
    assert settings.listen == Listen(host="0.0.0.0", port=9090)  # the host still comes from the file
    assert settings.timeouts == Timeouts(connect=5, first_byte=2.5, idle=60, total=600)
    assert settings.limits == Limits(rpm=100, tpm=200_000, max_concurrent=32)
    assert set(settings.models) == {"amber-phoenix-4"}
    assert list(settings.models["amber-phoenix-4"].upstreams) == ["http://10.0.0.5:8000"]
    # The env's default timeouts apply to the env's models too.
    assert settings.models["amber-phoenix-4"].timeouts.first_byte == 2.5


def test_environment_alone_configures_everything():
    env = {
        "LIUTONG_REDIS_URL": "redis://127.0.0.1:6379/0",
        "LIUTONG_LISTEN_PORT": "8181",
        "LIUTONG_LIMITS_DEFAULT_RPM": "7",
        "LIUTONG_MODELS": "crimson-falcon-4: {upstreams: [http://127.0.0.1:9001]}",
    }
    settings = load_settings(None, env)
    assert settings.listen.port == 8181
    assert settings.limits.rpm == 7
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert list(settings.models["crimson-falcon-4"].upstreams) == ["http://127.0.0.1:9001"]


def test_liutong_config_names_the_file(write):
    settings = load_settings(None, {"LIUTONG_CONFIG": write(EXAMPLE)})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert set(settings.models) == {"crimson-falcon-4", "indigo-owl-4"}


def test_unrelated_environment_is_ignored(write):
    env = {"LIUTONG": "x", "LIUTONG_": "x", "REDIS_URL": "redis://elsewhere:1/0", "LISTEN_PORT": "1"}
    settings = load_settings(write(EXAMPLE), env)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.listen.port == 8080


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("", {}, True),
        ("admission_overlap: false\n", {}, False),
        ("admission_overlap: true\n", {"LIUTONG_ADMISSION_OVERLAP": "off"}, False),
        ("admission_overlap: false\n", {"LIUTONG_ADMISSION_OVERLAP": "1"}, True),
    ],
)
def test_admission_overlap_is_a_flag(write, text, env, expected):
    assert load_settings(write(text), env).admission_overlap is expected


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"LIUTONG_ADMISSION_OVERLAP": "perhaps"}, ("admission_overlap", "LIUTONG_ADMISSION_OVERLAP")),
        ({"LIUTONG_LISTEN_PORT": "eighty"}, ("listen.port", "LIUTONG_LISTEN_PORT")),
        ({"LIUTONG_TIMEOUTS_FIRST_BYTE": "-1"}, ("timeouts.first_byte", "LIUTONG_TIMEOUTS_FIRST_BYTE")),
        ({"LIUTONG_LIMITS_DEFAULT_RPM": "-5"}, ("limits.default.rpm", "LIUTONG_LIMITS_DEFAULT_RPM")),
        ({"LIUTONG_REDIS_URL": "mysql://db:3306"}, ("redis_url", "LIUTONG_REDIS_URL")),
        ({"LIUTONG_MODELS": "{not: [valid"}, ("LIUTONG_MODELS", "models")),
        ({"LIUTONG_MODELS": '{"m": {"upstreams": []}}'}, ("models.m.upstreams", "LIUTONG_MODELS")),
    ],
)
def test_bad_environment_value_names_it(write, env, field):
    message = config_error(write(EXAMPLE), env)
    assert any(name in message for name in field), message


# --- bad files: each names its field --------------------------------------------------------


def test_unreadable_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope" / "gateway.yaml")
    assert missing in config_error(missing)
    assert str(tmp_path) in config_error(str(tmp_path))  # a directory


def test_missing_file_from_liutong_config_names_the_path(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_settings(None, {"LIUTONG_CONFIG": missing})


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("listen: {host: [\n", id="unclosed-flow"),
        pytest.param("listen:\n  port: 8080\n    host: x\n", id="bad-indentation"),
        pytest.param("a: b: c\n", id="nested-colon"),
        pytest.param("listen: !!python/object:os.system {}\n", id="unsafe-tag"),
    ],
)
def test_invalid_yaml_names_the_file(write, text):
    path = write(text)
    assert path in config_error(path)


def test_file_that_is_not_utf8_is_a_config_error(write):
    path = write("# café\nlisten: {port: 8080}\n".encode("latin-1"))
    assert path in config_error(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(write, text):
    path = write(text)
    message = config_error(path)
    assert path in message and "mapping" in message


BAD_FIELDS = [
    # unknown settings (typos must not be silently ignored)
    ("listn: {port: 8080}\n", "listn"),
    ("limits: {defaults: {rpm: 1}}\n", "limits.defaults"),
    ("limits: {default: {rpn: 1}}\n", "limits.default.rpn"),
    ("timeouts: {first_bite: 1}\n", "timeouts.first_bite"),
    ("models: {crimson-falcon-4: {upstream: [http://127.0.0.1:9001]}}\n", "models.crimson-falcon-4.upstream"),
    # limits
    ("limits: {default: {rpm: -1}}\n", "limits.default.rpm"),
    ("limits: {default: {tpm: -100}}\n", "limits.default.tpm"),
    ("limits: {default: {max_concurrent: 1.5}}\n", "limits.default.max_concurrent"),
    ("limits: {default: {rpm: lots}}\n", "limits.default.rpm"),
    # listen
    ("listen: {port: http}\n", "listen.port"),
    ("listen: {port: 80.5}\n", "listen.port"),
    ("listen: {port: 70000}\n", "listen.port"),
    ("listen: {port: -1}\n", "listen.port"),
    ("listen: {port: true}\n", "listen.port"),
    ("listen: 8080\n", "listen"),
    ("admin_listen: {port: x}\n", "admin_listen.port"),
    # upstreams
    ("models:\n  crimson-falcon-4:\n    upstreams: [http://127.0.0.1:9001, ftp://127.0.0.1:9002]\n",
     "models.crimson-falcon-4.upstreams[1]"),
    ("models:\n  crimson-falcon-4:\n    upstreams: [127.0.0.1:9001]\n", "models.crimson-falcon-4.upstreams[0]"),
    ("models:\n  crimson-falcon-4:\n    upstreams: ['http://']\n", "models.crimson-falcon-4.upstreams[0]"),
    ("models:\n  crimson-falcon-4:\n    upstreams: ['http://h:99999']\n", "models.crimson-falcon-4.upstreams[0]"),
    ("models:\n  crimson-falcon-4:\n    upstreams: [5]\n", "models.crimson-falcon-4.upstreams[0]"),
    ("models:\n  crimson-falcon-4:\n    upstreams: []\n", "models.crimson-falcon-4.upstreams"),
    ("models:\n  crimson-falcon-4:\n    upstreams: http://127.0.0.1:9001\n", "models.crimson-falcon-4.upstreams"),
    ("models:\n  crimson-falcon-4: {}\n", "models.crimson-falcon-4.upstreams"),
    ("models: [crimson-falcon-4]\n", "models"),
    # timeouts
    ("timeouts: {first_byte: -1}\n", "timeouts.first_byte"),
    ("timeouts: {connect: 0}\n", "timeouts.connect"),
    ("timeouts: {idle: soon}\n", "timeouts.idle"),
    ("timeouts: {total: .nan}\n", "timeouts.total"),
    ("timeouts: 30\n", "timeouts"),
    (MODELS_OK + "    timeouts: {idle: 0}\n", "models.crimson-falcon-4.timeouts.idle"),
    # the rest
    ("store_outage_policy: maybe\n", "store_outage_policy"),
    ("store_outage_policy: FAIL_OPEN\n", "store_outage_policy"),
    ("redis_url: http://127.0.0.1:6379\n", "redis_url"),
    ("redis_url: 127.0.0.1:6379\n", "redis_url"),
    ("redis_url: ''\n", "redis_url"),
    ("max_body_bytes: 0\n", "max_body_bytes"),
    ("max_body_bytes: 8MB\n", "max_body_bytes"),
    ("admission_overlap: sometimes\n", "admission_overlap"),
    ("admission_overlap: 2\n", "admission_overlap"),
]


@pytest.mark.parametrize(("text", "field"), BAD_FIELDS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_FIELDS)])
def test_bad_field_is_named(write, text, field):
    message = config_error(write(text))
    assert field in message, message


def test_bad_field_wins_over_good_ones(write):
    # One bad value among good ones still refuses the whole file.
    message = config_error(write(EXAMPLE.replace("rpm: 600", "rpm: -600")))
    assert "limits.default.rpm" in message


# --- the command line refuses to start ------------------------------------------------------


def _serve(config: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIUTONG_")}
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", config, "--host", "127.0.0.1", "--port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "env", "field"),
    [
        pytest.param("limits: {default: {rpm: -1}}\n", {}, "limits.default.rpm", id="negative-limit"),
        pytest.param("models:\n  crimson-falcon-4:\n    upstreams: [http://a:1, ftp://b:2]\n", {},
                     "models.crimson-falcon-4.upstreams[1]", id="bad-upstream"),  # fmt: skip
        pytest.param("listn: {}\n", {}, "listn", id="unknown-key"),
        pytest.param("listen: {port: 8080\n", {}, "gateway.yaml", id="invalid-yaml"),
        pytest.param(EXAMPLE, {"LIUTONG_TIMEOUTS_IDLE": "never"}, "timeouts.idle", id="bad-env"),
    ],
)
def test_serve_refuses_a_bad_config(write, text, env, field):
    result = _serve(write(text), env)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert field in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_serve_refuses_a_missing_config(tmp_path):
    missing = str(tmp_path / "absent.yaml")
    result = _serve(missing)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert missing in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_non_utf8_config(write):
    path = write("# café\nlisten: {port: 8080}\n".encode("latin-1"))
    result = _serve(path)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert path in result.stderr and "Traceback" not in result.stderr, result.stderr
