"""How well the drift alarm is calibrated: false alarms and detections on simulated windows.

Windows of 100, 1,000 and 10,000 records are drawn (with replacement) from the rows a
model's reference profile was built from (the training split, `reference_data`): as
they come, to count false alarms, and with one numeric feature shifted by +0.25 standard
deviations (and +0.1, for information), each feature in turn, to count detections. The
model scores each window, and every window goes through the code the dataflow runs:
`DriftAccumulator` (bins of the features, the predictions and the labels) and
`drift_message` (the calibrated tests and Holm's decision). The old rule, a PSI above
0.25 (with its 1e-4 floor for empty bins) in a window of at least 100 records, is shown
beside it.

    python -m dataflows.monitoring.drift_eval          # or: just drift-eval

Seeded and deterministic. Exits 1 unless the goal holds: at most 1% false alarms at
every size, and at least 95% of +0.25 sd shifts caught, whichever feature, at 1,000 records
or more.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from dataflows.control.registry import bind_inputs, drift_reference
from dataflows.core.descriptors import FORMATS, MODELS_DIR, load_catalog, load_profile
from dataflows.monitoring.reference_data import TrainingRows, training_rows
from dataflows.monitoring.windows import (
    DEFAULT_ALPHA,
    DriftAccumulator,
    DriftPartial,
    DriftReference,
    ModelIdentity,
    drift_message,
)
from dataflows.runtimes import ModelRuntime, load_runtime
from protos import waxserve_pb2 as pb

SIZES = (100, 1_000, 10_000)
NULL_WINDOWS = 1_000
"""Windows without a shift per size: false alarms of 1% are 10 of them."""
SHIFTED_WINDOWS = 200
"""Windows per size, shifted feature and shift."""
SHIFTS = (0.25, 0.1)
"""Shifts, in reference standard deviations; the first is the goal's."""
MAX_FALSE_ALARMS = 0.01
MIN_DETECTION = 0.95
DETECTION_FROM = 1_000
"""The goal: false alarms at most 1% of windows at every size; +0.25 sd shifts caught in at
least 95% of windows of 1,000 records or more."""

OLD_PSI_THRESHOLD = 0.25
OLD_PSI_FLOOR = 1e-4
OLD_MIN_RECORDS = 100


@dataclass
class Outcome:
    """Alarms of one kind of window, by the calibrated test and by the old PSI rule."""

    windows: int = 0
    alarms: int = 0
    psi_alarms: int = 0

    def add(self, message: pb.DriftMetrics, old_alarm: bool) -> None:
        """One window."""
        self.windows += 1
        self.alarms += message.alarm
        self.psi_alarms += old_alarm

    @property
    def rate(self) -> float:
        """Fraction of windows that alarmed."""
        return self.alarms / self.windows if self.windows else 0.0

    @property
    def psi_rate(self) -> float:
        """Fraction of windows the old rule alarmed on."""
        return self.psi_alarms / self.windows if self.windows else 0.0


@dataclass
class SizeResult:
    """Everything measured at one window size."""

    size: int
    null: Outcome = field(default_factory=Outcome)
    # (shift, feature) -> outcome
    shifted: dict[tuple[float, str], Outcome] = field(default_factory=dict)

    def detection(self, shift: float) -> dict[str, Outcome]:
        """Per feature, the windows with it shifted by `shift`."""
        return {f: o for (s, f), o in self.shifted.items() if s == shift}


class Simulator:
    """Draws windows from the training rows and judges them as the dataflow does."""

    def __init__(
        self,
        rows: TrainingRows,
        reference: DriftReference,
        runtime: ModelRuntime,
        model_fields: Sequence[str],
        *,
        alpha: float,
        min_records: int,
    ) -> None:
        contract = rows.contract
        self.rows = rows
        self.reference = reference
        self.runtime = runtime
        self.alpha = alpha
        self.min_records = min_records
        self.numeric = rows.decoded.numeric
        self.text = rows.decoded.text
        self.feature_columns = [contract.columns[f].index for f in reference.features]
        self.text_columns = [contract.columns[f].index for f in reference.text_features]
        kinds = [f.kind for f in runtime.features]
        self.model_numeric = [
            contract.columns[f].index
            for f, k in zip(model_fields, kinds, strict=True)
            if k == "numeric"
        ]
        self.model_text = [
            contract.columns[f].index
            for f, k in zip(model_fields, kinds, strict=True)
            if k != "numeric"
        ]
        where = contract.columns[contract.label_field] if contract.label_field else None
        self.labels: np.ndarray | None = None
        if where is not None:
            self.labels = (self.numeric if where.numeric else self.text)[:, where.index]
        self.identity = ModelIdentity(contract.data_type, "eval", "1", "")

    def window(
        self, rng: np.random.Generator, n: int, shift: tuple[str, float] | None = None
    ) -> tuple[pb.DriftMetrics, bool]:
        """A window of n rows, one feature shifted by `shift` (name, sds); its message, and
        whether the old PSI rule would have alarmed."""
        rows = rng.integers(0, len(self.numeric), n)
        numeric = self.numeric[rows]
        if shift is not None:
            name, sigmas = shift
            i = self.reference.features.index(name)
            numeric[:, self.feature_columns[i]] += sigmas * float(self.reference.stds[i])
        text = self.text[rows]
        ref = self.reference
        acc = DriftAccumulator.empty(ref)
        acc.add(
            ref,
            numeric[:, self.feature_columns],
            text[:, self.text_columns] if ref.text_features else None,
        )
        scored = self.runtime.predict(
            np.ascontiguousarray(numeric[:, self.model_numeric]),
            text[:, self.model_text] if self.model_text else None,
        )
        valid = scored.valid
        outputs: np.ndarray | list[str] | None = scored.values[valid]
        if ref.prediction is not None and ref.prediction.categorical and scored.labels is not None:
            outputs = [label for label, v in zip(scored.labels, valid.tolist(), strict=True) if v]
        labels = None if self.labels is None else self.labels[rows][valid]
        acc.add_outputs(ref, outputs, labels)
        message = drift_message(
            DriftPartial(self.identity, ref, 0, 1, acc), self.alpha, self.min_records
        )
        return message, old_psi_alarm(ref, acc)


def build_simulator(
    model: str, *, alpha: float = DEFAULT_ALPHA, min_records: int = 100
) -> Simulator:
    """A simulator for a catalog model: its training rows, its profile (as the registry
    reads it from the descriptor) and the model itself."""
    entry = load_catalog()[model]
    rows = training_rows(entry.data_type)
    reference = drift_reference(load_profile(MODELS_DIR / entry.profile), rows.contract)
    if reference is None:
        raise ValueError(f"{model}: its profile has nothing to compare windows with")
    runtime = load_runtime(FORMATS[entry.format], entry.path().read_bytes(), entry.input_features)
    fields = bind_inputs(runtime.features, rows.contract)
    return Simulator(rows, reference, runtime, fields, alpha=alpha, min_records=min_records)


def old_psi(expected: np.ndarray, counts: np.ndarray) -> float:
    """PSI as the dataflow computed it before: fractions floored at 1e-4."""
    total = counts.sum()
    if total == 0:
        return 0.0
    actual = np.maximum(counts / total, OLD_PSI_FLOOR)
    reference = np.maximum(expected, OLD_PSI_FLOOR)
    return float(np.sum((actual - reference) * np.log(actual / reference)))


def old_psi_alarm(reference: DriftReference, acc: DriftAccumulator) -> bool:
    """The old rule: a feature's PSI above 0.25 in a window of at least 100 records."""
    values = [old_psi(e, c) for e, c in zip(reference.expected, acc.counts, strict=True)]
    values += [old_psi(e, c) for e, c in zip(reference.text_expected, acc.text_counts, strict=True)]
    return acc.n >= OLD_MIN_RECORDS and max(values, default=0.0) > OLD_PSI_THRESHOLD


def evaluate(
    simulator: Simulator,
    sizes: Sequence[int] = SIZES,
    null_windows: int = NULL_WINDOWS,
    shifted_windows: int = SHIFTED_WINDOWS,
    shifts: Sequence[float] = SHIFTS,
    seed: int = 0,
    progress: bool = True,
) -> list[SizeResult]:
    """Judge the windows; each (size, kind of window) has its own seeded generator, so a
    result does not depend on what else ran."""
    features = simulator.reference.features
    total = len(sizes) * (null_windows + len(shifts) * len(features) * shifted_windows)
    bar = tqdm(total=total, desc="drift windows", disable=not progress, leave=False)
    results = []
    for size in sizes:
        result = SizeResult(size)
        rng = np.random.default_rng([seed, size])
        for _ in range(null_windows):
            result.null.add(*simulator.window(rng, size))
        bar.update(null_windows)
        for k, shift in enumerate(shifts):
            for j, name in enumerate(features):
                rng = np.random.default_rng([seed, size, k + 1, j])
                outcome = result.shifted[(shift, name)] = Outcome()
                for _ in range(shifted_windows):
                    outcome.add(*simulator.window(rng, size, (name, shift)))
                bar.update(shifted_windows)
        results.append(result)
    bar.close()
    return results


SIGMA = "\u03c3"


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def render(results: Sequence[SizeResult], shifts: Sequence[float], focus: str) -> list[str]:
    """The tables: false alarms per size; per shift, detections of the worst feature and
    of `focus`, by the calibrated test and by the old PSI rule."""
    lines = ["False alarms: windows without a shift that alarmed"]
    lines.append(f"  {'records':>8}  {'windows':>8}  {'calibrated':>10}  {'PSI>0.25':>10}")
    for r in results:
        lines.append(
            f"  {r.size:>8,}  {r.null.windows:>8,}  {_pct(r.null.rate):>10}  "
            f"{_pct(r.null.psi_rate):>10}"
        )
    for shift in shifts:
        per_size = [r.detection(shift) for r in results]
        windows = next(iter(per_size[0].values())).windows if per_size[0] else 0
        lines.append("")
        lines.append(
            f"Detections: windows with one feature shifted by +{shift:g}{SIGMA} that alarmed "
            f"({windows:,} per feature; worst feature, and {focus})"
        )
        lines.append(
            f"  {'records':>8}  {'calibrated: worst':<33}{focus:>8}  "
            f"{'PSI>0.25: worst':<33}{focus:>8}"
        )
        for r, per_feature in zip(results, per_size, strict=True):
            worst = min(per_feature, key=lambda f: per_feature[f].rate)
            worst_old = min(per_feature, key=lambda f: per_feature[f].psi_rate)
            mine = f"{_pct(per_feature[worst].rate):>6} {worst}"
            old = f"{_pct(per_feature[worst_old].psi_rate):>6} {worst_old}"
            lines.append(
                f"  {r.size:>8,}  {mine:<33}{_pct(per_feature[focus].rate):>8}  "
                f"{old:<33}{_pct(per_feature[focus].psi_rate):>8}"
            )
    return lines


def render_features(results: Sequence[SizeResult], shift: float) -> list[str]:
    """Detections per feature at one shift, calibrated (old rule in brackets)."""
    features = list(results[0].detection(shift))
    lines = [f"+{shift:g}{SIGMA} caught, per feature: calibrated (old PSI rule)"]
    lines.append(f"  {'feature':<22}" + "".join(f"{r.size:>18,}" for r in results))
    for name in features:
        cells = []
        for r in results:
            o = r.detection(shift)[name]
            cells.append(f"{_pct(o.rate)} ({_pct(o.psi_rate)})")
        lines.append(f"  {name:<22}" + "".join(f"{c:>18}" for c in cells))
    return lines


def goal_failures(results: Sequence[SizeResult], shift: float) -> list[str]:
    """What misses the goal (empty: met)."""
    failures = []
    for r in results:
        if r.null.rate > MAX_FALSE_ALARMS:
            failures.append(f"{r.size:,} records: {_pct(r.null.rate)} false alarms")
        if r.size >= DETECTION_FROM:
            for name, o in r.detection(shift).items():
                if o.rate < MIN_DETECTION:
                    failures.append(
                        f"{r.size:,} records: +{shift:g}{SIGMA} {name} caught {_pct(o.rate)}"
                    )
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wine-lr", help="catalog model (default wine-lr)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="window sizes")
    parser.add_argument(
        "--windows", type=int, default=NULL_WINDOWS, help="unshifted windows per size"
    )
    parser.add_argument(
        "--shifted-windows", type=int, default=SHIFTED_WINDOWS, help="windows per shifted feature"
    )
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="WAXSERVE_DRIFT_ALPHA")
    parser.add_argument("--min-records", type=int, default=100, help="WAXSERVE_DRIFT_MIN_RECORDS")
    parser.add_argument("--focus", default="alcohol", help="feature shown beside the worst")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    simulator = build_simulator(args.model, alpha=args.alpha, min_records=args.min_records)
    reference, rows = simulator.reference, simulator.rows
    quantities = len(reference.features) + len(reference.text_features)
    quantities += (reference.prediction is not None) + (reference.label is not None)
    print(
        f"drift evaluation: {args.model} on its {len(rows.lines):,} {rows.contract.data_type} "
        f"training rows; {quantities} quantities tested per window (features, prediction, label); "
        f"alpha {args.alpha:g}, min records {args.min_records}; seed {args.seed}"
    )
    focus = args.focus if args.focus in reference.features else reference.features[0]
    results = evaluate(
        simulator,
        sizes,
        args.windows,
        args.shifted_windows,
        SHIFTS,
        args.seed,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    simulator.runtime.close()
    print()
    for line in render(results, SHIFTS, focus):
        print(line)
    print()
    for line in render_features(results, SHIFTS[0]):
        print(line)
    failures = goal_failures(results, SHIFTS[0])
    print()
    if failures:
        print("goal NOT met: " + "; ".join(failures))
        return 1
    print(
        f"goal met: false alarms <= {_pct(MAX_FALSE_ALARMS)} at every size; every "
        f"+{SHIFTS[0]:g}{SIGMA} shift caught in >= {_pct(MIN_DETECTION)} of windows of "
        f"{DETECTION_FROM:,} records or more"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
