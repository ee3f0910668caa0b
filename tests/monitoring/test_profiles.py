"""Reference profiles from samples (dataflows/monitoring/profiles.py) and categorical drift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flowtools import WINE_CONTRACT, WINE_CSV

from dataflows.contracts.files import load_contract
from dataflows.control.registry import drift_reference
from dataflows.core.descriptors import MODELS_DIR, catalog_contracts, load_profile
from dataflows.monitoring.profiles import (
    categorical_profile,
    load_model_file,
    numeric_profile,
    profile_of,
    read_sample,
)
from dataflows.monitoring.windows import (
    DriftAccumulator,
    DriftPartial,
    ModelIdentity,
    drift_message,
)
from dataflows.runtimes import ModelError
from dataflows.tools.cli import main

PENGUINS = load_contract(catalog_contracts()["penguins"])
PENGUINS_CSV = MODELS_DIR / "penguins" / "penguins.csv"


def test_a_profile_from_a_sample_has_bins_and_categories() -> None:
    decoded = read_sample(PENGUINS, PENGUINS_CSV)
    assert len(decoded) == 344  # the header line is skipped
    profile = profile_of(PENGUINS, decoded)
    by_name = {f.name: f for f in profile.features}
    # Feature fields only: not the id, the event time (absent here) or the label.
    assert set(by_name) == {
        "island", "sex", "bill_length_mm", "bill_depth_mm", "flipper_length_mm",
        "body_mass_g", "year",
    }  # fmt: skip
    island = by_name["island"]
    assert list(island.categories) == ["Biscoe", "Dream", "Torgersen"]
    assert sum(island.expected_fractions) == pytest.approx(1.0)
    assert island.expected_fractions[0] == pytest.approx(168 / 344)
    sex = by_name["sex"]
    assert sum(sex.expected_fractions) == pytest.approx(1.0)  # over the 333 that have one
    bill = by_name["bill_length_mm"]
    assert len(bill.expected_fractions) == len(bill.bin_edges) + 1 and not bill.categories


def test_numeric_bins_are_the_dataflows_bins_and_the_label_is_left_out() -> None:
    alcohol = np.loadtxt(WINE_CSV, delimiter=";")[:, 10]
    feature = numeric_profile("alcohol", np.append(alcohol, np.nan))  # NaN: absent
    bins = np.searchsorted(feature.bin_edges, alcohol, side="right")
    expected = np.bincount(bins, minlength=len(feature.bin_edges) + 1) / len(alcohol)
    np.testing.assert_allclose(feature.expected_fractions, expected)
    assert feature.mean == pytest.approx(alcohol.mean())
    shipped = load_profile(MODELS_DIR / "wine.profile.json")
    assert len(shipped.features) == 11 and not any(f.categories for f in shipped.features)
    decoded = read_sample(WINE_CONTRACT, WINE_CSV)
    names = [f.name for f in profile_of(WINE_CONTRACT, decoded).features]
    assert names == list(WINE_CONTRACT.csv_columns[:-1])  # no quality: it is the label


def test_categorical_drift_counts_categories_and_unseen_values() -> None:
    profile = profile_of(PENGUINS, read_sample(PENGUINS, PENGUINS_CSV))
    reference = drift_reference(profile, PENGUINS)
    assert reference is not None
    assert reference.text_features == ("island", "sex")
    island = PENGUINS.columns["island"].index
    sex = PENGUINS.columns["sex"].index
    numeric = np.zeros((4, len(reference.features)))
    text = np.empty((4, 2), dtype=object)
    text[:, 0] = ["Biscoe", "Biscoe", "Atlantis", "Dream"]
    text[:, 1] = ["male", None, "female", "female"]
    acc = DriftAccumulator.empty(reference)
    acc.add(reference, numeric, text)
    assert acc.text_counts[0].tolist() == [2, 1, 0, 1]  # Biscoe, Dream, Torgersen, unseen
    assert acc.text_counts[1].tolist() == [2, 1, 0]  # an absent sex is not counted
    model = ModelIdentity("penguins", "m", "1", "0" * 64)
    message = drift_message(DriftPartial(model, reference, 0, 1, acc))
    by_name = {f.feature: f for f in message.features}
    assert by_name["island"].categorical and by_name["island"].unseen_count == 1
    assert not by_name["bill_length_mm"].categorical
    assert island != sex
    # A window of the training mix has no categorical drift; a quarter from an island
    # never seen in training has.
    mix = ["Biscoe"] * 49 + ["Dream"] * 36 + ["Torgersen"] * 15
    for islands, drifted in ((mix, False), (mix[:75] + ["Atlantis"] * 25, True)):
        column = np.array(islands, dtype=object)
        window = DriftAccumulator.empty(reference)
        window.add(
            reference, np.zeros((100, len(reference.features))), np.stack([column, column], 1)
        )
        judged = drift_message(DriftPartial(model, reference, 0, 1, window), 0.01, 100)
        island_drift = {f.feature: f for f in judged.features}["island"]
        # (The zero measurements and the islands in the sex column drift too, of course.)
        assert island_drift.drifted is drifted and (island_drift.p_value < 1e-3) is drifted


def test_categorical_profile_orders_categories_and_ignores_absent() -> None:
    feature = categorical_profile("c", ["b", None, "a", "b"])
    assert list(feature.categories) == ["a", "b"]
    assert list(feature.expected_fractions) == pytest.approx([1 / 3, 2 / 3])
    with pytest.raises(ValueError, match="no value"):
        categorical_profile("c", [None])


def test_profile_command_writes_the_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "profile.json"
    args = ["profile", str(PENGUINS_CSV), "--data-type", "penguins", "-o", str(out)]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["rowCount"] == "344" or doc["rowCount"] == 344
    assert any(f.get("categories") for f in doc["features"])
    assert "wrote the profile of 344 records" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    assert main(["profile", str(bad), "--data-type", "penguins"]) == 1
    assert "no record decodes" in capsys.readouterr().err


def test_a_profile_with_the_model_has_its_predictions_and_the_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`waxserve profile --model`: the classifier's classes (each it can predict, 0 for
    those it never did) and the label, beside the features; the registry reads them."""
    out = tmp_path / "profile.json"
    args = ["profile", str(PENGUINS_CSV), "--data-type", "penguins", "--model"]
    assert main([*args, "penguins-species-onnx", "-o", str(out)]) == 0
    profile = load_profile(out)
    assert profile.prediction.name == "prediction"
    assert list(profile.prediction.categories) == ["Adelie", "Chinstrap", "Gentoo"]
    assert sum(profile.prediction.expected_fractions) == pytest.approx(1.0)
    assert profile.label.name == "species" and len(profile.label.categories) == 3
    reference = drift_reference(profile, PENGUINS)
    assert reference is not None and reference.rows == 344
    assert reference.prediction is not None and reference.prediction.categorical
    assert reference.label is not None and reference.label.name == "species"
    # A regressor's predictions are a numeric profile, like a feature's.
    decoded = read_sample(WINE_CONTRACT, WINE_CSV)
    model = load_model_file(MODELS_DIR / "wine-lr.onnx", WINE_CONTRACT.csv_columns[:-1])
    try:
        wine = profile_of(WINE_CONTRACT, decoded, model)
    finally:
        model.close()
    assert len(wine.prediction.bin_edges) == 9 and 5.0 < wine.prediction.mean < 6.5
    assert list(wine.label.bin_edges) == [5.0, 6.0, 7.0]  # quality: deciles of grades
    assert main([*args, str(tmp_path / "missing.onnx")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("part", "change", "problem"),
    [
        ("prediction", lambda f: setattr(f, "mean", float("nan")), "must be finite"),
        ("prediction", lambda f: f.bin_edges.append(-1.0), "ascending bin_edges"),
        ("label", lambda f: f.categories.append("Emperor"), "4 categories but 3"),
        ("label", lambda f: f.expected_fractions.__setitem__(0, -1.0), "finite and >= 0"),
    ],
)
def test_an_unusable_prediction_or_label_profile_is_refused(
    part: str, change: Any, problem: str
) -> None:
    profile = load_profile(MODELS_DIR / "profiles" / "penguins-mass-onnx.json")
    change(getattr(profile, part))
    with pytest.raises(ModelError, match=problem):
        drift_reference(profile, PENGUINS)


def test_a_label_profile_counts_only_for_the_contracts_label_field() -> None:
    profile = load_profile(MODELS_DIR / "profiles" / "penguins-species-onnx.json")
    assert drift_reference(profile, PENGUINS).label is not None  # type: ignore[union-attr]
    profile.label.name = "island"  # a feature, not the label: no label drift
    assert drift_reference(profile, PENGUINS).label is None  # type: ignore[union-attr]
