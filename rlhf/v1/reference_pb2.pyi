from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogProbsItem(_message.Message):
    __slots__ = ("prompt_token_ids", "response_token_ids")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LogProbsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LogProbsItem]
    def __init__(self, items: _Optional[_Iterable[_Union[LogProbsItem, _Mapping]]] = ...) -> None: ...

class LogProbsResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogProbs]
    model: str
    def __init__(self, results: _Optional[_Iterable[_Union[_common_pb2.TokenLogProbs, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class ReferenceInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReferenceInfo(_message.Message):
    __slots__ = ("model", "max_model_len")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    max_model_len: int
    def __init__(self, model: _Optional[str] = ..., max_model_len: _Optional[int] = ...) -> None: ...
