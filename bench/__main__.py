"""`python -m bench [options]`: the benchmark (`just bench`); `python -m bench soak`: the
soak (`just soak`); `python -m bench report FILE.json`: redraw a report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import report
from bench.harness import BROKERS, CONTENDERS, LATENCY_DEFAULT, Settings
from bench.run import RESULTS, main_args, run_bench, run_soak


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:
        return _soak(argv[1:])
    if argv[:1] == ["report"]:
        return _report(argv[1:])
    if argv[:1] == ["breakdown"]:
        from bench import breakdown  # loads the models and the JVM: only when asked

        return breakdown.main(argv[1:])
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure waxserve against the Kafka floor, hand-written loops, idiomatic "
        "Bytewax and Quix Streams in one run; write bench/results/<date>.{json,md,png}. "
        "Subcommands: `soak` (python -m bench soak --help), `report FILE.json`, `breakdown` "
        "(per-record cost of each stage, in-process).",
    )
    parser.add_argument(
        "--records",
        type=int,
        default=defaults.records,
        help="input records for the throughput runs (default %(default)s)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=defaults.reps,
        help="repetitions of every measurement; figures are medians",
    )
    parser.add_argument(
        "--format-reps",
        type=int,
        default=defaults.format_reps,
        help="repetitions of the input-format rows (protobuf, CSV, Avro, penguins), at most "
        "--reps (default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=defaults.rate,
        help="records/s of the latency and swap runs (default %(default)s)",
    )
    parser.add_argument(
        "--latency-s",
        type=float,
        default=defaults.latency_s,
        help="seconds of paced input measured per latency run",
    )
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=defaults.warmup_s,
        help="seconds of paced input after the first output, not measured",
    )
    parser.add_argument(
        "--swaps",
        type=int,
        default=defaults.swaps,
        help="model swaps per repetition (0: no swap run)",
    )
    parser.add_argument("--swap-interval-s", type=float, default=defaults.swap_interval_s)
    parser.add_argument(
        "--pmml-records",
        type=int,
        default=defaults.pmml_records,
        help="records for pypmml's per-record Py4J path (slow)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=defaults.partitions,
        help="partitions of the throughput input and output topics",
    )
    parser.add_argument(
        "--live-partitions",
        type=int,
        default=defaults.live_partitions,
        help="partitions of the latency and swap topics (default %(default)s)",
    )
    parser.add_argument(
        "--throughput",
        type=_names,
        default=defaults.throughput,
        help=f"contenders of the throughput runs (default: all: {','.join(CONTENDERS)})",
    )
    parser.add_argument(
        "--latency",
        type=_names,
        default=defaults.latency,
        help=f"contenders of the latency runs (default: {','.join(LATENCY_DEFAULT)})",
    )
    parser.add_argument("--no-quix", action="store_true", help="do not install or run Quix Streams")
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        default=defaults.broker,
        help="Apache Kafka (KRaft, one node; default) or tansu, the demo's embedded broker",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the contenders' logs (kept anyway when a run fails)",
    )
    args = parser.parse_args(argv)
    settings = Settings(
        records=args.records,
        reps=args.reps,
        format_reps=args.format_reps,
        rate=args.rate,
        latency_s=args.latency_s,
        warmup_s=args.warmup_s,
        swaps=args.swaps,
        swap_interval_s=args.swap_interval_s,
        pmml_records=args.pmml_records,
        partitions=args.partitions,
        live_partitions=args.live_partitions,
        throughput=args.throughput,
        latency=args.latency,
        swap=args.swaps > 0,
        quix=not args.no_quix,
        broker=args.broker,
    )
    run_bench(settings, args.out, main_args(), args.keep_logs)
    return 0


def _soak(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench soak",
        description="waxserve at a fixed rate for minutes, its resident set sampled; writes "
        "bench/results/soak-<date>.json and adds a line to that day's report.",
    )
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=60.0,
        help="growth is measured from the first sample after this",
    )
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--partitions", type=int, default=Settings().live_partitions)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--broker", choices=BROKERS, default=Settings().broker, help="Apache Kafka or tansu"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep waxserve's and the broker's logs"
    )
    args = parser.parse_args(argv)
    run_soak(
        args.duration_s,
        args.rate,
        args.warmup_s,
        args.sample_s,
        args.out,
        args.partitions,
        keep_logs=args.keep_logs,
        broker=args.broker,
    )
    return 0


def _report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench report")
    parser.add_argument("file", type=Path, help="a bench/results/<date>.json")
    args = parser.parse_args(argv)
    paths = report.write(json.loads(args.file.read_text()), args.file.parent, args.file.stem)
    print("\n".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
