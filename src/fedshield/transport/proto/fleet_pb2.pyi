from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("client_id", "nonce", "sent_at_ms", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    nonce: bytes
    sent_at_ms: int
    signature: bytes
    def __init__(self, client_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., sent_at_ms: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("envelope", "protocol", "version")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    protocol: int
    version: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., protocol: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run_id", "plan_json", "server_time_ms", "boot_id", "protocol", "version", "poll_s", "heartbeat_s", "chunk_bytes")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POLL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    plan_json: bytes
    server_time_ms: int
    boot_id: str
    protocol: int
    version: str
    poll_s: float
    heartbeat_s: float
    chunk_bytes: int
    def __init__(self, run_id: _Optional[str] = ..., plan_json: _Optional[bytes] = ..., server_time_ms: _Optional[int] = ..., boot_id: _Optional[str] = ..., protocol: _Optional[int] = ..., version: _Optional[str] = ..., poll_s: _Optional[float] = ..., heartbeat_s: _Optional[float] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("envelope", "status")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    status: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., status: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("server_time_ms", "boot_id")
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    server_time_ms: int
    boot_id: str
    def __init__(self, server_time_ms: _Optional[int] = ..., boot_id: _Optional[str] = ...) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("envelope", "run_id")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    run_id: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., run_id: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "round", "stage", "deadline_ms", "payload", "payload_size", "payload_digest", "stage_seed")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STAGE_SEED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round: int
    stage: str
    deadline_ms: int
    payload: bytes
    payload_size: int
    payload_digest: str
    stage_seed: bytes
    def __init__(self, task_id: _Optional[str] = ..., round: _Optional[int] = ..., stage: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., payload: _Optional[bytes] = ..., payload_size: _Optional[int] = ..., payload_digest: _Optional[str] = ..., stage_seed: _Optional[bytes] = ...) -> None: ...

class PullTaskReply(_message.Message):
    __slots__ = ("task", "wait", "finished", "run_id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    task: Task
    wait: bool
    finished: bool
    run_id: str
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., wait: _Optional[bool] = ..., finished: _Optional[bool] = ..., run_id: _Optional[str] = ...) -> None: ...

class FetchBlobRequest(_message.Message):
    __slots__ = ("envelope", "digest", "offset")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    digest: str
    offset: int
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., digest: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("envelope", "task_id", "digest", "size", "offset")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    task_id: str
    digest: str
    size: int
    offset: int
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., task_id: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ResultPart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PushResultReply(_message.Message):
    __slots__ = ("status", "received")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACCEPTED: _ClassVar[PushResultReply.Status]
        DUPLICATE: _ClassVar[PushResultReply.Status]
        STAGE_CLOSED: _ClassVar[PushResultReply.Status]
        PARTIAL: _ClassVar[PushResultReply.Status]
    ACCEPTED: PushResultReply.Status
    DUPLICATE: PushResultReply.Status
    STAGE_CLOSED: PushResultReply.Status
    PARTIAL: PushResultReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    status: PushResultReply.Status
    received: int
    def __init__(self, status: _Optional[_Union[PushResultReply.Status, str]] = ..., received: _Optional[int] = ...) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("envelope", "task_id", "digest")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    task_id: str
    digest: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., task_id: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class UploadStatusReply(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...
