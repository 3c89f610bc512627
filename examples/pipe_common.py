"""What the prefill and decode servers agree on about their aiokvpipe pipe.

One long-lived pipe per decode server, opened by the decoder (``aiokvpipe.connect``) to the
prefill server's listener. Keys on that pipe:

* ``HELLO_KEY`` (decoder -> prefill, first message): the decoder's id as UTF-8 bytes in a uint8
  tensor, so the prefill server knows which pipe serves which decoder.
* ``WELCOME_KEY`` (prefill -> decoder, reply): ``None``; sent once the pipe is registered, so
  the decoder never reports "connected" before the prefill server could use the pipe.
* ``WATCH_KEY``: never sent. Each side keeps a ``recv(key=WATCH_KEY)`` pending; it only ever
  ends by raising when the pipe dies or closes, which is how a dead peer is noticed.
* any other key: a request id; the message is that request's KV bundle (see ``tinygpt``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Protocol

import torch

HELLO_KEY = "example/hello"
WELCOME_KEY = "example/welcome"
WATCH_KEY = "example/watch"
TOKEN_ENV = "AIOKVPIPE_TOKEN"


class PipeLike(Protocol):
    """The part of ``aiokvpipe.Pipe`` the examples use."""

    async def send(self, msg: Any, key: str | None = None) -> None: ...
    async def recv(self, key: str | None = None) -> Any: ...
    async def aclose(self) -> None: ...


def text_to_tensor(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a CPU uint8 tensor (pipes carry tensors, not strings)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def tensor_to_text(t: torch.Tensor, max_len: int = 256) -> str:
    """Inverse of :func:`text_to_tensor`; raises ``ValueError`` on anything else."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError("expected a 1-d uint8 tensor")
    if t.numel() > max_len:
        raise ValueError(f"id longer than {max_len} bytes")
    return bytes(t.cpu().tolist()).decode("utf-8")


def add_pipe_args(parser: argparse.ArgumentParser) -> None:
    """CLI options both servers share."""
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    parser.add_argument("--port", type=int, required=True, help="HTTP port")
    parser.add_argument("--device", default="cpu", help="model device: cpu, cuda:0, ...")
    parser.add_argument(
        "--transport", default="auto", choices=["auto", "tcp", "nccl"], help="pipe data plane"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"shared pipe secret (default: ${TOKEN_ENV}; prefer the env var, argv is "
             "visible in ps)",
    )
    parser.add_argument("--seed", type=int, default=0, help="model seed; must match the peer")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads per forward pass; requests already run in parallel threads",
    )
    parser.add_argument(
        "--graceful-timeout", type=float, default=3.0, help="seconds in-flight requests get on stop"
    )
    parser.add_argument("--log-level", default="info")


def pipe_opts(args: argparse.Namespace) -> dict[str, Any]:
    """aiokvpipe keyword options from parsed CLI args."""
    return {"device": args.device, "transport": args.transport, "token": args.token or None}


def serve(app: Any, args: argparse.Namespace) -> None:
    """Run a server's app under uvicorn with the shared options (``add_pipe_args``)."""
    import logging

    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    # On SIGTERM, requests still running after the grace period are cancelled (their queued
    # forward passes with them) so a stop under load is prompt.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
