"""What `waxserve publish` adds for trust: golden sets from files and evaluators, and the
signature over all of it; and `waxserve keys generate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dataflows.contracts.schema import Contract
from dataflows.control.signing import (
    SignaturePolicy,
    SignatureStatus,
    TrustedKeys,
    load_public_key,
    verify,
)
from dataflows.core.descriptors import MODELS_DIR, load_catalog
from dataflows.tools import cli
from dataflows.tools.trust import GoldenSetError, golden_set, read_golden

WINE_ROW = {
    "fixed_acidity": 7.4,
    "volatile_acidity": 0.7,
    "citric_acid": 0,
    "residual_sugar": 1.9,
    "chlorides": 0.076,
    "free_sulfur_dioxide": 11,
    "total_sulfur_dioxide": 34,
    "density": 0.9978,
    "ph": 3.51,
    "sulphates": 0.56,
    "alcohol": 9.4,
}


def wine_contract() -> Contract:
    return cli._contract_for("wine", None)


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_golden_file_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": {"a": 1}}\nnot json\n')
    with pytest.raises(GoldenSetError, match=r"bad\.jsonl:2: not JSON"):
        read_golden(bad)
    write_lines(bad, [{"input": {"a": 1}, "expected": {"colour": "red"}}])
    with pytest.raises(GoldenSetError, match="line 1: unknown keys in expected"):
        read_golden(bad)
    write_lines(bad, [{"inputs": {}}])
    with pytest.raises(GoldenSetError, match="each line is"):
        read_golden(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(GoldenSetError, match="no records"):
        read_golden(tmp_path / "empty.jsonl")


def test_expected_outputs_from_the_model_or_from_the_users_evaluator(tmp_path: Path) -> None:
    entry = load_catalog()["wine-lr"]
    desc = entry.descriptor()
    path = write_lines(
        tmp_path / "golden.jsonl",
        [{"input": WINE_ROW}, {"input": WINE_ROW, "expected": {"value": 5.5}}],
    )
    golden = golden_set(path, desc, desc.model_bytes, wine_contract())
    assert len(golden.inputs) == 2 and golden.inputs[0].fields["alcohol"].number == 9.4
    assert golden.inputs[0].fields["free_sulfur_dioxide"].integer == 11
    assert golden.expected[1].value == 5.5  # given: kept
    assert 4.0 < golden.expected[0].value < 6.5  # computed by wine-lr itself
    assert "the model itself" in golden.evaluator

    # The user's evaluator: reads inputs on stdin, writes expected outputs on stdout.
    script = tmp_path / "evaluator.py"
    script.write_text(
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    row = json.loads(line)\n"
        "    print(json.dumps({'value': row['alcohol'] / 2}))\n"
    )
    command = f"command:{sys.executable} {script}"
    golden = golden_set(path, desc, desc.model_bytes, wine_contract(), evaluator=command)
    assert golden.expected[0].value == 4.7 and golden.evaluator == command
    failing = f"command:{sys.executable} -c 'import sys; sys.exit(3)'"
    with pytest.raises(GoldenSetError, match="exited with 3"):
        golden_set(path, desc, desc.model_bytes, wine_contract(), evaluator=failing)
    with pytest.raises(GoldenSetError, match="'model' or 'command:CMD'"):
        golden_set(path, desc, desc.model_bytes, wine_contract(), evaluator="sklearn")


def test_keys_generate_then_publish_signs_over_the_golden_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keys", "generate", "ci", "--dir", str(tmp_path / "keys")]) == 0
    assert "private:" in capsys.readouterr().out
    assert cli.main(["keys", "generate", "ci", "--dir", str(tmp_path / "keys")]) == 1
    assert "exists" in capsys.readouterr().err

    golden = write_lines(tmp_path / "golden.jsonl", [{"input": WINE_ROW}])
    args = cli.build_parser().parse_args(
        ["publish", "wine-lr", "--golden", str(golden), "--sign", str(tmp_path / "keys/ci.key")]
    )
    desc, path = cli.build_descriptor(args)
    cli._trusted(args, desc, path, MODELS_DIR)
    assert len(desc.golden_set.inputs) == 1
    keys = TrustedKeys.of(load_public_key(tmp_path / "keys/ci.pub"))
    assert verify(desc, keys, SignaturePolicy.REQUIRE).status is SignatureStatus.VALID
    desc.golden_set.tolerance = 0.5  # the signature covers the golden set
    assert verify(desc, keys, SignaturePolicy.REQUIRE).status is SignatureStatus.BAD_SIGNATURE
