"""Handshake decisions, sans I/O: proofs of the shared token and the choice of data plane.

Authentication is mutual and challenge-response: each end sends a fresh random nonce; each
proves it holds the token with ``HMAC-SHA256(token, label ‖ client_nonce ‖ server_nonce)``,
under a different label per direction so that a proof can never be reflected back. Proofs are
compared with :func:`hmac.compare_digest`. A recorded handshake is useless to replay: the other
end's nonce is new every time. The token is never sent.
"""

from __future__ import annotations

import hmac
from hashlib import sha256

from ._wire import HOST_ID_BYTES, Capabilities, Transport

_CLIENT_LABEL = b"aiokvpipe/1 client proof"
_SERVER_LABEL = b"aiokvpipe/1 server proof"


def proof(token: bytes | None, client: bool, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """This end's proof (empty without a token)."""
    if not token:
        return b""
    label = _CLIENT_LABEL if client else _SERVER_LABEL
    return hmac.new(token, label + client_nonce + server_nonce, sha256).digest()


def verify(token: bytes, client: bool, client_nonce: bytes, server_nonce: bytes,
           received: bytes) -> bool:
    """Does ``received`` prove the *other* end (``client``: the client) holds ``token``?"""
    expected = proof(token, client, client_nonce, server_nonce)
    return hmac.compare_digest(expected, received)


class NoTransport(Exception):
    """The two ends' preferences and capabilities admit no common data plane."""


def nccl_possible(a: Capabilities, b: Capabilities) -> str | None:
    """``None`` if the two ends can use NCCL, else the reason why not."""
    if not (a.cuda and b.cuda):
        return "both ends need a CUDA device"
    if not (a.nccl and b.nccl):
        return "both ends need CuPy with NCCL"
    if a.nccl_version != b.nccl_version:
        return f"NCCL versions differ ({a.nccl_version} vs {b.nccl_version})"
    if a.device_uuid == b.device_uuid:
        return "both ends use the same GPU (NCCL refuses two ranks on one GPU)"
    return None


def ipc_possible(a: Capabilities, b: Capabilities) -> str | None:
    """``None`` if the two ends may use CUDA IPC, else the reason why not.

    This is what the ends *say*; whether the GPUs can reach each other's memory (the same
    GPU, or two with peer access, in processes that may share memory) is proven only by
    opening a handle: see ``ipc_proven`` in :func:`choose_transport`.
    """
    if not (a.cuda and b.cuda):
        return "both ends need a CUDA device"
    if not (a.ipc and b.ipc):
        return "both ends need CUDA IPC (CuPy on Linux)"
    if bytes(HOST_ID_BYTES) in (a.host_id, b.host_id):
        return "an end does not know which host it runs on"
    if a.host_id != b.host_id:
        return "the ends run on different hosts"
    return None


_NAMES = {Transport.TCP: "tcp", Transport.NCCL: "nccl", Transport.IPC: "ipc"}


def choose_transport(server: Capabilities, client: Capabilities, *,
                     ipc_proven: bool = False) -> Transport:
    """The server's choice of data plane; :class:`NoTransport` if the ends cannot agree.

    ``ipc_proven``: the server opened a CUDA IPC handle the client exported (and closed it
    again), so the two processes can map each other's GPU memory. ``auto`` picks ipc when
    :func:`ipc_possible` and proven, else nccl whenever :func:`nccl_possible`, else tcp (CUDA
    tensors are then staged through pinned host memory).
    """
    wanted = {server.transport, client.transport} - {Transport.AUTO}
    if len(wanted) > 1:
        first, second = sorted(_NAMES[t] for t in wanted)
        raise NoTransport(f"one end asked for {first} and the other for {second}")
    why_not_ipc = ipc_possible(server, client)
    if why_not_ipc is None and not ipc_proven:
        why_not_ipc = ("the peer's CUDA IPC handle did not open here (separate containers, "
                       "or GPUs without peer access)")
    why_not_nccl = nccl_possible(server, client)
    if wanted == {Transport.TCP}:
        return Transport.TCP
    if wanted == {Transport.IPC}:
        if why_not_ipc:
            raise NoTransport(f"transport 'ipc' was requested but {why_not_ipc}")
        return Transport.IPC
    if wanted == {Transport.NCCL}:
        if why_not_nccl:
            raise NoTransport(f"transport 'nccl' was requested but {why_not_nccl}")
        return Transport.NCCL
    if not why_not_ipc:
        return Transport.IPC
    return Transport.TCP if why_not_nccl else Transport.NCCL
