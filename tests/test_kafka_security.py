"""waxserve on a Kafka listener with SASL/SCRAM-SHA-512 over TLS, set up as the README says:
`WAXSERVE_KAFKA_SECURITY_PROTOCOL`, `_SASL_MECHANISM`, `_SASL_USERNAME`, `_SASL_PASSWORD`
and `_SSL_CA_LOCATION`, nothing else.

The session's broker (`conftest.broker`) listens with SASL_SSL too: a throw-away CA signed
its certificate, and its SCRAM user was created when its storage was formatted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import topics_config
from flowtools import record_bytes, wine_lines
from test_integration import REPO, Dataflow, Reader, produce

from dataflows.core.config import Config
from dataflows.tools.cli import main as waxserve
from dataflows.tools.kafka_server import ApacheKafka, SecureListener

pytestmark = pytest.mark.integration


def _listener(broker: ApacheKafka) -> SecureListener:
    assert broker.secure_listener is not None, "the session broker has no SASL_SSL listener"
    return broker.secure_listener


@pytest.fixture
def secure_config(broker: ApacheKafka, monkeypatch: pytest.MonkeyPatch) -> Config:
    """Topics of this test's own, created through the SASL_SSL listener; the environment
    holds the WAXSERVE_KAFKA_* settings a user would set."""
    listener = _listener(broker)
    settings = listener.client_config()
    return topics_config(settings.pop("bootstrap.servers"), monkeypatch, **settings)


def test_the_environment_is_what_the_readme_tells_users_to_set(secure_config: Config) -> None:
    env = {k: v for k, v in os.environ.items() if k.startswith("WAXSERVE_KAFKA_")}
    assert set(env) == {
        "WAXSERVE_KAFKA_SECURITY_PROTOCOL",
        "WAXSERVE_KAFKA_SASL_MECHANISM",
        "WAXSERVE_KAFKA_SASL_USERNAME",
        "WAXSERVE_KAFKA_SASL_PASSWORD",
        "WAXSERVE_KAFKA_SSL_CA_LOCATION",
    }
    assert env["WAXSERVE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["WAXSERVE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert Config.from_env().client_config() == secure_config.client_config()


def test_records_are_published_and_scored_through_the_sasl_ssl_listener(
    secure_config: Config, broker: ApacheKafka, tmp_path: Path
) -> None:
    config = secure_config
    assert config.brokers == _listener(broker).bootstrap != broker.bootstrap
    # The CLI publishes with the settings from the environment, like a user's shell.
    assert waxserve(["contract", "publish", "wine"]) == 0
    assert waxserve(["publish", "wine-lr"]) == 0
    reader = Reader(config, config.scored_topic, config.events_topic, config.dlq_topic)
    flow = Dataflow(config, tmp_path)  # WAXSERVE_KAFKA_* in its environment (config_env)
    try:
        reader.wait_for("wine-lr installed", lambda: len(reader.events(config)) >= 2, flow)
        produce(config, config.records_topic, record_bytes(wine_lines(0, 200)), partitions=2)
        reader.wait_for("200 scored", lambda: len(reader.scored(config)) >= 200, flow)
        reader.read(1.0)
    finally:
        flow.stop()
        reader.close()
    scored = reader.scored(config)
    assert len({s.output_key for s in scored}) == len(scored) == 200
    assert Counter(s.model_name for s in scored) == {"wine-lr": 200}
    assert reader.seen[config.dlq_topic] == []


def test_a_wrong_password_is_a_clear_error(
    secure_config: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WAXSERVE_KAFKA_SASL_PASSWORD", "not-the-password")
    started = time.monotonic()
    assert waxserve(["topics"]) == 1
    err = capsys.readouterr().err
    assert "refused the authentication" in err, err
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in err, err
    assert "WAXSERVE_KAFKA_SASL_USERNAME / _PASSWORD" in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert time.monotonic() - started < 30
    assert waxserve(["publish", "wine-lr"]) == 1
    assert "refused the authentication" in capsys.readouterr().err


def test_the_dataflow_with_a_wrong_password_stops(secure_config: Config, tmp_path: Path) -> None:
    """It must not wait forever for input it may not read: it stops, with an error."""
    env = dict(os.environ)
    env["WAXSERVE_KAFKA_SASL_PASSWORD"] = "not-the-password"
    env["WAXSERVE_STATE_ADDR"] = ""
    env["BYTEWAX_DATAFLOW_API_CACHE_PATH"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "dataflows.serving:flow"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0, done.stdout[-2000:]


def test_a_client_without_the_ca_is_refused(
    secure_config: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The system's CAs do not know the broker's: the TLS handshake fails, and says so.
    monkeypatch.delenv("WAXSERVE_KAFKA_SSL_CA_LOCATION")
    assert waxserve(["topics"]) == 1
    err = capsys.readouterr().err
    assert "refused the TLS handshake" in err and "certificate verify failed" in err, err
