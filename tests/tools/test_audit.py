"""`waxserve audit`: the report built from topics held in memory, then the command on a real
Kafka run (a signed model scores records; the audit follows one of them back)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from flowtools import (
    WINE_CONTRACT,
    descriptor,
    parse_csv_line,
    record_bytes,
    wine_lines,
    wine_record,
)

from dataflows.control.signing import generate_key_pair, load_private_key, sign
from dataflows.core.config import Config
from dataflows.core.descriptors import control_message
from dataflows.tools.audit import (
    Fetched,
    Msg,
    Query,
    audit,
    format_report,
    id_needle,
    parse_time,
)
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
T0 = 1_764_000_000_000


class MemoryTopics:
    """`Topics` over messages held in memory; a removed offset reads as compacted away."""

    def __init__(self) -> None:
        self.topics: dict[str, dict[int, list[Msg]]] = {}
        self.removed: set[tuple[str, int, int]] = set()

    def add(
        self,
        topic: str,
        value: bytes,
        *,
        partition: int = 0,
        headers: list[tuple[str, bytes | None]] | None = None,
        timestamp_ms: int = T0,
    ) -> Msg:
        log = self.topics.setdefault(topic, {}).setdefault(partition, [])
        msg = Msg(topic, partition, len(log), timestamp_ms, None, value, headers or [])
        log.append(msg)
        return msg

    def scan(
        self, topic: str, *, since_ms: int | None = None, until_ms: int | None = None
    ) -> Iterator[Msg]:
        for partition in sorted(self.topics.get(topic, {})):
            for msg in self.topics[topic][partition]:
                if (msg.topic, msg.partition, msg.offset) in self.removed:
                    continue
                ts = msg.timestamp_ms or 0
                if (since_ms is None or ts >= since_ms) and (until_ms is None or ts <= until_ms):
                    yield msg

    def fetch(self, topic: str, partition: int, offset: int) -> Fetched:
        if (topic, partition, offset) in self.removed:
            return Fetched(None, f"{topic} [{partition}] @ {offset} is gone (compacted away)")
        log = self.topics.get(topic, {}).get(partition, [])
        if offset >= len(log):
            return Fetched(None, "beyond the end")
        return Fetched(log[offset])


class World:
    """Topics as a dataflow leaves them: a contract and a signed wine-lr on the control
    topic, its events, wine records and their scored records with lineage."""

    def __init__(self, tmp: Path, *, lineage: bool = True) -> None:
        keys = tmp / "trusted"
        private, _public, self.key_id = generate_key_pair(keys, "ci")
        private.rename(tmp / private.name)
        self.trusted = keys
        self.desc = descriptor("wine-lr")
        sign(self.desc, load_private_key(tmp / private.name))
        self.topics = MemoryTopics()
        t = self.topics
        contract = t.add("control", control_message(WINE_CONTRACT.to_proto()))
        self.model_msg = t.add("control", control_message(self.desc), timestamp_ms=T0 + 5)
        gate = "quality gate: 64 reference rows scored, all valid"
        for event in (
            pb.ModelEvent(
                kind="contract_installed",
                data_type="wine",
                at_ms=T0 + 1,
                source_topic="control",
                source_offset=contract.offset,
                contract_version=WINE_CONTRACT.version,
            ),
            pb.ModelEvent(
                kind="installed",
                data_type="wine",
                model_name="wine-lr",
                model_version="1",
                model_sha256=self.desc.sha256,
                at_ms=T0 + 10,
                source_topic="control",
                source_offset=self.model_msg.offset,
                contract_version=WINE_CONTRACT.version,
                signer_key_id=self.key_id,
                signature_status="valid",
                gate=gate,
            ),
        ):
            t.add("events", event.SerializeToString())
        lines = wine_lines(0, 12)
        for i, value in enumerate(record_bytes(lines, "r")):
            source = t.add("records", value, partition=i % 2, timestamp_ms=T0 + 20 + i)
            scored = pb.ScoredRecord(
                output_key=f"records/{source.partition}/{source.offset}/wine-lr/1",
                record_id=f"r{i}",
                data_type="wine",
                source_topic="records",
                source_partition=source.partition,
                source_offset=source.offset,
                model_name="wine-lr",
                model_version="1",
                model_sha256=self.desc.sha256,
                value=5.0 + i / 10,
                scored_at_ms=T0 + 30 + i,
                batch_size=6,
                scored_by="host/1",
            )
            if lineage:
                scored.lineage.CopyFrom(
                    pb.Lineage(
                        control_topic="control",
                        control_offset=self.model_msg.offset,
                        signer_key_id=self.key_id,
                        signature_status="valid",
                        contract_version=WINE_CONTRACT.version,
                        decision="active",
                    )
                )
            t.add("scored", scored.SerializeToString(), partition=i % 2, timestamp_ms=T0 + 30 + i)

    def query(self, record_id: str, **changes: object) -> Query:
        base: dict[str, object] = {
            "record_id": record_id,
            "scored_topic": "scored",
            "control_topic": "control",
            "events_topic": "events",
            "dlq_topic": "dlq",
        }
        base.update(changes)
        return Query(**base)  # type: ignore[arg-type]


def test_a_scored_record_is_followed_to_its_input_descriptor_signer_and_profile(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    report = audit(world.topics, world.query("r3", trusted_keys=world.trusted))
    assert report.found and len(report.traces) == 1 and report.scanned == 12
    trace = report.traces[0]
    assert trace.scored["record_id"] == "r3" and trace.scored["value"] == pytest.approx(5.3)
    # The input, at the scored record's source position, decoded by contract v1.
    assert (trace.input.position.partition, trace.input.position.offset) == (1, 1)
    assert trace.input.found and trace.input.id_matches is True
    expected = parse_csv_line(wine_lines(3, 1)[0])
    assert trace.input.fields is not None
    assert trace.input.fields["alcohol"] == pytest.approx(expected["alcohol"])
    assert trace.input.fields["record_id"] == "r3"
    # The descriptor at the lineage's control position, its signature checked here.
    d = trace.descriptor
    assert d is not None and d.found
    assert (d.name, d.version, d.sha256, d.sha256_matches) == (
        "wine-lr",
        "1",
        world.desc.sha256,
        True,
    )
    assert d.signer_key_id == world.key_id and d.signature == "valid"
    assert d.profile is not None and d.profile.row_count == 1279
    assert len(d.profile.features) == 11
    assert trace.lineage is not None and trace.lineage["decision"] == "active"
    assert trace.contract is not None and trace.contract.version == WINE_CONTRACT.version
    assert trace.contract.found and trace.contract.installed is not None
    assert trace.installed is not None and trace.installed.gate.startswith("quality gate")
    assert [e.kind for e in trace.events] == ["installed"]
    text = format_report(report)
    for part in (
        "record 'r3': scored 1 time(s)",
        "input at records [1] @ 1",
        "alcohol=",
        "descriptor at control [0] @ 1",
        "wine-lr version 1 (onnx",
        "matches the scored record",
        f"signed by key {world.key_id}",
        "signature here: valid",
        "signature at scoring time: valid",
        "lineage: decision active, contract v1",
        "reference profile: 1,279 training rows, 11 features",
        "installed 2025-11-24",
    ):
        assert part in text, (part, text)
    assert orjson.loads(orjson.dumps(report.to_json()))["traces"][0]["input"]["id_matches"]


def test_signature_is_reported_unchecked_without_keys_and_unknown_with_other_keys(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    unchecked = audit(world.topics, world.query("r0")).traces[0].descriptor
    assert unchecked is not None and unchecked.signature == "not_checked"
    other = tmp_path / "other"
    generate_key_pair(other, "someone-else")[0].unlink()
    found = audit(world.topics, world.query("r0", trusted_keys=other)).traces[0].descriptor
    assert found is not None and found.signature == "unknown_key"
    assert world.key_id in found.signature_message


def test_a_descriptor_compacted_away_is_reported_gone_with_what_the_events_say(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    world.topics.removed.add(("control", 0, world.model_msg.offset))
    report = audit(world.topics, world.query("r1"))
    trace = report.traces[0]
    assert trace.descriptor is not None and not trace.descriptor.found
    assert "compacted" in trace.descriptor.note
    assert trace.installed is not None and trace.installed.signer_key_id == world.key_id
    assert "not readable" in format_report(report)


def test_every_scored_copy_is_reported_up_to_max_matches(tmp_path: Path) -> None:
    world = World(tmp_path)
    again = next(world.topics.scan("scored"))  # r0, scored again after a restart
    world.topics.add("scored", again.value or b"", timestamp_ms=T0 + 99)
    assert len(audit(world.topics, world.query("r0")).traces) == 2
    capped = audit(world.topics, world.query("r0", max_matches=1))
    assert len(capped.traces) == 1 and capped.more_matches == 1
    assert "(and 1 more)" in format_report(capped)
    assert not audit(world.topics, world.query("r0", data_type="penguins")).found
    # Time bounds narrow the scan of the scored topic.
    late = audit(world.topics, world.query("r0", since_ms=T0 + 50))
    assert len(late.traces) == 1 and late.scanned == 1


def test_a_record_scored_before_lineage_existed_is_traced_through_the_install_event(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, lineage=False)
    trace = audit(world.topics, world.query("r5")).traces[0]
    assert trace.lineage is None and "no lineage" in trace.lineage_note
    assert trace.descriptor is not None and trace.descriptor.found
    assert trace.descriptor.position.offset == world.model_msg.offset
    assert trace.input.id_matches is True  # decoded with the newest contract


def test_an_unscored_record_is_looked_for_among_the_dead_letters(tmp_path: Path) -> None:
    world = World(tmp_path)
    t = world.topics
    bad = wine_record(parse_csv_line(wine_lines(20, 1)[0]), record_id="lost-1")
    similar = wine_record(parse_csv_line(wine_lines(21, 1)[0]), record_id="lost-10")

    def letter(value: bytes, offset: int, reason: str) -> None:
        t.add(
            "dlq",
            value,
            headers=[
                ("waxserve.stage", b"score"),
                ("waxserve.error.class", reason.encode()),
                ("waxserve.error.message", b"detail"),
                ("waxserve.source.topic", b"records"),
                ("waxserve.source.partition", b"0"),
                ("waxserve.source.offset", str(offset).encode()),
                ("waxserve.data_type", b"wine"),
            ],
        )

    letter(similar, 40, "missing_feature")  # its bytes contain "lost-1" too
    letter(bad, 41, "missing_feature")
    letter(b"\xff\x00 not a record", 42, "undecodable")
    report = audit(t, world.query("lost-1"))
    assert not report.found and report.traces == []
    assert [d.source.offset for d in report.dead_letters if d.source] == [41]
    assert report.dead_letters[0].confirmed and report.dead_letters[0].reason == "missing_feature"
    # A record without an id field is known by its position.
    by_position = audit(t, world.query("records/0/42"))
    assert [d.reason for d in by_position.dead_letters] == ["undecodable"]
    text = format_report(report)
    assert "no scored record" in text and "it was dead-lettered" in text
    nothing = audit(t, world.query("never-sent"))
    assert "no dead letter has it either" in format_report(nothing)


def test_the_id_needle_is_how_protobuf_writes_the_id() -> None:
    for record_id in ("r1", "ü" * 70, "x" * 200):
        assert id_needle(record_id) in pb.ScoredRecord(record_id=record_id).SerializeToString()


def test_time_bounds() -> None:
    now = T0
    assert parse_time("15m", now) == now - 15 * 60_000
    assert parse_time("2h", now) == now - 7_200_000
    assert parse_time("1.5d", now) == now - int(1.5 * 86_400_000)
    assert parse_time(str(T0)) == T0
    assert parse_time("2025-11-24T16:00:00Z") == 1_764_000_000_000
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


# --- on Kafka ----------------------------------------------------------------------------


@pytest.mark.integration
def test_audit_on_a_kafka_run_follows_a_record_to_its_signed_model(
    kafka_config: Config, tmp_path: Path
) -> None:
    from test_integration import Dataflow, Reader, produce, publish

    config = kafka_config
    keys = tmp_path / "trusted"
    private, _public, key_id = generate_key_pair(keys, "release")
    private = private.rename(tmp_path / private.name)
    desc = descriptor("wine-lr")
    sign(desc, load_private_key(private))
    publish(config, desc)  # the contract at offset 0, the descriptor at 1
    reader = Reader(config, config.scored_topic, config.events_topic)
    flow = Dataflow(
        config,
        tmp_path,
        WAXSERVE_SIGNATURE_POLICY="require",
        WAXSERVE_TRUSTED_KEYS_DIR=str(keys),
    )
    try:
        produce(config, config.records_topic, record_bytes(wine_lines(0, 50), "k"), partitions=2)
        reader.wait_for("50 scored", lambda: len(reader.scored(config)) >= 50, flow)
    finally:
        flow.stop()
        reader.close()
    target = next(s for s in reader.scored(config) if s.record_id == "k7")
    assert target.lineage.signer_key_id == key_id and target.lineage.control_offset == 1

    def waxserve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dataflows.tools.cli", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    found = waxserve("audit", "k7", "--trusted-keys", str(keys))
    assert found.returncode == 0, found.stderr
    text = found.stdout
    source = f"{config.records_topic} [{target.source_partition}] @ {target.source_offset}"
    for part in (
        "record 'k7': scored 1 time(s)",
        f"input at {source}",
        "record_id=k7",
        f"descriptor at {config.control_topic} [0] @ 1",
        "wine-lr version 1",
        "matches the scored record",
        f"signed by key {key_id}",
        "signature here: valid",
        "signature at scoring time: valid",
        f"lineage: decision active, contract v{WINE_CONTRACT.version}",
        "reference profile: 1,279 training rows, 11 features",
    ):
        assert part in text, (part, text)
    as_json = waxserve("audit", "k7", "--json", "--data-type", "wine")
    assert as_json.returncode == 0, as_json.stderr
    report = orjson.loads(as_json.stdout)
    trace = report["traces"][0]
    assert trace["input"]["position"]["offset"] == target.source_offset
    assert trace["input"]["id_matches"] is True
    assert trace["descriptor"]["signer_key_id"] == key_id
    assert trace["lineage"]["contract_version"] == WINE_CONTRACT.version
    assert trace["descriptor"]["profile"]["row_count"] == 1279
    assert trace["installed"]["kind"] == "installed"
    missing = waxserve("audit", "no-such-record")
    assert missing.returncode == 1
    assert "no scored record" in missing.stdout and "no dead letter has it either" in missing.stdout
