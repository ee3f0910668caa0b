"""The drift evaluation (`just drift-eval`) in small, and the catalog profiles it reads."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from google.protobuf import json_format

from dataflows.core.descriptors import MODELS_DIR, load_catalog, load_profile
from dataflows.monitoring.drift_eval import (
    Simulator,
    build_simulator,
    evaluate,
    goal_failures,
    render,
)
from dataflows.monitoring.reference_data import model_profile, training_rows


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    simulator = build_simulator("wine-lr")
    yield simulator
    simulator.runtime.close()


def test_the_evaluation_judges_windows_as_the_dataflow_does(simulator: Simulator) -> None:
    """Few windows, a large shift: no false alarm, every shift caught, the old PSI rule
    blind to most of them at 1,000 records; the table prints."""
    (result,) = evaluate(
        simulator,
        sizes=(1000,),
        null_windows=40,
        shifted_windows=5,
        shifts=(0.5, 0.25),
        progress=False,
    )
    assert result.null.windows == 40 and result.null.alarms == 0
    caught = {name: o.rate for name, o in result.detection(0.5).items()}
    assert set(caught) == set(simulator.reference.features) and min(caught.values()) == 1.0
    old = [o.psi_rate for o in result.detection(0.25).values()]
    assert min(old) == 0.0  # the audit's finding: PSI > 0.25 misses +0.25 sd at this size
    assert goal_failures([result], 0.5) == []
    table = "\n".join(render([result], (0.5,), "alcohol"))
    assert "False alarms" in table and "alcohol" in table


def test_a_one_record_window_is_not_judged(simulator: Simulator) -> None:
    message, old_alarm = simulator.window(np.random.default_rng(0), 1, ("alcohol", 5.0))
    assert not message.judged and not message.alarm and not old_alarm
    assert not any(f.HasField("p_value") for f in message.features)
    # 13 quantities: 11 features, the model's predictions and the label (quality).
    assert [f.quantity for f in message.features].count("feature") == 11
    assert {f.quantity for f in message.features} == {"feature", "prediction", "label"}


def test_null_p_values_of_resampled_windows_are_not_too_small(simulator: Simulator) -> None:
    """Windows of the training rows themselves: the two-sample tests are conservative."""
    rng = np.random.default_rng(11)
    p_values = [f.p_value for _ in range(30) for f in simulator.window(rng, 500)[0].features]
    assert len(p_values) == 30 * 13  # 11 features, the prediction, the label
    assert np.mean(np.asarray(p_values) <= 0.05) <= 0.05


def test_catalog_profiles_are_what_the_training_rows_give() -> None:
    """models/profiles/wine-lr.json is the profile of the reproduced training split with
    the model's predictions (`python -m dataflows.monitoring.reference_data` rewrites it)."""
    entry = load_catalog()["wine-lr"]
    rows = training_rows("wine")
    assert len(rows.lines) == 1279
    computed = model_profile(entry, rows)
    stored = load_profile(MODELS_DIR / entry.profile)
    assert json_format.MessageToDict(computed) == json_format.MessageToDict(stored)
    assert stored.prediction.name == "prediction" and stored.label.name == "quality"
