"""Prefill server: runs prompts through tinygpt and streams their KV blocks over aiokvpipe.

Run::

    python examples/prefill_server.py --port 8100 --pipe-port 8101 --device cpu

The server keeps its own paged KV pool (``paged_kv``; ``--num-blocks``). A request's prompt is
run with the KV of each layer copied into blocks the request allocated here as soon as that
layer's attention wrote it; with ``--kv-streaming layer`` (default) that layer's blocks are
sent at once (``send_blocks(..., layers=[i])``) while the next layers compute, with ``whole``
all layers go in one ``send_blocks`` after the forward pass. The decode server says only the
request id: it receives into its own block ids, paired with ours by the key.

HTTP API:

* ``POST /prefill {"request_id", "decoder_id", "prompt", "kv_streaming"?}`` -- computes the
  prompt's KV cache, sends its blocks on ``decoder_id``'s pipe with ``key=request_id``, then
  the first generated token (``send(int64 [1], key=request_id)``), and answers
  ``{"prompt_tokens", "prefill_ms", "kv_bytes", "send_ms", "kv_streaming"}`` (``send_ms``:
  from the end of the forward pass until the last block left). 503 with
  ``{"error", "message"}`` if that decoder has no live pipe, the pool is full or a send fails.
  If the client disconnects first, the request is abandoned: its sends are cancelled, its
  blocks freed.
* ``GET /health`` -- liveness, the ids of the connected decoders, the pool's free blocks.
* ``GET /metrics`` -- Prometheus text: the pipes' figures under ``pipe="prefill-to-decode"``.

Pipes: listens on ``--pipe-host:--pipe-port``; every decode server connects once, introduces
itself (``pipe_common.HELLO_KEY``) and keeps that pipe for all its requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import tinygpt
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from paged_kv import OutOfBlocks
from pipe_common import (
    HELLO_KEY,
    WELCOME_KEY,
    PipeLike,
    add_pipe_args,
    build,
    metrics_response,
    pipe_options,
    serve,
    tensor_to_text,
    unless_disconnected,
)
from pydantic import BaseModel, Field, model_validator

import aiokvpipe

log = logging.getLogger("prefill")

HELLO_TIMEOUT_S = 10.0  # a peer that connects but never says hello is dropped
SEND_TIMEOUT_S = 30.0  # bounds a request's KV sends (backpressure from a stuck decoder)
PIPE_NAME = "prefill-to-decode"  # the pipes' label in /metrics (shared by every decoder's)

KVStreaming = Literal["layer", "whole"]


class PrefillRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=128)
    decoder_id: str = Field(min_length=1, max_length=128)
    prompt: str = Field(min_length=1, max_length=tinygpt.MAX_POSITIONS)  # bytes checked below
    kv_streaming: KVStreaming | None = None  # default: the server's --kv-streaming

    @model_validator(mode="after")
    def _fits_context(self) -> PrefillRequest:
        if len(self.prompt.encode("utf-8")) > tinygpt.MAX_POSITIONS:
            raise ValueError(f"prompt longer than {tinygpt.MAX_POSITIONS} bytes")
        return self


class PrefillServer:
    """Owns the model, the pipe listener and the decoder-id -> pipe table."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model, self.kv = build(args)
        self.tokenizer = tinygpt.ByteTokenizer()
        self.decoders: dict[str, PipeLike] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: Any = None

    # -- pipe side -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._listener = await aiokvpipe.listen(
            self.args.pipe_host, self.args.pipe_port, pipe_options(self.args, PIPE_NAME)
        )
        log.info("pipe listener on %s:%d", self.args.pipe_host, self._listener.port)
        self._spawn(self._accept_loop())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.aclose()

    def _spawn(self, coro: Any) -> None:
        # Keep a strong reference: the loop only holds weak ones to tasks.
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def _accept_loop(self) -> None:
        while True:
            try:
                pipe = await self._listener.accept()
            except aiokvpipe.PipeClosed:
                return  # listener closed: we are shutting down
            except (
                aiokvpipe.AuthenticationError,
                aiokvpipe.ProtocolError,
                aiokvpipe.BrokenPipe,
            ) as exc:
                # One peer failing its handshake (bad token, not aiokvpipe, hung up) must not stop
                # us accepting the others.
                log.warning("rejected a pipe peer: %r", exc)
                continue
            self._spawn(self._serve_decoder(pipe))

    async def _serve_decoder(self, pipe: PipeLike) -> None:
        """Register the pipe under the decoder's id until the pipe ends."""
        decoder_id = None
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                decoder_id = tensor_to_text(await pipe.recv(key=HELLO_KEY))
            previous = self.decoders.get(decoder_id)
            self.decoders[decoder_id] = pipe
            if previous is not None:  # the decoder reconnected; its old pipe is dead or dying
                self._spawn(previous.aclose())
            await pipe.send(None, key=WELCOME_KEY)
            log.info("decoder %s connected", decoder_id)
            await pipe.wait_closed()  # returns at a graceful close, raises if the pipe broke
            log.info("pipe of decoder %s closed", decoder_id)
        except (aiokvpipe.PipeError, TimeoutError, ValueError) as exc:
            log.info("pipe of decoder %s ended: %r", decoder_id, exc)
        finally:
            if decoder_id is not None and self.decoders.get(decoder_id) is pipe:
                del self.decoders[decoder_id]
            with contextlib.suppress(Exception):
                await pipe.aclose()

    # -- HTTP side -----------------------------------------------------------------------------

    async def prefill(self, req: PrefillRequest) -> JSONResponse:
        """Run the prompt and ship its KV blocks and first token; see the module docstring.

        Cancellation (the client went away): pending sends are cancelled (an offer the peer
        has not pulled is taken back), the forward pass stops at its next layer, and the
        blocks are freed once nothing reads or writes them any more.
        """
        pipe = self.decoders.get(req.decoder_id)
        if pipe is None:
            return _error(503, "decoder_not_connected", f"no pipe from decoder {req.decoder_id!r}")
        ids = self.tokenizer.encode(req.prompt)
        try:
            block_ids = self.kv.allocator.allocate(self.kv.blocks_for(len(ids)))
        except OutOfBlocks as exc:
            return _error(503, "kv_blocks_exhausted", str(exc))
        streaming = req.kv_streaming or self.args.kv_streaming
        loop = asyncio.get_running_loop()
        stop = threading.Event()  # set: the forward pass gives up at its next layer
        sends: list[asyncio.Task[None]] = []

        def send(layers: list[int] | None, written: torch.cuda.Event | None = None) -> None:
            # On the loop. send_blocks reads the blocks after the work queued on the loop
            # thread's current stream: make that stream wait for the forward thread's writes.
            if written is not None:
                torch.cuda.current_stream(written.device).wait_event(written)
            if not stop.is_set():
                sends.append(loop.create_task(
                    pipe.send_blocks(self.kv.pool, block_ids, key=req.request_id, layers=layers)))

        def on_layer(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            # In the forward's thread, the moment this layer's KV exists.
            if stop.is_set():
                raise _Abandoned
            self.kv.write_layer(layer, block_ids, keys, values)
            if streaming == "layer":
                written = None
                if keys.is_cuda:
                    written = torch.cuda.Event()
                    written.record(torch.cuda.current_stream(keys.device))
                loop.call_soon_threadsafe(send, [layer], written)

        def compute() -> tuple[int, float]:  # blocking: runs in a worker thread
            t0 = time.perf_counter()
            _, first_token = tinygpt.prefill(self.model, ids, tinygpt.LayerStreamingCache(on_layer))
            if self.args.device.startswith("cuda"):
                torch.cuda.current_stream().synchronize()  # only so prefill_ms is honest
            return first_token, (time.perf_counter() - t0) * 1e3

        # The forward pass blocks for milliseconds to seconds; a thread keeps the loop serving
        # the sends, /health and other requests meanwhile.
        forward = asyncio.ensure_future(asyncio.to_thread(compute))
        try:
            first_token, prefill_ms = await asyncio.shield(forward)
            t_sent = time.perf_counter()
            if streaming == "whole":
                send(None)
            async with asyncio.timeout(SEND_TIMEOUT_S):
                # Layer sends were queued by the thread before it returned (call_soon_threadsafe
                # runs callbacks in order), so every layer's task is in `sends` by now.
                await asyncio.gather(*sends)
                send_ms = (time.perf_counter() - t_sent) * 1e3
                await pipe.send(torch.tensor([first_token]), key=req.request_id)
        except (aiokvpipe.PipeError, TimeoutError) as exc:
            return _error(503, "send_failed", f"KV send to {req.decoder_id!r} failed: {exc!r}")
        finally:
            stop.set()
            for task in sends:
                task.cancel()  # no-op for those done
            await asyncio.gather(*sends, return_exceptions=True)
            # The thread may still be in the forward pass (writing these blocks): free them
            # only when it has finished.
            forward.add_done_callback(lambda f: self._forward_over(f, block_ids))
        return JSONResponse(
            {
                "prompt_tokens": len(ids),
                "prefill_ms": prefill_ms,
                "kv_bytes": self.kv.block_bytes(len(block_ids)),
                "send_ms": send_ms,
                "kv_streaming": streaming,
            }
        )

    def _forward_over(self, forward: asyncio.Future[Any], block_ids: list[int]) -> None:
        """A request's forward pass has ended: its blocks are free again. Its outcome was
        either awaited or, if the request was abandoned, is of no interest (``_Abandoned``)."""
        if not forward.cancelled():
            forward.exception()
        self.kv.allocator.free(block_ids)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "role": "prefill",
            "device": self.args.device,
            "pipe_port": self._listener.port if self._listener is not None else None,
            "decoders": sorted(self.decoders),
            "kv_blocks": {"total": self.kv.allocator.num_blocks,
                          "free": self.kv.allocator.num_free},
            "kv_streaming": self.args.kv_streaming,
        }


class _Abandoned(Exception):
    """Raised inside the forward pass of a request nobody waits for any more."""


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status)


def create_app(args: argparse.Namespace) -> FastAPI:
    """The FastAPI app; the model and the pipe listener live for the app's lifespan."""
    server: PrefillServer | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal server
        torch.set_num_threads(args.torch_threads)
        server = PrefillServer(args)
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="aiokvpipe example: prefill", lifespan=lifespan)

    @app.post("/prefill")
    async def prefill(req: PrefillRequest, request: Request) -> Response:
        assert server is not None
        resp = await unless_disconnected(request, server.prefill(req))
        return resp if resp is not None else _error(499, "client_disconnected", "abandoned")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        assert server is not None
        return server.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return metrics_response()

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pipe_args(parser)
    parser.add_argument("--pipe-host", default="127.0.0.1", help="pipe listener bind address")
    parser.add_argument("--pipe-port", type=int, required=True, help="pipe listener port")
    parser.add_argument(
        "--kv-streaming", default="layer", choices=["layer", "whole"],
        help="send each layer's KV blocks as the layer finishes, or all after the forward pass",
    )
    args = parser.parse_args(argv)
    serve(create_app(args), args)


if __name__ == "__main__":
    main()
