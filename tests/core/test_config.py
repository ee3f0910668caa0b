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


def test_limits_have_sensible_defaults_and_are_read_from_the_environment() -> None:
    config = Config()
    assert config.max_message_bytes == 1_000_000  # librdkafka's message.max.bytes
    assert config.max_model_bytes == 256 << 20
    assert (config.max_data_types, config.max_held_records) == (1000, 100_000)
    assert config.max_held_bytes == 64 << 20
    config = Config.from_env(
        {"WAXSERVE_MAX_MESSAGE_BYTES": "500000", "WAXSERVE_MAX_DATA_TYPES": "5"}
    )
    assert config.max_message_bytes == 500_000 and config.max_data_types == 5


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WAXSERVE_MAX_MESSAGE_BYTES": "100"}, "max_message_bytes must be >= 16384"),
        ({"WAXSERVE_MAX_MODEL_BYTES": "10"}, "max_model_bytes must be >= 1024"),
        ({"WAXSERVE_MAX_DATA_TYPES": "0"}, "max_data_types must be >= 1"),
        ({"WAXSERVE_MAX_HELD_BYTES": "-1"}, "max_held_records and max_held_bytes"),
        (
            {"WAXSERVE_KAFKA_MESSAGE_MAX_BYTES": "500000"},
            "above the producer's message.max.bytes=500000",
        ),
    ],
)
def test_bad_limits_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)
