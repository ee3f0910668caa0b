from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FORMAT_UNSPECIFIED: _ClassVar[ModelFormat]
    MODEL_FORMAT_ONNX: _ClassVar[ModelFormat]
    MODEL_FORMAT_PMML: _ClassVar[ModelFormat]

class FieldType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIELD_TYPE_UNSPECIFIED: _ClassVar[FieldType]
    FIELD_TYPE_FLOAT: _ClassVar[FieldType]
    FIELD_TYPE_INTEGER: _ClassVar[FieldType]
    FIELD_TYPE_BOOLEAN: _ClassVar[FieldType]
    FIELD_TYPE_STRING: _ClassVar[FieldType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_JSON: _ClassVar[Encoding]
    ENCODING_CSV: _ClassVar[Encoding]
    ENCODING_AVRO: _ClassVar[Encoding]
    ENCODING_PROTOBUF: _ClassVar[Encoding]
    ENCODING_RECORD: _ClassVar[Encoding]

class PlanAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_ACTION_UNSPECIFIED: _ClassVar[PlanAction]
    ACTIVATE: _ClassVar[PlanAction]
    SHADOW: _ClassVar[PlanAction]
    CANARY: _ClassVar[PlanAction]
    SPLIT: _ClassVar[PlanAction]
    ENSEMBLE: _ClassVar[PlanAction]
    BANDIT: _ClassVar[PlanAction]
    SET_WEIGHTS: _ClassVar[PlanAction]
    PROMOTE: _ClassVar[PlanAction]
    ROLLBACK: _ClassVar[PlanAction]
    RETIRE: _ClassVar[PlanAction]

class Combiner(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMBINER_UNSPECIFIED: _ClassVar[Combiner]
    MAJORITY: _ClassVar[Combiner]
    MEAN: _ClassVar[Combiner]
    MEDIAN: _ClassVar[Combiner]
    FIRST_CONFIDENT: _ClassVar[Combiner]
MODEL_FORMAT_UNSPECIFIED: ModelFormat
MODEL_FORMAT_ONNX: ModelFormat
MODEL_FORMAT_PMML: ModelFormat
FIELD_TYPE_UNSPECIFIED: FieldType
FIELD_TYPE_FLOAT: FieldType
FIELD_TYPE_INTEGER: FieldType
FIELD_TYPE_BOOLEAN: FieldType
FIELD_TYPE_STRING: FieldType
ENCODING_UNSPECIFIED: Encoding
ENCODING_JSON: Encoding
ENCODING_CSV: Encoding
ENCODING_AVRO: Encoding
ENCODING_PROTOBUF: Encoding
ENCODING_RECORD: Encoding
PLAN_ACTION_UNSPECIFIED: PlanAction
ACTIVATE: PlanAction
SHADOW: PlanAction
CANARY: PlanAction
SPLIT: PlanAction
ENSEMBLE: PlanAction
BANDIT: PlanAction
SET_WEIGHTS: PlanAction
PROMOTE: PlanAction
ROLLBACK: PlanAction
RETIRE: PlanAction
COMBINER_UNSPECIFIED: Combiner
MAJORITY: Combiner
MEAN: Combiner
MEDIAN: Combiner
FIRST_CONFIDENT: Combiner

class FeatureProfile(_message.Message):
    __slots__ = ("name", "bin_edges", "expected_fractions", "mean", "std", "categories")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BIN_EDGES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FRACTIONS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    bin_edges: _containers.RepeatedScalarFieldContainer[float]
    expected_fractions: _containers.RepeatedScalarFieldContainer[float]
    mean: float
    std: float
    categories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., bin_edges: _Optional[_Iterable[float]] = ..., expected_fractions: _Optional[_Iterable[float]] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., categories: _Optional[_Iterable[str]] = ...) -> None: ...

class ReferenceProfile(_message.Message):
    __slots__ = ("features", "row_count", "prediction", "label")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureProfile]
    row_count: int
    prediction: FeatureProfile
    label: FeatureProfile
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureProfile, _Mapping]]] = ..., row_count: _Optional[int] = ..., prediction: _Optional[_Union[FeatureProfile, _Mapping]] = ..., label: _Optional[_Union[FeatureProfile, _Mapping]] = ...) -> None: ...

class ModelDescriptor(_message.Message):
    __slots__ = ("name", "version", "description", "data_type", "format", "model_bytes", "location", "sha256", "created_at_ms", "input_features", "reference_profile", "contract_version", "signature", "golden_set", "stage")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_PROFILE_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    GOLDEN_SET_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    description: str
    data_type: str
    format: ModelFormat
    model_bytes: bytes
    location: str
    sha256: str
    created_at_ms: int
    input_features: _containers.RepeatedScalarFieldContainer[str]
    reference_profile: ReferenceProfile
    contract_version: int
    signature: DescriptorSignature
    golden_set: GoldenSet
    stage: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., description: _Optional[str] = ..., data_type: _Optional[str] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., model_bytes: _Optional[bytes] = ..., location: _Optional[str] = ..., sha256: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., input_features: _Optional[_Iterable[str]] = ..., reference_profile: _Optional[_Union[ReferenceProfile, _Mapping]] = ..., contract_version: _Optional[int] = ..., signature: _Optional[_Union[DescriptorSignature, _Mapping]] = ..., golden_set: _Optional[_Union[GoldenSet, _Mapping]] = ..., stage: _Optional[str] = ...) -> None: ...

class GoldenSet(_message.Message):
    __slots__ = ("inputs", "expected", "tolerance", "max_latency_us", "evaluator")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    EVALUATOR_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Record]
    expected: _containers.RepeatedCompositeFieldContainer[GoldenOutput]
    tolerance: float
    max_latency_us: float
    evaluator: str
    def __init__(self, inputs: _Optional[_Iterable[_Union[Record, _Mapping]]] = ..., expected: _Optional[_Iterable[_Union[GoldenOutput, _Mapping]]] = ..., tolerance: _Optional[float] = ..., max_latency_us: _Optional[float] = ..., evaluator: _Optional[str] = ...) -> None: ...

class GoldenOutput(_message.Message):
    __slots__ = ("value", "label", "probabilities")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    value: float
    label: str
    probabilities: _containers.ScalarMap[str, float]
    def __init__(self, value: _Optional[float] = ..., label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ...) -> None: ...

class DescriptorSignature(_message.Message):
    __slots__ = ("key_id", "signature", "algorithm")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    signature: bytes
    algorithm: str
    def __init__(self, key_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., algorithm: _Optional[str] = ...) -> None: ...

class FieldSpec(_message.Message):
    __slots__ = ("name", "type", "required", "categories", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: FieldType
    required: bool
    categories: _containers.RepeatedScalarFieldContainer[str]
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[FieldType, str]] = ..., required: _Optional[bool] = ..., categories: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ...) -> None: ...

class CsvOptions(_message.Message):
    __slots__ = ("delimiter", "columns", "header")
    DELIMITER_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    delimiter: str
    columns: _containers.RepeatedScalarFieldContainer[str]
    header: bool
    def __init__(self, delimiter: _Optional[str] = ..., columns: _Optional[_Iterable[str]] = ..., header: _Optional[bool] = ...) -> None: ...

class AvroOptions(_message.Message):
    __slots__ = ("writer_schema", "confluent_framing", "schema_id")
    WRITER_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    CONFLUENT_FRAMING_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_ID_FIELD_NUMBER: _ClassVar[int]
    writer_schema: str
    confluent_framing: bool
    schema_id: int
    def __init__(self, writer_schema: _Optional[str] = ..., confluent_framing: _Optional[bool] = ..., schema_id: _Optional[int] = ...) -> None: ...

class ProtobufOptions(_message.Message):
    __slots__ = ("file_descriptor_set", "message_name")
    FILE_DESCRIPTOR_SET_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    file_descriptor_set: bytes
    message_name: str
    def __init__(self, file_descriptor_set: _Optional[bytes] = ..., message_name: _Optional[str] = ...) -> None: ...

class DataContract(_message.Message):
    __slots__ = ("data_type", "version", "description", "fields", "id_field", "event_time_field", "label_field", "encoding", "csv", "avro", "protobuf", "created_at_ms")
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CSV_FIELD_NUMBER: _ClassVar[int]
    AVRO_FIELD_NUMBER: _ClassVar[int]
    PROTOBUF_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    data_type: str
    version: int
    description: str
    fields: _containers.RepeatedCompositeFieldContainer[FieldSpec]
    id_field: str
    event_time_field: str
    label_field: str
    encoding: Encoding
    csv: CsvOptions
    avro: AvroOptions
    protobuf: ProtobufOptions
    created_at_ms: int
    def __init__(self, data_type: _Optional[str] = ..., version: _Optional[int] = ..., description: _Optional[str] = ..., fields: _Optional[_Iterable[_Union[FieldSpec, _Mapping]]] = ..., id_field: _Optional[str] = ..., event_time_field: _Optional[str] = ..., label_field: _Optional[str] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., csv: _Optional[_Union[CsvOptions, _Mapping]] = ..., avro: _Optional[_Union[AvroOptions, _Mapping]] = ..., protobuf: _Optional[_Union[ProtobufOptions, _Mapping]] = ..., created_at_ms: _Optional[int] = ...) -> None: ...

class ControlMessage(_message.Message):
    __slots__ = ("model", "contract", "plan")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    model: ModelDescriptor
    contract: DataContract
    plan: PlanCommand
    def __init__(self, model: _Optional[_Union[ModelDescriptor, _Mapping]] = ..., contract: _Optional[_Union[DataContract, _Mapping]] = ..., plan: _Optional[_Union[PlanCommand, _Mapping]] = ...) -> None: ...

class PlanVariant(_message.Message):
    __slots__ = ("model", "weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    weight: float
    def __init__(self, model: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class PlanCommand(_message.Message):
    __slots__ = ("data_type", "action", "variants", "entity_field", "combiner", "confidence", "actor", "reason", "issued_at_ms", "for_plan")
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_FIELD_NUMBER: _ClassVar[int]
    COMBINER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FOR_PLAN_FIELD_NUMBER: _ClassVar[int]
    data_type: str
    action: PlanAction
    variants: _containers.RepeatedCompositeFieldContainer[PlanVariant]
    entity_field: str
    combiner: Combiner
    confidence: float
    actor: str
    reason: str
    issued_at_ms: int
    for_plan: int
    def __init__(self, data_type: _Optional[str] = ..., action: _Optional[_Union[PlanAction, str]] = ..., variants: _Optional[_Iterable[_Union[PlanVariant, _Mapping]]] = ..., entity_field: _Optional[str] = ..., combiner: _Optional[_Union[Combiner, str]] = ..., confidence: _Optional[float] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., issued_at_ms: _Optional[int] = ..., for_plan: _Optional[int] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("number", "integer", "boolean", "text")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    BOOLEAN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    number: float
    integer: int
    boolean: bool
    text: str
    def __init__(self, number: _Optional[float] = ..., integer: _Optional[int] = ..., boolean: _Optional[bool] = ..., text: _Optional[str] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("fields",)
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.MessageMap[str, Value]
    def __init__(self, fields: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class ScoredRecord(_message.Message):
    __slots__ = ("output_key", "record_id", "data_type", "source_topic", "source_partition", "source_offset", "model_name", "model_version", "model_sha256", "value", "label", "probabilities", "scoring_latency_us", "event_time_ms", "scored_at_ms", "batch_size", "scored_by", "lineage", "policy", "plan_number", "variant_role", "members")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OUTPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PARTITION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    SCORING_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    SCORED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCORED_BY_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PLAN_NUMBER_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ROLE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    output_key: str
    record_id: str
    data_type: str
    source_topic: str
    source_partition: int
    source_offset: int
    model_name: str
    model_version: str
    model_sha256: str
    value: float
    label: str
    probabilities: _containers.ScalarMap[str, float]
    scoring_latency_us: float
    event_time_ms: int
    scored_at_ms: int
    batch_size: int
    scored_by: str
    lineage: Lineage
    policy: str
    plan_number: int
    variant_role: str
    members: _containers.RepeatedCompositeFieldContainer[MemberOutput]
    def __init__(self, output_key: _Optional[str] = ..., record_id: _Optional[str] = ..., data_type: _Optional[str] = ..., source_topic: _Optional[str] = ..., source_partition: _Optional[int] = ..., source_offset: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., value: _Optional[float] = ..., label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ..., scoring_latency_us: _Optional[float] = ..., event_time_ms: _Optional[int] = ..., scored_at_ms: _Optional[int] = ..., batch_size: _Optional[int] = ..., scored_by: _Optional[str] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., policy: _Optional[str] = ..., plan_number: _Optional[int] = ..., variant_role: _Optional[str] = ..., members: _Optional[_Iterable[_Union[MemberOutput, _Mapping]]] = ...) -> None: ...

class MemberOutput(_message.Message):
    __slots__ = ("model_name", "model_version", "value", "label", "probabilities")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    value: float
    label: str
    probabilities: _containers.ScalarMap[str, float]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., value: _Optional[float] = ..., label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("control_topic", "control_partition", "control_offset", "signer_key_id", "signature_status", "contract_version", "decision")
    CONTROL_TOPIC_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PARTITION_FIELD_NUMBER: _ClassVar[int]
    CONTROL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIGNER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_STATUS_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    control_topic: str
    control_partition: int
    control_offset: int
    signer_key_id: str
    signature_status: str
    contract_version: int
    decision: str
    def __init__(self, control_topic: _Optional[str] = ..., control_partition: _Optional[int] = ..., control_offset: _Optional[int] = ..., signer_key_id: _Optional[str] = ..., signature_status: _Optional[str] = ..., contract_version: _Optional[int] = ..., decision: _Optional[str] = ...) -> None: ...

class ServingStats(_message.Message):
    __slots__ = ("data_type", "model_name", "model_version", "model_sha256", "description", "format", "since_ms", "usage_count", "total_duration_ms", "min_duration_us", "max_duration_us", "mean_duration_us", "window_start_ms", "window_end_ms", "window_count", "window_labelled_count", "window_rmse", "window_accuracy", "feedback_window", "feedback_total", "shadow_window")
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    USAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_DURATION_US_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_US_FIELD_NUMBER: _ClassVar[int]
    MEAN_DURATION_US_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_COUNT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LABELLED_COUNT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_RMSE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_WINDOW_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHADOW_WINDOW_FIELD_NUMBER: _ClassVar[int]
    data_type: str
    model_name: str
    model_version: str
    model_sha256: str
    description: str
    format: ModelFormat
    since_ms: int
    usage_count: int
    total_duration_ms: float
    min_duration_us: float
    max_duration_us: float
    mean_duration_us: float
    window_start_ms: int
    window_end_ms: int
    window_count: int
    window_labelled_count: int
    window_rmse: float
    window_accuracy: float
    feedback_window: OnlineQuality
    feedback_total: OnlineQuality
    shadow_window: ShadowAgreement
    def __init__(self, data_type: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., description: _Optional[str] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., since_ms: _Optional[int] = ..., usage_count: _Optional[int] = ..., total_duration_ms: _Optional[float] = ..., min_duration_us: _Optional[float] = ..., max_duration_us: _Optional[float] = ..., mean_duration_us: _Optional[float] = ..., window_start_ms: _Optional[int] = ..., window_end_ms: _Optional[int] = ..., window_count: _Optional[int] = ..., window_labelled_count: _Optional[int] = ..., window_rmse: _Optional[float] = ..., window_accuracy: _Optional[float] = ..., feedback_window: _Optional[_Union[OnlineQuality, _Mapping]] = ..., feedback_total: _Optional[_Union[OnlineQuality, _Mapping]] = ..., shadow_window: _Optional[_Union[ShadowAgreement, _Mapping]] = ...) -> None: ...

class ShadowAgreement(_message.Message):
    __slots__ = ("primary_name", "primary_version", "compared_count", "mean_absolute_difference", "agreement_rate", "confusion", "absolute_difference_sum", "agree_count")
    PRIMARY_NAME_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPARED_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABSOLUTE_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_RATE_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_FIELD_NUMBER: _ClassVar[int]
    ABSOLUTE_DIFFERENCE_SUM_FIELD_NUMBER: _ClassVar[int]
    AGREE_COUNT_FIELD_NUMBER: _ClassVar[int]
    primary_name: str
    primary_version: str
    compared_count: int
    mean_absolute_difference: float
    agreement_rate: float
    confusion: ConfusionMatrix
    absolute_difference_sum: float
    agree_count: int
    def __init__(self, primary_name: _Optional[str] = ..., primary_version: _Optional[str] = ..., compared_count: _Optional[int] = ..., mean_absolute_difference: _Optional[float] = ..., agreement_rate: _Optional[float] = ..., confusion: _Optional[_Union[ConfusionMatrix, _Mapping]] = ..., absolute_difference_sum: _Optional[float] = ..., agree_count: _Optional[int] = ...) -> None: ...

class OnlineQuality(_message.Message):
    __slots__ = ("labelled_count", "rmse", "mae", "accuracy", "log_loss", "confusion", "error_count", "squared_error_sum", "absolute_error_sum", "correct_count", "log_loss_sum", "log_loss_count", "labels")
    LABELLED_COUNT_FIELD_NUMBER: _ClassVar[int]
    RMSE_FIELD_NUMBER: _ClassVar[int]
    MAE_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_COUNT_FIELD_NUMBER: _ClassVar[int]
    SQUARED_ERROR_SUM_FIELD_NUMBER: _ClassVar[int]
    ABSOLUTE_ERROR_SUM_FIELD_NUMBER: _ClassVar[int]
    CORRECT_COUNT_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labelled_count: int
    rmse: float
    mae: float
    accuracy: float
    log_loss: float
    confusion: ConfusionMatrix
    error_count: int
    squared_error_sum: float
    absolute_error_sum: float
    correct_count: int
    log_loss_sum: float
    log_loss_count: int
    labels: LabelOutcomes
    def __init__(self, labelled_count: _Optional[int] = ..., rmse: _Optional[float] = ..., mae: _Optional[float] = ..., accuracy: _Optional[float] = ..., log_loss: _Optional[float] = ..., confusion: _Optional[_Union[ConfusionMatrix, _Mapping]] = ..., error_count: _Optional[int] = ..., squared_error_sum: _Optional[float] = ..., absolute_error_sum: _Optional[float] = ..., correct_count: _Optional[int] = ..., log_loss_sum: _Optional[float] = ..., log_loss_count: _Optional[int] = ..., labels: _Optional[_Union[LabelOutcomes, _Mapping]] = ...) -> None: ...

class ConfusionMatrix(_message.Message):
    __slots__ = ("classes", "counts")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[str]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, classes: _Optional[_Iterable[str]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class LabelOutcomes(_message.Message):
    __slots__ = ("matched", "unknown", "expired", "evicted", "duplicate")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    matched: int
    unknown: int
    expired: int
    evicted: int
    duplicate: int
    def __init__(self, matched: _Optional[int] = ..., unknown: _Optional[int] = ..., expired: _Optional[int] = ..., evicted: _Optional[int] = ..., duplicate: _Optional[int] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("feature", "psi", "mean", "mean_shift_sigmas", "bin_counts", "unseen_count", "categorical", "quantity", "record_count", "p_value", "drifted", "distance")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    MEAN_SHIFT_SIGMAS_FIELD_NUMBER: _ClassVar[int]
    BIN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    UNSEEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    CATEGORICAL_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    RECORD_COUNT_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    feature: str
    psi: float
    mean: float
    mean_shift_sigmas: float
    bin_counts: _containers.RepeatedScalarFieldContainer[int]
    unseen_count: int
    categorical: bool
    quantity: str
    record_count: int
    p_value: float
    drifted: bool
    distance: float
    def __init__(self, feature: _Optional[str] = ..., psi: _Optional[float] = ..., mean: _Optional[float] = ..., mean_shift_sigmas: _Optional[float] = ..., bin_counts: _Optional[_Iterable[int]] = ..., unseen_count: _Optional[int] = ..., categorical: _Optional[bool] = ..., quantity: _Optional[str] = ..., record_count: _Optional[int] = ..., p_value: _Optional[float] = ..., drifted: _Optional[bool] = ..., distance: _Optional[float] = ...) -> None: ...

class DriftMetrics(_message.Message):
    __slots__ = ("data_type", "model_name", "model_version", "window_start_ms", "window_end_ms", "record_count", "features", "max_psi", "alarm", "judged", "alpha")
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_MS_FIELD_NUMBER: _ClassVar[int]
    RECORD_COUNT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MAX_PSI_FIELD_NUMBER: _ClassVar[int]
    ALARM_FIELD_NUMBER: _ClassVar[int]
    JUDGED_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    data_type: str
    model_name: str
    model_version: str
    window_start_ms: int
    window_end_ms: int
    record_count: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    max_psi: float
    alarm: bool
    judged: bool
    alpha: float
    def __init__(self, data_type: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., window_start_ms: _Optional[int] = ..., window_end_ms: _Optional[int] = ..., record_count: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., max_psi: _Optional[float] = ..., alarm: _Optional[bool] = ..., judged: _Optional[bool] = ..., alpha: _Optional[float] = ...) -> None: ...

class ModelEvent(_message.Message):
    __slots__ = ("kind", "data_type", "model_name", "model_version", "model_sha256", "reason", "message", "at_ms", "source_topic", "source_partition", "source_offset", "contract_version", "sequence", "signer_key_id", "signature_status", "gate", "plan_action", "actor", "plan", "plan_number")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PARTITION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_STATUS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PLAN_NUMBER_FIELD_NUMBER: _ClassVar[int]
    kind: str
    data_type: str
    model_name: str
    model_version: str
    model_sha256: str
    reason: str
    message: str
    at_ms: int
    source_topic: str
    source_partition: int
    source_offset: int
    contract_version: int
    sequence: int
    signer_key_id: str
    signature_status: str
    gate: str
    plan_action: str
    actor: str
    plan: str
    plan_number: int
    def __init__(self, kind: _Optional[str] = ..., data_type: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., at_ms: _Optional[int] = ..., source_topic: _Optional[str] = ..., source_partition: _Optional[int] = ..., source_offset: _Optional[int] = ..., contract_version: _Optional[int] = ..., sequence: _Optional[int] = ..., signer_key_id: _Optional[str] = ..., signature_status: _Optional[str] = ..., gate: _Optional[str] = ..., plan_action: _Optional[str] = ..., actor: _Optional[str] = ..., plan: _Optional[str] = ..., plan_number: _Optional[int] = ...) -> None: ...
