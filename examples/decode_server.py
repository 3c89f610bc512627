"""Decode server: receives KV caches over aiokvpipe and continues generation from them.

Run::

    python examples/decode_server.py --port 8200 --prefill-url http://127.0.0.1:8100 \\
        --pipe-host 127.0.0.1 --pipe-port 8101 --device cpu

HTTP API:

* ``POST /generate {"prompt", "max_tokens"}`` -> ``{"text", "prompt_tokens", "tokens",
  "prefill_ms", "kv_bytes", "transfer_ms", "decode_ms", "total_ms", "request_id"}``.
  ``transfer_ms`` is wall clock from the prefill server starting ``send()`` to this server's
  ``recv()`` returning (both clocks are the same host's in the demo). 503 with
  ``{"error", "message"}`` when the prefill server or the pipe is unavailable -- never a hang:
  every wait is bounded by ``--request-timeout``.
* ``GET /health`` -> ``{"status": "ok", "pipe_connected": bool, ...}``; answers while requests run.

At startup a background task connects one pipe to the prefill server and keeps reconnecting it
whenever it breaks (the prefill server restarted, the network dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
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
    text_to_tensor,
)
from pydantic import BaseModel, Field, model_validator

import aiokvpipe

log = logging.getLogger("decode")

CONNECT_TIMEOUT_S = 2.0  # one connect attempt; the keeper loops forever around it
RECONNECT_BACKOFF_S = (0.05, 1.0)  # first and largest pause between failed connect attempts
DRAIN_TIMEOUT_S = 60.0  # how long an abandoned request's KV bundle is waited for, then dropped


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=4096)
    max_tokens: int = Field(default=32, ge=1, le=512)

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
        self.model = tinygpt.build_model(args.device, seed=args.seed)
        self.tokenizer = tinygpt.ByteTokenizer()
        self.pipe: PipeLike | None = None  # set only while connected and welcomed
        self.connects = 0
        self.last_error: str | None = None
        self.inflight = 0
        self._http = httpx.AsyncClient(base_url=args.prefill_url, timeout=args.request_timeout)
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
                    connect_timeout=CONNECT_TIMEOUT_S,
                    **pipe_opts(self.args),
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
            await pipe.recv(key=WATCH_KEY)  # never sent: returns only by raising at pipe end
        except (aiokvpipe.PipeError, TimeoutError) as exc:
            self.last_error = f"pipe to prefill server ended: {exc!r}"
            log.warning("%s", self.last_error)
        finally:
            if self.pipe is pipe:
                self.pipe = None

    # -- HTTP side -----------------------------------------------------------------------------

    async def generate(self, req: GenerateRequest) -> dict[str, Any]:
        """Prefill remotely, receive the KV cache by request id, decode here.

        Raises :class:`Unavailable` (-> 503) when the prefill side cannot serve the request.
        """
        t_start = time.perf_counter()
        pipe = self.pipe
        if pipe is None:
            raise Unavailable(
                "prefill_unavailable",
                f"no pipe to the prefill server (reconnecting); last error: {self.last_error}",
            )
        request_id = uuid.uuid4().hex
        # Post the keyed recv before asking for the prefill, so the bundle is claimed the moment
        # it arrives and the HTTP round trip overlaps the transfer.
        recv_task = asyncio.create_task(_recv_stamped(pipe, request_id))
        # Its failure is reported through whoever awaits it; if nobody does any more (request
        # abandoned, server stopping) it must not be logged as "never retrieved".
        recv_task.add_done_callback(_consume_outcome)
        try:
            async with asyncio.timeout(self.args.request_timeout):
                info = await self._request_prefill(request_id, req.prompt)
                # shield: a timeout must not cancel the recv; _abandon() still drains it.
                bundle, received_at = await asyncio.shield(recv_task)
        except TimeoutError:
            self._abandon(recv_task)
            raise Unavailable(
                "timeout", f"no KV cache within {self.args.request_timeout}s"
            ) from None
        except aiokvpipe.PipeError as exc:
            self._abandon(recv_task)
            raise Unavailable("pipe_broken", f"pipe to prefill server failed: {exc!r}") from exc
        except BaseException:
            self._abandon(recv_task)
            raise

        cache, first_token = tinygpt.bundle_to_kv(bundle)
        tokens, decode_ms = await asyncio.to_thread(self._decode, cache, first_token, req)
        return {
            "request_id": request_id,
            "text": self.tokenizer.decode(tokens),
            "prompt_tokens": info["prompt_tokens"],
            "tokens": len(tokens),
            "prefill_ms": info["prefill_ms"],
            "kv_bytes": tinygpt.bundle_nbytes(bundle),
            "transfer_ms": max(0.0, (received_at - info["sent_at"]) * 1e3),
            "decode_ms": decode_ms,
            "total_ms": (time.perf_counter() - t_start) * 1e3,
        }

    async def _request_prefill(self, request_id: str, prompt: str) -> dict[str, Any]:
        body = {"request_id": request_id, "decoder_id": self.decoder_id, "prompt": prompt}
        try:
            resp = await self._http.post("/prefill", json=body)
        except httpx.HTTPError as exc:
            raise Unavailable("prefill_unavailable", f"prefill server: {exc!r}") from exc
        if resp.status_code != 200:
            raise Unavailable("prefill_failed", f"prefill server {resp.status_code}: {resp.text}")
        info: dict[str, Any] = resp.json()
        return info

    def _abandon(self, recv_task: asyncio.Task[Any]) -> None:
        """Stop waiting for a request's bundle without leaving it stuck in the pipe: if it is
        already on its way, keep receiving it (bounded) in the background and drop it."""
        if recv_task.done():
            return  # a received bundle is simply dropped

        async def drain() -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    await recv_task

        self._spawn(drain())

    def _decode(
        self, cache: Any, first_token: int, req: GenerateRequest
    ) -> tuple[list[int], float]:
        """Blocking greedy decode; runs in a worker thread."""
        t0 = time.perf_counter()
        tokens = tinygpt.decode(self.model, cache, first_token, req.max_tokens)
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
        }


def _consume_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _recv_stamped(pipe: PipeLike, key: str) -> tuple[dict[str, torch.Tensor], float]:
    """``pipe.recv(key)`` plus the wall-clock time it returned (for transfer_ms)."""
    msg = await pipe.recv(key=key)
    return msg, time.time()


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
    async def generate(req: GenerateRequest) -> dict[str, Any] | JSONResponse:
        assert server is not None
        server.inflight += 1
        try:
            return await server.generate(req)
        except Unavailable as exc:
            return JSONResponse({"error": exc.error, "message": exc.message}, status_code=503)
        finally:
            server.inflight -= 1

    @app.get("/health")
    async def health() -> dict[str, Any]:
        assert server is not None
        return server.health()

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
