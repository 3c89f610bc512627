"""Decode server: keeps KV caches in a paged block pool, fed over aiokvpipe, and decodes.

Run::

    python examples/decode_server.py --port 8200 --prefill-url http://127.0.0.1:8100 \\
        --pipe-host 127.0.0.1 --pipe-port 8101 --device cpu

The server owns a paged KV pool (``paged_kv``: per layer ``[2, num_blocks, 16, heads,
head_dim]``, a free list, a block table per request). For each request it allocates the
prompt's blocks, posts ``recv_blocks(pool, block_ids, key=request_id)`` -- which completes
when every layer arrived, one ``send_blocks`` per layer or one for all -- and the receive of
the first token, then asks the prefill server over HTTP to run the prompt. Once the blocks are
filled, decoding reads them into the model's cache and generates. The blocks go back to the
free list when the request ends, fails or is abandoned (the client disconnected).

HTTP API:

* ``POST /generate {"prompt", "max_tokens", "kv_streaming"?}`` -> ``{"text", "prompt_tokens",
  "tokens", "prefill_ms", "kv_bytes", "transfer_ms", "ttft_ms", "decode_ms", "total_ms",
  "kv_streaming", "request_id"}``. ``ttft_ms``: from the request's arrival until its KV
  blocks and first token are here (decoding can start); ``transfer_ms``: of that, the time
  after the prefill's forward pass ended. ``kv_streaming`` (``"layer"`` or ``"whole"``)
  overrides the prefill server's default for this request. 503 with ``{"error", "message"}``
  when the prefill server, the pipe or free blocks are unavailable -- never a hang: every
  wait is bounded by ``--request-timeout``.
* ``GET /health`` -> ``{"status": "ok", "pipe_connected", "kv_blocks": {"total", "free"},
  "inflight", "decoding", "abandoned", ...}``; answers while requests run.
* ``GET /metrics`` -- Prometheus text: the pipe's figures under ``pipe="decode-to-prefill"``.

At startup a background task connects one pipe to the prefill server, watches it with
``pipe.wait_closed()`` and reconnects whenever it ends (the prefill server restarted, the
network dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Literal, TypeVar

import httpx
import tinygpt
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from paged_kv import OutOfBlocks
from pipe_common import (
    CLIENT_KEEPALIVE_EXPIRY_S,
    HELLO_KEY,
    WELCOME_KEY,
    PipeLike,
    add_pipe_args,
    build,
    metrics_response,
    pipe_options,
    serve,
    text_to_tensor,
    unless_disconnected,
)
from pydantic import BaseModel, Field, model_validator

import aiokvpipe

log = logging.getLogger("decode")

CONNECT_TIMEOUT_S = 2.0  # one connect attempt; the keeper loops forever around it
RECONNECT_BACKOFF_S = (0.05, 1.0)  # first and largest pause between failed connect attempts
PIPE_NAME = "decode-to-prefill"  # the pipe's label in /metrics (kept across reconnects)

T = TypeVar("T")


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=4096)
    max_tokens: int = Field(default=32, ge=1, le=512)
    kv_streaming: Literal["layer", "whole"] | None = None  # default: the prefill server's

    @model_validator(mode="after")
    def _fits_context(self) -> GenerateRequest:
        # Checked here so an over-long request is a 422 for the client, not a prefill failure.
        if len(self.prompt.encode("utf-8")) + self.max_tokens > tinygpt.MAX_POSITIONS:
            raise ValueError(f"prompt bytes + max_tokens exceed {tinygpt.MAX_POSITIONS}")
        return self


class Unavailable(Exception):
    """The prefill side cannot serve this request now (-> HTTP 503)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class DecodeServer:
    """Owns the model, the HTTP client to the prefill server and the one pipe to it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.decoder_id = args.decoder_id or f"decode-{uuid.uuid4().hex[:12]}"
        self.model, self.kv = build(args)
        self.tokenizer = tinygpt.ByteTokenizer()
        self.pipe: PipeLike | None = None  # set only while connected and welcomed
        self.connects = 0
        self.last_error: str | None = None
        self.inflight = 0
        self.abandoned = 0  # requests whose client went away before the answer
        self.decoding = 0  # requests now generating from their KV blocks
        self._http = httpx.AsyncClient(
            base_url=args.prefill_url, timeout=args.request_timeout,
            limits=httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY_S))
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._spawn(self._keep_connected())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.aclose()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        # Keep a strong reference: the loop only holds weak ones to tasks.
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- pipe side -----------------------------------------------------------------------------

    async def _keep_connected(self) -> None:
        """Forever: connect, introduce ourselves, hold the pipe until it ends, start over."""
        backoff = RECONNECT_BACKOFF_S[0]
        while True:
            try:
                pipe = await aiokvpipe.connect(
                    self.args.pipe_host,
                    self.args.pipe_port,
                    pipe_options(self.args, PIPE_NAME),
                    connect_timeout=CONNECT_TIMEOUT_S,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 -- any failure means "not yet": retry
                self.last_error = f"connect to prefill pipe failed: {exc!r}"
                await asyncio.sleep(backoff)  # pacing retries, not synchronisation
                backoff = min(backoff * 2, RECONNECT_BACKOFF_S[1])
                continue
            try:
                await self._hold(pipe)
            finally:
                with contextlib.suppress(Exception):
                    await pipe.aclose()
            backoff = RECONNECT_BACKOFF_S[0]

    async def _hold(self, pipe: PipeLike) -> None:
        try:
            async with asyncio.timeout(self.args.request_timeout):
                await pipe.send(text_to_tensor(self.decoder_id), key=HELLO_KEY)
                await pipe.recv(key=WELCOME_KEY)
            self.pipe = pipe
            self.connects += 1
            self.last_error = None
            log.info("pipe to prefill server up (connect #%d)", self.connects)
            await pipe.wait_closed()  # returns at a graceful close, raises if the pipe broke
            self.last_error = "the prefill server closed the pipe"
            log.warning("%s", self.last_error)
        except (aiokvpipe.PipeError, TimeoutError) as exc:
            self.last_error = f"pipe to prefill server ended: {exc!r}"
            log.warning("%s", self.last_error)
        finally:
            if self.pipe is pipe:
                self.pipe = None

    # -- HTTP side -----------------------------------------------------------------------------

    async def generate(self, req: GenerateRequest) -> dict[str, Any]:
        """Receive the prompt's KV blocks from the prefill server into our pool, then decode.

        Raises :class:`Unavailable` (-> 503) when the prefill side cannot serve the request.
        Cancellation (the client went away): the receives and the prefill request are
        cancelled (the prefill server then abandons the request too), decoding stops at its
        next step, and the request's blocks go back to the free list once nothing writes or
        reads them any more.
        """
        t_start = time.perf_counter()
        pipe = self.pipe
        if pipe is None:
            raise Unavailable(
                "prefill_unavailable",
                f"no pipe to the prefill server (reconnecting); last error: {self.last_error}",
            )
        ids = self.tokenizer.encode(req.prompt)
        try:
            block_ids = self.kv.allocator.allocate(self.kv.blocks_for(len(ids)))
        except OutOfBlocks as exc:
            raise Unavailable("kv_blocks_exhausted", str(exc)) from None
        request_id = uuid.uuid4().hex
        # The receives are posted before the prefill is asked for, so each layer's blocks are
        # pulled into the pool the moment the prefill server offers them.
        kv_task = asyncio.create_task(_stamped(
            pipe.recv_blocks(self.kv.pool, block_ids, key=request_id)))
        token_task = asyncio.create_task(_stamped(pipe.recv(key=request_id)))
        prefill_task = asyncio.create_task(self._request_prefill(request_id, req))
        stop = threading.Event()  # set: the decoding thread stops at its next step
        decoding: asyncio.Future[tuple[list[int], float]] | None = None
        try:
            async with asyncio.timeout(self.args.request_timeout):
                # Whichever fails first fails the request (the others are cancelled below).
                await asyncio.gather(kv_task, token_task, prefill_task)
            (_, kv_at), (token, token_at) = kv_task.result(), token_task.result()
            info = prefill_task.result()
            ttft_ms = (max(kv_at, token_at) - t_start) * 1e3
            decoding = asyncio.ensure_future(asyncio.to_thread(
                self._decode, block_ids, len(ids), int(token[0]), req.max_tokens, stop))
            self.decoding += 1
            try:
                tokens, decode_ms = await asyncio.shield(decoding)
            finally:
                self.decoding -= 1
        except TimeoutError:
            raise Unavailable(
                "timeout", f"no KV cache within {self.args.request_timeout}s"
            ) from None
        except aiokvpipe.PipeError as exc:
            raise Unavailable("pipe_broken", f"pipe to prefill server failed: {exc!r}") from exc
        except ValueError as exc:  # recv_blocks: the prefill's blocks do not fit ours
            raise Unavailable("kv_refused", f"KV blocks refused: {exc}") from exc
        finally:
            stop.set()
            pending = [t for t in (kv_task, token_task, prefill_task) if not t.done()]
            for task in pending:
                task.cancel()
            # A cancelled recv_blocks returns once nothing writes into the blocks any more.
            await asyncio.gather(*pending, return_exceptions=True)
            if token_task.cancelled() or token_task.exception() is not None:
                pipe.discard(request_id)  # a first token arriving later must not hold credits
            self._release(block_ids, decoding)
        return {
            "request_id": request_id,
            "text": self.tokenizer.decode(tokens),
            "prompt_tokens": len(ids),
            "tokens": len(tokens),
            "prefill_ms": info["prefill_ms"],
            "kv_bytes": self.kv.block_bytes(len(block_ids)),
            "transfer_ms": max(0.0, ttft_ms - info["prefill_ms"]),
            "ttft_ms": ttft_ms,
            "decode_ms": decode_ms,
            "total_ms": (time.perf_counter() - t_start) * 1e3,
            "kv_streaming": info["kv_streaming"],
        }

    async def _request_prefill(self, request_id: str, req: GenerateRequest) -> dict[str, Any]:
        body = {"request_id": request_id, "decoder_id": self.decoder_id, "prompt": req.prompt,
                "kv_streaming": req.kv_streaming}
        try:
            resp = await self._http.post("/prefill", json=body)
        except httpx.HTTPError as exc:
            raise Unavailable("prefill_unavailable", f"prefill server: {exc!r}") from exc
        if resp.status_code != 200:
            raise Unavailable("prefill_failed", f"prefill server {resp.status_code}: {resp.text}")
        info: dict[str, Any] = resp.json()
        return info

    def _release(self, block_ids: list[int],
                 decoding: asyncio.Future[Any] | None) -> None:
        """Free a finished request's blocks -- when its decoding thread, which reads them, is
        over (at once if it never started or has ended)."""
        if decoding is None or decoding.done():
            self.kv.allocator.free(block_ids)
            return

        def over(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled():
                fut.exception()  # abandoned: its outcome is of no interest
            self.kv.allocator.free(block_ids)

        decoding.add_done_callback(over)

    def _decode(self, block_ids: list[int], n_prompt: int, first_token: int, max_tokens: int,
                stop: threading.Event) -> tuple[list[int], float]:
        """Blocking: the request's blocks into a model cache, then greedy decoding. Runs in a
        worker thread."""
        t0 = time.perf_counter()
        cache = self.kv.to_cache(block_ids, n_prompt)
        tokens = tinygpt.decode(self.model, cache, first_token, max_tokens, stop.is_set)
        return tokens, (time.perf_counter() - t0) * 1e3

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "role": "decode",
            "device": self.args.device,
            "decoder_id": self.decoder_id,
            "pipe_connected": self.pipe is not None,
            "connects": self.connects,
            "last_error": self.last_error,
            "inflight": self.inflight,
            "decoding": self.decoding,
            "abandoned": self.abandoned,
            "kv_blocks": {"total": self.kv.allocator.num_blocks,
                          "free": self.kv.allocator.num_free},
        }


async def _stamped(work: Awaitable[T]) -> tuple[T, float]:
    """``await work`` and the ``time.perf_counter()`` at which it returned."""
    result = await work
    return result, time.perf_counter()


def create_app(args: argparse.Namespace) -> FastAPI:
    """The FastAPI app; the model, HTTP client and pipe keeper live for the app's lifespan."""
    server: DecodeServer | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal server
        torch.set_num_threads(args.torch_threads)
        server = DecodeServer(args)
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="aiokvpipe example: decode", lifespan=lifespan)

    @app.post("/generate", response_model=None)
    async def generate(req: GenerateRequest, request: Request) -> dict[str, Any] | JSONResponse:
        assert server is not None
        server.inflight += 1
        try:
            result = await unless_disconnected(request, server.generate(req))
        except Unavailable as exc:
            return JSONResponse({"error": exc.error, "message": exc.message}, status_code=503)
        finally:
            server.inflight -= 1
        if result is None:  # nobody will read this answer
            server.abandoned += 1
            return JSONResponse({"error": "client_disconnected", "message": "abandoned"},
                                status_code=499)
        return result

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
    parser.add_argument("--prefill-url", required=True, help="e.g. http://127.0.0.1:8100")
    parser.add_argument("--pipe-host", default="127.0.0.1", help="prefill server's pipe host")
    parser.add_argument("--pipe-port", type=int, required=True, help="prefill server's pipe port")
    parser.add_argument("--decoder-id", default=None, help="stable id (default: random)")
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="bound on every wait of a request"
    )
    args = parser.parse_args(argv)
    serve(create_app(args), args)


if __name__ == "__main__":
    main()
