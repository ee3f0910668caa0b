"""Why an input went to the dead-letter topic: one enum, the `waxserve.error.class` header.

The values are strings on the wire, in metrics labels and in model events; a `Reason`
compares equal to its string.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """Where in the dataflow an input was refused."""

    DECODE = "decode"  # a record's bytes, or which data type it is
    SCORE = "score"  # a decoded record that could not be scored
    MODEL = "model"  # a model descriptor
    CONTRACT = "contract"  # a data contract
    PLAN = "plan"  # a serving-plan command


class Reason(StrEnum):
    """The error class of a dead letter."""

    # decode: records
    NO_DATA_TYPE = "no_data_type"
    UNDECODABLE = "undecodable"
    WRONG_TYPE = "wrong_type"
    NON_FINITE = "non_finite"
    OUT_OF_RANGE = "out_of_range"
    MISSING_FIELD = "missing_field"
    UNKNOWN_CATEGORY = "unknown_category"
    BAD_CSV = "bad_csv"
    CSV_HEADER = "csv_header"
    # score
    NO_CONTRACT = "no_contract"
    NO_MODEL = "no_model"
    MISSING_FEATURE = "missing_feature"
    SCORE_FAILED = "score_failed"
    INVALID_PREDICTION = "invalid_prediction"
    BAD_LABEL = "bad_label"  # a label no quality metric can take (e.g. beyond ±1e12)
    HELD_OVERFLOW = "held_overflow"  # no model yet, and the process holds all it may
    TOO_MANY_DATA_TYPES = "too_many_data_types"  # a new data type past max_data_types
    # plan
    BAD_PLAN = "bad_plan"  # a plan command that cannot apply (the plan in effect stays)
    # model
    BAD_DESCRIPTOR = "bad_descriptor"
    UNSUPPORTED_MODEL = "unsupported_model"
    LOCATION_REJECTED = "location_rejected"
    LOCATION_UNREADABLE = "location_unreadable"
    DIGEST_MISMATCH = "digest_mismatch"
    LOAD_FAILED = "load_failed"
    BAD_INPUTS = "bad_inputs"
    BAD_PROFILE = "bad_profile"
    MODEL_TOO_LARGE = "model_too_large"  # a descriptor or model past max_model_bytes
    UNSIGNED = "unsigned"  # signatures required, and the descriptor has none
    UNKNOWN_KEY = "unknown_key"  # signed by a key the dataflow does not trust
    BAD_SIGNATURE = "bad_signature"  # the signature does not match the descriptor
    GATE_FAILED = "gate_failed"  # the quality gate: invalid, wrong or slow outputs
    # contract
    BAD_CONTRACT = "bad_contract"
    INCOMPATIBLE_CONTRACT = "incompatible_contract"


STAGE_REASONS: dict[Stage, tuple[Reason, ...]] = {
    Stage.DECODE: (
        Reason.NO_DATA_TYPE,
        Reason.UNDECODABLE,
        Reason.WRONG_TYPE,
        Reason.NON_FINITE,
        Reason.OUT_OF_RANGE,
        Reason.MISSING_FIELD,
        Reason.UNKNOWN_CATEGORY,
        Reason.BAD_CSV,
        Reason.CSV_HEADER,
    ),
    Stage.SCORE: (
        Reason.NO_CONTRACT,
        Reason.NO_MODEL,
        Reason.MISSING_FEATURE,
        Reason.UNKNOWN_CATEGORY,
        Reason.SCORE_FAILED,
        Reason.INVALID_PREDICTION,
        Reason.BAD_LABEL,
        Reason.HELD_OVERFLOW,
        Reason.TOO_MANY_DATA_TYPES,
    ),
    Stage.MODEL: (
        Reason.UNDECODABLE,
        Reason.BAD_DESCRIPTOR,
        Reason.UNSUPPORTED_MODEL,
        Reason.NO_CONTRACT,
        Reason.NO_MODEL,
        Reason.LOCATION_REJECTED,
        Reason.LOCATION_UNREADABLE,
        Reason.DIGEST_MISMATCH,
        Reason.LOAD_FAILED,
        Reason.BAD_INPUTS,
        Reason.BAD_PROFILE,
        Reason.MODEL_TOO_LARGE,
        Reason.UNSIGNED,
        Reason.UNKNOWN_KEY,
        Reason.BAD_SIGNATURE,
        Reason.GATE_FAILED,
        Reason.TOO_MANY_DATA_TYPES,
    ),
    Stage.CONTRACT: (
        Reason.UNDECODABLE,
        Reason.BAD_CONTRACT,
        Reason.INCOMPATIBLE_CONTRACT,
        Reason.TOO_MANY_DATA_TYPES,
    ),
    Stage.PLAN: (Reason.BAD_PLAN, Reason.TOO_MANY_DATA_TYPES),
}
"""Every (stage, reason) a dead letter can have."""
