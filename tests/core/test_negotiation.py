"""Job negotiation: frame codec, both state machines over the whole table, chain and terms checks, admission."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.core import codec
from p2pcompute.core.envelope import Opened, seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import (
    DeclineReason,
    DeviceKind,
    JobAccept,
    JobDecline,
    JobFailed,
    JobOffer,
    JobReceipt,
    JobRejection,
    JobRequest,
    JobResult,
    Message,
    PeerRecord,
    Requirements,
    Timings,
)
from p2pcompute.core.negotiation import (
    ANY_STATE_TRANSITIONS,
    MAX_BLOB_CHUNK_SIZE,
    NON_TERMINAL,
    TERMINAL,
    TRANSITIONS,
    Abort,
    AbortFrame,
    Accept,
    Admit,
    BlobAssembler,
    BlobChunk,
    Blobs,
    BlobsFrame,
    Capacity,
    ClientNegotiation,
    Decline,
    Event,
    EventKind,
    Failed,
    Frame,
    NegotiationPolicy,
    Offer,
    Progress,
    ProgressFrame,
    Receipt,
    Refuse,
    Rejection,
    Request,
    RequestFrame,
    Result,
    Role,
    SignedFrame,
    State,
    Ticket,
    TicketBlob,
    TicketDirection,
    TicketFrame,
    Trace,
    TraceFrame,
    TraceRequest,
    TraceRequestFrame,
    WorkerNegotiation,
    abort_frame,
    admission,
    blob_frames,
    decode_frame_payload,
    encode_frame_payload,
    event_from_frame,
    frame_of,
    seal_opened,
    state_diagram,
)
from p2pcompute.core.schema import to_wire
from p2pcompute.core.tensors import TensorMeta, outputs_digest, tensor_digest
from p2pcompute.core.trace import TraceLeaf, trace_root
from p2pcompute.errors import (
    JobFormatError,
    LocalProtocolError,
    P2PComputeError,
    Reason,
    RemoteProtocolError,
    ReplayError,
    SchemaError,
    SignatureError,
    TransferError,
)
from tests.core.strategies import sign_raw

NOW = 1_800_000_000_000
DEADLINE = NOW + 120_000
EXPIRES = NOW + 300_000
CLIENT_KEY = KeyPair.from_seed(b"\x21" * 32)
WORKER_KEY = KeyPair.from_seed(b"\x22" * 32)
OTHER_KEY = KeyPair.from_seed(b"\x23" * 32)
C, W = Role.CLIENT, Role.WORKER
K = EventKind

SPEC = b"job spec bytes: an op graph in canonical msgpack" * 10
INPUT = bytes(range(64))
OUTPUT = bytes(range(16))
OUTPUT_META = TensorMeta(digest=tensor_digest(OUTPUT), dtype="float32", shape=(2, 2))
REQUIREMENTS = Requirements(
    device_kind=DeviceKind.CUDA, memory_bytes=1 << 20, input_bytes=64, output_bytes=16, op_count=3, flops=10**9
)
TIMINGS = Timings(queue_ms=1, load_ms=2, exec_ms=3, total_ms=6)
LEAVES = (TraceLeaf(node=0, outputs=(OUTPUT_META,)),)  # a one-node job: its only node gives the output
TRACED: dict[str, Any] = {"trace_root": trace_root(LEAVES), "trace_length": 1}

REQUEST_MESSAGE = JobRequest(
    id=b"\x01" * 16,
    nonce=1,
    expires_at=EXPIRES,
    client=CLIENT_KEY.peer_id,
    worker=WORKER_KEY.peer_id,
    job_digest=hashlib.sha256(SPEC).digest(),
    spec_size=len(SPEC),
    requirements=REQUIREMENTS,
    max_price=50_000,
    deadline=DEADLINE,
)


def client() -> ClientNegotiation:
    return ClientNegotiation(local=CLIENT_KEY.peer_id, remote=WORKER_KEY.peer_id)


def worker() -> WorkerNegotiation:
    return WorkerNegotiation(local=WORKER_KEY.peer_id, remote=CLIENT_KEY.peer_id)


def machine(role: Role) -> ClientNegotiation | WorkerNegotiation:
    return client() if role is C else worker()


def _reference_events() -> dict[tuple[Role, EventKind], Event]:
    """One valid event of every (sender, kind), all from one conversation (messages are deterministic)."""
    c, w = client(), worker()
    events: dict[tuple[Role, EventKind], Event] = {}

    def step(sender: Role, event: Event) -> None:
        events[(sender, event.kind)] = event
        (c if sender is C else w).send(event, NOW)
        (w if sender is C else c).receive(event, NOW)

    step(C, Request(opened=seal_opened(CLIENT_KEY, REQUEST_MESSAGE), spec=SPEC))
    decline = w.make_decline(DeclineReason.BUSY, detail="full", nonce=2, expires_at=EXPIRES)
    events[(W, K.DECLINE)] = Decline(opened=seal_opened(WORKER_KEY, decline))
    offer = w.make_offer(
        Admit(price=20_000, expected_ms=5_000), hardware_class="cuda/h100", nonce=3, expires_at=EXPIRES
    )
    step(W, Offer(opened=seal_opened(WORKER_KEY, offer)))
    step(C, Accept(opened=seal_opened(CLIENT_KEY, c.make_accept(nonce=4, expires_at=EXPIRES))))
    ticket = TicketFrame(
        direction=TicketDirection.UPLOAD,
        port=4100,
        token=b"\x05" * 32,
        key=b"\x06" * 32,
        expires_at=EXPIRES,
        blobs=(TicketBlob(digest=tensor_digest(INPUT), nbytes=len(INPUT)),),
    )
    step(W, Ticket(frame=ticket))
    step(C, Blobs(frame=BlobsFrame(chunks=(BlobChunk(digest=tensor_digest(INPUT), offset=0, total=64, data=INPUT),))))
    failed = w.make_failed("wall_time", detail="ran 60 s", nonce=5, expires_at=EXPIRES)
    events[(W, K.FAILED)] = Failed(opened=seal_opened(WORKER_KEY, failed))
    step(W, Progress(frame=ProgressFrame(phase="exec", done=1, total=3)))
    result = w.make_result(
        (OUTPUT_META,), hardware_class="cuda/h100", timings=TIMINGS, nonce=6, expires_at=EXPIRES, **TRACED
    )
    step(W, Result(opened=seal_opened(WORKER_KEY, result)))
    download = replace(
        ticket, direction=TicketDirection.DOWNLOAD, key=None, blobs=(TicketBlob(digest=OUTPUT_META.digest, nbytes=16),)
    )
    step(W, Ticket(frame=download))
    step(W, Blobs(frame=BlobsFrame(chunks=(BlobChunk(digest=OUTPUT_META.digest, offset=0, total=16, data=OUTPUT),))))
    # the client checks the committed trace: leaves and node 0's output (= the job's output) again
    step(C, TraceRequest(frame=TraceRequestFrame(leaves=True, nodes=(0,))))
    events[(W, K.TRACE_PART)] = Trace(frame=TraceFrame(first=0, leaves=(), last=False, unavailable=()))
    step(W, Trace(frame=TraceFrame(first=0, leaves=LEAVES, last=True, unavailable=())))
    step(W, Ticket(frame=download))
    step(W, Blobs(frame=BlobsFrame(chunks=(BlobChunk(digest=OUTPUT_META.digest, offset=0, total=16, data=OUTPUT),))))
    rejection = c.make_rejection(nonce=7, expires_at=EXPIRES, reason="hash_mismatch", detail="")
    events[(C, K.REJECTION)] = Rejection(opened=seal_opened(CLIENT_KEY, rejection))
    step(C, Receipt(opened=seal_opened(CLIENT_KEY, c.make_receipt(nonce=8, expires_at=EXPIRES, issued_at=NOW))))
    abort = Abort(frame=AbortFrame(reason="cancelled", detail="user gave up"))
    events[(C, K.ABORT)] = events[(W, K.ABORT)] = abort
    assert c.state is State.DONE and w.state is State.DONE
    return events


EVENTS = _reference_events()
ALL_KEYS = [(sender, kind) for sender in Role for kind in EventKind]
BY_KIND: dict[EventKind, Event] = {kind: event for (_, kind), event in EVENTS.items()}

_TO_INPUTS = [(C, K.REQUEST), (W, K.OFFER), (C, K.ACCEPT)]
_TO_OUTPUTS = [*_TO_INPUTS, (W, K.RESULT)]
PATHS: dict[State, list[Any]] = {
    State.IDLE: [],
    State.REQUESTED: [(C, K.REQUEST)],
    State.OFFERED: [(C, K.REQUEST), (W, K.OFFER)],
    State.INPUTS: _TO_INPUTS,
    State.RUNNING: [*_TO_INPUTS, (W, K.PROGRESS)],
    State.OUTPUTS: _TO_OUTPUTS,
    State.TRACE_ASKED: [*_TO_OUTPUTS, (C, K.TRACE_REQUEST)],
    State.TRACED: [*_TO_OUTPUTS, (C, K.TRACE_REQUEST), (W, K.TRACE_END)],
    State.DONE: [*_TO_OUTPUTS, (C, K.RECEIPT)],
    State.DECLINED: [(C, K.REQUEST), (W, K.DECLINE)],
    State.FAILED: [*_TO_INPUTS, (W, K.FAILED)],
    State.REJECTED: [*_TO_OUTPUTS, (C, K.REJECTION)],
    State.ABORTED: [(C, K.REQUEST), "peer abort"],
    State.TIMED_OUT: [(C, K.REQUEST), "timeout"],
    State.CANCELLED: [(C, K.REQUEST), "cancel"],
    State.ERROR: ["illegal"],
}


def apply(m: ClientNegotiation | WorkerNegotiation, sender: Role, event: Event, now: int = NOW) -> State:
    return m.send(event, now) if sender is m.ROLE else m.receive(event, now)


def reach(role: Role, state: State) -> ClientNegotiation | WorkerNegotiation:
    m = machine(role)
    other = W if role is C else C
    for step in PATHS[state]:
        if step == "peer abort":
            m.receive(EVENTS[(other, K.ABORT)], NOW)
        elif step == "timeout":
            m.on_timeout(NOW)
        elif step == "cancel":
            m.cancel(NOW)
        elif step == "illegal":
            with pytest.raises(P2PComputeError):
                apply(m, W, EVENTS[(W, K.RESULT)])
        else:
            apply(m, step[0], EVENTS[step])
    assert m.state is state
    return m


def test_paths_cover_every_state() -> None:
    assert set(PATHS) == set(State)
    assert set(State) == TERMINAL | NON_TERMINAL
    assert set(TRANSITIONS) == NON_TERMINAL


# --- the table, exhaustively --------------------------------------------------------------------------------------

TABLE_EDGES = [(state, key, target) for state, moves in TRANSITIONS.items() for key, target in moves.items()]


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(("state", "key", "target"), TABLE_EDGES, ids=lambda v: getattr(v, "value", str(v)))
def test_every_transition(role: Role, state: State, key: tuple[Role, EventKind], target: State) -> None:
    m = reach(role, state)
    assert apply(m, key[0], EVENTS[key]) is target
    assert m.state is target
    assert m.error is None


def _illegal_cases() -> list[tuple[Role, State, Role, EventKind]]:
    cases = []
    for role, state, (sender, kind) in itertools.product(Role, State, ALL_KEYS):
        legal = state in NON_TERMINAL and (
            (sender, kind) in TRANSITIONS[state] or (kind is K.ABORT and sender is not role)
        )
        if not legal:
            cases.append((role, state, sender, kind))
    return cases


@pytest.mark.parametrize(("role", "state", "sender", "kind"), _illegal_cases(), ids=str)
def test_every_illegal_event(role: Role, state: State, sender: Role, kind: EventKind) -> None:
    m = reach(role, state)
    if sender is role:
        with pytest.raises(LocalProtocolError) as info:
            m.send(BY_KIND[kind], NOW)
        assert info.value.reason is Reason.BAD_TRANSITION
    else:
        with pytest.raises(RemoteProtocolError) as remote:
            m.receive(BY_KIND[kind], NOW)
        assert remote.value.reason is Reason.UNEXPECTED_MESSAGE
    assert m.state is State.ERROR
    assert m.error is not None


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", sorted(NON_TERMINAL, key=str), ids=str)
@pytest.mark.parametrize(
    ("interrupt", "target"),
    [("timeout", State.TIMED_OUT), ("cancel", State.CANCELLED), ("peer abort", State.ABORTED)],
)
def test_interruptions_from_every_non_terminal_state(role: Role, state: State, interrupt: str, target: State) -> None:
    m = reach(role, state)
    if interrupt == "timeout":
        assert m.on_timeout(NOW + 1) is target
    elif interrupt == "cancel":
        assert m.cancel(NOW + 1) is target
    else:
        assert m.receive(EVENTS[(W if role is C else C, K.ABORT)], NOW + 1) is target
        assert m.peer_abort == EVENTS[(C, K.ABORT)].frame  # type: ignore[union-attr]
    assert m.timeout_at() is None


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", sorted(TERMINAL, key=str), ids=str)
def test_timeout_and_cancel_do_not_change_a_terminal_state(role: Role, state: State) -> None:
    m = reach(role, state)
    assert m.on_timeout(NOW) is state
    assert m.cancel(NOW) is state


def test_any_state_table_names_the_interruptions() -> None:
    assert set(ANY_STATE_TRANSITIONS.values()) == {State.ABORTED, State.TIMED_OUT, State.CANCELLED}


# --- chain and terms checks ---------------------------------------------------------------------------------------

MessageT = TypeVar("MessageT", bound=Message)


def _message(key: tuple[Role, EventKind], cls: type[MessageT]) -> MessageT:
    event = EVENTS[key]
    assert not isinstance(event, (Blobs, Ticket, Progress, Abort, TraceRequest, Trace))
    message = event.opened.message
    assert isinstance(message, cls)
    return message


OFFER = _message((W, K.OFFER), JobOffer)
DECLINE = _message((W, K.DECLINE), JobDecline)
ACCEPT = _message((C, K.ACCEPT), JobAccept)
RESULT = _message((W, K.RESULT), JobResult)
FAILED = _message((W, K.FAILED), JobFailed)
RECEIPT = _message((C, K.RECEIPT), JobReceipt)
REJECTION = _message((C, K.REJECTION), JobRejection)
ZERO = b"\x00" * 32
BIG_META = TensorMeta(digest=OUTPUT_META.digest, dtype="float32", shape=(1000,))

EVENT_OF: dict[type[Message], Any] = {
    JobOffer: Offer,
    JobDecline: Decline,
    JobAccept: Accept,
    JobResult: Result,
    JobFailed: Failed,
    JobReceipt: Receipt,
    JobRejection: Rejection,
}

BAD_MESSAGES: list[tuple[str, State, Message, Reason, type[RemoteProtocolError]]] = [
    (
        "offer request_hash",
        State.REQUESTED,
        replace(OFFER, request_hash=ZERO),
        Reason.CHAIN_MISMATCH,
        RemoteProtocolError,
    ),
    ("offer id", State.REQUESTED, replace(OFFER, id=b"\x09" * 16), Reason.CHAIN_MISMATCH, RemoteProtocolError),
    ("offer job", State.REQUESTED, replace(OFFER, job_digest=ZERO), Reason.TERMS_MISMATCH, RemoteProtocolError),
    ("offer price", State.REQUESTED, replace(OFFER, price=50_001), Reason.TERMS_MISMATCH, RemoteProtocolError),
    (
        "offer client",
        State.REQUESTED,
        replace(OFFER, client=OTHER_KEY.peer_id),
        Reason.TERMS_MISMATCH,
        RemoteProtocolError,
    ),
    ("offer expired", State.REQUESTED, replace(OFFER, expires_at=NOW), Reason.EXPIRED, ReplayError),
    ("decline chain", State.REQUESTED, replace(DECLINE, request_hash=ZERO), Reason.CHAIN_MISMATCH, RemoteProtocolError),
    ("decline expired", State.REQUESTED, replace(DECLINE, expires_at=NOW - 1), Reason.EXPIRED, ReplayError),
    ("accept offer_hash", State.OFFERED, replace(ACCEPT, offer_hash=ZERO), Reason.CHAIN_MISMATCH, RemoteProtocolError),
    (
        "accept request_hash",
        State.OFFERED,
        replace(ACCEPT, request_hash=ZERO),
        Reason.CHAIN_MISMATCH,
        RemoteProtocolError,
    ),
    ("accept price", State.OFFERED, replace(ACCEPT, price=19_999), Reason.TERMS_MISMATCH, RemoteProtocolError),
    ("accept job", State.OFFERED, replace(ACCEPT, job_digest=ZERO), Reason.TERMS_MISMATCH, RemoteProtocolError),
    ("result chain", State.RUNNING, replace(RESULT, accept_hash=ZERO), Reason.CHAIN_MISMATCH, RemoteProtocolError),
    ("result digest", State.RUNNING, replace(RESULT, output_digest=ZERO), Reason.TERMS_MISMATCH, RemoteProtocolError),
    (
        "result too large",
        State.INPUTS,
        replace(RESULT, outputs=(BIG_META,), output_digest=outputs_digest((BIG_META,))),
        Reason.OUTPUT_TOO_LARGE,
        JobFormatError,
    ),
    ("failed chain", State.RUNNING, replace(FAILED, accept_hash=ZERO), Reason.CHAIN_MISMATCH, RemoteProtocolError),
    ("failed job", State.INPUTS, replace(FAILED, job_digest=ZERO), Reason.TERMS_MISMATCH, RemoteProtocolError),
    ("receipt chain", State.OUTPUTS, replace(RECEIPT, result_hash=ZERO), Reason.CHAIN_MISMATCH, RemoteProtocolError),
    (
        "receipt outputs",
        State.OUTPUTS,
        replace(RECEIPT, output_digest=ZERO),
        Reason.TERMS_MISMATCH,
        RemoteProtocolError,
    ),
    ("receipt price", State.OUTPUTS, replace(RECEIPT, price=1), Reason.TERMS_MISMATCH, RemoteProtocolError),
    ("receipt expired", State.OUTPUTS, replace(RECEIPT, expires_at=NOW), Reason.EXPIRED, ReplayError),
    (
        "rejection chain",
        State.OUTPUTS,
        replace(REJECTION, result_hash=ZERO),
        Reason.CHAIN_MISMATCH,
        RemoteProtocolError,
    ),
    (
        "rejection worker",
        State.OUTPUTS,
        replace(REJECTION, worker=OTHER_KEY.peer_id),
        Reason.TERMS_MISMATCH,
        RemoteProtocolError,
    ),
]


@pytest.mark.parametrize(("name", "state", "message", "reason", "remote_cls"), BAD_MESSAGES, ids=lambda v: str(v)[:24])
def test_bad_message_is_refused_by_both_sides(
    name: str, state: State, message: Message, reason: Reason, remote_cls: type[RemoteProtocolError]
) -> None:
    sender = C if message.claimed_signer == CLIENT_KEY.peer_id else W
    key = CLIENT_KEY if sender is C else WORKER_KEY
    event = EVENT_OF[type(message)](opened=seal_opened(key, message))
    receiver = reach(W if sender is C else C, state)
    with pytest.raises(remote_cls) as remote:
        receiver.receive(event, NOW)
    assert remote.value.reason is reason
    assert receiver.state is State.ERROR and receiver.error is remote.value
    own = reach(sender, state)
    with pytest.raises(LocalProtocolError) as local:
        own.send(event, NOW)
    assert local.value.reason is reason
    assert own.state is State.ERROR


@pytest.mark.parametrize(
    ("state", "key"), [(State.REQUESTED, (W, K.OFFER)), (State.OFFERED, (C, K.ACCEPT)), (State.RUNNING, (W, K.RESULT))]
)
def test_offer_accept_and_result_after_the_deadline_are_refused(state: State, key: tuple[Role, EventKind]) -> None:
    receiver = reach(W if key[0] is C else C, state)
    with pytest.raises(ReplayError) as info:
        receiver.receive(EVENTS[key], DEADLINE + 1)
    assert info.value.reason is Reason.EXPIRED
    assert reach(W if key[0] is C else C, state).receive(EVENTS[key], DEADLINE) is not State.ERROR


@pytest.mark.parametrize("dtype", ["float8", "complex64", "Float32"])
def test_a_result_naming_a_dtype_outside_the_table_is_refused_at_decoding(dtype: str) -> None:
    # The dtype bound is part of TensorMeta's schema (specs/negotiation.md §4): such a result is refused when its
    # envelope opens, before any machine sees it, and cannot be sealed.
    meta = replace(OUTPUT_META, dtype=dtype)
    wire = to_wire(RESULT)
    wire["outputs"] = [{"digest": meta.digest, "dtype": dtype, "shape": list(meta.shape)}]
    envelope = sign_raw(WORKER_KEY, JobResult, codec.pack(wire))
    with pytest.raises(SchemaError) as remote:
        event_from_frame(SignedFrame(envelope=envelope), signer=WORKER_KEY.peer_id)
    assert remote.value.reason is Reason.BAD_DTYPE
    with pytest.raises(LocalProtocolError) as local:
        seal(WORKER_KEY, replace(RESULT, outputs=(meta,)))
    assert local.value.reason is Reason.BAD_DTYPE


def test_message_signed_by_a_third_peer_is_refused() -> None:
    forged = replace(OFFER, worker=OTHER_KEY.peer_id)
    m = reach(C, State.REQUESTED)
    with pytest.raises(SignatureError) as info:
        m.receive(Offer(opened=seal_opened(OTHER_KEY, forged)), NOW)
    assert info.value.reason is Reason.SIGNER_MISMATCH
    # the adapter pins the signer when it opens the frame, so such bytes never become an event
    frame = SignedFrame(envelope=seal(OTHER_KEY, forged))
    with pytest.raises(SignatureError):
        event_from_frame(frame, signer=WORKER_KEY.peer_id)


def _request(message: JobRequest = REQUEST_MESSAGE, spec: bytes = SPEC) -> Request:
    return Request(opened=seal_opened(CLIENT_KEY, message), spec=spec)


@pytest.mark.parametrize(
    ("event", "reason", "remote_cls"),
    [
        (_request(spec=SPEC[:-1]), Reason.HASH_MISMATCH, JobFormatError),
        (_request(spec=SPEC[:-1] + b"?"), Reason.HASH_MISMATCH, JobFormatError),
        (_request(replace(REQUEST_MESSAGE, worker=OTHER_KEY.peer_id)), Reason.TERMS_MISMATCH, RemoteProtocolError),
        (_request(replace(REQUEST_MESSAGE, expires_at=NOW)), Reason.EXPIRED, ReplayError),
        (_request(replace(REQUEST_MESSAGE, deadline=NOW)), Reason.EXPIRED, ReplayError),
    ],
    ids=["spec size", "spec hash", "worker", "expired", "deadline"],
)
def test_bad_request(event: Request, reason: Reason, remote_cls: type[RemoteProtocolError]) -> None:
    w = worker()
    with pytest.raises(remote_cls) as info:
        w.receive(event, NOW)
    assert info.value.reason is reason
    assert w.state is State.ERROR
    c = client()
    with pytest.raises(LocalProtocolError) as local:
        c.send(event, NOW)
    assert local.value.reason is reason


def _download(*blobs: TicketBlob, expires_at: int = EXPIRES) -> Ticket:
    frame = TicketFrame(
        direction=TicketDirection.DOWNLOAD, port=1, token=b"\x00" * 32, key=None, expires_at=expires_at, blobs=blobs
    )
    return Ticket(frame=frame)


@pytest.mark.parametrize(
    ("event", "reason", "remote_cls"),
    [
        (
            Blobs(frame=BlobsFrame(chunks=(BlobChunk(digest=ZERO, offset=0, total=1, data=b"x"),))),
            Reason.UNEXPECTED_BLOB,
            TransferError,
        ),
        (
            Blobs(frame=BlobsFrame(chunks=(BlobChunk(digest=OUTPUT_META.digest, offset=0, total=8, data=b"x"),))),
            Reason.SHAPE_MISMATCH,
            JobFormatError,
        ),
        (_download(TicketBlob(digest=ZERO, nbytes=16)), Reason.UNEXPECTED_BLOB, TransferError),
        (_download(TicketBlob(digest=OUTPUT_META.digest, nbytes=17)), Reason.SHAPE_MISMATCH, JobFormatError),
        (_download(TicketBlob(digest=OUTPUT_META.digest, nbytes=16), expires_at=NOW), Reason.EXPIRED, ReplayError),
    ],
    ids=["blob stranger", "blob size", "ticket stranger", "ticket size", "ticket expired"],
)
def test_outputs_and_tickets_must_match_the_results_outputs(
    event: Event, reason: Reason, remote_cls: type[RemoteProtocolError]
) -> None:
    m = reach(C, State.OUTPUTS)
    with pytest.raises(remote_cls) as info:
        m.receive(event, NOW)
    assert info.value.reason is reason
    assert m.state is State.ERROR
    w = reach(W, State.OUTPUTS)
    with pytest.raises(LocalProtocolError) as local:
        w.send(event, NOW)
    assert local.value.reason is reason


def test_upload_ticket_expiry_is_checked() -> None:
    upload = EVENTS[(W, K.UPLOAD_TICKET)]
    assert isinstance(upload, Ticket)
    frame = replace(upload.frame, expires_at=NOW)
    with pytest.raises(ReplayError):
        reach(C, State.INPUTS).receive(Ticket(frame=frame), NOW)


@pytest.mark.parametrize(
    ("state", "key"), [(State.INPUTS, (W, K.UPLOAD_TICKET)), (State.OUTPUTS, (W, K.DOWNLOAD_TICKET))]
)
def test_a_second_ticket_of_one_direction_is_refused(state: State, key: tuple[Role, EventKind]) -> None:
    m = reach(C, state)
    m.receive(EVENTS[key], NOW)
    with pytest.raises(RemoteProtocolError) as info:
        m.receive(EVENTS[key], NOW)
    assert info.value.reason is Reason.UNEXPECTED_MESSAGE


def test_local_abort_goes_through_cancel_not_send() -> None:
    m = reach(C, State.REQUESTED)
    with pytest.raises(LocalProtocolError):
        m.send(EVENTS[(C, K.ABORT)], NOW)
    assert m.state is State.ERROR


# --- the whole exchange, over encoded frames ------------------------------------------------------------------------


def _wire(
    sender: ClientNegotiation | WorkerNegotiation, receiver: ClientNegotiation | WorkerNegotiation, e: Event
) -> None:
    sender.send(e, NOW)
    data = codec.encode_frame(encode_frame_payload(frame_of(e)))
    (payload,) = codec.FrameDecoder().feed(data)
    received = event_from_frame(decode_frame_payload(payload), signer=sender.local)
    assert received == e
    receiver.receive(received, NOW)


def test_happy_path_over_frames_and_offline_chain() -> None:
    c, w = client(), worker()
    _wire(c, w, _request())
    assert w.request is not None and w.spec == SPEC
    decision = admission(
        w.request.message,
        REQUIREMENTS,
        Capacity(
            free_slots=1,
            memory_bytes=1 << 34,
            free_memory_bytes=1 << 33,
            device_kinds=frozenset({DeviceKind.CUDA}),
            tflops=50.0,
            price_per_second=2_000,
        ),
        now=NOW,
    )
    assert isinstance(decision, Admit)
    offer = w.make_offer(decision, hardware_class="cuda/h100", nonce=11, expires_at=EXPIRES)
    _wire(w, c, Offer(opened=seal_opened(WORKER_KEY, offer)))
    _wire(c, w, Accept(opened=seal_opened(CLIENT_KEY, c.make_accept(nonce=12, expires_at=EXPIRES))))
    for frame in blob_frames([(tensor_digest(INPUT), INPUT)]):
        _wire(c, w, Blobs(frame=frame))
    _wire(w, c, Progress(frame=ProgressFrame(phase="exec", done=0, total=1)))
    result = w.make_result(
        (OUTPUT_META,), hardware_class="cuda/h100", timings=TIMINGS, nonce=13, expires_at=EXPIRES, **TRACED
    )
    _wire(w, c, Result(opened=seal_opened(WORKER_KEY, result)))
    outputs = BlobAssembler(result.outputs)
    for frame in blob_frames([(OUTPUT_META.digest, OUTPUT)]):
        _wire(w, c, Blobs(frame=frame))
        outputs.feed(frame)
    assert outputs.complete and outputs.blobs() == {OUTPUT_META.digest: OUTPUT}
    receipt = c.make_receipt(nonce=14, expires_at=EXPIRES, issued_at=NOW)
    _wire(c, w, Receipt(opened=seal_opened(CLIENT_KEY, receipt)))
    assert c.state is State.DONE and w.state is State.DONE
    assert c.transcript == w.transcript
    request, offer_o, accept, result_o, receipt_o = c.transcript
    # the chain is checkable from the envelopes alone
    assert offer_o.message.request_hash == hashlib.sha256(request.envelope).digest()  # type: ignore[attr-defined]
    assert accept.message.offer_hash == hashlib.sha256(offer_o.envelope).digest()  # type: ignore[attr-defined]
    assert result_o.message.accept_hash == hashlib.sha256(accept.envelope).digest()  # type: ignore[attr-defined]
    assert receipt_o.message.result_hash == hashlib.sha256(result_o.envelope).digest()  # type: ignore[attr-defined]
    assert receipt_o.message.price == decision.price  # type: ignore[attr-defined]


def test_makers_refuse_in_the_wrong_state_without_changing_it() -> None:
    c = reach(C, State.REQUESTED)
    assert isinstance(c, ClientNegotiation)
    with pytest.raises(LocalProtocolError) as info:
        c.make_accept(nonce=1, expires_at=EXPIRES)
    assert info.value.reason is Reason.BAD_TRANSITION
    assert c.state is State.REQUESTED
    w = reach(W, State.OUTPUTS)
    assert isinstance(w, WorkerNegotiation)
    with pytest.raises(LocalProtocolError):
        w.make_failed("late", nonce=1, expires_at=EXPIRES)
    assert w.state is State.OUTPUTS


def test_timeout_at_follows_the_phase() -> None:
    p = NegotiationPolicy()
    m = machine(C)
    assert m.timeout_at() is None
    m.send(EVENTS[(C, K.REQUEST)], NOW)
    assert m.timeout_at() == NOW + p.offer_timeout_ms
    m.receive(EVENTS[(W, K.OFFER)], NOW + 5)
    assert m.timeout_at() == NOW + 5 + p.accept_timeout_ms
    m.send(EVENTS[(C, K.ACCEPT)], NOW + 10)
    assert m.timeout_at() == NOW + 10 + p.inputs_timeout_ms
    m.send(EVENTS[(C, K.BLOBS)], NOW + 15)  # frames within a phase do not restart its clock
    assert m.timeout_at() == NOW + 10 + p.inputs_timeout_ms
    m.receive(EVENTS[(W, K.PROGRESS)], NOW + 20)
    assert m.timeout_at() == DEADLINE
    m.receive(EVENTS[(W, K.RESULT)], NOW + 30)
    assert m.timeout_at() == NOW + 30 + p.receipt_timeout_ms
    m.receive(EVENTS[(W, K.BLOBS)], NOW + 35)
    assert m.timeout_at() == NOW + 30 + p.receipt_timeout_ms
    m.send(EVENTS[(C, K.RECEIPT)], NOW + 40)
    assert m.timeout_at() is None
    short = ClientNegotiation(
        local=CLIENT_KEY.peer_id, remote=WORKER_KEY.peer_id, policy=NegotiationPolicy(inputs_timeout_ms=10**9)
    )
    for key in _TO_INPUTS:
        apply(short, key[0], EVENTS[key])
    assert short.timeout_at() == DEADLINE


@pytest.mark.parametrize(
    "field", ["offer_timeout_ms", "accept_timeout_ms", "inputs_timeout_ms", "max_streams_per_peer"]
)
def test_policy_rejects_zero(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        NegotiationPolicy(**{field: 0})


def test_a_machine_needs_two_peers() -> None:
    with pytest.raises(ValueError):
        ClientNegotiation(local=CLIENT_KEY.peer_id, remote=CLIENT_KEY.peer_id)


# --- admission ----------------------------------------------------------------------------------------------------

CAPACITY = Capacity(
    free_slots=2,
    memory_bytes=1 << 34,
    free_memory_bytes=1 << 33,
    device_kinds=frozenset({DeviceKind.CUDA, DeviceKind.CPU}),
    tflops=10.0,
    price_per_second=3_000,
    min_price=1_000,
    overhead_ms=200,
)


def test_admission_prices_by_expected_time() -> None:
    big = replace(REQUIREMENTS, flops=25 * 10**12)  # 2.5 s at 10 TFLOPS
    assert admission(REQUEST_MESSAGE, big, CAPACITY, now=NOW) == Admit(price=8_100, expected_ms=2_700)
    # a tiny job still costs min_price; expected time rounds up
    tiny = replace(REQUIREMENTS, flops=1)
    assert admission(REQUEST_MESSAGE, tiny, CAPACITY, now=NOW) == Admit(price=1_000, expected_ms=201)
    odd = replace(CAPACITY, price_per_second=1_001, min_price=0)
    assert admission(REQUEST_MESSAGE, replace(REQUIREMENTS, flops=0), odd, now=NOW) == Admit(price=201, expected_ms=200)


@pytest.mark.parametrize(
    ("changes", "summary_changes", "request_changes", "owing", "reason"),
    [
        ({"shutting_down": True}, {}, {}, False, DeclineReason.SHUTTING_DOWN),
        ({}, {}, {}, True, DeclineReason.CLIENT_OWES),
        ({"device_kinds": frozenset({DeviceKind.CPU})}, {}, {}, False, DeclineReason.UNSUPPORTED),
        ({}, {"memory_bytes": 1 << 35}, {}, False, DeclineReason.TOO_LARGE),
        ({"max_input_bytes": 10}, {}, {}, False, DeclineReason.TOO_LARGE),
        ({"max_output_bytes": 10}, {}, {}, False, DeclineReason.TOO_LARGE),
        ({"max_ops": 2}, {}, {}, False, DeclineReason.TOO_LARGE),
        ({"free_slots": 0}, {}, {}, False, DeclineReason.BUSY),
        ({"free_memory_bytes": 10}, {}, {}, False, DeclineReason.BUSY),
        ({}, {"flops": 10**18}, {}, False, DeclineReason.DEADLINE),
        ({"queue_ms": 200_000}, {}, {}, False, DeclineReason.DEADLINE),
        ({"min_price": 10**9}, {}, {}, False, DeclineReason.PRICE_TOO_LOW),
        ({}, {}, {"max_price": 0}, False, DeclineReason.PRICE_TOO_LOW),
    ],
)
def test_admission_refusals(
    changes: dict[str, Any],
    summary_changes: dict[str, Any],
    request_changes: dict[str, Any],
    owing: bool,
    reason: DeclineReason,
) -> None:
    decision = admission(
        replace(REQUEST_MESSAGE, **request_changes),
        replace(REQUIREMENTS, **summary_changes),
        replace(CAPACITY, **changes),
        now=NOW,
        owing=frozenset({CLIENT_KEY.peer_id}) if owing else frozenset({OTHER_KEY.peer_id}),
    )
    assert isinstance(decision, Refuse)
    assert decision.reason is reason
    assert decision.detail


def test_admission_uses_the_workers_device_kind_when_the_client_names_none() -> None:
    request = replace(REQUEST_MESSAGE, requirements=replace(REQUIREMENTS, device_kind=None))
    cpu_only = replace(CAPACITY, device_kinds=frozenset({DeviceKind.CPU}))
    assert isinstance(admission(request, replace(REQUIREMENTS, device_kind=None), cpu_only, now=NOW), Admit)
    assert isinstance(admission(request, REQUIREMENTS, cpu_only, now=NOW), Refuse)
    assert isinstance(admission(request, REQUIREMENTS, replace(CAPACITY, tflops=0.0), now=NOW), Admit)


# --- frames -------------------------------------------------------------------------------------------------------

FRAMES: list[Frame] = [
    RequestFrame(envelope=b"e" * 100, spec=b"s" * 100),
    SignedFrame(envelope=b"e" * 10),
    BlobsFrame(chunks=(BlobChunk(digest=ZERO, offset=0, total=0, data=b""),)),
    BlobsFrame(chunks=(BlobChunk(digest=ZERO, offset=5, total=10, data=b"abcde"),) * 3),
    TicketFrame(
        direction=TicketDirection.UPLOAD,
        port=65535,
        token=b"t" * 32,
        key=b"k" * 32,
        expires_at=EXPIRES,
        blobs=(TicketBlob(digest=ZERO, nbytes=0), TicketBlob(digest=b"\x01" * 32, nbytes=1 << 40)),
    ),
    TicketFrame(direction=TicketDirection.DOWNLOAD, port=1, token=b"t" * 32, key=None, expires_at=0, blobs=()),
    ProgressFrame(phase="exec", done=3, total=3),
    AbortFrame(reason="timeout", detail="no offer in 10 s"),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_frame_round_trip(frame: Frame) -> None:
    data = encode_frame_payload(frame)
    assert codec.unpack(data)["kind"] == frame.KIND.value
    assert decode_frame_payload(data) == frame


_TB = {"digest": ZERO, "nbytes": 3}


def _raw(value: Any) -> bytes:
    return codec.pack(value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_raw([1, 2]), Reason.NOT_A_MAP),
        (_raw({"envelope": b"x"}), Reason.MISSING_FIELD),
        (_raw({"kind": 1, "envelope": b"x"}), Reason.WRONG_TYPE),
        (_raw({"kind": "telepathy"}), Reason.OUT_OF_RANGE),
        (_raw({"kind": "signed"}), Reason.MISSING_FIELD),
        (_raw({"kind": "signed", "envelope": b"x", "extra": 1}), Reason.UNKNOWN_FIELD),
        (_raw({"kind": "signed", "envelope": b""}), Reason.OUT_OF_RANGE),
        (_raw({"kind": "progress", "phase": "x", "done": 4, "total": 3}), Reason.INCONSISTENT),
        (
            _raw({"kind": "blobs", "chunks": [{"digest": ZERO, "offset": 8, "total": 10, "data": b"abc"}]}),
            Reason.INCONSISTENT,
        ),
        (
            _raw({"kind": "blobs", "chunks": [{"digest": ZERO, "offset": 0, "total": 10, "data": b""}]}),
            Reason.INCONSISTENT,
        ),
        (_raw({"kind": "blobs", "chunks": []}), Reason.OUT_OF_RANGE),
        (
            _raw(
                {
                    "kind": "ticket",
                    "direction": "upload",
                    "port": 1,
                    "token": b"t" * 32,
                    "key": None,
                    "expires_at": 1,
                    "blobs": [_TB, _TB],
                }
            ),
            Reason.INCONSISTENT,
        ),
        (
            _raw(
                {
                    "kind": "ticket",
                    "direction": "sideways",
                    "port": 1,
                    "token": b"t" * 32,
                    "key": None,
                    "expires_at": 1,
                    "blobs": [],
                }
            ),
            Reason.OUT_OF_RANGE,
        ),
        (
            _raw(
                {
                    "kind": "ticket",
                    "direction": "upload",
                    "port": 0,
                    "token": b"t" * 32,
                    "key": None,
                    "expires_at": 1,
                    "blobs": [],
                }
            ),
            Reason.OUT_OF_RANGE,
        ),
        (_raw({"kind": "abort", "reason": "", "detail": ""}), Reason.OUT_OF_RANGE),
        (b"\xc1", Reason.MALFORMED),
    ],
)
def test_frame_decode_errors(data: bytes, reason: Reason) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_frame_payload(data)
    assert info.value.reason is reason


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (ProgressFrame(phase="x", done=2, total=1), Reason.INCONSISTENT),
        (BlobsFrame(chunks=(BlobChunk(digest=ZERO, offset=0, total=1, data=b"ab"),)), Reason.INCONSISTENT),
        (
            BlobsFrame(chunks=(BlobChunk(digest=ZERO, offset=0, total=MAX_BLOB_CHUNK_SIZE, data=b"a" * 1000),) * 2000),
            Reason.TOO_LONG,
        ),
        (
            BlobsFrame(chunks=(BlobChunk(digest=ZERO, offset=0, total=1 << 30, data=b"a" * 600_000),) * 2),
            Reason.FRAME_TOO_LARGE,
        ),
    ],
)
def test_frame_encode_errors(frame: Frame, reason: Reason) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_frame_payload(frame)
    assert info.value.reason is reason


def test_encode_refuses_a_non_frame() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame_payload(Requirements(**vars(REQUIREMENTS)))  # type: ignore[arg-type]


@given(st.binary(max_size=512))
def test_decode_random_bytes_raises_only_remote_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_frame_payload(data)


_LEAF = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=10)
_NAMES = ("kind", "envelope", "spec", "chunks", "digest", "offset", "total", "data", "direction", "port", "token")
_FIELD_NAMES = st.sampled_from([*_NAMES, "key", "expires_at", "blobs", "nbytes", "phase", "done", "reason", "detail"])
_KIND = st.sampled_from(["request", "signed", "blobs", "ticket", "progress", "abort", "other"])


@given(
    st.recursive(
        _LEAF | _KIND,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(_FIELD_NAMES, children, max_size=6),
        max_leaves=20,
    ),
    _KIND,
)
def test_decode_structured_junk_raises_only_remote_errors(value: Any, kind: str) -> None:
    if isinstance(value, dict):
        value = {**value, "kind": kind}
    try:
        frame = decode_frame_payload(codec.pack(value))
    except RemoteProtocolError:
        return
    assert encode_frame_payload(frame) == codec.pack(value)


@given(st.sampled_from(FRAMES), st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_decode_mutated_frames_raises_only_remote_errors(frame: Frame, where: int, byte: int) -> None:
    data = bytearray(encode_frame_payload(frame))
    data[where % len(data)] = byte
    with contextlib.suppress(RemoteProtocolError):
        decode_frame_payload(bytes(data))


def test_event_from_frame_refuses_misplaced_and_foreign_envelopes() -> None:
    request_envelope = EVENTS[(C, K.REQUEST)].opened.envelope  # type: ignore[union-attr]
    with pytest.raises(RemoteProtocolError) as info:
        event_from_frame(SignedFrame(envelope=request_envelope), signer=CLIENT_KEY.peer_id)
    assert info.value.reason is Reason.UNEXPECTED_MESSAGE
    record = PeerRecord(
        id=b"\x00" * 16, nonce=1, expires_at=EXPIRES, peer_id=CLIENT_KEY.peer_id, seq=1, addrs=("/ip4/1.2.3.4/tcp/1",)
    )
    with pytest.raises(SignatureError) as sig:
        event_from_frame(SignedFrame(envelope=seal(CLIENT_KEY, record)), signer=CLIENT_KEY.peer_id)
    assert sig.value.reason is Reason.UNKNOWN_PAYLOAD_TYPE
    offer_envelope = EVENTS[(W, K.OFFER)].opened.envelope  # type: ignore[union-attr]
    with pytest.raises(SignatureError):
        event_from_frame(RequestFrame(envelope=offer_envelope, spec=SPEC), signer=WORKER_KEY.peer_id)


@pytest.mark.parametrize("key", [*ALL_KEYS[:12], (C, K.ABORT)], ids=str)
def test_frame_of_and_event_from_frame_are_inverse(key: tuple[Role, EventKind]) -> None:
    if key not in EVENTS:
        key = (W, key[1])
    event = EVENTS[key]
    signer = CLIENT_KEY.peer_id if key[0] is C else WORKER_KEY.peer_id
    assert event_from_frame(decode_frame_payload(encode_frame_payload(frame_of(event))), signer=signer) == event


def test_abort_frame_reports_an_error_within_bounds() -> None:
    frame = abort_frame(RemoteProtocolError(Reason.CHAIN_MISMATCH, "é" * 600))
    assert frame.reason == "chain_mismatch"
    assert len(frame.detail.encode()) <= 512
    assert decode_frame_payload(encode_frame_payload(frame)) == frame


# --- blobs: chunking and reassembly -------------------------------------------------------------------------------


def _blob(n: int, seed: int) -> tuple[bytes, bytes]:
    data = (hashlib.sha256(bytes([seed])).digest() * (n // 32 + 1))[:n]
    return tensor_digest(data), data


def _meta(digest: bytes, data: bytes) -> TensorMeta:
    return TensorMeta(digest=digest, dtype="uint8", shape=(len(data),))


def test_big_tensor_is_chunked_under_the_frame_limit_and_reassembled() -> None:
    blobs = [_blob(2_500_000, 1), _blob(0, 2), _blob(10, 3)]
    assembler = BlobAssembler(_meta(d, b) for d, b in blobs)
    frames = list(blob_frames(blobs))
    assert len(frames) == 3
    for frame in frames:
        data = encode_frame_payload(frame)
        assert len(data) <= codec.MAX_FRAME_SIZE
        assembler.feed(decode_frame_payload(data))  # type: ignore[arg-type]
    assert assembler.complete and not assembler.missing
    assert assembler.blobs() == dict(blobs)


@given(st.lists(st.integers(0, 3000), max_size=8), st.integers(300, 5000))
def test_blob_frames_respect_any_frame_limit(sizes: list[int], limit: int) -> None:
    blobs = [_blob(n, i) for i, n in enumerate(sizes)]
    unique = dict(blobs)
    assembler = BlobAssembler(_meta(d, b) for d, b in unique.items())
    seen: set[bytes] = set()
    for frame in blob_frames(unique.items(), max_frame_size=limit):
        assert len(encode_frame_payload(frame)) <= limit
        seen.update(assembler.feed(frame))
    assert seen == set(unique) and assembler.blobs() == unique


def test_blob_frames_needs_room() -> None:
    with pytest.raises(ValueError):
        list(blob_frames([_blob(1, 1)], max_frame_size=100))


def test_blob_assembler_errors() -> None:
    digest, data = _blob(100, 7)
    meta = _meta(digest, data)

    def feed(*chunks: BlobChunk) -> BlobAssembler:
        assembler = BlobAssembler([meta])
        for chunk in chunks:
            assembler.feed(BlobsFrame(chunks=(chunk,)))
        return assembler

    with pytest.raises(TransferError) as info:
        feed(BlobChunk(digest=ZERO, offset=0, total=100, data=data))
    assert info.value.reason is Reason.UNEXPECTED_BLOB
    with pytest.raises(JobFormatError) as fmt:
        feed(BlobChunk(digest=digest, offset=0, total=99, data=data[:99]))
    assert fmt.value.reason is Reason.SHAPE_MISMATCH
    with pytest.raises(TransferError) as transfer:
        feed(BlobChunk(digest=digest, offset=50, total=100, data=data[50:]))
    assert transfer.value.reason is Reason.TRANSFER_FAILED
    with pytest.raises(JobFormatError) as hashed:
        feed(BlobChunk(digest=digest, offset=0, total=100, data=bytes(100)))
    assert hashed.value.reason is Reason.HASH_MISMATCH
    whole = BlobChunk(digest=digest, offset=0, total=100, data=data)
    with pytest.raises(TransferError) as again:
        feed(whole, whole)
    assert again.value.reason is Reason.UNEXPECTED_BLOB
    partial = feed(BlobChunk(digest=digest, offset=0, total=100, data=data[:40]))
    assert not partial.complete and partial.missing == {digest}


# --- the spec -----------------------------------------------------------------------------------------------------

SPEC_FILE = Path(__file__).resolve().parents[2] / "specs" / "negotiation.md"


@pytest.mark.parametrize("role", list(Role))
def test_spec_contains_the_generated_diagram(role: Role) -> None:
    text = SPEC_FILE.read_text()
    match = re.search(
        rf"<!-- BEGIN GENERATED {role.value} -->\n```mermaid\n(.*?)```\n<!-- END GENERATED {role.value} -->",
        text,
        re.S,
    )
    assert match is not None, f"no generated {role.value} diagram in {SPEC_FILE}"
    assert match.group(1) == state_diagram(role)


@pytest.mark.parametrize("role", list(Role))
def test_diagram_has_every_edge(role: Role) -> None:
    diagram = state_diagram(role)
    for state, (sender, kind), target in TABLE_EDGES:
        verb = "send" if sender is role else "receive"
        assert f"{state.value} --> {target.value}: {verb} {kind.value}\n" in diagram


def test_spec_reason_codes_exist() -> None:
    text = SPEC_FILE.read_text().split("## 11. Reason codes")[1]
    found = re.findall(r"^\| `([a-z_]+)` \|", text, re.M)
    assert len(found) >= 10
    for reason in found:
        assert reason in {r.value for r in Reason} | {d.value for d in DeclineReason}, reason


def test_opened_events_compare_by_envelope() -> None:
    a = EVENTS[(W, K.OFFER)]
    assert isinstance(a, Offer)
    assert Offer(opened=Opened(message=a.opened.message, signer=a.opened.signer, envelope=a.opened.envelope)) == a
