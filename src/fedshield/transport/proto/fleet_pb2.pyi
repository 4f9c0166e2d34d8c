from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

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
    def __init__(
        self,
        client_id: str | None = ...,
        nonce: bytes | None = ...,
        sent_at_ms: int | None = ...,
        signature: bytes | None = ...,
    ) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("envelope", "protocol", "version")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    protocol: int
    version: str
    def __init__(
        self,
        envelope: Envelope | _Mapping | None = ...,
        protocol: int | None = ...,
        version: str | None = ...,
    ) -> None: ...

class JoinReply(_message.Message):
    __slots__ = (
        "boot_id",
        "chunk_bytes",
        "heartbeat_s",
        "plan_json",
        "poll_s",
        "protocol",
        "run_id",
        "server_time_ms",
        "version",
    )
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
    def __init__(
        self,
        run_id: str | None = ...,
        plan_json: bytes | None = ...,
        server_time_ms: int | None = ...,
        boot_id: str | None = ...,
        protocol: int | None = ...,
        version: str | None = ...,
        poll_s: float | None = ...,
        heartbeat_s: float | None = ...,
        chunk_bytes: int | None = ...,
    ) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("envelope", "status")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    status: str
    def __init__(
        self,
        envelope: Envelope | _Mapping | None = ...,
        status: str | None = ...,
    ) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("boot_id", "server_time_ms")
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    server_time_ms: int
    boot_id: str
    def __init__(
        self, server_time_ms: int | None = ..., boot_id: str | None = ...
    ) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("envelope", "run_id")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    run_id: str
    def __init__(
        self,
        envelope: Envelope | _Mapping | None = ...,
        run_id: str | None = ...,
    ) -> None: ...

class Task(_message.Message):
    __slots__ = (
        "deadline_ms",
        "payload",
        "payload_digest",
        "payload_size",
        "round",
        "stage",
        "stage_seed",
        "task_id",
    )
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
    def __init__(
        self,
        task_id: str | None = ...,
        round: int | None = ...,
        stage: str | None = ...,
        deadline_ms: int | None = ...,
        payload: bytes | None = ...,
        payload_size: int | None = ...,
        payload_digest: str | None = ...,
        stage_seed: bytes | None = ...,
    ) -> None: ...

class PullTaskReply(_message.Message):
    __slots__ = ("finished", "run_id", "task", "wait")
    TASK_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    task: Task
    wait: bool
    finished: bool
    run_id: str
    def __init__(
        self,
        task: Task | _Mapping | None = ...,
        wait: bool | None = ...,
        finished: bool | None = ...,
        run_id: str | None = ...,
    ) -> None: ...

class FetchBlobRequest(_message.Message):
    __slots__ = ("digest", "envelope", "offset")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    digest: str
    offset: int
    def __init__(
        self,
        envelope: Envelope | _Mapping | None = ...,
        digest: str | None = ...,
        offset: int | None = ...,
    ) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: bytes | None = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("digest", "envelope", "offset", "size", "task_id")
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
    def __init__(
        self,
        envelope: Envelope | _Mapping | None = ...,
        task_id: str | None = ...,
        digest: str | None = ...,
        size: int | None = ...,
        offset: int | None = ...,
    ) -> None: ...

class ResultPart(_message.Message):
    __slots__ = ("chunk", "header")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: Chunk
    def __init__(
        self,
        header: ResultHeader | _Mapping | None = ...,
        chunk: Chunk | _Mapping | None = ...,
    ) -> None: ...

class PushResultReply(_message.Message):
    __slots__ = ("received", "status")
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
    def __init__(
        self,
        status: PushResultReply.Status | str | None = ...,
        received: int | None = ...,
    ) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("digest", "envelope", "task_id")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    task_id: str
    digest: str
    def __init__(
        self,
        envelope: Envelope | _Mapping | None = ...,
        task_id: str | None = ...,
        digest: str | None = ...,
    ) -> None: ...

class UploadStatusReply(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: int | None = ...) -> None: ...
