"""The `waxserve` command line, against a real tansu broker where it needs one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from dataflows.contracts.decode import ContractCodecs
from dataflows.contracts.files import read_contract_file
from dataflows.contracts.schema import Contract
from dataflows.core.config import Config
from dataflows.core.descriptors import (
    MODELS_DIR,
    catalog_contracts,
    control_message,
    load_catalog,
    sha256_hex,
)
from dataflows.tools.broker import free_port
from dataflows.tools.cli import main
from dataflows.tools.replay import Pacer
from protos import waxserve_pb2 as pb

WINE = Contract.from_proto(read_contract_file(catalog_contracts()["wine"]))
WINE_COLUMNS = WINE.csv_columns

ROOT = Path(__file__).resolve().parents[2]
ERROR_CSV = MODELS_DIR / "data" / "error_winequality_red.csv"
WINE_CSV = MODELS_DIR / "data" / "winequality_red.csv"
REPO = Path(__file__).resolve().parents[2]
PMML_LR = MODELS_DIR / "pmml" / "winequalityLinearRegression.pmml"


def _catalog_model() -> tuple[str, Path]:
    """What to publish: wine-lr from the catalog, or the PMML file when there is no catalog."""
    try:
        entry = load_catalog().get("wine-lr")
    except FileNotFoundError:
        entry = None
    if entry is None or not entry.path().is_file():
        return str(PMML_LR), PMML_LR
    return entry.name, entry.path()


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _header(msg, name: str) -> bytes | None:
    return dict(msg.headers() or []).get(name)


# --- no broker needed ---------------------------------------------------------------------


def test_help_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    for command in ("broker", "topics", "publish", "replay", "tail", "demo"):
        assert main([command, "--help"]) == 0
        assert "--brokers" in capsys.readouterr().out
    for action in ("derive", "publish", "show"):
        assert main(["contract", action, "--help"]) == 0
    assert main([]) == 2
    assert main(["replay"]) == 2  # argparse: CSV is required


def test_unreachable_broker_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    brokers = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["tail", "scored", "--brokers", brokers]) == 1
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("waxserve tail: error:") and brokers in err


def test_version_and_bad_settings_are_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("waxserve 0.")
    assert main(["topics", "--brokers", ""]) == 1
    assert (
        capsys.readouterr().err
        == "waxserve topics: error: --brokers '': name at least one host:port\n"
    )
    monkeypatch.setenv("WAXSERVE_SHARDZ", "3")
    assert main(["topics"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean WAXSERVE_SHARDS?" in err


def test_publish_unknown_model_lists_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        names = sorted(load_catalog())
    except FileNotFoundError:
        pytest.skip("no models/catalog.json yet")
    assert main(["publish", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err
    assert all(name in err for name in names)


def test_publish_dry_run_sends_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    # No broker at this address: a dry run must not need one.
    assert main(["publish", "wine-lr", "--dry-run", "--brokers", "127.0.0.1:1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would publish wine-lr version 1 to ")
    assert out.splitlines()[-1] == "dry run: nothing sent"
    assert main(["contract", "publish", "penguins", "--dry-run", "--brokers", "127.0.0.1:1"]) == 0
    out = capsys.readouterr().out
    assert "would publish the penguins contract v1" in out


def test_publish_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["publish", str(tmp_path / "nope.onnx")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_replay_missing_csv(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["replay", str(tmp_path / "nope.csv"), "--data-type", "wine"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_replay_needs_to_know_the_data_type(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(ERROR_CSV)]) == 1
    assert "--data-type or --contract" in capsys.readouterr().err
    assert main(["replay", str(ERROR_CSV), "--data-type", "beer"]) == 1
    assert "no contract for data type 'beer'" in capsys.readouterr().err


def test_pacer_keeps_the_rate_without_drift() -> None:
    pacer = Pacer(1000.0)
    started = time.monotonic()
    for _ in range(200):
        pacer.wait()
    elapsed = time.monotonic() - started
    assert 0.19 <= elapsed < 0.5


# --- publish ------------------------------------------------------------------------------


@pytest.mark.integration
def test_publish_catalog_model_and_tail_it(
    kafka_config: Config, consume, capsys: pytest.CaptureFixture[str]
) -> None:
    model, path = _catalog_model()
    model_bytes = path.read_bytes()
    digest = sha256_hex(model_bytes)

    assert main(["publish", model]) == 0
    out = capsys.readouterr().out
    assert digest in out and f"{len(model_bytes)} bytes" in out

    (msg,) = consume(kafka_config, kafka_config.control_topic, expect=1)
    assert msg.key() == b"model/wine/wine-lr"  # compaction keeps the newest per model
    desc = pb.ControlMessage.FromString(msg.value()).model
    assert desc.sha256 == digest
    assert desc.model_bytes == model_bytes
    assert desc.data_type == "wine"
    assert desc.version
    if model == "wine-lr":
        assert desc.name == "wine-lr"
        assert desc.format == pb.MODEL_FORMAT_ONNX
        assert len(desc.input_features) == 11
        assert desc.reference_profile.features

    assert main(["tail", "control", "--from-beginning", "--limit", "1", "--timeout", "10"]) == 0
    (line,) = _json_lines(capsys.readouterr().out)
    assert line["topic"] == kafka_config.control_topic
    expected = (0, msg.offset(), "model/wine/wine-lr")
    assert (line["partition"], line["offset"], line["key"]) == expected
    value = line["value"]["model"]
    assert "model_bytes" not in value
    assert value["model_bytes_size"] == len(model_bytes)
    assert value["model_bytes_sha256_ok"] is True
    assert value["sha256"] == digest and value["name"] == desc.name


@pytest.mark.integration
def test_publish_file_by_reference_with_overrides(
    kafka_config: Config, consume, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "publish",
        str(PMML_LR),
        "--name",
        "lr-ref",
        "--version",
        "7",
        "--data-type",
        "wine",
        "--description",
        "by reference",
        "--input-features",
        "fixed_acidity,alcohol",
        "--by-reference",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "WAXSERVE_MODEL_DIR" in out
    (msg,) = consume(kafka_config, kafka_config.control_topic, expect=1)
    desc = pb.ControlMessage.FromString(msg.value()).model
    assert (desc.name, desc.version, desc.description) == ("lr-ref", "7", "by reference")
    assert list(desc.input_features) == ["fixed_acidity", "alcohol"]
    assert desc.WhichOneof("source") == "location"
    assert desc.location == PMML_LR.resolve().as_uri()
    assert desc.sha256 == sha256_hex(PMML_LR.read_bytes())
    assert desc.format == pb.MODEL_FORMAT_PMML


def test_publish_a_file_needs_its_data_type(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", str(PMML_LR)]) == 1
    assert "--data-type" in capsys.readouterr().err


# --- replay -------------------------------------------------------------------------------


def _decoded(value: bytes, headers: list[tuple[str, bytes | None]]) -> dict[str, object]:
    """A wine record as field values, decoded with the wine contract."""
    decoded = ContractCodecs(WINE).decode([value], [headers])
    assert decoded.errors == {}
    row: dict[str, object] = {}
    for name, number in zip(WINE.numeric_fields, decoded.numeric[0].tolist(), strict=True):
        if number == number:
            row[name] = number
    for name, text in zip(WINE.text_fields, decoded.text[0].tolist(), strict=True):
        if text is not None:
            row[name] = text
    return row


@pytest.mark.integration
def test_replay_error_csv_in_the_contract_encoding(
    kafka_config: Config, consume, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ERROR_CSV.read_text().splitlines()
    assert main(["replay", str(ERROR_CSV), "--data-type", "wine", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"sent {len(lines)} wine records (protobuf)" in out
    assert "1 line(s) did not parse" in out
    assert "delivery failures: 0" in out

    messages = consume(kafka_config, kafka_config.records_topic, expect=len(lines))
    assert len(messages) == len(lines)
    assert {m.partition() for m in messages} <= {0, 1}
    by_key = {m.key().decode(): m for m in messages}
    assert set(by_key) == {f"error_winequality_red-{n}" for n in range(1, len(lines) + 1)}
    assert {_header(m, "data-type") for m in messages} == {b"wine"}

    # Line 2 lacks columns: it goes out raw, marked text/csv, for the dataflow's DLQ.
    raw = by_key["error_winequality_red-2"]
    assert _header(raw, "content-type") == b"text/csv"
    assert raw.value() == lines[1].encode()

    for number in [1, *range(3, len(lines) + 1)]:
        msg = by_key[f"error_winequality_red-{number}"]
        assert _header(msg, "content-type") is None  # the contract's own encoding
        record = _decoded(msg.value(), [])
        assert record["record_id"] == f"error_winequality_red-{number}"
        assert record["event_time_ms"] > 0  # type: ignore[operator]
        # Line 3 lacks column 0, line 4 column 1, ...; line 1 is complete.
        empty = WINE_COLUMNS[number - 3] if number >= 3 else None
        for column in WINE_COLUMNS:
            assert (column in record) == (column != empty), (number, column)
    assert _decoded(by_key["error_winequality_red-1"].value(), [])["alcohol"] == 9.4


@pytest.mark.integration
def test_replay_json_marks_content_type(
    kafka_config: Config, consume, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["replay", str(ERROR_CSV), "--data-type", "wine", "--format", "json", "--limit", "3"]
    assert main([*args, "-q"]) == 0
    messages = consume(kafka_config, kafka_config.records_topic, expect=3)
    by_key = {m.key().decode(): m for m in messages}
    assert len(by_key) == 3
    good = by_key["error_winequality_red-1"]
    assert _header(good, "content-type") == b"application/json"
    doc = json.loads(good.value())
    assert doc["record_id"] == "error_winequality_red-1" and doc["quality"] == 5.0
    assert _header(by_key["error_winequality_red-2"], "content-type") == b"text/csv"
    assert "fixed_acidity" not in json.loads(by_key["error_winequality_red-3"].value())


@pytest.mark.integration
def test_contract_derive_publish_and_show(
    kafka_config: Config, consume, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sample = tmp_path / "readings.csv"
    sample.write_text("sensor,site,temperature,ok\ns1,north,21.5,true\ns2,south,19.0,false\n")
    contract_file = tmp_path / "readings.json"
    derive = ["contract", "derive", str(sample), "--data-type", "readings"]
    assert main([*derive, "--id-field", "sensor", "-o", str(contract_file)]) == 0
    derived = Contract.from_proto(read_contract_file(contract_file))
    assert [(f.name, f.type.value) for f in derived.fields] == [
        ("sensor", "string"),
        ("site", "string"),
        ("temperature", "float"),
        ("ok", "boolean"),
    ]
    assert derived.id_field == "sensor" and derived.field_named("site").categories == (
        "north",
        "south",
    )
    assert main(["contract", "publish", str(contract_file)]) == 0
    assert "published the readings contract v1" in capsys.readouterr().out
    (msg,) = consume(kafka_config, kafka_config.control_topic, expect=1)
    assert msg.key() == b"contract/readings"  # compaction keeps the newest contract
    sent = pb.ControlMessage.FromString(msg.value()).contract
    assert Contract.from_proto(sent).fields == derived.fields
    # `show` prints what the dataflow's events say it installed: here, a stand-in event.
    from confluent_kafka import Producer

    event = pb.ModelEvent(
        kind="contract_installed",
        data_type="readings",
        source_topic=kafka_config.control_topic,
        source_offset=msg.offset(),
        contract_version=1,
    )
    producer = Producer({"bootstrap.servers": kafka_config.brokers})
    producer.produce(kafka_config.events_topic, key=b"readings", value=event.SerializeToString())
    assert producer.flush(10) == 0
    capsys.readouterr()
    assert main(["contract", "show", "readings"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dataType"] == "readings" and len(shown["fields"]) == 4
    assert main(["contract", "show", "nothing-here"]) == 1
    assert control_message(sent) == msg.value()


@pytest.mark.integration
def test_replay_rate_paces_records(
    kafka_config: Config, consume, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    args = ["replay", str(WINE_CSV), "--data-type", "wine", "--rate", "200", "--limit", "100"]
    assert main([*args, "-q"]) == 0
    elapsed = time.monotonic() - started
    assert elapsed >= 0.35  # 100 records at 200/s: ~0.5 s
    assert "sent 100 wine records" in capsys.readouterr().out
    assert len(consume(kafka_config, kafka_config.records_topic, expect=100)) == 100


@pytest.mark.integration
def test_replay_loop_makes_unique_ids(
    kafka_config: Config, consume, capsys: pytest.CaptureFixture[str]
) -> None:
    n = len(ERROR_CSV.read_text().splitlines())
    args = ["replay", str(ERROR_CSV), "--data-type", "wine", "--loop", "--limit", str(n + 2)]
    assert main([*args, "-q"]) == 0
    keys = {m.key() for m in consume(kafka_config, kafka_config.records_topic, expect=n + 2)}
    assert len(keys) == n + 2
    assert b"error_winequality_red-1-pass2" in keys


STOP_REQUESTS_CHILD = """
import collections, os, random, subprocess, sys
from confluent_kafka import Producer
from dataflows.tools.replay import StopRequests

producer = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0,
                     "queue.buffering.max.messages": 10_000_000})
headers = [("content-type", "application/json"), ("data-type", "wine")]
outcomes = collections.Counter()
for trial in range(int(sys.argv[1])):
    # The killer starts inside StopRequests: on a busy machine its signal can arrive
    # before Popen returns, and it must then be deferred like one during produce().
    with StopRequests() as stops:
        kill = subprocess.Popen(["bash", "-c", f"sleep {random.uniform(0.005, 0.03):.4f}; "
                                 f"kill -INT {os.getpid()}"])
        try:
            while True:
                stops.check()
                producer.produce("t", b"v" * 100, key=b"k", headers=headers)
        except KeyboardInterrupt:
            outcomes["stopped where asked"] += 1
        except Exception as exc:
            outcomes[f"{type(exc).__name__}: {exc}"] += 1
    kill.wait()
print(dict(outcomes))
"""


def test_ctrl_c_during_produce_waits_for_the_stop_check() -> None:
    # Without StopRequests, half of these Ctrl-Cs came out of produce() as TypeError
    # "expected header key to be unicode string" (confluent-kafka reading the headers runs
    # the signal handlers): `waxserve replay` exited 1 with a traceback.
    trials = 60
    child = subprocess.run(
        [sys.executable, "-c", STOP_REQUESTS_CHILD, str(trials)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == str({"stopped where asked": trials}), child.stdout


@pytest.mark.integration
def test_ctrl_c_stops_replay_with_what_it_sent_delivered(
    kafka_config: Config, consume, tmp_path: Path
) -> None:
    log = (tmp_path / "replay.log").open("w+")
    command = [sys.executable, "-m", "dataflows.tools.cli", "replay", str(WINE_CSV)]
    proc = subprocess.Popen(
        [*command, "--data-type", "wine", "--loop", "-q"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        admin = AdminClient({"bootstrap.servers": kafka_config.brokers})
        deadline = time.monotonic() + 60
        while _topic_size(admin, kafka_config.records_topic) < 5_000:  # full speed, looping
            assert proc.poll() is None and time.monotonic() < deadline, log.name
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    output = log.read()
    assert "Traceback" not in output, output
    assert "delivery failures: 0" in output, output
    sent = int(output.split("sent ", 1)[1].split()[0])
    assert "before Ctrl-C" in output, output
    assert len(consume(kafka_config, kafka_config.records_topic, expect=sent)) == sent


def _topic_size(admin: AdminClient, topic: str) -> int:
    """Messages in `topic`, all partitions (high watermarks); 0 while the broker cannot
    say (a new topic's partitions answer NOT_LEADER_FOR_PARTITION for a moment)."""
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    asked = {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions}
    try:
        return sum(f.result(10).offset for f in admin.list_offsets(asked).values())
    except KafkaException:
        return 0


# --- tail and topics ----------------------------------------------------------------------


@pytest.mark.integration
def test_tail_limit_prints_json_lines(
    kafka_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(ERROR_CSV), "--data-type", "wine", "--format", "json", "-q"]) == 0
    capsys.readouterr()
    assert main(["tail", "records", "--from-beginning", "--limit", "5", "--timeout", "10"]) == 0
    lines = _json_lines(capsys.readouterr().out)
    assert len(lines) == 5
    for line in lines:
        assert line["topic"] == kafka_config.records_topic
        assert {"partition", "offset", "key", "value", "content_type"} <= set(line)
        assert ["data-type", "wine"] in line["headers"]
        if line["content_type"] == "text/csv":
            assert line["value"] == ERROR_CSV.read_text().splitlines()[1]
        else:
            assert line["value"]["record_id"] == line["key"]


@pytest.mark.integration
def test_tail_dlq_shows_headers_and_original_bytes(
    kafka_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka_config.brokers, "linger.ms": 5})
    headers: list[tuple[str, str | bytes | None]] = [
        ("waxserve.stage", b"decode"),
        ("waxserve.error.class", b"undecodable"),
    ]
    producer.produce(kafka_config.dlq_topic, key=b"k1", value=b"\xff\x00bad", headers=headers)
    producer.produce(kafka_config.dlq_topic, key=b"k1", value=b"7.4;0.7", headers=headers)
    assert producer.flush(10) == 0
    assert main(["tail", "dlq", "--from-beginning", "--limit", "2", "--timeout", "10"]) == 0
    first, second = _json_lines(capsys.readouterr().out)
    assert first["headers"] == [
        ["waxserve.stage", "decode"],
        ["waxserve.error.class", "undecodable"],
    ]
    assert first["value"] == {"base64": "/wBiYWQ="}  # marked: never mistaken for text
    assert second["value"] == "7.4;0.7"
    assert first["key"] == "k1" and first["topic"] == kafka_config.dlq_topic


@pytest.mark.integration
def test_tail_keeps_repeated_headers_and_marks_binary_bytes(
    kafka_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka_config.brokers})
    headers: list[tuple[str, str | bytes | None]] = [
        ("trace", b"a"),
        ("bin", b"\x00\xfe"),
        ("trace", b"b"),
        ("empty", None),
    ]
    # A text value that looks like base64, and a binary key: only the marker tells them apart.
    producer.produce(kafka_config.dlq_topic, key=b"\xff", value=b"QUJD", headers=headers)
    assert producer.flush(10) == 0
    assert main(["tail", "dlq", "-o", "beginning", "-e"]) == 0
    (line,) = _json_lines(capsys.readouterr().out)
    assert line["headers"] == [
        ["trace", "a"],
        ["bin", {"base64": "AP4="}],
        ["trace", "b"],
        ["empty", None],
    ]
    assert line["key"] == {"base64": "/w=="}
    assert line["value"] == "QUJD"
    assert line["partition"] == 0 and line["offset"] == 0


@pytest.mark.integration
def test_tail_kcat_offsets_count_and_exit_at_end(
    kafka_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka_config.brokers})
    for i in range(10):
        producer.produce(kafka_config.dlq_topic, key=f"k{i}".encode(), value=b"x", partition=0)
    producer.produce(kafka_config.dlq_topic, key=b"p1", value=b"y", partition=1)
    assert producer.flush(10) == 0

    def offsets(*args: str) -> list[tuple[int, int]]:
        assert main(["tail", "dlq", *args]) == 0
        lines = _json_lines(capsys.readouterr().out)
        return sorted((line["partition"], line["offset"]) for line in lines)

    # -e: every partition to its end, then exit (no --timeout, no Ctrl-C).
    assert offsets("-o", "beginning", "-e") == [(0, i) for i in range(10)] + [(1, 0)]
    assert offsets("--from-beginning", "-e") == [(0, i) for i in range(10)] + [(1, 0)]
    # -N: the last N of each partition (fewer where there are fewer).
    assert offsets("-o", "-3", "-e") == [(0, 7), (0, 8), (0, 9), (1, 0)]
    # An absolute offset, in every partition that has it.
    assert offsets("-o", "8", "-e") == [(0, 8), (0, 9)]
    # -c N (and its old name --limit): N messages in all.
    assert len(offsets("-o", "beginning", "-c", "4")) == 4
    assert len(offsets("-o", "beginning", "--limit", "2")) == 2
    # -o end -e: nothing new, so it ends at once.
    assert offsets("-o", "end", "-e") == []


def test_tail_rejects_an_unknown_offset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tail", "scored", "-o", "middle"]) == 2
    assert "beginning, end, an offset N or -N" in capsys.readouterr().err


@pytest.mark.integration
def test_tail_timeout_stops_on_silence(
    kafka_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    assert main(["tail", "scored", "--from-beginning", "--timeout", "0.5"]) == 0
    assert 0.4 <= time.monotonic() - started < 5
    assert capsys.readouterr().out == ""


@pytest.mark.integration
def test_tail_without_from_beginning_shows_only_new_messages(
    kafka_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from confluent_kafka import Producer

    # Old messages in one produce batch: tansu's OFFSET_END would serve most of them again.
    assert main(["replay", str(ERROR_CSV), "--data-type", "wine", "-q"]) == 0
    codes: list[int] = []
    argv = ["tail", "records", "-c", "3", "--timeout", "30"]
    tail = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    tail.start()
    # New messages until the tail has 3, however long it takes to start: the first ones
    # may come before it looks, so which new ones it shows is open, but never an old one.
    producer = Producer({"bootstrap.servers": kafka_config.brokers})
    deadline = time.monotonic() + 120
    sent = 0
    while tail.is_alive() and time.monotonic() < deadline:
        key = f"new-{sent}".encode()
        producer.produce(kafka_config.records_topic, key=key, value=b"{}", partition=sent % 2)
        assert producer.flush(10) == 0
        sent += 1
        tail.join(0.2)
    assert codes == [0]
    keys = [line["key"] for line in _json_lines(capsys.readouterr().out)]
    assert len(keys) == 3 and all(key.startswith("new-") for key in keys), keys


@pytest.mark.integration
def test_topics_command_creates_topics(
    kafka_config: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = {
        name: value + "-fresh"
        for name, value in os.environ.items()
        if name.startswith("WAXSERVE_") and name.endswith("_TOPIC")
    }
    fresh["WAXSERVE_RECORDS_TOPICS"] = kafka_config.records_topic + "-fresh"
    for name, value in fresh.items():
        monkeypatch.setenv(name, value)
    assert main(["topics", "--partitions", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("created") == len(fresh)  # every *_topic setting and the records topic
    topics = AdminClient({"bootstrap.servers": kafka_config.brokers}).list_topics(timeout=5).topics
    assert len(topics[fresh["WAXSERVE_CONTROL_TOPIC"]].partitions) == 1
    assert len(topics[fresh["WAXSERVE_RECORDS_TOPICS"]].partitions) == 3
    assert len(topics[fresh["WAXSERVE_DLQ_TOPIC"]].partitions) == 3
    assert main(["topics"]) == 0
    assert capsys.readouterr().out.count("exists") == len(fresh)


@pytest.mark.integration
def test_broker_command_runs_until_interrupted(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAXSERVE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataflows.tools.cli", "broker", "--port", "0", "--create-topics"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        output = []
        for line in proc.stdout:
            output.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(output)
        export = next(line for line in output if "export WAXSERVE_BROKERS=" in line)
        bootstrap = export.strip().split("=", 1)[1]
        assert "waxserve-control: 1 partition(s)" in text
        topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).topics
        assert "waxserve-records" in topics
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    refused = main(["tail", "scored", "--brokers", bootstrap])
    assert refused == 1
