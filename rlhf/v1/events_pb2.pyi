from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComparisonOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPARISON_OUTCOME_CHOSEN: _ClassVar[ComparisonOutcome]
    COMPARISON_OUTCOME_TIE: _ClassVar[ComparisonOutcome]
    COMPARISON_OUTCOME_BOTH_BAD: _ClassVar[ComparisonOutcome]

class PolicyAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_ACTION_UNSPECIFIED: _ClassVar[PolicyAction]
    POLICY_ACTION_PROMOTED: _ClassVar[PolicyAction]
    POLICY_ACTION_REJECTED: _ClassVar[PolicyAction]
    POLICY_ACTION_ROLLED_BACK: _ClassVar[PolicyAction]
    POLICY_ACTION_CANARY: _ClassVar[PolicyAction]
COMPARISON_OUTCOME_CHOSEN: ComparisonOutcome
COMPARISON_OUTCOME_TIE: ComparisonOutcome
COMPARISON_OUTCOME_BOTH_BAD: ComparisonOutcome
POLICY_ACTION_UNSPECIFIED: PolicyAction
POLICY_ACTION_PROMOTED: PolicyAction
POLICY_ACTION_REJECTED: PolicyAction
POLICY_ACTION_ROLLED_BACK: PolicyAction
POLICY_ACTION_CANARY: PolicyAction

class Feedback(_message.Message):
    __slots__ = ("schema_version", "event_id", "created_unix_ms", "conversation_id", "prompt", "rating", "comparison", "comment", "corrected_answer", "source", "rater_id", "anonymous", "scores", "tags", "metadata", "supersedes_event_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    CORRECTED_ANSWER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RATER_ID_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    created_unix_ms: int
    conversation_id: str
    prompt: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    rating: Rating
    comparison: Comparison
    comment: str
    corrected_answer: str
    source: str
    rater_id: str
    anonymous: bool
    scores: _containers.RepeatedCompositeFieldContainer[NamedScore]
    tags: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    supersedes_event_id: str
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., conversation_id: _Optional[str] = ..., prompt: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., rating: _Optional[_Union[Rating, _Mapping]] = ..., comparison: _Optional[_Union[Comparison, _Mapping]] = ..., comment: _Optional[str] = ..., corrected_answer: _Optional[str] = ..., source: _Optional[str] = ..., rater_id: _Optional[str] = ..., anonymous: _Optional[bool] = ..., scores: _Optional[_Iterable[_Union[NamedScore, _Mapping]]] = ..., tags: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., supersedes_event_id: _Optional[str] = ...) -> None: ...

class NamedScore(_message.Message):
    __slots__ = ("name", "value", "category")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    category: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., category: _Optional[str] = ...) -> None: ...

class Rating(_message.Message):
    __slots__ = ("response_id", "response", "value", "policy_version")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    response: str
    value: int
    policy_version: int
    def __init__(self, response_id: _Optional[str] = ..., response: _Optional[str] = ..., value: _Optional[int] = ..., policy_version: _Optional[int] = ...) -> None: ...

class Comparison(_message.Message):
    __slots__ = ("chosen_id", "chosen", "rejected_id", "rejected", "chosen_policy_version", "rejected_policy_version", "outcome")
    CHOSEN_ID_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    chosen_id: str
    chosen: str
    rejected_id: str
    rejected: str
    chosen_policy_version: int
    rejected_policy_version: int
    outcome: ComparisonOutcome
    def __init__(self, chosen_id: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected_id: _Optional[str] = ..., rejected: _Optional[str] = ..., chosen_policy_version: _Optional[int] = ..., rejected_policy_version: _Optional[int] = ..., outcome: _Optional[_Union[ComparisonOutcome, str]] = ...) -> None: ...

class Interaction(_message.Message):
    __slots__ = ("schema_version", "event_id", "created_unix_ms", "conversation_id", "prompt", "response_ids", "responses", "policy_version")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    created_unix_ms: int
    conversation_id: str
    prompt: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    response_ids: _containers.RepeatedScalarFieldContainer[str]
    responses: _containers.RepeatedScalarFieldContainer[str]
    policy_version: int
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., conversation_id: _Optional[str] = ..., prompt: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., response_ids: _Optional[_Iterable[str]] = ..., responses: _Optional[_Iterable[str]] = ..., policy_version: _Optional[int] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("schema_version", "event_id", "created_unix_ms", "prompt_id", "messages", "source")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    created_unix_ms: int
    prompt_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    source: str
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., prompt_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("schema_version", "event_id", "created_unix_ms", "prompt_id", "prompt_token_ids", "response_token_ids", "logprobs", "ref_logprobs", "score", "raw_score", "policy_version", "rm_version", "finish_reason", "source", "prompt", "response", "group_id", "group_size")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RM_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    created_unix_ms: int
    prompt_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    ref_logprobs: _containers.RepeatedScalarFieldContainer[float]
    score: float
    raw_score: float
    policy_version: int
    rm_version: int
    finish_reason: str
    source: str
    prompt: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    response: str
    group_id: str
    group_size: int
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., prompt_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., ref_logprobs: _Optional[_Iterable[float]] = ..., score: _Optional[float] = ..., raw_score: _Optional[float] = ..., policy_version: _Optional[int] = ..., rm_version: _Optional[int] = ..., finish_reason: _Optional[str] = ..., source: _Optional[str] = ..., prompt: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., response: _Optional[str] = ..., group_id: _Optional[str] = ..., group_size: _Optional[int] = ...) -> None: ...

class PolicyUpdate(_message.Message):
    __slots__ = ("schema_version", "event_id", "created_unix_ms", "version", "parent_version", "step", "uri", "sha256", "format", "action", "kl_to_reference", "kl_budget", "base_model", "reason", "rollouts_per_version", "max_policy_lag", "temperature", "stable_version", "candidate_version", "canary_share", "decision_json")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    KL_TO_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    KL_BUDGET_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_PER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_POLICY_LAG_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_SHARE_FIELD_NUMBER: _ClassVar[int]
    DECISION_JSON_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    created_unix_ms: int
    version: int
    parent_version: int
    step: int
    uri: str
    sha256: str
    format: _common_pb2.WeightFormat
    action: PolicyAction
    kl_to_reference: float
    kl_budget: float
    base_model: str
    reason: str
    rollouts_per_version: int
    max_policy_lag: int
    temperature: float
    stable_version: int
    candidate_version: int
    canary_share: float
    decision_json: str
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., version: _Optional[int] = ..., parent_version: _Optional[int] = ..., step: _Optional[int] = ..., uri: _Optional[str] = ..., sha256: _Optional[str] = ..., format: _Optional[_Union[_common_pb2.WeightFormat, str]] = ..., action: _Optional[_Union[PolicyAction, str]] = ..., kl_to_reference: _Optional[float] = ..., kl_budget: _Optional[float] = ..., base_model: _Optional[str] = ..., reason: _Optional[str] = ..., rollouts_per_version: _Optional[int] = ..., max_policy_lag: _Optional[int] = ..., temperature: _Optional[float] = ..., stable_version: _Optional[int] = ..., candidate_version: _Optional[int] = ..., canary_share: _Optional[float] = ..., decision_json: _Optional[str] = ...) -> None: ...

class RewardModelUpdate(_message.Message):
    __slots__ = ("schema_version", "event_id", "created_unix_ms", "version", "train_step", "uri", "sha256", "online_accuracy", "score_mean", "score_std", "pairs_seen")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEP_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ONLINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SCORE_MEAN_FIELD_NUMBER: _ClassVar[int]
    SCORE_STD_FIELD_NUMBER: _ClassVar[int]
    PAIRS_SEEN_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    created_unix_ms: int
    version: int
    train_step: int
    uri: str
    sha256: str
    online_accuracy: float
    score_mean: float
    score_std: float
    pairs_seen: int
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., version: _Optional[int] = ..., train_step: _Optional[int] = ..., uri: _Optional[str] = ..., sha256: _Optional[str] = ..., online_accuracy: _Optional[float] = ..., score_mean: _Optional[float] = ..., score_std: _Optional[float] = ..., pairs_seen: _Optional[int] = ...) -> None: ...
