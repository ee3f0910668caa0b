"""Where waxserve's CPU goes per record, stage by stage, in-process and without a broker.

`python -m bench breakdown` times waxserve's own per-batch functions on 1,000-record batches
of the bench's inputs (`bench/inputs.py`: the records `waxserve replay` writes), and the
parts of a hand-tuned loop doing the same job, so the throughput gap in the bench report
can be read as a sum of measured parts. The shard's work on a run of records is
`ShardScorer.on_values([RawRun])`; here it is taken apart:

- route: `DataTypeRouter.split`, the `route` step, with the default `data_type_from`
  (header,topic,field): a batch's data type from its topic's default (the bench's
  records), or from replay's `data-type` header; and with `data_type_from=header,field,topic`
  (the default until 9c894c7), which looks into every JSON record for a `data_type` field
  before it takes the topic's default;
- decode: `ContractCodecs.decode`, what the shard calls (the content-type header, the
  codec, the contract's batch checks) for JSON, protobuf, CSV and Avro records, the JSON
  codec alone, and `record_columns` (ids, event times, labels); against `orjson.loads` +
  an itemgetter per record (what the tuned loop does);
- score + encode: `ShardScorer._score` on the decoded columns (the missing-feature check,
  the model call, the ScoredRecord protobuf with its tracing fields, events to the
  process's metrics and queryable state, stats and drift), with stats and drift on and
  off; against one onnxruntime call and a 3-field `orjson.dumps` per record; for CSV
  records, which carry no id (waxserve names them "<topic>/<partition>/<offset>"); and for
  the categorical penguins model;
- the whole shard: `ShardScorer.on_values([RawRun])`, decode to scored records;
- produce: `Producer.produce` of the scored messages (enqueue only), with and without the
  content-type header;
- PMML: `PmmlRuntime.predict` on a batch, and the PMML4S call alone.

`python -m bench breakdown plans` (and `just bench`, via `plan_costs`) times what serving
plans cost (issue 15): the shard's work after decoding under a single model, an A/B split
and a shadow, per batch, with the costs derived from them (`plan_costs`).

Kafka's own consume/produce work and Bytewax's scheduling are not in here: the bench's
passthrough contender and the difference to the bench's waxserve figure hold those.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import orjson
from confluent_kafka import Producer

from bench.inputs import DATA_TYPE_HEADER, INPUTS, SHARED_INPUT, Feed
from dataflows.contracts.codecs import codec_for
from dataflows.contracts.decode import ContractCodecs
from dataflows.contracts.schema import Contract, Encoding
from dataflows.control.registry import (
    ContractInstall,
    ControlIn,
    ModelInstall,
    PlanInstall,
    Registry,
)
from dataflows.core.config import Config
from dataflows.core.descriptors import load_catalog
from dataflows.core.records import (
    EncodedKeys,
    RawRun,
    RecordColumns,
    SourceBatch,
    record_columns,
)
from dataflows.rollout.assign import assign, entity_points
from dataflows.rollout.plans import model_key
from dataflows.runtimes import PmmlRuntime, load_runtime
from dataflows.scoring.shard import ScoredBatch, ShardOut, ShardScorer
from dataflows.serving import process_events, router_of
from protos import waxserve_pb2 as pb

BATCH = 1000
FIRST_OFFSET = 100_000
"""A batch from a running stream: offsets and ids of one width (the bench's ids are the
record numbers), which is what lets the scored records be one byte matrix."""


def _per_record_us(run: Callable[[], object], repeat: int = 50) -> float:
    """Median over `repeat` calls of one batch call, per record, in microseconds."""
    run()  # warm up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) / BATCH * 1e6


def source_batch(feed: Feed, topic: str = "records") -> SourceBatch:
    """One 1,000-record batch of a bench input, as the Kafka source hands it on."""
    messages = list(feed.messages(FIRST_OFFSET, BATCH, int(time.time() * 1000)))
    return SourceBatch(
        topic,
        0,
        list(range(FIRST_OFFSET, FIRST_OFFSET + BATCH)),
        [key for key, _, _ in messages],
        [value for _, value, _ in messages],
        [cast(list[tuple[str, bytes | None]], list(headers or [])) for _, _, headers in messages],
    )


def raw_run(batch: SourceBatch, data_type: str) -> RawRun:
    """The batch as the route step passes it to a shard."""
    return RawRun(
        batch.topic,
        batch.partition,
        batch.offsets,
        batch.keys,
        batch.values,
        batch.headers,
        data_type=data_type,
    )


def serving_shard(contract: Contract, model: str, *, monitoring: bool = True) -> ShardScorer:
    """A shard serving a catalog model for `contract`'s data type, installed the way the
    dataflow installs it: the contract and the descriptor through the registry. Its events
    go to the dataflow process's subscribers (Prometheus metrics, queryable state)."""
    return _installed_shard(contract, [model], [], monitoring=monitoring)


def _installed_shard(
    contract: Contract,
    models: Sequence[str],
    commands: Sequence[pb.PlanCommand],
    *,
    monitoring: bool = True,
) -> ShardScorer:
    """A shard with `contract`, these catalog models (the first active, the others
    staged) and the plan `commands` make of them, all through the registry."""
    control: list[ControlIn] = [ControlIn(contract.to_proto(), "control", 0, 0, None, b"")]
    for i, model in enumerate(models):
        descriptor = load_catalog()[model].descriptor()
        descriptor.data_type = contract.data_type
        if i:
            descriptor.stage = "staged"
        control.append(ControlIn(descriptor, "control", 0, len(control), None, b""))
    # Plan commands name models the registry has installed: after the descriptors' loads.
    registry = Registry(None, model_dir="")
    out = [*registry.on_control(control), *registry.collect(wait=True)]
    out += registry.on_control(
        [ControlIn(c, "control", 0, len(control) + i, None, b"") for i, c in enumerate(commands)]
    )
    installs = [o for o in out if isinstance(o, ContractInstall | ModelInstall | PlanInstall)]
    if len(installs) != 1 + len(models) + len(commands):
        raise RuntimeError(f"{', '.join(models)} not installed for {contract.data_type}: {out}")
    scorer = ShardScorer(
        None,
        stats_interval_s=10,
        drift_window_s=60,
        monitoring=monitoring,
        events=process_events(),
    )
    scorer.on_values(installs)
    return scorer


def scored_batch(out: list[ShardOut]) -> ScoredBatch:
    """The one scored batch of a shard's output (anything else is a surprise here)."""
    scored = [o for o in out if isinstance(o, ScoredBatch)]
    if len(scored) != 1 or len(out) != 1:
        raise RuntimeError(f"expected one scored batch, got {out}")
    return scored[0]


def _score(scorer: ShardScorer, columns: RecordColumns) -> Callable[[], object]:
    """`ShardScorer._score_planned` of decoded columns: everything the shard does after
    decoding, by the data type's plan."""
    route = scorer._routes[columns.data_type]
    contract = scorer.state.data_types[columns.data_type].contract
    assert contract is not None
    # A fresh run each call, as the dataflow's runs are: what one call cached on the
    # columns (`RecordColumns.memo`: the ids' bytes) is not there for the next.
    return lambda: scorer._score_planned(dataclasses.replace(columns, _memo={}), route, contract)


def _columns(run: RawRun, contract: Contract) -> RecordColumns:
    columns, dead = record_columns(
        run, contract, ContractCodecs(contract).decode(run.values, run.headers)
    )
    if columns is None or dead:
        raise RuntimeError(f"the bench's records do not decode: {dead[:1]}")
    return columns


def monitoring_cost(rounds: int = 7) -> dict[str, float]:
    """Score + encode of a 1,000-record JSON batch with stats and drift on and off, µs a
    record: the medians of `rounds` interleaved rounds. The throughput runs cannot resolve
    a cost of a few percent (their repetitions vary by ±20%); this can."""
    feed = Feed(INPUTS[SHARED_INPUT])
    columns = _columns(raw_run(source_batch(feed), "wine"), feed.contract)
    on = _score(serving_shard(feed.contract, "wine-lr"), columns)
    off = _score(serving_shard(feed.contract, "wine-lr", monitoring=False), columns)
    on_us, off_us = [], []
    for _ in range(rounds):
        on_us.append(_per_record_us(on))
        off_us.append(_per_record_us(off))
    return {"on_us": float(np.median(on_us)), "off_us": float(np.median(off_us)), "rounds": rounds}


PRIMARY, SECOND = "wine-lr", "wine-gbt"
"""The serving-plan cases' models: the single-model path's, and the one an experiment adds."""


def _plan_command(action: pb.PlanAction, *variants: tuple[str, float]) -> pb.PlanCommand:
    catalog = load_catalog()
    return pb.PlanCommand(
        data_type=INPUTS[SHARED_INPUT].data_type,
        action=action,
        variants=[
            pb.PlanVariant(model=model_key(m, catalog[m].descriptor().version), weight=w)
            for m, w in variants
        ],
        actor="bench",
    )


def plan_cases() -> dict[str, tuple[tuple[str, ...], list[pb.PlanCommand]]]:
    """The serving plans timed, by name: the catalog models installed (the first active,
    the others staged) and the plan commands after them."""
    both = (PRIMARY, SECOND)
    return {
        PRIMARY: ((PRIMARY,), []),
        SECOND: ((SECOND,), []),
        "split 50/50": (both, [_plan_command(pb.CANARY, (SECOND, 0.5))]),
        "split 90/10": (both, [_plan_command(pb.SPLIT, (PRIMARY, 0.9), (SECOND, 0.1))]),
        "shadow": (both, [_plan_command(pb.SHADOW, (SECOND, 0.0))]),
    }


def _bytes_per_record(out: object, shadow: bool) -> float:
    """Mean size of the scored (or shadow) messages' values in one batch's output."""
    values = [
        len(value or b"")
        for o in cast(list[ShardOut], out)
        if isinstance(o, ScoredBatch) and o.shadow == shadow
        for _, value, _ in o.messages
    ]
    return float(np.mean(values)) if values else 0.0


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
"""Per-batch times by both clocks: the thread's CPU time leaves out the time the shard was
not running (this machine's two cores are shared), which the wall clock counts."""


def plan_costs(rounds: int = 300) -> dict[str, Any]:
    """What serving plans cost (issue 15), in-process: `ShardScorer._score_planned` of one
    decoded 1,000-record JSON batch under each of `plan_cases()`: everything the shard does
    after decoding. One call per case per round, the cases interleaved (each round starts
    one case later), so that the machine's drift hits all alike; per case and clock
    (`CLOCKS`) the median and p90 ms per batch, and the scored records' bytes.

    The models' own time is measured, not scaled: with each split, the two models alone,
    each on the records the entity hash sent it (`own_calls`: "wine-lr on split 50/50"
    ...), timed in the same rounds; with the shadow, both alone on the whole batch. Derived,
    per experiment and clock: the overhead, the experiment's time beyond the models' own
    (from the medians, and as the median of the per-round differences: paired), and issue
    15's goal read three ways (bench/README.md), each a ratio that must be ≤ 1:
    `added_to_second` (strict: the experiment minus the primary's own time on its records,
    against the second model's own time on its records), `over_single_to_second` (the
    experiment minus today's single-model path on the whole batch, against the same) and
    `over_single_to_whole_second` (lenient: against the second model alone on the whole
    batch). And two parts of a split's overhead, µs a record: the entity hash and
    assignment (`dataflows.rollout.assign`) and the two `RecordColumns.take` of a 50/50
    split."""
    feed = Feed(INPUTS[SHARED_INPUT])
    contract = feed.contract
    columns = _columns(raw_run(source_batch(feed), contract.data_type), contract)
    calls: dict[str, Callable[[], object]] = {}
    cases: dict[str, dict[str, Any]] = {}
    own_calls: dict[str, Callable[[], object]] = {}
    owns: dict[str, tuple[str, str]] = {}  # experiment: its (primary's, second's) own call
    single = {m: _installed_shard(contract, (m,), []) for m in (PRIMARY, SECOND)}
    for name, (models, commands) in plan_cases().items():
        scorer = single[models[0]] if not commands else _installed_shard(contract, models, commands)
        route = scorer._routes[contract.data_type]
        calls[name] = _score(scorer, columns)
        out = calls[name]()
        cases[name] = {
            "plan": route.plan.describe(),
            "bytes_per_record": _bytes_per_record(out, shadow=False),
            "shadow_bytes_per_record": _bytes_per_record(out, shadow=True),
            "plan_field_bytes": max(len(v) for v in route.extras.values()),
        }
        if route.plan.splits_traffic:
            chosen = assign(entity_points(columns.data_type, columns.record_ids), route.weights)
            variants = [k.split(":")[0] for k in route.bindings]
            share = float(np.mean(chosen == variants.index(SECOND)))
            cases[name]["second_share"] = share
            for model in (PRIMARY, SECOND):
                rows = columns.take(chosen == variants.index(model))
                own_calls[f"{model} on {name}"] = _score(single[model], rows)
            owns[name] = (f"{PRIMARY} on {name}", f"{SECOND} on {name}")
        elif route.plan.policy == "shadow":
            owns[name] = (PRIMARY, SECOND)

    everything = {**calls, **own_calls}
    names = list(everything)
    taken: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in CLOCKS}
    wall, cpu = CLOCKS["wall"], CLOCKS["cpu"]
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            started, started_cpu = wall(), cpu()
            everything[name]()
            taken["cpu"][name].append((cpu() - started_cpu) * 1e3)
            taken["wall"][name].append((wall() - started) * 1e3)
    own_ms: dict[str, dict[str, float]] = {}
    for clock, by_case in taken.items():
        ms = {name: np.asarray(values) for name, values in by_case.items()}
        median = {name: float(np.median(values)) for name, values in ms.items()}
        own_ms[clock] = {name: median[name] for name in own_calls}
        for name in calls:
            cases[name][clock] = {
                "median_ms": median[name],
                "p90_ms": float(np.percentile(ms[name], 90)),
            }
        today, second_whole = median[PRIMARY], median[SECOND]
        for name, (primary_own, second_own) in owns.items():
            own = median[primary_own] + median[second_own]
            paired = ms[name] - (ms[primary_own] + ms[second_own])
            added = median[name] - median[primary_own]
            over_single = median[name] - today
            cases[name][clock].update(
                primary_own_ms=median[primary_own],
                second_own_ms=median[second_own],
                models_own_ms=own,
                overhead_ms=median[name] - own,
                overhead_paired_ms=float(np.median(paired)),
                added_ms=added,
                added_to_second=added / median[second_own],
                over_single_ms=over_single,
                over_single_to_second=over_single / median[second_own],
                over_single_to_whole_second=over_single / second_whole,
            )

    half = assign(entity_points(columns.data_type, columns.record_ids), [0.5, 0.5]) == 1
    ids = columns.encoded_ids()  # as the split hashes them: the ids' bytes, encoded once
    return {
        "batch": BATCH,
        "rounds": rounds,
        "primary": PRIMARY,
        "second": SECOND,
        "cases": cases,
        "own_ms": own_ms,
        "assign_us_per_record": _per_record_us(
            lambda: assign(entity_points(columns.data_type, ids), [0.5, 0.5])
        ),
        "encode_ids_us_per_record": _per_record_us(lambda: EncodedKeys.of(columns.record_ids)),
        "take_us_per_record": _per_record_us(lambda: (columns.take(half), columns.take(~half))),
    }


def print_plan_costs(costs: dict[str, Any]) -> None:
    """The plans' table, and the derived costs."""
    print(
        f"\nserving plans: ShardScorer._score_planned of a {costs['batch']:,}-record JSON "
        f"batch, {costs['rounds']} interleaved rounds; ms per batch, wall clock and the "
        "thread's CPU time"
    )
    print(f"{'case':<12} {'median':>7} {'p90':>7} {'CPU med':>7} {'CPU p90':>7} {'B/rec':>6}  plan")
    for name, case in costs["cases"].items():
        w, c = case["wall"], case["cpu"]
        print(
            f"{name:<12} {w['median_ms']:7.3f} {w['p90_ms']:7.3f} {c['median_ms']:7.3f} "
            f"{c['p90_ms']:7.3f} {case['bytes_per_record']:6.1f}  {case['plan']}"
        )
    for name, case in costs["cases"].items():
        for clock in CLOCKS:
            d = case[clock]
            if "overhead_ms" not in d:
                continue
            print(
                f"{name} ({clock}): overhead {d['overhead_ms']:+.3f} ms (paired "
                f"{d['overhead_paired_ms']:+.3f}) beyond the models' own {d['models_own_ms']:.3f} "
                f"({costs['primary']} {d['primary_own_ms']:.3f} + {costs['second']} "
                f"{d['second_own_ms']:.3f}); ratios to {costs['second']}'s own: strict "
                f"{d['added_to_second']:.2f}, over today's path {d['over_single_to_second']:.2f}, "
                f"lenient {d['over_single_to_whole_second']:.2f}"
            )
    print(
        f"entity hash + assign {costs['assign_us_per_record']:.2f} µs/record (of ids encoded "
        f"once, {costs['encode_ids_us_per_record']:.2f} µs/record); the takes of a 50/50 split "
        f"{costs['take_us_per_record']:.2f} µs/record"
    )


def decode_costs(names: Iterable[str] = INPUTS) -> dict[str, float]:
    """`ContractCodecs.decode` of a 1,000-record batch of these bench inputs, µs a record."""
    out = {}
    for name in names:
        feed = Feed(INPUTS[name])
        run = raw_run(source_batch(feed), feed.contract.data_type)
        decode = functools.partial(ContractCodecs(feed.contract).decode, run.values, run.headers)
        out[name] = _per_record_us(decode)
    return out


def measure() -> list[tuple[str, float]]:
    """(stage, µs per record) for every stage above."""
    catalog = load_catalog()
    feeds = {name: Feed(fmt) for name, fmt in INPUTS.items()}
    contracts = {name: feed.contract for name, feed in feeds.items()}
    wine = contracts[SHARED_INPUT]
    batches = {name: source_batch(feed) for name, feed in feeds.items()}
    json_batch = batches[SHARED_INPUT]
    runs = {name: raw_run(batches[name], contracts[name].data_type) for name in INPUTS}
    codecs = {name: ContractCodecs(contract) for name, contract in contracts.items()}

    def decode(name: str) -> Callable[[], object]:
        run, codec = runs[name], codecs[name]
        return lambda: codec.decode(run.values, run.headers)

    json_codec = codec_for(wine, Encoding.JSON)
    json_run = runs[SHARED_INPUT]
    decoded = codecs[SHARED_INPUT].decode(json_run.values, json_run.headers)
    columns = _columns(json_run, wine)
    scorer = serving_shard(wine, "wine-lr")
    unmonitored = serving_shard(wine, "wine-lr", monitoring=False)
    messages = scored_batch(scorer.on_values([json_run])).messages
    csv_columns = _columns(runs["wine-csv"], wine)  # no ids: "<topic>/<partition>/<offset>"
    penguins = contracts["penguins-json"]
    penguin_scorer = serving_shard(penguins, "penguins-species-onnx")
    penguin_columns = _columns(runs["penguins-json"], penguins)

    # The route step, as the dataflow builds it from the default settings; the bench's
    # records name their data type by their topic, `waxserve replay`'s by a header too.
    router = router_of(Config(records_topics="records=wine"))
    named = [[(DATA_TYPE_HEADER, b"wine"), *headers] for headers in json_batch.headers]
    with_data_type = dataclasses.replace(json_batch, headers=named)
    field_first = router_of(
        Config(records_topics="records=wine", data_type_from="header,field,topic")
    )

    features = operator.itemgetter(*wine.csv_columns[:-1])
    session = ort.InferenceSession(str(catalog["wine-lr"].path()))
    input_name = session.get_inputs()[0].name
    json_values = cast(list[bytes], json_batch.values)
    docs = [orjson.loads(v) for v in json_values]

    def tuned_decode() -> object:
        return [features(orjson.loads(v)) for v in json_values]

    def tuned_score_encode() -> object:
        x = np.array([features(d) for d in docs], dtype=np.float32)
        scores = session.run(None, {input_name: x})[0][:, 0].tolist()
        return [
            orjson.dumps(
                {"record_id": d["record_id"], "event_time_ms": d["event_time_ms"], "score": s}
            )
            for d, s in zip(docs, scores, strict=True)
        ]

    producer = Producer(
        {
            "bootstrap.servers": "127.0.0.1:9",  # never connects: enqueueing is what is timed
            "queue.buffering.max.messages": 10_000_000,
            "queue.buffering.max.kbytes": 4_000_000,
            "log_level": 0,
        }
    )
    content_type: Any = [("content-type", b"application/x-protobuf")]

    def produce(with_headers: bool) -> Callable[[], object]:
        def run() -> object:
            for key, value, _ in messages:
                if with_headers:
                    producer.produce("scored", value, key, headers=content_type)
                else:
                    producer.produce("scored", value, key)
            return None

        return run

    pmml_descriptor = catalog["wine-pmml-lr"].descriptor()
    pmml = cast(
        PmmlRuntime,
        load_runtime(
            pb.MODEL_FORMAT_PMML, pmml_descriptor.model_bytes, list(pmml_descriptor.input_features)
        ),
    )
    pmml_columns = []
    for name in pmml.numeric_features:
        found = wine.field_for(name)
        assert found is not None, name
        pmml_columns.append(wine.columns[found.name].index)
    pmml_x = np.ascontiguousarray(columns.numeric[:, pmml_columns])
    request = (pmml._request_prefix + pmml._rows(pmml_x, None) + b"}").decode()

    rows = [
        (
            "route, JSON: the topic's default (DataTypeRouter.split)",
            _per_record_us(lambda: router.split(json_batch)),
        ),
        (
            "route, JSON: a data-type header (replay's)",
            _per_record_us(lambda: router.split(with_data_type)),
        ),
        (
            "route, JSON: a data_type field looked for first",
            _per_record_us(lambda: field_first.split(json_batch)),
        ),
        (
            "route, protobuf: the topic's default",
            _per_record_us(lambda: router.split(batches["wine-protobuf"])),
        ),
        ("decode, JSON (ContractCodecs.decode)", _per_record_us(decode(SHARED_INPUT))),
        (
            "decode, JSON codec alone (JsonCodec.decode)",
            _per_record_us(lambda: json_codec.decode(json_run.values)),
        ),
        ("decode, protobuf (ContractCodecs.decode)", _per_record_us(decode("wine-protobuf"))),
        ("decode, CSV (ContractCodecs.decode)", _per_record_us(decode("wine-csv"))),
        ("decode, Avro (ContractCodecs.decode)", _per_record_us(decode("wine-avro"))),
        ("decode, penguins JSON (ContractCodecs.decode)", _per_record_us(decode("penguins-json"))),
        (
            "ids, event times, labels (record_columns)",
            _per_record_us(lambda: record_columns(json_run, wine, decoded)),
        ),
        ("tuned decode: orjson.loads + itemgetter", _per_record_us(tuned_decode)),
        ("score + ScoredRecord (ShardScorer._score)", _per_record_us(_score(scorer, columns))),
        ("score + ScoredRecord, stats + drift off", _per_record_us(_score(unmonitored, columns))),
        (
            "score + ScoredRecord, CSV records (ids from offsets)",
            _per_record_us(_score(scorer, csv_columns)),
        ),
        (
            "score + ScoredRecord, penguins classifier",
            _per_record_us(_score(penguin_scorer, penguin_columns)),
        ),
        ("tuned score + 3-field orjson.dumps", _per_record_us(tuned_score_encode)),
        (
            "shard, JSON: decode to scored records (on_values)",
            _per_record_us(lambda: scorer.on_values([json_run])),
        ),
        ("produce, with content-type header", _per_record_us(produce(True), repeat=20)),
        ("produce, no header", _per_record_us(produce(False), repeat=20)),
        ("PMML: PmmlRuntime.predict", _per_record_us(lambda: pmml.predict(pmml_x), repeat=20)),
        (
            "PMML: the PMML4S call alone",
            _per_record_us(lambda: str(pmml._model.predict(request)), repeat=20),
        ),
    ]
    producer.purge()
    return rows


def main(argv: Sequence[str] = ()) -> int:
    """Print the stages' table, the serving plans' table, or both."""
    parser = argparse.ArgumentParser(
        prog="python -m bench breakdown",
        description="Per-record cost of each stage of the shard's work, in-process; and what "
        "serving plans cost per batch (issue 15).",
    )
    parser.add_argument("what", nargs="?", choices=("all", "stages", "plans"), default="all")
    parser.add_argument(
        "--rounds",
        type=int,
        default=300,
        help="interleaved rounds of the serving plans (default %(default)s)",
    )
    args = parser.parse_args(list(argv))
    if args.what in ("all", "stages"):
        rows = measure()
        width = max(len(name) for name, _ in rows)
        print(f"{'stage (1,000-record batches)':<{width}}  µs/record")
        for name, us in rows:
            print(f"{name:<{width}}  {us:9.2f}")
    if args.what in ("all", "plans"):
        print_plan_costs(plan_costs(args.rounds))
    return 0
