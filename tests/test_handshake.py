"""Handshake decisions, sans I/O: token proofs and the choice of data plane."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from aiokvpipe._handshake import (
    NoTransport,
    choose_transport,
    ipc_possible,
    nccl_possible,
    proof,
    verify,
)
from aiokvpipe._wire import PROOF_BYTES, Auth, Capabilities, Transport

TOKEN = b"correct horse battery staple"
CLIENT_NONCE = bytes(range(32))
SERVER_NONCE = bytes(range(32, 64))

# -- proofs -----------------------------------------------------------------------------------


def test_proof_is_an_hmac_sized_digest_that_fits_an_auth_frame() -> None:
    p = proof(TOKEN, True, CLIENT_NONCE, SERVER_NONCE)
    assert len(p) == PROOF_BYTES
    assert Auth(p).proof == p


def test_client_and_server_proofs_differ_so_a_proof_cannot_be_reflected() -> None:
    client_proof = proof(TOKEN, True, CLIENT_NONCE, SERVER_NONCE)
    server_proof = proof(TOKEN, False, CLIENT_NONCE, SERVER_NONCE)
    assert client_proof != server_proof
    # A server that echoes the client's own proof back is not believed, and vice versa.
    assert not verify(TOKEN, False, CLIENT_NONCE, SERVER_NONCE, client_proof)
    assert not verify(TOKEN, True, CLIENT_NONCE, SERVER_NONCE, server_proof)


@pytest.mark.parametrize("client", [True, False])
def test_verify_accepts_the_proof_of_the_same_token_and_nonces(client: bool) -> None:
    p = proof(TOKEN, client, CLIENT_NONCE, SERVER_NONCE)
    assert verify(TOKEN, client, CLIENT_NONCE, SERVER_NONCE, p)


@pytest.mark.parametrize("client", [True, False])
def test_verify_rejects_a_proof_made_with_another_token(client: bool) -> None:
    p = proof(b"wrong token", client, CLIENT_NONCE, SERVER_NONCE)
    assert not verify(TOKEN, client, CLIENT_NONCE, SERVER_NONCE, p)
    # A token differing in one trailing byte is a different token.
    p = proof(TOKEN + b"!", client, CLIENT_NONCE, SERVER_NONCE)
    assert not verify(TOKEN, client, CLIENT_NONCE, SERVER_NONCE, p)


@pytest.mark.parametrize("client", [True, False])
def test_verify_rejects_swapped_nonces(client: bool) -> None:
    p = proof(TOKEN, client, SERVER_NONCE, CLIENT_NONCE)
    assert p != proof(TOKEN, client, CLIENT_NONCE, SERVER_NONCE)
    assert not verify(TOKEN, client, CLIENT_NONCE, SERVER_NONCE, p)


@pytest.mark.parametrize("client", [True, False])
def test_verify_rejects_a_proof_replayed_from_another_session(client: bool) -> None:
    old = proof(TOKEN, client, CLIENT_NONCE, SERVER_NONCE)
    fresh_server_nonce = bytes(reversed(SERVER_NONCE))
    assert not verify(TOKEN, client, CLIENT_NONCE, fresh_server_nonce, old)


@pytest.mark.parametrize("received", [b"", b"\x00" * PROOF_BYTES, b"short",
                                      b"\x00" * (PROOF_BYTES + 1)])
def test_verify_rejects_empty_garbage_and_wrong_length_proofs(received: bytes) -> None:
    assert not verify(TOKEN, True, CLIENT_NONCE, SERVER_NONCE, received)


def test_verify_rejects_a_proof_with_one_bit_flipped() -> None:
    p = bytearray(proof(TOKEN, True, CLIENT_NONCE, SERVER_NONCE))
    p[-1] ^= 1
    assert not verify(TOKEN, True, CLIENT_NONCE, SERVER_NONCE, bytes(p))


@pytest.mark.parametrize("token", [None, b""])
@pytest.mark.parametrize("client", [True, False])
def test_no_token_gives_an_empty_proof(token: bytes | None, client: bool) -> None:
    assert proof(token, client, CLIENT_NONCE, SERVER_NONCE) == b""


def test_proof_is_deterministic_for_the_same_inputs() -> None:
    assert proof(TOKEN, True, CLIENT_NONCE, SERVER_NONCE) == proof(
        TOKEN, True, CLIENT_NONCE, SERVER_NONCE)


# -- choice of data plane ---------------------------------------------------------------------

GPU_A = bytes(range(16))
GPU_B = bytes(range(1, 17))


def caps(transport: Transport = Transport.AUTO, *, cuda: bool = False, nccl: bool = False,
         uuid: bytes = bytes(16), nccl_version: int = 0) -> Capabilities:
    return Capabilities(transport, cuda, nccl, uuid, nccl_version, 1 << 20)


def gpu(uuid: bytes, transport: Transport = Transport.AUTO, version: int = 22_105
        ) -> Capabilities:
    return caps(transport, cuda=True, nccl=True, uuid=uuid, nccl_version=version)


CPU = caps()


def choose_both_ways(a: Capabilities, b: Capabilities) -> Transport:
    """The decision must not depend on which end is the server."""
    ab, ba = choose_transport(a, b), choose_transport(b, a)
    assert ab == ba
    return ab


def test_auto_without_cuda_is_tcp() -> None:
    assert choose_both_ways(CPU, CPU) == Transport.TCP


def test_auto_with_cuda_on_one_end_only_is_tcp() -> None:
    assert choose_both_ways(CPU, gpu(GPU_A)) == Transport.TCP


def test_auto_with_two_different_gpus_is_nccl() -> None:
    assert choose_both_ways(gpu(GPU_A), gpu(GPU_B)) == Transport.NCCL


def test_auto_on_the_same_gpu_is_tcp() -> None:
    # NCCL refuses two ranks on one GPU.
    assert choose_both_ways(gpu(GPU_A), gpu(GPU_A)) == Transport.TCP


def test_auto_with_cuda_but_no_nccl_on_one_end_is_tcp() -> None:
    no_nccl = caps(cuda=True, nccl=False, uuid=GPU_B, nccl_version=22_105)
    assert choose_both_ways(gpu(GPU_A), no_nccl) == Transport.TCP


def test_auto_with_differing_nccl_versions_is_tcp() -> None:
    assert choose_both_ways(gpu(GPU_A, version=22_105), gpu(GPU_B, version=21_803)) \
        == Transport.TCP


@pytest.mark.parametrize("where", ["server", "client", "both"])
def test_tcp_forced_wins_even_when_nccl_is_possible(where: str) -> None:
    a = gpu(GPU_A, Transport.TCP if where in ("server", "both") else Transport.AUTO)
    b = gpu(GPU_B, Transport.TCP if where in ("client", "both") else Transport.AUTO)
    assert choose_transport(a, b) == Transport.TCP


@pytest.mark.parametrize("where", ["server", "client", "both"])
def test_nccl_forced_and_possible_is_nccl(where: str) -> None:
    a = gpu(GPU_A, Transport.NCCL if where in ("server", "both") else Transport.AUTO)
    b = gpu(GPU_B, Transport.NCCL if where in ("client", "both") else Transport.AUTO)
    assert choose_transport(a, b) == Transport.NCCL


@pytest.mark.parametrize(("server", "client", "reason"), [
    (caps(Transport.NCCL), CPU, "cuda"),
    (gpu(GPU_A, Transport.NCCL), CPU, "cuda"),
    (gpu(GPU_A, Transport.NCCL), caps(cuda=True, uuid=GPU_B, nccl_version=22_105), "nccl"),
    (gpu(GPU_A, Transport.NCCL), gpu(GPU_A), "same gpu"),
    (gpu(GPU_A, Transport.NCCL), gpu(GPU_B, version=1), "version"),
    (gpu(GPU_A), gpu(GPU_A, Transport.NCCL), "same gpu"),
], ids=["cpu-both", "cpu-client", "no-nccl", "same-gpu", "versions", "client-forces"])
def test_nccl_forced_but_impossible_raises_no_transport_with_the_reason(
        server: Capabilities, client: Capabilities, reason: str) -> None:
    with pytest.raises(NoTransport) as info:
        choose_transport(server, client)
    message = str(info.value).lower()
    assert "nccl" in message
    assert reason in message
    assert nccl_possible(server, client) is not None


def test_conflicting_preferences_raise_no_transport() -> None:
    for a, b in [(gpu(GPU_A, Transport.TCP), gpu(GPU_B, Transport.NCCL)),
                 (gpu(GPU_A, Transport.NCCL), gpu(GPU_B, Transport.TCP)),
                 (caps(Transport.TCP), caps(Transport.NCCL))]:
        with pytest.raises(NoTransport):
            choose_transport(a, b)


def test_outcome_is_always_concrete_or_no_transport() -> None:
    # Over a grid of both ends' capabilities, the server never "chooses" AUTO, and NCCL or
    # IPC is chosen only when it is actually possible.
    ends = [dataclasses.replace(caps(t, cuda=c, nccl=n, uuid=u, nccl_version=v), host_id=h,
                                ipc=i)
            for t, c, n, u, v, h, i in itertools.product(
                Transport, [False, True], [False, True], [GPU_A, GPU_B], [1, 2],
                [HOST_A, HOST_B], [False, True])]
    for (a, b), proven in itertools.product(itertools.product(ends, repeat=2), [False, True]):
        try:
            got = choose_transport(a, b, ipc_proven=proven)
        except NoTransport:
            assert {Transport.NCCL, Transport.IPC} & {a.transport, b.transport}
            continue
        assert got in (Transport.TCP, Transport.NCCL, Transport.IPC)
        ipc_ok = ipc_possible(a, b) is None and proven
        if got == Transport.IPC:
            assert ipc_ok
            assert not {Transport.TCP, Transport.NCCL} & {a.transport, b.transport}
        elif got == Transport.NCCL:
            assert nccl_possible(a, b) is None
            assert Transport.TCP not in (a.transport, b.transport)
            # auto prefers ipc: nccl here means ipc was impossible or nccl was asked for
            assert not ipc_ok or Transport.NCCL in (a.transport, b.transport)
        elif nccl_possible(a, b) is None or ipc_ok:
            assert Transport.TCP in (a.transport, b.transport)


# -- ipc --------------------------------------------------------------------------------------

HOST_A = bytes(range(40, 56))
HOST_B = bytes(range(41, 57))


def ipc_end(uuid: bytes = GPU_A, host: bytes = HOST_A, transport: Transport = Transport.AUTO,
            ipc: bool = True) -> Capabilities:
    return dataclasses.replace(gpu(uuid, transport), host_id=host, ipc=ipc)


@pytest.mark.parametrize("uuids", [(GPU_A, GPU_A), (GPU_A, GPU_B)], ids=["same-gpu", "two-gpus"])
def test_auto_on_one_host_with_a_proven_handle_is_ipc(uuids: tuple[bytes, bytes]) -> None:
    a, b = ipc_end(uuids[0]), ipc_end(uuids[1])
    assert choose_transport(a, b, ipc_proven=True) == Transport.IPC
    assert choose_transport(b, a, ipc_proven=True) == Transport.IPC


def test_auto_without_the_proof_falls_back_to_nccl_or_tcp() -> None:
    # The handle did not open (other containers, GPUs without peer access): not ipc.
    assert choose_transport(ipc_end(GPU_A), ipc_end(GPU_B)) == Transport.NCCL
    assert choose_transport(ipc_end(GPU_A), ipc_end(GPU_A)) == Transport.TCP


@pytest.mark.parametrize(("a", "b", "reason"), [
    (ipc_end(), ipc_end(host=HOST_B), "different hosts"),
    (ipc_end(), ipc_end(host=bytes(16)), "host"),
    (ipc_end(), ipc_end(ipc=False), "cuda ipc"),
    (ipc_end(), dataclasses.replace(CPU, host_id=HOST_A, ipc=True), "cuda device"),
], ids=["other-host", "unknown-host", "no-ipc", "cpu"])
def test_ipc_impossible_says_why_and_auto_does_not_pick_it(a: Capabilities, b: Capabilities,
                                                          reason: str) -> None:
    why = ipc_possible(a, b)
    assert why is not None and reason in why.lower()
    assert choose_transport(a, b, ipc_proven=True) != Transport.IPC
    forced = dataclasses.replace(a, transport=Transport.IPC)
    with pytest.raises(NoTransport, match="ipc"):
        choose_transport(forced, b, ipc_proven=True)


def test_ipc_forced_needs_the_proof() -> None:
    a, b = ipc_end(transport=Transport.IPC), ipc_end()
    assert choose_transport(a, b, ipc_proven=True) == Transport.IPC
    with pytest.raises(NoTransport, match="did not open"):
        choose_transport(a, b, ipc_proven=False)


@pytest.mark.parametrize("other", [Transport.TCP, Transport.NCCL])
def test_ipc_against_another_forced_transport_is_no_transport(other: Transport) -> None:
    with pytest.raises(NoTransport, match="ipc"):
        choose_transport(ipc_end(transport=Transport.IPC), ipc_end(transport=other),
                         ipc_proven=True)


def test_tcp_forced_wins_over_a_possible_ipc() -> None:
    assert choose_transport(ipc_end(transport=Transport.TCP), ipc_end(),
                            ipc_proven=True) == Transport.TCP
