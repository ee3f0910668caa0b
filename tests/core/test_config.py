"""Settings from the environment."""

from __future__ import annotations

import pytest

from dataflows.core.config import Config, ConfigError


def test_defaults_and_overrides_from_environment() -> None:
    config = Config.from_env(
        {
            "WAXSERVE_SHARDS": "16",
            "WAXSERVE_DRIFT_WINDOW_S": "5",
            "WAXSERVE_STOP_AT_END": "yes",
            "WAXSERVE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "WAXSERVE_KAFKA_SASL_MECHANISM": "PLAIN",
        }
    )
    assert config.shards == 16 and config.drift_window_s == 5.0 and config.stop_at_end
    assert config.client_config() == {
        "bootstrap.servers": config.brokers,
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
    }
    assert Config.from_env({}) == Config()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WAXSERVE_SHARDS": "many"}, "WAXSERVE_SHARDS='many': expected int"),
        ({"WAXSERVE_SHARDS": "0"}, "shards must be >= 1"),
        ({"WAXSERVE_STOP_AT_END": "maybe"}, "expected bool"),
        ({"WAXSERVE_MODEL_DIR": "/nonexistent/dir"}, "is not a directory"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)
