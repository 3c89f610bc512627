"""What the prefill and decode servers agree on: their pipe, their KV pools, shared helpers.

One long-lived pipe per decode server, opened by the decoder (``aiokvpipe.connect``) to the
prefill server's listener. Each side learns that the pipe ended from ``pipe.wait_closed()``.
Keys on that pipe:

* ``HELLO_KEY`` (decoder -> prefill, first message): the decoder's id as UTF-8 bytes in a uint8
  tensor, so the prefill server knows which pipe serves which decoder.
* ``WELCOME_KEY`` (prefill -> decoder, reply): ``None``; sent once the pipe is registered, so
  the decoder never reports "connected" before the prefill server could use the pipe.
* any other key: a request id. The prefill server sends the request's KV blocks with
  ``send_blocks(key=request_id)`` (one call per layer, or one for all layers) from its own
  pool, the decode server receives them with one ``recv_blocks(key=request_id)`` into the
  blocks it allocated in its pool; then the prefill server sends the first generated token,
  ``send(int64 tensor [token], key=request_id)``.

Both servers build their pools from the model (``paged_kv.PagedKV``), so with the same
``--model`` they fit; each allocates its own block ids.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable
from typing import Any, Final, Protocol, TypeVar

import paged_kv
import tinygpt
import torch
from fastapi import Request
from fastapi.responses import Response

import aiokvpipe

HELLO_KEY = "example/hello"
WELCOME_KEY = "example/welcome"
TOKEN_ENV = "AIOKVPIPE_TOKEN"

T = TypeVar("T")


class PipeLike(Protocol):
    """The part of ``aiokvpipe.Pipe`` the examples use."""

    async def send(self, msg: Any, key: str | None = None) -> None: ...
    async def recv(self, key: str | None = None) -> Any: ...
    async def send_blocks(self, pool: aiokvpipe.BlockPool, block_ids: object,
                          key: str | None = None, layers: object = None) -> None: ...
    async def recv_blocks(self, pool: aiokvpipe.BlockPool, block_ids: object,
                          key: str | None = None, layers: object = None) -> None: ...
    def discard(self, key: str | None) -> int: ...
    async def wait_closed(self) -> None: ...
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
        "--transport", default="auto", choices=["auto", "tcp", "nccl", "ipc"],
        help="pipe data plane"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"shared pipe secret (default: ${TOKEN_ENV}; prefer the env var, argv is "
             "visible in ps)",
    )
    parser.add_argument("--seed", type=int, default=0, help="model seed; must match the peer")
    parser.add_argument("--model", default="tiny", choices=sorted(tinygpt.MODELS),
                        help="model shape; must match the peer")
    parser.add_argument("--num-blocks", type=int, default=512,
                        help=f"KV pool size in blocks of {paged_kv.BLOCK_SIZE} tokens")
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


def pipe_options(args: argparse.Namespace, name: str) -> aiokvpipe.PipeOptions:
    """The pipe's options from parsed CLI args; ``name`` labels it in logs and /metrics."""
    return aiokvpipe.PipeOptions(device=args.device, transport=args.transport,
                                 token=args.token or None, name=name)


def build(args: argparse.Namespace) -> tuple[Any, paged_kv.PagedKV]:
    """The model and its KV block pool, as ``--model``, ``--seed``, ``--num-blocks`` say."""
    model = tinygpt.build_model(args.device, seed=args.seed, **tinygpt.MODELS[args.model])
    return model, paged_kv.PagedKV(model.config, args.num_blocks, device=args.device)


def metrics_response() -> Response:
    """``GET /metrics``: this process's Prometheus registry (aiokvpipe's pipe metrics in it)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def until_disconnected(request: Request) -> None:
    """Return once the HTTP client of ``request`` has gone away (its body already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work``; if the client disconnects first, cancel it (its own cleanup runs to the
    end) and return ``None``. This is how an abandoned request frees what it holds at once
    instead of running on for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when we are cancelled (server stopping): nothing is left running
        watcher.cancel()
        task.cancel()  # no-op once done
    await asyncio.wait({task})  # its cleanup (freeing blocks, say) has run
    return None if task.cancelled() else task.result()


#: How long the servers keep an idle HTTP connection open (uvicorn's default, made explicit).
SERVER_KEEP_ALIVE_S: Final = 5.0
#: A client of these servers drops its idle connections sooner: with both at 5 s, a request
#: sent on a connection the server was closing at that moment failed with ReadError (seen
#: once in the e2e tests on the loaded 2-core VM, 2026-12-02: a 503 "prefill_unavailable").
CLIENT_KEEPALIVE_EXPIRY_S: Final = SERVER_KEEP_ALIVE_S / 2


def serve(app: Any, args: argparse.Namespace) -> None:
    """Run a server's app under uvicorn with the shared options (``add_pipe_args``)."""
    import logging

    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    # On SIGTERM, requests still running after the grace period are cancelled (their queued
    # forward passes with them) so a stop under load is prompt.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout,
                timeout_keep_alive=int(SERVER_KEEP_ALIVE_S))
