from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    response: str
    def __init__(self, prompt: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., response: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "raw_scores", "rm_version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    RM_VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    raw_scores: _containers.RepeatedScalarFieldContainer[float]
    rm_version: int
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., raw_scores: _Optional[_Iterable[float]] = ..., rm_version: _Optional[int] = ...) -> None: ...

class RewardInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RewardInfo(_message.Message):
    __slots__ = ("rm_version", "train_step", "online_accuracy", "pairs_seen", "backbone", "examples_seen")
    RM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEP_FIELD_NUMBER: _ClassVar[int]
    ONLINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PAIRS_SEEN_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_SEEN_FIELD_NUMBER: _ClassVar[int]
    rm_version: int
    train_step: int
    online_accuracy: float
    pairs_seen: int
    backbone: str
    examples_seen: int
    def __init__(self, rm_version: _Optional[int] = ..., train_step: _Optional[int] = ..., online_accuracy: _Optional[float] = ..., pairs_seen: _Optional[int] = ..., backbone: _Optional[str] = ..., examples_seen: _Optional[int] = ...) -> None: ...

class ListRatersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RaterInfo(_message.Message):
    __slots__ = ("rater_id", "accuracy", "votes", "weight", "quarantined", "released", "held_examples")
    RATER_ID_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    HELD_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    rater_id: str
    accuracy: float
    votes: int
    weight: float
    quarantined: bool
    released: bool
    held_examples: int
    def __init__(self, rater_id: _Optional[str] = ..., accuracy: _Optional[float] = ..., votes: _Optional[int] = ..., weight: _Optional[float] = ..., quarantined: _Optional[bool] = ..., released: _Optional[bool] = ..., held_examples: _Optional[int] = ...) -> None: ...

class ListRatersResponse(_message.Message):
    __slots__ = ("raters", "quarantined")
    RATERS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    raters: _containers.RepeatedCompositeFieldContainer[RaterInfo]
    quarantined: int
    def __init__(self, raters: _Optional[_Iterable[_Union[RaterInfo, _Mapping]]] = ..., quarantined: _Optional[int] = ...) -> None: ...

class ReleaseRaterRequest(_message.Message):
    __slots__ = ("rater_id",)
    RATER_ID_FIELD_NUMBER: _ClassVar[int]
    rater_id: str
    def __init__(self, rater_id: _Optional[str] = ...) -> None: ...

class ReleaseRaterResponse(_message.Message):
    __slots__ = ("rater_id", "was_quarantined", "released_examples", "replayed_events", "replayed_examples")
    RATER_ID_FIELD_NUMBER: _ClassVar[int]
    WAS_QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    rater_id: str
    was_quarantined: bool
    released_examples: int
    replayed_events: int
    replayed_examples: int
    def __init__(self, rater_id: _Optional[str] = ..., was_quarantined: _Optional[bool] = ..., released_examples: _Optional[int] = ..., replayed_events: _Optional[int] = ..., replayed_examples: _Optional[int] = ...) -> None: ...
