from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PromoteRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class SetCanaryRequest(_message.Message):
    __slots__ = ("set_share", "share", "set_enabled", "enabled")
    SET_SHARE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    SET_ENABLED_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    set_share: bool
    share: float
    set_enabled: bool
    enabled: bool
    def __init__(self, set_share: _Optional[bool] = ..., share: _Optional[float] = ..., set_enabled: _Optional[bool] = ..., enabled: _Optional[bool] = ...) -> None: ...

class GetCanaryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CanaryStatus(_message.Message):
    __slots__ = ("enabled", "stable_version", "candidate_version", "share", "queued", "evidence_json", "last_decision_json")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_JSON_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_JSON_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    stable_version: int
    candidate_version: int
    share: float
    queued: _containers.RepeatedScalarFieldContainer[int]
    evidence_json: str
    last_decision_json: str
    def __init__(self, enabled: _Optional[bool] = ..., stable_version: _Optional[int] = ..., candidate_version: _Optional[int] = ..., share: _Optional[float] = ..., queued: _Optional[_Iterable[int]] = ..., evidence_json: _Optional[str] = ..., last_decision_json: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class LearnerStatus(_message.Message):
    __slots__ = ("paused", "step", "policy_version", "serving_version", "kl_coef", "rollouts_trained", "rollouts_dropped_stale", "last_stats", "rollouts_per_version", "max_policy_lag", "temperature")
    class LastStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    KL_COEF_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    LAST_STATS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_PER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_POLICY_LAG_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    paused: bool
    step: int
    policy_version: int
    serving_version: int
    kl_coef: float
    rollouts_trained: int
    rollouts_dropped_stale: int
    last_stats: _containers.ScalarMap[str, float]
    rollouts_per_version: int
    max_policy_lag: int
    temperature: float
    def __init__(self, paused: _Optional[bool] = ..., step: _Optional[int] = ..., policy_version: _Optional[int] = ..., serving_version: _Optional[int] = ..., kl_coef: _Optional[float] = ..., rollouts_trained: _Optional[int] = ..., rollouts_dropped_stale: _Optional[int] = ..., last_stats: _Optional[_Mapping[str, float]] = ..., rollouts_per_version: _Optional[int] = ..., max_policy_lag: _Optional[int] = ..., temperature: _Optional[float] = ...) -> None: ...

class PolicyVersionInfo(_message.Message):
    __slots__ = ("version", "step", "created_unix_ms", "uri", "sha256", "format", "kl_to_reference", "promoted", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    KL_TO_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    step: int
    created_unix_ms: int
    uri: str
    sha256: str
    format: _common_pb2.WeightFormat
    kl_to_reference: float
    promoted: bool
    reason: str
    def __init__(self, version: _Optional[int] = ..., step: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., uri: _Optional[str] = ..., sha256: _Optional[str] = ..., format: _Optional[_Union[_common_pb2.WeightFormat, str]] = ..., kl_to_reference: _Optional[float] = ..., promoted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[PolicyVersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[PolicyVersionInfo, _Mapping]]] = ...) -> None: ...
