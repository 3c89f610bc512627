"""Prefill server: runs prompts through tinygpt and ships their KV caches over aiokvpipe.

Run::

    python examples/prefill_server.py --port 8100 --pipe-port 8101 --device cpu

HTTP API:

* ``POST /prefill {"request_id", "decoder_id", "prompt"}`` -- computes the prompt's KV cache,
  sends it as one dict bundle on ``decoder_id``'s pipe with ``key=request_id`` and answers
  ``{"prompt_tokens", "prefill_ms", "kv_bytes", "send_ms", "sent_at"}`` once ``send()`` returned
  (``sent_at``: wall-clock seconds when the send started). 503 with ``{"error", "message"}`` if
  that decoder has no live pipe or the send fails.
* ``GET /health`` -- liveness plus the ids of the connected decoders.

Pipes: listens on ``--pipe-host:--pipe-port``; every decode server connects once, introduces
itself (``pipe_common.HELLO_KEY``) and keeps that pipe for all its requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import tinygpt
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pipe_common import (
    HELLO_KEY,
    WATCH_KEY,
    WELCOME_KEY,
    PipeLike,
    add_pipe_args,
    pipe_opts,
    serve,
    tensor_to_text,
)
from pydantic import BaseModel, Field, model_validator

import aiokvpipe

log = logging.getLogger("prefill")

HELLO_TIMEOUT_S = 10.0  # a peer that connects but never says hello is dropped
SEND_TIMEOUT_S = 30.0  # bounds one KV send (backpressure from a stuck decoder)


class PrefillRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=128)
    decoder_id: str = Field(min_length=1, max_length=128)
    prompt: str = Field(min_length=1, max_length=tinygpt.MAX_POSITIONS)  # bytes checked below

    @model_validator(mode="after")
    def _fits_context(self) -> PrefillRequest:
        if len(self.prompt.encode("utf-8")) > tinygpt.MAX_POSITIONS:
            raise ValueError(f"prompt longer than {tinygpt.MAX_POSITIONS} bytes")
        return self


class PrefillServer:
    """Owns the model, the pipe listener and the decoder-id -> pipe table."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = tinygpt.build_model(args.device, seed=args.seed)
        self.tokenizer = tinygpt.ByteTokenizer()
        self.decoders: dict[str, PipeLike] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: Any = None

    # -- pipe side -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._listener = await aiokvpipe.listen(
            host=self.args.pipe_host, port=self.args.pipe_port, **pipe_opts(self.args)
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
            await pipe.recv(key=WATCH_KEY)  # never sent: returns only by raising at pipe end
        except (aiokvpipe.PipeError, TimeoutError, ValueError) as exc:
            log.info("pipe of decoder %s ended: %r", decoder_id, exc)
        finally:
            if decoder_id is not None and self.decoders.get(decoder_id) is pipe:
                del self.decoders[decoder_id]
            with contextlib.suppress(Exception):
                await pipe.aclose()

    # -- HTTP side -----------------------------------------------------------------------------

    def _compute(self, prompt: str) -> tuple[dict[str, torch.Tensor], int, float]:
        """Blocking: prompt -> (KV bundle, prompt tokens, prefill ms). Runs in a worker thread."""
        ids = self.tokenizer.encode(prompt)
        t0 = time.perf_counter()
        cache, next_token = tinygpt.prefill(self.model, ids)
        bundle = tinygpt.kv_to_bundle(cache, next_token)
        if bundle["k0"].is_cuda:
            # Only so prefill_ms is honest; the pipe itself orders the send after these kernels.
            torch.cuda.synchronize(bundle["k0"].device)
        return bundle, len(ids), (time.perf_counter() - t0) * 1e3

    async def prefill(self, req: PrefillRequest) -> JSONResponse:
        pipe = self.decoders.get(req.decoder_id)
        if pipe is None:
            return _error(503, "decoder_not_connected", f"no pipe from decoder {req.decoder_id!r}")
        # The forward pass blocks for milliseconds; a thread keeps the loop (and /health) free.
        bundle, n_prompt, prefill_ms = await asyncio.to_thread(self._compute, req.prompt)
        sent_at = time.time()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await pipe.send(bundle, key=req.request_id)
        except (aiokvpipe.PipeError, TimeoutError) as exc:
            return _error(503, "send_failed", f"KV send to {req.decoder_id!r} failed: {exc!r}")
        return JSONResponse(
            {
                "prompt_tokens": n_prompt,
                "prefill_ms": prefill_ms,
                "kv_bytes": tinygpt.bundle_nbytes(bundle),
                "send_ms": (time.perf_counter() - t0) * 1e3,
                "sent_at": sent_at,
            }
        )

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "role": "prefill",
            "device": self.args.device,
            "pipe_port": self._listener.port if self._listener is not None else None,
            "decoders": sorted(self.decoders),
        }


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
    async def prefill(req: PrefillRequest) -> JSONResponse:
        assert server is not None
        return await server.prefill(req)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        assert server is not None
        return server.health()

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pipe_args(parser)
    parser.add_argument("--pipe-host", default="127.0.0.1", help="pipe listener bind address")
    parser.add_argument("--pipe-port", type=int, required=True, help="pipe listener port")
    args = parser.parse_args(argv)
    serve(create_app(args), args)


if __name__ == "__main__":
    main()
