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

from ._wire import Capabilities, Transport

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


def choose_transport(server: Capabilities, client: Capabilities) -> Transport:
    """The server's choice of data plane; :class:`NoTransport` if the ends cannot agree.

    ``auto`` picks nccl whenever :func:`nccl_possible`, else tcp (CUDA tensors are then
    staged through pinned host memory).
    """
    wanted = {server.transport, client.transport} - {Transport.AUTO}
    if len(wanted) > 1:
        raise NoTransport("one end asked for tcp and the other for nccl")
    why_not = nccl_possible(server, client)
    if wanted == {Transport.TCP}:
        return Transport.TCP
    if wanted == {Transport.NCCL}:
        if why_not:
            raise NoTransport(f"transport 'nccl' was requested but {why_not}")
        return Transport.NCCL
    return Transport.TCP if why_not else Transport.NCCL
