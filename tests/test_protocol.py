"""The sans-I/O protocol, byte by byte: no sockets, no event loop (as websockets' own
tests/test_protocol.py does). Frames go in as bytes; what comes out is checked."""

from __future__ import annotations

import pytest
import torch

from aiokvpipe import _protocol, _wire
from aiokvpipe._errors import AuthenticationError, PeerFailure, PipeError, ProtocolError
from aiokvpipe._message import flatten
from aiokvpipe._protocol import (
    MAX_TOMBSTONES,
    ClientHandshake,
    LocalProtocolError,
    PipeProtocol,
    Refused,
    ServerHandshake,
    State,
    offer_cost,
)
from aiokvpipe._wire import Structure, TensorSpec, Transport

SPEC = TensorSpec(1, (4,), 4)  # float32 ×4: 16 bytes
COST = _wire.message_cost(16, [SPEC])


def header(seq: int, key: str | None = None, credit: int = 0) -> bytes:
    return _wire.encode_header(seq, key, Structure.TENSOR, [SPEC], False, credit)


def pair(credit: int = 1 << 20) -> tuple[PipeProtocol, PipeProtocol]:
    return (PipeProtocol(recv_buffer_bytes=credit, peer_credit=credit),
            PipeProtocol(recv_buffer_bytes=credit, peer_credit=credit))


def send(a: PipeProtocol, key: str | None = None) -> bytes:
    a.spend(COST)
    return a.send_header(key, Structure.TENSOR, [SPEC], 16, False)


# -- messages and sequence numbers -----------------------------------------------------------


def test_headers_in_sequence_come_out_as_messages_and_hold_credit() -> None:
    a, b = pair()
    frames = b.receive_data(send(a, "k") + send(a))
    assert [(f.seq, f.key) for f in frames] == [(0, "k"), (1, None)]  # type: ignore[union-attr]
    assert b.credit_held == 2 * COST and b.payloads_pending == 2
    assert a.credit_outstanding == 2 * COST


def test_bytes_fed_one_at_a_time_give_the_same_frames() -> None:
    a, b = pair()
    data = send(a, "key") + send(a) + _wire.encode(_wire.Heartbeat()) + send(a, "x")
    frames = []
    for i in range(len(data)):
        frames += b.receive_data(data[i:i + 1])
    assert [f.seq for f in frames] == [0, 1, 2]  # type: ignore[union-attr]


def test_bytes_kept_by_a_budget_are_backlogged_until_fed_or_the_pipe_breaks() -> None:
    # The I/O layer feeds again while this says so: stale after a break, it would feed a
    # broken protocol for ever (the connection's last reads loop on it).
    a, b = pair()
    data = send(a) + send(a) + send(a)
    assert len(b.receive_data(data, budget=1)) == 1 and b.backlogged
    assert len(b.receive_data(b"", budget=1)) == 1 and b.backlogged
    assert len(b.receive_data(b"", budget=1)) == 1 and not b.backlogged
    b.receive_data(send(a) + send(a), budget=1)
    assert b.backlogged
    b.fail()
    assert not b.backlogged
    assert b.receive_data(b"", budget=1) == [] and not b.backlogged


def test_both_ends_charge_a_message_the_same_credit() -> None:
    # A header's cost, an outgoing message's and message_cost() are one rule written out
    # three times (no call per message): each end must charge exactly what the other does.
    for msg in (None, torch.zeros(3), [torch.ones(2, 5), torch.zeros(0)],
                {"k": torch.ones(4, dtype=torch.float16), "v": torch.zeros(7, 2)}):
        out = flatten(msg)
        a, b = pair()
        a.spend(out.cost)
        head = a.send_header(None, out.structure, out.specs, out.nbytes, False)
        (h,) = b.receive_data(head)
        assert isinstance(h, _wire.Header)
        assert out.cost == h.cost == _wire.message_cost(out.nbytes, out.specs)
        assert b.credit_held == out.cost


@pytest.mark.parametrize("seq", [1, 5, 2**40])
def test_a_header_out_of_sequence_is_a_protocol_error(seq: int) -> None:
    _, b = pair()
    with pytest.raises(ProtocolError, match="was due"):
        b.receive_data(header(seq))
    assert b.state is State.BROKEN
    assert b.receive_data(header(0)) == []  # nothing is accepted once broken


def test_a_header_beyond_the_granted_credit_is_a_protocol_error() -> None:
    b = PipeProtocol(recv_buffer_bytes=2 * COST, peer_credit=1)
    b.receive_data(header(0) + header(1))
    with pytest.raises(ProtocolError, match="beyond the receive credits"):
        b.receive_data(header(2))


def test_an_oversize_message_is_accepted_only_when_nothing_is_held() -> None:
    b = PipeProtocol(recv_buffer_bytes=10, peer_credit=1)
    b.receive_data(header(0))  # alone: admitted
    with pytest.raises(ProtocolError):
        b.receive_data(header(1))


def test_an_unknown_dtype_is_refused_before_anything_is_posted() -> None:
    _, b = pair()
    bad = _wire.encode_header(0, None, Structure.TENSOR, [TensorSpec(250, (1,), 1)])
    with pytest.raises(ProtocolError):
        b.receive_data(bad)


@pytest.mark.parametrize("frame", [
    _wire.Hello(bytes(32), _wire.Capabilities()), _wire.Auth(), _wire.Ready(),
    _wire.Attach(bytes(16), _wire.Direction.CLIENT_TO_SERVER),
])
def test_handshake_frames_on_an_open_pipe_are_protocol_errors(frame: _wire.Frame) -> None:
    _, b = pair()
    with pytest.raises(ProtocolError, match="unexpected"):
        b.receive_data(_wire.encode(frame))


def test_heartbeats_are_consumed() -> None:
    _, b = pair()
    assert b.receive_data(_wire.encode(_wire.Heartbeat()) * 3) == []


def test_heartbeats_between_headers_leave_every_header_in_order() -> None:
    # The frames before a heartbeat, and those after it, all come out once, in order.
    a, b = pair()
    beat = _wire.encode(_wire.Heartbeat())
    data = (send(a) + beat + send(a) + send(a) + beat + beat + send(a) + beat
            + _wire.encode_credit(0) + send(a))
    frames = b.receive_data(data)
    assert [type(f).__name__ for f in frames] == ["Header"] * 4 + ["Credit", "Header"]
    assert [f.seq for f in frames if isinstance(f, _wire.Header)] == [0, 1, 2, 3, 4]


def test_a_dtype_this_torch_lacks_is_refused_also_in_specs_seen_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Specs of a recurring message are checked once; a spec the decoder knows already must
    # still be checked before its first header is taken.
    a, b = pair()
    b.receive_data(send(a))  # SPEC cached and checked
    other = TensorSpec(2, (4,), 2)  # float16, not seen yet
    monkeypatch.delitem(_protocol.DTYPE_OF, 2)
    a.spend(COST)
    with pytest.raises(ProtocolError, match="dtype code 2"):
        b.receive_data(a.send_header(None, Structure.TENSOR, [other], 8, False))


# -- credits ----------------------------------------------------------------------------------


def test_claimed_credit_rides_on_the_next_header_and_is_returned_once() -> None:
    a, b = pair()
    b.receive_data(send(a) + send(a))
    b.payload_done()
    b.payload_done()
    b.release(COST)
    b.release(COST)
    assert b.credit_buffered == 0 and b.credit_owed == 2 * COST
    b.spend(COST)
    head = b.send_header(None, Structure.TENSOR, [SPEC], 16, False)
    assert b.send_credit() == b""  # nothing owed any more: the header carried it
    frames = a.receive_data(head)
    assert frames[0].credit == 2 * COST  # type: ignore[union-attr]
    assert a.credit_outstanding == 0 and b.credit_held == 0


def test_credit_frame_returns_what_is_owed() -> None:
    a, b = pair()
    b.receive_data(send(a))
    b.release(COST)
    frames = a.receive_data(b.send_credit())
    assert frames == [_wire.Credit(COST)] and a.credit_outstanding == 0


def test_credit_is_due_once_an_eighth_of_the_window_is_owed() -> None:
    a, b = pair(credit=16 * COST)
    for _ in range(2):
        b.receive_data(send(a))
    b.release(COST)
    assert not b.credit_return_due  # 1/16 of the window: it may linger
    b.release(COST)
    assert b.credit_return_due  # 2/16
    a.receive_data(b.send_credit())
    assert not b.credit_return_due and a.credit_outstanding == 0


@pytest.mark.parametrize("extra", [1, 1 << 30])
def test_returning_more_credit_than_was_spent_is_a_protocol_error(extra: int) -> None:
    a, _ = pair()
    send(a)
    with pytest.raises(ProtocolError, match="outstanding"):
        a.receive_data(_wire.encode_credit(COST + extra))
    with pytest.raises(ProtocolError):  # the same inside a header
        pair()[0].receive_data(header(0, credit=extra))


def test_no_credit_is_sent_to_a_peer_that_closed() -> None:
    a, b = pair()
    b.receive_data(send(a) + a.send_close())
    b.release(COST)
    assert b.send_credit() == b""


# -- discarded keys ---------------------------------------------------------------------------


def test_discarded_keys_are_remembered_boundedly_and_taken_back_by_asking() -> None:
    _, b = pair()
    b.discard("gone")
    assert b.is_discarded("gone") and not b.is_discarded("other")
    b.undiscard("gone")
    assert not b.is_discarded("gone")
    for i in range(MAX_TOMBSTONES + 1):
        b.discard(str(i))
    assert not b.is_discarded("0") and b.is_discarded(str(MAX_TOMBSTONES))
    b.discard("1")  # discarding again makes it the newest
    b.discard("new")
    assert b.is_discarded("1") and not b.is_discarded("2")


# -- the close handshake ------------------------------------------------------------------------


def test_close_in_both_orders_ends_closed_once_payloads_are_in() -> None:
    a, b = pair()
    b.receive_data(send(a))
    assert b.receive_data(a.send_close()) == [_wire.Close(1)]
    assert a.state is State.CLOSING and b.state is State.CLOSING and not b.can_send
    a.receive_data(b.send_close())
    assert a.state is State.CLOSED
    assert b.state is State.CLOSING  # one payload still arriving
    b.payload_done()
    assert b.state is State.CLOSED


def test_simultaneous_closes_cross() -> None:
    a, b = pair()
    ca, cb = a.send_close(), b.send_close()
    a.receive_data(cb)
    b.receive_data(ca)
    assert a.state is b.state is State.CLOSED


def test_close_announcing_the_wrong_count_is_a_protocol_error() -> None:
    a, b = pair()
    send(a)  # a header that never reached b
    with pytest.raises(ProtocolError, match="closed after 1 messages"):
        b.receive_data(a.send_close())


@pytest.mark.parametrize("after", ["header", "close"])
def test_nothing_may_follow_the_peers_close(after: str) -> None:
    a, b = pair()
    b.receive_data(a.send_close())
    data = header(0) if after == "header" else _wire.encode(_wire.Close(0))
    with pytest.raises(ProtocolError):
        b.receive_data(data)


def test_our_own_misuse_is_a_local_error() -> None:
    a, _ = pair()
    a.start_closing()
    with pytest.raises(LocalProtocolError):
        a.send_header(None, Structure.NONE, [], 0, True)
    a.send_close()
    with pytest.raises(LocalProtocolError):
        a.send_close()
    a.fail()
    assert a.state is State.BROKEN


# -- the data plane's signals (ipc) ------------------------------------------------------------


def signalling_pair() -> tuple[PipeProtocol, PipeProtocol]:
    return (PipeProtocol(recv_buffer_bytes=1 << 20, peer_credit=1 << 20, signals=True),
            PipeProtocol(recv_buffer_bytes=1 << 20, peer_credit=1 << 20, signals=True))


def test_signals_come_out_in_order_with_the_headers() -> None:
    a, b = signalling_pair()
    frames = b.receive_data(a.send_signal(b"copy-0") + send(a) + a.send_signal(b"ack"))
    assert [type(f) for f in frames] == [_wire.Signal, _wire.Header, _wire.Signal]
    assert frames[0] == _wire.Signal(b"copy-0") and frames[2] == _wire.Signal(b"ack")


def test_a_signal_on_a_pipe_without_them_is_a_protocol_error() -> None:
    a, _ = signalling_pair()
    _, b = pair()
    with pytest.raises(ProtocolError, match="SIGNAL"):
        b.receive_data(a.send_signal(b"x"))
    assert b.state is State.BROKEN
    with pytest.raises(LocalProtocolError):
        b.send_signal(b"x")  # ours cannot signal either


def test_a_note_rides_in_its_header_in_order_with_the_signals() -> None:
    a, b = signalling_pair()
    data = (a.send_signal(b"region") + a.send_header(None, Structure.TENSOR, [SPEC], 16,
                                                     False, b"copy-1")
            + send(a))
    frames = b.receive_data(data)
    assert [type(f) for f in frames] == [_wire.Signal, _wire.Header, _wire.Header]
    assert frames[1].note == b"copy-1" and frames[2].note is None  # type: ignore[union-attr]
    assert [f.seq for f in frames[1:]] == [0, 1]  # type: ignore[union-attr]


def test_a_note_on_a_message_without_payload_is_a_protocol_error() -> None:
    # Such a message travels inline; a note there would leave a copy to be paired with the
    # next message's receive.
    a, b = signalling_pair()
    noted = _wire.encode_header(0, None, Structure.NONE, [], False, 0, bytes(20))
    with pytest.raises(ProtocolError, match="no payload"):
        b.receive_data(noted)
    assert b.state is State.BROKEN


def test_a_header_that_cannot_be_encoded_commits_nothing() -> None:
    a, b = signalling_pair()
    b.receive_data(send(a))
    b.payload_done()
    b.release(COST)
    with pytest.raises(ValueError, match="note"):
        b.send_header(None, Structure.TENSOR, [SPEC], 16, False, bytes(65))
    assert b.credit_owed == COST and b.next_send_seq == 0  # still owed, nothing sent


def test_a_note_on_a_pipe_without_signals_is_a_protocol_error() -> None:
    a, _ = signalling_pair()
    _, b = pair()
    noted = a.send_header(None, Structure.TENSOR, [SPEC], 16, False, b"x")
    with pytest.raises(ProtocolError, match="note"):
        b.receive_data(noted)
    assert b.state is State.BROKEN
    c, _ = pair()
    with pytest.raises(LocalProtocolError, match="note"):  # ours cannot send one either
        c.send_header(None, Structure.TENSOR, [SPEC], 16, False, b"x")
    assert c.next_send_seq == 0  # nothing was committed


def test_signals_may_follow_the_peers_close_and_none_leave_a_broken_pipe() -> None:
    # The last acknowledgements of what we sent come after the peer's CLOSE.
    a, b = signalling_pair()
    assert b.receive_data(a.send_close() + a.send_signal(b"ack")) == [
        _wire.Close(0), _wire.Signal(b"ack")]
    a.fail()
    assert a.send_signal(b"late") == b""


def test_a_long_signal_is_split_into_frames_that_join_up_again() -> None:
    a, b = signalling_pair()
    data = bytes(range(256)) * (_wire.MAX_SIGNAL_BYTES // 128 + 3)
    frames = b.receive_data(a.send_signal(data))
    assert len(frames) == 3
    assert b"".join(f.data for f in frames) == data  # type: ignore[union-attr]


# -- errors from the peer ----------------------------------------------------------------------


def test_the_peers_own_failure_is_not_a_protocol_error() -> None:
    _, b = pair()
    with pytest.raises(PeerFailure, match="out of memory"):
        b.receive_data(_wire.encode(_wire.Error(_wire.ErrorCode.INTERNAL, "out of memory")))
    _, c = pair()
    with pytest.raises(ProtocolError, match="peer reported"):
        c.receive_data(_wire.encode(_wire.Error(_wire.ErrorCode.PROTOCOL, "bad frame")))


# -- the handshake ------------------------------------------------------------------------------


def shake(client_token: bytes | None = b"t", server_token: bytes | None = b"t",
          client_caps: _wire.Capabilities | None = None,
          server_caps: _wire.Capabilities | None = None
          ) -> tuple[ClientHandshake, ServerHandshake, _wire.Frame]:
    client = ClientHandshake(client_token, client_caps or _wire.Capabilities(), b"c" * 32)
    hello = _wire.decode_body(_wire.FrameType.HELLO,
                              _wire.encode(client.hello())[_wire.FRAME_PREFIX_BYTES:])
    assert isinstance(hello, _wire.Hello)
    server = ServerHandshake(server_token, server_caps or _wire.Capabilities(), b"s" * 32, hello)
    auth = client.receive(server.hello())
    assert auth is not None
    return client, server, auth


def test_handshake_in_order_opens_the_pipe() -> None:
    client, server, auth = shake()
    transport = server.receive_auth(auth)
    assert transport is Transport.TCP
    assert client.receive(server.accept(bytes(16), transport, None)) is None
    assert not client.done
    client.receive(server.ready())
    assert client.done


@pytest.mark.parametrize(("ct", "st"), [(b"a", b"b"), (None, b"b")])
def test_a_client_without_the_token_is_refused_with_an_error_frame(ct: bytes | None,
                                                                   st: bytes) -> None:
    client, server, auth = shake(ct, st)
    with pytest.raises(Refused) as info:
        server.receive_auth(auth)
    assert isinstance(info.value.error, AuthenticationError)
    with pytest.raises(AuthenticationError):  # and the client learns why
        client.receive(info.value.frame)


def test_a_server_without_the_token_is_not_trusted_by_the_client() -> None:
    client, server, auth = shake(b"t", None)
    accept = server.accept(bytes(16), server.receive_auth(auth), None)
    with pytest.raises(AuthenticationError, match="could not prove"):
        client.receive(accept)


def test_transports_that_cannot_agree_are_refused() -> None:
    tcp = _wire.Capabilities(transport=Transport.TCP)
    nccl = _wire.Capabilities(transport=Transport.NCCL)
    client, server, auth = shake(client_caps=nccl, server_caps=tcp)
    with pytest.raises(Refused) as info:
        server.receive_auth(auth)
    with pytest.raises(PipeError):
        client.receive(info.value.frame)


def test_client_refuses_a_transport_it_did_not_ask_for() -> None:
    client, server, auth = shake(client_caps=_wire.Capabilities(transport=Transport.TCP))
    server.receive_auth(auth)
    accept = _wire.Accept(server.accept(bytes(16), Transport.TCP, None).proof, bytes(16),
                          Transport.NCCL, (bytes(128), bytes(128)))
    with pytest.raises(ProtocolError, match="asked for tcp"):
        client.receive(accept)


@pytest.mark.parametrize("step", [0, 1, 2])
def test_frames_out_of_order_in_the_handshake_are_protocol_errors(step: int) -> None:
    client = ClientHandshake(None, _wire.Capabilities(), b"c" * 32)
    frames: list[_wire.Frame] = [_wire.Hello(b"s" * 32, _wire.Capabilities()),
                                 _wire.Accept(b"", bytes(16), Transport.TCP), _wire.Ready()]
    for frame in frames[:step]:
        client.receive(frame)
    wrong = frames[(step + 1) % 3]
    with pytest.raises(ProtocolError, match="expected"):
        client.receive(wrong)


def test_server_steps_out_of_order_are_local_errors() -> None:
    _, server, _ = shake()
    with pytest.raises(LocalProtocolError):
        server.accept(bytes(16), Transport.TCP, None)
    with pytest.raises(LocalProtocolError):
        server.ready()


# -- block transfers -----------------------------------------------------------------------------


def offer(a: PipeProtocol, ids: tuple[int, ...] = (1, 2, 3), pool: int = 0) -> tuple[int, bytes]:
    a.spend(offer_cost(len(ids), 1))
    return a.send_offer(pool, "req", (0,), ids)


def test_offer_pull_data_in_order() -> None:
    a, b = pair()
    oid, data = offer(a)
    frames = b.receive_data(a.send_pool(0, b"layout") + data)
    assert [type(f) for f in frames] == [_wire.PoolInfo, _wire.Offer]
    assert b.credit_held == offer_cost(3, 1)
    frames = a.receive_data(b.send_pull(oid))
    assert frames == [_wire.Pull(oid)]
    assert b.credit_owed == offer_cost(3, 1)  # answered: its credit goes back
    chunks = a.send_block_data(oid) + a.send_block_data(oid)  # a staged transfer: 2 chunks
    a.offer_sent(oid)
    assert b.receive_data(chunks) == [_wire.BlockData(oid)] * 2
    b.offer_received(oid)
    with pytest.raises(ProtocolError, match="not pulled"):  # not after the last chunk
        b.receive_data(_wire.encode(_wire.BlockData(oid)))
    with pytest.raises(LocalProtocolError):
        a.send_block_data(oid)


def test_offers_each_way_are_numbered_apart_and_end_apart() -> None:
    # Both ends offer (#0 each way); ours ending must leave the peer's waiting, and the other
    # way round (one offer_done() for both once made the next PULL a local error and broke
    # a symmetric exchange with "BLOCK_DATA for offer 0, not pulled").
    a, b = pair()
    a_oid, a_offer = offer(a)
    b_oid, b_offer = offer(b)
    assert a_oid == b_oid == 0
    b.receive_data(a.send_pool(0, b"layout") + a_offer)
    a.receive_data(b.send_pool(0, b"layout") + b_offer)
    a.receive_data(b.send_pull(a_oid))
    b.receive_data(a.send_block_data(a_oid))
    a.offer_sent(a_oid)
    assert a.offer_waiting(b_oid)  # the peer's offer #0 still waits for our answer
    b.receive_data(a.send_pull(b_oid))
    a.receive_data(b.send_block_data(b_oid))
    b.offer_sent(b_oid)
    b.offer_received(a_oid)
    assert not b.offer_waiting(a_oid)
    with pytest.raises(ProtocolError, match="not pulled"):  # a's #0 ended at b
        b.receive_data(_wire.encode(_wire.BlockData(a_oid)))


def test_an_offer_of_a_pool_never_described_is_a_protocol_error() -> None:
    a, b = pair()
    _, data = offer(a, pool=7)
    with pytest.raises(ProtocolError, match="never described"):
        b.receive_data(data)


def test_a_pool_described_twice_is_a_protocol_error() -> None:
    a, b = pair()
    with pytest.raises(ProtocolError, match="twice"):
        b.receive_data(a.send_pool(1, b"x") + a.send_pool(1, b"x"))


def test_offers_beyond_the_credit_are_a_protocol_error() -> None:
    a = PipeProtocol(recv_buffer_bytes=1 << 20, peer_credit=1 << 20)
    b = PipeProtocol(recv_buffer_bytes=offer_cost(3, 1), peer_credit=1)
    data = a.send_pool(0, b"x") + offer(a)[1]
    b.receive_data(data)
    with pytest.raises(ProtocolError, match="beyond the receive credits"):
        b.receive_data(offer(a)[1])


def test_a_refused_offer_is_over_on_both_ends() -> None:
    a, b = pair()
    oid, data = offer(a)
    b.receive_data(a.send_pool(0, b"x") + data)
    assert a.receive_data(b.send_pull(oid, "pools do not fit")) == [
        _wire.Pull(oid, "pools do not fit")]
    with pytest.raises(LocalProtocolError):
        a.send_block_data(oid)
    with pytest.raises(LocalProtocolError):
        b.send_pull(oid)


def test_a_retract_crossing_the_pull_is_not_an_error() -> None:
    a, b = pair()
    oid, data = offer(a)
    b.receive_data(a.send_pool(0, b"x") + data)
    pull = b.send_pull(oid)
    retract = a.send_retract(oid)
    assert a.receive_data(pull) == []  # crossed our retract: ignored
    assert b.receive_data(retract) == [_wire.Retract(oid)]
    with pytest.raises(ProtocolError, match="never made"):
        a.receive_data(_wire.encode(_wire.Pull(oid + 5)))


def test_a_retract_crossing_a_refusal_is_not_an_error() -> None:
    a, b = pair()
    oid, data = offer(a)
    b.receive_data(a.send_pool(0, b"x") + data)
    refusal = b.send_pull(oid, "discarded")
    retract = a.send_retract(oid)  # our close takes the offer back as the refusal comes
    assert a.receive_data(refusal) == []
    assert b.receive_data(retract) == []  # crossed its refusal: ignored
    with pytest.raises(ProtocolError, match="not pending"):  # but only once
        b.receive_data(_wire.encode(_wire.Retract(oid)))


def test_a_failed_offer_is_numbered_as_an_offer_and_answered_by_nothing() -> None:
    """OFFER_FAILED takes the next offer id and holds its credit at the receiver until a
    receive takes it; a RETRACT, PULL or BLOCK_DATA about it is a ProtocolError (a hostile
    RETRACT of one was accepted, and the receive taking it then failed here, as our bug)."""
    a, b = pair()
    first = a.send_offer_failed("k", (0,), "block id 99 is outside the pool")
    assert b.receive_data(first) == [_wire.OfferFailed(0, "k", (0,),
                                                       "block id 99 is outside the pool")]
    assert b.credit_held > 0
    b.failed_offer_taken(0)
    assert b.credit_owed == b.credit_held  # all of it owed back now
    with pytest.raises(LocalProtocolError):
        b.failed_offer_taken(0)  # taken once only
    oid, data = offer(a)  # the next offer is #1
    assert oid == 1
    b.receive_data(a.send_pool(0, b"x") + data)
    for frame in (_wire.Retract(2), _wire.BlockData(2), _wire.Pulled(2)):
        a2, b2 = pair()
        b2.receive_data(a2.send_offer_failed(None, (), "bad layers"))
        with pytest.raises(ProtocolError):
            b2.receive_data(_wire.encode(type(frame)(0)))
        with pytest.raises(LocalProtocolError):
            b2.send_pull(0)
    a3, b3 = pair()  # our PULL of their failed offer cannot be answered: a's view
    a3.send_offer_failed("k", (), "x")
    with pytest.raises(ProtocolError, match="never made"):
        a3.receive_data(_wire.encode(_wire.Pull(0)))


def test_ipc_pull_ends_with_pulled() -> None:
    a, b = pair()
    oid, data = offer(a)
    b.receive_data(a.send_pool(0, b"x") + data)
    a.receive_data(b.send_pull(oid))
    assert b.receive_data(a.send_block_data(oid)) == [_wire.BlockData(oid)]  # "copy now"
    assert a.receive_data(b.send_pulled(oid)) == [_wire.Pulled(oid)]
    with pytest.raises(ProtocolError):
        a.receive_data(_wire.encode(_wire.Pulled(oid)))
    with pytest.raises(LocalProtocolError):  # once
        b.send_pulled(oid)


def test_a_pulled_before_our_block_data_is_the_peers_protocol_error() -> None:
    """PULLED says the peer copied the offer out on our BLOCK_DATA ("copy now"): one that
    comes before we wrote it, even read with its PULL, is the peer's error. (It was taken,
    and writing the BLOCK_DATA then failed here as our own error.)"""
    a, b = pair()
    oid, data = offer(a)
    b.receive_data(a.send_pool(0, b"x") + data)
    early = b.send_pull(oid) + _wire.encode(_wire.Pulled(oid))
    with pytest.raises(ProtocolError, match="before its BLOCK_DATA"):
        a.receive_data(early)


def test_a_retract_after_block_data_is_a_protocol_error() -> None:
    """The peer sends BLOCK_DATA only once our PULL reached it, committed to the offer: a
    RETRACT after it crossed nothing. Taken as a crossing, it dropped the offer, and the
    PULLED of the copy we made of it failed here as our own error."""
    a, b = pair()
    oid, data = offer(a)
    b.receive_data(a.send_pool(0, b"x") + data)
    a.receive_data(b.send_pull(oid))
    b.receive_data(a.send_block_data(oid))
    with pytest.raises(ProtocolError, match="after its BLOCK_DATA"):
        b.receive_data(_wire.encode(_wire.Retract(oid)))


def test_offers_out_of_sequence_are_protocol_errors() -> None:
    a, b = pair()
    b.receive_data(a.send_pool(0, b"x"))
    bad = _wire.encode(_wire.Offer(3, 0, None, (0,), (1,)))
    with pytest.raises(ProtocolError, match="was due"):
        b.receive_data(bad)
