"""Settings from the environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dataflows.core.config import Config, ConfigError, log_level


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


# Each bad setting is one line: the variable, the value, what is allowed.
@pytest.mark.parametrize(
    "env, message",
    [
        ({"WAXSERVE_SHARDS": "many"}, "WAXSERVE_SHARDS='many': expected an integer"),
        ({"WAXSERVE_SHARDS": "0"}, "WAXSERVE_SHARDS=0: must be an integer >= 1"),
        ({"WAXSERVE_SHARDS": "7_4"}, "WAXSERVE_SHARDS='7_4': expected an integer"),
        ({"WAXSERVE_SHARDS": "\uff17"}, "WAXSERVE_SHARDS='\uff17': expected an integer"),
        ({"WAXSERVE_STOP_AT_END": "maybe"}, "WAXSERVE_STOP_AT_END='maybe': expected true or"),
        ({"WAXSERVE_MODEL_DIR": "/nonexistent/dir"}, "MODEL_DIR='/nonexistent/dir': not a dir"),
        ({"WAXSERVE_FETCH_WAIT_MS": "-1"}, "WAXSERVE_FETCH_WAIT_MS=-1: must be milliseconds >= 0"),
        ({"WAXSERVE_ONNX_THREADS": "0"}, "WAXSERVE_ONNX_THREADS=0: must be an integer from 1"),
        ({"WAXSERVE_NO_MODEL_WAIT_S": "nan"}, "WAXSERVE_NO_MODEL_WAIT_S='nan': expected a num"),
        ({"WAXSERVE_NO_MODEL_WAIT_S": "inf"}, "WAXSERVE_NO_MODEL_WAIT_S='inf': expected a num"),
        ({"WAXSERVE_DRIFT_ALPHA": "0"}, "WAXSERVE_DRIFT_ALPHA=0.0: must be a probability from"),
        ({"WAXSERVE_DRIFT_ALPHA": "0.9"}, "WAXSERVE_DRIFT_ALPHA=0.9: must be a probability from"),
        ({"WAXSERVE_DRIFT_PSI_THRESHOLD": "0.25"}, "WAXSERVE_DRIFT_PSI_THRESHOLD is no longer a "
         "waxserve setting: drift alarms come from calibrated tests now: set the family-wise "
         "false-alarm rate with WAXSERVE_DRIFT_ALPHA instead"),
        ({"WAXSERVE_STATS_INTERVAL_S": "0"}, "WAXSERVE_STATS_INTERVAL_S=0.0: must be seconds > 0"),
        ({"WAXSERVE_BROKERS": ""}, "WAXSERVE_BROKERS='': name at least one host:port"),
        ({"WAXSERVE_DELIVERY": "once"}, "WAXSERVE_DELIVERY='once': one of at-least-once, exa"),
        ({"WAXSERVE_RECORDS_TOPICS": ","}, "WAXSERVE_RECORDS_TOPICS=',': name at least one"),
        ({"WAXSERVE_SHARD": "4"}, "WAXSERVE_SHARD is not a waxserve setting; did you mean "
         "WAXSERVE_SHARDS"),
        ({"WAXSERVE_KAFKA_": "x"}, "WAXSERVE_KAFKA_ is not a waxserve setting"),
    ],
)  # fmt: skip
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_env(env)


def test_settings_that_are_not_config_fields_are_known() -> None:
    env = {"WAXSERVE_LOG_LEVEL": "debug", "WAXSERVE_CACHE_DIR": "/tmp", "WAXSERVE_KAFKA_ACKS": "1"}
    assert Config.from_env(env).kafka == {"acks": "1"}
    assert log_level(env) == "DEBUG"  # lower case, as ops habits go
    assert log_level({"WAXSERVE_LOG_LEVEL": "warn"}) == "WARNING"
    assert log_level({}) == "INFO"
    with pytest.raises(ConfigError, match=re.escape("WAXSERVE_LOG_LEVEL='verbose': one of DEBUG")):
        log_level({"WAXSERVE_LOG_LEVEL": "verbose"})


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
        ({"WAXSERVE_MAX_MESSAGE_BYTES": "100"}, "MAX_MESSAGE_BYTES=100: must be bytes >= 16384"),
        ({"WAXSERVE_MAX_MODEL_BYTES": "10"}, "WAXSERVE_MAX_MODEL_BYTES=10: must be bytes >= 1024"),
        ({"WAXSERVE_MAX_DATA_TYPES": "0"}, "WAXSERVE_MAX_DATA_TYPES=0: must be an integer >= 1"),
        ({"WAXSERVE_MAX_HELD_BYTES": "-1"}, "WAXSERVE_MAX_HELD_BYTES=-1: must be bytes >= 0"),
        (
            {"WAXSERVE_KAFKA_MESSAGE_MAX_BYTES": "500000"},
            "must not be above the producer's message.max.bytes (500000",
        ),
    ],
)
def test_bad_limits_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_env(env)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("WAXSERVE_SHARDS", "0", "waxserve: WAXSERVE_SHARDS=0: must be an integer >= 1"),
        ("WAXSERVE_LOG_LEVEL", "loud", "waxserve: WAXSERVE_LOG_LEVEL='loud': one of DEBUG"),
        ("WAXSERVE_BROKER", "x:1", "waxserve: WAXSERVE_BROKER is not a waxserve setting; did"),
    ],
)
def test_the_dataflow_refuses_a_bad_setting_in_one_line(
    name: str, value: str, message: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAXSERVE_")}
    done = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "dataflows.serving:flow"],
        cwd=Path(__file__).resolve().parents[2],
        env={**env, name: value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr


def test_signature_settings(tmp_path: Path) -> None:
    assert Config().signature_policy == "warn" and Config().trusted_keys_dir == ""
    with pytest.raises(ConfigError, match=r"WAXSERVE_SIGNATURE_POLICY='strict': one of require"):
        Config.from_env({"WAXSERVE_SIGNATURE_POLICY": "strict"})
    with pytest.raises(ConfigError, match="require needs WAXSERVE_TRUSTED_KEYS_DIR"):
        Config.from_env({"WAXSERVE_SIGNATURE_POLICY": "require"})
    missing = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="require needs WAXSERVE_TRUSTED_KEYS_DIR"):
        Config.from_env(
            {"WAXSERVE_SIGNATURE_POLICY": "require", "WAXSERVE_TRUSTED_KEYS_DIR": missing}
        )
    # Under warn, a Secret that is not mounted (yet) trusts nothing: allowed, and logged.
    Config.from_env({"WAXSERVE_TRUSTED_KEYS_DIR": missing})
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        Config.from_env({"WAXSERVE_TRUSTED_KEYS_DIR": str(tmp_path / "file")})
    config = Config.from_env(
        {"WAXSERVE_SIGNATURE_POLICY": "require", "WAXSERVE_TRUSTED_KEYS_DIR": str(tmp_path)}
    )
    assert config.signature_policy == "require"
    with pytest.raises(ConfigError, match=r"WAXSERVE_GATE_MAX_LATENCY_US=0\.0: must be"):
        Config.from_env({"WAXSERVE_GATE_MAX_LATENCY_US": "0"})
